#!/usr/bin/env bash
# Builds the CUDA emulator test (tests/cuda_emu/README.md) under ASan+UBSan:
# cc/cuda/masked_mae_kernels.cu.cc, unchanged, as host C++ (g++ -x c++
# -include tests/cuda_emu/shim.h), the real host launchers
# (cc/cuda/masked_mae_launch.cc) against the emulator's stand-in for the
# driver (tests/cuda_emu/emu_runtime.cc), the CPU launchers (cc/cpu) and the
# comparison harness (tests/cuda_emu/emu_test.cc).
#
#   tools/build_cuda_emulator.sh [OUT_DIR]     (default build/cuda_emu)
#
# Prints the path of emu_test (emu_selftest, the emulator's own checks, beside it). Cached: rebuilds only when a source under cc/ or
# tests/cuda_emu/, this script, or the compiler changes. CXX (default g++),
# JOBS (parallel compiles, default: cores), EMU_SANITIZE=0 for a plain build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/build/cuda_emu}"
CXX="${CXX:-g++}"
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$OUT"
flags=(-std=c++17 -O2 -g -ffp-contract=off -fno-omit-frame-pointer -I"$ROOT" -Wall -Wno-sign-compare
  -Wno-unused-function -Wno-unknown-pragmas)
if [[ "${EMU_SANITIZE:-1}" != 0 ]]; then
  flags+=(-fsanitize=address,undefined -fno-sanitize-recover=undefined)
fi
emu_include=(-I"$ROOT/tests/cuda_emu/include")
# Everything the binary depends on, for the cache stamp.
stamp="$( (
  cd "$ROOT"
  find cc tests/cuda_emu -type f \( -name '*.h' -o -name '*.cc' \) -print0 | sort -z | xargs -0 sha256sum
  sha256sum tools/build_cuda_emulator.sh
  "$CXX" --version | head -1
  echo "${flags[*]}"
) | sha256sum | cut -d' ' -f1)"
binary="$OUT/emu_test"
if [[ -x "$binary" && -x "$OUT/emu_selftest" && "$(cat "$OUT/stamp" 2>/dev/null)" == "$stamp" ]]; then
  echo "$binary"
  exit 0
fi
rm -f "$OUT/stamp" "$binary"
compile() {  # OBJ ARGS...
  local obj="$1"
  shift
  "$CXX" "${flags[@]}" "$@" -c -o "$OUT/$obj"
}
pids=()
spawn() {
  compile "$@" &
  pids+=($!)
  if [[ ${#pids[@]} -ge $JOBS ]]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
}
spawn kernels.o "${emu_include[@]}" -x c++ -include "$ROOT/tests/cuda_emu/shim.h" \
  "$ROOT/cc/cuda/masked_mae_kernels.cu.cc"
spawn selftest.o "${emu_include[@]}" -x c++ -include "$ROOT/tests/cuda_emu/shim.h" \
  "$ROOT/tests/cuda_emu/emu_selftest.cc"
spawn launch.o "${emu_include[@]}" -DFUSED_MASKED_MAE_WITH_CUDA=1 "$ROOT/cc/cuda/masked_mae_launch.cc"
spawn runtime.o "${emu_include[@]}" -DFUSED_MASKED_MAE_WITH_CUDA=1 "$ROOT/tests/cuda_emu/emu_runtime.cc"
spawn emu_test.o "${emu_include[@]}" -DFUSED_MASKED_MAE_WITH_CUDA=1 "$ROOT/tests/cuda_emu/emu_test.cc"
objs=("$OUT"/kernels.o "$OUT"/launch.o "$OUT"/runtime.o "$OUT"/emu_test.o)
for src in "$ROOT"/cc/cpu/masked_mae_cpu*.cc; do
  obj="cpu_$(basename "${src%.cc}").o"
  spawn "$obj" "$src"
  objs+=("$OUT/$obj")
done
for pid in "${pids[@]}"; do wait "$pid"; done
"$CXX" "${flags[@]}" -rdynamic -o "$binary" "${objs[@]}" -ldl -lpthread
"$CXX" "${flags[@]}" -rdynamic -o "$OUT/emu_selftest" "$OUT/selftest.o" "$OUT/runtime.o" -ldl -lpthread
echo "$stamp" >"$OUT/stamp"
echo "$binary"
