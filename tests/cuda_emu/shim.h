// CUDA device-language shim for the CUDA emulator (tests/cuda_emu/README.md).
//
// cc/cuda/masked_mae_kernels.cu.cc, unchanged, is compiled as host C++ with
//   g++ -x c++ -include tests/cuda_emu/shim.h -Itests/cuda_emu/include ...
// Each CUDA thread becomes a fiber (emu_runtime.cc) scheduled one block at a
// time. Everything a kernel can do to other threads goes through a checked
// rendezvous here:
//   __shfl_*_sync   every lane named in the mask must arrive at the same call
//                   site with the same mask and width; a lane that is not in
//                   its own mask, a source lane outside the mask, a lane that
//                   exits while its warp waits: an error
//   __syncthreads   every thread of the block must arrive at the same call
//                   site; divergence and deadlock are errors
//   __ldg / vector  loads check the alignment of their type (uint4: 16 bytes);
//                   plain vector stores are checked by UBSan's alignment check
// An error prints what happened (kernel, block, thread, call sites) and exits.
// Not emulated: real data races, memory ordering, timing and occupancy.
#ifndef FUSED_MASKED_MAE_CUDA_EMU_SHIM_H_
#define FUSED_MASKED_MAE_CUDA_EMU_SHIM_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define FUSED_MASKED_MAE_CUDA_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__ static const

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
using uint3 = dim3;

struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) double2 { double x, y; };
struct alignas(16) longlong2 { long long x, y; };
struct alignas(16) ulonglong2 { unsigned long long x, y; };

namespace cuda_emu {

// The largest row the kernels reduce with 32-bit argmax indices (the kernels'
// FUSED_MASKED_MAE_INDEX32_MAX_CLASSES): CUDA_EMU_INDEX32_MAX_CLASSES, so that
// the 64-bit path runs on small rows too.
int64_t Index32MaxClasses();

// The running thread's coordinates, set by the scheduler on every switch.
extern dim3 thread_idx, block_idx, block_dim, grid_dim;
constexpr int kWarpSize = 32;

enum class ShuffleKind { kIdx = 0, kUp = 1, kDown = 2, kXor = 3 };

// The rendezvous behind every __shfl_*_sync: `bits` is the value's bytes;
// returns the source lane's bytes.
uint64_t Shuffle(ShuffleKind kind, unsigned mask, uint64_t bits, int size, int lane_arg,
                 int width, const char* site);
void SyncThreads(const char* site);
void SyncWarp(unsigned mask, const char* site);
// Fails (with `what` and the running thread) unless ptr is aligned to `alignment`.
void CheckAligned(const void* ptr, unsigned alignment, const char* what, const char* site);

template <typename T>
T ShuffleValue(ShuffleKind kind, unsigned mask, T value, int lane_arg, int width,
               const char* site) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "__shfl_*_sync moves 1 to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = Shuffle(kind, mask, bits, static_cast<int>(sizeof(T)), lane_arg, width, site);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <typename T>
T Ldg(const T* ptr, const char* site) {
  CheckAligned(ptr, alignof(T), "__ldg", site);
  return *ptr;
}

}  // namespace cuda_emu

#define MMAE_EMU_STR2(x) #x
#define MMAE_EMU_STR(x) MMAE_EMU_STR2(x)
#define MMAE_EMU_SITE __FILE__ ":" MMAE_EMU_STR(__LINE__)

#define FUSED_MASKED_MAE_INDEX32_MAX_CLASSES (::cuda_emu::Index32MaxClasses())
#define threadIdx (::cuda_emu::thread_idx)
#define blockIdx (::cuda_emu::block_idx)
#define blockDim (::cuda_emu::block_dim)
#define gridDim (::cuda_emu::grid_dim)
#define warpSize (::cuda_emu::kWarpSize)

#define __syncthreads() ::cuda_emu::SyncThreads(MMAE_EMU_SITE)
#define __syncwarp(...) ::cuda_emu::SyncWarp(MMAE_EMU_SYNCWARP_MASK(__VA_ARGS__), MMAE_EMU_SITE)
#define MMAE_EMU_SYNCWARP_MASK(...) (0xffffffffu __VA_OPT__(&(__VA_ARGS__)))

// __shfl_*_sync(mask, var, lane/delta/laneMask[, width = 32])
#define MMAE_EMU_WIDTH(w, ...) (w)
#define __shfl_sync(mask, var, lane, ...) \
  ::cuda_emu::ShuffleValue(::cuda_emu::ShuffleKind::kIdx, (mask), (var), (lane), \
                           MMAE_EMU_WIDTH(__VA_ARGS__ __VA_OPT__(,) 32), MMAE_EMU_SITE)
#define __shfl_up_sync(mask, var, delta, ...) \
  ::cuda_emu::ShuffleValue(::cuda_emu::ShuffleKind::kUp, (mask), (var), (delta), \
                           MMAE_EMU_WIDTH(__VA_ARGS__ __VA_OPT__(,) 32), MMAE_EMU_SITE)
#define __shfl_down_sync(mask, var, delta, ...) \
  ::cuda_emu::ShuffleValue(::cuda_emu::ShuffleKind::kDown, (mask), (var), (delta), \
                           MMAE_EMU_WIDTH(__VA_ARGS__ __VA_OPT__(,) 32), MMAE_EMU_SITE)
#define __shfl_xor_sync(mask, var, lane_mask, ...) \
  ::cuda_emu::ShuffleValue(::cuda_emu::ShuffleKind::kXor, (mask), (var), (lane_mask), \
                           MMAE_EMU_WIDTH(__VA_ARGS__ __VA_OPT__(,) 32), MMAE_EMU_SITE)

#define __ldg(ptr) ::cuda_emu::Ldg((ptr), MMAE_EMU_SITE)

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// Funnel shifts as PTX's shf.{r,l}.wrap: (hi:lo) >> (shift & 31), low word.
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (shift & 31u));
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (shift & 31u)) >> 32);
}
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (shift < 32u ? shift : 32u));
}
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (shift < 32u ? shift : 32u)) >> 32);
}

// Device math the kernels may use, as the host's.
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }

#endif  // FUSED_MASKED_MAE_CUDA_EMU_SHIM_H_
