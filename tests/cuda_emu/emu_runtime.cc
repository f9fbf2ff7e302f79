// The CUDA emulator's runtime (tests/cuda_emu/README.md): fibers, the checked
// shuffle and barrier rendezvous of shim.h, and a stand-in for the driver
// calls of cc/cuda/cuda_driver.h, so that the real host launchers
// (cc/cuda/masked_mae_launch.cc) launch the host-compiled kernels.
//
// A launch runs synchronously: block after block in grid order, each block's
// threads as fibers (own stacks), resumed round robin until each one exits or
// waits (on a shuffle or a barrier). Kernels are found by name with dlsym (the
// test links with -rdynamic): any extern "C" kernel the ABI header names.
#include "tests/cuda_emu/emu_runtime.h"

#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cc/cuda/cuda_driver.h"
#include "tests/cuda_emu/shim.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define MMAE_EMU_ASAN 1
#endif

namespace cuda_emu {

dim3 thread_idx, block_idx, block_dim, grid_dim;

namespace {

constexpr int kMaxBlockThreads = 1024;
#if defined(MMAE_EMU_ASAN)
constexpr size_t kStackBytes = 512 * 1024;
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

enum class State { kReady, kWaitShuffle, kWaitBarrier, kDone };

// Context switches: on x86-64 a few instructions that swap the callee-saved
// registers and the stack pointer (glibc's swapcontext also saves the signal
// mask, a system call per switch); elsewhere ucontext.
#if defined(__x86_64__)
#define MMAE_EMU_ASM_SWITCH 1
extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl cuda_emu_switch
  .hidden cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
)");
struct Context {
  void* sp = nullptr;
};
#else
struct Context {
  ucontext_t uc;
};
#endif

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  State state = State::kDone;
  unsigned tid = 0;
  uint64_t shuffle_result = 0;
  const char* waiting_at = nullptr;
  void* fake_stack = nullptr;
};

struct Rendezvous {  // one open __shfl_*_sync or __syncwarp of a warp
  bool open = false;
  ShuffleKind kind = ShuffleKind::kIdx;
  bool is_syncwarp = false;
  unsigned mask = 0, arrived = 0;
  int width = 0, size = 0;
  const char* site = nullptr;
  uint64_t values[kWarpSize];
  int lane_args[kWarpSize];
};

struct Launch {
  std::string kernel;
  void (*entry)(const void*) = nullptr;
  const void* args = nullptr;
  unsigned threads = 0;
  std::vector<Fiber> fibers;
  std::vector<Rendezvous> warps;
  Fiber* current = nullptr;
  Context scheduler;
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
  void* scheduler_fake_stack = nullptr;
  // __syncthreads
  const char* barrier_site = nullptr;
  unsigned barrier_arrived = 0;
  bool progress = false;
};

Launch* the_launch = nullptr;
char* stacks = nullptr;
Stats stats;

[[noreturn]] void Die(const char* format, ...) {
  std::fflush(stdout);
  std::fprintf(stderr, "CUDA emulator error");
  if (the_launch != nullptr) {
    std::fprintf(stderr, " in %s, block %u (grid %u, block %u threads)",
                 the_launch->kernel.c_str(), block_idx.x, grid_dim.x, block_dim.x);
    if (the_launch->current != nullptr) std::fprintf(stderr, ", thread %u", the_launch->current->tid);
  }
  std::fprintf(stderr, ": ");
  va_list args;
  va_start(args, format);
  std::vfprintf(stderr, format, args);
  va_end(args);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::_Exit(86);
}

const char* StateName(State s) {
  switch (s) {
    case State::kReady: return "ready";
    case State::kWaitShuffle: return "waiting at a shuffle";
    case State::kWaitBarrier: return "waiting at __syncthreads";
    case State::kDone: return "exited";
  }
  return "?";
}

void Swap(Context* save, Context* load) {
#if defined(MMAE_EMU_ASM_SWITCH)
  cuda_emu_switch(&save->sp, load->sp);
#else
  swapcontext(&save->uc, &load->uc);
#endif
}

