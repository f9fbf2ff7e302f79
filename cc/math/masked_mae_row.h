// The per-row math of the fused masked MAE loss: the single source of truth.
//
// For one row of C classes (t = y_true row, p = y_pred row):
//   keep  = 1 - [argmax t == argmax p] * [argmax t is a masked token]
//   loss  = keep * (sum_c |p_c - t_c|) / C
//   dloss/dp_c = ((upstream * keep) / C) * sign(p_c - t_c),   dloss/dt_c = -dloss/dp_c
//
// The forward saves keep as one byte per row; the gradient reads it back, so
// it streams y_true and y_pred once and computes no argmax.
//
// The operation order above mirrors what TensorFlow's autodiff computes for the
// composite reference (Mul, Mean, Abs, Sub gradients), so float32/float64
// gradients match it bit for bit; keep * mean (not a branch) keeps NaN/Inf
// propagation identical to the reference.
//
// This header is included by the TensorFlow CPU kernel, the CUDA kernels and the
// TensorFlow-free pybind11 module. It depends on nothing but the C++ standard
// library so that nvcc and a plain host compiler both accept it. Element types
// are converted with static_cast, which Eigen::half/bfloat16, CUDA's
// __half/__nv_bfloat16 and the host 16-bit types in float16_host.h all support.
#ifndef FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_ROW_H_
#define FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_ROW_H_

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MMAE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MMAE_HOST_DEVICE inline
#endif

namespace fused_masked_mae {

// The element dtypes the op supports. Each backend maps its own C++ types onto
// these with ElementKindOf (float and double are mapped here).
enum class ElementKind { kFloat16, kBFloat16, kFloat32, kFloat64 };

template <typename T>
struct ElementKindOf;  // Specialized by each backend for its 16-bit types.
template <>
struct ElementKindOf<float> {
  static constexpr ElementKind value = ElementKind::kFloat32;
};
template <>
struct ElementKindOf<double> {
  static constexpr ElementKind value = ElementKind::kFloat64;
};

// Accumulate in float32, and in float64 for float64 inputs.
template <typename T>
struct AccumulatorOf {
  using type = float;
};
template <>
struct AccumulatorOf<double> {
  using type = double;
};

// The dtype's lowest finite value. tf.math.argmax (Eigen's ArgMax reducer)
// starts its scan at (index 0, lowest) and moves only to strictly greater
// values, so an element is an argmax candidate only when it is above this.
template <typename Acc>
MMAE_HOST_DEVICE constexpr Acc LowestFinite(ElementKind kind) {
  return kind == ElementKind::kFloat16    ? Acc(-65504.0)
         : kind == ElementKind::kBFloat16 ? Acc(-3.38953138925153547590470800371487866880e+38)
         : kind == ElementKind::kFloat32  ? Acc(-3.40282346638528859811704183484516925440e+38)
                                          : Acc(-1.79769313486231570814527423731704356798e+308);
}

// "No candidate seen yet". Larger than any valid index so that the tie rule
// (smaller index wins) never prefers it.
constexpr int64_t kNoIndex = INT64_MAX;

// The two element-level rules everything below is built from.
// An element replaces the best so far only when strictly greater: this keeps
// the first of equal values, and is false for NaN and for v <= lowest.
template <typename Acc>
MMAE_HOST_DEVICE bool Improves(Acc v, Acc best) {
  return v > best;
}

template <typename Acc>
MMAE_HOST_DEVICE Acc AbsDiff(Acc p, Acc t) {
  const Acc diff = p - t;
  return diff < Acc(0) ? -diff : diff;  // NaN stays NaN
}

// Running argmax of one row, or of any subset of its elements.
//
// Observe() must see one state's elements in increasing index order (it keeps
// the first of equal values). Combine() merges two states of disjoint subsets in
// any order: it is associative and commutative, so a parallel reduction in any
// tree shape gives exactly the sequential result:
//   keep the larger value; on equal values the smaller index; NaN never enters
//   (NaN > x is false) and neither does a value not above the dtype's lowest.
// -0.0 and 0.0 compare equal, so they tie, as in tf.math.argmax.
//
// Index is int64_t, or uint32_t where every index of the row is below
// 0xffffffff (the CUDA kernels: a 32-bit index is one shuffle, a 64-bit one
// two). "No candidate" is the Index's largest value either way, so the tie
// rule orders it last in both.
template <typename Acc, typename Index = int64_t>
struct ArgmaxState {
  static_assert(std::is_same<Index, int64_t>::value || std::is_same<Index, uint32_t>::value,
                "Index is int64_t or uint32_t");
  static constexpr Index kNone = std::is_same<Index, int64_t>::value
                                     ? static_cast<Index>(kNoIndex)
                                     : static_cast<Index>(0xffffffffu);
  Acc value;
  Index index;

