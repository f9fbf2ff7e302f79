"""The masked cross-entropy: the seed's mask (solution 3) on Keras' cross-entropy.

    loss = cond * keras.losses.categorical_crossentropy(y_true, y_pred, ...)

with `cond` exactly the masked MAE's (a position costs nothing when the argmax
of its target and of its prediction agree on a masked token: start, end or one
of `tokens`), computed by one fused op (and one fused gradient op), dense
(`[..., C]` targets) or sparse (int class ids `[...]`), from probabilities or
from logits. The row math is cc/math/masked_ce_row.h.

What "Keras' cross-entropy" means, exactly (Keras 3.15, TensorFlow backend):
- from_logits=True: `tf.nn.softmax_cross_entropy_with_logits` (dense) /
  `tf.nn.sparse_softmax_cross_entropy_with_logits` (sparse).
- from_logits=False, dense: y_pred divided by its row sum, clipped to
  `[epsilon, 1 - epsilon]` (`keras.config.epsilon()`, read at call time),
  `-sum(t * log(p))`. Sparse: clipped (not normalised), and its log given to
  the sparse logits form, i.e. `log(sum clip(p)) - log(clip(p_id))`.
- label_smoothing (dense only, as in Keras): `t * (1 - ls) + ls / C`.
- Logits recovered from a softmax: like Keras' `_get_logits`, when y_pred
  carries `_keras_logits` (every `keras.ops.softmax` / softmax activation
  output: a Dense(activation="softmax") layer's output in `fit`) or, in a
  graph, is the output of a `Softmax` op, the loss uses those logits with
  from_logits=True. So in `fit` the fused loss computes what Keras'
  CategoricalCrossentropy computes there.
- The argmax of the prediction (for `cond`) is taken over the array the
  cross-entropy uses: the probabilities, or the logits (given, or recovered).
  argmax(logits) equals argmax(softmax(logits)) except where TensorFlow's
  softmax rounds two different logits to the same probability (it then picks
  the first of them; we pick the largest logit) or where a row has NaN.
  The reference (`reference_masked_crossentropy`) takes the same array, so the
  fused loss's `cond` equals the reference's bit for bit.

Gradients: d loss / d y_pred only (targets get None, as they are data): for
logits `G * (softmax(z) - t)` (TensorFlow's own gradient of its fused
cross-entropy, exact when rows of t sum to 1), for probabilities the gradient
of the composite above (clip included); G = upstream * cond.
"""

import keras
import tensorflow as tf

from fused_masked_mae import xla as _xla
from fused_masked_mae._loader import ops_library
from fused_masked_mae.ops import _check_inputs, _check_static_shapes, in_xla_context
from fused_masked_mae.sparse import _check_inputs as _check_sparse_inputs
from fused_masked_mae.tokens import MaskedTokensConfig, masked_token_list

__all__ = [
    "MaskedCrossentropy",
    "ReferenceMaskedCrossentropy",
    "SparseMaskedCrossentropy",
    "masked_crossentropy",
    "reference_masked_crossentropy",
    "reference_sparse_masked_crossentropy",
    "sparse_masked_crossentropy",
]


def recover_logits(y_pred, from_logits):
    """Keras 3's `_get_logits` (keras/src/backend/tensorflow/nn.py): the logits
    behind a softmax output, and whether the loss now reads logits."""
    if hasattr(y_pred, "_keras_logits"):
        return y_pred._keras_logits, True
    if (hasattr(y_pred, "op") and not isinstance(y_pred, (tf.__internal__.EagerTensor,
                                                           tf.Variable))
            and y_pred.op.type == "Softmax"):
        if len(y_pred.op.inputs) != 1:
            raise ValueError("Expected 1 input for Softmax.")
        return y_pred.op.inputs[0], True
    return y_pred, from_logits


def _check_options(label_smoothing, sparse):
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if sparse and label_smoothing:
        raise ValueError("label_smoothing is for dense targets only (as in Keras)")
    return label_smoothing


