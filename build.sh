#!/usr/bin/env bash
# Builds fused_masked_mae from a fresh machine that has python3 and g++: a
# virtual environment with pinned dependencies, the op library, the pybind11
# core (both with the CUDA kernels: see "GPU code" below), the wheel in dist/,
# installed into the venv.
#
#   ./build.sh            set-up and build; the wheel lands in dist/
#   ./build.sh demo       ... then run the seq2seq demo (examples/): all three fixes of the Q&A side by side
#   ./build.sh test       ... then run the whole test suite
#   ./build.sh bench      ... then run the benchmarks (benchmarks/: CPU, then XLA)
#   ./build.sh sanitize   ... then build CPU-only ASan+UBSan libraries into
#                         build/sanitize/ and run the op tests, the raw-op fuzzer
#                         and a planted-bug self-check under them
#
# GPU code (README, "CUDA runtime"): clang-19 (installed with apt-get when
# missing and run as root) compiles the kernels device-only against CUDA 12
# pieces from PyPI (requirements-cuda.txt, installed into $VENV/cuda12): cubins
# for sm_60..sm_90, sm_100 and sm_120, and PTX 8.0, for NVIDIA drivers r525+, embedded in both
# libraries and loaded through the driver API. No nvcc and no CUDA runtime.
#
# Environment: VENV (default .venv), PYTHON (default python3), CUDA_CLANG
# (default clang++-19; without one the build is CPU-only and says so; NO_CUDA=1
# forces CPU-only), JOBS (parallel compiles, default: number of cores), CXXFLAGS_EXTRA
# (appended to host compile and link flags; TF_CXXFLAGS_EXTRA replaces it for
# the TensorFlow translation units), FUZZ_CASES (sanitize mode).
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
OP_LIBRARY_SOURCES=(cc/tf/masked_mae_ops.cc cc/tf/masked_mae_kernels.cc)
# The CPU launchers (no TensorFlow headers), linked into both libraries: the
# dispatcher, then one translation unit per instruction-set variant of the row
# loops (each sets its own target by pragma; the x86 ones are empty elsewhere).
CPU_SOURCES=(cc/cpu/masked_mae_cpu.cc cc/cpu/masked_mae_cpu_baseline.cc
  cc/cpu/masked_mae_cpu_avx2.cc cc/cpu/masked_mae_cpu_avx512.cc)
# XLA FFI handlers (custom calls under jit_compile), in the op library; the
# CUDA ones compile to nothing without GOOGLE_CUDA. They need
# libtensorflow_cc.so.2 (the FFI API).
XLA_FFI_SOURCES=(cc/xla/masked_mae_ffi.cc cc/xla/masked_mae_ffi_cpu.cc cc/xla/masked_mae_ffi_cuda.cc)
# Device code only (tools/build_device_code.sh); the host side of the launchers
# and the driver loader are plain C++ (empty when built without CUDA).
CUDA_SOURCE=cc/cuda/masked_mae_kernels.cu.cc
CUDA_HOST_SOURCES=(cc/cuda/masked_mae_launch.cc cc/cuda/cuda_driver.cc)
CORE_SOURCE=cc/core/core_module.cc
# Machine code for Pascal (sm_60, which TensorFlow 2.21 supports) to Hopper
# (sm_90) from clang, for Blackwell (sm_100, sm_120) from ptxas (clang-19
# cannot target them), plus PTX of sm_90 for other GPUs:
# tests/test_cuda_build.py checks the built libraries hold exactly these.
export CUDA_ARCHS="60 61 70 75 80 86 89 90" CUDA_PTX_ARCH=90 CUDA_PTXAS_ARCHS="100 120"

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
# under cc/, or this script or the device-code script (flags live there).
compile() {
  local out="$1" src="$2"
  shift 2
  if [[ -f "$out" && "$out" -nt "$src" && "$out" -nt "$ROOT/build.sh" ]] &&
    [[ "$out" -nt "$ROOT/tools/build_device_code.sh" ]] &&
    [[ -z "$(find "$ROOT/cc" -name '*.h' -newer "$out" -print -quit)" ]]; then
    return 0
  fi
  log "compiling ${src#"$ROOT"/}"
  "$@"
}

