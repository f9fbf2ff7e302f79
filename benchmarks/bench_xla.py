"""XLA benchmark: the fused kernels under jit_compile (XLA custom calls) against
the composite of plain ops under jit_compile and the fused op outside XLA.

    ./build.sh bench                  # runs this after bench_masked_mae.py
    .venv/bin/python benchmarks/bench_xla.py [--repeats N]

Each variant is a tf.function (the forward, or the forward plus its gradient
with respect to y_pred, both summed to a scalar so that nothing else is
returned), warmed up, then timed as the median of N calls in this process.
Writes benchmarks/results/xla.json and prints a table with the ratios the
issue's targets name. Speed is measured here, never asserted in tests.
"""

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import fused_masked_mae as fm  # noqa: E402
from bench_masked_mae import make_inputs  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = [(64, 64, 1549), (8, 128, 8192), (8, 16, 64)]
DTYPES = ["float32", "bfloat16"]


def median_ms(fn, args, repeats, warmup=3):
    for _ in range(warmup):
        fn(*args)[0].numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)[0].numpy()  # .numpy() waits for the result
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def variants(loss_fn, jit_compile):
    def forward(y_true, y_pred):
        return (tf.reduce_sum(loss_fn(y_true, y_pred)),)

    def forward_and_gradient(y_true, y_pred):
        with tf.GradientTape() as tape:
            tape.watch(y_pred)
            total = tf.reduce_sum(loss_fn(y_true, y_pred))
        return total, tape.gradient(total, y_pred)

    return (tf.function(forward, jit_compile=jit_compile),
            tf.function(forward_and_gradient, jit_compile=jit_compile))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rows = []
    for shape in SHAPES:
        for dtype in DTYPES:
            y_true, y_pred, end = make_inputs(shape, tf.as_dtype(dtype))
            fused = lambda t, p: fm.masked_mae(t, p, 1, end)  # noqa: E731
            reference = lambda t, p: fm.reference_masked_mae(t, p, 1, end)  # noqa: E731
            row = dict(shape=list(shape), dtype=dtype)
            for name, loss_fn, jit in [("fused_xla", fused, True),
                                       ("composite_xla", reference, True),
                                       ("fused_op", fused, False)]:
                fwd, fwd_grad = variants(loss_fn, jit)
                row[f"{name}_forward_ms"] = median_ms(fwd, (y_true, y_pred), args.repeats)
                row[f"{name}_forward_gradient_ms"] = median_ms(fwd_grad, (y_true, y_pred),
                                                               args.repeats)
            for stage in ("forward", "forward_gradient"):
                fused_xla = row[f"fused_xla_{stage}_ms"]
                row[f"{stage}_speedup_vs_composite_xla"] = row[f"composite_xla_{stage}_ms"] / fused_xla
                row[f"{stage}_xla_over_op"] = fused_xla / row[f"fused_op_{stage}_ms"]
            rows.append(row)
            print(f"{'x'.join(map(str, shape)):>14} {dtype:>8}  fwd: xla {row['fused_xla_forward_ms']:7.2f} ms"
                  f"  composite-xla {row['composite_xla_forward_ms']:7.2f}"
                  f"  op {row['fused_op_forward_ms']:7.2f}"
                  f"  | fwd+grad: xla {row['fused_xla_forward_gradient_ms']:7.2f}"
                  f"  composite-xla {row['composite_xla_forward_gradient_ms']:7.2f}"
                  f"  op {row['fused_op_forward_gradient_ms']:7.2f}"
                  f"  | speedup vs composite-xla {row['forward_gradient_speedup_vs_composite_xla']:.1f}x,"
                  f" xla/op {row['forward_gradient_xla_over_op']:.2f}", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "xla.json"), "w") as f:
        json.dump(dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                       tensorflow=tf.__version__, repeats=args.repeats, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
