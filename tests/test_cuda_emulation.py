"""The CUDA kernels without a GPU: tools/build_cuda_emulator.sh compiles the
unchanged cc/cuda/masked_mae_kernels.cu.cc as host C++ with the emulator's shim
(tests/cuda_emu/README.md: one fiber per CUDA thread, checked shuffles,
barriers and vector loads) under ASan+UBSan, and emu_test launches every
kernel through the real host launchers and compares it bit for bit with the
CPU launchers. The emulator's own checks are shown to fire on kernels that
break them (emu_selftest). Set FUSED_MASKED_MAE_EMU_FULL=1 for the larger
sweep (C = 1..700 all, 200 more up to 32000, more rows)."""

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None or os.uname().machine != "x86_64",
    reason="the emulator needs g++ on x86-64 (its fiber switch is x86-64 assembly; "
           "elsewhere it falls back to ucontext, untested)")


@pytest.fixture(scope="module")
def emulator():
    build = subprocess.run([str(ROOT / "tools" / "build_cuda_emulator.sh")],
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-6000:]
    binary = pathlib.Path(build.stdout.strip().splitlines()[-1])
    return binary, binary.parent / "emu_selftest"


def run(args, timeout):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    env.pop("LD_PRELOAD", None)
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_every_kernel_matches_the_cpu_launchers_bit_for_bit(emulator):
    binary, _ = emulator
    args = [binary, "--seed", "1"]
    if os.environ.get("FUSED_MASKED_MAE_EMU_FULL"):
        args.append("--full")
    result = run(args, timeout=3600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert "PASSED: 0 failures" in result.stdout, out[-6000:]
    assert "never launched" not in result.stdout, out[-6000:]
    for dtype in ("f16", "bf16", "f32", "f64"):
        assert f"\n{dtype}: " in "\n" + result.stdout, result.stdout
    # Every kernel the ABI header names ran, with warps and barriers exercised.
    kernels = [line for line in result.stdout.splitlines() if line.startswith("kernels launched")]
    assert kernels and kernels[0].startswith("kernels launched: ")
    launched, total = kernels[0].split(":")[1].split(";")[0].split(" of ")
    assert int(launched) == int(total) > 0, kernels[0]
    comparisons = int(result.stdout.split(" failures in ")[1].split()[0])
    assert comparisons > 10_000_000


def test_a_second_seed_with_the_default_grid(emulator):
    binary, _ = emulator
    result = run([binary, "--seed", "7", "--max-c", "5000", "--grid-cap", "1"], timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "PASSED: 0 failures" in result.stdout


@pytest.mark.parametrize("mode, message", [
    ("divergent_shuffle", "divergent warp"),
    ("missing_lane", "exits while its warp waits"),
    ("divergent_barrier", "divergent __syncthreads"),
    ("barrier_exit", "deadlock"),
    ("misaligned_ldg", "not 16-byte aligned"),
    ("mask_excludes_self", "excludes it"),
])
def test_the_emulator_reports_broken_kernels(emulator, mode, message):
    _, selftest = emulator
    result = run([selftest, mode], timeout=120)
    assert result.returncode == 86, result.stdout + result.stderr
    assert message in result.stderr, result.stderr


def test_the_emulator_runs_a_correct_kernel(emulator):
    _, selftest = emulator
    result = run([selftest, "ok"], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest ok: completed" in result.stdout
