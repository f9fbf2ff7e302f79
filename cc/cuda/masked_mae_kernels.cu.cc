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
// The math is masked_mae_row.h's; this file only maps work onto threads.
// The forward (loss and keep byte per row) maps rows:
//   - small rows: a group of 1..32 lanes of a warp per row, several rows per block;
//   - large rows: a whole block (64..512 threads) per row.
// The gradient is a flat element-wise stream (GradientStream): no reduction.
// Within a row, element i belongs to 16-byte chunk i / kVec, and lane l visits
// chunks l, l + group, ... in increasing order. That assignment depends only on
// num_classes, never on addresses (alignment only decides whether a chunk is
// read with one 16-byte load or element by element), and the reductions use a
// fixed butterfly/tree order with no atomics: results are bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cc/cuda/masked_mae_kernel_abi.h"

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
constexpr int kMaxRowBlockThreads = 512;    // largest forward block (masked_mae_launch.cc picks the shape)
constexpr int kGradientBlockThreads = 256;  // the gradient's block (masked_mae_launch.cc)

// Denormals: TensorFlow's CPU semantics (FlushDenormal in masked_mae_row.h),
// applied explicitly here, wherever this file is compiled (the GPU has no
// flush mode for float64, and the host emulator runs it as plain C++): the
// row math flushes every loaded value and every result that can be denormal,
// so the kernels give the CPU launchers' bits, which run the same math with
// the CPU's flush mode set.
using KernelDenormals = ExplicitDenormals;

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
  uint8_t* row_keep;   // forward: written when not null; gradient: read
  int64_t rows;
  int64_t num_classes;
  const MaskedTokenSet& tokens;

  __device__ explicit TypedParams(const KernelParams& p)
      : y_true{static_cast<decltype(Targets::values)>(p.y_true)},
        y_pred(static_cast<const T*>(p.y_pred)),
        grad_loss(static_cast<const T*>(p.grad_loss)),
        out(static_cast<T*>(p.out)),
        row_keep(p.row_keep),
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
        for (int k = 0; k < kVec; ++k) {
          part.template Observe<KernelDenormals>(tv[k], static_cast<Acc>(pc.values[k]), first + k);
        }
      },
      [&](int64_t i) {
        part.template Observe<KernelDenormals>(t.template At<Acc>(i), static_cast<Acc>(p[i]), i);
      });
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

// The forward: loss and keep byte per row. kGroup: lanes per row (1..32), or
// 0 for one whole block per row.
template <typename T, typename Targets, int kGroup>
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
    const bool vector_ok = TargetAligned(t) && Aligned16(p);
    const Acc nan = Acc(NAN);
    RowPartial<Acc> part = valid
                               ? ScanLaneChunks(t, p, num_classes, vector_ok, lane, group, lowest)
                               : RowPartial<Acc>::Empty(lowest);
    part = kGroup > 0 ? WarpReduce(part, kGroup) : BlockReduce(part, lowest);
    if (!in_range || lane != 0) continue;
    const Acc keep = KeepFactor(part, params.tokens);
    params.out[row] = static_cast<T>(
        valid ? MaskedMean<KernelDenormals>(keep, part.abs_diff_sum, num_classes) : nan);
    if (params.row_keep != nullptr) params.row_keep[row] = KeepByte(keep);
  }
}

