// Runs every CUDA kernel of cc/cuda/masked_mae_kernels.cu.cc on the CUDA
// emulator (tests/cuda_emu/README.md), launched by the real host launchers
// (cc/cuda/masked_mae_launch.cc), and compares each result bit for bit with
// the CPU launchers (cc/cpu/masked_mae_cpu.h): 4 dtypes x dense/int32/int64
// targets x forward/gradient, over row lengths around the kernels' lane-group
// and block sizes, misaligned row starts, ties across lanes, warps and blocks,
// NaN/Inf/-0.0/lowest rows, bad sparse ids, and more rows than a reduced
// grid cap (CUDA_EMU_GRID_CAP) lets the launch cover.
//
// The loss is a sum whose order differs between the CPU (16 lanes) and the
// GPU (lanes of chunks, then a butterfly): rows hold values on a grid of 1/8
// small enough that every order gives the same sum exactly, so the results
// are compared bit for bit; one row kind of arbitrary values is compared to
// rounding instead. NaN results are compared as NaN (the CPU launchers return
// one canonical NaN, the GPU's bits may differ). Keep bytes and gradients are
// compared bit for bit everywhere.
//
//   emu_test [--full] [--seed N] [--max-c N] [--only DTYPE]
#include <sanitizer/asan_interface.h>

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cc/cpu/masked_mae_cpu.h"
#include "cc/cuda/masked_mae_cuda.h"
#include "cc/cuda/masked_mae_kernel_abi.h"
#include "cc/math/host_float16.h"
#include "tests/cuda_emu/emu_runtime.h"

using namespace fused_masked_mae;

