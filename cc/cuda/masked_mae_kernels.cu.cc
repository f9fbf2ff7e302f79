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
// read with one aligned 16-byte load, two shifted into place, or element by
// element: RowReader), and the reductions use a fixed butterfly/tree order
// with no atomics: results are bitwise reproducible. The shared pieces
// (StreamRowChunks, WarpReduce, BlockReduce) serve any per-row partial with a
// Combine and a ShuffleXor overload. tests/cuda_emu runs this file unchanged
// on the CPU and compares every kernel with the CPU launchers.
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
constexpr int kMaxGroupBlockThreads = 256;  // largest block of the lane-group forward kernels
constexpr int kGradientBlockThreads = 256;  // the gradient's block (masked_mae_launch.cc)

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

// One 16-byte chunk of T, loaded/stored as a single uint4.
template <typename T>
union Chunk {
  uint4 raw;
  T values[Vec<T>::kSize];
  __device__ Chunk() {}
};

// Bytes [shift, shift + 16) of the 32 bytes lo:hi, for shift in [0, 16):
// selects and funnel shifts on constant register indices, no local memory.
__device__ __forceinline__ uint4 BytesAt(const uint4& lo, const uint4& hi, int shift) {
  const uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  const int q = shift >> 2;
  const uint32_t bits = static_cast<uint32_t>(shift & 3) * 8u;
  uint32_t out[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t a = q == 0 ? w[k] : q == 1 ? w[k + 1] : q == 2 ? w[k + 2] : w[k + 3];
    const uint32_t b = q == 0 ? w[k + 1] : q == 1 ? w[k + 2] : q == 2 ? w[k + 3] : w[k + 4];
    out[k] = __funnelshift_r(a, b, bits);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// Reads one row of T (y_pred, or dense y_true) by 16-byte chunks: chunk c is
// elements [c * kVec, c * kVec + kVec) of the row, whatever the row's address.
// The row starts `shift` bytes past the 16-byte boundary `base`; chunk c lies
// in the aligned blocks base[c] (and base[c + 1] when shift > 0). Chunks
// whose blocks lie inside the row, [vector_begin, vector_end), are read with
// one aligned load (shift 0) or two (then shifted into place); the others
// (the peel before the first boundary, the tail) element by element. No byte
// outside the row is read.
template <typename T>
struct RowReader {
  const uint4* base;
  int shift;
  int64_t vector_begin, vector_end;

  __device__ RowReader(const T* row, int64_t num_classes) {
    const uintptr_t address = reinterpret_cast<uintptr_t>(row);
    base = reinterpret_cast<const uint4*>(address & ~uintptr_t{15});
    shift = static_cast<int>(address & 15u);
    const int64_t end_blocks = (shift + num_classes * static_cast<int64_t>(sizeof(T))) / 16;
    if (address % sizeof(T) != 0) {  // not even element-aligned: no vector access
      vector_begin = vector_end = 0;
    } else if (shift == 0) {
      vector_begin = 0;
      vector_end = end_blocks;
    } else {
      vector_begin = 1;
      vector_end = end_blocks - 1;
    }
  }

  __device__ __forceinline__ uint4 Load(int64_t c) const {
    if (shift == 0) return __ldg(base + c);
    return BytesAt(__ldg(base + c), __ldg(base + c + 1), shift);
  }
};

// The targets of a row as the streaming loop reads them: a RowReader for
// dense rows; for class ids, nothing to read (every chunk is "vector").
template <typename T>
struct TargetReader {
  RowReader<T> reader;
  __device__ TargetReader(const DenseTargetRow<T>& r, int64_t num_classes)
      : reader(r.values, num_classes) {}
  __device__ int64_t VectorBegin() const { return reader.vector_begin; }
  __device__ int64_t VectorEnd() const { return reader.vector_end; }
  template <typename Acc>
  __device__ __forceinline__ void Load(int64_t c, Acc (&out)[Vec<T>::kSize]) const {
    Chunk<T> chunk;
    chunk.raw = reader.Load(c);
#pragma unroll
    for (int k = 0; k < Vec<T>::kSize; ++k) out[k] = static_cast<Acc>(chunk.values[k]);
  }
};

template <typename T>
struct SparseTargetReader {
  const SparseTargetRow& row;
  __device__ int64_t VectorBegin() const { return 0; }
  __device__ int64_t VectorEnd() const { return INT64_MAX; }
  template <typename Acc>
  __device__ __forceinline__ void Load(int64_t c, Acc (&out)[Vec<T>::kSize]) const {
#pragma unroll
    for (int k = 0; k < Vec<T>::kSize; ++k) out[k] = row.At<Acc>(c * Vec<T>::kSize + k);
  }
};

template <typename T>
__device__ __forceinline__ TargetReader<T> MakeTargetReader(const DenseTargetRow<T>& row,
                                                            int64_t num_classes) {
  return TargetReader<T>(row, num_classes);
}
template <typename T>
__device__ __forceinline__ SparseTargetReader<T> MakeTargetReader(const SparseTargetRow& row,
                                                                  int64_t) {
  return SparseTargetReader<T>{row};
}

// The CUDA kernels treat an id outside [0, C) as NaN (host code rejects it
// before launching; this only keeps a bad id from reading anything).
template <typename T>
__device__ __forceinline__ bool TargetValid(const DenseTargetRow<T>&, int64_t) { return true; }
__device__ __forceinline__ bool TargetValid(const SparseTargetRow& row, int64_t num_classes) {
  return row.id >= 0 && row.id < num_classes;
}

// The row streaming loop: calls observe(t, p, i) (as Acc) for every element i
// of this lane's chunks lane, lane + group, ... in increasing order. Which
// elements a lane sees and in which order depends only on num_classes, never
// on addresses (alignment only decides how a chunk is read). Two chunks per
// step are loaded before either is observed, so that each lane keeps several
// 16-byte loads in flight.
template <typename Acc, typename T, typename TargetRow, typename Observe>
__device__ __forceinline__ void StreamRowChunks(const TargetRow& t, const T* p,
                                                int64_t num_classes, int lane, int group,
                                                const Observe& observe) {
  constexpr int kVec = Vec<T>::kSize;
  const int64_t chunks = (num_classes + kVec - 1) / kVec;
  const RowReader<T> pr(p, num_classes);
  const auto tr = MakeTargetReader<T>(t, num_classes);
  const int64_t vector_begin =
      pr.vector_begin > tr.VectorBegin() ? pr.vector_begin : tr.VectorBegin();
  const int64_t vector_end = pr.vector_end < tr.VectorEnd() ? pr.vector_end : tr.VectorEnd();
  const auto scalar_chunk = [&](int64_t c) {
    const int64_t first = c * kVec;
    const int64_t last = first + kVec < num_classes ? first + kVec : num_classes;
    for (int64_t i = first; i < last; ++i) {
      observe(t.template At<Acc>(i), static_cast<Acc>(p[i]), i);
    }
  };
  const auto vector_chunk = [&](int64_t c, const Chunk<T>& pc, const Acc (&tv)[kVec]) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) observe(tv[k], static_cast<Acc>(pc.values[k]), c * kVec + k);
  };
  int64_t c = lane;
  for (; c < chunks && c < vector_begin; c += group) scalar_chunk(c);  // the peel
  for (; c + group < vector_end; c += 2 * group) {
    Chunk<T> p0, p1;
    Acc t0[kVec], t1[kVec];
    p0.raw = pr.Load(c);
    p1.raw = pr.Load(c + group);
    tr.Load(c, t0);
    tr.Load(c + group, t1);
    vector_chunk(c, p0, t0);
    vector_chunk(c + group, p1, t1);
  }
  for (; c < chunks; c += group) {
    if (c >= vector_begin && c < vector_end) {
      Chunk<T> pc;
      Acc tv[kVec];
      pc.raw = pr.Load(c);
      tr.Load(c, tv);
      vector_chunk(c, pc, tv);
    } else {
      scalar_chunk(c);
    }
  }
}

