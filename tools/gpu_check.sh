#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and no TensorFlow (the lent GPU
# machine: nvcc, CuPy, PyTorch, pybind11, pytest). One prepared run under one
# overall deadline (GPU_CHECK_DEADLINE seconds, default 520, at most 539: a
# device command may run 600 s, with start-up and transfers besides) that
# writes one JSON report, rewritten after every step so that a run cut short
# still leaves what it did.
#
#   tools/gpu_check.sh [--bench] [--report FILE]
#
# Steps (each recorded in the report as passed / failed / timed_out / skipped,
# with its time; a step gets at most its own limit and what is left before the
# deadline, and is skipped when too little is left):
#   gpu        nvidia-smi: name, driver, compute capability, memory
#   core       the pybind11 core with the CUDA kernels: the one build.sh made
#              (carried here: the clang-built ABI 7 cubins, the shipped route)
#              when it imports with CUDA, else built here (tools/build_device_code.sh
#              with DEVICE_COMPILER=nvcc for this GPU, host side with g++)
#   tests      tests/test_gpu_core.py and tests/test_core_cpu.py
#   memcheck, racecheck, synccheck, initcheck
#              compute-sanitizer on a reduced set of the GPU tests, with the
#              caching allocators off (PYTORCH_NO_CUDA_MEMORY_CACHING=1, CuPy's
#              pool off) so that overruns reach the sanitizer; a sanitizer that
#              cannot attach (not installed, no injection) is "skipped", not failed
#   bench      (--bench) benchmarks/bench_gpu.py, device time only; its rows go
#              into the report
# Report: --report FILE, else $OUT/gpu_check.json when OUT is set, else
# build/gpu_check/report.json. Exit status: non-zero when any step failed or
# timed out.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
BENCH=0
REPORT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bench) BENCH=1 ;;
    --report) REPORT="$2"; shift ;;
    *) echo "usage: $0 [--bench] [--report FILE]" >&2; exit 2 ;;
  esac
  shift
done
BUILD="$ROOT/build/gpu_check"
mkdir -p "$BUILD"
REPORT="${REPORT:-${OUT:+$OUT/gpu_check.json}}"
REPORT="${REPORT:-$BUILD/report.json}"
STEPS="$BUILD/steps.jsonl"
: >"$STEPS"
export PYTHONPATH="$ROOT/python:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"
failed=0

DEADLINE="${GPU_CHECK_DEADLINE:-520}"
if ! [[ "$DEADLINE" =~ ^[0-9]+$ ]] || ((DEADLINE > 539)); then
  echo "GPU_CHECK_DEADLINE must be a whole number of seconds below 540, got '$DEADLINE'" >&2
  exit 2
fi
T0=$(date +%s)
GPU_INFO=""
REPORT_BENCH="$BUILD/bench.json"
rm -f "$REPORT_BENCH"

# Seconds left before the deadline.
left() { echo $((DEADLINE - ($(date +%s) - T0))); }

# The report, from the steps so far (called after every step).
write_report() {
  "$PY" - "$STEPS" "$REPORT" "$GPU_INFO" "$REPORT_BENCH" "$DEADLINE" "$(($(date +%s) - T0))" "$1" <<'PYEOF'
import json, os, sys
steps = [json.loads(line) for line in open(sys.argv[1])]
report = {"gpu": sys.argv[3], "deadline_s": int(sys.argv[5]), "elapsed_s": int(sys.argv[6]),
          "finished": sys.argv[7] == "final", "steps": steps,
          "passed": all(s["status"] not in ("failed", "timed_out") for s in steps)}
if os.path.exists(sys.argv[4]):
    report["bench"] = json.load(open(sys.argv[4]))
os.makedirs(os.path.dirname(os.path.abspath(sys.argv[2])), exist_ok=True)
tmp = sys.argv[2] + ".tmp"
with open(tmp, "w") as f:
    json.dump(report, f, indent=1)
os.replace(tmp, sys.argv[2])
PYEOF
}

