"""Builds and runs tests/cc/row_math_test.cc: the per-row header on its own,
under AddressSanitizer and UndefinedBehaviorSanitizer, with no TF or Python
in the loop. It also replays the CUDA kernels' lane/butterfly reduction order
on the host, so that order is checked even where no GPU exists."""

import pathlib
import platform
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_row_math_under_sanitizers(tmp_path):
    binary = tmp_path / "row_math_test"
    subprocess.run(
        ["g++", "-std=c++17", "-O1", "-g", f"-I{ROOT}",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
         str(ROOT / "tests" / "cc" / "row_math_test.cc"), "-o", str(binary)],
        check=True,
    )
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PASSED: 0 failures" in run.stdout
    assert run.stdout.count("rows x 8 lane groups checked") == 4
    # The CUDA kernels' explicit denormal flushing equals the host loops
    # under the CPU flush mode, bit for bit (x86-64 and AArch64 have the mode).
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        assert run.stdout.count("denormals: 1400 rows checked") == 4, run.stdout


@pytest.mark.skipif(shutil.which("valgrind") is None or shutil.which("g++") is None,
                    reason="valgrind or g++ not found")
def test_row_math_under_valgrind(tmp_path):
    binary = tmp_path / "row_math_test_plain"
    subprocess.run(
        ["g++", "-std=c++17", "-O1", "-g", f"-I{ROOT}",
         str(ROOT / "tests" / "cc" / "row_math_test.cc"), "-o", str(binary)],
        check=True,
    )
    run = subprocess.run(
        ["valgrind", "--error-exitcode=9", "--leak-check=full", "--errors-for-leak-kinds=all",
         str(binary)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "PASSED: 0 failures" in run.stdout
    assert "ERROR SUMMARY: 0 errors" in run.stderr
