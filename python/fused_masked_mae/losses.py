"""Keras loss classes around the fused op."""

import keras
import tensorflow as tf

from fused_masked_mae.ops import masked_mae_tokens, masked_token_list


@keras.saving.register_keras_serializable(package="fused_masked_mae")
class MaskedMAE(keras.losses.Loss):
    """Masked mean absolute error for one-hot (or soft) targets `[..., C]`.

    A position whose target argmax equals its prediction argmax and is the
    start or the end token costs nothing; every other position costs
    `mean(|y_pred - y_true|)` over the classes. Computed by one fused op (and
    one fused gradient op) instead of about ten TensorFlow ops.

    Args:
      start_token, end_token: class ids in `[0, C)`, or None to not mask it.
      reduction: any Keras reduction ("sum_over_batch_size", "sum", "mean",
        "mean_with_sample_weight", "none" or None).
      name: the loss name.
      dtype: the dtype the loss is computed in (Keras' default: floatx).
    """

    def __init__(
        self,
        start_token,
        end_token,
        reduction="sum_over_batch_size",
        name="masked_mae",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._tokens = masked_token_list(start_token, end_token)
        self.start_token = start_token
        self.end_token = end_token

    def call(self, y_true, y_pred):
        y_pred = tf.convert_to_tensor(y_pred)
        y_true = tf.cast(y_true, y_pred.dtype)
        return masked_mae_tokens(y_true, y_pred, self._tokens)

    def get_config(self):
        config = super().get_config()
        config.update(start_token=self.start_token, end_token=self.end_token)
        return config
