/* A stand-in libcuda.so.1 for tests/test_cuda_loader.py: enough of the driver
 * API for cc/cuda/cuda_driver.cc to pick, load and launch the embedded device
 * code on a GPU that is not there. FAKE_CUDA_CC (e.g. "61") is the GPU's
 * compute capability; a module load succeeds for a cubin of the same major
 * version and a minor not above it, or PTX of an architecture not above it,
 * unless FAKE_CUDA_FAIL_LOADS is set. Every load and launch is appended to
 * FAKE_CUDA_LOG ("load cubin 61 ok", "launch GRID BLOCK"). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
static int current_ctx = 0; /* 0: none; else a fake context handle value */
static int ctx_stack[16];
static int ctx_depth = 0;

static void log_line(const char* line) {
  const char* path = getenv("FAKE_CUDA_LOG");
  if (!path) return;
  FILE* f = fopen(path, "a");
  if (!f) return;
  fprintf(f, "%s\n", line);
  fclose(f);
}

static int cc(void) {
  const char* v = getenv("FAKE_CUDA_CC");
  return v ? atoi(v) : 80;
}

CUresult cuDriverGetVersion(int* v) { *v = 12090; return 0; }
CUresult cuInit(unsigned flags) { (void)flags; return 0; }
CUresult cuGetErrorName(CUresult r, const char** s) {
  *s = r == 209 ? "CUDA_ERROR_NO_BINARY_FOR_GPU" : "CUDA_ERROR_FAKE";
  return 0;
}
CUresult cuGetErrorString(CUresult r, const char** s) { (void)r; *s = "fake driver error"; return 0; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = current_ctx ? (void*)(intptr_t)current_ctx : NULL; return 0; }
CUresult cuCtxGetId(void* ctx, unsigned long long* id) { *id = (unsigned long long)(intptr_t)ctx; return 0; }
CUresult cuCtxPushCurrent_v2(void* ctx) {
  ctx_stack[ctx_depth++] = current_ctx;
  current_ctx = (int)(intptr_t)ctx;
  return 0;
}
CUresult cuCtxPopCurrent_v2(void** ctx) {
  if (ctx) *ctx = (void*)(intptr_t)current_ctx;
  current_ctx = ctx_depth ? ctx_stack[--ctx_depth] : 0;
  return 0;
}
CUresult cuCtxGetDevice(int* dev) { *dev = 0; return 0; }
CUresult cuDeviceGet(int* dev, int ordinal) { *dev = ordinal; return ordinal == 0 ? 0 : 101; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return 0; }
CUresult cuDeviceGetAttribute(int* v, int attribute, int dev) {
  (void)dev;
  switch (attribute) {
    case 75: *v = cc() / 10; return 0;  /* COMPUTE_CAPABILITY_MAJOR */
    case 76: *v = cc() % 10; return 0;  /* COMPUTE_CAPABILITY_MINOR */
    case 16: *v = 4; return 0;          /* MULTIPROCESSOR_COUNT */
    default: *v = 0; return 0;
  }
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev) { *ctx = (void*)(intptr_t)(0x100 + dev); return 0; }
CUresult cuDevicePrimaryCtxRelease_v2(int dev) { (void)dev; return 0; }
CUresult cuStreamGetCtx(void* stream, void** ctx) { (void)stream; *ctx = (void*)(intptr_t)0x100; return 0; }
CUresult cuPointerGetAttribute(void* data, int attribute, unsigned long long ptr) {
  (void)attribute; (void)ptr; *(int*)data = 0; return 0;
}
CUresult cuModuleLoadData(void** module, const void* image) {
  const unsigned char* b = (const unsigned char*)image;
  char line[128];
  int sm = 0, is_ptx = 0;
  if (b[0] == 0x7f && b[1] == 'E' && b[2] == 'L' && b[3] == 'F') {
    uint32_t flags;
    memcpy(&flags, b + 0x30, 4);
    sm = b[8] >= 8 ? (int)((flags >> 8) & 0xff) : (int)(flags & 0xff); /* ABI 8 / ABI 7 */
  } else {
    const char* t = strstr((const char*)image, ".target sm_");
    is_ptx = 1;
    sm = t ? atoi(t + 11) : 0;
  }
  const int ok = !getenv("FAKE_CUDA_FAIL_LOADS") &&
                 (is_ptx ? sm <= cc() : (sm / 10 == cc() / 10 && sm <= cc()));
  snprintf(line, sizeof line, "load %s %d %s", is_ptx ? "ptx" : "cubin", sm, ok ? "ok" : "failed");
  log_line(line);
  if (!ok) return 209; /* CUDA_ERROR_NO_BINARY_FOR_GPU */
  *module = (void*)(intptr_t)0x200;
  return 0;
}
CUresult cuModuleGetFunction(void** fn, void* module, const char* name) {
  (void)module; (void)name; *fn = (void*)(intptr_t)0x300; return 0;
}
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned smem, void* stream, void** params, void** extra) {
  (void)f; (void)gy; (void)gz; (void)by; (void)bz; (void)smem; (void)stream; (void)params; (void)extra;
  char line[64];
  snprintf(line, sizeof line, "launch %u %u", gx, bx);
  log_line(line);
  return 0;
}
