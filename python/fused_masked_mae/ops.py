"""The fused op, its Python signature, and its registered gradient."""

import operator

import tensorflow as tf

from fused_masked_mae._loader import ops_library

_FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


def masked_token_list(start_token, end_token, tokens=()):
    """Validates token ids (ints >= 0, or None to skip) and returns them as a list."""
    ids = []
    for name, token in [("start_token", start_token), ("end_token", end_token)] + [
        ("tokens", t) for t in tokens
    ]:
        if token is None:
            continue
        try:
            if isinstance(token, bool):
                raise TypeError
            token = operator.index(token)
        except TypeError:
            raise TypeError(f"{name} must be an integer class id or None, got {token!r}") from None
        if token < 0:
            raise ValueError(f"{name} must be a class id >= 0, got {token}")
        ids.append(token)
    return ids


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


def masked_mae_tokens(y_true, y_pred, tokens):
    """The fused loss for a list of masked token ids (see `masked_mae`)."""
    y_true, y_pred = _check_inputs(y_true, y_pred)
    return ops_library.fused_masked_mae_masked_mae(
        y_true=y_true, y_pred=y_pred, masked_tokens=masked_token_list(None, None, tokens)
    )


def masked_mae(y_true, y_pred, start_token, end_token):
    """Fused masked mean absolute error over the last axis.

    Args:
      y_true: targets `[..., C]` (one-hot or any float values).
      y_pred: predictions, same shape and float dtype (float16, bfloat16,
        float32 or float64).
      start_token, end_token: class ids in `[0, C)`; a position whose target
        argmax equals its prediction argmax and is one of these costs nothing.
        None means that token is not masked.

    Returns:
      The per-position loss, shape `[...]` (the input shape without its last
      axis), dtype of the inputs: `keep * mean(|y_pred - y_true|, axis=-1)`.
    """
    return masked_mae_tokens(y_true, y_pred, masked_token_list(start_token, end_token))


@tf.RegisterGradient("FusedMaskedMae>MaskedMae")
def _masked_mae_grad(op, grad_loss):
    y_true, y_pred = op.inputs
    grad_y_pred = ops_library.fused_masked_mae_masked_mae_grad(
        y_true=y_true,
        y_pred=y_pred,
        grad_loss=grad_loss,
        masked_tokens=op.get_attr("masked_tokens"),
    )
    # y_true is almost always a constant: skip the extra pass over it when the
    # eager tape says its gradient is not wanted (graph mode prunes it anyway).
    skip = getattr(op, "skip_input_indices", None) or ()
    grad_y_true = None if 0 in skip else -grad_y_pred
    return grad_y_true, grad_y_pred
