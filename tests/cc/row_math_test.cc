// Standalone test of cc/math/masked_mae_row.h and host_float16.h, without
// TensorFlow or Python. Built and run by tests/test_cc_row_math.py (and usable
// under sanitizers or valgrind as is).
//
// CheckDenormals: the CUDA kernels' explicit denormal flushing
// (ExplicitDenormals), in the host row loops' lane order, gives the host row
// loops' bits under the CPU flush mode (ScopedDenormalFlush), for rows full of
// denormals and of normals whose differences are denormal.
//
// The CUDA kernels reduce a row as "lanes observe chunks in increasing order,
// then a butterfly of Combine()s"; the host scans in two passes. Here both
// are run on the host, for every lane-group size the kernels use, on rows
// full of ties, NaN, +-inf and -0.0, and must agree with a brute-force
// statement of tf.math.argmax's rule.
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "cc/cpu/denormal_flush.h"
#include "cc/math/host_float16.h"
#include "cc/math/masked_mae_row.h"

using namespace fused_masked_mae;

static int failures = 0;
#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      ++failures;                                           \
      if (failures < 20) {                                  \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                           \
        std::printf("\n");                                  \
      }                                                     \
    }                                                       \
  } while (0)

// tf.math.argmax, stated directly: first index of the largest element above
// `lowest` (never NaN), else 0.
template <typename T>
int64_t BruteArgmax(const std::vector<T>& row, double lowest) {
  int64_t best = -1;
  for (size_t i = 0; i < row.size(); ++i) {
    const double v = static_cast<double>(static_cast<float>(row[i]));
    if (!(v > lowest)) continue;
    if (best < 0 || v > static_cast<double>(static_cast<float>(row[best]))) best = i;
  }
  return best < 0 ? 0 : best;
}

template <>
int64_t BruteArgmax<double>(const std::vector<double>& row, double lowest) {
  int64_t best = -1;
  for (size_t i = 0; i < row.size(); ++i) {
    if (!(row[i] > lowest)) continue;
    if (best < 0 || row[i] > row[best]) best = i;
  }
  return best < 0 ? 0 : best;
}

// The CUDA kernels' order: lane l of `group` observes 16-byte chunks l,
// l + group, ...; then a butterfly over the lanes.
template <typename T>
RowPartial<typename AccumulatorOf<T>::type> LaneScan(const std::vector<T>& t,
                                                     const std::vector<T>& p, int group) {
  using Acc = typename AccumulatorOf<T>::type;
  const Acc lowest = LowestFinite<Acc>(ElementKindOf<T>::value);
  const int64_t c = t.size();
  const int64_t vec = 16 / sizeof(T);
  std::vector<RowPartial<Acc>> lanes(group, RowPartial<Acc>::Empty(lowest));
  for (int lane = 0; lane < group; ++lane) {
    for (int64_t chunk = lane; chunk * vec < c; chunk += group) {
      for (int64_t i = chunk * vec; i < std::min(c, (chunk + 1) * vec); ++i) {
        lanes[lane].Observe(static_cast<Acc>(t[i]), static_cast<Acc>(p[i]), i);
      }
    }
  }
  for (int offset = group / 2; offset > 0; offset /= 2) {
    std::vector<RowPartial<Acc>> next(group);
    for (int lane = 0; lane < group; ++lane) {
      next[lane] = RowPartial<Acc>::Combine(lanes[lane], lanes[lane ^ offset]);
    }
    lanes = next;
  }
  for (int lane = 1; lane < group; ++lane) {  // the butterfly leaves every lane equal
    EXPECT(lanes[lane].target.index == lanes[0].target.index &&
               lanes[lane].prediction.index == lanes[0].prediction.index &&
               (lanes[lane].abs_diff_sum == lanes[0].abs_diff_sum ||
                std::isnan(static_cast<double>(lanes[0].abs_diff_sum))),
           "lane %d differs after butterfly", lane);
  }
  return lanes[0];
}

