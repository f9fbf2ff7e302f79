"""Which kernel a Keras 3 loss runs, per Keras backend: chosen once, in the
loss's `__init__` (choosing inside `call` would trace a Python branch into
every compiled step, and torch.compile warns about it).

    tensorflow  the TensorFlow op (fused_masked_mae.ops / .sparse), which under
                jit_compile emits the XLA custom calls itself
    jax         fused_masked_mae.jax (XLA FFI custom calls), where JAX's default
                backend has handlers (CPU; CUDA in CUDA builds, driver r525+)
    torch       fused_masked_mae.torch (custom ops), on CPU, and on CUDA in CUDA
                builds
    otherwise   the composite of keras.ops (`composite_masked_mae_tokens`),
                logged once with the reason: other Keras backends (numpy,
                openvino), JAX on TPUs, a build without the device's kernels, or
                FUSED_MASKED_MAE_KERAS=composite

`kernel(sparse)` returns `fn(y_true, y_pred, tokens) -> per-position loss`,
y_true already cast (dense: y_pred's dtype; sparse: int32 ids of y_pred's
shape without the last axis). A new loss (issue 23's cross-entropy) adds a
row to `_KERNELS`.
"""

import importlib
import logging
import os

import keras

_log = logging.getLogger("fused_masked_mae")
_logged = set()

# (backend, loss) -> (module, function) of the fused kernel.
_KERNELS = {
    ("tensorflow", "masked_mae"): ("fused_masked_mae.ops", "masked_mae_tokens"),
    ("tensorflow", "sparse_masked_mae"): ("fused_masked_mae.sparse", "sparse_masked_mae_tokens"),
    ("jax", "masked_mae"): ("fused_masked_mae.jax", "masked_mae_tokens"),
    ("jax", "sparse_masked_mae"): ("fused_masked_mae.jax", "sparse_masked_mae_tokens"),
    ("torch", "masked_mae"): ("fused_masked_mae.torch", "masked_mae_tokens"),
    ("torch", "sparse_masked_mae"): ("fused_masked_mae.torch", "sparse_masked_mae_tokens"),
}


def _unavailable(backend):
    """Why the fused kernel cannot run on this backend's default device, or None."""
    if os.environ.get("FUSED_MASKED_MAE_KERAS") == "composite":
        return "FUSED_MASKED_MAE_KERAS=composite is set"
    if backend == "jax":
        import jax

        try:
            from fused_masked_mae import jax as fmj
        except ImportError as error:
            return str(error)
        if not fmj.supports_platform():
            return (f"JAX's default backend is {jax.default_backend()!r}, which has no fused "
                    "kernel handlers here")
    elif backend == "torch":
        from keras.src.backend.torch.core import get_device

        from fused_masked_mae import _core

        if str(get_device()).startswith("cuda") and not _core.WITH_CUDA:
            return "Keras places tensors on CUDA but this build has no CUDA kernels"
    elif backend != "tensorflow":
        return f"the Keras backend {backend!r} has no fused kernel"
    return None


def _fall_back(backend, reason):
    if reason not in _logged:
        _logged.add(reason)
        _log.warning("fused_masked_mae: the Keras %s backend runs the keras.ops composite (%s); "
                     "the argmax follows keras.ops.argmax there.", backend, reason)


def kernel(loss, backend=None):
    """`fn(y_true, y_pred, tokens)` for `loss` ("masked_mae", "sparse_masked_mae")
    on `backend` (default: keras.backend.backend())."""
    backend = backend or keras.backend.backend()
    reason = _unavailable(backend)
    if reason is None and (backend, loss) in _KERNELS:
        module, name = _KERNELS[(backend, loss)]
        return getattr(importlib.import_module(module), name)
    _fall_back(backend, reason or f"no fused {loss} kernel for {backend!r}")
    return _COMPOSITES[loss]


def composite_masked_mae_tokens(y_true, y_pred, tokens):
    """The loss in keras.ops (any backend): the seed's solution 3."""
    ops = keras.ops
    equal = ops.cast(ops.equal(ops.argmax(y_true, axis=-1), ops.argmax(y_pred, axis=-1)),
                     y_pred.dtype)
    true_max = ops.argmax(y_true, axis=-1)
    masked = ops.zeros_like(equal)
    for token in sorted(set(tokens)):
        masked = masked + ops.cast(ops.equal(true_max, token), y_pred.dtype)
    return (1 - masked * equal) * ops.mean(ops.abs(y_pred - y_true), axis=-1)


def composite_sparse_masked_mae_tokens(y_true_ids, y_pred, tokens):
    """The sparse loss in keras.ops: the composite on one_hot(ids)."""
    one_hot = keras.ops.one_hot(y_true_ids, keras.ops.shape(y_pred)[-1], dtype=y_pred.dtype)
    return composite_masked_mae_tokens(one_hot, y_pred, tokens)


_COMPOSITES = {"masked_mae": composite_masked_mae_tokens,
               "sparse_masked_mae": composite_sparse_masked_mae_tokens}
