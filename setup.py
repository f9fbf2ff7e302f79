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

setup(
    name="fused_masked_mae",
    version=package_version(),
    description="Fused C++/CUDA masked mean-absolute-error loss op for TensorFlow/Keras",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    package_dir={"": "python"},
    packages=["fused_masked_mae"],
    package_data={"fused_masked_mae": ["*.so"]},
    # The op library is ABI-bound to this TensorFlow minor version.
    install_requires=[f"tensorflow>={major}.{minor},<{major}.{int(minor) + 1}", "numpy"],
    distclass=BinaryDistribution,
    zip_safe=False,
)