template <typename T>
void CheckRows(const char* name, double lowest) {
  using Acc = typename AccumulatorOf<T>::type;
  std::mt19937 rng(1234);
  const double specials[] = {0.0, -0.0, 1.0, 1.0, 2.0, -1.0, NAN, INFINITY, -INFINITY, lowest};
  int rows_checked = 0;
  for (int64_t c : {1, 2, 7, 15, 16, 17, 33, 64, 100, 257}) {
    for (int rep = 0; rep < 60; ++rep) {
      std::vector<T> t(c), p(c);
      for (int64_t i = 0; i < c; ++i) {
        // Few distinct values: many ties, and every special value.
        t[i] = static_cast<T>(static_cast<Acc>(specials[rng() % 10]));
        p[i] = static_cast<T>(static_cast<Acc>(rng() % 3 == 0 ? specials[rng() % 10]
                                                               : static_cast<double>(rng() % 4)));
      }
      const int64_t t_arg = BruteArgmax(t, lowest);
      const int64_t p_arg = BruteArgmax(p, lowest);
      for (int token_case = 0; token_case < 3; ++token_case) {
        MaskedTokenSet tokens{};
        if (token_case == 1) tokens = {1, {t_arg}};
        if (token_case == 2) tokens = {2, {0, c - 1}};
        const bool masked = t_arg == p_arg && tokens.Contains(t_arg);
        const auto host = ScanRow(DenseRow(t.data()), p.data(), c, tokens);
        EXPECT(host.keep == (masked ? 0 : 1), "%s host keep C=%ld t=%ld p=%ld", name, (long)c,
               (long)t_arg, (long)p_arg);
        for (int group : {1, 2, 4, 8, 16, 32, 64, 256}) {
          const auto lanes = LaneScan(t, p, group);
          EXPECT(lanes.target.Result() == t_arg && lanes.prediction.Result() == p_arg,
                 "%s lanes=%d C=%ld argmax (%ld, %ld) vs (%ld, %ld)", name, group, (long)c,
                 (long)lanes.target.Result(), (long)lanes.prediction.Result(), (long)t_arg,
                 (long)p_arg);
          EXPECT(KeepFactor(lanes, tokens) == host.keep, "%s keep lanes=%d", name, group);
          const double a = static_cast<double>(lanes.abs_diff_sum);
          const double b = static_cast<double>(host.abs_diff_sum);
          EXPECT((std::isnan(a) && std::isnan(b)) || a == b ||
                     std::fabs(a - b) <= 1e-5 * std::fabs(b),
                 "%s sum lanes=%d %g vs %g", name, group, a, b);
        }
        ++rows_checked;
      }
    }
  }
  std::printf("%s: %d rows x 8 lane groups checked\n", name, rows_checked);
}

void CheckGradient() {
  // scale * sign(p - t): sign(+-0) = 0, NaN stays NaN, and the masked row's
  // scale is zero (so the gradient is +-0, or NaN where p - t is NaN).
  const std::vector<float> t = {0.f, 1.f, 0.f, 0.5f, NAN};
  const std::vector<float> p = {0.25f, 0.25f, 0.f, 0.5f, 1.f};
  // The keep byte comes from the forward (ComputeRowLoss), as in the kernels.
  std::vector<float> grad(5);
  MaskedTokenSet none{};
  uint8_t keep = 7;
  ComputeRowLoss(DenseRow(t.data()), p.data(), 5, none, &keep);
  EXPECT(keep == 1, "nothing masked: keep byte %d", keep);
  ComputeRowGradient(DenseRow(t.data()), p.data(), 5, keep, 2.0f, grad.data());
  const float expect[] = {0.4f, -0.4f, 0.f, 0.f, NAN};
  for (int i = 0; i < 4; ++i) EXPECT(grad[i] == expect[i], "grad[%d]=%g", i, grad[i]);
  EXPECT(std::isnan(grad[4]), "grad[4]=%g", grad[4]);
  MaskedTokenSet one{1, {1}};
  ComputeRowLoss(DenseRow(t.data()), p.data(), 5, one, &keep);  // argmax t=1, p=4: kept
  EXPECT(keep == 1, "kept row: keep byte %d", keep);
  ComputeRowGradient(DenseRow(t.data()), p.data(), 5, keep, 2.0f, grad.data());
  EXPECT(grad[0] == 0.4f, "kept row grad %g", grad[0]);
  const std::vector<float> t2 = {0.f, 1.f}, p2 = {0.f, 0.75f};
  ComputeRowLoss(DenseRow(t2.data()), p2.data(), 2, one, &keep);  // masked
  EXPECT(keep == 0, "masked row: keep byte %d", keep);
  ComputeRowGradient(DenseRow(t2.data()), p2.data(), 2, keep, 2.0f, grad.data());
  EXPECT(grad[0] == 0.f && grad[1] == 0.f && std::signbit(grad[1]), "masked grad %g %g", grad[0],
         grad[1]);
}

