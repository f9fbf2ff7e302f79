#!/usr/bin/env bash
# Builds fused_masked_mae from a fresh machine that has python3 and g++ (and,
# optionally, nvcc): a virtual environment with pinned dependencies, the op
# library, the pybind11 core, the wheel in dist/, installed into the venv.
#
#   ./build.sh            set-up and build; the wheel lands in dist/
#   ./build.sh demo       ... then run the seq2seq demo (examples/), quick mode
#   ./build.sh test       ... then run the whole test suite
#   ./build.sh bench      ... then run the benchmarks (benchmarks/)
#
# Environment: VENV (default .venv), PYTHON (default python3), NVCC or CUDA_HOME
# (default /usr/local/cuda; no nvcc means a CPU-only build), JOBS (parallel
# compiles, default: number of cores), CXXFLAGS_EXTRA (appended to host flags).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
MODE="${1:-build}"
shift || true
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
BUILD_DIR="$ROOT/build"
PKG_DIR="$ROOT/python/fused_masked_mae"
JOBS="${JOBS:-$(nproc)}"

# What goes into each library (tests/test_bazel_build.py keeps BUILD in step).
OP_LIBRARY_SOURCES=(cc/ops/masked_mae_ops.cc cc/kernels/masked_mae_kernels.cc)
CUDA_SOURCE=cc/kernels/masked_mae_kernels.cu.cc
CORE_SOURCE=cc/core/core_module.cc
# sm_75..sm_90 as machine code (CUDA 13's oldest to Hopper), plus PTX of the
# newest so later GPUs can JIT it.
CUDA_GENCODE=(-gencode=arch=compute_75,code=sm_75 -gencode=arch=compute_80,code=sm_80
  -gencode=arch=compute_86,code=sm_86 -gencode=arch=compute_89,code=sm_89
  -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90)

log() { echo "[build.sh] $*"; }

# --- 1. Virtual environment with pinned dependencies ------------------------
setup_venv() {
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.requirements.sha"
  local want
  want="$(sha256sum requirements.txt | cut -d' ' -f1)"
  if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    log "installing pinned dependencies (requirements.txt)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r requirements.txt
    echo "$want" >"$stamp"
  fi
}

# --- 2. Compile -------------------------------------------------------------
# compile OUT SRC CMD...: runs CMD only when OUT is older than SRC, a header
# under cc/, or this script (flags live here).
compile() {
  local out="$1" src="$2"
  shift 2
  if [[ -f "$out" && "$out" -nt "$src" && "$out" -nt "$ROOT/build.sh" ]] &&
    [[ -z "$(find "$ROOT/cc" -name '*.h' -newer "$out" -print -quit)" ]]; then
    return 0
  fi
  log "compiling ${src#"$ROOT"/}"
  "$@"
}

