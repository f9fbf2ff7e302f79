"""The built libraries carry the CUDA kernels and register them for the GPU.

Runs wherever the package was built with nvcc (CI compiles the CUDA code even
though its machines have no GPU); a CPU-only build skips with the reason.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

import fused_masked_mae
from fused_masked_mae import _build_info, _core

PACKAGE_DIR = os.path.dirname(fused_masked_mae.__file__)
OPS_LIBRARY = os.path.join(PACKAGE_DIR, "_masked_mae_ops.so")
GPU_ARCHS = {"sm_75", "sm_80", "sm_86", "sm_89", "sm_90"}

pytestmark = pytest.mark.skipif(
    not _build_info.CUDA_ENABLED, reason="built without nvcc: no CUDA code to check"
)


def cuobjdump():
    # The system CUDA toolkit's, else the one requirements.txt installs from PyPI.
    candidates = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"] + [
        os.path.join(p, "nvidia", "cu13", "bin", "cuobjdump") for p in sys.path
    ]
    for path in candidates:
        if path and os.path.exists(path):
            return path
    pytest.fail("cuobjdump not found: install nvidia-cuda-cuobjdump (requirements.txt)")


def test_gpu_kernels_are_registered_for_every_dtype():
    from tensorflow.python.framework import kernels

    for op in ("Import_fused_masked_mae>MaskedMae", "Import_fused_masked_mae>MaskedMaeGrad",
               "Import_fused_masked_mae>SparseMaskedMae", "Import_fused_masked_mae>SparseMaskedMaeGrad"):
        registered = kernels.get_registered_kernels_for_op(op).kernel
        gpu_types = {
            t for k in registered if k.device_type == "GPU"
            for c in k.constraint if c.name == "T" for t in c.allowed_values.list.type
        }
        # DT_HALF=19, DT_BFLOAT16=14, DT_FLOAT=1, DT_DOUBLE=2
        assert gpu_types == {1, 2, 14, 19}, (op, registered)
        if "Sparse" in op:  # DT_INT32=3, DT_INT64=9 ids
            id_types = {t for k in registered if k.device_type == "GPU"
                        for c in k.constraint if c.name == "Tidx"
                        for t in c.allowed_values.list.type}
            assert id_types == {3, 9}, (op, registered)


@pytest.mark.parametrize("library", [OPS_LIBRARY, _core.__file__], ids=["ops", "core"])
def test_library_embeds_device_code_for_each_architecture(library):
    listing = subprocess.run(
        [cuobjdump(), "--list-elf", "--list-ptx", library], capture_output=True, text=True,
        check=True,
    ).stdout
    archs = set(re.findall(r"\.(sm_\d+)\.cubin", listing))
    assert archs == GPU_ARCHS, listing
    assert re.search(r"\.sm_90\.ptx", listing), listing  # PTX for GPUs newer than sm_90


def test_library_has_forward_and_gradient_kernels():
    symbols = subprocess.run(
        [cuobjdump(), "--dump-elf-symbols", OPS_LIBRARY], capture_output=True, text=True,
        check=True,
    ).stdout
    kernels = set(re.findall(r"(_Z\w*MaskedMaeKernel\w*)", symbols))
    # 4 dtypes x {dense, int32 ids, int64 ids} x {forward, gradient}
    # x 7 row mappings (1..32 lanes, whole block).
    assert len(kernels) == 4 * 3 * 2 * 7, sorted(kernels)


def test_core_reports_cuda():
    assert _core.WITH_CUDA is True