namespace {

int failures = 0;
uint64_t comparisons = 0;

#define EXPECT(cond, ...)                                         \
  do {                                                            \
    ++comparisons;                                                \
    if (!(cond)) {                                                \
      if (++failures <= 25) {                                     \
        std::printf("MISMATCH [%s] ", Describe().c_str());        \
        std::printf(__VA_ARGS__);                                 \
        std::printf("\n");                                        \
      }                                                           \
    }                                                             \
  } while (0)

// What the running case is, for messages.
std::string case_text;
std::string Describe() { return case_text; }

template <typename T> const char* DtypeName();
template <> const char* DtypeName<HostHalf>() { return "f16"; }
template <> const char* DtypeName<HostBFloat16>() { return "bf16"; }
template <> const char* DtypeName<float>() { return "f32"; }
template <> const char* DtypeName<double>() { return "f64"; }

template <typename T> const char* TargetName();
template <> const char* TargetName<int32_t>() { return "i32"; }
template <> const char* TargetName<int64_t>() { return "i64"; }

template <typename T>
using AccOf = typename AccumulatorOf<T>::type;

template <typename T>
T FromDouble(double v) {
  return static_cast<T>(static_cast<AccOf<T>>(v));
}

template <typename T>
double ToDouble(T v) {
  return static_cast<double>(static_cast<AccOf<T>>(v));
}

template <typename T>
uint64_t Bits(T v) {
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
bool SameResult(T a, T b) {
  const double da = ToDouble(a), db = ToDouble(b);
  if (std::isnan(da) || std::isnan(db)) return std::isnan(da) && std::isnan(db);
  return Bits(a) == Bits(b);
}

// An exact-size allocation at `offset` elements past a 16-byte boundary, the
// bytes before it poisoned: any read outside [0, n) is an ASan report.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer(size_t n, size_t offset) : offset_(offset), n_(n) {
    raw_ = static_cast<char*>(std::aligned_alloc(16, Round16((offset + n) * sizeof(T) + 16)));
    // Allocate exactly: the last element ends the usable region.
    const size_t used = (offset + n) * sizeof(T);
    data_ = reinterpret_cast<T*>(raw_ + offset * sizeof(T));
    ASAN_POISON_MEMORY_REGION(raw_, offset * sizeof(T));
    ASAN_POISON_MEMORY_REGION(raw_ + used, Round16(used + 16) - used);
  }
  ~DeviceBuffer() {
    ASAN_UNPOISON_MEMORY_REGION(raw_, Round16((offset_ + n_) * sizeof(T) + 16));
    std::free(raw_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  T* data() { return data_; }
  T& operator[](size_t i) { return data_[i]; }

 private:
  static size_t Round16(size_t n) { return (n + 15) / 16 * 16; }
  char* raw_;
  T* data_;
  size_t offset_, n_;
};

enum RowKind {
  kRandomGrid,     // values k/8, |k| <= 64: frequent ties, exact sums
  kAllEqual,       // one value everywhere: argmax 0
  kSpreadTies,     // the maximum at 2-4 positions far apart (other lanes, warps, blocks)
  kMatchedToken,   // t's and p's argmax at the same (often masked) token
  kNaNs,           // NaN here and there in t and p
  kInfs,           // +-inf
  kSignedZeros,    // 0.0 and -0.0 as the maximum
  kLowest,         // the dtype's lowest finite value and -inf: no candidate
  kAllNaN,         // nothing but NaN
  kArbitrary,      // arbitrary values: the loss is compared to rounding
  kNumRowKinds
};

struct Rng {
  std::mt19937_64 gen;
  explicit Rng(uint64_t seed) : gen(seed) {}
  int64_t Int(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(gen); }
  double Grid() { return static_cast<double>(Int(-64, 64)) / 8.0; }
  bool Chance(int percent) { return Int(0, 99) < percent; }
};

template <typename T>
double Lowest() {
  return static_cast<double>(LowestFinite<AccOf<T>>(ElementKindOf<T>::value));
}

// Positions spread over the row: in different 16-byte chunks, so in
// different lanes, warps and (for block-per-row launches) blocks' halves.
std::vector<int64_t> SpreadPositions(Rng& rng, int64_t c, int count) {
  std::vector<int64_t> out;
  for (int k = 0; k < count; ++k) out.push_back(rng.Int(0, c - 1));
  if (c > 1 && rng.Chance(50)) out.push_back(c - 1);
  std::sort(out.begin(), out.end());
  return out;
}

// Fills one row of t and p (as doubles; converted by the caller) of kind `kind`.
template <typename T>
void FillRow(Rng& rng, RowKind kind, int64_t c, const std::vector<int64_t>& tokens, double* t,
             double* p, int* lowest_budget) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < c; ++i) {
    t[i] = rng.Grid();
    p[i] = rng.Grid();
  }
  switch (kind) {
    case kRandomGrid:
      break;
    case kAllEqual: {
      const double v = rng.Grid();
      for (int64_t i = 0; i < c; ++i) t[i] = p[i] = v;
      break;
    }
    case kSpreadTies:
    case kMatchedToken: {
      const double top = kind == kSpreadTies ? 9.0 : 8.5;
      std::vector<int64_t> where = SpreadPositions(rng, c, static_cast<int>(rng.Int(1, 3)));
      if (kind == kMatchedToken && !tokens.empty()) where.insert(where.begin(), tokens[rng.Int(0, tokens.size() - 1)]);
      std::sort(where.begin(), where.end());
      for (int64_t i : where) t[i] = top;
      std::vector<int64_t> pwhere = rng.Chance(70) ? where : SpreadPositions(rng, c, 2);
      for (int64_t i : pwhere) p[i] = top;
      if (rng.Chance(30)) p[where.front()] = -top;  // p's argmax moves
      break;
    }
    case kNaNs:
      for (int k = 0; k < 3; ++k) {
        (rng.Chance(50) ? t : p)[rng.Int(0, c - 1)] = nan;
      }
      break;
    case kInfs:
      for (int k = 0; k < 3; ++k) {
        (rng.Chance(50) ? t : p)[rng.Int(0, c - 1)] = rng.Chance(50) ? inf : -inf;
      }
      break;
    case kSignedZeros:
      for (int64_t i = 0; i < c; ++i) {
        t[i] = rng.Chance(50) ? -0.0 : (rng.Chance(50) ? 0.0 : -rng.Int(1, 8) / 8.0);
        p[i] = rng.Chance(50) ? -0.0 : (rng.Chance(50) ? 0.0 : -rng.Int(1, 8) / 8.0);
      }
      break;
    case kLowest: {
      const double low = Lowest<T>();
      const bool all = rng.Chance(50);
      for (int64_t i = 0; i < c; ++i) {
        if (all) {
          t[i] = rng.Chance(50) ? low : -inf;
          p[i] = rng.Chance(50) ? low : -inf;
        }
      }
      if (!all) {
        for (int k = 0; k < 4 && *lowest_budget > 0; ++k, --*lowest_budget) {
          (rng.Chance(50) ? t : p)[rng.Int(0, c - 1)] = low;
        }
      }
      break;
    }
    case kAllNaN:
      for (int64_t i = 0; i < c; ++i) t[i] = p[i] = nan;
      break;
    case kArbitrary:
      for (int64_t i = 0; i < c; ++i) {
        t[i] = std::uniform_real_distribution<double>(-3, 3)(rng.gen);
        p[i] = std::uniform_real_distribution<double>(-3, 3)(rng.gen);
      }
      break;
    default:
      break;
  }
}