  MMAE_HOST_DEVICE static ArgmaxState Empty(Acc lowest) { return {lowest, kNone}; }

  MMAE_HOST_DEVICE void Observe(Acc v, int64_t i) {
    const bool take = Improves(v, value);
    value = take ? v : value;
    index = take ? static_cast<Index>(i) : index;
  }

  // Field by field: a select of the whole struct (take_b ? b : a) makes
  // compilers build both in memory (an 80-byte stack frame per kernel on sm_80).
  MMAE_HOST_DEVICE static ArgmaxState Combine(const ArgmaxState& a, const ArgmaxState& b) {
    const bool take_b = b.value > a.value || (b.value == a.value && b.index < a.index);
    ArgmaxState out;
    out.value = take_b ? b.value : a.value;
    out.index = take_b ? b.index : a.index;
    return out;
  }

  // tf.math.argmax returns 0 when no element is a candidate (all NaN, say).
  MMAE_HOST_DEVICE int64_t Result() const {
    return index == kNone ? 0 : static_cast<int64_t>(index);
  }
};

// Everything the loss needs from a (partial) row, in one pass over t and p.
template <typename Acc, typename Index = int64_t>
struct RowPartial {
  ArgmaxState<Acc, Index> target;
  ArgmaxState<Acc, Index> prediction;
  Acc abs_diff_sum;

  MMAE_HOST_DEVICE static RowPartial Empty(Acc lowest) {
    RowPartial out;
    out.target = ArgmaxState<Acc, Index>::Empty(lowest);
    out.prediction = ArgmaxState<Acc, Index>::Empty(lowest);
    out.abs_diff_sum = Acc(0);
    return out;
  }

  MMAE_HOST_DEVICE void Observe(Acc t, Acc p, int64_t i) {
    target.Observe(t, i);
    prediction.Observe(p, i);
    abs_diff_sum += AbsDiff(p, t);
  }

  // Not commutative for abs_diff_sum bit patterns: callers combine in a fixed
  // order so that results are reproducible run to run.
  MMAE_HOST_DEVICE static RowPartial Combine(const RowPartial& a, const RowPartial& b) {
    RowPartial out;
    out.target = ArgmaxState<Acc, Index>::Combine(a.target, b.target);
    out.prediction = ArgmaxState<Acc, Index>::Combine(a.prediction, b.prediction);
    out.abs_diff_sum = a.abs_diff_sum + b.abs_diff_sum;
    return out;
  }
};

// The token ids whose correctly predicted positions cost nothing (the seed's
// start and end tokens). A fixed capacity keeps it a plain value that can be
// passed to a CUDA kernel by value; op construction rejects longer lists.
constexpr int kMaxMaskedTokens = 256;

struct MaskedTokenSet {
  int count;
  int64_t ids[kMaxMaskedTokens];

