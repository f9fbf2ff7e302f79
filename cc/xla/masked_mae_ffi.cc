// Validation and registration shared by the XLA FFI handlers (masked_mae_ffi.h).
#include "cc/xla/masked_mae_ffi.h"

#include <dlfcn.h>

#include <mutex>
#include <string>
#include <vector>

#include "cc/cpu/masked_mae_cpu.h"

namespace fused_masked_mae::xla_ffi {
namespace {

std::string DimsString(ffi::AnyBuffer::Dimensions dims, size_t count) {
  std::string out = "[";
  for (size_t i = 0; i < count; ++i) out += (i ? "," : "") + std::to_string(dims[i]);
  return out + "]";
}

std::string DimsString(ffi::AnyBuffer::Dimensions dims) { return DimsString(dims, dims.size()); }

bool IsFloat(ffi::DataType dtype) {
  return dtype == ffi::DataType::F16 || dtype == ffi::DataType::BF16 ||
         dtype == ffi::DataType::F32 || dtype == ffi::DataType::F64;
}

bool SameDims(ffi::AnyBuffer::Dimensions a, ffi::AnyBuffer::Dimensions b, size_t b_count) {
  if (a.size() != b_count) return false;
  for (size_t i = 0; i < b_count; ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

// An InvalidArgument error as the failed value of an ErrorOr.
ffi::Unexpected<ffi::Error> Invalid(std::string message) {
  return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(std::move(message)));
}

}  // namespace

ffi::ErrorOr<RowGeometry> ValidateInputs(const ffi::AnyBuffer& y_true,
                                         const ffi::AnyBuffer& y_pred, bool sparse) {
  const auto pred_dims = y_pred.dimensions();
  if (!IsFloat(y_pred.element_type())) {
    return Invalid("y_pred must be f16, bf16, f32 or f64");
  }
  if (pred_dims.size() < 1) {
    return Invalid(
        "y_pred must have rank >= 1 (a last axis of classes), got shape []");
  }
  const size_t loss_rank = pred_dims.size() - 1;
  if (sparse) {
    const auto id_type = y_true.element_type();
    if (id_type != ffi::DataType::S32 && id_type != ffi::DataType::S64) {
      return Invalid("y_true_ids must be s32 or s64 class ids");
    }
    if (!SameDims(y_true.dimensions(), pred_dims, loss_rank)) {
      return Invalid(
          "y_true_ids must have y_pred's shape without its last dimension, got y_true_ids " +
          DimsString(y_true.dimensions()) + " and y_pred " + DimsString(pred_dims));
    }
  } else {
    if (!SameDims(y_true.dimensions(), pred_dims, pred_dims.size())) {
      return Invalid("y_true and y_pred must have the same shape, got y_true " +
                                         DimsString(y_true.dimensions()) + " and y_pred " +
                                         DimsString(pred_dims));
    }
    if (y_true.element_type() != y_pred.element_type()) {
      return Invalid("y_true and y_pred must have the same dtype");
    }
  }
  const int64_t num_classes = pred_dims[loss_rank];
  if (num_classes <= 0) {
    return Invalid(
        "the last dimension (classes) must be positive, got shape " + DimsString(pred_dims));
  }
  int64_t rows = 1;
  for (size_t i = 0; i < loss_rank; ++i) rows *= pred_dims[i];  // an allocated buffer: no overflow
  return RowGeometry{rows, num_classes};
}

ffi::ErrorOr<MaskedTokenSet> ValidateTokens(ffi::Span<const int64_t> ids, int64_t num_classes) {
  MaskedTokenSet tokens;
  const std::string invalid = MakeMaskedTokenSet(ids.begin(), ids.size(), num_classes, &tokens);
  if (!invalid.empty()) return Invalid(invalid);
  return tokens;
}

ffi::Error ValidateLike(const ffi::AnyBuffer& buffer, const char* name,
                        const ffi::AnyBuffer& y_pred, bool per_row, ffi::DataType dtype) {
  const auto pred_dims = y_pred.dimensions();
  const size_t count = per_row ? pred_dims.size() - 1 : pred_dims.size();
  if (!SameDims(buffer.dimensions(), pred_dims, count)) {
    return ffi::Error::InvalidArgument(
        std::string(name) + " must have the shape " + DimsString(pred_dims, count) +
        (per_row ? " of the loss (y_pred's shape without its last dimension)" : " of y_pred") +
        ", got " + DimsString(buffer.dimensions()));
  }
  if (buffer.element_type() != dtype) {
    return ffi::Error::InvalidArgument(std::string(name) + " has the wrong dtype");
  }
  return ffi::Error::Success();
}

ffi::ErrorOr<ForwardCall> ValidateForward(const ffi::AnyBuffer& y_true,
                                          const ffi::AnyBuffer& y_pred,
                                          ffi::Span<const int64_t> masked_tokens,
                                          const ffi::AnyBuffer& loss,
                                          const ffi::AnyBuffer& row_keep, bool sparse) {
  const auto geometry = ValidateInputs(y_true, y_pred, sparse);
  if (geometry.has_error()) return ffi::Unexpected<ffi::Error>(geometry.error());
  const auto tokens = ValidateTokens(masked_tokens, geometry.value().num_classes);
  if (tokens.has_error()) return ffi::Unexpected<ffi::Error>(tokens.error());
  for (auto e : {ValidateLike(loss, "loss", y_pred, true, y_pred.element_type()),
                 ValidateLike(row_keep, "row_keep", y_pred, true, ffi::DataType::U8)}) {
    if (e.failure()) return ffi::Unexpected<ffi::Error>(e);
  }
  return ForwardCall{geometry.value(), tokens.value()};
}

ffi::ErrorOr<RowGeometry> ValidateGrad(const ffi::AnyBuffer& y_true, const ffi::AnyBuffer& y_pred,
                                       const ffi::AnyBuffer& row_keep,
                                       const ffi::AnyBuffer& grad_loss,
                                       const ffi::AnyBuffer& grad_y_pred, bool sparse) {
  const auto geometry = ValidateInputs(y_true, y_pred, sparse);
  if (geometry.has_error()) return geometry;
  for (auto e : {ValidateLike(row_keep, "row_keep", y_pred, true, ffi::DataType::U8),
                 ValidateLike(grad_loss, "grad_loss", y_pred, true, y_pred.element_type()),
                 ValidateLike(grad_y_pred, "grad_y_pred", y_pred, false, y_pred.element_type())}) {
    if (e.failure()) return ffi::Unexpected<ffi::Error>(e);
  }
  return geometry;
}

namespace {

struct HandlerEntry {
  std::string platform;
  std::string target;
  XLA_FFI_Handler* handler;
  bool allowed;
};

std::mutex& TableMutex() {
  static auto* mu = new std::mutex;
  return *mu;
}

std::vector<HandlerEntry>& Table() {
  static auto* table = new std::vector<HandlerEntry>;
  return *table;
}

// TensorFlow's FFI API: xla::ffi::GetXlaFfiApi() from libtensorflow_framework.so.2,
// found in the process's global scope (TensorFlow's Python import puts it
// there), or in that library if it is loaded at all. Null without TensorFlow.
const XLA_FFI_Api* TensorFlowFfiApi() {
  using Accessor = const XLA_FFI_Api* (*)();
  constexpr const char* kSymbol = "_ZN3xla3ffi12GetXlaFfiApiEv";  // xla::ffi::GetXlaFfiApi()
  void* symbol = dlsym(RTLD_DEFAULT, kSymbol);
  if (symbol == nullptr) {
    if (void* tf = dlopen("libtensorflow_framework.so.2", RTLD_NOW | RTLD_NOLOAD)) {
      symbol = dlsym(tf, kSymbol);
      dlclose(tf);  // RTLD_NOLOAD took a reference; TensorFlow stays loaded
    }
  }
  return symbol == nullptr ? nullptr : reinterpret_cast<Accessor>(symbol)();
}

std::string RegisterHandler(const XLA_FFI_Api* api, const HandlerEntry& entry) {
  std::string line = entry.platform + " " + entry.target;
  if (api == nullptr) {
    return line + " error: TensorFlow's XLA FFI API was not found in this process (import "
                  "tensorflow before registering)";
  }
  if (XLA_FFI_Error* error = ffi::Ffi::RegisterStaticHandler(api, entry.target, entry.platform,
                                                             entry.handler)) {
    line += std::string(" error: ") + ffi::internal::GetErrorMessage(api, error);
    ffi::internal::DestroyError(api, error);
    return line;
  }
  return line + " ok";
}

}  // namespace

void AddHandlers(const char* platform, bool allowed, XLA_FFI_Handler* forward,
                 XLA_FFI_Handler* sparse_forward, XLA_FFI_Handler* grad,
                 XLA_FFI_Handler* sparse_grad) {
  std::lock_guard<std::mutex> lock(TableMutex());
  for (const auto& [target, handler] :
       {std::pair<const char*, XLA_FFI_Handler*>{kForwardTarget, forward},
        {kSparseForwardTarget, sparse_forward},
        {kGradTarget, grad},
        {kSparseGradTarget, sparse_grad}}) {
    Table().push_back(HandlerEntry{platform, target, handler, allowed});
  }
}

std::string RegisterWithTensorFlow() {
  // Once per process: XLA refuses a second registration of a target.
  static const std::string* report = [] {
    std::vector<HandlerEntry> entries;
    {
      std::lock_guard<std::mutex> lock(TableMutex());
      entries = Table();
    }
    const XLA_FFI_Api* api = TensorFlowFfiApi();
    std::string out;
    for (const auto& entry : entries) {
      if (entry.allowed) out += RegisterHandler(api, entry) + "\n";
    }
    return new std::string(out);
  }();
  return *report;
}

XLA_FFI_Handler* FindHandler(const std::string& platform, const std::string& target) {
  std::lock_guard<std::mutex> lock(TableMutex());
  for (const auto& entry : Table()) {
    if (entry.allowed && entry.platform == platform && entry.target == target) {
      return entry.handler;
    }
  }
  return nullptr;
}

std::string Targets() {
  std::lock_guard<std::mutex> lock(TableMutex());
  std::string out;
  for (const auto& entry : Table()) {
    out += entry.platform + " " + entry.target + (entry.allowed ? " allowed\n" : " refused\n");
  }
  return out;
}

}  // namespace fused_masked_mae::xla_ffi

// For the Python package (ctypes). TensorFlow: registers the handlers with
// TensorFlow's XLA on the first call and returns the report, which
// python/fused_masked_mae/xla.py turns into an ImportError or a logged
// fallback.
extern "C" __attribute__((visibility("default"))) const char*
FusedMaskedMaeXlaRegisterWithTensorFlow() {
  static const std::string* report =
      new std::string(fused_masked_mae::xla_ffi::RegisterWithTensorFlow());
  return report->c_str();
}

// JAX: the handler of `target` for `platform` ("Host" or "CUDA"), or null when
// this build has none or it may not run here (CUDA below the driver floor).
extern "C" __attribute__((visibility("default"))) void* FusedMaskedMaeXlaHandler(
    const char* platform, const char* target) {
  return reinterpret_cast<void*>(fused_masked_mae::xla_ffi::FindHandler(platform, target));
}

// Every handler in the table: "<platform> <target> allowed|refused" lines.
extern "C" __attribute__((visibility("default"))) const char* FusedMaskedMaeXlaTargets() {
  static const std::string* targets = new std::string(fused_masked_mae::xla_ffi::Targets());
  return targets->c_str();
}
