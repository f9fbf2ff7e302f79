"""fused_masked_mae: one fused C++/CUDA masked mean-absolute-error loss for
Keras 3 (TensorFlow, JAX and PyTorch backends), TensorFlow, JAX and PyTorch.

    from fused_masked_mae import MaskedMAE                 # Keras 3, any backend
    model.compile(optimizer="adam", loss=MaskedMAE(start_token=2, end_token=1548))

    fused_masked_mae.masked_mae(y_true, y_pred, 2, 1548)   # TensorFlow op
    fused_masked_mae.jax.masked_mae(...)                   # JAX (XLA FFI custom calls)
    fused_masked_mae.torch.masked_mae(...)                 # PyTorch (custom ops)
    fused_masked_mae.core.forward(...)                     # NumPy / raw device arrays

`import fused_masked_mae` imports no framework: each name loads its backend's
module on first use. Once TensorFlow is imported (before or after this
package) the op library is loaded, so a SavedModel calling the op reloads;
once Keras is imported the losses are registered for `.keras` loading.

The CPU kernels come in instruction-set variants (baseline x86-64, AVX2, AVX-512)
with bit-identical results; `cpu_isa()` names the one in use, and the
environment variable FUSED_MASKED_MAE_CPU_ISA=baseline|avx2|avx512, read once
at import, forces one (an unknown or unsupported value fails the import).
"""

import importlib

# Loading _core chooses the CPU variant and raises ImportError when
# FUSED_MASKED_MAE_CPU_ISA is unknown or unsupported here.
from fused_masked_mae import _core as _core_module
from fused_masked_mae import _lazy
from fused_masked_mae.tokens import MAX_MASKED_TOKENS

__version__ = "0.1.0"

# Public name -> the module that defines it (imported on first access).
_LAZY = {
    "in_xla_context": "ops",
    "masked_mae": "ops",
    "masked_mae_tokens": "ops",
    "ReferenceMaskedMAE": "reference",
    "reference_masked_mae": "reference",
    "reference_masked_mae_tokens": "reference",
    "reference_sparse_masked_mae": "sparse",
    "sparse_masked_mae": "sparse",
    "MaskedMAE": "losses",
    "SparseMaskedMAE": "losses",
    "masked_mae_loss_fn": "losses",
    "TfKerasMaskedMAE": "losses",
}
# Submodules reachable as attributes (fused_masked_mae.jax, .torch, ...).
_SUBMODULES = ("core", "jax", "torch", "ops", "sparse", "losses", "reference", "xla",
               "keras_backends")

__all__ = ["MAX_MASKED_TOKENS", "cpu_isa"] + sorted(n for n in _LAZY if n != "TfKerasMaskedMAE")


def cpu_isa():
    """The instruction-set variant the CPU kernels run: 'baseline', 'avx2' or 'avx512'.

    The best this CPU supports, or the one FUSED_MASKED_MAE_CPU_ISA names; chosen
    once per process. The TensorFlow op library, the XLA handler library and
    `_core` choose alike (the imports check that they agree).
    """
    return _core_module.cpu_isa()


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"fused_masked_mae.{_LAZY[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"fused_masked_mae.{name}")
    raise AttributeError(f"module 'fused_masked_mae' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


def _load_tensorflow_parts(_tensorflow):
    # The op library and its gradients, and the XLA handlers' registration.
    importlib.import_module("fused_masked_mae.ops")
    importlib.import_module("fused_masked_mae.sparse")


def _register_keras_losses(_keras):
    # keras.saving.register_keras_serializable of MaskedMAE / SparseMaskedMAE.
    importlib.import_module("fused_masked_mae.losses")


def _register_tf_keras_losses(_tf_keras):
    # TfKerasMaskedMAE, registered for tf_keras' deserialization whenever
    # tf_keras is in use (`import tf_keras`, tf.keras under
    # TF_USE_LEGACY_KERAS=1, or tf_keras.models.load_model), never importing
    # tf_keras from here. Here, not in losses: tf_keras may be imported
    # without Keras 3, and then losses is not imported by itself.
    importlib.import_module("fused_masked_mae.losses")._tf_keras_masked_mae_class()


_lazy.when_imported("tensorflow", _load_tensorflow_parts)
_lazy.when_imported("keras", _register_keras_losses)
_lazy.when_imported("tf_keras", _register_tf_keras_losses)
