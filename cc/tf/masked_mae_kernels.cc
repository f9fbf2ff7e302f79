// TensorFlow kernels for Import_fused_masked_mae>MaskedMae and its gradient.
//
// Every input is validated here, before any memory is touched; the device
// functors (CPU below, CUDA in masked_mae_kernels.cu.cc) may then trust
// [rows, num_classes] and the token set.
#define EIGEN_USE_THREADS
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#endif

#include "cc/tf/masked_mae_kernels.h"

#include <string>
#include <type_traits>
#include <vector>

#include "cc/math/host_float16.h"
#include "cc/cpu/masked_mae_cpu.h"

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

#if GOOGLE_CUDA
#include "cc/cuda/cuda_driver.h"
#include "cc/cuda/masked_mae_cuda.h"
#include "tensorflow/core/platform/logging.h"
#endif

namespace fused_masked_mae {

// TensorFlow's 16-bit types share their bit layout with the host row loops'
// types (host_float16.h, branch-free conversions) and with CUDA's: pointers
// are viewed as those, never converted.
template <typename T, typename Half, typename BFloat16>
struct SameLayoutAs {
  using type = T;
};
template <typename Half, typename BFloat16>
struct SameLayoutAs<Eigen::half, Half, BFloat16> {
  using type = Half;
};
template <typename Half, typename BFloat16>
struct SameLayoutAs<Eigen::bfloat16, Half, BFloat16> {
  using type = BFloat16;
};

template <typename Half, typename BFloat16, typename T>
auto ViewAs(T* ptr) {
  using U = typename SameLayoutAs<std::remove_const_t<T>, Half, BFloat16>::type;
  return reinterpret_cast<std::conditional_t<std::is_const_v<T>, const U, U>*>(ptr);
}

template <typename T>
auto AsHost(T* ptr) {
  return ViewAs<HostHalf, HostBFloat16>(ptr);
}

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using CPUDevice = Eigen::ThreadPoolDevice;
using GPUDevice = Eigen::GpuDevice;

namespace {

// The CPU launchers' ParallelFor on the op's intra-op thread pool.
ParallelFor OpThreadPool(OpKernelContext* ctx) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [workers](int64_t rows, int64_t cost_per_row, const RowRangeBody& body) {
    workers->ParallelFor(rows, cost_per_row, body);
  };
}

}  // namespace

template <typename T>
auto AsHostTargets(const T* y_true) {
  return AsHost(y_true);
}
inline const int32_t* AsHostTargets(const int32_t* ids) { return ids; }
inline const int64_t* AsHostTargets(const int64_t* ids) { return ids; }

template <typename T, typename TargetT>
struct MaskedMaeFunctor<CPUDevice, T, TargetT> {
  absl::Status operator()(OpKernelContext* ctx, const TargetT* y_true, const T* y_pred,
                          int64_t rows, int64_t num_classes, const MaskedTokenSet& tokens,
                          T* loss, uint8_t* row_keep) {
    const auto* p = AsHost(y_pred);
    auto* out = AsHost(loss);
#ifdef FUSED_MASKED_MAE_PLANT_OOB_READ_FOR_SANITIZER_TEST
    // Test-only bug for `./build.sh sanitize`'s self-check: one element past
    // y_pred. Never defined in a real build.
    out[0] = static_cast<std::remove_pointer_t<decltype(out)>>(
        static_cast<float>(p[rows * num_classes]));
#endif
    CpuMaskedMaeForward(AsHostTargets(y_true), p, rows, num_classes, tokens, out, row_keep,
                        OpThreadPool(ctx));
    return absl::OkStatus();
  }
};

template <typename T, typename TargetT>
struct MaskedMaeGradFunctor<CPUDevice, T, TargetT> {
  absl::Status operator()(OpKernelContext* ctx, const TargetT* y_true, const T* y_pred,
                          const uint8_t* row_keep, const T* grad_loss, int64_t rows,
                          int64_t num_classes, T* grad_y_pred) {
    CpuMaskedMaeGradient(AsHostTargets(y_true), AsHost(y_pred), row_keep, AsHost(grad_loss),
                         rows, num_classes, AsHost(grad_y_pred), OpThreadPool(ctx));
    return absl::OkStatus();
  }
};

