"""The fused masked cross-entropy against Keras' categorical_crossentropy, the
masked composite (`reference_masked_crossentropy`) and the fused masked MAE on
the same inputs: eager, tf.function and tf.function(jit_compile=True),
forward and forward+gradient (GradientTape w.r.t. y_pred), in one process.

    .venv/bin/python benchmarks/bench_crossentropy.py [--repeats N] [--shapes 64x64x1549,...]

y_pred holds logits (from_logits=True: what Keras computes in `fit` for a
softmax output, whose logits it recovers) and y_true one-hot targets; the
sparse loss gets the ids. Each call is timed until its work is done
(tf.test.experimental.sync_devices()), without copying outputs to NumPy;
median of N. "roof" is the time the minimum traffic would take at the
streaming bandwidths _core.probe_bandwidth measures here (forward: read y_true
and y_pred at the read rate; forward+gradient: that, plus reading both again
and writing the gradient at the copy rate), so "% of roof" = roof / time (the
inputs partly fit the L3 here, so it can exceed 100 %). Writes benchmarks/results/crossentropy.json.
Speed is measured here, never asserted in tests.
"""

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fused_masked_mae as fm  # noqa: E402
from fused_masked_mae import _core  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
START = 1


def make_inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    classes = shape[-1]
    end = classes - 1
    ids = rng.integers(0, classes, size=shape[:-1])
    ids.reshape(-1)[::3] = end
    logits = rng.normal(scale=2.0, size=shape).astype(np.float32)
    right = rng.random(ids.shape) < 0.5
    np.put_along_axis(logits, ids[..., None], np.where(right, 9.0, -9.0)[..., None], axis=-1)
    y_pred = tf.constant(logits, dtype)
    return tf.one_hot(ids, classes, dtype=dtype), tf.constant(ids), y_pred, end


def losses(end):
    return {
        "fused_ce": lambda t, ids, p: fm.masked_crossentropy(t, p, START, end, from_logits=True),
        "fused_sparse_ce": lambda t, ids, p: fm.sparse_masked_crossentropy(
            ids, p, START, end, from_logits=True),
        "masked_composite": lambda t, ids, p: fm.reference_masked_crossentropy(
            t, p, START, end, from_logits=True),
        "keras_cce": lambda t, ids, p: keras.losses.categorical_crossentropy(
            t, p, from_logits=True),
        "fused_mae": lambda t, ids, p: fm.masked_mae(t, p, START, end),
    }


def callables(loss_fn, mode):
    def forward(t, ids, p):
        return loss_fn(t, ids, p)

    def forward_gradient(t, ids, p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = loss_fn(t, ids, p)
        return loss, tape.gradient(loss, p)

    if mode == "eager":
        return forward, forward_gradient
    jit = mode == "xla"
    return tf.function(forward, jit_compile=jit), tf.function(forward_gradient, jit_compile=jit)


def median_ms(fn, args, repeats, warmup=2):
    for _ in range(warmup):
        fn(*args)
    tf.test.experimental.sync_devices()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        tf.test.experimental.sync_devices()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--shapes", default="64x64x1549,8x128x32000")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    threads = os.cpu_count()
    bandwidth = {"read_GBps": _core.probe_bandwidth("read", 512, threads, 5),
                 "copy_GBps": _core.probe_bandwidth("copy", 256, threads, 5)}
    print(f"probe: read {bandwidth['read_GBps']:.1f} GB/s, copy {bandwidth['copy_GBps']:.1f} "
          f"GB/s ({threads} threads); CPU variant {fm.cpu_isa()}", flush=True)
    rows = []
    for shape in shapes:
        for dtype_name in args.dtypes.split(","):
            dtype = tf.as_dtype(dtype_name)
            t, ids, p, end = make_inputs(shape, dtype)
            elements = int(np.prod(shape))
            size = dtype.size
            roof_forward_ms = 2 * elements * size / (bandwidth["read_GBps"] * 1e9) * 1e3
            # forward + gradient: the forward's read, then the gradient's read of
            # both inputs and write of one output at the copy rate (read + written bytes)
            roof_fwd_grad_ms = roof_forward_ms + 3 * elements * size / (
                bandwidth["copy_GBps"] * 1e9) * 1e3
            row = dict(shape=list(shape), dtype=dtype_name, roof_forward_ms=roof_forward_ms,
                       roof_forward_gradient_ms=roof_fwd_grad_ms)
            for name, loss_fn in losses(end).items():
                for mode in ("eager", "function", "xla"):
                    fwd, fwd_grad = callables(loss_fn, mode)
                    row[f"{name}_{mode}_forward_ms"] = median_ms(fwd, (t, ids, p), args.repeats)
                    row[f"{name}_{mode}_forward_gradient_ms"] = median_ms(
                        fwd_grad, (t, ids, p), args.repeats)
            for stage in ("forward", "forward_gradient"):
                composite = {k: v for k, v in row.items()
                             if k.endswith(f"_{stage}_ms") and
                             k.startswith(("keras_cce_", "masked_composite_"))}
                fastest = min(composite, key=composite.get)
                best_fused = min(row[f"fused_ce_{m}_{stage}_ms"] for m in ("eager", "function",
                                                                         "xla"))
                best_mae = min(row[f"fused_mae_{m}_{stage}_ms"] for m in ("eager", "function",
                                                                        "xla"))
                row[f"{stage}_fastest_composite"] = fastest
                row[f"{stage}_speedup_vs_fastest_composite"] = composite[fastest] / best_fused
                row[f"{stage}_fused_ce_over_fused_mae"] = best_fused / best_mae
                row[f"{stage}_fused_ce_fraction_of_roof"] = row[f"roof_{stage}_ms"] / best_fused
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                              for k, v in row.items()}), flush=True)
    record = {"machine": platform.platform(), "cpus": os.cpu_count(), "cpu_isa": fm.cpu_isa(),
              "tensorflow": tf.__version__, "keras": keras.__version__,
              "bandwidth": bandwidth, "repeats": args.repeats, "rows": rows,
              "load_average": os.getloadavg()}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "crossentropy.json"), "w") as f:
        json.dump(record, f, indent=1)
    print_table(rows)


def print_table(rows):
    print("\n| shape | dtype | stage | fused CE eager / tf.function / XLA ms | fused sparse CE "
          "(best) ms | fused MAE (best) ms | Keras CCE eager / tf.function / XLA ms | masked "
          "composite eager / tf.function / XLA ms | vs fastest composite | CE / MAE | % of roof |")
    print("| --- | --- | --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: |")
    for row in rows:
        for stage in ("forward", "forward_gradient"):
            def triple(name):
                return " / ".join(f"{row[f'{name}_{m}_{stage}_ms']:.2f}"
                                  for m in ("eager", "function", "xla"))

            best = lambda name: min(row[f"{name}_{m}_{stage}_ms"]  # noqa: E731
                                    for m in ("eager", "function", "xla"))
            print(f"| {'x'.join(map(str, row['shape']))} | {row['dtype']} | "
                  f"{'fwd' if stage == 'forward' else 'fwd+grad'} | {triple('fused_ce')} | "
                  f"{best('fused_sparse_ce'):.2f} | {best('fused_mae'):.2f} | "
                  f"{triple('keras_cce')} | {triple('masked_composite')} | "
                  f"{row[f'{stage}_speedup_vs_fastest_composite']:.1f}x | "
                  f"{row[f'{stage}_fused_ce_over_fused_mae']:.2f} | "
                  f"{100 * row[f'{stage}_fused_ce_fraction_of_roof']:.0f}% |")


if __name__ == "__main__":
    main()
