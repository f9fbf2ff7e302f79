"""Loads the compiled op library once, from inside the package.

The library is ABI-bound to the TensorFlow minor version it was compiled
against (abseil's inline namespace and TensorFlow's C++ classes change between
minor releases), so a mismatch is reported as an ImportError before loading,
instead of a crash or an undefined-symbol error.
"""

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
    return tf.load_op_library(path)


# Module import runs once per process, so the library is loaded once.
ops_library = _load()
