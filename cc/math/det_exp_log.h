// exp and log with the same bits everywhere: host scalar code, auto-vectorized
// host loops (every CPU instruction-set variant) and CUDA device code.
//
// libm's expf/logf, the compiler's vector math and CUDA's __expf/expf are
// different approximations, so a loss that used them would differ between
// the CPU instruction-set variants and the GPU. These are written with IEEE basic operations
// only (+, -, *, /, compares, integer bit moves), in a fixed order, without
// fused multiply-add (the CPU engines are compiled with -ffp-contract=off and
// the device code with contraction off), so every target computes exactly the
// same result. Branch-free (selects only) so that host loops over them
// vectorize.
//
// The algorithms: exp, Cody-Waite reduction by k*ln2, then Cephes' degree-6
// polynomial (float32) or fdlibm's rational form (float64); log, fdlibm's
// reduction to [sqrt(2)/2, sqrt(2)), s = f / (2 + f) and a polynomial in s^2
// (musl's float32 coefficients). Accuracy (tests/test_crossentropy.py,
// against NumPy in float64 over the float32 range and in long double for
// float64): at most 2 ulp asserted, below 1 ulp measured for all four;
// denormal results of exp are rounded once from the exact scaling.
//   DetExp(+inf) = +inf, DetExp(-inf) = 0, DetExp(NaN) = NaN; overflow gives
//   +inf, underflow 0 (through the denormals).
//   DetLog(0) = -inf, DetLog(x < 0) = NaN, DetLog(+inf) = +inf,
//   DetLog(NaN) = NaN, denormal arguments exact-scaled first.
#ifndef FUSED_MASKED_MAE_CC_MATH_DET_EXP_LOG_H_
#define FUSED_MASKED_MAE_CC_MATH_DET_EXP_LOG_H_

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DETMATH_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DETMATH_HOST_DEVICE inline
#endif

namespace fused_masked_mae {
namespace detmath {

template <typename To, typename From>
DETMATH_HOST_DEVICE To BitCast(From from) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To to;
  __builtin_memcpy(&to, &from, sizeof(to));
  return to;
}

// 2^k for k in the normal exponent range of the type.
DETMATH_HOST_DEVICE float Pow2(int32_t k) {
  return BitCast<float>(static_cast<uint32_t>(k + 127) << 23);
}
DETMATH_HOST_DEVICE double Pow2(int64_t k) {
  return BitCast<double>(static_cast<uint64_t>(k + 1023) << 52);
}

}  // namespace detmath

// exp(x) for float32: Cody-Waite reduction by k*ln2 and Cephes' degree-6
// polynomial (no division, so a vector loop over it stays cheap).
DETMATH_HOST_DEVICE float DetExp(float x) {
  const float kInvLn2 = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;  // 9 significant bits: k * kLn2Hi is exact
  const float kLn2Lo = -2.12194440e-4f;
  const bool nan = x != x;
  // Beyond these the result is +inf or 0 anyway; clamping keeps k in range.
  float c = x > 89.0f ? 89.0f : x;
  c = c < -104.0f ? -104.0f : c;
  c = nan ? 0.0f : c;
  // k = round(c / ln2), ties to even (the magic constant 1.5 * 2^23).
  const float kf = (c * kInvLn2 + 12582912.0f) - 12582912.0f;
  const int32_t k = static_cast<int32_t>(kf);
  const float r = (c - kf * kLn2Hi) - kf * kLn2Lo;
  const float rr = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * rr + r) + 1.0f;
  // y * 2^k in two exact-or-once-rounded steps (k in [-150, 129]).
  const int32_t k1 = k >> 1;  // floor(k / 2)
  const float result = (y * detmath::Pow2(k1)) * detmath::Pow2(k - k1);
  return nan ? x : result;
}

// exp(x) for float64.
DETMATH_HOST_DEVICE double DetExp(double x) {
  const double kInvLn2 = 1.44269504088896338700e+00;
  const double kLn2Hi = 6.93147180369123816490e-01;  // 32 significant bits
  const double kLn2Lo = 1.90821492927058770002e-10;
  const double kP1 = 1.66666666666666019037e-01;
  const double kP2 = -2.77777777770155933842e-03;
  const double kP3 = 6.61375632143793436117e-05;
  const double kP4 = -1.65339022054652515390e-06;
  const double kP5 = 4.13813679705723846039e-08;
  const bool nan = x != x;
  double c = x > 710.0 ? 710.0 : x;
  c = c < -746.0 ? -746.0 : c;
  c = nan ? 0.0 : c;
  const double kf = (c * kInvLn2 + 6755399441055744.0) - 6755399441055744.0;  // 1.5 * 2^52
  const int64_t k = static_cast<int64_t>(kf);
  const double hi = c - kf * kLn2Hi;
  const double lo = kf * kLn2Lo;
  const double r = hi - lo;
  const double rr = r * r;
  const double cr = r - rr * (kP1 + rr * (kP2 + rr * (kP3 + rr * (kP4 + rr * kP5))));
  const double y = 1.0 - ((lo - (r * cr) / (2.0 - cr)) - hi);
  const int64_t k1 = k >> 1;
  const double result = (y * detmath::Pow2(k1)) * detmath::Pow2(k - k1);
  return nan ? x : result;
}