void CheckFloat16() {
  int bad = 0;
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    HostHalf h;
    h.bits = static_cast<uint16_t>(bits);
    const float f = static_cast<float>(h);
    const HostHalf back(f);
    // Every half survives half -> float -> half (NaN stays NaN).
    bad += std::isnan(f) ? !((back.bits & 0x7c00u) == 0x7c00u && (back.bits & 0x3ffu))
                         : back.bits != h.bits;
    HostBFloat16 b;
    b.bits = static_cast<uint16_t>(bits);
    const float fb = static_cast<float>(b);
    bad += std::isnan(fb) ? !std::isnan(static_cast<float>(HostBFloat16(fb)))
                          : HostBFloat16(fb).bits != b.bits;
  }
  EXPECT(bad == 0, "%d 16-bit round trips failed", bad);
  // Round to nearest even at the halfway points.
  EXPECT(HostHalf(1.0f + 0.5f / 1024).bits == 0x3c00u, "half tie to even (down)");
  EXPECT(HostHalf(1.0f + 1.5f / 1024).bits == 0x3c02u, "half tie to even (up)");
  EXPECT(HostHalf(65520.0f).bits == 0x7c00u, "half overflow to inf");
  EXPECT(HostBFloat16(1.0f + 1.0f / 256).bits == 0x3f80u, "bfloat16 tie to even");
}

template <typename T>
uint64_t BitsOf(T value) {
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

// Whether the CPU flush mode takes effect here (valgrind ignores it).
bool HardwareFlushWorks() {
  volatile float tiny = 1e-39f;
  volatile float one = 1.0f;
  const ScopedDenormalFlush flush;
  return ScopedDenormalFlush::FlushesDenormals() && tiny * one == 0.0f;
}

// The CUDA kernels' per-row math (explicit flushing), in the host loops' order:
// lane l of 16 observes elements l, l + 16, ..., then the lanes combine in the
// host's tree. Returns the loss and the keep byte, and writes the gradient.
template <typename T>
T ExplicitRow(const std::vector<T>& t, const std::vector<T>& p, const MaskedTokenSet& tokens,
              T upstream, uint8_t* keep_byte, std::vector<T>* grad) {
  using Acc = typename AccumulatorOf<T>::type;
  const Acc lowest = LowestFinite<Acc>(ElementKindOf<T>::value);
  const int64_t c = t.size();
  RowPartial<Acc> lanes[kHostLanes];
  for (auto& lane : lanes) lane = RowPartial<Acc>::Empty(lowest);
  for (int64_t i = 0; i < c; ++i) {
    lanes[i % kHostLanes].template Observe<ExplicitDenormals>(static_cast<Acc>(t[i]),
                                                              static_cast<Acc>(p[i]), i);
  }
  for (int width = kHostLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] = RowPartial<Acc>::Combine(lanes[l], lanes[l + width]);
  }
  const Acc keep = KeepFactor(lanes[0], tokens);
  *keep_byte = KeepByte(keep);
  const Acc scale = RowGradientScale<ExplicitDenormals>(upstream, KeepFromByte<Acc>(*keep_byte), c);
  for (int64_t i = 0; i < c; ++i) {
    (*grad)[i] = static_cast<T>(CanonicalNaN(ElementGradientValue<ExplicitDenormals>(
        scale, static_cast<Acc>(t[i]), static_cast<Acc>(p[i]))));
  }
  return static_cast<T>(CanonicalNaN(MaskedMean<ExplicitDenormals>(keep, lanes[0].abs_diff_sum, c)));
}

