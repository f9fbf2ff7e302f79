// See cuda_driver.h. Compiled by the host compiler against the CUDA 12
// driver header (cuda.h) only; an empty translation unit in CPU-only builds.
#ifdef FUSED_MASKED_MAE_WITH_CUDA

#include "cc/cuda/cuda_driver.h"

#include <dlfcn.h>

#include <atomic>
#include <cstdlib>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

// The embedded device code, emitted by tools/build_device_code.sh: entries of
// {sm (70 for sm_70), is_ptx, data, size}, ended by an entry with sm == 0.
// PTX entries end with a NUL (the driver reads PTX as a C string).
struct FusedMaskedMaeDeviceImage {
  int64_t sm;
  int64_t is_ptx;
  const unsigned char* data;
  uint64_t size;
};
extern "C" __attribute__((visibility("hidden"))) const FusedMaskedMaeDeviceImage
    fused_masked_mae_device_images[];

namespace fused_masked_mae {
namespace cuda {
namespace {

// Driver entry points, by their ABI names. cuStreamGetCtx is the original
// two-argument one (CUDA 12.5+ headers map the name to a 3-argument _v2).
struct Api {
  CUresult (*Init)(unsigned);
  CUresult (*DriverGetVersion)(int*);
  CUresult (*GetErrorName)(CUresult, const char**);
  CUresult (*GetErrorString)(CUresult, const char**);
  CUresult (*CtxGetCurrent)(CUcontext*);
  CUresult (*CtxGetId)(CUcontext, unsigned long long*);
  CUresult (*CtxPushCurrent)(CUcontext);
  CUresult (*CtxPopCurrent)(CUcontext*);
  CUresult (*CtxGetDevice)(CUdevice*);
  CUresult (*DeviceGet)(CUdevice*, int);
  CUresult (*DeviceGetCount)(int*);
  CUresult (*DeviceGetAttribute)(int*, CUdevice_attribute, CUdevice);
  CUresult (*DevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*DevicePrimaryCtxRelease)(CUdevice);
  CUresult (*StreamGetCtx)(CUstream, CUcontext*);
  CUresult (*PointerGetAttribute)(void*, CUpointer_attribute, CUdeviceptr);
  CUresult (*ModuleLoadData)(CUmodule*, const void*);
  CUresult (*ModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*LaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                           unsigned, CUstream, void**, void**);
};

struct Loaded {
  DriverStatus status;
  Api api{};
};

thread_local std::string last_error_detail;

CUresult Fail(CUresult result, std::string detail) {
  last_error_detail = std::move(detail);
  return result;
}

template <typename Fn>
bool Resolve(void* lib, const char* name, Fn* fn) {
  *fn = reinterpret_cast<Fn>(dlsym(lib, name));
  return *fn != nullptr;
}

Loaded* LoadDriver() {
  auto* loaded = new Loaded;  // lives for the process
  DriverStatus& status = loaded->status;
  status = {DriverState::kMissing, 0, ""};
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  Api& a = loaded->api;
  if (lib == nullptr) {
    status.message = "no NVIDIA driver (libcuda.so.1 could not be loaded)";
  } else if (!Resolve(lib, "cuDriverGetVersion", &a.DriverGetVersion) ||
             a.DriverGetVersion(&status.version) != CUDA_SUCCESS) {
    status.message = "the NVIDIA driver's version could not be read";
    status.version = 0;
  } else {
    // Everything else is only needed at and above the minimum version.
    const bool ok =
        Resolve(lib, "cuInit", &a.Init) && Resolve(lib, "cuGetErrorName", &a.GetErrorName) &&
        Resolve(lib, "cuGetErrorString", &a.GetErrorString) &&
        Resolve(lib, "cuCtxGetCurrent", &a.CtxGetCurrent) &&
        Resolve(lib, "cuCtxGetId", &a.CtxGetId) &&
        Resolve(lib, "cuCtxPushCurrent_v2", &a.CtxPushCurrent) &&
        Resolve(lib, "cuCtxPopCurrent_v2", &a.CtxPopCurrent) &&
        Resolve(lib, "cuCtxGetDevice", &a.CtxGetDevice) &&
        Resolve(lib, "cuDeviceGet", &a.DeviceGet) &&
        Resolve(lib, "cuDeviceGetCount", &a.DeviceGetCount) &&
        Resolve(lib, "cuDeviceGetAttribute", &a.DeviceGetAttribute) &&
        Resolve(lib, "cuDevicePrimaryCtxRetain", &a.DevicePrimaryCtxRetain) &&
        Resolve(lib, "cuDevicePrimaryCtxRelease_v2", &a.DevicePrimaryCtxRelease) &&
        Resolve(lib, "cuStreamGetCtx", &a.StreamGetCtx) &&
        Resolve(lib, "cuPointerGetAttribute", &a.PointerGetAttribute) &&
        Resolve(lib, "cuModuleLoadData", &a.ModuleLoadData) &&
        Resolve(lib, "cuModuleGetFunction", &a.ModuleGetFunction) &&
        Resolve(lib, "cuLaunchKernel", &a.LaunchKernel);
    status.state = ClassifyDriverVersion(status.version);
    if (status.state == DriverState::kTooOld) {
      status.message = TooOldMessage(status.version);
    } else if (!ok) {
      status.state = DriverState::kMissing;
      status.message = "the NVIDIA driver (CUDA " + VersionString(status.version) +
                       ") lacks a driver API entry point this library needs";
    }
  }
  if (const char* fake = std::getenv("FUSED_MASKED_MAE_FAKE_CUDA_DRIVER_VERSION")) {
    status.version = std::atoi(fake);
    status.state = ClassifyDriverVersion(status.version);
    status.message = status.state == DriverState::kTooOld ? TooOldMessage(status.version)
                     : status.state == DriverState::kMissing
                         ? "no NVIDIA driver (FUSED_MASKED_MAE_FAKE_CUDA_DRIVER_VERSION=0)"
                         : status.message;
    if (status.state == DriverState::kOk && a.LaunchKernel == nullptr) {
      status.state = DriverState::kMissing;  // a fake version cannot make up a driver
      status.message = "no NVIDIA driver (libcuda.so.1 could not be loaded)";
    }
  }
  return loaded;
}

const Loaded& TheDriver() {
  static const Loaded* loaded = LoadDriver();
  return *loaded;
}

// cuInit once, after the version check.
CUresult InitOnce(const Api& api) {
  static const CUresult result = api.Init(0);
  return result;
}

// The driver usable for launches, or why not.
CUresult UsableDriver(const Api** api) {
  last_error_detail.clear();
  const Loaded& d = TheDriver();
  if (d.status.state != DriverState::kOk) {
    return Fail(d.status.state == DriverState::kTooOld ? CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
                                                       : CUDA_ERROR_NO_DEVICE,
                d.status.message);
  }
  *api = &d.api;
  const CUresult init = InitOnce(d.api);
  if (init != CUDA_SUCCESS) return Fail(init, "cuInit failed");
  return CUDA_SUCCESS;
}

bool IsDefaultStream(CUstream stream) {
  const auto handle = reinterpret_cast<uintptr_t>(stream);
  return handle == 0 || handle == reinterpret_cast<uintptr_t>(CU_STREAM_LEGACY) ||
         handle == reinterpret_cast<uintptr_t>(CU_STREAM_PER_THREAD);
}

CUresult ContextOf(const Api& api, CUstream stream, CUcontext* ctx) {
  *ctx = nullptr;
  if (!IsDefaultStream(stream)) return api.StreamGetCtx(stream, ctx);
  const CUresult result = api.CtxGetCurrent(ctx);
  if (result == CUDA_SUCCESS && *ctx == nullptr) {
    return Fail(CUDA_ERROR_INVALID_CONTEXT,
                "a default stream was given and no CUDA context is current on this thread");
  }
  return result;
}

// Makes ctx current for the scope when it is not already.
class ScopedContext {
 public:
  ScopedContext(const Api& api, CUcontext ctx) : api_(api) {
    CUcontext current = nullptr;
    status_ = api.CtxGetCurrent(&current);
    if (status_ == CUDA_SUCCESS && current != ctx) {
      status_ = api.CtxPushCurrent(ctx);
      pushed_ = status_ == CUDA_SUCCESS;
    }
  }
  ~ScopedContext() {
    CUcontext popped;
    if (pushed_) api_.CtxPopCurrent(&popped);
  }
  CUresult status() const { return status_; }

