"""GPU benchmark through the TensorFlow-free core, on PyTorch CUDA tensors.

    tools/gpu_check.sh --bench        (builds _core with nvcc first)

For each shape and dtype: the fused forward and forward+gradient kernels, the
same loss written with PyTorch ops (forward, and forward+backward through
autograd), and a device-to-device copy measured in the same run. Times are
CUDA-event medians. Effective GB/s count the minimum traffic (forward: read
y_true and y_pred; forward+gradient: also write the gradient) and are compared
with the copy's (read + write) bandwidth. Writes benchmarks/results/gpu.json.
"""

import json
import os
import statistics

import torch

from fused_masked_mae import core

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = [(64, 64, 1549), (16, 128, 8192), (8, 128, 32000), (8, 16, 64)]
DTYPES = [torch.float32, torch.bfloat16]
START = 1


def cuda_time(fn, repeats=30, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))  # ms
    return statistics.median(times), min(times), max(times)


def copy_bandwidth():
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    median, _, _ = cuda_time(lambda: dst.copy_(src), repeats=20)
    return 2 * src.numel() * 4 / (median / 1e3) / 1e9


def make_inputs(shape, dtype):
    batch, time_steps, classes = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    labels = torch.randint(0, classes, (batch, time_steps), device="cuda", generator=gen)
    labels[:, time_steps // 2:] = classes - 1  # end-token padding
    y_true = torch.nn.functional.one_hot(labels, classes).to(dtype)
    y_pred = torch.rand(shape, device="cuda", generator=gen).to(dtype)
    return y_true.contiguous(), y_pred.contiguous(), classes - 1


def torch_reference(y_true, y_pred, start, end):
    """The composite loss in PyTorch ops (torch.argmax, not tf.math.argmax, on NaN)."""
    t, p = y_true.argmax(-1), y_pred.argmax(-1)
    masked = (t == p) & ((t == start) | (t == end))
    return (~masked).to(y_pred.dtype) * (y_pred - y_true).abs().mean(-1)


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {bandwidth:.0f} GB/s (read+write)")
    rows = []
    for shape in SHAPES:
        for dtype in DTYPES:
            y_true, y_pred, end = make_inputs(shape, dtype)
            tokens = [START, end]
            ones = torch.ones(shape[:-1], dtype=dtype, device="cuda")
            elements = y_pred.numel()
            itemsize = y_pred.element_size()
            leaf = y_pred.detach().clone().requires_grad_(True)

            def fused_fwd_grad():
                core.forward(y_true, y_pred, tokens)
                core.gradient(y_true, y_pred, ones, tokens)

            def ref_fwd_grad():
                leaf.grad = None
                torch_reference(y_true, leaf, START, end).backward(ones)

            cases = {
                "forward": {
                    "fused": lambda: core.forward(y_true, y_pred, tokens),
                    "torch reference": lambda: torch_reference(y_true, y_pred, START, end),
                },
                "forward+gradient": {"fused": fused_fwd_grad, "torch reference": ref_fwd_grad},
            }
            for mode, fns in cases.items():
                streams = 2 if mode == "forward" else 3
                result = {}
                for name, fn in fns.items():
                    median, low, high = cuda_time(fn)
                    gbps = streams * elements * itemsize / (median / 1e3) / 1e9
                    result[name] = {"median_ms": median, "min_ms": low, "max_ms": high,
                                    "GBps": gbps, "fraction_of_copy": gbps / bandwidth}
                result["fused"]["speedup"] = (
                    result["torch reference"]["median_ms"] / result["fused"]["median_ms"]
                )
                rows.append({"shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                             "mode": mode, "results": result})
                f, r = result["fused"], result["torch reference"]
                print(f"{'x'.join(map(str, shape)):>14s} {str(dtype)[6:]:>8s} {mode:>16s}: "
                      f"fused {f['median_ms']:.4f} ms {f['GBps']:6.0f} GB/s "
                      f"({f['fraction_of_copy']:.0%} of copy), reference {r['median_ms']:.4f} ms, "
                      f"speedup {f['speedup']:.1f}x", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "gpu.json")
    with open(path, "w") as out:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "copy_GBps": bandwidth, "rows": rows}, out, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