def _epsilon():
    epsilon = float(keras.config.epsilon())
    if not 0.0 < epsilon < 0.5:
        raise ValueError(f"keras.config.epsilon() must be in (0, 0.5), got {epsilon}")
    return epsilon


def masked_crossentropy_tokens(y_true, y_pred, tokens, from_logits=False, label_smoothing=0.0):
    """The fused dense loss for a list of masked token ids (see
    `masked_crossentropy`); y_pred as given (no logits recovery)."""
    y_true, y_pred = _check_inputs(y_true, y_pred)
    tokens = masked_token_list(None, None, tokens)
    label_smoothing = _check_options(label_smoothing, False)
    epsilon = _epsilon()
    if in_xla_context():
        classes = _check_static_shapes(y_true, y_pred, tokens)
        if _xla.use_custom_call(classes):
            return _xla.masked_ce_custom_call(y_true, y_pred, tokens, from_logits,
                                              label_smoothing, epsilon)
        return reference_masked_crossentropy_tokens(y_true, y_pred, tokens, from_logits,
                                                    label_smoothing)
    loss, _, _ = ops_library.import_fused_masked_mae_masked_crossentropy(
        y_true=y_true, y_pred=y_pred, masked_tokens=tokens, from_logits=bool(from_logits),
        label_smoothing=label_smoothing, epsilon=epsilon)
    return loss


def sparse_masked_crossentropy_tokens(y_true_ids, y_pred, tokens, from_logits=False):
    """The fused sparse loss for a list of masked token ids; y_pred as given."""
    y_true_ids, y_pred = _check_sparse_inputs(y_true_ids, y_pred)
    tokens = masked_token_list(None, None, tokens)
    epsilon = _epsilon()
    if in_xla_context():
        classes = _check_static_shapes(y_true_ids, y_pred, tokens, sparse=True)
        if _xla.use_custom_call(classes):
            return _xla.masked_ce_custom_call(y_true_ids, y_pred, tokens, from_logits, 0.0,
                                              epsilon, sparse=True)
        return reference_sparse_masked_crossentropy_tokens(y_true_ids, y_pred, tokens,
                                                           from_logits)
    loss, _, _ = ops_library.import_fused_masked_mae_sparse_masked_crossentropy(
        y_true_ids=y_true_ids, y_pred=y_pred, masked_tokens=tokens,
        from_logits=bool(from_logits), epsilon=epsilon)
    return loss


def masked_crossentropy(y_true, y_pred, start_token=None, end_token=None, tokens=(),
                        from_logits=False, label_smoothing=0.0):
    """Fused masked categorical cross-entropy over the last axis.

    Args:
      y_true: targets `[..., C]` (one-hot or soft), cast to y_pred's dtype.
      y_pred: probabilities (from_logits=False) or logits `[..., C]`, float16,
        bfloat16, float32 or float64. A softmax output's logits are used when
        Keras would use them (see the module docstring).
      start_token, end_token, tokens: masked class ids, as for `masked_mae`.
      from_logits, label_smoothing: as `keras.losses.categorical_crossentropy`.

    Returns:
      The per-position loss `[...]`: `cond * categorical_crossentropy`.
    """
    y_pred = tf.convert_to_tensor(y_pred)
    y_pred, from_logits = recover_logits(y_pred, from_logits)
    y_true = tf.cast(y_true, y_pred.dtype)
    return masked_crossentropy_tokens(
        y_true, y_pred, masked_token_list(start_token, end_token, tokens), from_logits,
        label_smoothing)


def sparse_masked_crossentropy(y_true_ids, y_pred, start_token=None, end_token=None, tokens=(),
                               from_logits=False):
    """Fused masked sparse categorical cross-entropy: int32/int64 class ids
    `[...]` (each in `[0, C)`: on CPU an id outside is an InvalidArgumentError)
    and y_pred `[..., C]`; `cond * sparse_categorical_crossentropy`."""
    y_pred = tf.convert_to_tensor(y_pred)
    y_pred, from_logits = recover_logits(y_pred, from_logits)
    return sparse_masked_crossentropy_tokens(
        y_true_ids, y_pred, masked_token_list(start_token, end_token, tokens), from_logits)


