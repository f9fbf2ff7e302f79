// TensorFlow kernels for Import_fused_masked_mae>MaskedCrossentropy, its
// sparse twin and their gradients: validate (the masked MAE's checks, plus
// the options and the gradient's per-row inputs), allocate, and call the CPU
// launchers (cc/cpu/masked_mae_cpu.h) or the CUDA launchers
// (cc/cuda/masked_mae_cuda.h), which run cc/math/masked_ce_row.h.
#define EIGEN_USE_THREADS
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#endif

#include <string>
#include <type_traits>
#include <vector>

#include "cc/cpu/masked_mae_cpu.h"
#include "cc/math/host_float16.h"
#include "cc/math/masked_ce_row.h"
#include "cc/tf/masked_mae_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

#if GOOGLE_CUDA
#include "cc/cuda/cuda_driver.h"
#include "cc/cuda/masked_mae_cuda.h"
#endif

namespace fused_masked_mae {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using CPUDevice = Eigen::ThreadPoolDevice;
using GPUDevice = Eigen::GpuDevice;

namespace {

// TensorFlow's 16-bit types have the host row loops' bit layout
// (host_float16.h): pointers are viewed, never converted.
template <typename T>
struct HostType {
  using type = T;
};
template <>
struct HostType<Eigen::half> {
  using type = HostHalf;
};
template <>
struct HostType<Eigen::bfloat16> {
  using type = HostBFloat16;
};
template <typename T>
const typename HostType<T>::type* Host(const T* p) {
  return reinterpret_cast<const typename HostType<T>::type*>(p);
}
template <typename T>
typename HostType<T>::type* Host(T* p) {
  return reinterpret_cast<typename HostType<T>::type*>(p);
}
inline const int32_t* Host(const int32_t* p) { return p; }
inline const int64_t* Host(const int64_t* p) { return p; }

ParallelFor OpThreadPool(OpKernelContext* ctx) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [workers](int64_t rows, int64_t cost_per_row, const RowRangeBody& body) {
    workers->ParallelFor(rows, cost_per_row, body);
  };
}

// The options from the attrs (label_smoothing only on the dense ops).
void ReadCeOptions(OpKernelConstruction* ctx, bool sparse, CeOptions* options) {
  bool from_logits = false;
  float epsilon = 0, label_smoothing = 0;
  OP_REQUIRES_OK(ctx, ctx->GetAttr("from_logits", &from_logits));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon));
  if (!sparse) OP_REQUIRES_OK(ctx, ctx->GetAttr("label_smoothing", &label_smoothing));
  *options = CeOptions{from_logits ? 1 : 0, label_smoothing, epsilon};
  const std::string invalid = InvalidCeOptionsMessage(*options, sparse);
  OP_REQUIRES(ctx, invalid.empty(), absl::InvalidArgumentError(invalid));
}

// The launch on CPUDevice (the op's thread pool) or GPUDevice (its stream).
template <typename Device, typename T, typename TargetT>
absl::Status LaunchCeForward(OpKernelContext* ctx, const TargetT* y_true, const T* y_pred,
                             int64_t rows, int64_t num_classes, const MaskedTokenSet& tokens,
                             const CeOptions& options, T* loss, uint8_t* row_keep,
                             double* row_stats) {
  if constexpr (std::is_same_v<Device, CPUDevice>) {
    CpuMaskedCeForward(Host(y_true), Host(y_pred), rows, num_classes, tokens, options, Host(loss),
                       row_keep, row_stats, OpThreadPool(ctx));
    return absl::OkStatus();
  } else {
#if GOOGLE_CUDA
    const CUresult r = LaunchMaskedCeForward(
        Host(y_true), Host(y_pred), rows, num_classes, tokens, options, Host(loss), row_keep,
        row_stats, ctx->eigen_device<GPUDevice>().stream());
    if (r == CUDA_SUCCESS) return absl::OkStatus();
    return absl::InternalError(absl::StrCat(
        "launching the masked cross-entropy forward CUDA kernel failed: ",
        cuda::ErrorMessage(r)));
#else
    return absl::InternalError("no GPU support in this build");
#endif
  }
}

