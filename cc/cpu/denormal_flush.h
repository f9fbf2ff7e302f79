// ScopedDenormalFlush: the CPU's flush-to-zero mode for the duration of a
// scope, restoring the caller's mode after.
//
// The kernels' denormal semantics are TensorFlow's (see FlushDenormal in
// cc/math/masked_mae_row.h): denormal float32/float64 inputs read as zero and
// denormal results are flushed to zero. TensorFlow runs its CPU kernels in
// that mode already, but NumPy, JAX and PyTorch callers run IEEE (gradual
// underflow), so every CPU launcher sets it itself around the row loops, on
// every thread that computes rows: then every front door gives the same bits
// whatever the calling thread's mode.
//
// - x86-64: MXCSR FTZ (bit 15) and DAZ (bit 6), which govern SSE and AVX
//   (VEX/EVEX) arithmetic, comparisons and min/max alike; x87 is not used.
// - AArch64: FPCR.FZ (bit 24), which flushes denormal float32/float64 inputs
//   and results alike (FZ16, for half-precision arithmetic, is left alone: the
//   row loops widen 16-bit values to float32).
// - Elsewhere: no mode is set and denormals follow the caller's mode
//   (FlushesDenormals() says false there; the tests skip their checks).
#ifndef FUSED_MASKED_MAE_CC_CPU_DENORMAL_FLUSH_H_
#define FUSED_MASKED_MAE_CC_CPU_DENORMAL_FLUSH_H_

#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace fused_masked_mae {

class ScopedDenormalFlush {
 public:
#if defined(__x86_64__) || defined(__i386__)
  static constexpr unsigned kFlushBits = 0x8000u | 0x0040u;  // FTZ | DAZ
  ScopedDenormalFlush() : saved_(_mm_getcsr()) {
    if ((saved_ & kFlushBits) != kFlushBits) _mm_setcsr(saved_ | kFlushBits);
  }
  ~ScopedDenormalFlush() {
    if ((saved_ & kFlushBits) != kFlushBits) _mm_setcsr(saved_);
  }
  static constexpr bool FlushesDenormals() { return true; }

 private:
  unsigned saved_;
#elif defined(__aarch64__)
  static constexpr uint64_t kFlushBits = uint64_t{1} << 24;  // FPCR.FZ
  ScopedDenormalFlush() {
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved_));
    if ((saved_ & kFlushBits) == 0) __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_ | kFlushBits));
  }
  ~ScopedDenormalFlush() {
    if ((saved_ & kFlushBits) == 0) __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_));
  }
  static constexpr bool FlushesDenormals() { return true; }

 private:
  uint64_t saved_;
#else
  static constexpr bool FlushesDenormals() { return false; }
#endif

 public:
  ScopedDenormalFlush(const ScopedDenormalFlush&) = delete;
  ScopedDenormalFlush& operator=(const ScopedDenormalFlush&) = delete;
};

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_CC_CPU_DENORMAL_FLUSH_H_