# --- the reference composite: the parity oracle --------------------------------------------


def _cond(y_true_argmax, y_pred_argmax, tokens, dtype):
    """The seed's cond (reference.py's rule, on given argmaxes)."""
    ops = keras.ops
    equal_mask = ops.cast(ops.equal(y_true_argmax, y_pred_argmax), dtype)
    is_masked_token = ops.zeros_like(equal_mask)
    for token in sorted(set(tokens)):
        is_masked_token = is_masked_token + ops.cast(ops.equal(y_true_argmax, token), dtype)
    return 1 - is_masked_token * equal_mask


def reference_masked_crossentropy_tokens(y_true, y_pred, tokens, from_logits=False,
                                         label_smoothing=0.0):
    """cond * keras.losses.categorical_crossentropy in plain ops; y_pred as
    given (the caller recovers logits). argmax is tf.math.argmax (reference.py)."""
    cond = _cond(tf.math.argmax(y_true, axis=-1), tf.math.argmax(y_pred, axis=-1), tokens,
                 y_pred.dtype)
    ce = keras.losses.categorical_crossentropy(y_true, y_pred, from_logits=from_logits,
                                               label_smoothing=label_smoothing)
    return cond * ce


def reference_sparse_masked_crossentropy_tokens(y_true_ids, y_pred, tokens, from_logits=False):
    """cond * keras.losses.sparse_categorical_crossentropy in plain ops."""
    cond = _cond(tf.cast(y_true_ids, tf.int64), tf.math.argmax(y_pred, axis=-1), tokens,
                 y_pred.dtype)
    ce = keras.losses.sparse_categorical_crossentropy(y_true_ids, y_pred,
                                                      from_logits=from_logits)
    return cond * ce


def reference_masked_crossentropy(y_true, y_pred, start_token=None, end_token=None, tokens=(),
                                  from_logits=False, label_smoothing=0.0):
    """The composite of plain ops the fused loss is held to, with the same
    logits recovery (see the module docstring)."""
    y_pred = tf.convert_to_tensor(y_pred)
    y_pred, from_logits = recover_logits(y_pred, from_logits)
    y_true = tf.cast(y_true, y_pred.dtype)
    return reference_masked_crossentropy_tokens(
        y_true, y_pred, masked_token_list(start_token, end_token, tokens), from_logits,
        label_smoothing)


def reference_sparse_masked_crossentropy(y_true_ids, y_pred, start_token=None, end_token=None,
                                         tokens=(), from_logits=False):
    """The sparse composite (see reference_masked_crossentropy)."""
    y_pred = tf.convert_to_tensor(y_pred)
    y_pred, from_logits = recover_logits(y_pred, from_logits)
    return reference_sparse_masked_crossentropy_tokens(
        y_true_ids, y_pred, masked_token_list(start_token, end_token, tokens), from_logits)


# --- gradients -------------------------------------------------------------------------------


@tf.RegisterGradient("Import_fused_masked_mae>MaskedCrossentropy")
def _masked_crossentropy_grad(op, grad_loss, _grad_row_keep, _grad_row_stats):
    y_true, y_pred = op.inputs
    grad_y_pred = ops_library.import_fused_masked_mae_masked_crossentropy_grad(
        y_true=y_true, y_pred=y_pred, row_keep=op.outputs[1], row_stats=op.outputs[2],
        grad_loss=grad_loss, from_logits=op.get_attr("from_logits"),
        label_smoothing=op.get_attr("label_smoothing"), epsilon=op.get_attr("epsilon"))
    return None, grad_y_pred


@tf.RegisterGradient("Import_fused_masked_mae>SparseMaskedCrossentropy")
def _sparse_masked_crossentropy_grad(op, grad_loss, _grad_row_keep, _grad_row_stats):
    y_true_ids, y_pred = op.inputs
    grad_y_pred = ops_library.import_fused_masked_mae_sparse_masked_crossentropy_grad(
        y_true_ids=y_true_ids, y_pred=y_pred, row_keep=op.outputs[1], row_stats=op.outputs[2],
        grad_loss=grad_loss, from_logits=op.get_attr("from_logits"),
        epsilon=op.get_attr("epsilon"))
    return None, grad_y_pred


