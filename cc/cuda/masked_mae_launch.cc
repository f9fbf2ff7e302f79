// Host side of the CUDA launchers (masked_mae_cuda.h): picks the kernel and its
// launch shape, fills KernelParams, launches through the driver API
// (cuda_driver.h). Plain C++: compiled by the host compiler against the CUDA 12
// driver header only; an empty translation unit in CPU-only builds.
#ifdef FUSED_MASKED_MAE_WITH_CUDA

#include <algorithm>
#include <type_traits>

#include "cc/cuda/cuda_driver.h"
#include "cc/math/host_float16.h"
#include "cc/cuda/masked_mae_cuda.h"
#include "cc/cuda/masked_mae_kernel_abi.h"

namespace fused_masked_mae {
namespace {

// Must agree with masked_mae_kernels.cu.cc (kMaxRowBlockThreads, the 16-byte chunks).
constexpr int kWarpSize = 32;
constexpr int kRowsPerWarpBlockThreads = 256;  // block size when a row fits in a warp
constexpr int kMaxRowBlockThreads = 512;       // largest block for one row
constexpr int64_t kMaxGridBlocks = 1 << 20;    // the kernels grid-stride beyond this
constexpr int kChunksPerLane = 4;              // work per lane that sizes the group

template <typename Id>
constexpr TargetKind IdsKind() {
  return std::is_same_v<Id, int32_t> ? TargetKind::kInt32Ids : TargetKind::kInt64Ids;
}

// The smallest power of two >= n, for 1 <= n <= kMaxRowBlockThreads (callers
// clamp first, so this never overflows).
int64_t NextPowerOfTwo(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

constexpr int kGradientBlockThreads = 256;     // must match masked_mae_kernels.cu.cc

template <typename T>
CUresult LaunchForward(TargetKind targets, const void* y_true, const T* y_pred, T* loss,
                       uint8_t* row_keep, int64_t rows, int64_t num_classes,
                       const MaskedTokenSet& tokens, cudaStream_t stream) {
  if (rows == 0) return CUDA_SUCCESS;
  const KernelParams params{y_true, y_pred, nullptr, loss, row_keep, rows, num_classes, tokens};
  constexpr int64_t kVec = 16 / sizeof(T);
  const int64_t chunks = num_classes / kVec + (num_classes % kVec != 0);
  const int64_t lanes_wanted = chunks / kChunksPerLane + (chunks % kChunksPerLane != 0);
  // The GPU's multiprocessors, so that few rows still spread over all of
  // them (0 when unknown: the launch itself then reports why).
  int sms = 0;
  if (cuda::MultiprocessorCount(stream, &sms) != CUDA_SUCCESS) sms = 0;
  int group, threads;
  int64_t blocks;
  if (lanes_wanted <= kWarpSize) {  // a group of lanes per row, several rows per block
    group = static_cast<int>(NextPowerOfTwo(lanes_wanted));
    threads = kRowsPerWarpBlockThreads;
    // Smaller blocks (down to one warp, or one row) while the grid would
    // leave multiprocessors without two blocks.
    const auto blocks_for = [&](int t) {
      const int64_t rows_per_block = t / group;
      return rows / rows_per_block + (rows % rows_per_block != 0);
    };
    while (threads > std::max(group, kWarpSize) && blocks_for(threads) < 2 * int64_t{sms}) {
      threads /= 2;
    }
    blocks = std::min(blocks_for(threads), kMaxGridBlocks);
  } else {  // a whole block per row
    group = 0;
    // Fewer rows than multiprocessors: as many threads per row as it has
    // chunks (up to the largest block), since some multiprocessors idle
    // anyway. (Splitting a row over several blocks needs a workspace for
    // the partial results, which the launchers do not have yet.)
    const int64_t wanted = rows < sms ? chunks : lanes_wanted;
    threads = static_cast<int>(NextPowerOfTwo(
        std::min<int64_t>(kMaxRowBlockThreads, std::max<int64_t>(64, wanted))));
    blocks = std::min(rows, kMaxGridBlocks);
  }
  return cuda::LaunchKernel(ForwardKernelIndex(ElementKindOf<T>::value, targets, group),
                            static_cast<uint32_t>(blocks), static_cast<uint32_t>(threads), params,
                            stream);
}

// The gradient: one flat element-wise stream, a 16-byte chunk per thread and step.
template <typename T>
CUresult LaunchGradient(TargetKind targets, const void* y_true, const T* y_pred,
                        const uint8_t* row_keep, const T* grad_loss, T* grad_y_pred, int64_t rows,
                        int64_t num_classes, cudaStream_t stream) {
  if (rows == 0) return CUDA_SUCCESS;
  const KernelParams params{y_true,      y_pred, grad_loss,          grad_y_pred,
                            const_cast<uint8_t*>(row_keep), rows, num_classes, MaskedTokenSet{}};
  constexpr int64_t kVec = 16 / sizeof(T);
  const int64_t total = rows * num_classes;  // callers checked it fits int64
  const int64_t chunks = total / kVec + 1;
  const int64_t blocks = std::min(chunks / kGradientBlockThreads + 1, kMaxGridBlocks);
  return cuda::LaunchKernel(GradientKernelIndex(ElementKindOf<T>::value, targets),
                            static_cast<uint32_t>(blocks), kGradientBlockThreads, params, stream);
}

}  // namespace

template <typename T>
CUresult LaunchMaskedMaeForward(const T* y_true, const T* y_pred, int64_t rows,
                                int64_t num_classes, const MaskedTokenSet& tokens, T* loss,
                                uint8_t* row_keep, cudaStream_t stream) {
  return LaunchForward<T>(TargetKind::kDense, y_true, y_pred, loss, row_keep, rows, num_classes,
                          tokens, stream);
}

template <typename T>
CUresult LaunchMaskedMaeGradient(const T* y_true, const T* y_pred, const uint8_t* row_keep,
                                 const T* grad_loss, int64_t rows, int64_t num_classes,
                                 T* grad_y_pred, cudaStream_t stream) {
  return LaunchGradient<T>(TargetKind::kDense, y_true, y_pred, row_keep, grad_loss, grad_y_pred,
                           rows, num_classes, stream);
}

template <typename T, typename Id>
CUresult LaunchSparseMaskedMaeForward(const Id* y_true_ids, const T* y_pred, int64_t rows,
                                      int64_t num_classes, const MaskedTokenSet& tokens, T* loss,
                                      uint8_t* row_keep, cudaStream_t stream) {
  return LaunchForward<T>(IdsKind<Id>(), y_true_ids, y_pred, loss, row_keep, rows, num_classes,
                          tokens, stream);
}

template <typename T, typename Id>
CUresult LaunchSparseMaskedMaeGradient(const Id* y_true_ids, const T* y_pred,
                                       const uint8_t* row_keep, const T* grad_loss, int64_t rows,
                                       int64_t num_classes, T* grad_y_pred, cudaStream_t stream) {
  return LaunchGradient<T>(IdsKind<Id>(), y_true_ids, y_pred, row_keep, grad_loss, grad_y_pred,
                           rows, num_classes, stream);
}

#define INSTANTIATE_SPARSE(T, Id)                                                             \
  template CUresult LaunchSparseMaskedMaeForward<T, Id>(                                      \
      const Id*, const T*, int64_t, int64_t, const MaskedTokenSet&, T*, uint8_t*,             \
      cudaStream_t);                                                                          \
  template CUresult LaunchSparseMaskedMaeGradient<T, Id>(                                     \
      const Id*, const T*, const uint8_t*, const T*, int64_t, int64_t, T*, cudaStream_t);
#define INSTANTIATE(T)                                                                        \
  template CUresult LaunchMaskedMaeForward<T>(const T*, const T*, int64_t, int64_t,           \
                                              const MaskedTokenSet&, T*, uint8_t*,            \
                                              cudaStream_t);                                  \
  template CUresult LaunchMaskedMaeGradient<T>(const T*, const T*, const uint8_t*, const T*,  \
                                               int64_t, int64_t, T*, cudaStream_t);           \
  INSTANTIATE_SPARSE(T, int32_t)                                                              \
  INSTANTIATE_SPARSE(T, int64_t)
INSTANTIATE(HostHalf)
INSTANTIATE(HostBFloat16)
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE_SPARSE
#undef INSTANTIATE

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_WITH_CUDA
