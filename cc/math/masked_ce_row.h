// The per-row math of the fused masked cross-entropy: the same loss family as
// the masked MAE (masked_mae_row.h), whose argmax state, token set, keep
// factor and dense/sparse target rows it uses; only the base loss differs.
//
// For one row of C classes (t = y_true row, or one_hot(id); z/p = y_pred row):
//   keep = the masked MAE's keep (argmax t == argmax y_pred and a masked token
//          gives 0, else 1), the argmaxes taken over the arrays given
//          (the logits when from_logits)
//   t'   = t * (1 - ls) + ls / C            (dense targets, label smoothing ls)
//   CE, as Keras 3's TensorFlow backend computes it:
//     dense, logits:         sum_c t'_c (log s - (z_c - m)),  m = max z, s = sum exp(z - m)
//     sparse, logits:        log s - (z_id - m)
//     dense, probabilities:  -sum_c t'_c log(clip(p_c / S, eps, 1 - eps)),  S = sum p
//     sparse, probabilities: the sparse logits form on log(clip(p, eps, 1 - eps)),
//                            = log(sum_c clip(p_c)) - log(clip(p_id))
//   loss = keep * CE                       (a product: NaN/Inf propagate)
//   gradients (G = upstream * keep, rounded to T as TensorFlow's Mul gives it):
//     logits:                G * (exp(z_j - m) * (1 / s) - t'_j)  (TensorFlow's softmax - labels)
//     dense, probabilities:  (a_j ? -(G t'_j) / q_j : 0) / S + G * V / S,
//                            q = clip(p / S), a_j = [eps <= p_j / S <= 1 - eps], V = sum a_c t'_c
//     sparse, probabilities: a_j ? G * (c_j / Sc - [j == id]) / c_j : 0,
//                            c = clip(p), a_j = [eps <= p_j <= 1 - eps], Sc = sum c
// The forward saves keep as one byte and two float64 statistics per row
// ((m, s), (S, V) or (Sc, 0)); the gradient streams the row once from them.
//
// exp and log are DetExp/DetLog (det_exp_log.h): the same bits on every
// CPU variant and on the GPU. Sums run in kHostLanes lanes in a fixed order,
// as the masked MAE's.
#ifndef FUSED_MASKED_MAE_CC_MATH_MASKED_CE_ROW_H_
#define FUSED_MASKED_MAE_CC_MATH_MASKED_CE_ROW_H_

#include <cstdint>
#include <type_traits>

#include "cc/math/det_exp_log.h"
#include "cc/math/masked_mae_row.h"