#if GOOGLE_CUDA
// The launchers take the host 16-bit types (same bits as Eigen's and CUDA's).
template <typename T>
auto AsCuda(T* ptr) {
  return AsHost(ptr);
}

absl::Status LaunchStatus(CUresult error, const char* what) {
  if (error == CUDA_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("launching the ", what, " CUDA kernel failed: ",
                                          cuda::ErrorMessage(error)));
}

template <typename T, typename TargetT>
struct MaskedMaeFunctor<GPUDevice, T, TargetT> {
  absl::Status operator()(OpKernelContext* ctx, const TargetT* y_true, const T* y_pred,
                          int64_t rows, int64_t num_classes, const MaskedTokenSet& tokens,
                          T* loss, uint8_t* row_keep) {
    const auto stream = ctx->eigen_device<GPUDevice>().stream();
    if constexpr (std::is_same_v<TargetT, T>) {
      return LaunchStatus(LaunchMaskedMaeForward(AsCuda(y_true), AsCuda(y_pred), rows,
                                                 num_classes, tokens, AsCuda(loss), row_keep,
                                                 stream),
                          "masked MAE forward");
    } else {
      return LaunchStatus(LaunchSparseMaskedMaeForward(y_true, AsCuda(y_pred), rows, num_classes,
                                                       tokens, AsCuda(loss), row_keep, stream),
                          "sparse masked MAE forward");
    }
  }
};

template <typename T, typename TargetT>
struct MaskedMaeGradFunctor<GPUDevice, T, TargetT> {
  absl::Status operator()(OpKernelContext* ctx, const TargetT* y_true, const T* y_pred,
                          const uint8_t* row_keep, const T* grad_loss, int64_t rows,
                          int64_t num_classes, T* grad_y_pred) {
    const auto stream = ctx->eigen_device<GPUDevice>().stream();
    if constexpr (std::is_same_v<TargetT, T>) {
      return LaunchStatus(
          LaunchMaskedMaeGradient(AsCuda(y_true), AsCuda(y_pred), row_keep, AsCuda(grad_loss),
                                  rows, num_classes, AsCuda(grad_y_pred), stream),
          "masked MAE gradient");
    } else {
      return LaunchStatus(
          LaunchSparseMaskedMaeGradient(y_true, AsCuda(y_pred), row_keep, AsCuda(grad_loss),
                                        rows, num_classes, AsCuda(grad_y_pred), stream),
          "sparse masked MAE gradient");
    }
  }
};
#endif  // GOOGLE_CUDA

// OP_REQUIRES for a bool-returning helper.
#define OP_REQUIRES_VALUE_OR_FALSE(CTX, EXP, STATUS) \
  do {                                               \
    if (!TF_PREDICT_TRUE(EXP)) {                     \
      (CTX)->CtxFailure(__FILE__, __LINE__, STATUS); \
      return false;                                  \
    }                                                \
  } while (0)

