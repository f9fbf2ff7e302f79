"""The fused op, its Python signature, and its registered gradient.

Inside XLA compilation (`tf.function(jit_compile=True)`, Keras'
`compile(jit_compile=True)` or its GPU default `jit_compile="auto"`) a
TensorFlow op cannot run, so `masked_mae_tokens` emits the XLA custom calls
of the same kernels instead (fused_masked_mae.xla). Only where no handler can
run (TPUs, a GPU build without CUDA handlers) does it build the composite of
plain TensorFlow ops (`reference_masked_mae_tokens`). See `in_xla_context`.
"""

import tensorflow as tf

from fused_masked_mae import reference as _reference
from fused_masked_mae._second_order import gradient_of_gradient
from fused_masked_mae import xla as _xla
from fused_masked_mae._loader import ops_library
from fused_masked_mae.tokens import MAX_MASKED_TOKENS, masked_token_list  # noqa: F401 (API)

_FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


def _check_inputs(y_true, y_pred):
    y_true = tf.convert_to_tensor(y_true)
    y_pred = tf.convert_to_tensor(y_pred)
    for name, tensor in (("y_true", y_true), ("y_pred", y_pred)):
        if tensor.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype.name}"
            )
    if y_true.dtype != y_pred.dtype:
        raise TypeError(
            f"y_true and y_pred must have the same dtype, got {y_true.dtype.name} and "
            f"{y_pred.dtype.name}"
        )
    return y_true, y_pred


def in_xla_context():
    """True while tracing a graph that XLA will compile: the body of a
    `tf.function(jit_compile=True)` (Keras' jit-compiled train/test/predict
    steps are such functions), any function or control-flow branch traced
    inside one, or a TPU rewrite.

    TensorFlow marks those graphs by entering an `XLAControlFlowContext` while
    tracing them; this looks for one in the default graph and its outer graphs
    (`tf.__internal__.get_enclosing_xla_context`, what TensorFlow's own
    function cache uses, equivalent to
    `control_flow_util.GraphOrParentsInXlaContext`). Eager execution is never
    in an XLA context.
    """
    if tf.executing_eagerly():
        return False
    return tf.__internal__.get_enclosing_xla_context() is not None


def _shape_string(shape):
    if shape.rank is None:
        return "<unknown>"
    return "[" + ",".join("?" if d is None else str(d) for d in shape.as_list()) + "]"


def _check_static_shapes(y_true, y_pred, tokens, sparse=False):
    """What the op's shape function checks, for the XLA paths (the composite
    would otherwise broadcast unequal shapes and give NaN for C = 0). Returns
    the number of classes, or None when it is unknown."""
    if y_pred.shape.rank == 0 or (not sparse and y_true.shape.rank == 0):
        raise ValueError("Shape must be at least rank 1 but is rank 0")
    if sparse:
        if y_pred.shape.rank is not None and not y_true.shape.is_compatible_with(
                y_pred.shape[:-1]):
            raise ValueError(
                f"y_true_ids must have y_pred's shape without its last dimension, got "
                f"y_true_ids {_shape_string(y_true.shape)} and y_pred "
                f"{_shape_string(y_pred.shape)}"
            )
        shape = y_pred.shape
    else:
        if not y_true.shape.is_compatible_with(y_pred.shape):
            raise ValueError(
                f"y_true and y_pred must have the same shape, got y_true "
                f"{_shape_string(y_true.shape)} and y_pred {_shape_string(y_pred.shape)}"
            )
        shape = y_true.shape.merge_with(y_pred.shape)
    classes = shape[-1] if shape.rank is not None else None
    if classes is None:
        return None
    if classes == 0:
        raise ValueError(
            f"the last dimension (classes) must be positive, got shape {_shape_string(shape)}"
        )
    for token in tokens:
        if token >= classes:
            raise ValueError(
                f"masked token id {token} is outside [0, {classes}) for inputs with "
                f"{classes} classes"
            )
    return classes


def masked_mae_tokens(y_true, y_pred, tokens):
    """The fused loss for a list of masked token ids (see `masked_mae`).

    Inside XLA compilation (see `in_xla_context`) it is computed by the same
    kernels through XLA custom calls (fused_masked_mae.xla), or, where no
    handler can run, by the composite reference (see docs/integration.md).
    """
    y_true, y_pred = _check_inputs(y_true, y_pred)
    tokens = masked_token_list(None, None, tokens)
    if in_xla_context():
        classes = _check_static_shapes(y_true, y_pred, tokens)
        if _xla.use_custom_call(classes):
            return _xla.masked_mae_custom_call(y_true, y_pred, tokens)
        return _reference.reference_masked_mae_tokens(y_true, y_pred, tokens)
    loss, _ = ops_library.import_fused_masked_mae_masked_mae(
        y_true=y_true, y_pred=y_pred, masked_tokens=tokens
    )
    return loss


def masked_mae(y_true, y_pred, start_token=None, end_token=None, tokens=()):
    """Fused masked mean absolute error over the last axis.

    Args:
      y_true: targets `[..., C]` (one-hot or any float values).
      y_pred: predictions, same shape and float dtype (float16, bfloat16,
        float32 or float64).
      start_token, end_token: class ids in `[0, C)`; a position whose target
        argmax equals its prediction argmax and is one of these costs nothing.
        None means that token is not masked.
      tokens: more masked class ids (padding, separators, ...), same rule.
        Duplicates are ignored; at most MAX_MASKED_TOKENS (256) distinct ids
        in all.

    Returns:
      The per-position loss, shape `[...]` (the input shape without its last
      axis), dtype of the inputs: `keep * mean(|y_pred - y_true|, axis=-1)`.
    """
    return masked_mae_tokens(y_true, y_pred, masked_token_list(start_token, end_token, tokens))


@tf.RegisterGradient("Import_fused_masked_mae>MaskedMae")
def _masked_mae_grad(op, grad_loss, _grad_row_keep):
    # One pass over the inputs: the forward's row_keep (outputs[1]) says which
    # rows are masked, so the gradient op computes no argmax.
    y_true, y_pred = op.inputs
    grad_y_pred = ops_library.import_fused_masked_mae_masked_mae_grad(
        y_true=y_true, y_pred=y_pred, row_keep=op.outputs[1], grad_loss=grad_loss
    )
    # y_true is almost always a constant: skip the extra pass over it when the
    # eager tape says its gradient is not wanted (graph mode prunes it anyway).
    skip = getattr(op, "skip_input_indices", None) or ()
    grad_y_true = None if 0 in skip else -grad_y_pred
    return grad_y_true, grad_y_pred


@tf.RegisterGradient("Import_fused_masked_mae>MaskedMaeGrad")
def _masked_mae_grad_grad(op, upstream):
    # Second order (gradient penalties, Hessian-vector products): zero in
    # y_true and y_pred, linear in grad_loss (see _second_order.py).
    y_true, y_pred, row_keep, _ = op.inputs
    return (tf.zeros_like(y_true), tf.zeros_like(y_pred), None,
            gradient_of_gradient(y_true, y_pred, row_keep, upstream))
