// CUDA kernels for the fused masked MAE loss and its gradient.
//
// TensorFlow-free (compiled by nvcc without TF headers) so that the same object
// serves the TensorFlow GPU kernels and the pybind11 core. The math is
// masked_mae_row.h's; this file only maps rows onto threads:
//   - small rows: a group of 1..32 lanes of a warp per row, several rows per block;
//   - large rows: a whole block (64..512 threads) per row.
// Within a row, element i belongs to 16-byte chunk i / kVec, and lane l visits
// chunks l, l + group, ... in increasing order. That assignment depends only on
// num_classes, never on addresses (alignment only decides whether a chunk is
// read with one 16-byte load or element by element), and the reductions use a
// fixed butterfly/tree order with no atomics: results are bitwise reproducible.
#include <algorithm>

#include "cc/kernels/masked_mae_cuda.h"

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
constexpr int kRowsPerWarpBlockThreads = 256;  // block size when a row fits in a warp
constexpr int kMaxRowBlockThreads = 512;       // largest block for one row
constexpr int64_t kMaxGridBlocks = 1 << 20;    // grid-stride beyond this
constexpr int kChunksPerLane = 4;              // work per lane that sizes the group

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
  const Id* ids;
  __device__ SparseTargetRow Row(int64_t row, int64_t) const {
    return {static_cast<int64_t>(ids[row])};
  }
};

template <typename T, typename Targets>
struct KernelParams {
  Targets y_true;
  const T* y_pred;
  const T* grad_loss;  // gradient kernel only
  T* out;              // loss [rows] or grad_y_pred [rows, num_classes]
  uint8_t* row_keep;   // forward: written when not null; gradient: read
  int64_t rows;
  int64_t num_classes;
  MaskedTokenSet tokens;
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
__global__ void __launch_bounds__(kMaxRowBlockThreads)
    MaskedMaeKernel(KernelParams<T, Targets> params) {
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

    const Acc nan = Acc(NAN);
    if constexpr (kGradient) {
      // One streaming pass: the forward saved the row's keep byte.
      if (valid) {
        const Acc scale = RowGradientScale(params.grad_loss[row],
                                           KeepFromByte<Acc>(params.row_keep[row]), num_classes);
        WriteLaneGradient(t, p, params.out + offset, num_classes, vector_ok, lane, group, scale);
      } else if (in_range) {
        for (int64_t i = lane; i < num_classes; i += group) {
          params.out[offset + i] = static_cast<T>(nan);
        }
      }
      continue;
    }

    RowPartial<Acc> part = valid
                               ? ScanLaneChunks(t, p, num_classes, vector_ok, lane, group, lowest)
                               : RowPartial<Acc>::Empty(lowest);
    part = kGroup > 0 ? WarpReduce(part, kGroup) : BlockReduce(part, lowest);
    if (!in_range || lane != 0) continue;
    const Acc keep = KeepFactor(part, params.tokens);
    params.out[row] = static_cast<T>(valid ? MaskedMean(keep, part.abs_diff_sum, num_classes) : nan);
    if (params.row_keep != nullptr) params.row_keep[row] = KeepByte(keep);
  }
}