 private:
  const Api& api_;
  CUresult status_;
  bool pushed_ = false;
};

// Runs body(api, ctx) with the context of `stream` current (the stream's own
// context, or the current one for a default stream).
template <typename Body>
CUresult InStreamContext(CUstream stream, Body&& body) {
  const Api* api = nullptr;
  CUresult r = UsableDriver(&api);
  if (r != CUDA_SUCCESS) return r;
  CUcontext ctx;
  r = ContextOf(*api, stream, &ctx);
  if (r != CUDA_SUCCESS) return r;
  const ScopedContext scope(*api, ctx);
  if (scope.status() != CUDA_SUCCESS) {
    return Fail(scope.status(), "making the stream's context current failed");
  }
  return body(*api, ctx);
}

struct Module {
  unsigned long long ctx_id;  // cuCtxGetId: unique for the process, unlike a
                              // context's address, which a new context may reuse
  CUmodule module;
  CUfunction functions[kNumKernels];
  // A failed load is kept too: every later launch in the context returns the
  // same error at once instead of trying (and JIT-compiling) again.
  CUresult status = CUDA_SUCCESS;
  std::string failure;
};

std::string BuiltFor() {
  std::string out;
  for (const auto* image = fused_masked_mae_device_images; image->sm != 0; ++image) {
    out += (out.empty() ? "" : ", ") + std::string(image->is_ptx ? "compute_" : "sm_") +
           std::to_string(image->sm);
  }
  return out;
}

// The image for compute capability `cc` (e.g. 86): machine code of the same
// major version and the highest minor not above the GPU's (sm_80 runs on
// sm_86 and sm_89), else PTX of the highest architecture not above the GPU
// (the driver compiles it), else none.
const FusedMaskedMaeDeviceImage* PickImage(int cc, bool ptx) {
  const FusedMaskedMaeDeviceImage* best = nullptr;
  for (const auto* image = fused_masked_mae_device_images; image->sm != 0; ++image) {
    const bool fits = ptx ? (image->is_ptx && image->sm <= cc)
                          : (!image->is_ptx && image->sm / 10 == cc / 10 && image->sm <= cc);
    if (fits && (best == nullptr || image->sm > best->sm)) best = image;
  }
  return best;
}

CUresult LoadModule(const Api& api, CUcontext ctx, std::unique_ptr<Module>* out) {
  CUdevice device;
  int major = 0, minor = 0;
  CUresult r = api.CtxGetDevice(&device);
  if (r == CUDA_SUCCESS) {
    r = api.DeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device);
  }
  if (r == CUDA_SUCCESS) {
    r = api.DeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device);
  }
  if (r != CUDA_SUCCESS) return Fail(r, "reading the GPU's compute capability failed");
  const int cc = major * 10 + minor;
  auto module = std::make_unique<Module>();
  r = api.CtxGetId(ctx, &module->ctx_id);
  if (r != CUDA_SUCCESS) return Fail(r, "cuCtxGetId failed");
  r = CUDA_ERROR_NO_BINARY_FOR_GPU;
  std::string tried;
  for (bool ptx : {false, true}) {
    const FusedMaskedMaeDeviceImage* image = PickImage(cc, ptx);
    if (image == nullptr) continue;
    r = api.ModuleLoadData(&module->module, image->data);
    if (r == CUDA_SUCCESS) break;
    tried += std::string(tried.empty() ? "" : ", ") + (ptx ? "compute_" : "sm_") +
             std::to_string(image->sm);
  }
  if (r != CUDA_SUCCESS) {
    return Fail(r, "no loadable device code for this GPU (sm_" + std::to_string(cc) +
                       "); the library has " + BuiltFor() +
                       (tried.empty() ? "" : "; loading failed for " + tried));
  }
  for (int k = 0; k < kNumKernels; ++k) {
    r = api.ModuleGetFunction(&module->functions[k], module->module, KernelName(k).c_str());
    if (r != CUDA_SUCCESS) return Fail(r, "kernel " + KernelName(k) + " is missing");
  }
  *out = std::move(module);
  return CUDA_SUCCESS;
}

// The module of `ctx` (ctx must be current), loaded on first use and kept
// for the process (one per context; a destroyed context's module is not
// unloaded, and never matches a later context's id). A load that failed is
// remembered as failed for that context.
CUresult ModuleFor(const Api& api, CUcontext ctx, const Module** module) {
  static std::mutex mu;
  static std::list<std::unique_ptr<Module>>* modules = new std::list<std::unique_ptr<Module>>;
  unsigned long long id = 0;
  const CUresult got_id = api.CtxGetId(ctx, &id);
  if (got_id != CUDA_SUCCESS) return Fail(got_id, "cuCtxGetId failed");
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& m : *modules) {
    if (m->ctx_id == id) {
      if (m->status != CUDA_SUCCESS) return Fail(m->status, m->failure);
      *module = m.get();
      return CUDA_SUCCESS;
    }
  }
  std::unique_ptr<Module> loaded;
  const CUresult r = LoadModule(api, ctx, &loaded);
  if (r != CUDA_SUCCESS && r != CUDA_ERROR_OUT_OF_MEMORY) {  // out of memory may pass
    auto failed = std::make_unique<Module>();
    failed->ctx_id = id;
    failed->status = r;
    failed->failure = last_error_detail;
    modules->push_back(std::move(failed));
    return r;
  }
  if (r != CUDA_SUCCESS) return r;
  *module = loaded.get();
  modules->push_back(std::move(loaded));
  return CUDA_SUCCESS;
}

}  // namespace

