#!/usr/bin/env bash
# Prints the stamp of what the device code is built from besides its sources:
# the compilers' versions (clang, ptxas), the pinned CUDA 12 wheels
# (requirements-cuda.txt) and the architecture lists. build.sh rebuilds the
# device code when it changes (tests/test_build_stamps.py).
#
#   tools/device_code_stamp.sh CLANG PTXAS REQUIREMENTS_FILE
set -euo pipefail
{
  "$1" --version 2>&1
  "$2" --version 2>&1
  cat "$3"
  echo "archs=${CUDA_ARCHS:-} ptx=${CUDA_PTX_ARCH:-} ptxas=${CUDA_PTXAS_ARCHS:-}"
} | sha256sum | cut -d' ' -f1
