"""A differential fuzz of every entry point of the kernels, bit for bit.

Each case draws a loss's inputs (every dtype, dense or sparse, C from 1 to
100, zero-sized batches; values with ties, NaN, +-inf, -0.0, denormals and
normals whose differences are denormal; NumPy inputs that are misaligned or
strided), a token list (valid, repeated, negative, >= C, more than 256
distinct, non-integer, bool, 2**63) and sometimes bad sparse ids, runs it
through every entry point in ENTRY_POINTS, and requires that they all agree:
the same loss and gradient bytes, or all refusing it with the same kind of
exception (TypeError, or ValueError/InvalidArgumentError). The keep bytes are
also held to an oracle of the README's semantics (tf.math.argmax on inputs
with denormals read as zero).

    python tests/fuzz_entries.py --cases 2000 [--seed 0] [--no-isa] [--graph-every N]

Entry points (ENTRY_POINTS, one table per loss; add a row to extend it):
  op        the TensorFlow op, eager, gradient through GradientTape
  function  the op inside tf.function (one trace per dtype/rank/C/tokens)
  jit       tf.function(jit_compile=True): the XLA custom calls
  core      fused_masked_mae.core (NumPy; misaligned/strided arrays as drawn)
  jax       fused_masked_mae.jax (the XLA handlers through jax.ffi; jax.vjp), x64 on
            (scoped to the call: jax.enable_x64)
  torch     fused_masked_mae.torch (the custom ops; autograd), CPU tensors
  isa:NAME  core in a worker process per other CPU variant this machine has
            (FUSED_MASKED_MAE_CPU_ISA=NAME), fed cases over a pipe
An entry is a function `entry(case) -> (loss, grad)` as NumPy arrays, that
raises for refused inputs; `case` has dtype, sparse, y_true, y_pred,
grad_loss and tokens (see Case). Another front door, or another loss,
adds its functions to the tables below (jax/torch are left out, saying so,
where they are not installed).

Run by ./build.sh sanitize (a fast slice under ASan+UBSan) and on demand with
--cases 100000. Exits non-zero on the first disagreement, printing the case.
"""

import argparse
import os
import pickle
import struct
import subprocess
import sys
import time
import warnings

import ml_dtypes
import numpy as np

FLOATS = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32,
          "float64": np.float64}
# The smallest normal of the float32/float64 the kernels compute in
# (float16 widened to float32 is never denormal).
SMALLEST_NORMAL = {"float16": 0.0, "bfloat16": float(np.finfo(np.float32).tiny),
                   "float32": float(np.finfo(np.float32).tiny),
                   "float64": float(np.finfo(np.float64).tiny)}
DENORMAL = {"float16": 1e-7, "bfloat16": 1e-40, "float32": 1e-40, "float64": 1e-310}
# Few sizes, so that the graph entries' traces and XLA's compilations (one
# per shape) are shared by many cases; C covers the 16-lane tails, the
# 64-element search blocks and a row shorter than one lane block.
CLASSES = [1, 3, 16, 17, 33, 64, 100]
LEAD_DIMS = [0, 1, 3]


class Case:
    """One draw: inputs as NumPy arrays (y_true is int ids when sparse)."""

    def __init__(self, dtype, sparse, y_true, y_pred, grad_loss, tokens, layout):
        self.dtype, self.sparse, self.layout = dtype, sparse, layout
        self.y_true, self.y_pred, self.grad_loss, self.tokens = y_true, y_pred, grad_loss, tokens

    def __repr__(self):
        return (f"Case(dtype={self.dtype}, sparse={self.sparse}, layout={self.layout}, "
                f"shape={self.y_pred.shape}, tokens={self.tokens!r},\n  y_true={self.y_true!r},"
                f"\n  y_pred={self.y_pred!r},\n  grad_loss={self.grad_loss!r})")


def value_pool(dtype):
    low = SMALLEST_NORMAL[dtype] or float(np.finfo(np.float16).tiny)
    tiny = DENORMAL[dtype]
    return np.array([0.0, -0.0, 1.0, 1.0, -1.0, 0.5, 2.0, np.nan, np.inf, -np.inf, tiny, -tiny,
                     3 * tiny, low, -low, 1.25 * low, 1.5 * low, 2 * low, 3.0e38], np.float64)


def lay_out(array, layout):
    """The array misaligned (one byte past an aligned address) or strided."""
    if layout == "misaligned" and array.dtype.itemsize > 1:
        buffer = np.zeros(array.nbytes + 1, np.uint8)
        out = np.ndarray(array.shape, array.dtype, buffer=buffer, offset=1)
        out[...] = array
        return out
    if layout == "strided" and array.ndim:
        wide = np.zeros(array.shape[:-1] + (2 * array.shape[-1],), array.dtype)
        wide[..., ::2] = array
        return wide[..., ::2]
    return array