// Input validation shared by the forward and grad kernels.
// Checks y_true/y_pred and sets the [rows, num_classes] view and the loss
// shape. Returns false (with ctx's status set) on invalid input.
// Dense: y_true has y_pred's shape. Sparse (TargetT an integer): y_true holds
// class ids of y_pred's shape without its last axis, each in [0, C); the ids
// are checked here on CPU (on GPU they are in device memory, and the kernels
// give NaN for an invalid id, as TensorFlow's sparse cross-entropy does).
// tokens (the forward's masked ids) must be below C.
template <typename Device, typename T, typename TargetT>
bool ValidateInputs(OpKernelContext* ctx, const Tensor& y_true, const Tensor& y_pred,
                    const MaskedTokenSet& tokens, int64_t* rows, int64_t* num_classes,
                    TensorShape* loss_shape) {
  constexpr bool kSparse = !std::is_same_v<TargetT, T>;
  OP_REQUIRES_VALUE_OR_FALSE(ctx, y_pred.dims() >= 1,
                             absl::InvalidArgumentError(absl::StrCat(
                                 "y_pred must have rank >= 1 (a last axis of classes), got "
                                 "shape ",
                                 y_pred.shape().DebugString())));
  *loss_shape = y_pred.shape();
  loss_shape->RemoveLastDims(1);
  const TensorShape& expected = kSparse ? *loss_shape : y_pred.shape();
  OP_REQUIRES_VALUE_OR_FALSE(
      ctx, y_true.shape() == expected,
      absl::InvalidArgumentError(absl::StrCat(
          kSparse ? "y_true_ids must have y_pred's shape without its last dimension, got "
                    "y_true_ids "
                  : "y_true and y_pred must have the same shape, got y_true ",
          y_true.shape().DebugString(), " and y_pred ", y_pred.shape().DebugString())));
  *num_classes = y_pred.dim_size(y_pred.dims() - 1);
  OP_REQUIRES_VALUE_OR_FALSE(
      ctx, *num_classes > 0,
      absl::InvalidArgumentError(
          absl::StrCat("the last dimension (classes) must be positive, got shape ",
                       y_pred.shape().DebugString())));
  for (int k = 0; k < tokens.count; ++k) {
    OP_REQUIRES_VALUE_OR_FALSE(
        ctx, tokens.ids[k] < *num_classes,
        absl::InvalidArgumentError(absl::StrCat("masked token id ", tokens.ids[k],
                                                " is outside [0, ", *num_classes,
                                                ") for inputs with ", *num_classes,
                                                " classes")));
  }
  *rows = loss_shape->num_elements();
  if constexpr (kSparse && std::is_same_v<Device, CPUDevice>) {
    const auto ids = y_true.flat<TargetT>();
    const std::string invalid = InvalidClassIdMessage(ids.data(), ids.size(), *num_classes);
    OP_REQUIRES_VALUE_OR_FALSE(ctx, invalid.empty(), absl::InvalidArgumentError(invalid));
  }
  return true;
}

// A per-row input of the gradient (row_keep, grad_loss) must have the loss's shape.
bool ValidateRowInput(OpKernelContext* ctx, const Tensor& tensor, const char* name,
                      const TensorShape& loss_shape) {
  OP_REQUIRES_VALUE_OR_FALSE(
      ctx, tensor.shape() == loss_shape,
      absl::InvalidArgumentError(absl::StrCat(
          name, " must have the shape of the loss ", loss_shape.DebugString(),
          " (y_pred's shape without its last dimension), got ", tensor.shape().DebugString())));
  return true;
}

template <typename Device, typename T, typename TargetT>
class MaskedMaeOp : public OpKernel {
 public:
  explicit MaskedMaeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::vector<int64_t> ids;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("masked_tokens", &ids));
    // The one token rule (masked_mae_cpu.h); ids < C are checked per call.
    const std::string invalid = MakeMaskedTokenSet(ids.data(), ids.size(), -1, &tokens_);
    OP_REQUIRES(ctx, invalid.empty(), absl::InvalidArgumentError(invalid));
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
    Tensor* loss = nullptr;
    Tensor* row_keep = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, loss_shape, &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, loss_shape, &row_keep));
    if (rows == 0) return;
    OP_REQUIRES_OK(ctx, (MaskedMaeFunctor<Device, T, TargetT>()(
                            ctx, y_true.flat<TargetT>().data(), y_pred.flat<T>().data(), rows,
                            num_classes, tokens_, loss->flat<T>().data(),
                            row_keep->flat<uint8_t>().data())));
  }

 private:
  MaskedTokenSet tokens_{};
};

template <typename Device, typename T, typename TargetT>
class MaskedMaeGradOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& y_true = ctx->input(0);
    const Tensor& y_pred = ctx->input(1);
    const Tensor& row_keep = ctx->input(2);
    const Tensor& grad_loss = ctx->input(3);
    int64_t rows, num_classes;
    TensorShape loss_shape;
    if (!ValidateInputs<Device, T, TargetT>(ctx, y_true, y_pred, MaskedTokenSet{}, &rows,
                                            &num_classes, &loss_shape) ||
        !ValidateRowInput(ctx, row_keep, "row_keep", loss_shape) ||
        !ValidateRowInput(ctx, grad_loss, "grad_loss", loss_shape)) {
      return;
    }
    Tensor* grad_y_pred = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y_pred.shape(), &grad_y_pred));
    if (rows == 0) return;
    OP_REQUIRES_OK(ctx, (MaskedMaeGradFunctor<Device, T, TargetT>()(
                            ctx, y_true.flat<TargetT>().data(), y_pred.flat<T>().data(),
                            row_keep.flat<uint8_t>().data(), grad_loss.flat<T>().data(), rows,
                            num_classes, grad_y_pred->flat<T>().data())));
  }
};