template <typename Device, typename T, typename TargetT>
absl::Status LaunchCeGradient(OpKernelContext* ctx, const TargetT* y_true, const T* y_pred,
                              const uint8_t* row_keep, const double* row_stats,
                              const T* grad_loss, int64_t rows, int64_t num_classes,
                              const CeOptions& options, T* grad_y_pred) {
  if constexpr (std::is_same_v<Device, CPUDevice>) {
    CpuMaskedCeGradient(Host(y_true), Host(y_pred), row_keep, row_stats, Host(grad_loss), rows,
                        num_classes, options, Host(grad_y_pred), OpThreadPool(ctx));
    return absl::OkStatus();
  } else {
#if GOOGLE_CUDA
    const CUresult r = LaunchMaskedCeGradient(
        Host(y_true), Host(y_pred), row_keep, row_stats, Host(grad_loss), rows, num_classes,
        options, Host(grad_y_pred), ctx->eigen_device<GPUDevice>().stream());
    if (r == CUDA_SUCCESS) return absl::OkStatus();
    return absl::InternalError(absl::StrCat(
        "launching the masked cross-entropy gradient CUDA kernel failed: ",
        cuda::ErrorMessage(r)));
#else
    return absl::InternalError("no GPU support in this build");
#endif
  }
}

}  // namespace

template <typename Device, typename T, typename TargetT>
class MaskedCeOp : public OpKernel {
 public:
  explicit MaskedCeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::vector<int64_t> ids;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("masked_tokens", &ids));
    OP_REQUIRES(ctx, ids.size() <= static_cast<size_t>(kMaxMaskedTokens),
                absl::InvalidArgumentError(absl::StrCat("at most ", kMaxMaskedTokens,
                                                        " masked tokens are supported, got ",
                                                        ids.size())));
    tokens_.count = static_cast<int>(ids.size());
    for (size_t k = 0; k < ids.size(); ++k) {
      OP_REQUIRES(ctx, ids[k] >= 0,
                  absl::InvalidArgumentError(
                      absl::StrCat("masked token ids must be >= 0, got ", ids[k])));
      tokens_.ids[k] = ids[k];
    }
    ReadCeOptions(ctx, !std::is_same_v<TargetT, T>, &options_);
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& y_true = ctx->input(0);
    const Tensor& y_pred = ctx->input(1);
    int64_t rows, num_classes;
    TensorShape loss_shape;
    if (!ValidateInputs<Device, T, TargetT>(ctx, y_true, y_pred, tokens_, &rows, &num_classes,
                                            &loss_shape)) {
      return;
    }
    TensorShape stats_shape = loss_shape;
    stats_shape.AddDim(kCeRowStats);
    Tensor *loss = nullptr, *row_keep = nullptr, *row_stats = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, loss_shape, &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, loss_shape, &row_keep));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, stats_shape, &row_stats));
    if (rows == 0) return;
    OP_REQUIRES_OK(ctx, (LaunchCeForward<Device, T, TargetT>(
                            ctx, y_true.flat<TargetT>().data(), y_pred.flat<T>().data(), rows,
                            num_classes, tokens_, options_, loss->flat<T>().data(),
                            row_keep->flat<uint8_t>().data(),
                            row_stats->flat<double>().data())));
  }

 private:
  MaskedTokenSet tokens_{};
  CeOptions options_{};
};

template <typename Device, typename T, typename TargetT>
class MaskedCeGradOp : public OpKernel {
 public:
  explicit MaskedCeGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadCeOptions(ctx, !std::is_same_v<TargetT, T>, &options_);
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& y_true = ctx->input(0);
    const Tensor& y_pred = ctx->input(1);
    const Tensor& row_keep = ctx->input(2);
    const Tensor& row_stats = ctx->input(3);
    const Tensor& grad_loss = ctx->input(4);
    int64_t rows, num_classes;
    TensorShape loss_shape;
    if (!ValidateInputs<Device, T, TargetT>(ctx, y_true, y_pred, MaskedTokenSet{}, &rows,
                                            &num_classes, &loss_shape) ||
        !ValidateRowInput(ctx, row_keep, "row_keep", loss_shape) ||
        !ValidateRowInput(ctx, grad_loss, "grad_loss", loss_shape)) {
      return;
    }
    TensorShape stats_shape = loss_shape;
    stats_shape.AddDim(kCeRowStats);
    OP_REQUIRES(ctx, row_stats.shape() == stats_shape,
                absl::InvalidArgumentError(absl::StrCat(
                    "row_stats must have the shape ", stats_shape.DebugString(),
                    " (the forward's), got ", row_stats.shape().DebugString())));
    Tensor* grad_y_pred = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y_pred.shape(), &grad_y_pred));
    if (rows == 0) return;
    OP_REQUIRES_OK(ctx, (LaunchCeGradient<Device, T, TargetT>(
                            ctx, y_true.flat<TargetT>().data(), y_pred.flat<T>().data(),
                            row_keep.flat<uint8_t>().data(), row_stats.flat<double>().data(),
                            grad_loss.flat<T>().data(), rows, num_classes, options_,
                            grad_y_pred->flat<T>().data())));
  }

 private:
  CeOptions options_{};
};

