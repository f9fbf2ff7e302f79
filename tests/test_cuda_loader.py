"""cc/cuda/cuda_driver.cc against a stand-in libcuda.so.1 (tests/cc/fake_libcuda.c)
with the device code build.sh embedded: which image each GPU generation loads
(Pascal's own cubins, Blackwell's, PTX for the rest), that a failed module load
is remembered for the context instead of being retried on every launch, and
that Preload() loads before the first launch. No GPU needed."""

import pathlib
import shutil
import subprocess

import pytest

from fused_masked_mae import _build_info

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEVICE_CODE = ROOT / "build" / "masked_mae_device_code.o"
CUDA_INCLUDE = ROOT / "build" / "cuda12" / "include"
pytestmark = pytest.mark.skipif(
    not (_build_info.CUDA_ENABLED and DEVICE_CODE.exists() and CUDA_INCLUDE.exists()
         and shutil.which("g++") and shutil.which("gcc")),
    reason="needs build.sh's device code and CUDA 12 headers (a CUDA build) and g++")


@pytest.fixture(scope="module")
def loader(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(out / "libcuda.so.1"),
                    str(ROOT / "tests" / "cc" / "fake_libcuda.c")], check=True)
    subprocess.run(["g++", "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined",
                    f"-I{ROOT}", f"-I{CUDA_INCLUDE}", "-DFUSED_MASKED_MAE_WITH_CUDA=1",
                    str(ROOT / "tests" / "cc" / "cuda_loader_test.cc"),
                    str(ROOT / "cc" / "cuda" / "cuda_driver.cc"),
                    str(ROOT / "cc" / "cuda" / "masked_mae_launch.cc"), str(DEVICE_CODE),
                    "-ldl", "-o", str(out / "cuda_loader_test")], check=True)
    return out


def run(loader, cc, *args, fail_loads=False):
    log = loader / f"log_{cc}_{'_'.join(args)}_{fail_loads}.txt"
    log.unlink(missing_ok=True)
    env = {"LD_LIBRARY_PATH": str(loader), "FAKE_CUDA_CC": str(cc), "FAKE_CUDA_LOG": str(log),
           "ASAN_OPTIONS": "detect_leaks=0", "PATH": "/usr/bin:/bin"}
    if fail_loads:
        env["FAKE_CUDA_FAIL_LOADS"] = "1"
    result = subprocess.run([str(loader / "cuda_loader_test"), *args], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, (log.read_text().splitlines() if log.exists() else [])


@pytest.mark.parametrize("cc, image", [
    (60, "cubin 60"), (61, "cubin 61"), (62, "cubin 61"),  # Pascal: TensorFlow 2.21 places ops there
    (70, "cubin 70"), (72, "cubin 70"), (75, "cubin 75"), (80, "cubin 80"), (86, "cubin 86"),
    (87, "cubin 86"), (89, "cubin 89"), (90, "cubin 90"),
    (100, "cubin 100"), (103, "cubin 100"), (120, "cubin 120"), (121, "cubin 120"),
    (110, "ptx 90"),  # no cubin of its major version: the driver JIT-compiles the PTX
])
def test_each_gpu_generation_loads_its_image(loader, cc, image):
    out, log = run(loader, cc, "launch", "3")
    assert out.count(": ok") == 3, out
    loads = [line for line in log if line.startswith("load")]
    assert loads == [f"load {image} ok"], log  # once per context, not per launch
    assert sum(line.startswith("launch") for line in log) == 3


def test_a_gpu_older_than_pascal_gets_a_clear_error(loader):
    out, log = run(loader, 52, "launch", "2")
    assert "no loadable device code for this GPU (sm_52)" in out and "sm_60" in out, out
    assert not any(line.startswith("launch") for line in log)


def test_a_failed_module_load_is_not_retried_on_every_launch(loader):
    out, log = run(loader, 86, "launch", "4", fail_loads=True)
    assert out.count("loading failed for sm_86") == 4, out  # every launch says why
    assert [line for line in log if line.startswith("load")] == ["load cubin 86 failed"], log


def test_preload_loads_the_module_before_any_launch(loader):
    out, log = run(loader, 89, "preload")
    assert "preload: ok" in out and log == ["load cubin 89 ok"], (out, log)
