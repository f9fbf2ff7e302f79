"""CPU benchmark: the fused op against the composite reference, in one process.

    ./build.sh bench                 # all shapes, float32, bfloat16 and float16
    ./build.sh bench --quick         # fewer repeats (a smoke run)

For each shape and dtype it times the fused forward and forward+gradient
(GradientTape), and the reference composite in eager mode, tf.function and
tf.function(jit_compile=True). It probes the machine's streaming bandwidth in
the same run (C++ threads in _core), and reports effective GB/s over the
minimum traffic (forward: read y_true and y_pred, 2*N*C elements; forward +
gradient: also write the gradient, 3*N*C), the fraction of the measured
bandwidth, and the speedup over the fastest reference. It ends with a model-
level figure: one `fit` step (train_on_batch) of a small seq2seq model with
MaskedMAE vs the same model with the reference loss.

Two more tables: the fused op on [64, 64, 1549] per CPU instruction-set
variant this machine supports (baseline, avx2, avx512; each in a subprocess
with FUSED_MASKED_MAE_CPU_ISA set, as the variant is chosen once per process),
and the fused op on short rows (C = 32..256) and long rows (C = 32000..256000)
of the same total size, each as a fraction of the read bandwidth measured here.

Writes benchmarks/results/cpu.json and benchmarks/results/cpu.png and prints a
table. Speed is measured here, never asserted in tests.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fused_masked_mae as fm  # noqa: E402
from fused_masked_mae import _core  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = [(64, 64, 1549), (16, 128, 8192), (8, 128, 32000), (8, 16, 64)]
DTYPES = ["float32", "bfloat16", "float16"]
ISA_SHAPE = (64, 64, 1549)
# Short and long rows, about 4.2 M elements each.
SCHEDULE_SHAPES = [(1024, 128, 32), (512, 128, 64), (256, 128, 128), (128, 128, 256),
                   (1, 128, 32000), (1, 32, 128000), (1, 16, 256000)]
START, END_SHARE = 1, 0.5  # start token id; share of end-token padding in targets


def make_inputs(shape, dtype, seed=0):
    """One-hot targets: a start token, random tokens, then end-token padding
    (about END_SHARE of positions); predictions that are right about half the time."""
    batch, time_steps, classes = shape
    end = classes - 1
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=(batch, time_steps))
    labels[:, 0] = START
    lengths = rng.integers(1, max(2, int(time_steps * (1 - END_SHARE) * 2)), size=batch)
    labels[np.arange(time_steps)[None, :] >= lengths[:, None]] = end
    y_true = np.zeros(shape, np.float32)
    np.put_along_axis(y_true, labels[..., None], 1.0, axis=-1)
    y_pred = rng.random(shape, dtype=np.float32) / classes
    right = rng.random((batch, time_steps)) < 0.5
    np.put_along_axis(y_pred, labels[..., None], np.where(right, 1.0, 0.0)[..., None], axis=-1)
    return tf.constant(y_true, dtype), tf.constant(y_pred, dtype), end


def timeit(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def fetch(x):
    # Wait for the work (so asynchronous devices are counted), without copying
    # the outputs into NumPy: a training step hands the gradient to the
    # optimizer where it is, and on this VM copying a 25 MB gradient into a
    # fresh NumPy array costs more than computing it.
    tf.test.experimental.sync_devices()
    return x


def candidates(y_true, y_pred, end):
    ids = tf.argmax(y_true, axis=-1, output_type=tf.int32)  # the same targets as class ids

    def sparse_fwd():
        return fm.sparse_masked_mae(ids, y_pred, START, end)

    def sparse_fwd_grad():
        with tf.GradientTape() as tape:
            tape.watch(y_pred)
            loss = fm.sparse_masked_mae(ids, y_pred, START, end)
        return loss, tape.gradient(loss, y_pred)

    def fused_fwd():
        return fm.masked_mae(y_true, y_pred, START, end)

    def fused_fwd_grad():
        with tf.GradientTape() as tape:
            tape.watch(y_pred)
            loss = fm.masked_mae(y_true, y_pred, START, end)
        return loss, tape.gradient(loss, y_pred)

    def ref_fwd():
        return fm.reference_masked_mae(y_true, y_pred, START, end)

    def ref_fwd_grad():
        with tf.GradientTape() as tape:
            tape.watch(y_pred)
            loss = fm.reference_masked_mae(y_true, y_pred, START, end)
        return loss, tape.gradient(loss, y_pred)

    # Graph mode removes the per-op dispatch cost that dominates small shapes.
    fused_graph_fwd, fused_graph_fwd_grad = tf.function(fused_fwd), tf.function(fused_fwd_grad)
    graph_fwd, graph_fwd_grad = tf.function(ref_fwd), tf.function(ref_fwd_grad)
    xla_fwd = tf.function(ref_fwd, jit_compile=True)
    xla_fwd_grad = tf.function(ref_fwd_grad, jit_compile=True)
    return {
        "forward": {
            "fused": fused_fwd,
            "fused tf.function": fused_graph_fwd,
            "fused sparse": sparse_fwd,
            "reference eager": ref_fwd,
            "reference tf.function": graph_fwd,
            "reference XLA": xla_fwd,
        },
        "forward+gradient": {
            "fused": fused_fwd_grad,
            "fused tf.function": fused_graph_fwd_grad,
            "fused sparse": sparse_fwd_grad,
            "reference eager": ref_fwd_grad,
            "reference tf.function": graph_fwd_grad,
            "reference XLA": xla_fwd_grad,
        },
    }


def fused_only(y_true, y_pred, end):
    """The fused forward and forward+gradient (eager), as in candidates()."""
    fns = candidates(y_true, y_pred, end)
    return {"forward": fns["forward"]["fused"], "forward+gradient": fns["forward+gradient"]["fused"]}


def time_fused(shape, dtype, repeats):
    """{mode: median ms} of the fused op (eager) on make_inputs(shape, dtype)."""
    y_true, y_pred, end = make_inputs(shape, dtype)
    return {mode: statistics.median(timeit(lambda: fetch(fn()), repeats)) * 1e3
            for mode, fn in fused_only(y_true, y_pred, end).items()}


def isa_worker(repeats):
    """Run in a subprocess with FUSED_MASKED_MAE_CPU_ISA set: prints the fused
    op's times on ISA_SHAPE per dtype as JSON."""
    out = {"cpu_isa": fm.cpu_isa(),
           "times_ms": {dtype: time_fused(ISA_SHAPE, dtype, repeats) for dtype in DTYPES}}
    print("RESULT " + json.dumps(out))