// log(x) for float32.
DETMATH_HOST_DEVICE float DetLog(float x) {
  const float kLn2Hi = 6.9313812256e-01f;
  const float kLn2Lo = 9.0580006145e-06f;
  const float kLg1 = 0.66666662693f;  // 0xaaaaaa.0p-24
  const float kLg2 = 0.40000972152f;  // 0xccce13.0p-25
  const float kLg3 = 0.28498786688f;  // 0x91e9ee.0p-25
  const float kLg4 = 0.24279078841f;  // 0xf89e26.0p-26
  // Denormals: scale into the normal range exactly.
  const bool denormal = x > 0.0f && x < 1.17549435e-38f;
  const float scaled = denormal ? x * 33554432.0f : x;  // 2^25
  uint32_t ix = detmath::BitCast<uint32_t>(scaled);
  // Reduce to m in [sqrt(2)/2, sqrt(2)): x = 2^k * m.
  ix += 0x3f800000u - 0x3f3504f3u;
  const int32_t k = static_cast<int32_t>(ix >> 23) - 0x7f - (denormal ? 25 : 0);
  ix = (ix & 0x007fffffu) + 0x3f3504f3u;
  const float f = detmath::BitCast<float>(ix) - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float t1 = w * (kLg2 + w * kLg4);
  const float t2 = z * (kLg1 + w * kLg3);
  const float r = t2 + t1;
  const float hfsq = 0.5f * f * f;
  const float dk = static_cast<float>(k);
  const float result = s * (hfsq + r) + dk * kLn2Lo - hfsq + f + dk * kLn2Hi;
  const float inf = std::numeric_limits<float>::infinity();
  float out = x == 0.0f ? -inf : result;
  out = x == inf ? inf : out;
  out = x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : out;
  return x != x ? x : out;
}

// log(x) for float64.
DETMATH_HOST_DEVICE double DetLog(double x) {
  const double kLn2Hi = 6.93147180369123816490e-01;
  const double kLn2Lo = 1.90821492927058770002e-10;
  const double kLg1 = 6.666666666666735130e-01;
  const double kLg2 = 3.999999999940941908e-01;
  const double kLg3 = 2.857142874366239149e-01;
  const double kLg4 = 2.222219843214978396e-01;
  const double kLg5 = 1.818357216161805012e-01;
  const double kLg6 = 1.531383769920937332e-01;
  const double kLg7 = 1.479819860511658591e-01;
  const bool denormal = x > 0.0 && x < 2.2250738585072014e-308;
  const double scaled = denormal ? x * 18014398509481984.0 : x;  // 2^54
  uint64_t ix = detmath::BitCast<uint64_t>(scaled);
  // The same reduction on the high word: m in [sqrt(2)/2, sqrt(2)).
  ix += static_cast<uint64_t>(0x3ff00000u - 0x3fe6a09eu) << 32;
  const int64_t k = static_cast<int64_t>(ix >> 52) - 0x3ff - (denormal ? 54 : 0);
  ix = (ix & 0x000fffffffffffffull) + (static_cast<uint64_t>(0x3fe6a09eu) << 32);
  const double f = detmath::BitCast<double>(ix) - 1.0;
  const double hfsq = 0.5 * f * f;
  const double s = f / (2.0 + f);
  const double z = s * s;
  const double w = z * z;
  const double t1 = w * (kLg2 + w * (kLg4 + w * kLg6));
  const double t2 = z * (kLg1 + w * (kLg3 + w * (kLg5 + w * kLg7)));
  const double r = t2 + t1;
  const double dk = static_cast<double>(k);
  const double result = s * (hfsq + r) + dk * kLn2Lo - hfsq + f + dk * kLn2Hi;
  const double inf = std::numeric_limits<double>::infinity();
  double out = x == 0.0 ? -inf : result;
  out = x == inf ? inf : out;
  out = x < 0.0 ? std::numeric_limits<double>::quiet_NaN() : out;
  return x != x ? x : out;
}

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_CC_MATH_DET_EXP_LOG_H_
