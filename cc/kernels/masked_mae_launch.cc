// Host side of the CUDA launchers (masked_mae_cuda.h): picks the kernel and its
// launch shape, fills KernelParams, launches through the driver API
// (cuda_driver.h). Plain C++: compiled by the host compiler against the CUDA 12
// driver header only; an empty translation unit in CPU-only builds.
#ifdef FUSED_MASKED_MAE_WITH_CUDA

#include <algorithm>
#include <type_traits>

#include "cc/kernels/cuda_driver.h"
#include "cc/kernels/host_float16.h"
#include "cc/kernels/masked_mae_cuda.h"
#include "cc/kernels/masked_mae_kernel_abi.h"

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

template <typename T>
CUresult Launch(bool gradient, TargetKind targets, const void* y_true, const T* y_pred,
                const T* grad_loss, T* out, int64_t rows, int64_t num_classes,
                const MaskedTokenSet& tokens, cudaStream_t stream) {
  if (rows == 0) return CUDA_SUCCESS;
  const KernelParams params{y_true, y_pred, grad_loss, out, rows, num_classes, tokens};
  constexpr int64_t kVec = 16 / sizeof(T);
  const int64_t chunks = num_classes / kVec + (num_classes % kVec != 0);
  const int64_t lanes_wanted = chunks / kChunksPerLane + (chunks % kChunksPerLane != 0);
  const ElementKind dtype = ElementKindOf<T>::value;
  int group, threads;
  int64_t blocks;
  if (lanes_wanted <= kWarpSize) {  // a group of lanes per row, several rows per block
    group = static_cast<int>(NextPowerOfTwo(lanes_wanted));
    threads = kRowsPerWarpBlockThreads;
    const int64_t rows_per_block = kRowsPerWarpBlockThreads / group;
    blocks = std::min(rows / rows_per_block + (rows % rows_per_block != 0), kMaxGridBlocks);
  } else {  // a whole block per row
    group = 0;
    threads = static_cast<int>(NextPowerOfTwo(std::min<int64_t>(kMaxRowBlockThreads,
                                                                std::max<int64_t>(64, lanes_wanted))));
    blocks = std::min(rows, kMaxGridBlocks);
  }
  return cuda::LaunchKernel(KernelIndex(gradient, dtype, targets, group),
                            static_cast<uint32_t>(blocks), static_cast<uint32_t>(threads), params,
                            stream);
}

}  // namespace

template <typename T>
CUresult LaunchMaskedMaeForward(const T* y_true, const T* y_pred, int64_t rows,
                                int64_t num_classes, const MaskedTokenSet& tokens, T* loss,
                                cudaStream_t stream) {
  return Launch<T>(false, TargetKind::kDense, y_true, y_pred, nullptr, loss, rows, num_classes,
                   tokens, stream);
}

template <typename T>
CUresult LaunchMaskedMaeGradient(const T* y_true, const T* y_pred, const T* grad_loss,
                                 int64_t rows, int64_t num_classes, const MaskedTokenSet& tokens,
                                 T* grad_y_pred, cudaStream_t stream) {
  return Launch<T>(true, TargetKind::kDense, y_true, y_pred, grad_loss, grad_y_pred, rows,
                   num_classes, tokens, stream);
}

template <typename T, typename Id>
CUresult LaunchSparseMaskedMaeForward(const Id* y_true_ids, const T* y_pred, int64_t rows,
                                      int64_t num_classes, const MaskedTokenSet& tokens, T* loss,
                                      cudaStream_t stream) {
  return Launch<T>(false, IdsKind<Id>(), y_true_ids, y_pred, nullptr, loss, rows, num_classes,
                   tokens, stream);
}

template <typename T, typename Id>
CUresult LaunchSparseMaskedMaeGradient(const Id* y_true_ids, const T* y_pred, const T* grad_loss,
                                       int64_t rows, int64_t num_classes,
                                       const MaskedTokenSet& tokens, T* grad_y_pred,
                                       cudaStream_t stream) {
  return Launch<T>(true, IdsKind<Id>(), y_true_ids, y_pred, grad_loss, grad_y_pred, rows,
                   num_classes, tokens, stream);
}

#define INSTANTIATE_SPARSE(T, Id)                                                        \
  template CUresult LaunchSparseMaskedMaeForward<T, Id>(                                 \
      const Id*, const T*, int64_t, int64_t, const MaskedTokenSet&, T*, cudaStream_t);   \
  template CUresult LaunchSparseMaskedMaeGradient<T, Id>(                                \
      const Id*, const T*, const T*, int64_t, int64_t, const MaskedTokenSet&, T*, cudaStream_t);
#define INSTANTIATE(T)                                                                   \
  template CUresult LaunchMaskedMaeForward<T>(const T*, const T*, int64_t, int64_t,      \
                                              const MaskedTokenSet&, T*, cudaStream_t);  \
  template CUresult LaunchMaskedMaeGradient<T>(const T*, const T*, const T*, int64_t,    \
                                               int64_t, const MaskedTokenSet&, T*,       \
                                               cudaStream_t);                            \
  INSTANTIATE_SPARSE(T, int32_t)                                                         \
  INSTANTIATE_SPARSE(T, int64_t)
INSTANTIATE(HostHalf)
INSTANTIATE(HostBFloat16)
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE_SPARSE
#undef INSTANTIATE

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_WITH_CUDA