struct Config {
  bool full = false;
  uint64_t seed = 1;
  int64_t max_c = 32000;
  std::string only;
  int grid_cap = 3;
};

// The row lengths a dtype's launch shapes change at: lanes per row, and the
// forward's one-block-per-row sizes, are set by 16-byte chunks per lane.
template <typename T>
std::vector<int64_t> RowLengths(const Config& cfg, Rng& rng) {
  constexpr int64_t kVec = 16 / sizeof(T);
  std::set<int64_t> cs;
  for (int64_t c = 1; c <= 3 * kVec + 1; ++c) cs.insert(c);
  for (int64_t chunks = 1; chunks * kVec <= cfg.max_c; chunks *= 2) {
    for (int64_t mult : {int64_t{1}, int64_t{3}}) {
      const int64_t b = chunks * kVec * mult;
      for (int64_t d : {-kVec - 1, int64_t{-1}, int64_t{0}, int64_t{1}, kVec + 1}) {
        if (b + d >= 1 && b + d <= cfg.max_c) cs.insert(b + d);
      }
    }
  }
  for (int64_t c : {int64_t{1549}, int64_t{1550}, cfg.max_c}) {
    if (c <= cfg.max_c) cs.insert(c);
  }
  if (cfg.full) {
    for (int64_t c = 1; c <= std::min<int64_t>(cfg.max_c, 700); ++c) cs.insert(c);
    for (int k = 0; k < 200; ++k) cs.insert(rng.Int(1, cfg.max_c));
  } else {
    for (int k = 0; k < 6; ++k) cs.insert(rng.Int(1, cfg.max_c));
  }
  return {cs.begin(), cs.end()};
}