def draw_tokens(rng, classes):
    """Token lists from a menu per C (so that the graph entries' traces are
    shared between cases), a fifth of them refused."""
    roll = rng.random()
    if roll < 0.70:
        menu = [[], [0], [classes - 1], [0, classes - 1], [t for t in (0, 1, 2) if t < classes]]
        return menu[int(rng.integers(len(menu)))]
    if roll < 0.76:
        return [0] * 300  # repeats count once: valid
    if roll < 0.80:
        return [np.int64(classes - 1), np.int32(0)]  # NumPy integers: valid
    bad = [[-1], [classes], [classes + 7], list(range(257)), [1.5], [True], [2**63], ["0"],
           [-(2**64)]]
    return bad[int(rng.integers(len(bad)))]


def draw_case(rng):
    dtype = list(FLOATS)[int(rng.integers(4))]
    np_dtype = FLOATS[dtype]
    classes = int(rng.choice(CLASSES))
    lead = [int(rng.choice(LEAD_DIMS)) for _ in range(int(rng.integers(0, 3)))]
    shape = tuple(lead) + (classes,)
    pool = value_pool(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 3e38 -> float16 inf: meant
        if rng.random() < 0.3:
            y_pred = rng.random(shape).astype(np_dtype)
        else:
            y_pred = rng.choice(pool, size=shape).astype(np_dtype)
        grad_loss = rng.choice(pool[:-1], size=shape[:-1]).astype(np_dtype)
        sparse = rng.random() < 0.3
        if sparse:
            ids = rng.integers(0, classes, size=shape[:-1])
            if rng.random() < 0.05 and ids.size:
                ids.flat[int(rng.integers(ids.size))] = int(rng.choice([-1, classes]))
            y_true = ids.astype(np.int32 if rng.random() < 0.5 else np.int64)
        elif rng.random() < 0.4:
            y_true = np.eye(classes, dtype=np_dtype)[rng.integers(0, classes, size=shape[:-1])]
        else:
            y_true = rng.choice(pool, size=shape).astype(np_dtype)
    layout = str(rng.choice(["plain", "plain", "plain", "misaligned", "strided"]))
    return Case(dtype, sparse, lay_out(y_true, layout), lay_out(y_pred, layout),
                lay_out(grad_loss, layout), draw_tokens(rng, classes), layout)


# --- Entry points ------------------------------------------------------------------

def core_entry(case):
    from fused_masked_mae import core

    loss = core.forward(case.y_true, case.y_pred, case.tokens, sparse=case.sparse)
    grad = core.gradient(case.y_true, case.y_pred, case.grad_loss, case.tokens,
                         sparse=case.sparse)
    return np.asarray(loss), np.asarray(grad)


def _tf_loss_and_grad(y_true, y_pred, grad_loss, tokens, sparse):
    import tensorflow as tf

    import fused_masked_mae as fm

    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        loss = (fm.sparse_masked_mae(y_true, y_pred, tokens=tokens) if sparse
                else fm.masked_mae_tokens(y_true, y_pred, tokens))
    return loss, tape.gradient(loss, y_pred, output_gradients=grad_loss)


def op_entry(case):
    import tensorflow as tf

    loss, grad = _tf_loss_and_grad(tf.constant(case.y_true), tf.constant(case.y_pred),
                                   tf.constant(case.grad_loss), case.tokens, case.sparse)
    return loss.numpy(), grad.numpy()


_traced = {}
_refused_at_trace = {}  # key -> the exception its trace raised (bad tokens)


def _graph_entry(case, jit):
    """One tf.function per (jit, dtype, sparse, rank, C, tokens), with the
    leading dimensions unknown, so shapes share traces (jit: XLA still
    compiles per shape)."""
    import tensorflow as tf

    rank = case.y_pred.ndim
    classes = case.y_pred.shape[-1]
    key = (jit, case.dtype, case.sparse, case.y_true.dtype.name, rank, classes,
           repr(case.tokens))
    if key not in _traced:
        lead = [None] * (rank - 1)
        dtype = tf.as_dtype(case.y_pred.dtype)
        signature = [
            tf.TensorSpec(lead if case.sparse else lead + [classes],
                          tf.as_dtype(case.y_true.dtype)),
            tf.TensorSpec(lead + [classes], dtype),
            tf.TensorSpec(lead, dtype),
        ]
        tokens, sparse = case.tokens, case.sparse
        _traced[key] = tf.function(
            lambda t, p, g: _tf_loss_and_grad(t, p, g, tokens, sparse),
            input_signature=signature, jit_compile=jit)
    if key in _refused_at_trace:
        raise _refused_at_trace[key]
    function = _traced[key]
    try:
        loss, grad = function(tf.constant(case.y_true), tf.constant(case.y_pred),
                              tf.constant(case.grad_loss))
    except Exception as error:
        if function.experimental_get_tracing_count() == 0:  # refused while tracing
            _refused_at_trace[key] = error
        raise
    return loss.numpy(), grad.numpy()


def function_entry(case):
    return _graph_entry(case, jit=False)


def jax_entry(case):
    """fused_masked_mae.jax (XLA FFI custom calls, eager: one compilation per
    shape), the gradient through jax.vjp. x64 on, for float64 and int64 ids."""
    import jax
    import jax.numpy as jnp

    from fused_masked_mae import jax as fmj

    fn = fmj.sparse_masked_mae_tokens if case.sparse else fmj.masked_mae_tokens
    with jax.enable_x64(True):  # scoped: a pytest process's other tests keep their setting
        y_true, y_pred = jnp.asarray(case.y_true), jnp.asarray(case.y_pred)
        try:
            loss, vjp = jax.vjp(lambda p: fn(y_true, p, case.tokens), y_pred)
            grad = vjp(jnp.asarray(case.grad_loss))[0]
            jax.block_until_ready((loss, grad))
        except jax.errors.JaxRuntimeError as error:  # the CPU handler's run-time id check
            if "INVALID_ARGUMENT" in str(error):
                raise ValueError(str(error)) from error
            raise
        return np.asarray(loss), np.asarray(grad)


def _to_torch(array):
    import torch

    if array.dtype == FLOATS["bfloat16"]:
        return torch.from_numpy(array.copy().view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)  # misaligned and strided as drawn


def _from_torch(tensor):
    import torch

    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(FLOATS["bfloat16"])
    return tensor.numpy()


def torch_entry(case):
    """fused_masked_mae.torch (custom ops on CPU), the gradient by autograd."""
    import torch

    from fused_masked_mae import torch as fmt

    fn = fmt.sparse_masked_mae_tokens if case.sparse else fmt.masked_mae_tokens
    y_pred = _to_torch(case.y_pred).requires_grad_(True)
    loss = fn(_to_torch(case.y_true), y_pred, case.tokens)
    grad = torch.autograd.grad(loss, y_pred, _to_torch(case.grad_loss))[0]
    return _from_torch(loss), _from_torch(grad)


def jit_entry(case):
    return _graph_entry(case, jit=True)


class IsaWorker:
    """`core` in a process of its own with FUSED_MASKED_MAE_CPU_ISA=isa."""

    def __init__(self, isa):
        env = {**os.environ, "FUSED_MASKED_MAE_CPU_ISA": isa, "TF_CPP_MIN_LOG_LEVEL": "3"}
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def __call__(self, case):
        payload = pickle.dumps(case)
        self.process.stdin.write(struct.pack("<Q", len(payload)) + payload)
        self.process.stdin.flush()
        size = self.process.stdout.read(8)
        if len(size) < 8:
            raise RuntimeError(f"the worker died (exit status {self.process.wait()})")
        status, value = pickle.loads(self.process.stdout.read(struct.unpack("<Q", size)[0]))
        if status == "ok":
            return value
        raise {"TypeError": TypeError, "ValueError": ValueError}.get(status, RuntimeError)(value)

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def worker_main():
    import fused_masked_mae  # noqa: F401 (fails on an unsupported ISA, as it should)

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        size = stdin.read(8)
        if len(size) < 8:
            return 0
        case = pickle.loads(stdin.read(struct.unpack("<Q", size)[0]))
        try:
            reply = ("ok", core_entry(case))
        except (TypeError, ValueError) as error:
            reply = (type(error).__name__ if type(error) in (TypeError, ValueError) else
                     "ValueError" if isinstance(error, ValueError) else "TypeError", str(error))
        payload = pickle.dumps(reply)
        stdout.write(struct.pack("<Q", len(payload)) + payload)
        stdout.flush()


# The entries whose first call per trace key or shape is slow (tracing, XLA
# compilation): --graph-every thins them out on long runs.
GRAPH_ENTRIES = ("function", "jit")

# The entry points per loss: {loss: {entry name: entry(case)}}. ISA workers are
# added by main(). Another loss (the cross-entropy) or front door (JAX,
# PyTorch) adds its table or its rows here.
ENTRY_POINTS = {
    "masked_mae": {"op": op_entry, "function": function_entry, "jit": jit_entry,
                   "core": core_entry, "jax": jax_entry, "torch": torch_entry},
}


def available_entries(loss):
    """ENTRY_POINTS[loss] less the JAX/torch rows whose framework is not
    installed (a TensorFlow-only install), said once."""
    entries = dict(ENTRY_POINTS[loss])
    for name, module in (("jax", "jax"), ("torch", "torch")):
        try:
            __import__(module)
        except ImportError:
            print(f"fuzz_entries: {module} is not installed: no {name} entry", file=sys.stderr)
            entries.pop(name, None)
    return entries


# --- Oracle: the keep bytes ----------------------------------------------------------

def oracle_keep(case):
    """1 unless argmax t == argmax p is a masked token; argmax is
    tf.math.argmax's on values with denormals read as zero (README)."""
    from numpy_reference import LOWEST_FINITE

    def flushed(x):
        wide = np.asarray(x).astype(np.float64)
        return np.where(np.abs(wide) < SMALLEST_NORMAL[case.dtype], 0.0, wide)

    def argmax(x, lowest):
        candidates = x > lowest
        return np.argmax(np.where(candidates, x, -np.inf), axis=-1)

    lowest = LOWEST_FINITE[np.dtype(FLOATS[case.dtype])]
    p = argmax(flushed(case.y_pred), lowest)
    t = (np.asarray(case.y_true, np.int64) if case.sparse
         else argmax(flushed(case.y_true), lowest))
    masked = (t == p) & np.isin(t, np.asarray(case.tokens, dtype=np.int64))
    return np.where(masked, 0, 1).astype(np.uint8)


# --- The differential check --------------------------------------------------------

def outcome(entry, case):
    """("ok", loss bytes, grad bytes) or ("refused", kind)."""
    import tensorflow as tf

    try:
        loss, grad = entry(case)
    except TypeError:
        return ("refused", "TypeError")
    except (ValueError, tf.errors.InvalidArgumentError):
        return ("refused", "ValueError")
    loss, grad = np.ascontiguousarray(loss), np.ascontiguousarray(grad)
    return ("ok", loss.shape, loss.dtype.str, loss.tobytes(), grad.shape, grad.tobytes())


def check_case(case, entries):
    outcomes = {name: outcome(entry, case) for name, entry in entries.items()}
    first_name, first = next(iter(outcomes.items()))
    for name, got in outcomes.items():
        if got != first:
            summary = {n: o[:2] if o[0] == "refused" else ("ok", o[1]) for n, o in
                       outcomes.items()}
            return f"{name} differs from {first_name}: {summary}"
    if first[0] == "ok" and case.y_pred.size:
        from fused_masked_mae import core

        _, keep = core.forward(case.y_true, case.y_pred, case.tokens, sparse=case.sparse,
                               return_keep=True)
        if not np.array_equal(keep, oracle_keep(case)):
            return f"keep bytes {keep.ravel()} differ from the oracle's {oracle_keep(case).ravel()}"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-isa", action="store_true",
                        help="skip the worker processes of the other CPU variants")
    parser.add_argument("--graph-every", type=int, default=1,
                        help="run the graph entries (function, jit: a trace per new "
                             "dtype/rank/C/tokens, an XLA compilation per new shape) on every "
                             "Nth case only; the others run every case")
    parser.add_argument("--progress", type=int, default=10000,
                        help="print a progress line every this many cases")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    import fused_masked_mae as fm
    from fused_masked_mae import _core

    tf.get_logger().setLevel("ERROR")
    entries = available_entries("masked_mae")
    workers = []
    if not args.no_isa:
        for isa in _core.cpu_isas_supported():
            if isa != fm.cpu_isa():
                workers.append(IsaWorker(isa))
                entries[f"isa:{isa}"] = workers[-1]
    rng = np.random.default_rng(args.seed)
    counts = {"ok": 0, "refused": 0}
    start = time.monotonic()
    try:
        for index in range(args.cases):
            case = draw_case(rng)
            problem = check_case(case, entries if index % args.graph_every == 0 else
                                 {n: e for n, e in entries.items() if n not in GRAPH_ENTRIES})
            if problem:
                print(f"fuzz_entries: case {index} (seed {args.seed}): {problem}\n{case!r}",
                      file=sys.stderr)
                return 1
            counts["ok" if outcome(core_entry, case)[0] == "ok" else "refused"] += 1
            if (index + 1) % args.progress == 0:
                print(f"fuzz_entries: {index + 1} cases, {time.monotonic() - start:.0f} s, "
                      f"{len(_traced)} traces", flush=True)
    finally:
        for worker in workers:
            worker.close()
    elapsed = time.monotonic() - start
    graph_cases = (args.cases + args.graph_every - 1) // args.graph_every
    print(f"fuzz_entries: {args.cases} cases through {', '.join(entries)} in {elapsed:.0f} s "
          f"({', '.join(GRAPH_ENTRIES)}: {graph_cases} of them): {counts['ok']} computed alike, "
          f"{counts['refused']} refused alike (seed {args.seed})")
    if counts["ok"] == 0 or counts["refused"] == 0:
        print("fuzz_entries: the case mix is degenerate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