DriverState ClassifyDriverVersion(int version) {
  if (version <= 0) return DriverState::kMissing;
  return version < kMinimumDriverVersion ? DriverState::kTooOld : DriverState::kOk;
}

std::string VersionString(int version) {
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

std::string TooOldMessage(int version) {
  return "the NVIDIA driver supports CUDA " + VersionString(version) +
         " (cuDriverGetVersion " + std::to_string(version) +
         "), older than the CUDA 12.0 that fused_masked_mae's GPU kernels need: upgrade the "
         "NVIDIA driver to r525 or newer to run them on the GPU";
}

const DriverStatus& Driver() { return TheDriver().status; }

CUresult LaunchKernel(int kernel_index, uint32_t grid, uint32_t block, const KernelParams& params,
                      CUstream stream) {
  if (kernel_index < 0 || kernel_index >= kNumKernels) {
    return Fail(CUDA_ERROR_INVALID_VALUE, "bad kernel index " + std::to_string(kernel_index));
  }
  return InStreamContext(stream, [&](const Api& api, CUcontext ctx) {
    const Module* module = nullptr;
    CUresult r = ModuleFor(api, ctx, &module);
    if (r != CUDA_SUCCESS) return r;
    void* args[] = {const_cast<KernelParams*>(&params)};
    r = api.LaunchKernel(module->functions[kernel_index], grid, 1, 1, block, 1, 1, 0, stream,
                         args, nullptr);
    if (r != CUDA_SUCCESS) return Fail(r, "cuLaunchKernel of " + KernelName(kernel_index));
    return CUDA_SUCCESS;
  });
}

CUresult Preload(int device) {
  const ScopedDevice on_device(device);
  if (on_device.status() != CUDA_SUCCESS) return on_device.status();
  return InStreamContext(nullptr, [&](const Api& api, CUcontext ctx) {
    const Module* module = nullptr;
    return ModuleFor(api, ctx, &module);
  });
}

CUresult MultiprocessorCount(CUstream stream, int* count) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  *count = 0;
  return InStreamContext(stream, [&](const Api& api, CUcontext) {
    CUdevice dev;
    CUresult r = api.CtxGetDevice(&dev);
    if (r != CUDA_SUCCESS) return r;
    const int ordinal = static_cast<int>(dev);
    if (ordinal >= 0 && ordinal < kMaxDevices && cached[ordinal].load() > 0) {
      *count = cached[ordinal].load();
      return CUDA_SUCCESS;
    }
    r = api.DeviceGetAttribute(count, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev);
    if (r == CUDA_SUCCESS && ordinal >= 0 && ordinal < kMaxDevices) cached[ordinal] = *count;
    return r;
  });
}

