// Host 16-bit float types for the TensorFlow-free pybind11 core: IEEE half as
// the compiler's _Float16 (round-to-nearest-even conversions), and bfloat16 as
// a small struct with the same rounding as Eigen::bfloat16 and ml_dtypes, so
// NumPy's float16 and ml_dtypes' bfloat16 arrays can be read in place.
#ifndef FUSED_MASKED_MAE_CC_CORE_HOST_FLOAT16_H_
#define FUSED_MASKED_MAE_CC_CORE_HOST_FLOAT16_H_

#include <cstdint>
#include <cstring>

#include "cc/kernels/masked_mae_row.h"

namespace fused_masked_mae {

using HostHalf = _Float16;

struct HostBFloat16 {
  uint16_t bits;

  HostBFloat16() = default;
  explicit HostBFloat16(float value) {
    uint32_t u;
    std::memcpy(&u, &value, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN, sign kept
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
      bits = static_cast<uint16_t>(u >> 16);
    }
  }
  explicit operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &u, sizeof(value));
    return value;
  }
};
static_assert(sizeof(HostBFloat16) == 2, "bfloat16 must be 2 bytes");

template <>
struct ElementKindOf<HostHalf> {
  static constexpr ElementKind value = ElementKind::kFloat16;
};
template <>
struct ElementKindOf<HostBFloat16> {
  static constexpr ElementKind value = ElementKind::kBFloat16;
};

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_CC_CORE_HOST_FLOAT16_H_