// Fiber -> scheduler.
void Yield() {
  Launch& l = *the_launch;
  Fiber& f = *l.current;
#if defined(MMAE_EMU_ASAN)
  __sanitizer_start_switch_fiber(&f.fake_stack, l.scheduler_stack, l.scheduler_stack_size);
#endif
  Swap(&f.ctx, &l.scheduler);
#if defined(MMAE_EMU_ASAN)
  __sanitizer_finish_switch_fiber(f.fake_stack, &l.scheduler_stack, &l.scheduler_stack_size);
#endif
  thread_idx.x = f.tid;
}

void FiberMain() {
  Launch& l = *the_launch;
#if defined(MMAE_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &l.scheduler_stack, &l.scheduler_stack_size);
#endif
  l.entry(l.args);
  Fiber& f = *l.current;
  // A lane that exits while its warp waits for it at a shuffle, or while the
  // block waits at a barrier, would hang a GPU.
  const Rendezvous& rv = l.warps[f.tid / kWarpSize];
  if (rv.open && (rv.mask >> (f.tid % kWarpSize) & 1u)) {
    Die("thread exits while its warp waits for it at %s (%s)", rv.site,
        rv.is_syncwarp ? "__syncwarp" : "shuffle");
  }
  if (l.barrier_arrived > 0) {
    Die("thread exits while %u threads wait at __syncthreads (%s)", l.barrier_arrived,
        l.barrier_site);
  }
  f.state = State::kDone;
  l.progress = true;
#if defined(MMAE_EMU_ASAN)
  __sanitizer_start_switch_fiber(nullptr, l.scheduler_stack, l.scheduler_stack_size);
#endif
  Context gone;
  Swap(&gone, &l.scheduler);  // never resumed
  std::abort();
}

void SwitchTo(Launch& l, Fiber& f) {
  l.current = &f;
  thread_idx.x = f.tid;
  ++stats.switches;
#if defined(MMAE_EMU_ASAN)
  __sanitizer_start_switch_fiber(&l.scheduler_fake_stack, f.stack, kStackBytes);
#endif
  Swap(&l.scheduler, &f.ctx);
#if defined(MMAE_EMU_ASAN)
  __sanitizer_finish_switch_fiber(l.scheduler_fake_stack, nullptr, nullptr);
#endif
  l.current = nullptr;
}

std::string DescribeBlock(const Launch& l) {
  std::string out;
  for (const Fiber& f : l.fibers) {
    if (f.state == State::kDone) continue;
    if (out.size() > 1500) {
      out += " ...";
      break;
    }
    out += "\n  thread " + std::to_string(f.tid) + ": " + StateName(f.state);
    if (f.waiting_at != nullptr) out += std::string(" (") + f.waiting_at + ")";
  }
  return out;
}

void RunBlock(Launch& l) {
  for (unsigned t = 0; t < l.threads; ++t) {
    Fiber& f = l.fibers[t];
    f.tid = t;
    f.state = State::kReady;
    f.waiting_at = nullptr;
    f.stack = stacks + t * kStackBytes;
#if defined(MMAE_EMU_ASM_SWITCH)
    // What cuda_emu_switch pops: six registers, then FiberMain as the return
    // address, above it a null one (FiberMain's own, never used): FiberMain
    // starts with the stack pointer at 8 mod 16, as after a call.
    void** top = reinterpret_cast<void**>(f.stack + kStackBytes);
    top[-1] = nullptr;
    top[-2] = reinterpret_cast<void*>(&FiberMain);
    for (int k = 3; k <= 8; ++k) top[-k] = nullptr;
    f.ctx.sp = top - 8;
#else
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = f.stack;
    f.ctx.uc.uc_stack.ss_size = kStackBytes;
    f.ctx.uc.uc_link = nullptr;
    makecontext(&f.ctx.uc, FiberMain, 0);
#endif
  }
  for (Rendezvous& rv : l.warps) rv.open = false;
  l.barrier_arrived = 0;
  l.barrier_site = nullptr;
  for (;;) {
    l.progress = false;
    bool live = false;
    for (Fiber& f : l.fibers) {
      if (f.state == State::kDone) continue;
      live = true;
      if (f.state == State::kReady) {
        SwitchTo(l, f);
        l.progress = true;
      }
    }
    if (!live) break;
    if (!l.progress) {
      unsigned exited = 0;
      for (const Fiber& f : l.fibers) exited += f.state == State::kDone;
      Die("deadlock: no thread can proceed (%u of %u threads have exited)%s", exited, l.threads,
          DescribeBlock(l).c_str());
    }
  }
  ++stats.blocks;
  stats.threads += l.threads;
}