def isa_rows(repeats, bandwidth):
    """The fused op on ISA_SHAPE for every variant this CPU supports."""
    rows = []
    elements = int(np.prod(ISA_SHAPE))
    for isa in _core.cpu_isas_supported():
        env = dict(os.environ, FUSED_MASKED_MAE_CPU_ISA=isa, TF_CPP_MIN_LOG_LEVEL="3")
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--isa-worker", "--repeats", str(repeats)],
            env=env, capture_output=True, text=True, check=True)
        line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")][-1]
        data = json.loads(line[len("RESULT "):])
        assert data["cpu_isa"] == isa, data
        for dtype, times in data["times_ms"].items():
            itemsize = tf.as_dtype(dtype).size
            fwd_gbps = 2 * elements * itemsize / (times["forward"] / 1e3) / 1e9
            row = {"isa": isa, "dtype": dtype, "forward_ms": times["forward"],
                   "forward+gradient_ms": times["forward+gradient"], "forward_GBps": fwd_gbps,
                   "forward_fraction_of_read_bandwidth": fwd_gbps / bandwidth["read_GBps"],
                   "forward+gradient_over_forward": times["forward+gradient"] / times["forward"]}
            rows.append(row)
            print(f"  {isa:8s} {dtype:9s} forward {row['forward_ms']:7.3f} ms "
                  f"{fwd_gbps:6.1f} GB/s ({row['forward_fraction_of_read_bandwidth']:4.0%} of read BW)"
                  f"   forward+gradient {row['forward+gradient_ms']:7.3f} ms "
                  f"({row['forward+gradient_over_forward']:.2f}x the forward)", flush=True)
    return rows


