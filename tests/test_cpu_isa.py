"""The CPU kernels' instruction-set variants (baseline x86-64, AVX2+FMA+F16C,
AVX-512) give bit-identical results, and FUSED_MASKED_MAE_CPU_ISA chooses one.

The variant is chosen once per process, so each is run in a subprocess
(tests/cpu_isa_worker.py) with the environment variable set, through _core and
through the TensorFlow ops, and every output (loss, row_keep, gradients) is
compared with the baseline's as bytes: every dtype, C from 1 to 32000, dense
and sparse targets, NaN/Inf/signaling-NaN/denormal/tie rows, inputs that are
not vector-aligned. Variants this CPU lacks are skipped with the reason.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fused_masked_mae as fm
from fused_masked_mae import _core

TESTS = Path(__file__).absolute().parent
VARIANTS = ["baseline", "avx2", "avx512"]
SUPPORTED = _core.cpu_isas_supported()
ENV_VAR = "FUSED_MASKED_MAE_CPU_ISA"


def env_with(isa):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if isa is None:
        env.pop(ENV_VAR, None)
    else:
        env[ENV_VAR] = isa
    return env


def run_python(code, isa):
    return subprocess.run([sys.executable, "-c", code], env=env_with(isa), capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """{(front door, variant): npz} for every supported variant, computed once."""
    cache = {}

    def get(front_door, isa):
        if (front_door, isa) not in cache:
            path = tmp_path_factory.mktemp("isa") / f"{front_door}_{isa}.npz"
            result = subprocess.run(
                [sys.executable, str(TESTS / "cpu_isa_worker.py"), str(path), front_door],
                env=env_with(isa), capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, result.stderr[-3000:]
            cache[front_door, isa] = dict(np.load(path))
            assert str(cache[front_door, isa]["isa"]) == isa
        return cache[front_door, isa]

    return get


def require(isa):
    if isa not in SUPPORTED:
        pytest.skip(f"this CPU does not support the {isa} variant (it supports "
                    f"{', '.join(SUPPORTED)})")


@pytest.mark.parametrize("front_door", ["core", "tf"])
@pytest.mark.parametrize("isa", VARIANTS[1:])
def test_variant_is_bit_identical_to_baseline(outputs, front_door, isa):
    require(isa)
    baseline, variant = outputs(front_door, "baseline"), outputs(front_door, isa)
    keys = sorted(k for k in baseline if k != "isa")
    assert keys == sorted(k for k in variant if k != "isa")
    # Every dtype, C and kind of output is there.
    for needle in ("float16_C1_", "bfloat16_C32000", "float32_C1549_unaligned", "float64_C17"):
        assert any(k.startswith(needle) for k in keys), needle
    assert any(k.endswith("_keep") for k in keys) and any(k.endswith("_grad") for k in keys)
    differing = [k for k in keys if baseline[k].dtype != variant[k].dtype
                 or not np.array_equal(baseline[k], variant[k])]
    assert differing == [], f"{isa} differs from baseline in {differing[:10]}"
    # The battery does exercise the special cases: NaN losses and masked rows.
    assert any(np.isnan(baseline[k].view(np.float32)).any() for k in keys
               if k.startswith("float32") and k.endswith("_loss"))
    assert any((baseline[k] == 0).any() for k in keys if k.endswith("_keep"))


def test_cpu_isa_is_the_best_supported_variant_by_default():
    if os.environ.get(ENV_VAR):
        pytest.skip(f"{ENV_VAR} is set in this environment")
    assert fm.cpu_isa() == SUPPORTED[-1]
    from fused_masked_mae import _loader

    from fused_masked_mae import _handlers

    assert _loader.op_library_cpu_isa() == fm.cpu_isa()
    assert _handlers.cpu_isa() == fm.cpu_isa()  # the XLA handler library (TF jit, JAX)
    assert SUPPORTED[0] == "baseline" and set(SUPPORTED) <= set(VARIANTS)


@pytest.mark.parametrize("isa", VARIANTS)
def test_environment_variable_forces_the_variant(isa):
    require(isa)
    result = run_python(
        "import fused_masked_mae as fm\n"
        "from fused_masked_mae import _core, _handlers, _loader\n"
        "print(fm.cpu_isa(), _core.cpu_isa(), _loader.op_library_cpu_isa(), "
        "_handlers.cpu_isa())", isa)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [isa] * 4


@pytest.mark.parametrize("value", ["sse2", "AVX2", "native"])
def test_unknown_variant_fails_the_import(value):
    result = run_python("import fused_masked_mae", value)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError"), result.stderr[-3000:]
    assert f"{ENV_VAR}={value} is not one of baseline,avx2,avx512" in last
    assert f"this CPU supports {','.join(SUPPORTED)}" in last


def test_op_library_reports_the_refusal_itself():
    """The op library's own query (what _loader checks), without the package."""
    result = run_python(
        "import ctypes, importlib.util, os\n"
        "import tensorflow as tf\n"
        "spec = importlib.util.find_spec('fused_masked_mae')\n"
        "path = os.path.join(spec.submodule_search_locations[0], '_masked_mae_ops.so')\n"
        "tf.load_op_library(path)\n"
        "lib = ctypes.CDLL(path)\n"
        "for name in ('fused_masked_mae_cpu_isa_error', 'fused_masked_mae_cpu_isa'):\n"
        "    f = getattr(lib, name); f.restype = ctypes.c_char_p; print(f().decode())\n",
        "bogus")
    assert result.returncode == 0, result.stderr[-3000:]
    error, running = result.stdout.strip().splitlines()
    assert error.startswith(f"{ENV_VAR}=bogus is not one of baseline,avx2,avx512")
    assert running == SUPPORTED[-1]  # it never runs an unknown or unsupported variant


def test_unsupported_variant_fails_the_import():
    missing = [v for v in VARIANTS if v not in SUPPORTED]
    if not missing:
        pytest.skip("this CPU supports every variant: no unsupported one to request")
    result = run_python("import fused_masked_mae", missing[-1])
    assert result.returncode != 0
    assert "this CPU does not support that instruction set" in result.stderr