// Lanes that exist in warp `warp` of the running block.
unsigned WarpLanes(const Launch& l, unsigned warp) {
  const unsigned first = warp * kWarpSize;
  const unsigned n = l.threads - first < kWarpSize ? l.threads - first : kWarpSize;
  return n == 32 ? 0xffffffffu : ((1u << n) - 1u);
}

// The source lane of `lane` for a shuffle, as PTX's shfl.sync computes it
// (c = ((32 - width) << 8) | 0x1f for bfly/down/idx, (32 - width) << 8 for up),
// and whether it is in range (else the lane reads its own value).
int SourceLane(ShuffleKind kind, int lane, int arg, int width) {
  const int seg_mask = (kWarpSize - width) & 31;  // c[12:8]
  const int max_lane = (lane & seg_mask) | (31 & ~seg_mask);
  const int min_lane = lane & seg_mask;
  int j;
  bool in_range;
  switch (kind) {
    case ShuffleKind::kUp:
      j = lane - arg;
      in_range = j >= min_lane;
      break;
    case ShuffleKind::kDown:
      j = lane + arg;
      in_range = j <= max_lane;
      break;
    case ShuffleKind::kXor:
      j = lane ^ arg;
      in_range = j <= max_lane;
      break;
    default:
      j = min_lane | (arg & 31 & ~seg_mask);
      in_range = j <= max_lane;
      break;
  }
  return in_range ? j : lane;
}

// Called by the last lane to arrive: every lane's result, then the waiting lanes run again.
void Resolve(Launch& l, unsigned warp, Rendezvous& rv) {
  for (int lane = 0; lane < kWarpSize; ++lane) {
    if (!(rv.mask >> lane & 1u)) continue;
    Fiber& f = l.fibers[warp * kWarpSize + lane];
    if (!rv.is_syncwarp) {
      const int src = SourceLane(rv.kind, lane, rv.lane_args[lane], rv.width);
      if (!(rv.mask >> src & 1u)) {
        Die("lane %d reads lane %d, which is not in the shuffle's mask 0x%08x (%s)", lane, src,
            rv.mask, rv.site);
      }
      f.shuffle_result = rv.values[src];
    }
    if (f.state == State::kWaitShuffle) f.state = State::kReady;
    f.waiting_at = nullptr;
  }
  rv.open = false;
  l.progress = true;
}