# record NAME STATUS SECONDS DETAIL
record() {
  "$PY" -c 'import json, sys
print(json.dumps({"step": sys.argv[1], "status": sys.argv[2], "seconds": float(sys.argv[3]),
                  "detail": sys.argv[4][-4000:]}))' "$1" "$2" "$3" "$4" >>"$STEPS"
  [[ "$2" == failed || "$2" == timed_out ]] && failed=1
  echo "== $1: $2 (${3}s)"
  write_report partial
}

# budget LIMIT: the seconds a step may take (its limit, or what is left before
# the deadline less a margin for the report); empty when under 10.
budget() {
  local b=$(($(left) - 8))
  ((b > $1)) && b=$1
  ((b >= 10)) && echo "$b"
}

# timed NAME LIMIT LOG CMD...: runs CMD under the step budget; returns its
# status, 124 when it ran out of time, 125 when it did not start (no time left).
timed() {
  local name="$1" limit="$2" log="$3" b
  shift 3
  b="$(budget "$limit")" || b=""
  if [[ -z "$b" ]]; then
    record "$name" skipped 0 "not started: $(left)s left before the ${DEADLINE}s deadline"
    return 125
  fi
  timeout -k 5 "$b" "$@" >"$log" 2>&1
  local status=$?
  [[ $status == 137 ]] && status=124
  return $status
}

# run NAME LIMIT CMD...: runs CMD with a time limit, records passed/failed/timed_out.
run() {
  local name="$1" limit="$2" start log="$BUILD/$1.log" status
  shift 2
  start=$(date +%s)
  timed "$name" "$limit" "$log" "$@"
  status=$?
  [[ $status == 125 ]] && return $status
  tail -n 5 "$log"
  if [[ $status == 0 ]]; then
    record "$name" passed $(($(date +%s) - start)) "$(tail -n 3 "$log")"
  elif [[ $status == 124 ]]; then
    record "$name" timed_out $(($(date +%s) - start)) "stopped after its time limit: $(tail -n 20 "$log")"
  else
    record "$name" failed $(($(date +%s) - start)) "exit $status: $(tail -n 40 "$log")"
  fi
  return $status
}

# --- gpu ---
GPU_INFO="$(timeout 30 nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader 2>&1 | head -1)"
echo "GPU: $GPU_INFO"
if ! command -v nvidia-smi >/dev/null || [[ -z "$GPU_INFO" || "$GPU_INFO" == *"failed"* ]]; then
  record gpu failed 0 "no GPU: $GPU_INFO"
else
  record gpu passed 0 "$GPU_INFO"
fi
ARCH="$(timeout 30 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')"

# --- core ---
core_has_cuda() {
  "$PY" -c 'from fused_masked_mae import _core; assert _core.WITH_CUDA
print(_core.__file__, _core.cuda_driver())' 2>&1
}
start=$(date +%s)
if info="$(core_has_cuda)"; then
  record core passed $(($(date +%s) - start)) "prebuilt (build.sh, clang + CUDA 12 ptxas): $info"