#define REGISTER_CE_SPARSE_KERNELS(DEVICE_NAME, DEVICE, T, ID)                    \
  REGISTER_KERNEL_BUILDER(Name("Import_fused_masked_mae>SparseMaskedCrossentropy") \
                              .Device(DEVICE_NAME)                                \
                              .TypeConstraint<T>("T")                             \
                              .TypeConstraint<ID>("Tidx"),                        \
                          MaskedCeOp<DEVICE, T, ID>);                             \
  REGISTER_KERNEL_BUILDER(Name("Import_fused_masked_mae>SparseMaskedCrossentropyGrad") \
                              .Device(DEVICE_NAME)                                \
                              .TypeConstraint<T>("T")                             \
                              .TypeConstraint<ID>("Tidx"),                        \
                          MaskedCeGradOp<DEVICE, T, ID>);
#define REGISTER_CE_KERNELS(DEVICE_NAME, DEVICE, T)                                 \
  REGISTER_KERNEL_BUILDER(Name("Import_fused_masked_mae>MaskedCrossentropy")         \
                              .Device(DEVICE_NAME)                                  \
                              .TypeConstraint<T>("T"),                              \
                          MaskedCeOp<DEVICE, T, T>);                                \
  REGISTER_KERNEL_BUILDER(Name("Import_fused_masked_mae>MaskedCrossentropyGrad")     \
                              .Device(DEVICE_NAME)                                  \
                              .TypeConstraint<T>("T"),                              \
                          MaskedCeGradOp<DEVICE, T, T>);                            \
  REGISTER_CE_SPARSE_KERNELS(DEVICE_NAME, DEVICE, T, int32_t)                       \
  REGISTER_CE_SPARSE_KERNELS(DEVICE_NAME, DEVICE, T, int64_t)
#define REGISTER_CE_CPU(T) REGISTER_CE_KERNELS(::tensorflow::DEVICE_CPU, CPUDevice, T)
TF_CALL_half(REGISTER_CE_CPU);
TF_CALL_bfloat16(REGISTER_CE_CPU);
TF_CALL_float(REGISTER_CE_CPU);
TF_CALL_double(REGISTER_CE_CPU);
#undef REGISTER_CE_CPU

#if GOOGLE_CUDA
// As for the masked MAE (masked_mae_kernels.cc): GPU kernels only when the
// driver can run them (none, or r525+); the masked MAE's registration logs
// the one warning otherwise. row_stats is device memory like every output.
namespace {
const bool ce_gpu_kernels_registered = [] {
  const cuda::DriverStatus& driver = cuda::Driver();
  if (driver.state != cuda::DriverState::kOk && driver.version > 0) return false;
#define REGISTER_CE_GPU(T) REGISTER_CE_KERNELS(::tensorflow::DEVICE_GPU, GPUDevice, T)
  TF_CALL_half(REGISTER_CE_GPU);
  TF_CALL_bfloat16(REGISTER_CE_GPU);
  TF_CALL_float(REGISTER_CE_GPU);
  TF_CALL_double(REGISTER_CE_GPU);
#undef REGISTER_CE_GPU
  return true;
}();
}  // namespace
#endif  // GOOGLE_CUDA
#undef REGISTER_CE_KERNELS
#undef REGISTER_CE_SPARSE_KERNELS

}  // namespace fused_masked_mae