int NextPowerOfTwo(int64_t n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

template <typename T, typename Targets, bool kGradient>
cudaError_t Launch(const KernelParams<T, Targets>& params, cudaStream_t stream) {
  if (params.rows == 0) return cudaSuccess;
  const int64_t chunks = (params.num_classes + Vec<T>::kSize - 1) / Vec<T>::kSize;
  const int64_t lanes_wanted = (chunks + kChunksPerLane - 1) / kChunksPerLane;
  if (lanes_wanted <= kWarpSize) {
    const int group = NextPowerOfTwo(lanes_wanted);
    const int64_t rows_per_block = kRowsPerWarpBlockThreads / group;
    const int64_t blocks =
        std::min((params.rows + rows_per_block - 1) / rows_per_block, kMaxGridBlocks);
    const dim3 grid(static_cast<unsigned>(blocks)), block(kRowsPerWarpBlockThreads);
    switch (group) {
#define MMAE_CASE(G)                                                                 \
  case G:                                                                            \
    MaskedMaeKernel<T, Targets, G, kGradient><<<grid, block, 0, stream>>>(params); \
    break;
      MMAE_CASE(1)
      MMAE_CASE(2)
      MMAE_CASE(4)
      MMAE_CASE(8)
      MMAE_CASE(16)
      default:
        MMAE_CASE(32)
#undef MMAE_CASE
    }
  } else {
    const int threads = static_cast<int>(
        std::min<int64_t>(kMaxRowBlockThreads, std::max<int64_t>(64, NextPowerOfTwo(lanes_wanted))));
    const int64_t blocks = std::min(params.rows, kMaxGridBlocks);
    MaskedMaeKernel<T, Targets, 0, kGradient>
        <<<dim3(static_cast<unsigned>(blocks)), dim3(threads), 0, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t LaunchMaskedMaeForward(const T* y_true, const T* y_pred, int64_t rows,
                                   int64_t num_classes, const MaskedTokenSet& tokens, T* loss,
                                   uint8_t* row_keep, cudaStream_t stream) {
  return Launch<T, DenseTargets<T>, false>(
      {{y_true}, y_pred, nullptr, loss, row_keep, rows, num_classes, tokens}, stream);
}

template <typename T>
cudaError_t LaunchMaskedMaeGradient(const T* y_true, const T* y_pred, const uint8_t* row_keep,
                                    const T* grad_loss, int64_t rows, int64_t num_classes,
                                    T* grad_y_pred, cudaStream_t stream) {
  return Launch<T, DenseTargets<T>, true>({{y_true}, y_pred, grad_loss, grad_y_pred,
                                           const_cast<uint8_t*>(row_keep), rows, num_classes,
                                           MaskedTokenSet{}},
                                          stream);
}

template <typename T, typename Id>
cudaError_t LaunchSparseMaskedMaeForward(const Id* y_true_ids, const T* y_pred, int64_t rows,
                                         int64_t num_classes, const MaskedTokenSet& tokens,
                                         T* loss, uint8_t* row_keep, cudaStream_t stream) {
  return Launch<T, SparseTargets<Id>, false>(
      {{y_true_ids}, y_pred, nullptr, loss, row_keep, rows, num_classes, tokens}, stream);
}

template <typename T, typename Id>
cudaError_t LaunchSparseMaskedMaeGradient(const Id* y_true_ids, const T* y_pred,
                                          const uint8_t* row_keep, const T* grad_loss,
                                          int64_t rows, int64_t num_classes, T* grad_y_pred,
                                          cudaStream_t stream) {
  return Launch<T, SparseTargets<Id>, true>({{y_true_ids}, y_pred, grad_loss, grad_y_pred,
                                             const_cast<uint8_t*>(row_keep), rows, num_classes,
                                             MaskedTokenSet{}},
                                            stream);
}

#define INSTANTIATE_SPARSE(T, Id)                                                              \
  template cudaError_t LaunchSparseMaskedMaeForward<T, Id>(                                   \
      const Id*, const T*, int64_t, int64_t, const MaskedTokenSet&, T*, uint8_t*,            \
      cudaStream_t);                                                                          \
  template cudaError_t LaunchSparseMaskedMaeGradient<T, Id>(                                  \
      const Id*, const T*, const uint8_t*, const T*, int64_t, int64_t, T*, cudaStream_t);
#define INSTANTIATE(T)                                                                       \
  template cudaError_t LaunchMaskedMaeForward<T>(const T*, const T*, int64_t, int64_t,       \
                                                 const MaskedTokenSet&, T*, uint8_t*,        \
                                                 cudaStream_t);                              \
  template cudaError_t LaunchMaskedMaeGradient<T>(const T*, const T*, const uint8_t*,        \
                                                  const T*, int64_t, int64_t, T*,            \
                                                  cudaStream_t);                             \
  INSTANTIATE_SPARSE(T, int32_t)                                                             \
  INSTANTIATE_SPARSE(T, int64_t)
INSTANTIATE(__half)
INSTANTIATE(__nv_bfloat16)
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE_SPARSE
#undef INSTANTIATE

}  // namespace fused_masked_mae
