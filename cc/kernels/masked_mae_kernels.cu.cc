// CUDA kernels for the fused masked MAE loss and its gradient.
//
// Device code only: tools/build_device_code.sh compiles it with clang
// (--cuda-device-only) into one cubin per architecture plus PTX, which are
// embedded in the host libraries and loaded through the CUDA driver API
// (cuda_driver.cc); the host launchers that pick the kernel and its launch
// shape are plain C++ (masked_mae_launch.cc). Every kernel is an
// `extern "C"` wrapper with the name masked_mae_kernel_abi.h spells, taking
// the KernelParams block declared there. No TensorFlow and no CUDA runtime
// API: the same images serve the TensorFlow GPU kernels and the pybind11 core.
// The math is masked_mae_row.h's; this file only maps rows onto threads:
//   - small rows: a group of 1..32 lanes of a warp per row, several rows per block;
//   - large rows: a whole block (64..512 threads) per row.
// Within a row, element i belongs to 16-byte chunk i / kVec, and lane l visits
// chunks l, l + group, ... in increasing order. That assignment depends only on
// num_classes, never on addresses (alignment only decides whether a chunk is
// read with one 16-byte load or element by element), and the reductions use a
// fixed butterfly/tree order with no atomics: results are bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cc/kernels/masked_mae_kernel_abi.h"

namespace fused_masked_mae {

template <>
struct ElementKindOf<__half> {
  static constexpr ElementKind value = ElementKind::kFloat16;
};
template <>
struct ElementKindOf<__nv_bfloat16> {
  static constexpr ElementKind value = ElementKind::kBFloat16;
};

namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxRowBlockThreads = 512;  // largest block (masked_mae_launch.cc picks the shape)

// Where a kernel reads its targets: dense rows of T, or one class id per row.
template <typename T>
struct DenseTargets {
  const T* values;
  __device__ DenseTargetRow<T> Row(int64_t row, int64_t num_classes) const {
    return {values + row * num_classes};
  }
};

template <typename Id>
struct SparseTargets {
  const Id* values;  // class ids
  __device__ SparseTargetRow Row(int64_t row, int64_t) const {
    return {static_cast<int64_t>(values[row])};
  }
};

// KernelParams with its pointers typed.
template <typename T, typename Targets>
struct TypedParams {
  Targets y_true;
  const T* y_pred;
  const T* grad_loss;  // gradient kernel only
  T* out;              // loss [rows] or grad_y_pred [rows, num_classes]
  int64_t rows;
  int64_t num_classes;
  const MaskedTokenSet& tokens;

  __device__ explicit TypedParams(const KernelParams& p)
      : y_true{static_cast<decltype(Targets::values)>(p.y_true)},
        y_pred(static_cast<const T*>(p.y_pred)),
        grad_loss(static_cast<const T*>(p.grad_loss)),
        out(static_cast<T*>(p.out)),
        rows(p.rows),
        num_classes(p.num_classes),
        tokens(p.tokens) {}
};

template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
};

__device__ __forceinline__ bool Aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

// One 16-byte chunk of T, loaded/stored as a single uint4.
template <typename T>
union Chunk {
  uint4 raw;
  T values[Vec<T>::kSize];
  __device__ Chunk() {}
};

// 16-byte loads need every row pointer they read or write aligned.
template <typename T>
__device__ __forceinline__ bool TargetAligned(const DenseTargetRow<T>& row) {
  return Aligned16(row.values);
}
__device__ __forceinline__ bool TargetAligned(const SparseTargetRow&) { return true; }

// The targets of one full chunk, as Acc.
template <typename T, typename Acc>
__device__ __forceinline__ void LoadTargetChunk(const DenseTargetRow<T>& row, int64_t first,
                                                Acc (&out)[Vec<T>::kSize]) {
  Chunk<T> chunk;
  chunk.raw = __ldg(reinterpret_cast<const uint4*>(row.values + first));
#pragma unroll
  for (int k = 0; k < Vec<T>::kSize; ++k) out[k] = static_cast<Acc>(chunk.values[k]);
}
template <typename T, typename Acc>
__device__ __forceinline__ void LoadTargetChunk(const SparseTargetRow& row, int64_t first,
                                                Acc (&out)[Vec<T>::kSize]) {
#pragma unroll
  for (int k = 0; k < Vec<T>::kSize; ++k) out[k] = row.At<Acc>(first + k);
}

// The CUDA kernels treat an id outside [0, C) as NaN (host code rejects it
// before launching; this only keeps a bad id from reading anything).
template <typename T>
__device__ __forceinline__ bool TargetValid(const DenseTargetRow<T>&, int64_t) { return true; }
__device__ __forceinline__ bool TargetValid(const SparseTargetRow& row, int64_t num_classes) {
  return row.id >= 0 && row.id < num_classes;
}

