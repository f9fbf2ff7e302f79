"""The sparse variant: integer class ids `[...]` instead of one-hot targets `[..., C]`.

`sparse_masked_mae(ids, y_pred, ...)` equals `masked_mae(one_hot(ids, C), y_pred, ...)`
in value and gradient, reading y_pred once and never building the one-hot
tensor (as Keras' sparse cross-entropy does for cross-entropy).
"""

import tensorflow as tf

from fused_masked_mae._loader import ops_library
from fused_masked_mae import xla as _xla
from fused_masked_mae._second_order import gradient_of_gradient
from fused_masked_mae.ops import _FLOAT_DTYPES, _check_static_shapes, in_xla_context
from fused_masked_mae.tokens import masked_token_list
from fused_masked_mae.reference import reference_masked_mae_tokens

_ID_DTYPES = (tf.int32, tf.int64)


def _check_inputs(y_true_ids, y_pred):
    y_pred = tf.convert_to_tensor(y_pred)
    if y_pred.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"y_pred must be float16, bfloat16, float32 or float64, got {y_pred.dtype.name}"
        )
    y_true_ids = tf.convert_to_tensor(y_true_ids)
    if y_true_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"y_true_ids must be int32 or int64 class ids, got {y_true_ids.dtype.name}")
    return y_true_ids, y_pred


def sparse_masked_mae_tokens(y_true_ids, y_pred, tokens):
    """The fused sparse loss for a list of masked token ids (inside XLA
    compilation: the sparse custom calls, or where no handler can run the
    composite on one_hot(ids); see ops.masked_mae_tokens)."""
    y_true_ids, y_pred = _check_inputs(y_true_ids, y_pred)
    tokens = masked_token_list(None, None, tokens)
    if in_xla_context():
        classes = _check_static_shapes(y_true_ids, y_pred, tokens, sparse=True)
        if _xla.use_custom_call(classes):
            return _xla.masked_mae_custom_call(y_true_ids, y_pred, tokens, sparse=True)
        return reference_sparse_masked_mae(y_true_ids, y_pred, tokens=tokens)
    loss, _ = ops_library.import_fused_masked_mae_sparse_masked_mae(
        y_true_ids=y_true_ids, y_pred=y_pred, masked_tokens=tokens
    )
    return loss


def sparse_masked_mae(y_true_ids, y_pred, start_token=None, end_token=None, tokens=()):
    """Fused masked MAE for class-id targets.

    Args:
      y_true_ids: int32/int64 class ids, shape `[...]`, each in `[0, C)` (on
        CPU an id outside raises InvalidArgumentError; on GPU it gives NaN, as
        TensorFlow's sparse cross-entropy does).
      y_pred: predictions `[..., C]` (float16, bfloat16, float32, float64).
      start_token, end_token, tokens: masked class ids (see `masked_mae`).

    Returns:
      The per-position loss `[...]`, equal to `masked_mae(one_hot(ids), y_pred, ...)`.
    """
    return sparse_masked_mae_tokens(
        y_true_ids, y_pred, masked_token_list(start_token, end_token, tokens)
    )


def reference_sparse_masked_mae(y_true_ids, y_pred, start_token=None, end_token=None, tokens=()):
    """The composite reference on one_hot(ids): the parity oracle for the sparse op."""
    y_pred = tf.convert_to_tensor(y_pred)
    one_hot = tf.one_hot(y_true_ids, tf.shape(y_pred)[-1], dtype=y_pred.dtype)
    return reference_masked_mae_tokens(
        one_hot, y_pred, masked_token_list(start_token, end_token, tokens)
    )


@tf.RegisterGradient("Import_fused_masked_mae>SparseMaskedMae")
def _sparse_masked_mae_grad(op, grad_loss, _grad_row_keep):
    y_true_ids, y_pred = op.inputs
    grad_y_pred = ops_library.import_fused_masked_mae_sparse_masked_mae_grad(
        y_true_ids=y_true_ids, y_pred=y_pred, row_keep=op.outputs[1], grad_loss=grad_loss
    )
    return None, grad_y_pred  # no gradient for integer ids


@tf.RegisterGradient("Import_fused_masked_mae>SparseMaskedMaeGrad")
def _sparse_masked_mae_grad_grad(op, upstream):
    # Second order, as for the dense gradient op (see _second_order.py), on
    # one_hot(ids): built only when a second derivative is asked for.
    y_true_ids, y_pred, row_keep, _ = op.inputs
    one_hot = tf.one_hot(y_true_ids, tf.shape(y_pred)[-1], dtype=y_pred.dtype)
    return (None, tf.zeros_like(y_pred), None,
            gradient_of_gradient(one_hot, y_pred, row_keep, upstream))


# The Keras loss lives with MaskedMAE (every Keras backend); kept importable here.
from fused_masked_mae.losses import SparseMaskedMAE  # noqa: E402,F401
