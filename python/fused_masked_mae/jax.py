"""The fused kernels in JAX: XLA FFI custom calls to the same handlers TensorFlow's jit uses.

    from fused_masked_mae import jax as fmj
    loss = fmj.masked_mae(y_true, y_pred, start_token=2, end_token=1548)       # [..., C] -> [...]
    loss = fmj.sparse_masked_mae(ids, y_pred, start_token=2, end_token=1548)   # ids [...]

Each function is a `jax.ffi.ffi_call` to the handler library `_xla_ffi.so`
(fused_masked_mae._handlers; registered with JAX for "cpu" and, in CUDA builds
where the NVIDIA driver is r525 or newer, "CUDA") inside a `jax.custom_vjp`
whose backward is the fused gradient handler, fed by the keep byte per
position the forward saved (so the gradient computes no argmax). Values and
gradients are the TensorFlow op's bit for bit (same launchers).

- `jax.jit`, `jax.grad`/`jax.vjp`: yes. Forward-mode AD (`jax.jvp`, `jacfwd`):
  no (a custom_vjp has none).
- `jax.vmap`: vmap_method="broadcast_all". The handlers treat every axis but
  the last as rows, so a batch axis in front is just more rows: one call over
  the whole batch. "expand_dims" would hand an unbatched y_true over with a
  leading axis of size 1, which the handlers reject as a shape mismatch
  (they do not broadcast); "sequential" would run one call per batch element.
  The cost of "broadcast_all": an unbatched operand is broadcast to the batch
  first (y_true under vmap over y_pred only).
- Unknown batch sizes: `jax.export` with symbolic dimensions works; the
  exporter needs `disabled_checks=DISABLED_CHECKS` (custom calls are not
  stable by its definition) and the importing process must `import
  fused_masked_mae.jax` (which registers the targets).
- dtypes: float16, bfloat16, float32, float64 (float64 and int64 ids need
  `jax.config.update("jax_enable_x64", True)`); ids int32/int64.
- Errors: shapes, ranks, dtypes, C = 0 and token ids are checked when the
  call is traced (ValueError/TypeError); an id outside [0, C) is checked by
  the CPU handler when it runs (an XlaRuntimeError whose text starts with
  INVALID_ARGUMENT and names the id); on the GPU it gives NaN.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from fused_masked_mae import _handlers
from fused_masked_mae.tokens import MAX_MASKED_TOKENS, masked_token_list  # noqa: F401 (API)

__all__ = ["DISABLED_CHECKS", "masked_mae", "masked_mae_tokens", "sparse_masked_mae",
           "sparse_masked_mae_tokens", "supports_platform"]

_log = logging.getLogger("fused_masked_mae")

_FLOATS = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
_IDS = (jnp.int32, jnp.int64)

# The oldest JAX that accepts the handlers (built with TensorFlow 2.21's FFI
# headers, API 0.2); see README, "Versions". Older releases raise ImportError.
MINIMUM_JAX = "0.8.1"

# JAX's platform names for the handlers' FFI platforms.
_JAX_PLATFORMS = {"Host": "cpu", "CUDA": "CUDA"}


def _register():
    """Registers every handler the library allows here; returns the JAX
    platforms ("cpu", "cuda") that got all of them."""
    # A handler XLA refuses, registered before the CPU backend starts, makes
    # the first unrelated computation fail: start the backends first.
    jax.devices()
    by_platform = {}
    for (platform, target), allowed in _handlers.targets().items():
        by_platform.setdefault(platform, {})[target] = allowed
    ready = set()
    for platform, allowed in by_platform.items():
        if platform not in _JAX_PLATFORMS:
            continue
        if not all(allowed.values()) or set(allowed) != set(_handlers.ALL_TARGETS):
            _log.warning("fused_masked_mae: no usable %s handlers here (a driver below r525?); "
                         "fused_masked_mae.jax runs only where they are", platform)
            continue
        try:
            for target in sorted(allowed):
                address = _handlers.handler(platform, target)
                jax.ffi.register_ffi_target(target, _capsule(address),
                                            platform=_JAX_PLATFORMS[platform])
        except Exception as error:  # XLA refused the handlers (its FFI API is older)
            if platform == "Host":
                raise ImportError(
                    f"JAX {jax.__version__} (jaxlib {_jaxlib_version()}) refused the fused "
                    f"kernels' XLA FFI handlers: {error}. fused_masked_mae.jax needs "
                    f"jax/jaxlib >= {MINIMUM_JAX} (XLA FFI API 0.2).") from error
            _log.warning("fused_masked_mae: JAX refused the %s handlers (%s); "
                         "fused_masked_mae.jax runs on the CPU only", platform, error)
            continue
        ready.add("cpu" if platform == "Host" else "cuda")
    return frozenset(ready)


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return "?"


def _capsule(address):
    import ctypes

    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
    return new(address, None, None)


# Module import runs once per process, so the targets are registered once.
PLATFORMS = _register()

# For jax.export: the custom calls are not among those it considers stable.
DISABLED_CHECKS = tuple(jax.export.DisabledSafetyCheck.custom_call(target)
                        for target in sorted(_handlers.ALL_TARGETS))


def supports_platform(platform=None):
    """Whether the fused kernels run on `platform` ("cpu", "gpu"/"cuda"; default:
    JAX's default backend)."""
    platform = (platform or jax.default_backend()).lower()
    return ("cuda" if platform == "gpu" else platform) in PLATFORMS


def _check(y_true, y_pred, tokens, sparse):
    if not hasattr(y_pred, "dtype") or not hasattr(y_pred, "shape"):
        y_pred = jnp.asarray(y_pred)
    if not hasattr(y_true, "dtype") or not hasattr(y_true, "shape"):
        y_true = jnp.asarray(y_true)
    if y_pred.dtype not in _FLOATS:
        raise TypeError(f"y_pred must be float16, bfloat16, float32 or float64, got {y_pred.dtype}")
    if len(y_pred.shape) == 0:
        raise ValueError("y_pred must have rank >= 1 (a last axis of classes), got shape []")
    classes = y_pred.shape[-1]
    if sparse:
        if y_true.dtype not in _IDS:
            raise TypeError(f"y_true_ids must be int32 or int64 class ids, got {y_true.dtype}")
        if tuple(y_true.shape) != tuple(y_pred.shape[:-1]):
            raise ValueError(f"y_true_ids must have y_pred's shape without its last axis, got "
                             f"y_true_ids {list(y_true.shape)} and y_pred {list(y_pred.shape)}")
    else:
        if y_true.dtype != y_pred.dtype:
            raise TypeError(f"y_true and y_pred must have the same dtype, got {y_true.dtype} and "
                            f"{y_pred.dtype}")
        if tuple(y_true.shape) != tuple(y_pred.shape):
            raise ValueError(f"y_true and y_pred must have the same shape, got y_true "
                             f"{list(y_true.shape)} and y_pred {list(y_pred.shape)}")
    if isinstance(classes, int):  # a symbolic C (jax.export) is checked by the handler
        if classes <= 0:
            raise ValueError(f"the last dimension (classes) must be positive, got shape "
                             f"{list(y_pred.shape)}")
        for token in tokens:
            if token >= classes:
                raise ValueError(f"masked token id {token} is outside [0, {classes}) for inputs "
                                 f"with {classes} classes")
    return y_true, y_pred


def _forward(y_true, y_pred, tokens, sparse):
    loss_shape = y_pred.shape[:-1]
    call = jax.ffi.ffi_call(
        _handlers.FORWARD_TARGETS[sparse],
        (jax.ShapeDtypeStruct(loss_shape, y_pred.dtype),
         jax.ShapeDtypeStruct(loss_shape, jnp.uint8)),
        vmap_method="broadcast_all",
    )
    return call(y_true, y_pred, masked_tokens=np.asarray(tokens, dtype=np.int64))


def _gradient(y_true, y_pred, row_keep, grad_loss, sparse):
    call = jax.ffi.ffi_call(
        _handlers.GRAD_TARGETS[sparse],
        jax.ShapeDtypeStruct(y_pred.shape, y_pred.dtype),
        vmap_method="broadcast_all",
    )
    return call(y_true, y_pred, row_keep, grad_loss)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _loss(y_true, y_pred, tokens, sparse):
    return _forward(y_true, y_pred, tokens, sparse)[0]


def _loss_fwd(y_true, y_pred, tokens, sparse):
    loss, row_keep = _forward(y_true, y_pred, tokens, sparse)
    return loss, (y_true, y_pred, row_keep)


def _loss_bwd(tokens, sparse, residuals, grad_loss):
    y_true, y_pred, row_keep = residuals
    grad = _gradient(y_true, y_pred, row_keep, grad_loss.astype(y_pred.dtype), sparse)
    if sparse:  # integer ids have no tangent space: a float0 zero cotangent
        return np.zeros(y_true.shape, dtype=jax.dtypes.float0), grad
    return -grad, grad


_loss.defvjp(_loss_fwd, _loss_bwd)


def masked_mae_tokens(y_true, y_pred, tokens):
    """The fused loss for a list of masked token ids (see `masked_mae`)."""
    tokens = tuple(masked_token_list(None, None, tokens))
    y_true, y_pred = _check(y_true, y_pred, tokens, sparse=False)
    return _loss(y_true, y_pred, tokens, False)


def sparse_masked_mae_tokens(y_true_ids, y_pred, tokens):
    """The fused sparse loss for a list of masked token ids (see `sparse_masked_mae`)."""
    tokens = tuple(masked_token_list(None, None, tokens))
    y_true_ids, y_pred = _check(y_true_ids, y_pred, tokens, sparse=True)
    return _loss(y_true_ids, y_pred, tokens, True)


def masked_mae(y_true, y_pred, start_token=None, end_token=None, tokens=()):
    """Fused masked MAE over the last axis: `keep * mean(|y_pred - y_true|, -1)`, shape `[...]`.

    A position whose target argmax equals its prediction argmax and is the
    start token, the end token or one of `tokens` costs nothing (see
    fused_masked_mae.masked_mae for the exact argmax rule). y_true and y_pred:
    same shape `[..., C]` and float dtype.
    """
    return masked_mae_tokens(y_true, y_pred, masked_token_list(start_token, end_token, tokens))


def sparse_masked_mae(y_true_ids, y_pred, start_token=None, end_token=None, tokens=()):
    """`masked_mae(one_hot(ids, C), y_pred, ...)` for int32/int64 class ids `[...]`,
    without building the one-hot tensor (values and gradients equal bit for bit)."""
    return sparse_masked_mae_tokens(y_true_ids, y_pred,
                                    masked_token_list(start_token, end_token, tokens))