namespace fused_masked_mae {

// The cross-entropy's options, a plain value (passed to CUDA kernels as is).
struct CeOptions {
  int32_t from_logits;    // 1: y_pred holds logits; 0: probabilities
  float label_smoothing;  // dense targets only; 0 leaves t as it is
  float epsilon;          // the probability clip (Keras' backend epsilon), from_logits = 0
};

// Per-row statistics the forward saves for the gradient.
constexpr int kCeRowStats = 2;

// The row-independent constants of a call, in Acc, rounded through T where
// Keras computes them in the inputs' dtype.
template <typename Acc>
struct CeConstants {
  bool from_logits;
  bool smoothing;
  Acc smooth_scale;   // 1 - ls
  Acc smooth_offset;  // ls / C
  Acc clip_lo;        // eps
  Acc clip_hi;        // 1 - eps
};

template <typename T, typename Acc = typename AccumulatorOf<T>::type>
MMAE_HOST_DEVICE CeConstants<Acc> MakeCeConstants(const CeOptions& options,
                                                  int64_t num_classes) {
  const double ls = static_cast<double>(options.label_smoothing);
  const double eps = static_cast<double>(options.epsilon);
  // double -> Acc -> T: the host 16-bit types and CUDA's convert from float.
  const auto through_t = [](double v) {
    return static_cast<Acc>(static_cast<T>(static_cast<Acc>(v)));
  };
  CeConstants<Acc> c;
  c.from_logits = options.from_logits != 0;
  c.smoothing = ls != 0.0;
  c.smooth_scale = through_t(1.0 - ls);
  c.smooth_offset = static_cast<Acc>(
      static_cast<T>(through_t(ls) / through_t(static_cast<double>(num_classes))));
  c.clip_lo = through_t(eps);
  c.clip_hi = through_t(1.0 - eps);
  return c;
}

// t' (label smoothing), for dense targets.
template <typename Acc>
MMAE_HOST_DEVICE Acc SmoothTarget(const CeConstants<Acc>& c, Acc t) {
  return c.smoothing ? t * c.smooth_scale + c.smooth_offset : t;
}

// tf.clip_by_value: NaN stays NaN.
template <typename Acc>
MMAE_HOST_DEVICE Acc ClipProbability(const CeConstants<Acc>& c, Acc q) {
  const Acc low = q < c.clip_lo ? c.clip_lo : q;
  return low > c.clip_hi ? c.clip_hi : low;
}

// Whether the clip passes the gradient (TensorFlow's Minimum/Maximum
// gradients: lo <= q <= hi, false for NaN).
template <typename Acc>
MMAE_HOST_DEVICE bool ClipPasses(const CeConstants<Acc>& c, Acc q) {
  return q >= c.clip_lo && q <= c.clip_hi;
}

// The row's cross-entropy from its reduced sums (see the table above):
//   logits:               sum_t * log(s) + w,   w = sum t' (m - z)   [sparse: sum_t = 1, w = m - z_id]
//   dense probabilities:  -l,                  l = sum t' log(q)
//   sparse probabilities: log(Sc) - log(c_id)
template <typename Acc>
MMAE_HOST_DEVICE Acc LogitsCrossEntropy(Acc sum_t, Acc s, Acc w) {
  return DetLog(s) * sum_t + w;
}

// The gradient's per-element values.
// softmax_j = exp(z_j - m) * (1 / s): the row's reciprocal once, no division per element.
template <typename Acc>
MMAE_HOST_DEVICE Acc LogitsGradientValue(Acc scale, Acc m, Acc inverse_s, Acc z, Acc t) {
  return scale * (DetExp(z - m) * inverse_s - t);
}

template <typename Acc>
MMAE_HOST_DEVICE Acc DenseProbabilityGradientValue(const CeConstants<Acc>& c, Acc scale,
                                                   Acc sum_p, Acc row_term, Acc p, Acc t) {
  const Acc q = p / sum_p;
  const Acc direct = ClipPasses(c, q) ? -(scale * t) / ClipProbability(c, q) : Acc(0);
  return direct / sum_p + row_term;
}

template <typename Acc>
MMAE_HOST_DEVICE Acc SparseProbabilityGradientValue(const CeConstants<Acc>& c, Acc scale,
                                                    Acc sum_clipped, Acc p, bool is_target) {
  const Acc clipped = ClipProbability(c, p);
  const Acc softmax_minus_label = clipped / sum_clipped - (is_target ? Acc(1) : Acc(0));
  return ClipPasses(c, p) ? scale * softmax_minus_label / clipped : Acc(0);
}

// The row term of the dense probability gradient: G * V / S.
template <typename Acc>
MMAE_HOST_DEVICE Acc DenseProbabilityRowTerm(Acc scale, Acc sum_p, Acc v) {
  return scale * v / sum_p;
}

// ---------------------------------------------------------------------------
// Whole-row routines for the host (the CPU launchers), in the masked MAE's
// 16-lane order: lane l sees elements l, l + 16, ...; the tail goes to lanes
// 0.. after their other elements; lanes are combined by the same pairwise tree.

template <typename Acc>
struct CeRowSummary {
  Acc keep;
  Acc ce;
  Acc stats[kCeRowStats];
};

// Every lane of a full block is in the row; a tail block has `count`.
struct CeFullBlock {
  static constexpr bool In(int) { return true; }
};
struct CeTailBlock {
  int count;
  bool In(int l) const { return l < count; }
};

// Calls fn(t, p, lanes) for every block of kHostLanes elements of the row,
// in order, with t and p as Acc (t unread for sparse targets) and lanes a
// CeFullBlock or CeTailBlock; lanes past the row hold `fill`.
template <typename T, typename TargetRow, typename Acc, typename Fn>
inline void ForEachCeBlock(const TargetRow& y_true, const T* y_pred, int64_t num_classes,
                           Acc fill, const Fn& fn) {
  constexpr bool kSparse = std::is_same_v<TargetRow, SparseTargetRow>;
  const int64_t full = num_classes - num_classes % kHostLanes;
  for (int64_t base = 0; base < full; base += kHostLanes) {
    Acc t[kHostLanes], p[kHostLanes];
    if constexpr (kSparse) {
      for (int l = 0; l < kHostLanes; ++l) t[l] = Acc(0);
    } else {
      LoadLanes(y_true.values + base, t);
    }
    LoadLanes(y_pred + base, p);
    fn(t, p, CeFullBlock{}, base);
  }
  if (full < num_classes) {
    Acc t[kHostLanes], p[kHostLanes];
    const CeTailBlock tail{static_cast<int>(num_classes - full)};
    for (int l = 0; l < kHostLanes; ++l) {
      t[l] = tail.In(l) ? y_true.template At<Acc>(full + l) : fill;
      p[l] = tail.In(l) ? static_cast<Acc>(y_pred[full + l]) : fill;
    }
    fn(t, p, tail, full);
  }
}

// The pairwise lane tree of the masked MAE (ScanRow): sums, and maxima by
// Improves (NaN never enters).
template <typename Acc>
inline Acc LaneTreeSum(Acc* lanes) {
  for (int width = kHostLanes / 2; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}
template <typename Acc>
inline Acc LaneTreeMax(Acc* lanes) {
  for (int width = kHostLanes / 2; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) {
      lanes[l] = Improves(lanes[l + width], lanes[l]) ? lanes[l + width] : lanes[l];
    }
  }
  return lanes[0];
}

// t' with the smoothing decided at compile time (so the row loops vectorize).
template <bool kSmoothing, typename Acc>
inline Acc SmoothTargetIf(const CeConstants<Acc>& c, Acc t) {
  if constexpr (kSmoothing) {
    return t * c.smooth_scale + c.smooth_offset;
  } else {
    return t;
  }
}

// kLogits and kSmoothing are c.from_logits and c.smoothing, as template
// arguments so that the loops have no branch (ScanCeRow dispatches).
template <bool kLogits, bool kSmoothing, typename T, typename TargetRow>
inline CeRowSummary<typename AccumulatorOf<T>::type> ScanCeRowAs(
    const TargetRow& y_true, const T* y_pred, int64_t num_classes, const MaskedTokenSet& tokens,
    const CeConstants<typename AccumulatorOf<T>::type>& c) {
  using Acc = typename AccumulatorOf<T>::type;
  constexpr bool kSparse = std::is_same_v<TargetRow, SparseTargetRow>;
  const Acc lowest = LowestFinite<Acc>(ElementKindOf<T>::value);
  // Pass 1: the argmax candidates of t and y_pred, and the row sum the
  // second pass needs: sum t' (dense logits), sum p (dense probabilities),
  // sum clip(p) (sparse probabilities).
  Acc t_best[kHostLanes], p_best[kHostLanes], sum1[kHostLanes];
  for (int l = 0; l < kHostLanes; ++l) {
    t_best[l] = p_best[l] = lowest;
    sum1[l] = Acc(0);
  }
  constexpr bool logits = kLogits;
  ForEachCeBlock(y_true, y_pred, num_classes, lowest, [&](const Acc* t, const Acc* p, auto lanes,
                                                          int64_t) {
    for (int l = 0; l < kHostLanes; ++l) {
      if constexpr (!kSparse) t_best[l] = Improves(t[l], t_best[l]) ? t[l] : t_best[l];
      p_best[l] = Improves(p[l], p_best[l]) ? p[l] : p_best[l];
      Acc term;
      if constexpr (logits) {
        term = kSparse ? Acc(0) : SmoothTargetIf<kSmoothing>(c, t[l]);
      } else {
        term = kSparse ? ClipProbability(c, p[l]) : p[l];
      }
      sum1[l] += lanes.In(l) ? term : Acc(0);  // +0.0 leaves a sum's bits as they are
    }
  });
  const Acc t_max = kSparse ? Acc(0) : LaneTreeMax(t_best);
  const Acc p_max = LaneTreeMax(p_best);
  const Acc row_sum = LaneTreeSum(sum1);
  CeRowSummary<Acc> out{};
  out.keep = HostKeepFactor(y_true, y_pred, num_classes, t_max, p_max, tokens);
  if constexpr (kSparse) {
    if constexpr (!logits) {
      // Sparse probabilities: log(sum clip p) - log(clip p_id); no second pass.
      out.ce = DetLog(row_sum) - DetLog(ClipProbability(c, static_cast<Acc>(y_pred[y_true.id])));
      out.stats[0] = row_sum;
      out.stats[1] = Acc(0);
      return out;
    }
  }
  // Pass 2 (the row is in cache): logits: s = sum exp(z - m) and
  // w = sum t' (m - z); dense probabilities: l = sum t' log(clip(p / S)) and
  // V = sum [clip passes] t'.
  Acc acc_a[kHostLanes], acc_b[kHostLanes];
  for (int l = 0; l < kHostLanes; ++l) acc_a[l] = acc_b[l] = Acc(0);
  if constexpr (logits) {
    const Acc m = p_max;
    ForEachCeBlock(y_true, y_pred, num_classes, m, [&](const Acc* t, const Acc* z, auto lanes,
                                                       int64_t) {
      for (int l = 0; l < kHostLanes; ++l) {
        const Acc e = DetExp(z[l] - m);
        acc_a[l] += lanes.In(l) ? e : Acc(0);
        if constexpr (!kSparse) {
          const Acc w = SmoothTargetIf<kSmoothing>(c, t[l]) * (m - z[l]);
          acc_b[l] += lanes.In(l) ? w : Acc(0);
        }
      }
    });
    const Acc s = LaneTreeSum(acc_a);
    Acc sum_t, w;
    if constexpr (kSparse) {
      sum_t = Acc(1);
      w = m - static_cast<Acc>(y_pred[y_true.id]);
    } else {
      sum_t = row_sum;
      w = LaneTreeSum(acc_b);
    }
    out.ce = LogitsCrossEntropy(sum_t, s, w);
    out.stats[0] = m;
    out.stats[1] = s;
    return out;
  } else if constexpr (!kSparse) {
    const Acc sum_p = row_sum;
    ForEachCeBlock(y_true, y_pred, num_classes, Acc(0), [&](const Acc* t, const Acc* p,
                                                            auto lanes, int64_t) {
      Acc tt[kHostLanes], q[kHostLanes];
      bool any_target = false;
      for (int l = 0; l < kHostLanes; ++l) {
        tt[l] = lanes.In(l) ? SmoothTargetIf<kSmoothing>(c, t[l]) : Acc(0);
        q[l] = p[l] / sum_p;
        any_target |= tt[l] != Acc(0);
      }
      if (any_target) {
        for (int l = 0; l < kHostLanes; ++l) {
          const Acc term = tt[l] * DetLog(ClipProbability(c, q[l]));
          acc_a[l] += lanes.In(l) ? term : Acc(0);
          acc_b[l] += lanes.In(l) && ClipPasses(c, q[l]) ? tt[l] : Acc(0);
        }
      } else {
        // t' = 0 everywhere in the block: each term is 0 * log(clip(q)), a
        // signed zero (which leaves a sum that is never -0.0 as it is), or
        // NaN where q is NaN. Skipping the logs gives the same bits.
        for (int l = 0; l < kHostLanes; ++l) {
          const bool nan = lanes.In(l) && q[l] != q[l];
          acc_a[l] += nan ? q[l] : Acc(0);
        }
      }
    });
    out.ce = -LaneTreeSum(acc_a);
    out.stats[0] = sum_p;
    out.stats[1] = LaneTreeSum(acc_b);
  }
  return out;
}

template <typename T, typename TargetRow>
inline CeRowSummary<typename AccumulatorOf<T>::type> ScanCeRow(
    const TargetRow& y_true, const T* y_pred, int64_t num_classes, const MaskedTokenSet& tokens,
    const CeConstants<typename AccumulatorOf<T>::type>& c) {
  if (c.from_logits) {
    return c.smoothing ? ScanCeRowAs<true, true>(y_true, y_pred, num_classes, tokens, c)
                       : ScanCeRowAs<true, false>(y_true, y_pred, num_classes, tokens, c);
  }
  return c.smoothing ? ScanCeRowAs<false, true>(y_true, y_pred, num_classes, tokens, c)
                     : ScanCeRowAs<false, false>(y_true, y_pred, num_classes, tokens, c);
}

// The row's loss keep * CE (NaN canonical), its keep byte and statistics.
template <typename T, typename TargetRow>
inline T ComputeCeRowLoss(const TargetRow& y_true, const T* y_pred, int64_t num_classes,
                          const MaskedTokenSet& tokens,
                          const CeConstants<typename AccumulatorOf<T>::type>& c,
                          uint8_t* keep_byte, double* stats) {
  const auto row = ScanCeRow(y_true, y_pred, num_classes, tokens, c);
  *keep_byte = KeepByte(row.keep);
  for (int k = 0; k < kCeRowStats; ++k) stats[k] = static_cast<double>(row.stats[k]);
  return static_cast<T>(CanonicalNaN(row.keep * row.ce));
}

// d loss / d y_pred for one row from the forward's keep byte and statistics:
// one streaming pass.
template <bool kLogits, bool kSmoothing, typename T, typename TargetRow>
inline void ComputeCeRowGradientAs(const TargetRow& y_true, const T* y_pred, int64_t num_classes,
                                   const CeConstants<typename AccumulatorOf<T>::type>& c,
                                   uint8_t keep_byte, const double* stats, T upstream,
                                   T* grad_y_pred) {
  using Acc = typename AccumulatorOf<T>::type;
  constexpr bool kSparse = std::is_same_v<TargetRow, SparseTargetRow>;
  // G = upstream * keep, rounded to T (the Mul gradient of keep * CE).
  const Acc scale = static_cast<Acc>(
      static_cast<T>(static_cast<Acc>(upstream) * KeepFromByte<Acc>(keep_byte)));
  const Acc stat0 = static_cast<Acc>(stats[0]);
  const Acc stat1 = static_cast<Acc>(stats[1]);
  const Acc row_term = DenseProbabilityRowTerm(scale, stat0, stat1);
  const Acc inverse_s = Acc(1) / stat1;
  const auto element = [&](Acc t, Acc p, bool is_target) {
    if constexpr (kLogits) {
      return LogitsGradientValue(scale, stat0, inverse_s, p, SmoothTargetIf<kSmoothing>(c, t));
    } else if constexpr (kSparse) {
      return SparseProbabilityGradientValue(c, scale, stat0, p, is_target);
    } else {
      return DenseProbabilityGradientValue(c, scale, stat0, row_term, p,
                                           SmoothTargetIf<kSmoothing>(c, t));
    }
  };
  const int64_t full = num_classes - num_classes % kHostLanes;
  for (int64_t base = 0; base < full; base += kHostLanes) {
    Acc t[kHostLanes], p[kHostLanes], g[kHostLanes];
    if constexpr (kSparse) {
      for (int l = 0; l < kHostLanes; ++l) t[l] = Acc(0);  // the one at id is redone below
    } else {
      LoadLanes(y_true.values + base, t);
    }
    LoadLanes(y_pred + base, p);
    for (int l = 0; l < kHostLanes; ++l) g[l] = CanonicalNaN(element(t[l], p[l], false));
    for (int l = 0; l < kHostLanes; ++l) grad_y_pred[base + l] = static_cast<T>(g[l]);
  }
  for (int64_t i = full; i < num_classes; ++i) {
    grad_y_pred[i] = static_cast<T>(CanonicalNaN(
        element(y_true.template At<Acc>(i), static_cast<Acc>(y_pred[i]), false)));
  }
  if constexpr (kSparse) {
    grad_y_pred[y_true.id] = static_cast<T>(
        CanonicalNaN(element(Acc(1), static_cast<Acc>(y_pred[y_true.id]), true)));
  }
}

// d loss / d y_pred for one row from the forward's keep byte and statistics:
// one streaming pass.
template <typename T, typename TargetRow>
inline void ComputeCeRowGradient(const TargetRow& y_true, const T* y_pred, int64_t num_classes,
                                 const CeConstants<typename AccumulatorOf<T>::type>& c,
                                 uint8_t keep_byte, const double* stats, T upstream,
                                 T* grad_y_pred) {
  if (c.from_logits) {
    (c.smoothing ? ComputeCeRowGradientAs<true, true, T, TargetRow>
                 : ComputeCeRowGradientAs<true, false, T, TargetRow>)(
        y_true, y_pred, num_classes, c, keep_byte, stats, upstream, grad_y_pred);
  } else {
    (c.smoothing ? ComputeCeRowGradientAs<false, true, T, TargetRow>
                 : ComputeCeRowGradientAs<false, false, T, TargetRow>)(
        y_true, y_pred, num_classes, c, keep_byte, stats, upstream, grad_y_pred);
  }
}

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_CC_MATH_MASKED_CE_ROW_H_