def schedule_rows(repeats, bandwidth):
    """The fused op (float32) on many short rows and on few long rows."""
    rows = []
    for shape in SCHEDULE_SHAPES:
        times = time_fused(shape, "float32", repeats)
        elements = int(np.prod(shape))
        fwd_gbps = 2 * elements * 4 / (times["forward"] / 1e3) / 1e9
        bwd_gbps = 3 * elements * 4 / (times["forward+gradient"] / 1e3) / 1e9
        row = {"shape": list(shape), "dtype": "float32", "forward_ms": times["forward"],
               "forward+gradient_ms": times["forward+gradient"], "forward_GBps": fwd_gbps,
               "forward_fraction_of_read_bandwidth": fwd_gbps / bandwidth["read_GBps"],
               "forward+gradient_GBps": bwd_gbps,
               "forward+gradient_fraction_of_copy_bandwidth": bwd_gbps / bandwidth["copy_GBps"]}
        rows.append(row)
        print(f"  {'x'.join(map(str, shape)):>12s} forward {row['forward_ms']:7.3f} ms "
              f"{fwd_gbps:6.1f} GB/s ({row['forward_fraction_of_read_bandwidth']:4.0%} of read)   "
              f"forward+gradient {row['forward+gradient_ms']:7.3f} ms {bwd_gbps:6.1f} GB/s "
              f"({row['forward+gradient_fraction_of_copy_bandwidth']:4.0%} of copy)", flush=True)
    return rows


def target_summary(rows, isa_table, bandwidth):
    """The issue's targets on ISA_SHAPE, from this run."""
    out = {}
    by_key = {(tuple(r["shape"]), r["dtype"], r["mode"]): r["results"] for r in rows}
    for dtype in DTYPES:
        f = by_key.get((ISA_SHAPE, dtype, "forward"))
        b = by_key.get((ISA_SHAPE, dtype, "forward+gradient"))
        if not f or not b:
            continue
        fwd = min((f[n] for n in ("fused", "fused tf.function")), key=lambda r: r["median_ms"])
        bwd = min((b[n] for n in ("fused", "fused tf.function")), key=lambda r: r["median_ms"])
        fastest = min(r["median_ms"] for n, r in b.items() if n.startswith("reference"))
        out[dtype] = {"forward_fraction_of_read_bandwidth": fwd["fraction_of_bandwidth"],
                      "forward+gradient_speedup_vs_fastest_composite": fastest / bwd["median_ms"],
                      "forward+gradient_over_fused_forward": bwd["median_ms"] / fwd["median_ms"]}
    print(f"\ntargets on {'x'.join(map(str, ISA_SHAPE))} (cpu_isa {fm.cpu_isa()}):")
    for dtype, t in out.items():
        goal = 0.8 if dtype == "float32" else 0.6
        print(f"  {dtype:9s} forward {t['forward_fraction_of_read_bandwidth']:4.0%} of read BW "
              f"(target {goal:.0%}); forward+gradient "
              f"{t['forward+gradient_speedup_vs_fastest_composite']:.2f}x the fastest composite "
              f"(target 4x), {t['forward+gradient_over_fused_forward']:.2f}x the fused forward "
              f"(target <= 3x)")
    return out