# --- Keras losses ----------------------------------------------------------------------------


class _CrossentropyConfig(MaskedTokensConfig):
    def get_config(self):
        config = super().get_config()
        config.update(from_logits=self.from_logits)
        if hasattr(self, "label_smoothing"):
            config.update(label_smoothing=self.label_smoothing)
        return config


def _sparse_ids(y_true, y_pred):
    y_true = tf.convert_to_tensor(y_true)
    if y_true.shape.rank is not None and y_true.shape.rank == y_pred.shape.rank:
        y_true = tf.squeeze(y_true, axis=-1)  # [..., 1] ids, as Keras allows
    return tf.cast(y_true, tf.int32)


@keras.saving.register_keras_serializable(package="fused_masked_mae")
class MaskedCrossentropy(_CrossentropyConfig, keras.losses.Loss):
    """Keras' CategoricalCrossentropy with the seed's mask: a position whose
    target argmax equals its prediction argmax and is the start token, the end
    token or one of `tokens` costs nothing. One fused op and one fused gradient
    op (XLA custom calls under jit_compile).

    Args:
      start_token, end_token, tokens: masked class ids (None: not masked).
      from_logits, label_smoothing: as keras.losses.CategoricalCrossentropy
        (a softmax output's logits are used as Keras uses them).
      reduction, name, dtype: as any keras.losses.Loss.
    """

    def __init__(self, start_token=None, end_token=None, from_logits=False, label_smoothing=0.0,
                 reduction="sum_over_batch_size", name="masked_crossentropy", dtype=None,
                 tokens=()):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._set_masked_tokens(start_token, end_token, tokens)
        self.from_logits = bool(from_logits)
        self.label_smoothing = _check_options(label_smoothing, False)

    def call(self, y_true, y_pred):
        y_pred = tf.convert_to_tensor(y_pred)
        y_pred, from_logits = recover_logits(y_pred, self.from_logits)
        y_true = tf.cast(y_true, y_pred.dtype)
        return masked_crossentropy_tokens(y_true, y_pred, self._tokens, from_logits,
                                          self.label_smoothing)


@keras.saving.register_keras_serializable(package="fused_masked_mae")
class SparseMaskedCrossentropy(_CrossentropyConfig, keras.losses.Loss):
    """MaskedCrossentropy for integer class ids `[...]` (or `[..., 1]`, or
    float ids as Keras may cast them), like SparseCategoricalCrossentropy."""

    def __init__(self, start_token=None, end_token=None, from_logits=False,
                 reduction="sum_over_batch_size", name="sparse_masked_crossentropy", dtype=None,
                 tokens=()):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._set_masked_tokens(start_token, end_token, tokens)
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        y_pred = tf.convert_to_tensor(y_pred)
        y_pred, from_logits = recover_logits(y_pred, self.from_logits)
        return sparse_masked_crossentropy_tokens(_sparse_ids(y_true, y_pred), y_pred,
                                                 self._tokens, from_logits)


@keras.saving.register_keras_serializable(package="fused_masked_mae")
class ReferenceMaskedCrossentropy(_CrossentropyConfig, keras.losses.Loss):
    """The composite reference as a Keras loss (for comparisons)."""

    def __init__(self, start_token=None, end_token=None, from_logits=False, label_smoothing=0.0,
                 reduction="sum_over_batch_size", name="reference_masked_crossentropy",
                 dtype=None, tokens=()):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._set_masked_tokens(start_token, end_token, tokens)
        self.from_logits = bool(from_logits)
        self.label_smoothing = _check_options(label_smoothing, False)

    def call(self, y_true, y_pred):
        y_pred = tf.convert_to_tensor(y_pred)
        y_pred, from_logits = recover_logits(y_pred, self.from_logits)
        y_true = tf.cast(y_true, y_pred.dtype)
        return reference_masked_crossentropy_tokens(y_true, y_pred, self._tokens, from_logits,
                                                    self.label_smoothing)
