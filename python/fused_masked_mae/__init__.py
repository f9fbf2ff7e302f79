"""fused_masked_mae: a fused C++/CUDA masked mean-absolute-error loss for TensorFlow/Keras.

    from fused_masked_mae import MaskedMAE
    model.compile(optimizer="adam", loss=MaskedMAE(start_token=2, end_token=1548))

Without TensorFlow installed (e.g. a GPU test machine), only the TF-free
kernels are available: `fused_masked_mae.core` and `fused_masked_mae._core`.

The CPU kernels come in instruction-set variants (baseline x86-64, AVX2, AVX-512)
with bit-identical results; `cpu_isa()` names the one in use, and the
environment variable FUSED_MASKED_MAE_CPU_ISA=baseline|avx2|avx512, read once
at import, forces one (an unknown or unsupported value fails the import).
"""

import importlib.util

# Loading _core chooses the CPU variant and raises ImportError when
# FUSED_MASKED_MAE_CPU_ISA is unknown or unsupported here.
from fused_masked_mae import _core as _core_module

__version__ = "0.1.0"
__all__ = [
    "MAX_MASKED_TOKENS",
    "MaskedCrossentropy",
    "MaskedMAE",
    "ReferenceMaskedCrossentropy",
    "ReferenceMaskedMAE",
    "SparseMaskedCrossentropy",
    "SparseMaskedMAE",
    "cpu_isa",
    "in_xla_context",
    "masked_crossentropy",
    "masked_mae",
    "masked_mae_loss_fn",
    "masked_mae_tokens",
    "reference_masked_crossentropy",
    "reference_masked_mae",
    "reference_masked_mae_tokens",
    "reference_sparse_masked_crossentropy",
    "reference_sparse_masked_mae",
    "sparse_masked_crossentropy",
    "sparse_masked_mae",
]



def cpu_isa():
    """The instruction-set variant the CPU kernels run: 'baseline', 'avx2' or 'avx512'.

    The best this CPU supports, or the one FUSED_MASKED_MAE_CPU_ISA names; chosen
    once per process. The TensorFlow op library and `_core` choose the same way
    (the import checks that they agree).
    """
    return _core_module.cpu_isa()


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
    from fused_masked_mae.crossentropy import (
        MaskedCrossentropy,
        ReferenceMaskedCrossentropy,
        SparseMaskedCrossentropy,
        masked_crossentropy,
        reference_masked_crossentropy,
        reference_sparse_masked_crossentropy,
        sparse_masked_crossentropy,
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
