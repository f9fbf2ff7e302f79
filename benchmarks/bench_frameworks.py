"""The fused kernels per framework against that framework's own composite under
its compiler: TensorFlow (op; composite under tf.function), JAX (custom calls
under jax.jit; jnp composite under jax.jit), PyTorch (custom ops, eager and
under torch.compile; torch composite under torch.compile), forward and
forward+gradient (w.r.t. y_pred), float32 and bfloat16.

    .venv/bin/python benchmarks/bench_frameworks.py [--repeats N] [--shapes 64x64x1549 ...]

Each framework runs in its own subprocess (their thread pools would compete
in one), on tensors it allocated itself (torch: torch tensors, not NumPy
copies). Medians of N timed calls after warm-up, each until the result is
ready. Writes benchmarks/results/frameworks.json and prints a table with the
ratios the issue names (forward+gradient vs the composite, and vs the TF op).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
START, END = 2, 1
DEFAULT_SHAPES = ["64x64x1549", "8x128x32000"]
DTYPES = ["float32", "bfloat16"]


def make_numpy(shape, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, shape[-1], shape[:-1])
    ids[..., -8:] = END
    logits = rng.standard_normal(shape, dtype=np.float32)
    hit = rng.random(shape[:-1]) < 0.5
    np.put_along_axis(logits, ids[..., None], np.where(hit, 6.0, -6.0)[..., None].astype(
        np.float32), axis=-1)
    return ids.astype(np.int32), logits


def median_ms(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


# --- one framework per process ------------------------------------------------

def bench_tensorflow(shape, dtype, repeats):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    import fused_masked_mae as fm

    ids, logits = make_numpy(shape)
    y_pred = tf.cast(tf.constant(logits), dtype)
    y_true = tf.one_hot(tf.constant(ids), shape[-1], dtype=dtype)

    def variants(loss_fn):
        def forward(t, p):
            return tf.reduce_sum(loss_fn(t, p))

        def forward_and_gradient(t, p):
            with tf.GradientTape() as tape:
                tape.watch(p)
                total = tf.reduce_sum(loss_fn(t, p))
            return total, tape.gradient(total, p)

        return tf.function(forward), tf.function(forward_and_gradient)

    out = {}
    for name, loss_fn in (("fused op", lambda t, p: fm.masked_mae(t, p, START, END)),
                          ("composite tf.function",
                           lambda t, p: fm.reference_masked_mae(t, p, START, END))):
        fwd, fwd_grad = variants(loss_fn)
        out[name] = (median_ms(lambda: fwd(y_true, y_pred).numpy(), repeats),
                     median_ms(lambda: fwd_grad(y_true, y_pred)[1].numpy(), repeats))
    return out


def bench_jax(shape, dtype, repeats):
    import jax
    import jax.numpy as jnp

    from fused_masked_mae import jax as fmj

    ids, logits = make_numpy(shape)
    y_pred = jnp.asarray(logits).astype(dtype)
    y_true = jax.nn.one_hot(jnp.asarray(ids), shape[-1], dtype=dtype)

    def composite(t, p):
        lowest = jnp.finfo(p.dtype).min
        am = lambda x: jnp.argmax(jnp.where(jnp.isnan(x) | (x <= lowest), -jnp.inf, x), -1)  # noqa
        tm, pm = am(t), am(p)
        masked = (tm == START).astype(p.dtype) + (tm == END).astype(p.dtype)
        cond = 1 - masked * (tm == pm).astype(p.dtype)
        return cond * jnp.mean(jnp.abs(p - t), axis=-1)

    out = {}
    for name, loss_fn in (("fused jax.jit", lambda t, p: fmj.masked_mae(t, p, START, END)),
                          ("composite jax.jit", composite)):
        fwd = jax.jit(lambda t, p: loss_fn(t, p).sum())
        fwd_grad = jax.jit(jax.value_and_grad(lambda p, t: loss_fn(t, p).sum()))
        out[name] = (median_ms(lambda: fwd(y_true, y_pred).block_until_ready(), repeats),
                     median_ms(lambda: fwd_grad(y_pred, y_true)[1].block_until_ready(), repeats))
    return out


def bench_torch(shape, dtype, repeats):
    import torch

    from fused_masked_mae import torch as fmt

    torch_dtype = getattr(torch, dtype)
    ids, logits = make_numpy(shape)
    # Tensors torch allocated itself (its allocator, its pages), not NumPy views.
    y_pred = torch.empty(shape, dtype=torch_dtype)
    y_pred.copy_(torch.from_numpy(logits))
    y_true = torch.nn.functional.one_hot(torch.from_numpy(ids).long(), shape[-1]).to(torch_dtype)

    def composite(t, p):
        lowest = torch.finfo(p.dtype).min
        neg_inf = torch.tensor(-torch.inf, dtype=p.dtype)
        am = lambda x: torch.argmax(torch.where(torch.isnan(x) | (x <= lowest), neg_inf, x), -1)  # noqa
        tm, pm = am(t), am(p)
        masked = (tm == START).to(p.dtype) + (tm == END).to(p.dtype)
        cond = 1 - masked * (tm == pm).to(p.dtype)
        return cond * torch.mean(torch.abs(p - t), dim=-1)

    fused = lambda t, p: fmt.masked_mae(t, p, START, END)  # noqa: E731
    out = {}
    for name, loss_fn in (("fused eager", fused),
                          ("fused torch.compile", torch.compile(fused, fullgraph=True)),
                          ("composite torch.compile", torch.compile(composite, fullgraph=True))):
        p = y_pred.clone().requires_grad_()

        def forward():
            with torch.no_grad():
                return loss_fn(y_true, p).sum().item()

        def forward_and_gradient():
            total = loss_fn(y_true, p).sum()
            return torch.autograd.grad(total, p)[0]

        out[name] = (median_ms(forward, repeats), median_ms(forward_and_gradient, repeats))
    return out


RUNNERS = {"tensorflow": bench_tensorflow, "jax": bench_jax, "torch": bench_torch}


def worker(framework, shapes, repeats):
    rows = []
    for text in shapes:
        shape = tuple(int(d) for d in text.split("x"))
        for dtype in DTYPES:
            for name, (fwd, fwd_grad) in RUNNERS[framework](shape, dtype, repeats).items():
                rows.append({"framework": framework, "shape": text, "dtype": dtype,
                             "variant": name, "forward_ms": fwd, "forward_gradient_ms": fwd_grad})
    print("ROWS " + json.dumps(rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES)
    parser.add_argument("--worker", choices=sorted(RUNNERS))
    parser.add_argument("--frameworks", nargs="*", default=["tensorflow", "jax", "torch"])
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.shapes, args.repeats)
    rows = []
    for framework in args.frameworks:
        done = subprocess.run([sys.executable, __file__, "--worker", framework, "--repeats",
                               str(args.repeats), "--shapes", *args.shapes],
                              capture_output=True, text=True)
        found = [line for line in done.stdout.splitlines() if line.startswith("ROWS ")]
        if done.returncode or not found:
            print(f"{framework}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        rows += json.loads(found[-1][5:])
    tf_op = {(r["shape"], r["dtype"]): r for r in rows if r["variant"] == "fused op"}
    print("| framework | shape | dtype | variant | fwd ms | fwd+grad ms | fwd+grad vs composite "
          "| fwd+grad vs TF op |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        composite = next((c for c in rows if c["framework"] == r["framework"] and
                          c["shape"] == r["shape"] and c["dtype"] == r["dtype"] and
                          c["variant"].startswith("composite")), None)
        speedup = (f"{composite['forward_gradient_ms'] / r['forward_gradient_ms']:.1f}x"
                   if composite and not r["variant"].startswith("composite") else "")
        op = tf_op.get((r["shape"], r["dtype"]))
        vs_op = (f"{r['forward_gradient_ms'] / op['forward_gradient_ms']:.2f}"
                 if op and not r["variant"].startswith("composite") else "")
        print(f"| {r['framework']} | {r['shape']} | {r['dtype']} | {r['variant']} | "
              f"{r['forward_ms']:.2f} | {r['forward_gradient_ms']:.2f} | {speedup} | {vs_op} |")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "frameworks.json"), "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "repeats": args.repeats, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