template <typename T, typename TargetT>
void RunCase(const Config& cfg, Rng& rng, int64_t c, int case_index) {
  constexpr bool kDense = std::is_same_v<TargetT, T>;
  constexpr int64_t kVec = 16 / sizeof(T);
  using Acc = AccOf<T>;
  // Enough rows to cover several launch blocks (and the reduced grid cap)
  // for short rows; a few rows for long ones.
  const int64_t budget = cfg.full ? 400000 : 120000;
  int64_t rows = std::max<int64_t>(3, std::min<int64_t>(budget / c, 1100));
  if (!cfg.full && c > 64) rows = std::min<int64_t>(rows, 2 + case_index % 7);
  const int grid_cap = case_index % 2 == 0 ? cfg.grid_cap : 0;
  setenv("CUDA_EMU_GRID_CAP", std::to_string(grid_cap).c_str(), 1);
  // The GPU's size decides the launch shape (blocks of 32..256 threads for
  // lane groups, larger blocks for few long rows).
  const int sms = (case_index / 2) % 3 == 0 ? 1 : (case_index / 2) % 3 == 1 ? 8 : 132;
  setenv("CUDA_EMU_SM_COUNT", std::to_string(sms).c_str(), 1);
  // Every third case reduces 64-bit argmax indices (the path for rows of more
  // than 2^32 - 1 classes).
  const bool index64 = (case_index + case_index / 3) % 3 == 1;
  setenv("CUDA_EMU_INDEX32_MAX_CLASSES", index64 ? "0" : "", 1);
  const size_t off_t = static_cast<size_t>(rng.Int(0, kVec - 1));
  const size_t off_p = rng.Chance(50) ? off_t : static_cast<size_t>(rng.Int(0, kVec - 1));
  const size_t off_g = rng.Chance(70) ? off_p : static_cast<size_t>(rng.Int(0, kVec - 1));
  char text[256];
  std::snprintf(text, sizeof(text), "%s %s C=%" PRId64 " rows=%" PRId64
                " offsets t/p/grad=%zu/%zu/%zu grid_cap=%d index%d sms=%d",
                DtypeName<T>(), kDense ? "dense" : TargetName<TargetT>(), c, rows, off_t, off_p,
                off_g, grid_cap, index64 ? 64 : 32, sms);
  case_text = text;

  // Masked tokens: the row ends, the middle, and a few others.
  std::vector<int64_t> token_ids = {0, c - 1, c / 2, rng.Int(0, c - 1)};
  std::sort(token_ids.begin(), token_ids.end());
  token_ids.erase(std::unique(token_ids.begin(), token_ids.end()), token_ids.end());
  MaskedTokenSet tokens;
  const std::string error = MakeMaskedTokenSet(token_ids.data(), token_ids.size(), c, &tokens);
  if (!error.empty()) {
    std::printf("bad tokens: %s\n", error.c_str());
    std::exit(2);
  }

  const size_t n = static_cast<size_t>(rows * c);
  const size_t target_count = kDense ? n : static_cast<size_t>(rows);
  DeviceBuffer<T> y_pred(n, off_p), grad(n, off_g);
  DeviceBuffer<TargetT> y_true(target_count, kDense ? off_t : 0);
  std::vector<TargetT> cpu_true(target_count);
  std::vector<T> cpu_pred(n), cpu_loss(rows), cpu_grad(n), grad_loss(rows);
  DeviceBuffer<T> loss(rows, 0), emu_grad_loss(rows, 0);
  DeviceBuffer<uint8_t> keep(rows, 0), emu_keep_in(rows, 0);
  std::vector<uint8_t> cpu_keep(rows), keep_in(rows);
  std::vector<bool> bad_row(rows, false), approx_row(rows, false);
  std::vector<double> t(c), p(c);
  int lowest_budget = std::is_same_v<T, HostHalf> ? 4 : 1 << 30;
  for (int64_t r = 0; r < rows; ++r) {
    const RowKind kind = static_cast<RowKind>((r + case_index) % kNumRowKinds);
    int row_budget = lowest_budget;
    FillRow<T>(rng, kind, c, token_ids, t.data(), p.data(), &row_budget);
    approx_row[r] = kind == kArbitrary;
    for (int64_t i = 0; i < c; ++i) {
      y_pred[r * c + i] = cpu_pred[r * c + i] = FromDouble<T>(p[i]);
      if constexpr (kDense) y_true[r * c + i] = cpu_true[r * c + i] = FromDouble<T>(t[i]);
    }
    if constexpr (!kDense) {
      // The id of the row's target argmax (a token often), or a bad id.
      TargetT id = static_cast<TargetT>(
          rng.Chance(40) ? token_ids[rng.Int(0, token_ids.size() - 1)] : rng.Int(0, c - 1));
      if (kind == kMatchedToken || kind == kSpreadTies) {
        // p's argmax at the id: a masked row when the id is a token.
        for (int64_t i = 0; i < c; ++i) {
          if (ToDouble(y_pred[r * c + i]) >= 9.0) y_pred[r * c + i] = cpu_pred[r * c + i] = FromDouble<T>(0.0);
        }
        y_pred[r * c + id] = cpu_pred[r * c + id] = FromDouble<T>(9.0);
      }
      if (rng.Chance(4)) {
        const int64_t bad[] = {-1, c, c + 7, static_cast<int64_t>(std::numeric_limits<TargetT>::min()),
                               static_cast<int64_t>(std::numeric_limits<TargetT>::max())};
        id = static_cast<TargetT>(bad[rng.Int(0, 4)]);
        bad_row[r] = true;
      }
      y_true[r] = id;
      cpu_true[r] = bad_row[r] ? TargetT(0) : id;  // the CPU launchers need valid ids
    }
    const double g = rng.Chance(3) ? std::numeric_limits<double>::quiet_NaN()
                     : rng.Chance(3) ? std::numeric_limits<double>::infinity()
                                     : rng.Grid();
    grad_loss[r] = emu_grad_loss[r] = FromDouble<T>(g);
  }

  // Forward.
  CpuMaskedMaeForward<T, TargetT>(cpu_true.data(), cpu_pred.data(), rows, c, tokens,
                                  cpu_loss.data(), cpu_keep.data(), SerialFor);
  CUresult r;
  if constexpr (kDense) {
    r = LaunchMaskedMaeForward<T>(y_true.data(), y_pred.data(), rows, c, tokens, loss.data(),
                                  keep.data(), nullptr);
  } else {
    r = LaunchSparseMaskedMaeForward<T, TargetT>(y_true.data(), y_pred.data(), rows, c, tokens,
                                                 loss.data(), keep.data(), nullptr);
  }
  EXPECT(r == CUDA_SUCCESS, "forward launch failed: %d", static_cast<int>(r));
  for (int64_t row = 0; row < rows; ++row) {
    const double got = ToDouble(loss[row]);
    if (bad_row[row]) {
      EXPECT(std::isnan(got), "row %" PRId64 " (bad id): loss %g, want NaN", row, got);
      continue;
    }
    const double want = ToDouble(cpu_loss[row]);
    EXPECT(keep[row] == cpu_keep[row], "row %" PRId64 ": keep %d, CPU %d", row, keep[row],
           cpu_keep[row]);
    if (approx_row[row]) {
      const double tol = (std::is_same_v<Acc, double> ? 1e-12 : 2e-6 * std::sqrt(double(c)) + 1e-6) *
                             std::fabs(want) + (sizeof(T) == 2 ? 1e-2 * std::fabs(want) : 0.0);
      EXPECT(std::fabs(got - want) <= tol || (std::isnan(got) && std::isnan(want)),
             "row %" PRId64 " (arbitrary values): loss %.17g, CPU %.17g", row, got, want);
    } else {
      EXPECT(SameResult(loss[row], cpu_loss[row]),
             "row %" PRId64 " (kind %d): loss %.17g (bits %" PRIx64 "), CPU %.17g (bits %" PRIx64 ")",
             row, static_cast<int>((row + case_index) % kNumRowKinds), got, Bits(loss[row]), want,
             Bits(cpu_loss[row]));
    }
  }
  // The forward with no keep output must give the same losses.
  if (case_index % 5 == 0) {
    DeviceBuffer<T> loss2(rows, 0);
    if constexpr (kDense) {
      r = LaunchMaskedMaeForward<T>(y_true.data(), y_pred.data(), rows, c, tokens, loss2.data(),
                                    nullptr, nullptr);
    } else {
      r = LaunchSparseMaskedMaeForward<T, TargetT>(y_true.data(), y_pred.data(), rows, c, tokens,
                                                   loss2.data(), nullptr, nullptr);
    }
    for (int64_t row = 0; row < rows; ++row) {
      EXPECT(SameResult(loss2[row], loss[row]), "row %" PRId64 ": loss without keep output differs", row);
    }
  }

  // Gradient, from the CPU's keep bytes (some rewritten to other nonzero bytes).
  for (int64_t row = 0; row < rows; ++row) {
    keep_in[row] = cpu_keep[row] != 0 && rng.Chance(10) ? static_cast<uint8_t>(rng.Int(2, 255))
                                                        : cpu_keep[row];
    emu_keep_in[row] = keep_in[row];
  }
  CpuMaskedMaeGradient<T, TargetT>(cpu_true.data(), cpu_pred.data(), keep_in.data(),
                                   grad_loss.data(), rows, c, cpu_grad.data(), SerialFor);
  if constexpr (kDense) {
    r = LaunchMaskedMaeGradient<T>(y_true.data(), y_pred.data(), emu_keep_in.data(),
                                   emu_grad_loss.data(), rows, c, grad.data(), nullptr);
  } else {
    r = LaunchSparseMaskedMaeGradient<T, TargetT>(y_true.data(), y_pred.data(), emu_keep_in.data(),
                                                  emu_grad_loss.data(), rows, c, grad.data(),
                                                  nullptr);
  }
  EXPECT(r == CUDA_SUCCESS, "gradient launch failed: %d", static_cast<int>(r));
  int row_failures = 0;
  for (int64_t row = 0; row < rows && row_failures < 3; ++row) {
    for (int64_t i = 0; i < c; ++i) {
      const size_t k = static_cast<size_t>(row * c + i);
      const bool ok = bad_row[row] ? std::isnan(ToDouble(grad[k])) : SameResult(grad[k], cpu_grad[k]);
      ++comparisons;
      if (!ok) {
        ++row_failures;
        EXPECT(false, "gradient row %" PRId64 " column %" PRId64 ": %.17g (bits %" PRIx64
               "), CPU %.17g%s", row, i, ToDouble(grad[k]), Bits(grad[k]), ToDouble(cpu_grad[k]),
               bad_row[row] ? " (bad id: want NaN)" : "");
        break;
      }
    }
  }
}