// The gradient, d loss / d y_pred, as one flat element-wise stream over the
// rows * num_classes elements: no reduction and no argmax (the forward saved
// each row's keep byte), each input read once. A thread takes 16-byte chunks
// of the flat arrays (grid-stride), finds the first element's row with one
// division and steps over row boundaries inside the chunk, so rows of any
// length and alignment get 16-byte accesses as long as y_pred, the gradient
// and (dense) y_true share their alignment; the peel before the first
// aligned chunk and the tail go element by element. Every element gets
// ElementGradient(row factor, t, p) as before: the same bits.
template <typename T, typename Targets>
__device__ __forceinline__ void GradientStream(const KernelParams& raw_params) {
  const TypedParams<T, Targets> params(raw_params);
  using Acc = typename AccumulatorOf<T>::type;
  constexpr int kVec = Vec<T>::kSize;
  constexpr bool kDense = std::is_same_v<Targets, DenseTargets<T>>;
  const int64_t num_classes = params.num_classes;
  const int64_t total = params.rows * num_classes;
  const T* p = params.y_pred;
  T* grad = params.out;
  // The row factor, NaN for a sparse row whose id is outside [0, C).
  const auto row_scale = [&](int64_t row) {
    const auto t = params.y_true.Row(row, num_classes);
    return TargetValid(t, num_classes)
               ? RowGradientScale<KernelDenormals>(
                     params.grad_loss[row], KeepFromByte<Acc>(params.row_keep[row]), num_classes)
               : Acc(NAN);
  };
  const auto row_id = [&](int64_t row) -> int64_t {
    if constexpr (kDense) {
      return -1;
    } else {
      return static_cast<int64_t>(params.y_true.values[row]);
    }
  };
  const auto target = [&](int64_t i, int64_t col, int64_t id) {
    if constexpr (kDense) {
      return static_cast<Acc>(params.y_true.values[i]);
    } else {
      return col == id ? Acc(1) : Acc(0);
    }
  };

  const uintptr_t misalign = reinterpret_cast<uintptr_t>(p) & 15u;
  bool vector_ok = (reinterpret_cast<uintptr_t>(grad) & 15u) == misalign &&
                   misalign % sizeof(T) == 0;
  if constexpr (kDense) {
    vector_ok = vector_ok && (reinterpret_cast<uintptr_t>(params.y_true.values) & 15u) == misalign;
  }
  const int64_t peel_wanted = static_cast<int64_t>((16u - misalign) & 15u) / sizeof(T);
  const int64_t peel = vector_ok ? (peel_wanted < total ? peel_wanted : total) : total;
  const int64_t chunks = vector_ok ? (total - peel) / kVec : 0;
  const int64_t vector_end = peel + chunks * kVec;
  const int64_t scalars = peel + (total - vector_end);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first_thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  for (int64_t c = first_thread; c < chunks; c += stride) {
    const int64_t first = peel + c * kVec;
    int64_t row = first / num_classes;
    int64_t col = first - row * num_classes;
    Acc scale = row_scale(row);
    int64_t id = row_id(row);
    Chunk<T> pc, gc;
    pc.raw = __ldg(reinterpret_cast<const uint4*>(p + first));
    Acc tv[kVec];
    if constexpr (kDense) {
      LoadTargetChunk<T>(DenseTargetRow<T>{params.y_true.values}, first, tv);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (col == num_classes) {  // the chunk crosses into the next row
        ++row;
        col = 0;
        scale = row_scale(row);
        id = row_id(row);
      }
      const Acc t = kDense ? tv[k] : target(first + k, col, id);
      gc.values[k] = ElementGradient<T, KernelDenormals>(scale, t, static_cast<Acc>(pc.values[k]));
      ++col;
    }
    *reinterpret_cast<uint4*>(grad + first) = gc.raw;
  }
  for (int64_t s = first_thread; s < scalars; s += stride) {
    const int64_t i = s < peel ? s : vector_end + (s - peel);
    const int64_t row = i / num_classes;
    const int64_t col = i - row * num_classes;
    grad[i] = ElementGradient<T, KernelDenormals>(row_scale(row), target(i, col, row_id(row)),
                                                  static_cast<Acc>(p[i]));
  }
}

}  // namespace

// The extern "C" kernels, named as masked_mae_kernel_abi.h's KernelName spells
// them: forward per (dtype, targets, lanes per row), gradient per (dtype, targets).
#define MMAE_FORWARD(TNAME, T, TARGETNAME, TARGETS, G)                                  \
  extern "C" __global__ void __launch_bounds__(kMaxRowBlockThreads)                    \
      fused_masked_mae_fwd_##TNAME##_##TARGETNAME##_g##G(const KernelParams params) { \
    MaskedMaeRows<T, TARGETS, G>(params);                                              \
  }
#define MMAE_TARGET_KERNELS(TNAME, T, TARGETNAME, TARGETS)                               \
  MMAE_FORWARD(TNAME, T, TARGETNAME, TARGETS, 1)                                         \
  MMAE_FORWARD(TNAME, T, TARGETNAME, TARGETS, 2)                                         \
  MMAE_FORWARD(TNAME, T, TARGETNAME, TARGETS, 4)                                         \
  MMAE_FORWARD(TNAME, T, TARGETNAME, TARGETS, 8)                                         \
  MMAE_FORWARD(TNAME, T, TARGETNAME, TARGETS, 16)                                        \
  MMAE_FORWARD(TNAME, T, TARGETNAME, TARGETS, 32)                                        \
  MMAE_FORWARD(TNAME, T, TARGETNAME, TARGETS, 0)                                         \
  extern "C" __global__ void __launch_bounds__(kGradientBlockThreads)                   \
      fused_masked_mae_grad_##TNAME##_##TARGETNAME(const KernelParams params) {         \
    GradientStream<T, TARGETS>(params);                                                  \
  }
#define MMAE_DTYPE_KERNELS(TNAME, T)                                  \
  MMAE_TARGET_KERNELS(TNAME, T, dense, DenseTargets<T>)               \
  MMAE_TARGET_KERNELS(TNAME, T, i32, SparseTargets<int32_t>)          \
  MMAE_TARGET_KERNELS(TNAME, T, i64, SparseTargets<int64_t>)
MMAE_DTYPE_KERNELS(f16, __half)
MMAE_DTYPE_KERNELS(bf16, __nv_bfloat16)
MMAE_DTYPE_KERNELS(f32, float)
MMAE_DTYPE_KERNELS(f64, double)
#undef MMAE_DTYPE_KERNELS
#undef MMAE_TARGET_KERNELS
#undef MMAE_FORWARD

}  // namespace fused_masked_mae
