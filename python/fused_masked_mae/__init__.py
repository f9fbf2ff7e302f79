"""fused_masked_mae: a fused C++/CUDA masked mean-absolute-error loss for TensorFlow/Keras.

    from fused_masked_mae import MaskedMAE
    model.compile(optimizer="adam", loss=MaskedMAE(start_token=2, end_token=1548))
"""

from fused_masked_mae.ops import masked_mae, masked_mae_tokens
from fused_masked_mae.reference import reference_masked_mae, reference_masked_mae_tokens
from fused_masked_mae.losses import MaskedMAE

__all__ = [
    "MaskedMAE",
    "masked_mae",
    "masked_mae_tokens",
    "reference_masked_mae",
    "reference_masked_mae_tokens",
]
__version__ = "0.1.0"
