"""Packages the libraries that build.sh compiled into a platform wheel.

Run through ./build.sh, which compiles python/fused_masked_mae/_masked_mae_ops.so,
_core*.so and _build_info.py first; this file only packages them.
"""

import pathlib
import re

from setuptools import setup
from setuptools.dist import Distribution

ROOT = pathlib.Path(__file__).resolve().parent
PACKAGE = ROOT / "python" / "fused_masked_mae"


class BinaryDistribution(Distribution):
    """Holds compiled libraries: a platform wheel (cp311-cp311-linux_x86_64), not a pure one."""

    def has_ext_modules(self):
        return True


def built_tensorflow_version():
    build_info = PACKAGE / "_build_info.py"
    if not build_info.exists():
        raise SystemExit("python/fused_masked_mae/_build_info.py is missing: run ./build.sh")
    return re.search(r'TF_VERSION = "([^"]+)"', build_info.read_text()).group(1)


def package_version():
    return re.search(r'__version__ = "([^"]+)"', (PACKAGE / "__init__.py").read_text()).group(1)


major, minor = built_tensorflow_version().split(".")[:2]
# The oldest JAX that accepts the handlers (XLA FFI API 0.2; README, "Versions").
JAX_MINIMUM = "0.8.1"

setup(
    name="fused_masked_mae",
    version=package_version(),
    description=("Fused C++/CUDA masked mean-absolute-error loss for Keras 3 (TensorFlow, JAX, "
                 "PyTorch backends), TensorFlow, JAX and PyTorch"),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    package_dir={"": "python"},
    packages=["fused_masked_mae"],
    package_data={"fused_masked_mae": ["*.so"]},
    # `import fused_masked_mae` needs only NumPy; each framework is an extra.
    # The TensorFlow op library is ABI-bound to this TensorFlow minor version
    # (fused_masked_mae._loader refuses another one at import). The JAX range
    # starts at the oldest release that accepts the handlers' FFI API 0.2
    # (README, "Versions"); torch needs torch.library.custom_op (2.4+).
    install_requires=["numpy"],
    extras_require={
        "tensorflow": [f"tensorflow>={major}.{minor},<{major}.{int(minor) + 1}"],
        "jax": [f"jax>={JAX_MINIMUM}", f"jaxlib>={JAX_MINIMUM}"],
        "torch": ["torch>=2.4"],
        "keras": ["keras>=3.0"],
    },
    distclass=BinaryDistribution,
    zip_safe=False,
)