// Visits this lane's chunks in increasing order: a full chunk of an aligned
// row as one 16-byte access (vector_chunk(first)), anything else element by
// element (element(i)). Which elements a lane sees never depends on alignment.
template <int kVec, typename VectorChunk, typename Element>
__device__ __forceinline__ void ForEachLaneChunk(int64_t num_classes, bool vector_ok, int lane,
                                                 int group, const VectorChunk& vector_chunk,
                                                 const Element& element) {
  const int64_t chunks = (num_classes + kVec - 1) / kVec;
  for (int64_t c = lane; c < chunks; c += group) {
    const int64_t first = c * kVec;
    if (vector_ok && first + kVec <= num_classes) {
      vector_chunk(first);
    } else {
      const int64_t last = first + kVec < num_classes ? first + kVec : num_classes;
      for (int64_t i = first; i < last; ++i) element(i);
    }
  }
}

template <typename T, typename TargetRow, typename Acc>
__device__ __forceinline__ RowPartial<Acc> ScanLaneChunks(const TargetRow& t, const T* p,
                                                          int64_t num_classes, bool vector_ok,
                                                          int lane, int group, Acc lowest) {
  constexpr int kVec = Vec<T>::kSize;
  RowPartial<Acc> part = RowPartial<Acc>::Empty(lowest);
  ForEachLaneChunk<kVec>(
      num_classes, vector_ok, lane, group,
      [&](int64_t first) {
        Acc tv[kVec];
        LoadTargetChunk<T>(t, first, tv);
        Chunk<T> pc;
        pc.raw = __ldg(reinterpret_cast<const uint4*>(p + first));
#pragma unroll
        for (int k = 0; k < kVec; ++k) part.Observe(tv[k], static_cast<Acc>(pc.values[k]), first + k);
      },
      [&](int64_t i) { part.Observe(t.template At<Acc>(i), static_cast<Acc>(p[i]), i); });
  return part;
}

template <typename Acc>
__device__ __forceinline__ RowPartial<Acc> ShuffleXor(const RowPartial<Acc>& a, int mask,
                                                      int width) {
  RowPartial<Acc> b;
  b.target.value = __shfl_xor_sync(kFullMask, a.target.value, mask, width);
  b.target.index = static_cast<int64_t>(
      __shfl_xor_sync(kFullMask, static_cast<long long>(a.target.index), mask, width));
  b.prediction.value = __shfl_xor_sync(kFullMask, a.prediction.value, mask, width);
  b.prediction.index = static_cast<int64_t>(
      __shfl_xor_sync(kFullMask, static_cast<long long>(a.prediction.index), mask, width));
  b.abs_diff_sum = __shfl_xor_sync(kFullMask, a.abs_diff_sum, mask, width);
  return b;
}

// Butterfly over `width` lanes (a power of two <= 32). Every lane ends with the
// same result: Combine is commutative for argmax, and a + b == b + a in IEEE.
template <typename Acc>
__device__ __forceinline__ RowPartial<Acc> WarpReduce(RowPartial<Acc> part, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    part = RowPartial<Acc>::Combine(part, ShuffleXor(part, offset, width));
  }
  return part;
}

// Whole-block reduction for a block-per-row launch; all threads get the result.
template <typename Acc>
__device__ __forceinline__ RowPartial<Acc> BlockReduce(RowPartial<Acc> part, Acc lowest) {
  __shared__ RowPartial<Acc> warp_parts[kMaxRowBlockThreads / kWarpSize];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  part = WarpReduce(part, kWarpSize);
  if (lane == 0) warp_parts[warp] = part;
  __syncthreads();
  if (warp == 0) {
    part = lane < num_warps ? warp_parts[lane] : RowPartial<Acc>::Empty(lowest);
    part = WarpReduce(part, kWarpSize);
    if (lane == 0) warp_parts[0] = part;
  }
  __syncthreads();
  part = warp_parts[0];
  __syncthreads();  // warp_parts is reused by the next row
  return part;
}

template <typename T, typename TargetRow, typename Acc>
__device__ __forceinline__ void WriteLaneGradient(const TargetRow& t, const T* p, T* grad,
                                                  int64_t num_classes, bool vector_ok,
                                                  int lane, int group, Acc scale) {
  constexpr int kVec = Vec<T>::kSize;
  ForEachLaneChunk<kVec>(
      num_classes, vector_ok, lane, group,
      [&](int64_t first) {
        Acc tv[kVec];
        LoadTargetChunk<T>(t, first, tv);
        Chunk<T> pc, gc;
        pc.raw = __ldg(reinterpret_cast<const uint4*>(p + first));
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          gc.values[k] = ElementGradient<T>(scale, tv[k], static_cast<Acc>(pc.values[k]));
        }
        *reinterpret_cast<uint4*>(grad + first) = gc.raw;
      },
      [&](int64_t i) {
        grad[i] = ElementGradient<T>(scale, t.template At<Acc>(i), static_cast<Acc>(p[i]));
      });
}