// Shuffles: a 32-bit index is one shuffle, a 64-bit one two.
template <typename V>
__device__ __forceinline__ V ShuffleXorValue(V v, int mask, int width) {
  if constexpr (sizeof(V) == 8) {
    return static_cast<V>(__shfl_xor_sync(kFullMask, static_cast<long long>(v), mask, width));
  } else {
    return __shfl_xor_sync(kFullMask, v, mask, width);
  }
}
__device__ __forceinline__ double ShuffleXorValue(double v, int mask, int width) {
  return __shfl_xor_sync(kFullMask, v, mask, width);
}

template <typename Acc, typename Index>
__device__ __forceinline__ ArgmaxState<Acc, Index> ShuffleXor(const ArgmaxState<Acc, Index>& a,
                                                              int mask, int width) {
  ArgmaxState<Acc, Index> b;
  b.value = ShuffleXorValue(a.value, mask, width);
  b.index = ShuffleXorValue(a.index, mask, width);
  return b;
}

template <typename Acc, typename Index>
__device__ __forceinline__ RowPartial<Acc, Index> ShuffleXor(const RowPartial<Acc, Index>& a,
                                                             int mask, int width) {
  RowPartial<Acc, Index> b;
  b.target = ShuffleXor(a.target, mask, width);
  b.prediction = ShuffleXor(a.prediction, mask, width);
  b.abs_diff_sum = ShuffleXorValue(a.abs_diff_sum, mask, width);
  return b;
}