  MMAE_HOST_DEVICE bool Contains(int64_t id) const {
    bool found = false;
    for (int k = 0; k < count; ++k) found |= (ids[k] == id);
    return found;
  }
};

// The seed's `cond`: 0 when the target's argmax equals the prediction's and is a
// masked token, else 1.
MMAE_HOST_DEVICE float KeepFactorFor(int64_t target_argmax, bool prediction_argmax_equal,
                                     const MaskedTokenSet& tokens) {
  return prediction_argmax_equal && tokens.Contains(target_argmax) ? 0.0f : 1.0f;
}

template <typename Acc, typename Index>
MMAE_HOST_DEVICE Acc KeepFactor(const RowPartial<Acc, Index>& row, const MaskedTokenSet& tokens) {
  const int64_t t = row.target.Result();
  return Acc(KeepFactorFor(t, t == row.prediction.Result(), tokens));
}

// keep * mean: a product, not a branch, so NaN/Inf propagate as in the reference.
template <typename Acc>
MMAE_HOST_DEVICE Acc MaskedMean(Acc keep, Acc abs_diff_sum, int64_t num_classes) {
  return keep * (abs_diff_sum / Acc(num_classes));
}

template <typename Acc, typename Index>
MMAE_HOST_DEVICE Acc RowLoss(const RowPartial<Acc, Index>& row, const MaskedTokenSet& tokens,
                             int64_t num_classes) {
  return MaskedMean(KeepFactor(row, tokens), row.abs_diff_sum, num_classes);
}

// The keep factor as the forward saves it for the gradient: one byte per row,
// 1 or 0. The gradient reads any nonzero byte as 1.
template <typename Acc>
MMAE_HOST_DEVICE uint8_t KeepByte(Acc keep) {
  return keep != Acc(0) ? 1 : 0;
}

template <typename Acc>
MMAE_HOST_DEVICE Acc KeepFromByte(uint8_t keep_byte) {
  return keep_byte != 0 ? Acc(1) : Acc(0);
}

// The per-row factor of the gradient: (upstream * keep) / C.
template <typename Acc>
MMAE_HOST_DEVICE Acc GradientScale(Acc upstream, Acc keep, int64_t num_classes) {
  return (upstream * keep) / Acc(num_classes);
}

// tf.sign: -1, 0 or 1, and NaN for NaN (sign(+-0) = 0: no gradient at the kink).
// Written as a difference of two selects so that loops over it vectorize.
template <typename Acc>
MMAE_HOST_DEVICE Acc Sign(Acc x) {
  const Acc sign = (x > Acc(0) ? Acc(1) : Acc(0)) - (x < Acc(0) ? Acc(1) : Acc(0));
  return x != x ? x : sign;
}

// The row's gradient factor as the reference computes it in T: rounded to T
// (as TensorFlow's Mean gradient does), then widened back for the products.
template <typename T, typename Acc>
MMAE_HOST_DEVICE Acc RowGradientScale(T upstream, Acc keep, int64_t num_classes) {
  return static_cast<Acc>(
      static_cast<T>(GradientScale(static_cast<Acc>(upstream), keep, num_classes)));
}

// d loss / d y_pred for one element; d loss / d y_true is its negative.
template <typename Acc>
MMAE_HOST_DEVICE Acc ElementGradientValue(Acc scale, Acc y_true, Acc y_pred) {
  return scale * Sign(y_pred - y_true);
}

// The same, as T.
template <typename T, typename Acc>
MMAE_HOST_DEVICE T ElementGradient(Acc scale, Acc y_true, Acc y_pred) {
  return static_cast<T>(ElementGradientValue(scale, y_true, y_pred));
}

// How a row's targets are read: dense values [C], or a class id standing for
// the one-hot row one_hot(id) (the sparse loss), which is never built.
// Both give the same Acc values, so the sparse loss equals the dense loss on
// one_hot(ids) bit for bit.
template <typename T>
struct DenseTargetRow {
  const T* values;
  template <typename Acc>
  MMAE_HOST_DEVICE Acc At(int64_t i) const {
    return static_cast<Acc>(values[i]);
  }
};

template <typename T>
MMAE_HOST_DEVICE DenseTargetRow<T> DenseRow(const T* values) {
  return {values};
}

struct SparseTargetRow {
  int64_t id;  // host callers validate it; the CUDA kernels give NaN when not in [0, C)
  template <typename Acc>
  MMAE_HOST_DEVICE Acc At(int64_t i) const {
    return i == id ? Acc(1) : Acc(0);
  }
};

// ---------------------------------------------------------------------------
// Whole-row routines for host code (the CPU launchers in masked_mae_cpu.cc,
// which the TensorFlow CPU kernels, the XLA CPU handlers and _core call). A row is `num_classes` contiguous
// elements.
//
// The scan is split in two passes so the hot loop vectorizes: pass 1 keeps, in
// kHostLanes independent lanes (lane l sees elements l, l + L, ...), the
// largest candidate of t and of p and the sum of |p - t|; the lanes are then
// combined in a fixed order (deterministic, and more accurate than one running
// sum). Pass 2 finds the first index holding each maximum while the row is
// still in L1. The result is the ArgmaxState rule exactly: the first index of
// the largest candidate, no candidate giving kNoIndex.
constexpr int kHostLanes = 16;

// Host results carry a single NaN, the positive quiet NaN without payload.
// Which of two NaN operands an addition or a product passes on depends on the
// operand order, which compilers choose freely (a + b is b + a) and choose
// differently for scalar and vector code, so the NaN's sign and payload would
// differ between the instruction-set variants of the CPU launchers (and
// between compilers); every other bit is fixed by the operation order.
template <typename Acc>
inline Acc CanonicalNaN(Acc x) {
  return x != x ? std::numeric_limits<Acc>::quiet_NaN() : x;
}

// ElementGradient for the host row loops, NaN made canonical.
template <typename T, typename Acc>
inline T HostElementGradient(Acc scale, Acc y_true, Acc y_pred) {
  return static_cast<T>(CanonicalNaN(ElementGradientValue(scale, y_true, y_pred)));
}

// Reads kHostLanes consecutive elements as Acc: every hot loop below reads
// its inputs through this, a block at a time. host_float16.h overloads it for
// its 16-bit types with vector conversion instructions where the compile
// target has them (found by argument-dependent lookup); values are the same.
template <typename T, typename Acc>
inline void LoadLanes(const T* src, Acc* dst) {
  for (int l = 0; l < kHostLanes; ++l) dst[l] = static_cast<Acc>(src[l]);
}

// Blocks of 64 elements are tested with a branch-free count (which
// vectorizes) before the block holding the first match is searched.
constexpr int kSearchBlock = 64;

// The first index in [0, end) of x holding `best`, kNoIndex when none (or when
// best is no candidate: not above the dtype's lowest).
template <typename T, typename Acc>
inline int64_t FirstIndexOf(const T* x, int64_t end, Acc best, Acc lowest) {
  if (!Improves(best, lowest)) return kNoIndex;  // no candidate in the row
  const int64_t full = end - end % kSearchBlock;
  int64_t base = 0;
  for (; base < full; base += kSearchBlock) {
    Acc v[kSearchBlock];
    for (int block = 0; block < kSearchBlock; block += kHostLanes) {
      LoadLanes(x + base + block, v + block);
    }
    int hits = 0;
    for (int l = 0; l < kSearchBlock; ++l) hits += v[l] == best;
    if (hits) break;
  }
  for (int64_t i = base; i < end; ++i) {
    if (static_cast<Acc>(x[i]) == best) return i;
  }
  return kNoIndex;
}

template <typename Acc>
struct HostRowSummary {
  Acc keep;
  Acc abs_diff_sum;
};

template <typename T, typename TargetRow>
inline HostRowSummary<typename AccumulatorOf<T>::type> ScanRow(const TargetRow& y_true,
                                                              const T* y_pred,
                                                              int64_t num_classes,
                                                              const MaskedTokenSet& tokens) {
  using Acc = typename AccumulatorOf<T>::type;
  const Acc lowest = LowestFinite<Acc>(ElementKindOf<T>::value);
  const auto target_at = [&](int64_t i) { return y_true.template At<Acc>(i); };
  const auto prediction_at = [&](int64_t i) { return static_cast<Acc>(y_pred[i]); };
  Acc t_best[kHostLanes], p_best[kHostLanes], sum[kHostLanes];
  for (int l = 0; l < kHostLanes; ++l) {
    t_best[l] = p_best[l] = lowest;
    sum[l] = Acc(0);
  }
  const auto observe = [&](int l, Acc t, Acc p) {
    t_best[l] = Improves(t, t_best[l]) ? t : t_best[l];
    p_best[l] = Improves(p, p_best[l]) ? p : p_best[l];
    sum[l] += AbsDiff(p, t);
  };
  // Pass 1, block by block of kHostLanes elements; the tail goes to lanes
  // 0.., after their other elements.
  const int64_t full = num_classes - num_classes % kHostLanes;
  // load_targets(base, t) fills t with the block's kHostLanes targets.
  const auto scan_blocks = [&](int64_t begin, int64_t end, const auto& load_targets) {
    for (int64_t base = begin; base < end; base += kHostLanes) {
      Acc t[kHostLanes], p[kHostLanes];
      load_targets(base, t);
      LoadLanes(y_pred + base, p);
      for (int l = 0; l < kHostLanes; ++l) observe(l, t[l], p[l]);
    }
  };
  if constexpr (std::is_same_v<TargetRow, SparseTargetRow>) {
    // one_hot(id) is zero outside id's block: only that block reads a 1.
    // Lanes still see their elements in order, so the sums are the dense
    // loop's bit for bit.
    const auto zero = [](int64_t, Acc* t) {
      for (int l = 0; l < kHostLanes; ++l) t[l] = Acc(0);
    };
    const int64_t id_block = y_true.id - y_true.id % kHostLanes;
    scan_blocks(0, id_block < full ? id_block : full, zero);
    if (id_block < full) {
      scan_blocks(id_block, id_block + kHostLanes, [&](int64_t base, Acc* t) {
        for (int l = 0; l < kHostLanes; ++l) t[l] = target_at(base + l);
      });
      scan_blocks(id_block + kHostLanes, full, zero);
    }
  } else {
    scan_blocks(0, full, [&](int64_t base, Acc* t) { LoadLanes(y_true.values + base, t); });
  }
  if (full < num_classes) {
    // The tail as one more block whose missing elements leave their lanes as
    // they are: (lowest, lowest) is no candidate and adds |0| = +0.0 to a sum,
    // which is never -0.0 (it starts at +0.0), so x + 0.0 is x bit for bit.
    Acc t[kHostLanes], p[kHostLanes];
    for (int l = 0; l < kHostLanes; ++l) {
      const bool in_row = full + l < num_classes;
      t[l] = in_row ? target_at(full + l) : lowest;
      p[l] = in_row ? prediction_at(full + l) : lowest;
    }
    for (int l = 0; l < kHostLanes; ++l) observe(l, t[l], p[l]);
  }
  // Pairwise tree over the lanes, always in the same order; constant bounds,
  // so each level is straight-line (vector) code.
  const auto tree_level = [&](auto width_constant) {
    constexpr int width = decltype(width_constant)::value;
    for (int l = 0; l < width; ++l) {
      t_best[l] = Improves(t_best[l + width], t_best[l]) ? t_best[l + width] : t_best[l];
      p_best[l] = Improves(p_best[l + width], p_best[l]) ? p_best[l + width] : p_best[l];
      sum[l] += sum[l + width];
    }
  };
  static_assert(kHostLanes == 16, "the tree below has four levels");
  tree_level(std::integral_constant<int, 8>{});
  tree_level(std::integral_constant<int, 4>{});
  tree_level(std::integral_constant<int, 2>{});
  tree_level(std::integral_constant<int, 1>{});
  // Pass 2: argmax t, and whether argmax p equals it, which only matters when
  // argmax t is a masked token. Then argmax p == argmax t exactly when p holds
  // its maximum there and nowhere before (no candidate in p means argmax 0).
  int64_t target_argmax;
  if constexpr (std::is_same_v<TargetRow, SparseTargetRow>) {
    target_argmax = y_true.id;  // one_hot(id): its only maximum
  } else {
    target_argmax = FirstIndexOf(y_true.values, num_classes, t_best[0], lowest);
  }
  const ArgmaxState<Acc> target{t_best[0], target_argmax};
  const int64_t t_index = target.Result();
  bool prediction_equal = false;
  if (tokens.Contains(t_index)) {
    prediction_equal =
        Improves(p_best[0], lowest)
            ? prediction_at(t_index) == p_best[0] &&
                  FirstIndexOf(y_pred, t_index, p_best[0], lowest) == kNoIndex
            : t_index == 0;
  }
  return {Acc(KeepFactorFor(t_index, prediction_equal, tokens)), sum[0]};
}

// The row's loss, and its keep factor as one byte (1 = the position counts,
// 0 = masked) for the gradient, so that the backward pass never re-derives
// the argmaxes.
template <typename T, typename TargetRow>
inline T ComputeRowLoss(const TargetRow& y_true, const T* y_pred, int64_t num_classes,
                        const MaskedTokenSet& tokens, uint8_t* keep_byte) {
  const auto row = ScanRow(y_true, y_pred, num_classes, tokens);
  *keep_byte = KeepByte(row.keep);
  return static_cast<T>(CanonicalNaN(MaskedMean(row.keep, row.abs_diff_sum, num_classes)));
}

// Writes d loss / d y_pred for one row from the keep byte the forward saved:
// one streaming pass over the row, no argmax work.
template <typename T, typename TargetRow>
inline void ComputeRowGradient(const TargetRow& y_true, const T* y_pred, int64_t num_classes,
                               uint8_t keep_byte, T upstream, T* grad_y_pred) {
  using Acc = typename AccumulatorOf<T>::type;
  const Acc scale = RowGradientScale(upstream, KeepFromByte<Acc>(keep_byte), num_classes);
  // scale * Sign(p - t) takes one of four values in a row, as Sign is 1, -1,
  // +0 or NaN: for float16 each is computed once, by the same
  // HostElementGradient (Sign(Sign(d)) = Sign(d), and every NaN becomes the
  // one NaN), and each element picks its value's bits, so no element rounds a
  // float to float16 (the slowest conversion). The other dtypes compute each
  // element's product (bfloat16's rounding is a few integer operations).
  constexpr bool kFourValues = ElementKindOf<T>::value == ElementKind::kFloat16;
  using Bits = std::conditional_t<sizeof(T) == 2, uint16_t,
                                  std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
  static_assert(sizeof(Bits) == sizeof(T), "T is a 2, 4 or 8-byte float");
  const auto bits_of = [](T value) {
    Bits bits;
    std::memcpy(&bits, &value, sizeof(bits));
    return bits;
  };
  const Bits positive = bits_of(HostElementGradient<T>(scale, Acc(0), Acc(1)));
  const Bits negative = bits_of(HostElementGradient<T>(scale, Acc(0), Acc(-1)));
  const Bits zero = bits_of(HostElementGradient<T>(scale, Acc(0), Acc(0)));
  const Bits nan = bits_of(static_cast<T>(CanonicalNaN(std::numeric_limits<Acc>::quiet_NaN())));
  const auto gradient_bits = [&](Acc t, Acc p) {
    const Acc sign = Sign(p - t);
    const Bits is_positive = Bits(0) - Bits(sign > Acc(0));
    const Bits is_negative = Bits(0) - Bits(sign < Acc(0));
    const Bits is_zero = Bits(0) - Bits(sign == Acc(0));
    return (positive & is_positive) | (negative & is_negative) | (zero & is_zero) |
           (nan & ~(is_positive | is_negative | is_zero));
  };
  // A block of kHostLanes at a time, then the tail.
  const int64_t full = num_classes - num_classes % kHostLanes;
  for (int64_t base = 0; base < full; base += kHostLanes) {
    Acc t[kHostLanes], p[kHostLanes];
    if constexpr (std::is_same_v<TargetRow, SparseTargetRow>) {
      for (int l = 0; l < kHostLanes; ++l) t[l] = Acc(0);  // the one at id is redone below
    } else {
      LoadLanes(y_true.values + base, t);
    }
    LoadLanes(y_pred + base, p);
    if constexpr (kFourValues) {
      Bits out[kHostLanes];
      for (int l = 0; l < kHostLanes; ++l) out[l] = gradient_bits(t[l], p[l]);
      std::memcpy(grad_y_pred + base, out, sizeof(out));
    } else {
      for (int l = 0; l < kHostLanes; ++l) {
        grad_y_pred[base + l] = HostElementGradient<T>(scale, t[l], p[l]);
      }
    }
  }
  for (int64_t i = full; i < num_classes; ++i) {
    grad_y_pred[i] =
        HostElementGradient<T>(scale, y_true.template At<Acc>(i), static_cast<Acc>(y_pred[i]));
  }
  if constexpr (std::is_same_v<TargetRow, SparseTargetRow>) {
    grad_y_pred[y_true.id] =
        HostElementGradient<T>(scale, Acc(1), static_cast<Acc>(y_pred[y_true.id]));
  }
}

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_ROW_H_