template <typename T>
void CheckDenormals(const char* name, const std::vector<double>& specials) {
  using Acc = typename AccumulatorOf<T>::type;
  if (!HardwareFlushWorks()) {
    std::printf("%s denormals: skipped (the CPU flush mode has no effect here)\n", name);
    return;
  }
  std::mt19937 rng(99);
  int rows_checked = 0;
  for (int64_t c : {1, 3, 4, 16, 17, 40, 100}) {
    for (int rep = 0; rep < 200; ++rep) {
      std::vector<T> t(c), p(c), hw_grad(c), ex_grad(c), ex_grad_ftz(c);
      for (int64_t i = 0; i < c; ++i) {
        t[i] = static_cast<T>(static_cast<Acc>(specials[rng() % specials.size()]));
        p[i] = static_cast<T>(static_cast<Acc>(specials[rng() % specials.size()]));
      }
      const T upstream = static_cast<T>(static_cast<Acc>(specials[rng() % specials.size()]));
      MaskedTokenSet tokens{};
      for (int64_t k = 0; k < c && k < 4; ++k) tokens.ids[tokens.count++] = k;
      uint8_t hw_keep = 7, ex_keep = 9, ex_keep_ftz = 11;
      T hw_loss, ex_loss_ftz;
      {
        const ScopedDenormalFlush flush;
        hw_loss = ComputeRowLoss(DenseRow(t.data()), p.data(), c, tokens, &hw_keep);
        ComputeRowGradient(DenseRow(t.data()), p.data(), c, hw_keep, upstream, hw_grad.data());
        ex_loss_ftz = ExplicitRow(t, p, tokens, upstream, &ex_keep_ftz, &ex_grad_ftz);
      }
      const T ex_loss = ExplicitRow(t, p, tokens, upstream, &ex_keep, &ex_grad);  // IEEE mode
      EXPECT(hw_keep == ex_keep && hw_keep == ex_keep_ftz, "%s C=%ld keep %d vs %d", name,
             (long)c, hw_keep, ex_keep);
      EXPECT(BitsOf(hw_loss) == BitsOf(ex_loss) && BitsOf(hw_loss) == BitsOf(ex_loss_ftz),
             "%s C=%ld loss %g vs %g", name, (long)c, (double)static_cast<Acc>(hw_loss),
             (double)static_cast<Acc>(ex_loss));
      for (int64_t i = 0; i < c; ++i) {
        EXPECT(BitsOf(hw_grad[i]) == BitsOf(ex_grad[i]) &&
                   BitsOf(hw_grad[i]) == BitsOf(ex_grad_ftz[i]),
               "%s C=%ld grad[%ld] %g vs %g", name, (long)c, (long)i,
               (double)static_cast<Acc>(hw_grad[i]), (double)static_cast<Acc>(ex_grad[i]));
      }
      ++rows_checked;
    }
  }
  // The flush itself: signed zeros, normals, NaN and inf kept.
  const Acc min = std::numeric_limits<Acc>::min();
  EXPECT(BitsOf(FlushDenormal(min / Acc(4))) == BitsOf(Acc(0)), "%s +denormal", name);
  EXPECT(BitsOf(FlushDenormal(-min / Acc(4))) == BitsOf(-Acc(0)), "%s -denormal", name);
  EXPECT(FlushDenormal(min) == min && FlushDenormal(-min) == -min, "%s min normal", name);
  EXPECT(std::isnan(static_cast<double>(FlushDenormal(std::numeric_limits<Acc>::quiet_NaN()))),
         "%s NaN", name);
  EXPECT(FlushDenormal(std::numeric_limits<Acc>::infinity()) ==
             std::numeric_limits<Acc>::infinity(), "%s inf", name);
  std::printf("%s denormals: %d rows checked\n", name, rows_checked);
}

int main() {
  CheckRows<float>("float32", -std::numeric_limits<float>::max());
  CheckRows<double>("float64", -std::numeric_limits<double>::max());
  CheckRows<HostHalf>("float16", -65504.0);
  CheckRows<HostBFloat16>("bfloat16", -3.38953138925153547590470800371487866880e+38);
  CheckGradient();
  CheckFloat16();
  {
    const double f = std::numeric_limits<float>::min();  // 1.1754944e-38
    const std::vector<double> f32 = {0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 3e-40, f, -f, 1.5 * f,
                                     1.25 * f, 2 * f, 1e-38, -1.5 * f, NAN, INFINITY, 4 * f,
                                     1e-45, 2.5e-39};
    CheckDenormals<float>("float32", f32);
    CheckDenormals<HostBFloat16>("bfloat16", f32);
    CheckDenormals<HostHalf>("float16", {0.0, -0.0, 1.0, 6e-8, -6e-8, 1e-5, 6.1e-5, NAN, 2e-7});
    const double d = std::numeric_limits<double>::min();
    CheckDenormals<double>("float64", {0.0, -0.0, 1.0, -1.0, 1e-310, -1e-310, 3e-310, d, -d,
                                       1.5 * d, 1.25 * d, 2 * d, 4 * d, -1.5 * d, NAN, INFINITY,
                                       5e-324});
  }
  std::printf("%s: %d failures\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
