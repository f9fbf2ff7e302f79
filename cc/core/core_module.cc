// fused_masked_mae._core: the loss and its gradient without TensorFlow.
//
// - forward / gradient: NumPy arrays on the CPU, through the same row code
//   (masked_mae_row.h) as the TensorFlow CPU kernel; cpu_isa() names the
//   instruction-set variant it runs.
// - cuda_forward / cuda_gradient: raw device pointers (from CuPy or PyTorch,
//   see python/fused_masked_mae/core.py), through the same CUDA launchers as
//   the TensorFlow GPU kernels, on the device that holds the arrays (all on
//   one device, and the stream's). Present when built with the CUDA kernels.
// Every entry point validates its arguments before touching memory and raises
// ValueError/TypeError naming the offending values.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "cc/math/host_float16.h"
#include "cc/cpu/masked_mae_cpu.h"
#include "cc/math/masked_mae_row.h"

#ifdef FUSED_MASKED_MAE_WITH_CUDA
#include "cc/cuda/cuda_driver.h"
#include "cc/cuda/masked_mae_cuda.h"
#endif

namespace py = pybind11;

namespace fused_masked_mae {
namespace {

[[noreturn]] void Fail(const std::string& message) { throw py::value_error(message); }

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

MaskedTokenSet MakeTokenSet(const std::vector<int64_t>& ids, int64_t num_classes) {
  MaskedTokenSet tokens;
  const std::string invalid = MakeMaskedTokenSet(ids.data(), ids.size(), num_classes, &tokens);
  if (!invalid.empty()) Fail(invalid);
  return tokens;
}

// The [rows, num_classes] view of a row-major shape, after checking it.
struct RowView {
  int64_t rows;
  int64_t num_classes;
};

RowView CheckRowShape(const std::vector<int64_t>& shape) {
  if (shape.empty()) Fail("inputs must have rank >= 1 (a last axis of classes), got shape []");
  int64_t total = 1;
  for (int64_t d : shape) {
    if (d < 0) Fail("negative dimension in shape " + ShapeString(shape));
    if (d != 0 && total > std::numeric_limits<int64_t>::max() / d) {
      Fail("shape " + ShapeString(shape) + " has more than 2^63 elements");
    }
    total *= d;
  }
  const int64_t num_classes = shape.back();
  if (num_classes <= 0) {
    Fail("the last dimension (classes) must be positive, got shape " + ShapeString(shape));
  }
  return {total / num_classes, num_classes};
}

// --- CPU (NumPy) -----------------------------------------------------------

std::vector<int64_t> ShapeOf(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

void CheckCpuArray(const py::array& a, const char* name, const py::dtype& dtype) {
  if (!(a.flags() & py::array::c_style)) {
    Fail(std::string(name) + " must be C-contiguous (use numpy.ascontiguousarray)");
  }
  if (!a.dtype().is(dtype)) {
    throw py::type_error(std::string(name) + " has dtype " + py::str(a.dtype()).cast<std::string>() +
                         ", expected " + py::str(dtype).cast<std::string>());
  }
}

// Calls fn(T-typed zero) for the element type of `dtype`.
template <typename Fn>
auto DispatchCpuDtype(const py::array& a, Fn&& fn) {
  const std::string name = py::str(a.dtype().attr("name"));
  if (name == "float32") return fn(float{});
  if (name == "float64") return fn(double{});
  if (name == "float16") return fn(HostHalf{});
  if (name == "bfloat16" && a.itemsize() == 2) return fn(HostBFloat16{});
  throw py::type_error("inputs must be float16, bfloat16 (ml_dtypes), float32 or float64, got " +
                       name);
}

// Checks y_true against y_pred: same shape (dense), or y_pred's shape without
// its last axis, int32/int64, every id in [0, C) (sparse).
RowView CheckTargets(const py::array& y_true, const py::array& y_pred, bool sparse) {
  std::vector<int64_t> expected = ShapeOf(y_pred);
  if (sparse && !expected.empty()) expected.pop_back();
  if (!sparse && ShapeOf(y_true) != expected) {
    Fail("y_true and y_pred must have the same shape, got y_true " + ShapeString(ShapeOf(y_true)) +
         " and y_pred " + ShapeString(ShapeOf(y_pred)));
  }
  const RowView view = CheckRowShape(ShapeOf(y_pred));
  if (!sparse) {
    CheckCpuArray(y_true, "y_true", y_pred.dtype());
    return view;
  }
  if (ShapeOf(y_true) != expected) {
    Fail("y_true_ids must have y_pred's shape without its last axis, got y_true_ids " +
         ShapeString(ShapeOf(y_true)) + " and y_pred " + ShapeString(ShapeOf(y_pred)));
  }
  const std::string id_dtype = py::str(y_true.dtype().attr("name"));
  if (id_dtype != "int32" && id_dtype != "int64") {
    throw py::type_error("y_true_ids must be int32 or int64, got " + id_dtype);
  }
  CheckCpuArray(y_true, "y_true_ids", y_true.dtype());
  const std::string invalid =
      id_dtype == "int32"
          ? InvalidClassIdMessage(static_cast<const int32_t*>(y_true.data()), view.rows,
                                  view.num_classes)
          : InvalidClassIdMessage(static_cast<const int64_t*>(y_true.data()), view.rows,
                                  view.num_classes);
  if (!invalid.empty()) Fail(invalid);
  return view;
}

// Calls fn(targets) with y_true's data as T values (dense) or int32/int64 ids.
template <typename T, typename Fn>
auto WithTargets(const py::array& y_true, bool sparse, Fn&& fn) {
  if (!sparse) return fn(static_cast<const T*>(y_true.data()));
  if (py::str(y_true.dtype().attr("name")).cast<std::string>() == "int32") {
    return fn(static_cast<const int32_t*>(y_true.data()));
  }
  return fn(static_cast<const int64_t*>(y_true.data()));
}

std::vector<int64_t> LossShape(const py::array& y_pred) {
  std::vector<int64_t> shape = ShapeOf(y_pred);
  shape.pop_back();
  return shape;
}

// Runs the CPU forward launcher; returns the loss, and row_keep when asked.
py::object Forward(const py::array& y_true, const py::array& y_pred,
                   const std::vector<int64_t>& masked_tokens, bool sparse, bool return_keep) {
  const RowView view = CheckTargets(y_true, y_pred, sparse);
  const MaskedTokenSet tokens = MakeTokenSet(masked_tokens, view.num_classes);
  CheckCpuArray(y_pred, "y_pred", y_pred.dtype());
  const std::vector<int64_t> loss_shape = LossShape(y_pred);
  py::array_t<uint8_t> row_keep(loss_shape);
  py::array loss = DispatchCpuDtype(y_pred, [&](auto zero) {
    using T = decltype(zero);
    py::array out(y_pred.dtype(), loss_shape);
    const T* p = static_cast<const T*>(y_pred.data());
    T* o = static_cast<T*>(out.mutable_data());
    uint8_t* keep = row_keep.mutable_data();
    WithTargets<T>(y_true, sparse, [&](const auto* targets) {
      py::gil_scoped_release release;
      CpuMaskedMaeForward(targets, p, view.rows, view.num_classes, tokens, o, keep, SerialFor);
      return 0;
    });
    return out;
  });
  if (return_keep) return py::make_tuple(loss, row_keep);
  return std::move(loss);
}

// The gradient from the forward's row_keep, or (row_keep None) from the
// masked tokens, running the forward launcher for the keep bytes first.
py::array Gradient(const py::array& y_true, const py::array& y_pred, const py::array& grad_loss,
                   const std::vector<int64_t>& masked_tokens, bool sparse,
                   const py::object& row_keep) {
  const RowView view = CheckTargets(y_true, y_pred, sparse);
  const std::vector<int64_t> loss_shape = LossShape(y_pred);
  if (ShapeOf(grad_loss) != loss_shape) {
    Fail("grad_loss must have the shape of the loss " + ShapeString(loss_shape) + ", got " +
         ShapeString(ShapeOf(grad_loss)));
  }
  CheckCpuArray(y_pred, "y_pred", y_pred.dtype());
  CheckCpuArray(grad_loss, "grad_loss", y_pred.dtype());
  py::array keep;
  if (row_keep.is_none()) {
    keep = Forward(y_true, y_pred, masked_tokens, sparse, true).cast<py::tuple>()[1];
  } else {
    if (!masked_tokens.empty()) {
      Fail("pass masked_tokens or row_keep, not both: row_keep already says which rows are "
           "masked");
    }
    keep = row_keep.cast<py::array>();
    if (ShapeOf(keep) != loss_shape) {
      Fail("row_keep must have the shape of the loss " + ShapeString(loss_shape) + ", got " +
           ShapeString(ShapeOf(keep)));
    }
    CheckCpuArray(keep, "row_keep", py::dtype::of<uint8_t>());
  }
  return DispatchCpuDtype(y_pred, [&](auto zero) {
    using T = decltype(zero);
    py::array grad(y_pred.dtype(), ShapeOf(y_pred));
    const T* p = static_cast<const T*>(y_pred.data());
    const T* g = static_cast<const T*>(grad_loss.data());
    const uint8_t* k = static_cast<const uint8_t*>(keep.data());
    T* out = static_cast<T*>(grad.mutable_data());
    WithTargets<T>(y_true, sparse, [&](const auto* targets) {
      py::gil_scoped_release release;
      CpuMaskedMaeGradient(targets, p, k, g, view.rows, view.num_classes, out, SerialFor);
      return 0;
    });
    return grad;
  });
}

// --- Memory bandwidth probe (for the benchmarks) ------------------------------

// Best-of-`repeats` bandwidth in GB/s of `threads` threads streaming over
// `megabytes` of float32: "read" sums it (bytes read), "copy" copies it to a
// second buffer (bytes read + bytes written). Both buffers are touched first so
// page faults are not timed.
double ProbeBandwidth(const std::string& mode, double megabytes, int threads, int repeats) {
  if (mode != "read" && mode != "copy") Fail("mode must be 'read' or 'copy', got " + mode);
  if (threads < 1 || repeats < 1 || megabytes <= 0) Fail("threads, repeats, megabytes must be > 0");
  const int64_t n = static_cast<int64_t>(megabytes * 1e6 / sizeof(float)) / (16 * threads) *
                    (16 * threads);
  std::vector<float> src(n, 1.0f), dst(mode == "copy" ? n : 0, 0.0f);
  std::vector<float> sink(threads * 16, 0.0f);
  py::gil_scoped_release release;
  double best = 1e30;
  for (int rep = 0; rep < repeats; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> workers;
    for (int k = 0; k < threads; ++k) {
      workers.emplace_back([&, k] {
        const int64_t begin = n / threads * k, end = n / threads * (k + 1);
        if (mode == "read") {
          float acc[16] = {0};
          for (int64_t i = begin; i < end; i += 16) {
            for (int l = 0; l < 16; ++l) acc[l] += src[i + l];
          }
          for (int l = 0; l < 16; ++l) sink[k * 16 + l] = acc[l];
        } else {
          std::copy(src.begin() + begin, src.begin() + end, dst.begin() + begin);
        }
      });
    }
    for (auto& w : workers) w.join();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  const double bytes = static_cast<double>(n) * sizeof(float) * (mode == "copy" ? 2 : 1);
  return bytes / best / 1e9;
}

// --- CUDA (device pointers) -------------------------------------------------
#ifdef FUSED_MASKED_MAE_WITH_CUDA

template <typename Fn>
CUresult DispatchCudaDtype(const std::string& dtype, Fn&& fn) {
  if (dtype == "float32") return fn(float{});
  if (dtype == "float64") return fn(double{});
  if (dtype == "float16") return fn(HostHalf{});
  if (dtype == "bfloat16") return fn(HostBFloat16{});
  throw py::type_error("dtype must be float16, bfloat16, float32 or float64, got " + dtype);
}

void CheckCudaPointer(uintptr_t ptr, const char* name, int64_t rows) {
  if (rows > 0 && ptr == 0) Fail(std::string(name) + " is a null device pointer");
}

void CheckCudaStatus(CUresult status, const std::string& what) {
  if (status != CUDA_SUCCESS) {
    throw std::runtime_error(what + " failed: " + cuda::ErrorMessage(status));
  }
}

// The device of the array at `ptr`: a ValueError when it is not device memory.
int DeviceOf(uintptr_t ptr, const char* name) {
  int device = -1;
  const CUresult status = cuda::PointerDevice(ptr, &device);
  if (status == CUDA_ERROR_INVALID_VALUE) {
    Fail(std::string(name) + " is not CUDA device memory");
  }
  CheckCudaStatus(status, std::string("finding the device of ") + name);
  return device;
}

// y_true is a device pointer to dense values of `dtype` (id_dtype empty), or
// to int32/int64 class ids (id_dtype "int32"/"int64"; an id outside [0, C)
// gives NaN on the GPU: the caller validates ids where it can).
template <typename T, typename Fn>
CUresult DispatchCudaTargets(uintptr_t y_true, const std::string& id_dtype, Fn&& fn) {
  if (id_dtype.empty()) return fn(reinterpret_cast<const T*>(y_true));
  if (id_dtype == "int32") return fn(reinterpret_cast<const int32_t*>(y_true));
  if (id_dtype == "int64") return fn(reinterpret_cast<const int64_t*>(y_true));
  throw py::type_error("id_dtype must be '', 'int32' or 'int64', got " + id_dtype);
}

const char* sparse_name(const std::string& id_dtype) {
  return id_dtype.empty() ? "y_true" : "y_true_ids";
}

// The forward (grad_loss unused; row_keep written when not 0) or the gradient
// launch (masked_tokens unused; row_keep read), dense or sparse.
void CudaLaunch(bool gradient, uintptr_t y_true, uintptr_t y_pred, uintptr_t row_keep,
                uintptr_t grad_loss, uintptr_t out, const std::vector<int64_t>& shape,
                const std::string& dtype, const std::vector<int64_t>& masked_tokens,
                uintptr_t stream, const std::string& id_dtype) {
  const RowView view = CheckRowShape(shape);
  const MaskedTokenSet tokens = MakeTokenSet(masked_tokens, view.num_classes);
  CheckCudaPointer(y_true, "y_true", view.rows);
  CheckCudaPointer(y_pred, "y_pred", view.rows);
  if (gradient) {
    CheckCudaPointer(row_keep, "row_keep", view.rows);
    CheckCudaPointer(grad_loss, "grad_loss", view.rows);
  }
  CheckCudaPointer(out, gradient ? "grad_y_pred" : "loss", view.rows);
  // dtype names are checked before the driver is asked anything.
  DispatchCudaDtype(dtype, [](auto) { return CUDA_SUCCESS; });
  DispatchCudaTargets<float>(0, id_dtype, [](auto) { return CUDA_SUCCESS; });
  if (view.rows == 0) return;  // nothing to read or write (pointers may be null)
  // Run on the arrays' device, whatever device is current: every array and
  // the stream must be on the one that holds y_pred.
  const int device = DeviceOf(y_pred, "y_pred");
  const std::pair<const char*, uintptr_t> others[] = {
      {sparse_name(id_dtype), y_true}, {"row_keep", row_keep}, {"grad_loss", grad_loss},
      {gradient ? "grad_y_pred" : "loss", out}};
  for (const auto& [name, ptr] : others) {
    if (ptr == 0) continue;  // grad_loss of the forward, row_keep not asked for
    const int other = DeviceOf(ptr, name);
    if (other != device) {
      Fail(std::string("all arrays must be on one device: y_pred is on cuda:") +
           std::to_string(device) + ", " + name + " on cuda:" + std::to_string(other));
    }
  }
  py::gil_scoped_release release;
  const cuda::ScopedDevice on_device(device);
  CheckCudaStatus(on_device.status(), "activating cuda:" + std::to_string(device));
  int stream_device = -1;
  CheckCudaStatus(cuda::StreamDevice(reinterpret_cast<CUstream>(stream), &stream_device),
                  "finding the stream's device");
  if (stream_device != device) {
    Fail("the stream belongs to cuda:" + std::to_string(stream_device) +
         ", the arrays to cuda:" + std::to_string(device));
  }
  const auto launch = [&](auto zero) {
    using T = decltype(zero);
    return DispatchCudaTargets<T>(y_true, id_dtype, [&](auto targets) {
      constexpr bool kDense = std::is_same_v<decltype(targets), const T*>;
      const T* p = reinterpret_cast<const T*>(y_pred);
      const T* g = reinterpret_cast<const T*>(grad_loss);
      uint8_t* k = reinterpret_cast<uint8_t*>(row_keep);
      T* o = reinterpret_cast<T*>(out);
      const auto s = reinterpret_cast<cudaStream_t>(stream);
      const int64_t rows = view.rows, classes = view.num_classes;
      if (gradient) {
        if constexpr (kDense) {
          return LaunchMaskedMaeGradient(targets, p, k, g, rows, classes, o, s);
        } else {
          return LaunchSparseMaskedMaeGradient(targets, p, k, g, rows, classes, o, s);
        }
      }
      if constexpr (kDense) {
        return LaunchMaskedMaeForward(targets, p, rows, classes, tokens, o, k, s);
      } else {
        return LaunchSparseMaskedMaeForward(targets, p, rows, classes, tokens, o, k, s);
      }
    });
  };
  CheckCudaStatus(DispatchCudaDtype(dtype, launch),
                  gradient ? "the masked MAE gradient CUDA launch"
                           : "the masked MAE forward CUDA launch");
}

#endif  // FUSED_MASKED_MAE_WITH_CUDA

}  // namespace
}  // namespace fused_masked_mae

PYBIND11_MODULE(_core, m) {
  using namespace fused_masked_mae;
  m.doc() = "Fused masked MAE loss and gradient without TensorFlow (NumPy on CPU, CUDA pointers).";
  // FUSED_MASKED_MAE_CPU_ISA naming an unknown or unsupported variant fails the import.
  if (*CpuIsaError() != '\0') throw py::import_error(CpuIsaError());
  m.def(
      "cpu_isa", [] { return std::string(CpuIsa()); },
      "The instruction-set variant of the CPU row loops in use: 'baseline', 'avx2' or "
      "'avx512' (the best this CPU supports, or FUSED_MASKED_MAE_CPU_ISA's).");
  m.def(
      "cpu_isas_supported",
      [] {
        std::vector<std::string> names;
        std::string all = CpuIsasSupported();
        for (size_t start = 0, comma; start <= all.size(); start = comma + 1) {
          comma = all.find(',', start);
          if (comma == std::string::npos) comma = all.size();
          names.push_back(all.substr(start, comma - start));
        }
        return names;
      },
      "The CPU variants this machine can run, least to most capable.");
  m.def("forward", &Forward, py::arg("y_true"), py::arg("y_pred"),
        py::arg("masked_tokens") = std::vector<int64_t>{}, py::arg("sparse") = false,
        py::arg("return_keep") = false,
        "Per-position loss [...] for C-contiguous NumPy arrays [..., C] (sparse: y_true is "
        "int32/int64 class ids [...]); with return_keep, (loss, row_keep) where row_keep is "
        "the uint8 keep byte per row that gradient() takes.");
  m.def("gradient", &Gradient, py::arg("y_true"), py::arg("y_pred"), py::arg("grad_loss"),
        py::arg("masked_tokens") = std::vector<int64_t>{}, py::arg("sparse") = false,
        py::arg("row_keep") = py::none(),
        "d loss / d y_pred for NumPy arrays (d loss / d y_true is its negative), from the "
        "forward's row_keep or, without it, from masked_tokens.");
  m.attr("MAX_MASKED_TOKENS") = kMaxMaskedTokens;
  m.def("probe_bandwidth", &ProbeBandwidth, py::arg("mode"), py::arg("megabytes") = 512.0,
        py::arg("threads") = 1, py::arg("repeats") = 5,
        "Host memory bandwidth in GB/s: 'read' (bytes read) or 'copy' (read + written).");
#ifdef FUSED_MASKED_MAE_WITH_CUDA
  m.attr("WITH_CUDA") = true;
  m.attr("MIN_DRIVER_VERSION") = cuda::kMinimumDriverVersion;
  static const auto state_name = [](cuda::DriverState state) {
    return state == cuda::DriverState::kOk       ? "ok"
           : state == cuda::DriverState::kTooOld ? "too_old"
                                                 : "missing";
  };
  m.def(
      "cuda_driver",
      [] {
        const cuda::DriverStatus& d = cuda::Driver();
        return py::make_tuple(state_name(d.state), d.version, d.message);
      },
      "(state, version, message) of the NVIDIA driver: state is 'ok', 'too_old' (below "
      "MIN_DRIVER_VERSION, CUDA 12.0 = r525) or 'missing'.");
  m.def(
      "classify_driver_version",
      [](int version) { return std::string(state_name(cuda::ClassifyDriverVersion(version))); },
      py::arg("version"), "What the library makes of a cuDriverGetVersion() value.");
  m.def("driver_too_old_message", &cuda::TooOldMessage, py::arg("version"));
  m.def(
      "kernel_names",
      [] {
        std::vector<std::string> names;
        for (int k = 0; k < kNumKernels; ++k) names.push_back(KernelName(k));
        return names;
      },
      "The kernel names the launchers look up in the embedded device code.");
  m.def(
      "cuda_device_count",
      [] {
        int count = 0;
        CheckCudaStatus(cuda::DeviceCount(&count), "counting the GPUs");
        return count;
      },
      "The number of GPUs the CUDA driver sees.");
  m.def(
      "cuda_preload",
      [](int device) { CheckCudaStatus(cuda::Preload(device), "loading the device code"); },
      py::arg("device"),
      "Loads the device code into the device's primary context now (before CUDA graph "
      "capture; it is otherwise loaded at the first launch).");
  m.def(
      "cuda_forward",
      [](uintptr_t y_true, uintptr_t y_pred, uintptr_t loss, const std::vector<int64_t>& shape,
         const std::string& dtype, const std::vector<int64_t>& masked_tokens, uintptr_t stream,
         const std::string& id_dtype, uintptr_t row_keep) {
        CudaLaunch(false, y_true, y_pred, row_keep, 0, loss, shape, dtype, masked_tokens, stream,
                   id_dtype);
      },
      py::arg("y_true"), py::arg("y_pred"), py::arg("loss"), py::arg("shape"), py::arg("dtype"),
      py::arg("masked_tokens"), py::arg("stream"), py::arg("id_dtype") = std::string(),
      py::arg("row_keep") = uintptr_t{0},
      "Launches the forward kernel on raw device pointers (row-major, contiguous); writes "
      "the uint8 keep byte per row to row_keep unless it is 0.");
  m.def(
      "cuda_gradient",
      [](uintptr_t y_true, uintptr_t y_pred, uintptr_t row_keep, uintptr_t grad_loss,
         uintptr_t grad_y_pred, const std::vector<int64_t>& shape, const std::string& dtype,
         uintptr_t stream, const std::string& id_dtype) {
        CudaLaunch(true, y_true, y_pred, row_keep, grad_loss, grad_y_pred, shape, dtype, {},
                   stream, id_dtype);
      },
      py::arg("y_true"), py::arg("y_pred"), py::arg("row_keep"), py::arg("grad_loss"),
      py::arg("grad_y_pred"), py::arg("shape"), py::arg("dtype"), py::arg("stream"),
      py::arg("id_dtype") = std::string(),
      "Launches the gradient kernel on raw device pointers from the forward's row_keep.");
#else
  m.attr("WITH_CUDA") = false;
#endif
}