// Butterfly over `width` lanes (a power of two <= 32) of any Partial with a
// Combine and a ShuffleXor overload. Every lane ends with the same result
// (Combine is commutative for argmax, and a + b == b + a in IEEE).
template <typename Partial>
__device__ __forceinline__ Partial WarpReduce(Partial part, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    part = Partial::Combine(part, ShuffleXor(part, offset, width));
  }
  return part;
}

// Whole-block reduction for a block-per-row launch; all threads get the
// result. `empty` is the identity of Partial::Combine.
template <typename Partial>
__device__ __forceinline__ Partial BlockReduce(Partial part, const Partial& empty) {
  __shared__ Partial warp_parts[kMaxRowBlockThreads / kWarpSize];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  part = WarpReduce(part, kWarpSize);
  if (lane == 0) warp_parts[warp] = part;
  __syncthreads();
  if (warp == 0) {
    part = lane < num_warps ? warp_parts[lane] : empty;
    part = WarpReduce(part, kWarpSize);
    if (lane == 0) warp_parts[0] = part;
  }
  __syncthreads();
  part = warp_parts[0];
  __syncthreads();  // warp_parts is reused by the next row
  return part;
}

// The forward with argmax indices of type Index: loss and keep byte per row.
// kGroup: lanes per row (1..32), or 0 for one whole block per row.
template <typename T, typename Targets, int kGroup, typename Index>
__device__ __forceinline__ void MaskedMaeRowsWithIndex(const TypedParams<T, Targets>& params) {
  using Acc = typename AccumulatorOf<T>::type;
  using Partial = RowPartial<Acc, Index>;
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
    const auto t = params.y_true.Row(safe_row, num_classes);
    const bool valid = in_range && TargetValid(t, num_classes);
    Partial part = Partial::Empty(lowest);
    if (valid) {
      StreamRowChunks<Acc>(t, params.y_pred + safe_row * num_classes, num_classes, lane, group,
                           [&](Acc tv, Acc pv, int64_t i) { part.Observe(tv, pv, i); });
    }
    part = kGroup > 0 ? WarpReduce(part, kGroup) : BlockReduce(part, Partial::Empty(lowest));
    if (!in_range || lane != 0) continue;
    const Acc keep = KeepFactor(part, params.tokens);
    params.out[row] =
        static_cast<T>(valid ? MaskedMean(keep, part.abs_diff_sum, num_classes) : Acc(NAN));
    if (params.row_keep != nullptr) params.row_keep[row] = KeepByte(keep);
  }
}

// The forward. Rows of at most 2^32 - 1 classes (all in practice) reduce
// 32-bit argmax indices; the branch is uniform over the grid. (The CUDA
// emulator lowers the limit to run both paths: tests/cuda_emu.)
#ifndef FUSED_MASKED_MAE_INDEX32_MAX_CLASSES
#define FUSED_MASKED_MAE_INDEX32_MAX_CLASSES int64_t{0xffffffff}
#endif
template <typename T, typename Targets, int kGroup>
__device__ __forceinline__ void MaskedMaeRows(const KernelParams& raw_params) {
  const TypedParams<T, Targets> params(raw_params);
  if (params.num_classes <= FUSED_MASKED_MAE_INDEX32_MAX_CLASSES) {
    MaskedMaeRowsWithIndex<T, Targets, kGroup, uint32_t>(params);
  } else {
    MaskedMaeRowsWithIndex<T, Targets, kGroup, int64_t>(params);
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
               ? RowGradientScale(params.grad_loss[row], KeepFromByte<Acc>(params.row_keep[row]),
                                  num_classes)
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
      Chunk<T> tc;
      tc.raw = __ldg(reinterpret_cast<const uint4*>(params.y_true.values + first));
#pragma unroll
      for (int k = 0; k < kVec; ++k) tv[k] = static_cast<Acc>(tc.values[k]);
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
      gc.values[k] = ElementGradient<T>(scale, t, static_cast<Acc>(pc.values[k]));
      ++col;
    }
    *reinterpret_cast<uint4*>(grad + first) = gc.raw;
  }
  for (int64_t s = first_thread; s < scalars; s += stride) {
    const int64_t i = s < peel ? s : vector_end + (s - peel);
    const int64_t row = i / num_classes;
    const int64_t col = i - row * num_classes;
    grad[i] = ElementGradient<T>(row_scale(row), target(i, col, row_id(row)),
                                 static_cast<Acc>(p[i]));
  }
}

}  // namespace

// The extern "C" kernels, named as masked_mae_kernel_abi.h's KernelName spells
// them: forward per (dtype, targets, lanes per row), gradient per (dtype, targets).
#define MMAE_FORWARD(TNAME, T, TARGETNAME, TARGETS, G)                                  \
  extern "C" __global__ void __launch_bounds__(                                        \
      G == 0 ? kMaxRowBlockThreads : kMaxGroupBlockThreads, 1)                           \
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
