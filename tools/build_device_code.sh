#!/usr/bin/env bash
# Compiles the CUDA kernels (device code only) and embeds them in one host
# object file, for cc/cuda/cuda_driver.cc to load with the driver API.
#
#   tools/build_device_code.sh OUT.o SOURCE.cu.cc [INCLUDE_DIR]
#
# Default route (build.sh, CI, wheels): clang compiles SOURCE device-only
# against a CUDA 12 toolkit folder assembled from the pip wheels (build.sh
# makes it), and CUDA 12's ptxas assembles it: one cubin per architecture in
# CUDA_ARCHS (ELF ABI 7, loadable by r525+ drivers) plus PTX ISA 8.0 for
# CUDA_PTX_ARCH, which newer GPUs JIT-compile. Architectures clang-19 cannot
# target (sm_100, sm_120: "unsupported CUDA gpu architecture") get cubins that
# ptxas assembles from that PTX (CUDA_PTXAS_ARCHS; ptxas 12.9 writes ELF ABI 8
# for them, the format of every sm_100+ cubin; those GPUs need r570+ anyway),
# so that their first use does not JIT-compile the PTX. No nvcc, no CUDA runtime.
#   CUDA_CLANG   clang++ with CUDA support (default clang++-19)
#   CUDA_PATH    CUDA 12 folder with include/, bin/ptxas, nvvm/libdevice (required)
#   CUDA_ARCHS   default "60 61 70 75 80 86 89 90";  CUDA_PTX_ARCH default 90 ("" = none)
#   CUDA_PTXAS_ARCHS  default "100 120" (needs CUDA_PTX_ARCH)
# DEVICE_COMPILER=nvcc instead uses NVCC (default nvcc) for CUDA_ARCHS and
# CUDA_PTX_ARCH: for a GPU machine that has nvcc and no clang (tools/gpu_check.sh);
# its images need the driver that nvcc's CUDA version needs.
#   CXX          assembles the embedding (default g++);  JOBS parallel compiles
set -euo pipefail
OUT="$1"
SRC="$2"
INCLUDE="${3:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
ARCHS="${CUDA_ARCHS:-60 61 70 75 80 86 89 90}"
PTX_ARCH="${CUDA_PTX_ARCH-90}"
PTXAS_ARCHS="${CUDA_PTXAS_ARCHS-100 120}"
[[ -n "$PTX_ARCH" ]] || PTXAS_ARCHS=""
JOBS="${JOBS:-$(nproc)}"
DIR="$OUT.d"
rm -rf "$DIR"
mkdir -p "$DIR"

if [[ "${DEVICE_COMPILER:-clang}" == nvcc ]]; then
  device_compile() {  # ARCH OUTPUT KIND(cubin|ptx)
    "${NVCC:-nvcc}" -x cu -std=c++17 -O3 -I"$INCLUDE" --"$3" -arch="sm_$1" "$SRC" -o "$2"
  }
else
  : "${CUDA_PATH:?CUDA_PATH must name the CUDA 12 folder (see build.sh)}"
  device_compile() {
    local kind=-c
    [[ "$3" == ptx ]] && kind=-S
    "${CUDA_CLANG:-clang++-19}" -x cuda -std=c++17 -O3 --cuda-path="$CUDA_PATH" \
      -Wno-unknown-cuda-version --cuda-feature=+ptx80 --cuda-device-only \
      --cuda-gpu-arch="sm_$1" -I"$INCLUDE" "$kind" "$SRC" -o "$2"
  }
fi

pids=()
images=()
for arch in $ARCHS; do
  images+=("$arch 0 $DIR/sm_$arch.cubin")
done
[[ -n "$PTX_ARCH" ]] && images+=("$PTX_ARCH 1 $DIR/compute_$PTX_ARCH.ptx")
for entry in "${images[@]}"; do
  read -r arch is_ptx file <<<"$entry"
  device_compile "$arch" "$file" "$([[ $is_ptx == 1 ]] && echo ptx || echo cubin)" &
  pids+=($!)
  if [[ ${#pids[@]} -ge $JOBS ]]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for pid in "${pids[@]}"; do wait "$pid"; done
# Cubins assembled from the PTX by ptxas (the CUDA 12 toolkit's; nvcc's own
# toolchain under DEVICE_COMPILER=nvcc).
if [[ "${DEVICE_COMPILER:-clang}" == nvcc ]]; then
  ptxas="$(dirname "$(command -v "${NVCC:-nvcc}")")/ptxas"
else
  ptxas="$CUDA_PATH/bin/ptxas"
fi
pids=()
for arch in $PTXAS_ARCHS; do
  "$ptxas" -O3 -arch="sm_$arch" "$DIR/compute_$PTX_ARCH.ptx" -o "$DIR/sm_$arch.cubin" &
  pids+=($!)
  images+=("$arch 0 $DIR/sm_$arch.cubin")
done
for pid in "${pids[@]}"; do wait "$pid"; done

# The images as read-only data, and the table cuda_driver.cc reads:
# {sm, is_ptx, data, size} per image, then a zero entry. Each image is
# followed by a NUL, which PTX needs and cubins ignore.
{
  echo '  .section .rodata.fused_masked_mae_device_code,"a",@progbits'
  n=0
  for entry in "${images[@]}"; do
    read -r arch is_ptx file <<<"$entry"
    echo "  .balign 128"
    echo ".Limage$n:"
    echo "  .incbin \"$(cd "$(dirname "$file")" && pwd)/$(basename "$file")\""
    echo ".Limage${n}_end:"
    echo "  .byte 0"
    n=$((n + 1))
  done
  echo '  .section .data.rel.ro.fused_masked_mae_device_images,"aw",@progbits'
  echo '  .balign 8'
  echo '  .globl fused_masked_mae_device_images'
  echo '  .hidden fused_masked_mae_device_images'
  echo 'fused_masked_mae_device_images:'
  n=0
  for entry in "${images[@]}"; do
    read -r arch is_ptx file <<<"$entry"
    echo "  .quad $arch, $is_ptx, .Limage$n, .Limage${n}_end - .Limage$n"
    n=$((n + 1))
  done
  echo '  .quad 0, 0, 0, 0'
  echo '  .section .note.GNU-stack,"",@progbits'
} >"$DIR/images.S"
"${CXX:-g++}" -c "$DIR/images.S" -o "$OUT"
