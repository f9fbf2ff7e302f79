// The CPU launchers (masked_mae_cpu.h): pick, once per process, the
// instruction-set variant of the row loops this CPU runs best
// (masked_mae_cpu_{baseline,avx2,avx512}.cc, the same source compiled for each
// target) and forward every call to it. No TensorFlow here, so the same object
// serves every front door.
#include "cc/cpu/masked_mae_cpu.h"

#include <cstdlib>
#include <string>
#include <type_traits>

#include "cc/cpu/denormal_flush.h"
#include "cc/cpu/masked_mae_cpu_abi.h"
#include "cc/math/host_float16.h"

namespace fused_masked_mae {
namespace {

struct Variant {
  const char* name;
  const FmmCpuKernels* (*kernels)();
  bool (*supported)();
};

bool Always() { return true; }

#if defined(__x86_64__)
// __builtin_cpu_supports also checks that the OS saves the vector registers
// (XGETBV) for the AVX and AVX-512 features.
bool HasAvx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
bool HasAvx512() {
  return HasAvx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
#endif

// From least to most capable.
const Variant kVariants[] = {
    {"baseline", &fused_masked_mae_cpu_kernels_baseline, &Always},
#if defined(__x86_64__)
    {"avx2", &fused_masked_mae_cpu_kernels_avx2, &HasAvx2},
    {"avx512", &fused_masked_mae_cpu_kernels_avx512, &HasAvx512},
#endif
};

struct Selection {
  const FmmCpuKernels* kernels;
  std::string error;      // empty unless FUSED_MASKED_MAE_CPU_ISA was refused
  std::string supported;  // "baseline,avx2,..."
  std::string known;
};

Selection Select() {
  Selection s;
  const Variant* best = nullptr;
  for (const Variant& v : kVariants) {
    s.known += std::string(s.known.empty() ? "" : ",") + v.name;
    if (v.supported()) {
      best = &v;
      s.supported += std::string(s.supported.empty() ? "" : ",") + v.name;
    }
  }
  s.kernels = best->kernels();
  const char* forced = std::getenv(kCpuIsaEnvironmentVariable);
  if (forced == nullptr || *forced == '\0') return s;
  for (const Variant& v : kVariants) {
    if (v.name != std::string(forced)) continue;
    if (v.supported()) {
      s.kernels = v.kernels();
    } else {
      s.error = std::string(kCpuIsaEnvironmentVariable) + "=" + forced +
                ": this CPU does not support that instruction set (it supports " + s.supported +
                ")";
    }
    return s;
  }
  s.error = std::string(kCpuIsaEnvironmentVariable) + "=" + forced + " is not one of " + s.known +
            " (this CPU supports " + s.supported + ")";
  return s;
}

const Selection& Selected() {
  static const Selection selection = Select();
  return selection;
}

// The caller's ParallelFor behind the variants' C callback. Every range of
// rows runs with denormals flushed (TensorFlow's semantics, denormal_flush.h),
// on whichever thread the caller's ParallelFor runs it, and the thread's own
// mode is restored after.
void CallParallelFor(const void* ctx, int64_t rows, int64_t cost_per_row, FmmRowBody body,
                     void* body_ctx) {
  const ParallelFor& parallel_for = *static_cast<const ParallelFor*>(ctx);
  parallel_for(rows, cost_per_row, [body, body_ctx](int64_t begin, int64_t end) {
    const ScopedDenormalFlush flush;
    body(body_ctx, begin, end);
  });
}

template <typename T>
constexpr int kDtypeIndex = static_cast<int>(ElementKindOf<T>::value);
template <typename T, typename TargetT>
constexpr int kTargetIndex = std::is_same_v<TargetT, T> ? 0 : std::is_same_v<TargetT, int32_t> ? 1 : 2;

}  // namespace

const char* CpuIsa() { return Selected().kernels->name; }
const char* CpuIsaError() { return Selected().error.c_str(); }
const char* CpuIsasSupported() { return Selected().supported.c_str(); }

template <typename T, typename TargetT>
void CpuMaskedMaeForward(const TargetT* y_true, const T* y_pred, int64_t rows,
                         int64_t num_classes, const MaskedTokenSet& tokens, T* loss,
                         uint8_t* row_keep, const ParallelFor& parallel_for) {
  Selected().kernels->forward[kDtypeIndex<T>][kTargetIndex<T, TargetT>](
      y_true, y_pred, rows, num_classes, &tokens, loss, row_keep, &CallParallelFor,
      &parallel_for);
}

template <typename T, typename TargetT>
void CpuMaskedMaeGradient(const TargetT* y_true, const T* y_pred, const uint8_t* row_keep,
                          const T* grad_loss, int64_t rows, int64_t num_classes,
                          T* grad_y_pred, const ParallelFor& parallel_for) {
  Selected().kernels->gradient[kDtypeIndex<T>][kTargetIndex<T, TargetT>](
      y_true, y_pred, row_keep, grad_loss, rows, num_classes, grad_y_pred, &CallParallelFor,
      &parallel_for);
}

#define INSTANTIATE_CPU_LAUNCHERS(T, TargetT)                                                \
  template void CpuMaskedMaeForward<T, TargetT>(const TargetT*, const T*, int64_t, int64_t,  \
                                                const MaskedTokenSet&, T*, uint8_t*,         \
                                                const ParallelFor&);                         \
  template void CpuMaskedMaeGradient<T, TargetT>(const TargetT*, const T*, const uint8_t*,   \
                                                 const T*, int64_t, int64_t, T*,             \
                                                 const ParallelFor&);
#define INSTANTIATE_CPU_DTYPE(T)      \
  INSTANTIATE_CPU_LAUNCHERS(T, T)       \
  INSTANTIATE_CPU_LAUNCHERS(T, int32_t) \
  INSTANTIATE_CPU_LAUNCHERS(T, int64_t)
INSTANTIATE_CPU_DTYPE(HostHalf)
INSTANTIATE_CPU_DTYPE(HostBFloat16)
INSTANTIATE_CPU_DTYPE(float)
INSTANTIATE_CPU_DTYPE(double)
#undef INSTANTIATE_CPU_DTYPE
#undef INSTANTIATE_CPU_LAUNCHERS

}  // namespace fused_masked_mae

// For ctypes (the TensorFlow op library has no Python module of its own).
extern "C" __attribute__((visibility("default"))) const char* fused_masked_mae_cpu_isa(void) {
  return fused_masked_mae::CpuIsa();
}
extern "C" __attribute__((visibility("default"))) const char* fused_masked_mae_cpu_isa_error(
    void) {
  return fused_masked_mae::CpuIsaError();
}
extern "C" __attribute__((visibility("default"))) const char* fused_masked_mae_cpu_isas_supported(
    void) {
  return fused_masked_mae::CpuIsasSupported();
}
