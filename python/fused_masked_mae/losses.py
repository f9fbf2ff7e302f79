"""Keras loss classes around the fused op.

- `MaskedMAE`: a Keras 3 `keras.losses.Loss`.
- `masked_mae_loss_fn(...)`: a plain `loss(y_true, y_pred)` function, usable
  as the loss of a Keras 3 model and of a Keras 2 (`tf_keras`) model.
- `TfKerasMaskedMAE`: the same loss as a `tf_keras.losses.Loss`, for
  `TF_USE_LEGACY_KERAS=1` / `tf_keras` users. It is created and registered for
  `.keras`/SavedModel loading as soon as tf_keras is imported (or at once when
  it already is), so `import fused_masked_mae` never imports tf_keras itself.

Like Keras' MeanAbsoluteError, the losses bring y_true and y_pred to one rank
first when they differ by a trailing axis of size 1 (`_same_rank`), and
accept symbolic `KerasTensor`s (the result is the symbolic per-position loss).
"""

import functools

import keras
import tensorflow as tf

from fused_masked_mae import _registration
from fused_masked_mae.ops import _FLOAT_DTYPES, masked_mae_tokens
from fused_masked_mae.tokens import MaskedTokensConfig, masked_token_list


def _same_rank(y_true, y_pred, expand_rank_1=True):
    """Keras' rank rule for losses (keras.src.losses.loss.
    squeeze_or_expand_to_same_rank in Keras 3.15, what MeanAbsoluteError
    applies): when the ranks differ by one and the longer one ends in an axis
    of 1, that axis is squeezed, or, when the shorter one has rank 1 and
    expand_rank_1, the shorter one gets a trailing axis of 1 ([B] with [B, 1]
    is [B, 1] with [B, 1]). tf_keras' rule (losses_utils.
    squeeze_or_expand_dimensions) is the same with expand_rank_1=False. Any
    other difference is left to the op's "must have the same shape" error."""
    symbolic = isinstance(y_true, keras.KerasTensor) or isinstance(y_pred, keras.KerasTensor)
    squeeze = keras.ops.squeeze if symbolic else tf.squeeze
    expand = keras.ops.expand_dims if symbolic else tf.expand_dims
    true_rank, pred_rank = len(y_true.shape), len(y_pred.shape)
    if true_rank == pred_rank + 1 and y_true.shape[-1] == 1:
        if pred_rank == 1 and expand_rank_1:
            y_pred = expand(y_pred, axis=-1)
        else:
            y_true = squeeze(y_true, axis=-1)
    elif pred_rank == true_rank + 1 and y_pred.shape[-1] == 1:
        if true_rank == 1 and expand_rank_1:
            y_true = expand(y_true, axis=-1)
        else:
            y_pred = squeeze(y_pred, axis=-1)
    return y_true, y_pred


def _per_position_loss(y_true, y_pred, tokens, expand_rank_1=True):
    if isinstance(y_true, keras.KerasTensor) or isinstance(y_pred, keras.KerasTensor):
        # Symbolic inputs (a functional model's outputs, say): the loss's
        # symbolic result, computed by the op once real tensors arrive.
        y_true, y_pred = _same_rank(y_true, y_pred, expand_rank_1)
        if len(y_pred.shape) == 0:
            raise ValueError("Shape must be at least rank 1 but is rank 0")
        return keras.KerasTensor(y_pred.shape[:-1], dtype=y_pred.dtype)
    y_pred = tf.convert_to_tensor(y_pred)
    if y_pred.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"y_pred must be float16, bfloat16, float32 or float64, got {y_pred.dtype.name}"
        )
    y_true = tf.cast(y_true, y_pred.dtype)
    y_true, y_pred = _same_rank(y_true, y_pred, expand_rank_1)
    return masked_mae_tokens(y_true, y_pred, tokens)