uint64_t Rendezvous_(bool is_syncwarp, ShuffleKind kind, unsigned mask, uint64_t bits, int size,
                     int lane_arg, int width, const char* site) {
  if (the_launch == nullptr || the_launch->current == nullptr) {
    std::fprintf(stderr, "CUDA emulator error: a warp intrinsic (%s) outside a kernel\n", site);
    std::_Exit(86);
  }
  Launch& l = *the_launch;
  Fiber& f = *l.current;
  const unsigned warp = f.tid / kWarpSize;
  const int lane = static_cast<int>(f.tid % kWarpSize);
  const char* what = is_syncwarp ? "__syncwarp" : "shuffle";
  if (!(mask >> lane & 1u)) Die("lane %d calls a %s whose mask 0x%08x excludes it (%s)", lane, what, mask, site);
  if (!is_syncwarp && !(width >= 1 && width <= kWarpSize && (width & (width - 1)) == 0)) {
    Die("shuffle width %d is not a power of two in [1, 32] (%s)", width, site);
  }
  const unsigned lanes = WarpLanes(l, warp);
  if ((mask & ~lanes) != 0) {
    Die("%s mask 0x%08x names lanes that do not exist in this warp (0x%08x) (%s)", what, mask,
        lanes, site);
  }
  for (int other = 0; other < kWarpSize; ++other) {
    if ((mask >> other & 1u) && l.fibers[warp * kWarpSize + other].state == State::kDone) {
      Die("%s mask 0x%08x names lane %d, which has exited (%s)", what, mask, other, site);
    }
  }
  Rendezvous& rv = l.warps[warp];
  if (!rv.open) {
    rv.open = true;
    rv.is_syncwarp = is_syncwarp;
    rv.kind = kind;
    rv.mask = mask;
    rv.arrived = 0;
    rv.width = width;
    rv.size = size;
    rv.site = site;
  } else if (rv.site != site && std::strcmp(rv.site, site) != 0) {
    Die("divergent warp: lane %d arrives at %s %s while lanes 0x%08x wait at %s", lane, what, site,
        rv.arrived, rv.site);
  } else if (rv.mask != mask || rv.width != width || rv.kind != kind || rv.size != size ||
             rv.is_syncwarp != is_syncwarp) {
    Die("lane %d calls %s with mask 0x%08x width %d (%d bytes), other lanes with mask 0x%08x "
        "width %d (%d bytes) (%s)",
        lane, what, mask, width, size, rv.mask, rv.width, rv.size, site);
  }
  if (rv.arrived >> lane & 1u) Die("lane %d arrives twice at %s (%s)", lane, what, site);
  rv.arrived |= 1u << lane;
  rv.values[lane] = bits;
  rv.lane_args[lane] = lane_arg;
  ++stats.shuffles;
  if (rv.arrived == rv.mask) {
    Resolve(l, warp, rv);
  } else {
    f.state = State::kWaitShuffle;
    f.waiting_at = site;
    Yield();
  }
  return f.shuffle_result;
}

}  // namespace

uint64_t Shuffle(ShuffleKind kind, unsigned mask, uint64_t bits, int size, int lane_arg,
                 int width, const char* site) {
  return Rendezvous_(false, kind, mask, bits, size, lane_arg, width, site);
}

void SyncWarp(unsigned mask, const char* site) {
  Rendezvous_(true, ShuffleKind::kIdx, mask, 0, 0, 0, kWarpSize, site);
}

void SyncThreads(const char* site) {
  if (the_launch == nullptr || the_launch->current == nullptr) {
    std::fprintf(stderr, "CUDA emulator error: __syncthreads outside a kernel (%s)\n", site);
    std::_Exit(86);
  }
  Launch& l = *the_launch;
  Fiber& f = *l.current;
  if (l.barrier_arrived == 0) {
    l.barrier_site = site;
  } else if (l.barrier_site != site && std::strcmp(l.barrier_site, site) != 0) {
    Die("divergent __syncthreads: thread %u arrives at %s while %u threads wait at %s", f.tid,
        site, l.barrier_arrived, l.barrier_site);
  }
  ++stats.barriers;
  if (++l.barrier_arrived == l.threads) {
    for (Fiber& other : l.fibers) {
      if (other.state == State::kWaitBarrier) other.state = State::kReady;
      other.waiting_at = nullptr;
    }
    l.barrier_arrived = 0;
    l.barrier_site = nullptr;
    l.progress = true;
    return;
  }
  f.state = State::kWaitBarrier;
  f.waiting_at = site;
  Yield();
}

void CheckAligned(const void* ptr, unsigned alignment, const char* what, const char* site) {
  ++stats.checked_loads;
  if (reinterpret_cast<uintptr_t>(ptr) % alignment != 0) {
    Die("%s of %u bytes at %p, which is not %u-byte aligned (%s)", what, alignment, ptr,
        alignment, site);
  }
}

void RunKernel(const char* name, void (*entry)(const void*), const void* args, unsigned grid,
               unsigned block) {
  if (block == 0 || block > static_cast<unsigned>(kMaxBlockThreads) || grid == 0) {
    std::fprintf(stderr, "CUDA emulator error: launch of %s with grid %u, block %u\n", name, grid,
                 block);
    std::_Exit(86);
  }
  if (stacks == nullptr) {
    void* mem = mmap(nullptr, kStackBytes * kMaxBlockThreads, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
      std::perror("CUDA emulator: mmap of the fiber stacks");
      std::_Exit(86);
    }
    stacks = static_cast<char*>(mem);
  }
  Launch l;
  l.kernel = name;
  l.entry = entry;
  l.args = args;
  l.threads = block;
  l.fibers.resize(block);
  l.warps.resize((block + kWarpSize - 1) / kWarpSize);
  the_launch = &l;
  grid_dim = dim3{grid, 1, 1};
  block_dim = dim3{block, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    block_idx = dim3{b, 0, 0};
    RunBlock(l);
  }
  the_launch = nullptr;
  ++stats.launches;
}