CUresult DeviceCount(int* count) {
  *count = 0;
  const Api* api = nullptr;
  const CUresult r = UsableDriver(&api);
  if (r != CUDA_SUCCESS) return r;
  return api->DeviceGetCount(count);
}

std::string ErrorMessage(CUresult result) {
  std::string text = "CUDA error " + std::to_string(static_cast<int>(result));
  const Loaded& d = TheDriver();
  const char* name = nullptr;
  const char* description = nullptr;
  if (d.api.GetErrorName != nullptr && d.api.GetErrorName(result, &name) == CUDA_SUCCESS &&
      name != nullptr) {
    text = name;
    if (d.api.GetErrorString(result, &description) == CUDA_SUCCESS && description != nullptr) {
      text += std::string(" (") + description + ")";
    }
  }
  return last_error_detail.empty() ? text : last_error_detail + ": " + text;
}

ScopedDevice::ScopedDevice(int device) {
  const Api* api = nullptr;
  status_ = UsableDriver(&api);
  if (status_ == CUDA_SUCCESS) status_ = api->DeviceGet(&device_, device);
  if (status_ == CUDA_SUCCESS) {
    CUcontext ctx = nullptr;
    status_ = api->DevicePrimaryCtxRetain(&ctx, device_);
    retained_ = status_ == CUDA_SUCCESS;
    if (retained_) status_ = api->CtxPushCurrent(ctx);
    pushed_ = retained_ && status_ == CUDA_SUCCESS;
  }
  if (status_ != CUDA_SUCCESS && last_error_detail.empty()) {
    Fail(status_, "activating CUDA device " + std::to_string(device) + " failed");
  }
}

ScopedDevice::~ScopedDevice() {
  const Api& api = TheDriver().api;
  CUcontext popped;
  if (pushed_) api.CtxPopCurrent(&popped);
  if (retained_) api.DevicePrimaryCtxRelease(device_);
}

CUresult PointerDevice(uintptr_t ptr, int* device) {
  const Api* api = nullptr;
  const CUresult r = UsableDriver(&api);
  if (r != CUDA_SUCCESS) return r;
  return api->PointerGetAttribute(device, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                                  static_cast<CUdeviceptr>(ptr));
}

CUresult StreamDevice(CUstream stream, int* device) {
  return InStreamContext(stream, [&](const Api& api, CUcontext) {
    CUdevice dev;
    const CUresult r = api.CtxGetDevice(&dev);
    *device = static_cast<int>(dev);  // CUdevice is the ordinal
    return r;
  });
}

}  // namespace cuda
}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_WITH_CUDA