@keras.saving.register_keras_serializable(package="fused_masked_mae")
class MaskedMAE(MaskedTokensConfig, keras.losses.Loss):
    """Masked mean absolute error for one-hot (or soft) targets `[..., C]`.

    A position whose target argmax equals its prediction argmax and is the
    start token, the end token or one of `tokens` costs nothing; every other
    position costs `mean(|y_pred - y_true|)` over the classes. Computed by one
    fused op (and one fused gradient op) instead of about ten TensorFlow ops;
    inside XLA compilation (`jit_compile=True`) by the same kernels as XLA
    custom calls (the composite of plain ops only where no handler can run,
    see fused_masked_mae.xla). With nothing masked it is Keras'
    MeanAbsoluteError, rank rules and symbolic inputs included.

    Args:
      start_token, end_token: class ids in `[0, C)`, or None to not mask it.
      reduction: any Keras reduction ("sum_over_batch_size", "sum", "mean",
        "mean_with_sample_weight", "none" or None).
      name: the loss name.
      dtype: the dtype the loss is computed in (Keras' default: floatx, also
        under a mixed-precision policy).
      tokens: more masked class ids (padding, separators, ...); at most 256
        distinct ids in all.
    """

    def __init__(
        self,
        start_token=None,
        end_token=None,
        reduction="sum_over_batch_size",
        name="masked_mae",
        dtype=None,
        tokens=(),
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._set_masked_tokens(start_token, end_token, tokens)

    def call(self, y_true, y_pred):
        return _per_position_loss(y_true, y_pred, self._tokens)


def masked_mae_loss_fn(start_token=None, end_token=None, tokens=()):
    """The masked MAE as a plain loss function `loss(y_true, y_pred)`.

    It returns the per-position loss `[...]` (Keras reduces it, with
    `sample_weight`), like the seed's `mean_absolute_error(y_true, y_pred)`,
    so it works as `model.compile(loss=...)` in Keras 3 and in Keras 2
    (`tf_keras`) alike. Saving a model with it needs
    `custom_objects={"masked_mae": fn}` at load time; prefer `MaskedMAE` /
    `TfKerasMaskedMAE`, which serialize their token ids.
    """
    ids = masked_token_list(start_token, end_token, tokens)

    def masked_mae(y_true, y_pred):
        return _per_position_loss(y_true, y_pred, ids)

    return masked_mae


@functools.cache
def _tf_keras_masked_mae_class():
    import tf_keras  # only here: tf_keras is an optional dependency

    @tf_keras.saving.register_keras_serializable(package="fused_masked_mae")
    class TfKerasMaskedMAE(MaskedTokensConfig, tf_keras.losses.Loss):
        """`MaskedMAE` for Keras 2 (`tf_keras`, or `tf.keras` under
        `TF_USE_LEGACY_KERAS=1`): a `tf_keras.losses.Loss` with tf_keras'
        reductions and `sample_weight` handling. The loss is computed in
        y_pred's dtype (tf_keras losses have no dtype argument)."""

        def __init__(
            self,
            start_token=None,
            end_token=None,
            reduction=tf_keras.losses.Reduction.AUTO,
            name="masked_mae",
            tokens=(),
        ):
            super().__init__(reduction=reduction, name=name)
            self._set_masked_tokens(start_token, end_token, tokens)

        def call(self, y_true, y_pred):
            return _per_position_loss(y_true, y_pred, self._tokens, expand_rank_1=False)

    TfKerasMaskedMAE.__module__ = __name__
    TfKerasMaskedMAE.__qualname__ = "TfKerasMaskedMAE"
    return TfKerasMaskedMAE


def __getattr__(name):
    # PEP 562: `fused_masked_mae.losses.TfKerasMaskedMAE` imports tf_keras on
    # first access only.
    if name == "TfKerasMaskedMAE":
        return _tf_keras_masked_mae_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Registered for tf_keras' deserialization whenever tf_keras is in use: now if
# it is imported, else as soon as it is (never importing it from here).
_registration.when_imported("tf_keras", lambda _module: _tf_keras_masked_mae_class())
