"""Keras loss classes around the fused kernels.

- `MaskedMAE`, `SparseMaskedMAE`: Keras 3 `keras.losses.Loss`es on every
  Keras backend: each picks the kernel for `keras.backend.backend()` once, in
  `__init__` (fused_masked_mae.keras_backends: the TensorFlow op, the JAX
  custom calls or the torch custom ops; the keras.ops composite where none
  can run, logged once with the reason).
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

from fused_masked_mae import keras_backends
from fused_masked_mae.tokens import MaskedTokensConfig, masked_token_list

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _symbolic(*tensors):
    return any(isinstance(t, keras.KerasTensor) for t in tensors)


def _same_rank(y_true, y_pred, expand_rank_1=True, squeeze=None, expand=None):
    """Keras' rank rule for losses (keras.src.losses.loss.
    squeeze_or_expand_to_same_rank in Keras 3.15, what MeanAbsoluteError
    applies): when the ranks differ by one and the longer one ends in an axis
    of 1, that axis is squeezed, or, when the shorter one has rank 1 and
    expand_rank_1, the shorter one gets a trailing axis of 1 ([B] with [B, 1]
    is [B, 1] with [B, 1]). tf_keras' rule (losses_utils.
    squeeze_or_expand_dimensions) is the same with expand_rank_1=False. Any
    other difference is left to the kernel's "must have the same shape" error.
    keras.ops by default (every backend, KerasTensors included); tf_keras
    passes TensorFlow's squeeze/expand_dims."""
    squeeze = squeeze or keras.ops.squeeze
    expand = expand or keras.ops.expand_dims
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


def _symbolic_loss(y_pred):
    # Symbolic inputs (a functional model's outputs, say): the loss's symbolic
    # result, computed by the kernel once real tensors arrive.
    if len(y_pred.shape) == 0:
        raise ValueError("Shape must be at least rank 1 but is rank 0")
    return keras.KerasTensor(y_pred.shape[:-1], dtype=y_pred.dtype)


def _check_float(dtype):
    name = keras.backend.standardize_dtype(dtype)
    if name not in _FLOAT_DTYPES:
        raise TypeError(f"y_pred must be float16, bfloat16, float32 or float64, got {name}")


def _dense_inputs(y_true, y_pred, expand_rank_1=True):
    y_pred = keras.ops.convert_to_tensor(y_pred)
    _check_float(y_pred.dtype)
    y_true = keras.ops.cast(y_true, y_pred.dtype)
    return _same_rank(y_true, y_pred, expand_rank_1)


def _sparse_inputs(y_true, y_pred):
    """y_true may arrive as floats (Keras casts targets to the loss dtype) or with
    a trailing axis of size 1: int32 ids of y_pred's shape without its last axis."""
    y_pred = keras.ops.convert_to_tensor(y_pred)
    _check_float(y_pred.dtype)
    y_true = keras.ops.convert_to_tensor(y_true)
    if len(y_true.shape) == len(y_pred.shape):
        y_true = keras.ops.squeeze(y_true, axis=-1)  # [..., 1] ids, as Keras allows
    return keras.ops.cast(y_true, "int32"), y_pred


def _per_position_loss(y_true, y_pred, tokens, kernel=None):
    if _symbolic(y_true, y_pred):
        return _symbolic_loss(_same_rank(y_true, y_pred)[1])
    y_true, y_pred = _dense_inputs(y_true, y_pred)
    return (kernel or keras_backends.kernel("masked_mae"))(y_true, y_pred, tokens)


@keras.saving.register_keras_serializable(package="fused_masked_mae")
class MaskedMAE(MaskedTokensConfig, keras.losses.Loss):
    """Masked mean absolute error for one-hot (or soft) targets `[..., C]`.

    A position whose target argmax equals its prediction argmax and is the
    start token, the end token or one of `tokens` costs nothing; every other
    position costs `mean(|y_pred - y_true|)` over the classes. Computed by one
    fused kernel (and one fused gradient kernel) instead of about ten ops, on
    the TensorFlow, JAX and PyTorch backends (see keras_backends); on
    TensorFlow inside XLA compilation (`jit_compile=True`) by the same kernels
    as XLA custom calls (the composite of plain ops only where no handler can
    run, see fused_masked_mae.xla). With nothing masked it is Keras'
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
        self._kernel = keras_backends.kernel("masked_mae")

    def call(self, y_true, y_pred):
        return _per_position_loss(y_true, y_pred, self._tokens, self._kernel)


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
        if _symbolic(y_true, y_pred):
            return _symbolic_loss(y_pred)  # the symbolic per-position loss, as MaskedMAE
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

            if _symbolic(y_true, y_pred):
                return _symbolic_loss(_same_rank(y_true, y_pred, expand_rank_1=False)[1])
            y_pred = tf.convert_to_tensor(y_pred)
            _check_float(y_pred.dtype.name)
            y_true, y_pred = _same_rank(tf.cast(y_true, y_pred.dtype), y_pred,
                                        expand_rank_1=False, squeeze=tf.squeeze,
                                        expand=tf.expand_dims)
            return masked_mae_tokens(y_true, y_pred, self._tokens)

    TfKerasMaskedMAE.__module__ = __name__
    TfKerasMaskedMAE.__qualname__ = "TfKerasMaskedMAE"
    return TfKerasMaskedMAE


def __getattr__(name):
    # PEP 562: `fused_masked_mae.losses.TfKerasMaskedMAE` imports tf_keras on
    # first access only.
    if name == "TfKerasMaskedMAE":
        return _tf_keras_masked_mae_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
