"""Loads the compiled op library once, from inside the package.

The library is ABI-bound to the TensorFlow minor version it was compiled
against (abseil's inline namespace and TensorFlow's C++ classes change between
minor releases), so a mismatch is reported as an ImportError before loading,
instead of a crash or an undefined-symbol error.
"""

import ctypes
import os

import tensorflow as tf

from fused_masked_mae import _build_info

_LIBRARY_NAME = "_masked_mae_ops.so"
LIBRARY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), _LIBRARY_NAME)


def _minor_version(version):
    return tuple(version.split(".")[:2])


def check_tensorflow_version(installed=None, built=None):
    """Raises ImportError when the installed TF minor version differs from the build's."""
    installed = tf.__version__ if installed is None else installed
    built = _build_info.TF_VERSION if built is None else built
    if _minor_version(installed) != _minor_version(built):
        raise ImportError(
            f"fused_masked_mae was built against TensorFlow {built}, but TensorFlow "
            f"{installed} is installed. The op library only works with the TensorFlow "
            f"minor version it was compiled for: install tensorflow=="
            f"{'.'.join(_minor_version(built))}.* or rebuild fused_masked_mae "
            f"(./build.sh) against TensorFlow {installed}."
        )


def _load():
    check_tensorflow_version()
    path = LIBRARY_PATH
    if not os.path.exists(path):
        raise ImportError(
            f"{path} is missing: build the package with ./build.sh and install the wheel "
            "from dist/."
        )
    library = tf.load_op_library(path)
    _check_cpu_isa(path)
    return library


def _cpu_isa_function(path, name):
    function = getattr(ctypes.CDLL(path), name)
    function.restype = ctypes.c_char_p
    function.argtypes = []
    return lambda: function().decode()


def op_library_cpu_isa():
    """The CPU instruction-set variant the op library's kernels run (see cpu_isa())."""
    return _cpu_isa_function(LIBRARY_PATH, "fused_masked_mae_cpu_isa")()


def _check_cpu_isa(path):
    """ImportError when FUSED_MASKED_MAE_CPU_ISA names an unknown or unsupported variant."""
    error = _cpu_isa_function(path, "fused_masked_mae_cpu_isa_error")()
    if error:
        raise ImportError(f"fused_masked_mae: {error}")


# Module import runs once per process, so the library is loaded once.
ops_library = _load()
