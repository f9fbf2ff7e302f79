"""fused_masked_mae: a fused C++/CUDA masked mean-absolute-error loss for TensorFlow/Keras.

    from fused_masked_mae import MaskedMAE
    model.compile(optimizer="adam", loss=MaskedMAE(start_token=2, end_token=1548))

Without TensorFlow installed (e.g. a GPU test machine), only the TF-free
kernels are available: `fused_masked_mae.core` and `fused_masked_mae._core`.
"""

import importlib.util

__version__ = "0.1.0"
__all__ = [
    "MAX_MASKED_TOKENS",
    "MaskedMAE",
    "ReferenceMaskedMAE",
    "SparseMaskedMAE",
    "in_xla_context",
    "masked_mae",
    "masked_mae_loss_fn",
    "masked_mae_tokens",
    "reference_masked_mae",
    "reference_masked_mae_tokens",
    "reference_sparse_masked_mae",
    "sparse_masked_mae",
]

if importlib.util.find_spec("tensorflow") is not None:
    # Importing these loads the op library and registers the Keras loss for
    # deserialization, so `import fused_masked_mae` is all a saved model needs.
    from fused_masked_mae.ops import (
        MAX_MASKED_TOKENS,
        in_xla_context,
        masked_mae,
        masked_mae_tokens,
    )
    from fused_masked_mae.reference import (
        ReferenceMaskedMAE,
        reference_masked_mae,
        reference_masked_mae_tokens,
    )
    from fused_masked_mae.losses import MaskedMAE, masked_mae_loss_fn
    from fused_masked_mae.sparse import (
        SparseMaskedMAE,
        reference_sparse_masked_mae,
        sparse_masked_mae,
    )

    def __getattr__(name):
        # Keras 2 users: fused_masked_mae.TfKerasMaskedMAE imports tf_keras on
        # first access only (see losses.py).
        if name == "TfKerasMaskedMAE":
            from fused_masked_mae import losses

            return losses.TfKerasMaskedMAE
        raise AttributeError(f"module 'fused_masked_mae' has no attribute {name!r}")

else:

    def __getattr__(name):
        if name in __all__:
            raise ImportError(
                f"fused_masked_mae.{name} needs TensorFlow (pip install the wheel's pinned "
                "tensorflow); without it only fused_masked_mae.core is available"
            )
        raise AttributeError(f"module 'fused_masked_mae' has no attribute {name!r}")