template <typename T>
void RunDtype(const Config& cfg, Rng& rng, int* case_index) {
  if (!cfg.only.empty() && cfg.only != DtypeName<T>()) return;
  const std::vector<int64_t> cs = RowLengths<T>(cfg, rng);
  const uint64_t before = comparisons;
  for (int64_t c : cs) {
    RunCase<T, T>(cfg, rng, c, (*case_index)++);
    RunCase<T, int32_t>(cfg, rng, c, (*case_index)++);
    RunCase<T, int64_t>(cfg, rng, c, (*case_index)++);
    if (failures > 25) return;
  }
  std::printf("%s: %zu row lengths x 3 target kinds, %" PRIu64 " comparisons\n", DtypeName<T>(),
              cs.size(), comparisons - before);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--full") {
      cfg.full = true;
    } else if (arg == "--seed" && i + 1 < argc) {
      cfg.seed = std::strtoull(argv[++i], nullptr, 10);
    } else if (arg == "--max-c" && i + 1 < argc) {
      cfg.max_c = std::strtoll(argv[++i], nullptr, 10);
    } else if (arg == "--only" && i + 1 < argc) {
      cfg.only = argv[++i];
    } else if (arg == "--grid-cap" && i + 1 < argc) {
      cfg.grid_cap = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--full] [--seed N] [--max-c N] [--only f16|bf16|f32|f64] [--grid-cap N]\n", argv[0]);
      return 2;
    }
  }
  Rng rng(cfg.seed);
  int case_index = 0;
  RunDtype<HostHalf>(cfg, rng, &case_index);
  RunDtype<HostBFloat16>(cfg, rng, &case_index);
  RunDtype<float>(cfg, rng, &case_index);
  RunDtype<double>(cfg, rng, &case_index);
  const cuda_emu::Stats& s = cuda_emu::GetStats();
  std::printf("kernels launched: %zu of %d; launches %" PRIu64 ", blocks %" PRIu64
              ", threads %" PRIu64 ", shuffles %" PRIu64 ", barriers %" PRIu64
              ", checked loads %" PRIu64 "\n",
              s.launches_by_kernel.size(), kNumKernels, s.launches, s.blocks, s.threads,
              s.shuffles, s.barriers, s.checked_loads);
  for (int k = 0; k < kNumKernels; ++k) {
    if (!s.launches_by_kernel.count(k) && cfg.only.empty()) {
      std::printf("never launched: %s\n", KernelName(k).c_str());
    }
  }
  std::printf("%s: %d failures in %" PRIu64 " comparisons (%d cases)\n",
              failures == 0 ? "PASSED" : "FAILED", failures, comparisons, case_index);
  return failures == 0 ? 0 : 1;
}
