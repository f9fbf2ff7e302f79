#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and no TensorFlow (the lent GPU
# machine: nvcc 13, CuPy, PyTorch, pybind11, pytest, driver >= 580).
#
#   tools/gpu_check.sh            build _core with nvcc, run the GPU and core tests,
#                                 then compute-sanitizer memcheck and racecheck
#   tools/gpu_check.sh --bench    ... then the GPU benchmark (benchmarks/bench_gpu.py)
#
# It builds only the TensorFlow-free pieces (the CUDA kernels and the pybind11
# core) into python/fused_masked_mae/, for this GPU's architecture, and runs
# them through PyTorch/CuPy arrays. Exit status: non-zero on any failure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
NVCC="${NVCC:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}"
command -v "$NVCC" >/dev/null || NVCC="$(command -v nvcc)"
CUDA_HOME="$(cd "$(dirname "$NVCC")/.." && pwd)"
BUILD="$ROOT/build/gpu_check"
mkdir -p "$BUILD"

nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv
ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')"
EXT="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
echo "== building _core for sm_$ARCH with $("$NVCC" --version | tail -1)"
"$NVCC" -x cu -std=c++17 -O3 -Xcompiler -fPIC -I"$ROOT" -gencode="arch=compute_$ARCH,code=sm_$ARCH" \
  -lineinfo -c cc/kernels/masked_mae_kernels.cu.cc -o "$BUILD/masked_mae_cuda.o"
g++ -O3 -fPIC -std=c++17 -fvisibility=hidden -DNDEBUG -I"$ROOT" -I"$CUDA_HOME/include" \
  $("$PY" -m pybind11 --includes) -DFUSED_MASKED_MAE_WITH_CUDA=1 \
  -c cc/core/core_module.cc -o "$BUILD/core_module.o"
# The CPU launchers: the dispatcher and its instruction-set variants (as build.sh).
CPU_OBJS=()
for src in cc/kernels/masked_mae_cpu.cc cc/kernels/masked_mae_cpu_baseline.cc \
  cc/kernels/masked_mae_cpu_avx2.cc cc/kernels/masked_mae_cpu_avx512.cc; do
  obj="$BUILD/$(basename "${src%.cc}").o"
  g++ -O3 -fPIC -std=c++17 -ffp-contract=off -DNDEBUG -I"$ROOT" -c "$src" -o "$obj"
  CPU_OBJS+=("$obj")
done
rm -f python/fused_masked_mae/_core.*.so
g++ -shared -o "python/fused_masked_mae/_core$EXT" "$BUILD/core_module.o" "${CPU_OBJS[@]}" \
  "$BUILD/masked_mae_cuda.o" \
  -L"$CUDA_HOME/lib64" -l:libcudart_static.a -ldl -lrt -lpthread -Wl,--exclude-libs,ALL
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'from fused_masked_mae import _core; assert _core.WITH_CUDA; print("_core with CUDA:", _core.__file__)'

status=0
echo "== GPU and core tests"
"$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu_core.py tests/test_core_cpu.py || status=1

# The sanitizers slow kernels ~100x: the mid-size class counts cover every row
# mapping (lane groups and whole blocks), aligned and unaligned.
SANITIZED=(-k "not 131072 and not 32000")
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 99 \
    "$PY" -m pytest -q -x -p no:cacheprovider tests/test_gpu_core.py "${SANITIZED[@]}" || status=1
done

if [[ "${1:-}" == "--bench" ]]; then
  echo "== GPU benchmark"
  "$PY" benchmarks/bench_gpu.py || status=1
fi
echo "== gpu_check: $([[ $status == 0 ]] && echo PASSED || echo FAILED)"
exit $status