def model_step_figure(repeats):
    """One train_on_batch of a small LSTM seq2seq-style model, fused vs reference."""
    vocab, time_steps, batch = 1549, 32, 32
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocab, size=(batch, time_steps))
    y = np.eye(vocab, dtype=np.float32)[np.where(rng.random((batch, time_steps)) < 0.5, vocab - 1, x)]
    out = {}
    for name, loss in (
        ("fused MaskedMAE", fm.MaskedMAE(START, vocab - 1)),
        ("reference loss", fm.ReferenceMaskedMAE(START, vocab - 1)),
    ):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((time_steps,), dtype="int32"),
            keras.layers.Embedding(vocab, 64),
            keras.layers.LSTM(128, return_sequences=True),
            keras.layers.Dense(vocab, activation="softmax"),
        ])
        model.compile(optimizer="adam", loss=loss, jit_compile=False)
        times = timeit(lambda: model.train_on_batch(x, y), repeats, warmup=3)
        out[name] = {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3}
    out["speedup"] = out["reference loss"]["median_ms"] / out["fused MaskedMAE"]["median_ms"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--isa-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = args.repeats or (5 if args.quick else 15)
    if args.isa_worker:
        isa_worker(repeats)
        return
    threads = os.cpu_count()

    bandwidth = {
        "read_GBps": _core.probe_bandwidth("read", 512, threads, 5),
        "copy_GBps": _core.probe_bandwidth("copy", 256, threads, 5),
        "threads": threads,
    }
    print(f"measured bandwidth ({threads} threads): read {bandwidth['read_GBps']:.1f} GB/s, "
          f"copy (read+write) {bandwidth['copy_GBps']:.1f} GB/s", flush=True)

    rows = []
    for shape in SHAPES:
        for dtype in DTYPES:
            y_true, y_pred, end = make_inputs(shape, dtype)
            elements = int(np.prod(shape))
            itemsize = y_pred.dtype.size
            # Writing a fresh [..., C] tensor: the floor under any op that
            # returns the gradient (page faults of the new allocation included).
            fill_ms = statistics.median(
                timeit(lambda: fetch(tf.fill(shape, tf.constant(1, dtype))), repeats)) * 1e3
            for mode, fns in candidates(y_true, y_pred, end).items():
                streams = 2 if mode == "forward" else 3
                limit = bandwidth["read_GBps"] if mode == "forward" else bandwidth["copy_GBps"]
                results = {}
                for name, fn in fns.items():
                    times = timeit(lambda: fetch(fn()), repeats)
                    median = statistics.median(times)
                    q = statistics.quantiles(times, n=4) if len(times) > 1 else [median] * 3
                    # The sparse op reads ids instead of y_true: one stream less.
                    name_streams = streams - 1 if "sparse" in name else streams
                    gbps = name_streams * elements * itemsize / median / 1e9
                    results[name] = {
                        "median_ms": median * 1e3,
                        "iqr_ms": (q[2] - q[0]) * 1e3,
                        "min_ms": min(times) * 1e3,
                        "GBps": gbps,
                        "fraction_of_bandwidth": gbps / limit,
                    }
                fastest_ref = min(
                    (r["median_ms"], n) for n, r in results.items() if n.startswith("reference")
                )
                for name in ("fused", "fused tf.function", "fused sparse"):
                    results[name]["speedup_vs_fastest_reference"] = (
                        fastest_ref[0] / results[name]["median_ms"]
                    )
                    results[name]["fastest_reference"] = fastest_ref[1]
                row = {"shape": list(shape), "dtype": dtype, "mode": mode, "results": results,
                       "fresh_output_write_ms": fill_ms}
                rows.append(row)
                print_row(row)

    print(f"\nfused op on {'x'.join(map(str, ISA_SHAPE))} per CPU instruction-set variant "
          f"(in use by default: {fm.cpu_isa()}):")
    isa_table = isa_rows(repeats, bandwidth)
    print("\nfused op (float32) on short and long rows:")
    schedule = schedule_rows(repeats, bandwidth)

    model = model_step_figure(repeats)
    print(f"model fit step (train_on_batch, [32, 32, 1549] outputs): fused "
          f"{model['fused MaskedMAE']['median_ms']:.1f} ms, reference "
          f"{model['reference loss']['median_ms']:.1f} ms, speedup {model['speedup']:.2f}x")

    os.makedirs(args.out, exist_ok=True)
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        },
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "numpy": np.__version__, "fused_masked_mae": fm.__version__},
        "repeats": repeats,
        "bandwidth": bandwidth,
        "cpu_isa": fm.cpu_isa(),
        "cpu_flags": cpu_flags(),
        "rows": rows,
        "isa_rows": isa_table,
        "schedule_rows": schedule,
        "model_fit_step": model,
    }
    print_markdown_summary(rows, bandwidth)
    report["targets"] = target_summary(rows, isa_table, bandwidth)
    json_path = os.path.join(args.out, "cpu.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    png_path = os.path.join(args.out, "cpu.png")
    plot(rows, bandwidth, png_path, isa_table)
    print(f"wrote {json_path} and {png_path}")


def cpu_flags():
    """The vector-unit flags of /proc/cpuinfo (Linux), for the record."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith(("avx", "sse", "f16c", "fma", "amx")))


def print_row(row):
    shape = "x".join(map(str, row["shape"]))
    print(f"\n{shape} {row['dtype']} {row['mode']}")
    print(f"  {'':24s} {'median ms':>10s} {'IQR ms':>8s} {'GB/s':>7s} {'of BW':>6s}")
    for name, r in row["results"].items():
        extra = ""
        if name.startswith("fused"):
            extra = f"  {r['speedup_vs_fastest_reference']:.2f}x vs {r['fastest_reference']}"
        print(f"  {name:24s} {r['median_ms']:10.3f} {r['iqr_ms']:8.3f} {r['GBps']:7.1f} "
              f"{r['fraction_of_bandwidth']:6.0%}{extra}", flush=True)


def print_markdown_summary(rows, bandwidth):
    """The README's table: one line per shape and dtype."""
    print(f"\n| shape | dtype | fused fwd ms | fwd GB/s (% of read BW) | fwd speedup | "
          f"fused fwd+grad ms | fwd+grad speedup | sparse fwd / fwd+grad ms | "
          f"fresh-output write ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    by_key = {}
    for row in rows:
        by_key.setdefault((tuple(row["shape"]), row["dtype"]), {})[row["mode"]] = row
    for (shape, dtype), modes in by_key.items():
        f, b = modes["forward"], modes["forward+gradient"]
        fwd = min((f["results"][n] for n in ("fused", "fused tf.function")),
                  key=lambda r: r["median_ms"])
        bwd = min((b["results"][n] for n in ("fused", "fused tf.function")),
                  key=lambda r: r["median_ms"])
        print(f"| {'x'.join(map(str, shape))} | {dtype} | {fwd['median_ms']:.2f} | "
              f"{fwd['GBps']:.1f} ({fwd['fraction_of_bandwidth']:.0%}) | "
              f"{fwd['speedup_vs_fastest_reference']:.1f}x vs {fwd['fastest_reference']} | "
              f"{bwd['median_ms']:.2f} | {bwd['speedup_vs_fastest_reference']:.1f}x vs "
              f"{bwd['fastest_reference']} | {f['results']['fused sparse']['median_ms']:.2f} / "
              f"{b['results']['fused sparse']['median_ms']:.2f} | "
              f"{b['fresh_output_write_ms']:.2f} |")
    print(f"(bandwidth probe: read {bandwidth['read_GBps']:.1f} GB/s, copy "
          f"{bandwidth['copy_GBps']:.1f} GB/s, {bandwidth['threads']} threads)")


def plot(rows, bandwidth, path, isa_table):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(20, 5), gridspec_kw={"width_ratios": [3, 3, 2]})
    axes[1].sharey(axes[0])
    for ax, mode in zip(axes, ("forward", "forward+gradient")):
        selected = [r for r in rows if r["mode"] == mode]
        labels = [f"{'x'.join(map(str, r['shape']))}\n{r['dtype']}" for r in selected]
        names = list(selected[0]["results"])
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            ax.bar(np.arange(len(selected)) + k * width,
                   [r["results"][name]["GBps"] for r in selected], width, label=name)
        limit = bandwidth["read_GBps"] if mode == "forward" else bandwidth["copy_GBps"]
        ax.axhline(limit, color="k", linestyle="--",
                   label=f"measured {'read' if mode == 'forward' else 'copy'} bandwidth")
        ax.set_xticks(np.arange(len(selected)) + 0.4 - width / 2)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(f"{mode}: effective GB/s over minimum traffic")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("GB/s (log)")
    ax = axes[2]
    isas = list(dict.fromkeys(r["isa"] for r in isa_table))
    width = 0.8 / max(1, len(isas))
    for k, isa in enumerate(isas):
        selected = [r for r in isa_table if r["isa"] == isa]
        ax.bar(np.arange(len(selected)) + k * width,
               [100 * r["forward_fraction_of_read_bandwidth"] for r in selected], width, label=isa)
    ax.set_xticks(np.arange(len(DTYPES)) + 0.4 - width / 2)
    ax.set_xticklabels(DTYPES)
    ax.axhline(80, color="k", linestyle="--", label="target float32")
    ax.axhline(60, color="gray", linestyle=":", label="target 16-bit")
    ax.set_ylabel("% of measured read bandwidth")
    ax.set_title(f"fused forward {'x'.join(map(str, ISA_SHAPE))} per CPU variant")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