#define REGISTER_KERNELS(DEVICE_NAME, DEVICE, T)                                            \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("Import_fused_masked_mae>MaskedMae").Device(DEVICE_NAME).TypeConstraint<T>("T"),          \
      MaskedMaeOp<DEVICE, T, T>);                                                           \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("Import_fused_masked_mae>MaskedMaeGrad").Device(DEVICE_NAME).TypeConstraint<T>("T"),      \
      MaskedMaeGradOp<DEVICE, T, T>);                                                       \
  REGISTER_SPARSE_KERNELS(DEVICE_NAME, DEVICE, T, int32_t)                                  \
  REGISTER_SPARSE_KERNELS(DEVICE_NAME, DEVICE, T, int64_t)

#define REGISTER_SPARSE_KERNELS(DEVICE_NAME, DEVICE, T, ID)                                 \
  REGISTER_KERNEL_BUILDER(Name("Import_fused_masked_mae>SparseMaskedMae")                            \
                              .Device(DEVICE_NAME)                                          \
                              .TypeConstraint<T>("T")                                       \
                              .TypeConstraint<ID>("Tidx"),                                  \
                          MaskedMaeOp<DEVICE, T, ID>);                                      \
  REGISTER_KERNEL_BUILDER(Name("Import_fused_masked_mae>SparseMaskedMaeGrad")                        \
                              .Device(DEVICE_NAME)                                          \
                              .TypeConstraint<T>("T")                                       \
                              .TypeConstraint<ID>("Tidx"),                                  \
                          MaskedMaeGradOp<DEVICE, T, ID>);

#define REGISTER_CPU(T) REGISTER_KERNELS(::tensorflow::DEVICE_CPU, CPUDevice, T)
TF_CALL_half(REGISTER_CPU);
TF_CALL_bfloat16(REGISTER_CPU);
TF_CALL_float(REGISTER_CPU);
TF_CALL_double(REGISTER_CPU);
#undef REGISTER_CPU

#if GOOGLE_CUDA
// The GPU kernels are registered only when they can run: a static
// REGISTER_KERNEL_BUILDER cannot be conditional, so these registrations are
// function-local statics, run once by the load-time initializer below after
// checking the driver. With a driver older than the minimum (CUDA 12.0, r525)
// TensorFlow then places the ops on the CPU instead of failing at the first
// launch, and one warning says why. Without any driver (CPU-only machines)
// TensorFlow has no GPU device, so registering changes nothing and stays silent.
void RegisterGpuKernels() {
#define REGISTER_GPU(T) REGISTER_KERNELS(::tensorflow::DEVICE_GPU, GPUDevice, T)
  TF_CALL_half(REGISTER_GPU);
  TF_CALL_bfloat16(REGISTER_GPU);
  TF_CALL_float(REGISTER_GPU);
  TF_CALL_double(REGISTER_GPU);
#undef REGISTER_GPU
}

namespace {
const bool gpu_kernels_registered = [] {
  const cuda::DriverStatus& driver = cuda::Driver();
  // A driver that is there but unusable (too old, or missing an entry point):
  // TensorFlow could still place the ops on a GPU, so keep them off it.
  if (driver.state != cuda::DriverState::kOk && driver.version > 0) {
    LOG(WARNING) << "fused_masked_mae: GPU kernels not registered, the ops run on the CPU: "
                 << driver.message;
    return false;
  }
  RegisterGpuKernels();
  return true;
}();
}  // namespace
#endif  // GOOGLE_CUDA

}  // namespace fused_masked_mae
