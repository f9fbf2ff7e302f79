"""The XLA FFI handler library, _xla_ffi.so: one binary for TensorFlow and JAX.

It links no framework (cc/xla, the CPU launchers and, in CUDA builds, the CUDA
launchers with the dlopen'ed driver). TensorFlow's jit path registers its
handlers with TensorFlow's XLA after `import tensorflow`
(`register_with_tensorflow`, used by fused_masked_mae.xla); JAX registers the
same handler pointers with its own XLA (`handler`, used by fused_masked_mae.jax).
Each handler reaches its XLA through the call frame, so nothing is copied.

Custom-call targets (the suffix says what to import when a saved computation
is loaded without the package):

    fused_masked_mae_forward(y_true, y_pred) -> (loss, row_keep)
    fused_masked_mae_grad(y_true, y_pred, row_keep, grad_loss) -> grad_y_pred
    fused_masked_mae_sparse_forward / fused_masked_mae_sparse_grad (int ids)
"""

import ctypes
import functools
import os

_SUFFIX = ".import_fused_masked_mae"
FORWARD_TARGETS = {False: "fused_masked_mae_forward" + _SUFFIX,
                   True: "fused_masked_mae_sparse_forward" + _SUFFIX}
GRAD_TARGETS = {False: "fused_masked_mae_grad" + _SUFFIX,
                True: "fused_masked_mae_sparse_grad" + _SUFFIX}
ALL_TARGETS = frozenset(FORWARD_TARGETS.values()) | frozenset(GRAD_TARGETS.values())

LIBRARY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_xla_ffi.so")


@functools.cache
def library():
    """The loaded handler library (once per process; ImportError when missing or
    when FUSED_MASKED_MAE_CPU_ISA names a variant this CPU cannot run)."""
    if not os.path.exists(LIBRARY_PATH):
        raise ImportError(f"{LIBRARY_PATH} is missing: build the package with ./build.sh and "
                          "install the wheel from dist/.")
    lib = ctypes.CDLL(LIBRARY_PATH)
    for name in ("fused_masked_mae_cpu_isa", "fused_masked_mae_cpu_isa_error",
                 "FusedMaskedMaeXlaRegisterWithTensorFlow", "FusedMaskedMaeXlaTargets"):
        getattr(lib, name).restype = ctypes.c_char_p
        getattr(lib, name).argtypes = []
    lib.FusedMaskedMaeXlaHandler.restype = ctypes.c_void_p
    lib.FusedMaskedMaeXlaHandler.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    error = lib.fused_masked_mae_cpu_isa_error().decode()
    if error:
        raise ImportError(f"fused_masked_mae: {error}")
    return lib


def cpu_isa():
    """The CPU instruction-set variant the handlers run (see fused_masked_mae.cpu_isa)."""
    return library().fused_masked_mae_cpu_isa().decode()


def handler(platform, target):
    """The address of `target`'s handler for `platform` ("Host" or "CUDA"), or
    None where this build has none or it may not run here (a CUDA driver below
    r525)."""
    return library().FusedMaskedMaeXlaHandler(platform.encode(), target.encode())


def targets():
    """{(platform, target): allowed} for every handler the library holds."""
    table = {}
    for line in library().FusedMaskedMaeXlaTargets().decode().splitlines():
        platform, target, state = line.split(" ")
        table[(platform, target)] = state == "allowed"
    return table


def register_with_tensorflow():
    """Registers the allowed handlers with TensorFlow's XLA (import tensorflow
    first); once per process. Returns {platform: {target: None or the error}}."""
    report = {}
    for line in library().FusedMaskedMaeXlaRegisterWithTensorFlow().decode().splitlines():
        platform, target, outcome = line.split(" ", 2)
        report.setdefault(platform, {})[target] = None if outcome == "ok" else outcome
    return report