Stats& GetStats() { return stats; }

int64_t Index32MaxClasses() {
  const char* value = std::getenv("CUDA_EMU_INDEX32_MAX_CLASSES");
  return value != nullptr && *value != '\0' ? std::strtoll(value, nullptr, 10) : int64_t{0xffffffff};
}

int EnvInt(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::atoi(value) : fallback;
}

}  // namespace cuda_emu

// --- The stand-in for cc/cuda/cuda_driver.cc --------------------------------
namespace fused_masked_mae {
namespace cuda {
namespace {
thread_local std::string last_error_detail;
}

DriverState ClassifyDriverVersion(int version) {
  if (version <= 0) return DriverState::kMissing;
  return version < kMinimumDriverVersion ? DriverState::kTooOld : DriverState::kOk;
}

std::string VersionString(int version) {
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

std::string TooOldMessage(int version) { return "emulated driver too old: " + VersionString(version); }

const DriverStatus& Driver() {
  static const DriverStatus status{DriverState::kOk, 12090, ""};
  return status;
}

CUresult LaunchKernel(int kernel_index, uint32_t grid, uint32_t block, const KernelParams& params,
                      CUstream) {
  last_error_detail.clear();
  if (kernel_index < 0 || kernel_index >= kNumKernels) {
    last_error_detail = "bad kernel index " + std::to_string(kernel_index);
    return CUDA_ERROR_INVALID_VALUE;
  }
  static void* symbols[kNumKernels] = {};
  const std::string name = KernelName(kernel_index);
  if (symbols[kernel_index] == nullptr) {
    symbols[kernel_index] = dlsym(RTLD_DEFAULT, name.c_str());
    if (symbols[kernel_index] == nullptr) {
      last_error_detail = "kernel " + name + " is missing";
      return CUDA_ERROR_NOT_FOUND;
    }
  }
  // CUDA_EMU_GRID_CAP: launch at most this many blocks, so that the kernels'
  // grid-stride loops run with small inputs.
  const int cap = cuda_emu::EnvInt("CUDA_EMU_GRID_CAP", 0);
  if (cap > 0 && grid > static_cast<uint32_t>(cap)) grid = static_cast<uint32_t>(cap);
  using Kernel = void (*)(KernelParams);
  struct Call {
    Kernel kernel;
    const KernelParams* params;
  } call{reinterpret_cast<Kernel>(symbols[kernel_index]), &params};
  static thread_local const Call* active = nullptr;
  active = &call;
  cuda_emu::RunKernel(
      name.c_str(), [](const void*) { active->kernel(*active->params); }, nullptr, grid, block);
  ++cuda_emu::GetStats().launches_by_kernel[kernel_index];
  return CUDA_SUCCESS;
}

CUresult Preload(int) { return CUDA_SUCCESS; }

// CUDA_EMU_SM_COUNT (default 4): the launch shapes the launchers pick depend on it.
CUresult MultiprocessorCount(CUstream, int* count) {
  *count = cuda_emu::EnvInt("CUDA_EMU_SM_COUNT", 4);
  return CUDA_SUCCESS;
}

CUresult DeviceCount(int* count) {
  *count = 1;
  return CUDA_SUCCESS;
}

std::string ErrorMessage(CUresult result) {
  const std::string text = "CUDA error " + std::to_string(static_cast<int>(result));
  return last_error_detail.empty() ? text : last_error_detail + ": " + text;
}

ScopedDevice::ScopedDevice(int) : status_(CUDA_SUCCESS) {}
ScopedDevice::~ScopedDevice() {}

CUresult PointerDevice(uintptr_t, int* device) {
  *device = 0;
  return CUDA_SUCCESS;
}

CUresult StreamDevice(CUstream, int* device) {
  *device = 0;
  return CUDA_SUCCESS;
}

}  // namespace cuda
}  // namespace fused_masked_mae