# The CUDA 12 device toolchain: sets cuda_clang and cuda_path, or returns 1
# (CPU-only build) with the reason logged. Idempotent and quick when done.
setup_cuda_toolchain() {
  [[ -z "${NO_CUDA:-}" ]] || { log "NO_CUDA set: building CPU-only"; return 1; }
  cuda_clang="${CUDA_CLANG:-clang++-19}"
  if ! command -v "$cuda_clang" >/dev/null 2>&1 && [[ -z "${CUDA_CLANG:-}" ]] &&
    [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing clang-19 (Debian) for the CUDA kernels"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-19 >/dev/null
  fi
  if ! command -v "$cuda_clang" >/dev/null 2>&1; then
    log "$cuda_clang not found (install clang-19 or set CUDA_CLANG): building CPU-only"
    return 1
  fi
  cuda_clang="$(command -v "$cuda_clang")"
  local wheels="$VENV/cuda12" stamp want
  stamp="$wheels/.requirements.sha"
  want="$(sha256sum requirements-cuda.txt | cut -d' ' -f1)"
  if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    log "installing the CUDA 12 toolchain wheels (requirements-cuda.txt) into $wheels"
    rm -rf "$wheels"
    "$VENV/bin/python" -m pip install -q --no-deps --target "$wheels" -r requirements-cuda.txt
    echo "$want" >"$stamp"
  fi
  # A CUDA 12 folder in the layout clang expects, made of links into the wheels.
  local nv="$wheels/nvidia"
  cuda_path="$BUILD_DIR/cuda12"
  rm -rf "$cuda_path"
  mkdir -p "$cuda_path/include" "$cuda_path/bin" "$cuda_path/nvvm"
  local dir entry
  for dir in "$nv/cuda_runtime/include" "$nv/cuda_cccl/include" "$nv/cuda_nvcc/include"; do
    for entry in "$dir"/*; do
      [[ "$(basename "$entry")" == __* ]] || ln -sfn "$entry" "$cuda_path/include/"
    done
  done
  # clang's CUDA wrapper includes it; CUDA 12's curand ships separately and is unused.
  : >"$cuda_path/include/curand_mtgp32_kernel.h"
  chmod +x "$nv/cuda_nvcc/bin/ptxas"  # zip archives may drop the bit
  ln -sfn "$nv/cuda_nvcc/bin/ptxas" "$cuda_path/bin/ptxas"
  ln -sfn "$nv/cuda_nvcc/nvvm/libdevice" "$cuda_path/nvvm/libdevice"
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

  local host_flags=(-O3 -fPIC -I"$ROOT" -Wall -Wno-sign-compare -DNDEBUG)
  # Extra flags: CXXFLAGS_EXTRA everywhere, unless TF_CXXFLAGS_EXTRA overrides
  # them for the TensorFlow translation units (see sanitize_suite).
  local core_extra=(${CXXFLAGS_EXTRA:-}) tf_extra=(${TF_CXXFLAGS_EXTRA-${CXXFLAGS_EXTRA:-}})
  local tf_flags=($tf_cflags -Wno-deprecated-declarations -Wno-interference-size)
  local cuda_defs=() cuda_objs=() cuda_libs=()

  local cuda_enabled=False cuda_clang cuda_path
  if setup_cuda_toolchain; then
    cuda_enabled=True
    export CUDA_CLANG="$cuda_clang" CUDA_PATH="$cuda_path" JOBS
    log "CUDA kernels: $("$cuda_clang" --version | head -1), ptxas $("$cuda_path/bin/ptxas" --version | grep -o 'V[0-9][0-9.]*' | tail -1)"
    # Rebuilt also when a compiler's version, the CUDA wheels or the arch lists change.
    local device_stamp want_stamp
    device_stamp="$BUILD_DIR/masked_mae_device_code.stamp"
    want_stamp="$("$ROOT/tools/device_code_stamp.sh" "$cuda_clang" "$cuda_path/bin/ptxas" \
      "$ROOT/requirements-cuda.txt")"
    if [[ "$(cat "$device_stamp" 2>/dev/null)" != "$want_stamp" ]]; then
      rm -f "$BUILD_DIR/masked_mae_device_code.o" "$device_stamp"
    fi
    compile "$BUILD_DIR/masked_mae_device_code.o" "$ROOT/$CUDA_SOURCE" \
      "$ROOT/tools/build_device_code.sh" "$BUILD_DIR/masked_mae_device_code.o" "$ROOT/$CUDA_SOURCE"
    echo "$want_stamp" >"$device_stamp"
    cuda_objs=("$BUILD_DIR/masked_mae_device_code.o")
    cuda_defs=(-DGOOGLE_CUDA=1 -DFUSED_MASKED_MAE_WITH_CUDA=1 -I"$cuda_path/include")
    cuda_libs=(-ldl)
  fi
  # The launchers' host side and the driver loader (empty without CUDA), in both libraries.
  for src in "${CUDA_HOST_SOURCES[@]}"; do
    local obj="$BUILD_DIR/$(basename "${src%.cc}").o"
    compile "$obj" "$ROOT/$src" g++ "${host_flags[@]}" "${core_extra[@]}" -std=c++17 \
      -fvisibility=hidden "${cuda_defs[@]}" -c "$ROOT/$src" -o "$obj"
    cuda_objs+=("$obj")
  done

  # Host compiles, two at a time (each TensorFlow translation unit needs ~1.5 GB).
  local op_objs=() pids=()
  for src in "${OP_LIBRARY_SOURCES[@]}"; do
    local obj="$BUILD_DIR/$(basename "${src%.cc}").o"
    compile "$obj" "$ROOT/$src" g++ "${host_flags[@]}" "${tf_extra[@]}" "${tf_flags[@]}" \
      "${cuda_defs[@]}" -c "$ROOT/$src" -o "$obj" &
    pids+=($!)
    op_objs+=("$obj")
    if [[ "$JOBS" -le 1 ]]; then wait "${pids[@]}"; pids=(); fi
  done
  for pid in "${pids[@]}"; do wait "$pid"; done  # each wait fails the script if its compile did
  # The CPU launchers, once per library: the sanitizer build instruments the
  # TensorFlow library and _core differently. -ffp-contract=off: no fused
  # multiply-add in any variant, so all give the baseline's bits.
  local cpu_flags=(-std=c++17 -ffp-contract=off) core_cpu_objs=()
  for src in "${CPU_SOURCES[@]}"; do
    local cpu_obj_ops="$BUILD_DIR/$(basename "${src%.cc}")_ops.o"
    local cpu_obj_core="$BUILD_DIR/$(basename "${src%.cc}")_core.o"
    compile "$cpu_obj_ops" "$ROOT/$src" g++ "${host_flags[@]}" "${tf_extra[@]}" "${cpu_flags[@]}" \
      -c "$ROOT/$src" -o "$cpu_obj_ops" &
    local ops_pid=$!
    compile "$cpu_obj_core" "$ROOT/$src" g++ "${host_flags[@]}" "${core_extra[@]}" "${cpu_flags[@]}" \
      -c "$ROOT/$src" -o "$cpu_obj_core"
    wait "$ops_pid"
    op_objs+=("$cpu_obj_ops")
    core_cpu_objs+=("$cpu_obj_core")
  done
  # XLA's FFI headers (api.h) trip g++'s -Wreturn-type on exhaustive switches.
  for src in "${XLA_FFI_SOURCES[@]}"; do
    local xla_obj="$BUILD_DIR/$(basename "${src%.cc}").o"
    compile "$xla_obj" "$ROOT/$src" g++ "${host_flags[@]}" "${tf_extra[@]}" "${tf_flags[@]}" \
      -Wno-return-type "${cuda_defs[@]}" -c "$ROOT/$src" -o "$xla_obj"
    op_objs+=("$xla_obj")
  done
  local core_obj="$BUILD_DIR/core_module.o"
  compile "$core_obj" "$ROOT/$CORE_SOURCE" g++ "${host_flags[@]}" "${core_extra[@]}" -std=c++17 \
    -fvisibility=hidden $("$py" -m pybind11 --includes) "${cuda_defs[@]}" \
    -c "$ROOT/$CORE_SOURCE" -o "$core_obj"

  # Link to a temporary name, then rename: a process loading the package
  # meanwhile sees the old or the new library, never half of one.
  log "linking _masked_mae_ops.so (TensorFlow $tf_version) and _core (CUDA: $cuda_enabled)"
  g++ -shared "${tf_extra[@]}" -o "$BUILD_DIR/_masked_mae_ops.so" "${op_objs[@]}" "${cuda_objs[@]}" \
    "${cuda_libs[@]}" $tf_lflags -l:libtensorflow_cc.so.2 -Wl,--exclude-libs,ALL -Wl,--no-undefined
  g++ -shared "${core_extra[@]}" -o "$BUILD_DIR/_core$ext_suffix" "$core_obj" "${core_cpu_objs[@]}" \
    "${cuda_objs[@]}" "${cuda_libs[@]}" \
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

# --- 4. Sanitizers ----------------------------------------------------------
# A CPU-only ASan+UBSan build of both libraries in its own package directory,
# run with the sanitizer runtimes preloaded into Python (TensorFlow itself is
# not instrumented, so leak detection is off).
sanitize_suite() {
  local dir="$ROOT/build/sanitize"
  local pkg="$dir/pkg/fused_masked_mae"
  mkdir -p "$pkg"
  cp "$ROOT"/python/fused_masked_mae/*.py "$pkg/"
  # g++ 12 with any UBSan check rejects a constexpr in TensorFlow's abseil
  # headers, so the TensorFlow glue gets ASan only; the row math gets UBSan
  # through _core (and tests/cc/row_math_test.cc), which shares it.
  local sanitize_flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
  local sanitize_tf_flags="-fsanitize=address -fno-omit-frame-pointer -g"
  BUILD_DIR="$dir" PKG_DIR="$pkg" NO_CUDA=1 CXXFLAGS_EXTRA="$sanitize_flags" \
    TF_CXXFLAGS_EXTRA="$sanitize_tf_flags" build_libraries
  local preload
  preload="$(g++ -print-file-name=libasan.so):$(g++ -print-file-name=libubsan.so)"
  local env=(env PYTHONPATH="$dir/pkg" LD_PRELOAD="$preload"
    ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0:abort_on_error=1"
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" TF_CPP_MIN_LOG_LEVEL=2)
  log "sanitized test suite"
  (cd "$dir" && "${env[@]}" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    "$ROOT/tests/test_op_parity.py" "$ROOT/tests/test_parity.py" "$ROOT/tests/test_gradients.py" \
    "$ROOT/tests/test_errors.py" "$ROOT/tests/test_sparse.py" "$ROOT/tests/test_core_cpu.py" \
    "$ROOT/tests/test_properties.py" "$ROOT/tests/test_xla.py" -k "not keras_fit and not saved_model")
  log "raw-op fuzzer (${FUZZ_CASES:-2000} cases)"
  (cd "$dir" && "${env[@]}" "$VENV/bin/python" "$ROOT/tests/fuzz_raw_ops.py" --cases "${FUZZ_CASES:-2000}")
  log "planted-bug self-check: a test-only build that reads past y_pred must be reported"
  local planted="$dir/planted"
  mkdir -p "$planted/pkg/fused_masked_mae"
  cp "$pkg"/*.py "$planted/pkg/fused_masked_mae/"
  BUILD_DIR="$planted" PKG_DIR="$planted/pkg/fused_masked_mae" NO_CUDA=1 \
    CXXFLAGS_EXTRA="$sanitize_flags" \
    TF_CXXFLAGS_EXTRA="$sanitize_tf_flags -DFUSED_MASKED_MAE_PLANT_OOB_READ_FOR_SANITIZER_TEST" \
    build_libraries
  local report="$planted/report.txt"
  if (cd "$planted" && env PYTHONPATH="$planted/pkg" LD_PRELOAD="$preload" \
    ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0" \
    TF_CPP_MIN_LOG_LEVEL=2 "$VENV/bin/python" -c '
import numpy as np, fused_masked_mae as fm
fm.masked_mae(np.zeros((4, 5), np.float32), np.zeros((4, 5), np.float32), 0, 1).numpy()
print("planted read went unreported")') >"$report" 2>&1; then
    cat "$report"
    echo "sanitize: FAILED: the planted out-of-bounds read was not reported" >&2
    return 1
  fi
  grep -q "heap-buffer-overflow\|stack-buffer-overflow\|global-buffer-overflow" "$report" || {
    cat "$report"
    echo "sanitize: FAILED: the planted read did not produce an AddressSanitizer report" >&2
    return 1
  }
  log "planted out-of-bounds read reported: $(grep -m1 -o 'ERROR: AddressSanitizer: [a-z-]*' "$report")"
}

setup_venv
build_libraries
build_wheel
install_wheel

case "$MODE" in
  build) ;;
  demo) (cd /tmp && "$VENV/bin/python" "$ROOT/examples/seq2seq_demo.py" --out "$ROOT/build/demo" "$@") ;;
  test) "$VENV/bin/python" -m pytest "$ROOT/tests" "$@" ;;
  bench)
    "$VENV/bin/python" "$ROOT/benchmarks/bench_masked_mae.py" "$@"
    "$VENV/bin/python" "$ROOT/benchmarks/bench_xla.py"
    ;;
  sanitize) sanitize_suite ;;
  *)
    echo "usage: $0 [build|demo|test|bench|sanitize] [args...]" >&2
    exit 2
    ;;
esac