find_nvcc() {
  if [[ -n "${NVCC:-}" ]]; then
    echo "$NVCC"
  elif [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
    echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  elif command -v nvcc >/dev/null 2>&1; then
    command -v nvcc
  fi
}

build_libraries() {
  mkdir -p "$BUILD_DIR"
  local py="$VENV/bin/python"
  # Flags come from the installed TensorFlow, never hard-coded (ABI, standard).
  local tf_info
  tf_info="$("$py" -c 'import os; os.environ["TF_CPP_MIN_LOG_LEVEL"]="3"
import sysconfig
import tensorflow as tf
print(" ".join(tf.sysconfig.get_compile_flags()))
print(" ".join(tf.sysconfig.get_link_flags()))
print(tf.__version__)
print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null)"
  local tf_cflags tf_lflags tf_version ext_suffix
  tf_cflags="$(sed -n 1p <<<"$tf_info")"
  tf_lflags="$(sed -n 2p <<<"$tf_info")"
  tf_version="$(sed -n 3p <<<"$tf_info")"
  ext_suffix="$(sed -n 4p <<<"$tf_info")"

  local host_flags=(-O3 -fPIC -I"$ROOT" -Wall -Wno-sign-compare -DNDEBUG ${CXXFLAGS_EXTRA:-})
  local tf_flags=($tf_cflags -Wno-deprecated-declarations -Wno-interference-size)
  local cuda_defs=() cuda_objs=() cuda_libs=()

  local nvcc cuda_enabled=False
  nvcc="$(find_nvcc)"
  if [[ -n "$nvcc" ]]; then
    [[ -x "$nvcc" ]] || { echo "NVCC=$nvcc is not executable" >&2; exit 1; }
    cuda_enabled=True
    local cuda_home
    cuda_home="$(cd "$(dirname "$nvcc")/.." && pwd)"
    compile "$BUILD_DIR/masked_mae_cuda.o" "$ROOT/$CUDA_SOURCE" \
      "$nvcc" -x cu -std=c++17 -O3 -Xcompiler -fPIC -I"$ROOT" "${CUDA_GENCODE[@]}" \
      -c "$ROOT/$CUDA_SOURCE" -o "$BUILD_DIR/masked_mae_cuda.o"
    cuda_objs=("$BUILD_DIR/masked_mae_cuda.o")
    cuda_defs=(-DGOOGLE_CUDA=1 -DFUSED_MASKED_MAE_WITH_CUDA=1 -I"$cuda_home/include")
    # The CUDA 13 runtime, linked statically and hidden (--exclude-libs), and
    # before TensorFlow's library, which exports CUDA 12.5 runtime entry points
    # of its own. See README, "CUDA runtime".
    cuda_libs=(-L"$cuda_home/lib64" -l:libcudart_static.a -ldl -lrt -lpthread)
  else
    log "nvcc not found (set NVCC or CUDA_HOME): building CPU-only"
  fi

  # Host compiles, two at a time (each TensorFlow translation unit needs ~1.5 GB).
  local op_objs=() pids=()
  for src in "${OP_LIBRARY_SOURCES[@]}"; do
    local obj="$BUILD_DIR/$(basename "${src%.cc}").o"
    compile "$obj" "$ROOT/$src" g++ "${host_flags[@]}" "${tf_flags[@]}" "${cuda_defs[@]}" \
      -c "$ROOT/$src" -o "$obj" &
    pids+=($!)
    op_objs+=("$obj")
    if [[ "$JOBS" -le 1 ]]; then wait "${pids[@]}"; pids=(); fi
  done
  for pid in "${pids[@]}"; do wait "$pid"; done  # each wait fails the script if its compile did
  local core_obj="$BUILD_DIR/core_module.o"
  compile "$core_obj" "$ROOT/$CORE_SOURCE" g++ "${host_flags[@]}" -std=c++17 \
    -fvisibility=hidden $("$py" -m pybind11 --includes) "${cuda_defs[@]}" \
    -c "$ROOT/$CORE_SOURCE" -o "$core_obj"

  # Link to a temporary name, then rename: a process loading the package
  # meanwhile sees the old or the new library, never half of one.
  log "linking _masked_mae_ops.so (TensorFlow $tf_version) and _core (CUDA: $cuda_enabled)"
  g++ -shared -o "$BUILD_DIR/_masked_mae_ops.so" "${op_objs[@]}" "${cuda_objs[@]}" \
    "${cuda_libs[@]}" $tf_lflags -Wl,--exclude-libs,ALL -Wl,--no-undefined
  g++ -shared -o "$BUILD_DIR/_core$ext_suffix" "$core_obj" "${cuda_objs[@]}" "${cuda_libs[@]}" \
    -Wl,--exclude-libs,ALL
  rm -f "$PKG_DIR"/_core.*.so
  mv -f "$BUILD_DIR/_masked_mae_ops.so" "$PKG_DIR/_masked_mae_ops.so"
  mv -f "$BUILD_DIR/_core$ext_suffix" "$PKG_DIR/_core$ext_suffix"

  cat >"$PKG_DIR/_build_info.py" <<EOF
# Written by build.sh; not in git.
TF_VERSION = "$tf_version"
CUDA_ENABLED = $cuda_enabled
EOF
}

# --- 3. Wheel ---------------------------------------------------------------
build_wheel() {
  # setuptools stages the wheel under build/lib and build/bdist.*: start clean.
  rm -rf "$ROOT/dist" "$BUILD_DIR/lib" "$BUILD_DIR"/bdist.* "$ROOT"/python/*.egg-info
  "$VENV/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$ROOT/dist" "$ROOT" \
    >/dev/null
  log "wheel: $(ls "$ROOT"/dist/*.whl)"
}

install_wheel() {
  "$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "$ROOT"/dist/*.whl
}

setup_venv
build_libraries
build_wheel
install_wheel

case "$MODE" in
  build) ;;
  demo) (cd /tmp && "$VENV/bin/python" "$ROOT/examples/seq2seq_demo.py" "$@") ;;
  test) "$VENV/bin/python" -m pytest "$ROOT/tests" "$@" ;;
  bench) "$VENV/bin/python" "$ROOT/benchmarks/bench_masked_mae.py" "$@" ;;
  *)
    echo "usage: $0 [build|demo|test|bench] [args...]" >&2
    exit 2
    ;;
esac