else
  echo "== no prebuilt CUDA _core ($info): building one for sm_$ARCH with nvcc"
  NVCC="${NVCC:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}"
  command -v "$NVCC" >/dev/null || NVCC="$(command -v nvcc)"
  CUDA_HOME="$(cd "$(dirname "$NVCC")/.." && pwd)"
  EXT="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
  objs=("$BUILD/device_code.o")
  if core_budget="$(budget 200)" && DEVICE_COMPILER=nvcc NVCC="$NVCC" CUDA_ARCHS="$ARCH" \
    CUDA_PTX_ARCH="" timeout -k 5 "$core_budget" \
    tools/build_device_code.sh "$BUILD/device_code.o" cc/cuda/masked_mae_kernels.cu.cc \
    >"$BUILD/core.log" 2>&1; then
    ok=1
    # Host side as build.sh: the CUDA launchers, the driver loader, the core and
    # the CPU launchers (dispatcher + instruction-set variants, no FMA contraction).
    for src in cc/cuda/masked_mae_launch.cc cc/cuda/cuda_driver.cc cc/core/core_module.cc \
      cc/cpu/masked_mae_cpu.cc cc/cpu/masked_mae_cpu_baseline.cc \
      cc/cpu/masked_mae_cpu_avx2.cc cc/cpu/masked_mae_cpu_avx512.cc; do
      obj="$BUILD/$(basename "${src%.cc}").o"
      g++ -O3 -fPIC -std=c++17 -ffp-contract=off -fvisibility=hidden -DNDEBUG -I"$ROOT" -I"$CUDA_HOME/include" \
        $("$PY" -m pybind11 --includes) -DFUSED_MASKED_MAE_WITH_CUDA=1 -c "$src" -o "$obj" \
        >>"$BUILD/core.log" 2>&1 || ok=0
      objs+=("$obj")
    done
    rm -f python/fused_masked_mae/_core.*.so
    [[ $ok == 1 ]] && g++ -shared -o "python/fused_masked_mae/_core$EXT" "${objs[@]}" -ldl \
      >>"$BUILD/core.log" 2>&1 || ok=0
  else
    ok=0
  fi
  if [[ $ok == 1 ]] && info="$(core_has_cuda)"; then
    record core passed $(($(date +%s) - start)) "built here with $("$NVCC" --version | tail -1) for sm_$ARCH: $info"
  else
    record core failed $(($(date +%s) - start)) "$(tail -n 40 "$BUILD/core.log") $info"
  fi
fi

# --- tests ---
run tests 300 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu_core.py tests/test_core_cpu.py

# --- sanitizers ---
# They slow kernels ~100x: mid-size class counts still cover every row mapping
# (lane groups and whole blocks), aligned and unaligned.
SANITIZED=(-k "not 131072 and not 32000 and not grid_cap")
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
for tool in memcheck racecheck synccheck initcheck; do
  if [[ ! -x "$SANITIZER" ]]; then
    record "$tool" skipped 0 "compute-sanitizer not found"
    continue
  fi
  start=$(date +%s)
  log="$BUILD/$tool.log"
  extra=()
  [[ $tool == memcheck ]] && extra=(--leak-check no)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 FUSED_MASKED_MAE_CUPY_POOL=off \
    timed "$tool" 150 "$log" "$SANITIZER" --tool "$tool" "${extra[@]}" --error-exitcode 99 \
    "$PY" -m pytest -q -x -p no:cacheprovider tests/test_gpu_core.py "${SANITIZED[@]}"
  status=$?
  [[ $status == 125 ]] && continue
  seconds=$(($(date +%s) - start))
  if [[ $status == 124 ]]; then
    record "$tool" timed_out "$seconds" "stopped after its time limit: $(tail -n 20 "$log")"
  elif grep -qiE "unable to (attach|find injection)|failed to (attach|launch|initialize)|injection library|not supported on this (device|platform)|No attachable" "$log" &&
    ! grep -q "ERROR SUMMARY: [1-9]" "$log"; then
    record "$tool" skipped "$seconds" "sanitizer could not attach: $(grep -iE -m3 'attach|injection|supported' "$log")"
  elif [[ $status == 0 ]]; then
    record "$tool" passed "$seconds" "$(grep -m1 'SUMMARY' "$log") $(tail -n 1 "$log")"
  else
    record "$tool" failed "$seconds" "exit $status: $(grep -m20 -E '=========|FAILED|Error' "$log")"
  fi
done

# --- bench ---
if [[ $BENCH == 1 ]]; then
  run bench 240 "$PY" benchmarks/bench_gpu.py --json "$REPORT_BENCH"
fi

write_report final
echo "report: $REPORT ($(($(date +%s) - T0))s of the ${DEADLINE}s deadline)"
echo "== gpu_check: $([[ $failed == 0 ]] && echo PASSED || echo FAILED)"
exit $failed
