// Host 16-bit float types, bit-compatible with Eigen::half/bfloat16, NumPy's
// float16 and ml_dtypes' bfloat16. The TensorFlow CPU kernel and the pybind11
// core both read 16-bit inputs through these, so the host row loops convert
// with the same code everywhere.
//
// Conversions are branch-free (selects, not ifs) so that the row loops in
// masked_mae_row.h vectorize without F16C: round-to-nearest-even, NaN kept
// NaN (quieted), subnormals exact. A compiler's _Float16 would call a libgcc
// routine per element on a baseline x86-64 build (~100x slower).
#ifndef FUSED_MASKED_MAE_CC_KERNELS_HOST_FLOAT16_H_
#define FUSED_MASKED_MAE_CC_KERNELS_HOST_FLOAT16_H_

#include <cstdint>
#include <cstring>

#include "cc/math/masked_mae_row.h"

namespace fused_masked_mae {
namespace float16_bits {

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// `condition ? a : b` on bit patterns with masks, which GCC vectorizes where
// it rejects a chain of ternaries as control flow.
inline uint32_t Select(bool condition, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(condition);
  return (a & mask) | (b & ~mask);
}

}  // namespace float16_bits

struct HostBFloat16 {
  uint16_t bits;

  HostBFloat16() = default;
  explicit HostBFloat16(float value) {
    const uint32_t u = float16_bits::FloatBits(value);
    const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);  // to nearest even
    const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
    bits = static_cast<uint16_t>(float16_bits::Select(is_nan, u | 0x00400000u, rounded) >> 16);
  }
  explicit operator float() const {
    return float16_bits::BitsFloat(static_cast<uint32_t>(bits) << 16);
  }
};

struct HostHalf {
  uint16_t bits;

  HostHalf() = default;
  // float -> IEEE half, round to nearest even (after F. Giesen's float_to_half_fast3_rtne).
  explicit HostHalf(float value) {
    using float16_bits::BitsFloat;
    using float16_bits::FloatBits;
    const uint32_t u = FloatBits(value);
    const uint32_t sign = u & 0x80000000u;
    const uint32_t f = u ^ sign;
    constexpr uint32_t kF32Infinity = 255u << 23;
    constexpr uint32_t kF16Overflow = (127u + 16u) << 23;  // 65536.0f: rounds to inf
    constexpr uint32_t kDenormMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    // |value| >= 65536 (and inf/NaN).
    const uint32_t big = float16_bits::Select(f > kF32Infinity, 0x7e00u, 0x7c00u);
    // Results that are half subnormals or zero: let the FPU round the mantissa.
    const uint32_t small = FloatBits(BitsFloat(f) + BitsFloat(kDenormMagic)) - kDenormMagic;
    // Normal range: rebias the exponent and round the mantissa to nearest even.
    const uint32_t normal = (f + ((15u - 127u) << 23) + 0xfffu + ((f >> 13) & 1u)) >> 13;
    const uint32_t magnitude = float16_bits::Select(
        f >= kF16Overflow, big, float16_bits::Select(f < (113u << 23), small, normal));
    bits = static_cast<uint16_t>(magnitude | (sign >> 16));
  }
  // IEEE half -> float, exact (after F. Giesen's half_to_float_fast5).
  explicit operator float() const {
    using float16_bits::BitsFloat;
    using float16_bits::FloatBits;
    const uint32_t h = bits;
    const uint32_t shifted = (h & 0x7fffu) << 13;  // exponent and mantissa in place
    const uint32_t exponent = shifted & (0x7c00u << 13);
    const uint32_t rebiased = shifted + ((127u - 15u) << 23);
    const uint32_t inf_nan = rebiased + ((128u - 16u) << 23);
    const float subnormal = BitsFloat(rebiased + (1u << 23)) - BitsFloat(113u << 23);
    const uint32_t magnitude = float16_bits::Select(
        exponent == (0x7c00u << 13), inf_nan,
        float16_bits::Select(exponent == 0, FloatBits(subnormal), rebiased));
    return BitsFloat(magnitude | ((h & 0x8000u) << 16));
  }
};

static_assert(sizeof(HostBFloat16) == 2 && sizeof(HostHalf) == 2, "16-bit types must be 2 bytes");

#if defined(FUSED_MASKED_MAE_HOST_F16C)
// float16 -> float32 with F16C (AVX-512F: 16 at a time) for the row loops'
// blocks (LoadLanes in masked_mae_row.h). Only for the CPU variants compiled
// for those targets (masked_mae_cpu_avx2.cc, masked_mae_cpu_avx512.cc, which
// include <immintrin.h>). Exact, like the software conversion; the one
// difference, a signaling NaN comes out quieted, is invisible in the results,
// which only compare these values or subtract them (which quiets NaN anyway).
// float32 -> 16-bit stays the software rounding above: vcvtps2ph keeps NaN
// payloads where that returns the canonical NaN, and AVX512-BF16's
// vcvtneps2bf16 flushes denormals.
static_assert(kHostLanes == 16, "LoadLanes converts 16 lanes");
inline void LoadLanes(const HostHalf* src, float* dst) {
#if defined(FUSED_MASKED_MAE_HOST_AVX512)
  // maskz with every lane: g++ 12 warns about _mm512_cvtph_ps's undefined source.
  _mm512_storeu_ps(dst, _mm512_maskz_cvtph_ps(
                            0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))));
#else
  _mm256_storeu_ps(dst, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
  _mm256_storeu_ps(dst + 8,
                   _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 8))));
#endif
}
#endif

template <>
struct ElementKindOf<HostHalf> {
  static constexpr ElementKind value = ElementKind::kFloat16;
};
template <>
struct ElementKindOf<HostBFloat16> {
  static constexpr ElementKind value = ElementKind::kBFloat16;
};

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_CC_KERNELS_HOST_FLOAT16_H_
