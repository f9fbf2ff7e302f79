"""Keras loss classes around the fused kernels.

- `MaskedMAE`, `SparseMaskedMAE`: Keras 3 `keras.losses.Loss`es on every
  Keras backend: each picks the kernel for `keras.backend.backend()` once, in
  `__init__` (fused_masked_mae.keras_backends: the TensorFlow op, the JAX
  custom calls or the torch custom ops; the keras.ops composite where none
  can run, logged once with the reason).
- `masked_mae_loss_fn(...)`: a plain `loss(y_true, y_pred)` function, usable
  as the loss of a Keras 3 model and of a Keras 2 (`tf_keras`) model.
- `TfKerasMaskedMAE`: the same loss as a `tf_keras.losses.Loss`, for
  `TF_USE_LEGACY_KERAS=1` / `tf_keras` users. It is created on first access,
  so `import fused_masked_mae` never imports tf_keras.
"""

import functools

import keras

from fused_masked_mae import keras_backends
from fused_masked_mae.tokens import MaskedTokensConfig, masked_token_list


def _dense_inputs(y_true, y_pred):
    y_pred = keras.ops.convert_to_tensor(y_pred)
    return keras.ops.cast(y_true, y_pred.dtype), y_pred


def _sparse_inputs(y_true, y_pred):
    """y_true may arrive as floats (Keras casts targets to the loss dtype) or with
    a trailing axis of size 1: int32 ids of y_pred's shape without its last axis."""
    y_pred = keras.ops.convert_to_tensor(y_pred)
    y_true = keras.ops.convert_to_tensor(y_true)
    if len(y_true.shape) == len(y_pred.shape):
        y_true = keras.ops.squeeze(y_true, axis=-1)  # [..., 1] ids, as Keras allows
    return keras.ops.cast(y_true, "int32"), y_pred


def _per_position_loss(y_true, y_pred, tokens, kernel=None):
    y_true, y_pred = _dense_inputs(y_true, y_pred)
    return (kernel or keras_backends.kernel("masked_mae"))(y_true, y_pred, tokens)


@keras.saving.register_keras_serializable(package="fused_masked_mae")
class MaskedMAE(MaskedTokensConfig, keras.losses.Loss):
    """Masked mean absolute error for one-hot (or soft) targets `[..., C]`.

    A position whose target argmax equals its prediction argmax and is the
    start token, the end token or one of `tokens` costs nothing; every other
    position costs `mean(|y_pred - y_true|)` over the classes. Computed by one
    fused kernel (and one fused gradient kernel) instead of about ten ops, on
    the TensorFlow, JAX and PyTorch backends (see keras_backends).

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
        self._kernel = keras_backends.kernel("masked_mae")

    def call(self, y_true, y_pred):
        y_true, y_pred = _dense_inputs(y_true, y_pred)
        return self._kernel(y_true, y_pred, self._tokens)


@keras.saving.register_keras_serializable(package="fused_masked_mae")
class SparseMaskedMAE(MaskedTokensConfig, keras.losses.Loss):
    """MaskedMAE for integer class-id targets `[...]` (like Keras'
    SparseCategoricalCrossentropy next to CategoricalCrossentropy).

    y_true may arrive as a float tensor (Keras casts targets to the loss dtype)
    or with a trailing axis of size 1; it is cast to int32 ids.
    """

    def __init__(
        self,
        start_token=None,
        end_token=None,
        reduction="sum_over_batch_size",
        name="sparse_masked_mae",
        dtype=None,
        tokens=(),
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._set_masked_tokens(start_token, end_token, tokens)
        self._kernel = keras_backends.kernel("sparse_masked_mae")

    def call(self, y_true, y_pred):
        y_true, y_pred = _sparse_inputs(y_true, y_pred)
        return self._kernel(y_true, y_pred, self._tokens)


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
    kernel = keras_backends.kernel("masked_mae")

    def masked_mae(y_true, y_pred):
        return _per_position_loss(y_true, y_pred, ids, kernel)

    return masked_mae


@functools.cache
def _tf_keras_masked_mae_class():
    import tensorflow as tf
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
            from fused_masked_mae.ops import masked_mae_tokens  # tf_keras: TensorFlow only

            y_pred = tf.convert_to_tensor(y_pred)
            return masked_mae_tokens(tf.cast(y_true, y_pred.dtype), y_pred, self._tokens)

    TfKerasMaskedMAE.__module__ = __name__
    TfKerasMaskedMAE.__qualname__ = "TfKerasMaskedMAE"
    return TfKerasMaskedMAE


def __getattr__(name):
    # PEP 562: `fused_masked_mae.losses.TfKerasMaskedMAE` imports tf_keras on
    # first access only.
    if name == "TfKerasMaskedMAE":
        return _tf_keras_masked_mae_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