// kGroup: lanes per row (1..32), or 0 for one whole block per row.
template <typename T, typename Targets, int kGroup, bool kGradient>
__device__ __forceinline__ void MaskedMaeRows(const KernelParams& raw_params) {
  const TypedParams<T, Targets> params(raw_params);
  using Acc = typename AccumulatorOf<T>::type;
  const Acc lowest = LowestFinite<Acc>(ElementKindOf<T>::value);
  const int group = kGroup > 0 ? kGroup : static_cast<int>(blockDim.x);
  const int lane = threadIdx.x % group;
  const int64_t rows_per_block = blockDim.x / group;
  const int64_t num_classes = params.num_classes;

  // The loop bound is uniform over the block, so every lane reaches the
  // shuffles and barriers; lanes past the last row just carry empty states.
  for (int64_t first_row = blockIdx.x * rows_per_block; first_row < params.rows;
       first_row += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = first_row + threadIdx.x / group;
    const bool in_range = row < params.rows;
    const int64_t safe_row = in_range ? row : 0;
    const int64_t offset = safe_row * num_classes;
    const auto t = params.y_true.Row(safe_row, num_classes);
    const bool valid = in_range && TargetValid(t, num_classes);
    const T* p = params.y_pred + offset;
    bool vector_ok = TargetAligned(t) && Aligned16(p);
    if (kGradient) vector_ok = vector_ok && Aligned16(params.out + offset);

    RowPartial<Acc> part = valid
                               ? ScanLaneChunks(t, p, num_classes, vector_ok, lane, group, lowest)
                               : RowPartial<Acc>::Empty(lowest);
    part = kGroup > 0 ? WarpReduce(part, kGroup) : BlockReduce(part, lowest);
    if (!in_range) continue;

    const Acc nan = Acc(NAN);
    if (!kGradient) {
      if (lane == 0) {
        params.out[row] = static_cast<T>(valid ? RowLoss(part, params.tokens, num_classes) : nan);
      }
    } else if (valid) {
      const Acc scale =
          RowGradientScale(params.grad_loss[row], KeepFactor(part, params.tokens), num_classes);
      WriteLaneGradient(t, p, params.out + offset, num_classes, vector_ok, lane, group, scale);
    } else {
      for (int64_t i = lane; i < num_classes; i += group) params.out[offset + i] = static_cast<T>(nan);
    }
  }
}

}  // namespace

// The extern "C" kernels, one per (direction, dtype, targets, lanes per row),
// named as masked_mae_kernel_abi.h's KernelName spells them.
#define MMAE_KERNEL(DIR, GRADIENT, TNAME, T, TARGETNAME, TARGETS, G)                      \
  extern "C" __global__ void __launch_bounds__(kMaxRowBlockThreads)                      \
      fused_masked_mae_##DIR##_##TNAME##_##TARGETNAME##_g##G(const KernelParams params) { \
    MaskedMaeRows<T, TARGETS, G, GRADIENT>(params);                                      \
  }
#define MMAE_GROUPS(DIR, GRADIENT, TNAME, T, TARGETNAME, TARGETS) \
  MMAE_KERNEL(DIR, GRADIENT, TNAME, T, TARGETNAME, TARGETS, 1)    \
  MMAE_KERNEL(DIR, GRADIENT, TNAME, T, TARGETNAME, TARGETS, 2)    \
  MMAE_KERNEL(DIR, GRADIENT, TNAME, T, TARGETNAME, TARGETS, 4)    \
  MMAE_KERNEL(DIR, GRADIENT, TNAME, T, TARGETNAME, TARGETS, 8)    \
  MMAE_KERNEL(DIR, GRADIENT, TNAME, T, TARGETNAME, TARGETS, 16)   \
  MMAE_KERNEL(DIR, GRADIENT, TNAME, T, TARGETNAME, TARGETS, 32)   \
  MMAE_KERNEL(DIR, GRADIENT, TNAME, T, TARGETNAME, TARGETS, 0)
#define MMAE_TARGETS(DIR, GRADIENT, TNAME, T)                                \
  MMAE_GROUPS(DIR, GRADIENT, TNAME, T, dense, DenseTargets<T>)               \
  MMAE_GROUPS(DIR, GRADIENT, TNAME, T, i32, SparseTargets<int32_t>)          \
  MMAE_GROUPS(DIR, GRADIENT, TNAME, T, i64, SparseTargets<int64_t>)
#define MMAE_DTYPES(DIR, GRADIENT)                   \
  MMAE_TARGETS(DIR, GRADIENT, f16, __half)           \
  MMAE_TARGETS(DIR, GRADIENT, bf16, __nv_bfloat16)   \
  MMAE_TARGETS(DIR, GRADIENT, f32, float)            \
  MMAE_TARGETS(DIR, GRADIENT, f64, double)
MMAE_DTYPES(fwd, false)
MMAE_DTYPES(grad, true)
#undef MMAE_DTYPES
#undef MMAE_TARGETS
#undef MMAE_GROUPS
#undef MMAE_KERNEL

}  // namespace fused_masked_mae
