"""A fuzzer of the raw ops (forward, gradient, sparse) and of _core, run under
the sanitizers by `./build.sh sanitize`; and of the JAX and torch entry points
(fused_masked_mae.jax / .torch, which reach the XLA handler library and
_core's pointer functions), where those frameworks are installed.

Each case draws shapes (zero-sized dimensions, mismatches, rank 0), dtypes
(valid and not), token lists (in range, negative, >= C, too many), sparse ids
(in and out of range) and values (ties, NaN, +-inf, -0.0), calls the op, and
accepts either a result of the right shape or a Python exception of an
expected type. Anything else (a crash, a sanitizer report) ends the process
with a non-zero status. Deterministic for a given --seed.
"""

import argparse
import sys
import warnings

import numpy as np
import tensorflow as tf

from fused_masked_mae import _core
from fused_masked_mae import xla as fm_xla
from raw_ops import raw_forward, raw_grad, raw_sparse_forward, raw_sparse_grad

EXPECTED_ERRORS = (tf.errors.InvalidArgumentError, ValueError, TypeError)
VALUES = np.array([0.0, -0.0, 1.0, 1.0, 0.5, -2.0, np.nan, np.inf, -np.inf, 3.0e38])
FLOATS = [tf.float16, tf.bfloat16, tf.float32, tf.float64]


def draw_shape(rng):
    rank = 0 if rng.random() < 0.05 else int(rng.integers(1, 5))
    return [int(rng.choice([0, 1, 2, 3, 5, 17, 64])) for _ in range(rank)]


def draw_tensor(rng, shape, dtype):
    if dtype in (tf.int32, tf.int64):
        return tf.constant(rng.integers(-2, 70, size=shape), dtype)
    return tf.constant(rng.choice(VALUES, size=shape), dtype)


def one_case(rng):
    shape = draw_shape(rng)
    other = shape if rng.random() < 0.8 else draw_shape(rng)
    dtype = FLOATS[rng.integers(len(FLOATS))] if rng.random() < 0.95 else tf.int32
    classes = shape[-1] if shape and shape[-1] > 0 else 1
    high = classes if rng.random() < 0.85 else 70  # mostly valid ids
    low = 0 if rng.random() < 0.95 else -1
    tokens = [int(t) for t in rng.integers(low, high, size=int(rng.integers(0, 4)))]
    if rng.random() < 0.02:
        tokens = list(range(300))  # over the 256-token limit
    kind = rng.choice(["forward", "grad", "sparse", "sparse_grad", "core", "core_grad",
                       "xla_forward", "xla_grad"])
    y_pred = draw_tensor(rng, shape, dtype)
    loss_shape = shape[:-1] if shape else []
    grad_shape = loss_shape if rng.random() < 0.8 else draw_shape(rng)
    grad_loss = draw_tensor(rng, grad_shape, dtype)
    # The gradient ops take the forward's keep bytes: any byte, mostly the right shape.
    keep_shape = loss_shape if rng.random() < 0.85 else draw_shape(rng)
    row_keep = tf.constant(rng.integers(0, 256, size=keep_shape), tf.uint8)
    try:
        if kind.startswith("xla"):
            # The XLA FFI handlers, called with whatever buffers the module
            # declares: their own validation is all that stands in the way.
            sparse = rng.random() < 0.3
            if sparse:
                y_true = draw_tensor(rng, loss_shape if rng.random() < 0.85 else draw_shape(rng),
                                     tf.int32 if rng.random() < 0.5 else tf.int64)
            else:
                y_true = draw_tensor(rng, other, dtype)
            dims = lambda t: t.shape.as_list()  # noqa: E731
            if kind == "xla_forward":
                attr = "masked_tokens = array<i64" + (
                    ": " + ", ".join(map(str, tokens)) if tokens else "") + ">"
                out = fm_xla._call(fm_xla.FORWARD_TARGETS[sparse], [y_true, y_pred],
                                   [(loss_shape, dtype), (loss_shape, tf.uint8)], attr)
            else:
                out = fm_xla._call(fm_xla.GRAD_TARGETS[sparse],
                                   [y_true, y_pred, row_keep, grad_loss],
                                   [(shape, dtype)])
            assert [dims(t) for t in out][0] == (loss_shape if kind == "xla_forward" else shape)
        elif kind in ("forward", "grad", "core", "core_grad"):
            y_true = draw_tensor(rng, other, dtype)
            if kind == "forward":
                out = raw_forward(
                    y_true=y_true, y_pred=y_pred, masked_tokens=tokens)
                assert out.shape == loss_shape, (out.shape, loss_shape)
            elif kind == "grad":
                out = raw_grad(
                    y_true=y_true, y_pred=y_pred, grad_loss=grad_loss, row_keep=row_keep)
                assert out.shape == shape
            else:
                if kind == "core":
                    out = _core.forward(y_true.numpy(), y_pred.numpy(), tokens)
                    assert list(out.shape) == loss_shape
                else:
                    with_keep = rng.random() < 0.5
                    out = _core.gradient(y_true.numpy(), y_pred.numpy(), grad_loss.numpy(),
                                         [] if with_keep else tokens,
                                         row_keep=row_keep.numpy() if with_keep else None)
                    assert list(out.shape) == shape
        else:
            id_dtype = tf.int32 if rng.random() < 0.5 else tf.int64
            ids_shape = loss_shape if rng.random() < 0.85 else draw_shape(rng)
            ids = draw_tensor(rng, ids_shape, id_dtype)
            if shape and shape[-1] > 0 and rng.random() < 0.7:  # mostly valid ids
                ids = tf.constant(rng.integers(0, shape[-1], size=ids_shape), id_dtype)
            if kind == "sparse":
                out = raw_sparse_forward(
                    y_true_ids=ids, y_pred=y_pred, masked_tokens=tokens)
                assert out.shape == loss_shape
            else:
                out = raw_sparse_grad(
                    y_true_ids=ids, y_pred=y_pred, grad_loss=grad_loss, row_keep=row_keep)
                assert out.shape == shape
        return "ok"
    except EXPECTED_ERRORS:
        return "rejected"


# --- JAX and torch entry points (one block, so it merges as one table row) ----

def _framework_entry_points():
    """{kind: fn(rng, y_true, ids, y_pred, grad_loss, tokens) -> result shape}
    and the errors they may raise, for the frameworks that import here."""
    entries, errors = {}, []
    try:
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", True)
        from fused_masked_mae import jax as fmj

        def run_jax(sparse, grad):
            def call(rng, y_true, ids, y_pred, grad_loss, tokens):
                t = jnp.asarray((ids if sparse else y_true).numpy())
                p = jnp.asarray(y_pred.numpy())
                fn = fmj.sparse_masked_mae_tokens if sparse else fmj.masked_mae_tokens
                if grad:
                    g = jnp.asarray(grad_loss.numpy())
                    out = jax.vjp(lambda q: fn(t, q, tokens), p)[1](g)[0]
                else:
                    out = fn(t, p, tokens)
                return list(jax.block_until_ready(out).shape)
            return call

        for sparse in (False, True):
            for grad in (False, True):
                entries[f"jax_{'sparse_' if sparse else ''}{'grad' if grad else 'forward'}"] = \
                    run_jax(sparse, grad)
        errors.append(jax.errors.JaxRuntimeError)
    except ImportError:
        pass
    try:
        import torch

        from fused_masked_mae import torch as fmt

        def to_torch(t):
            if t.dtype == tf.bfloat16:
                return torch.from_numpy(tf.bitcast(t, tf.int16).numpy()).view(torch.bfloat16)
            return torch.from_numpy(t.numpy())

        def run_torch(sparse, grad):
            def call(rng, y_true, ids, y_pred, grad_loss, tokens):
                t = to_torch(ids if sparse else y_true)
                p = to_torch(y_pred).requires_grad_(grad and y_pred.dtype.is_floating)
                fn = fmt.sparse_masked_mae_tokens if sparse else fmt.masked_mae_tokens
                out = fn(t, p, tokens)
                if grad:
                    if list(grad_loss.shape) != list(out.shape):  # autograd's own check
                        raise ValueError("grad_loss must have the loss's shape")
                    out = torch.autograd.grad(out, p, to_torch(grad_loss))[0]
                return list(out.shape)
            return call

        for sparse in (False, True):
            for grad in (False, True):
                entries[f"torch_{'sparse_' if sparse else ''}{'grad' if grad else 'forward'}"] = \
                    run_torch(sparse, grad)
    except ImportError:
        pass
    return entries, tuple(errors)


FRAMEWORK_ENTRY_POINTS, FRAMEWORK_ERRORS = {}, ()


def one_framework_case(rng):
    """A case for a JAX or torch entry point: the result has the loss's (or
    y_pred's) shape, or the call raises an expected error."""
    kind = rng.choice(sorted(FRAMEWORK_ENTRY_POINTS))
    shape = draw_shape(rng)
    dtype = FLOATS[rng.integers(len(FLOATS))] if rng.random() < 0.95 else tf.int32
    loss_shape = shape[:-1] if shape else []
    classes = shape[-1] if shape and shape[-1] > 0 else 1
    tokens = [int(t) for t in rng.integers(0 if rng.random() < 0.95 else -1,
                                           classes if rng.random() < 0.85 else 70,
                                           size=int(rng.integers(0, 4)))]
    y_true = draw_tensor(rng, shape if rng.random() < 0.85 else draw_shape(rng), dtype)
    ids_shape = loss_shape if rng.random() < 0.85 else draw_shape(rng)
    ids = tf.constant(rng.integers(-1 if rng.random() < 0.1 else 0,
                                   classes + (rng.random() < 0.1), size=ids_shape),
                      tf.int32 if rng.random() < 0.5 else tf.int64)
    y_pred = draw_tensor(rng, shape, dtype)
    grad_loss = draw_tensor(rng, loss_shape if rng.random() < 0.9 else draw_shape(rng), dtype)
    try:
        out = FRAMEWORK_ENTRY_POINTS[kind](rng, y_true, ids, y_pred, grad_loss, tokens)
        assert out == (shape if kind.endswith("grad") else loss_shape), (kind, out, shape)
        return "ok"
    except EXPECTED_ERRORS + FRAMEWORK_ERRORS as error:
        if FRAMEWORK_ERRORS and isinstance(error, FRAMEWORK_ERRORS):
            assert "INVALID_ARGUMENT" in str(error), error  # the handler's own check
        return "rejected"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)  # 3e38 cast to float16 overflows: meant
    global FRAMEWORK_ENTRY_POINTS, FRAMEWORK_ERRORS
    FRAMEWORK_ENTRY_POINTS, FRAMEWORK_ERRORS = _framework_entry_points()
    rng = np.random.default_rng(args.seed)
    counts = {"ok": 0, "rejected": 0}
    for _ in range(args.cases):
        counts[one_case(rng)] += 1
    # The JAX and torch entry points, a quarter as many cases again.
    for _ in range(args.cases // 4 if FRAMEWORK_ENTRY_POINTS else 0):
        counts[one_framework_case(rng)] += 1
    print(f"fuzz_raw_ops: JAX/torch entry points: {sorted(FRAMEWORK_ENTRY_POINTS) or 'none'}")
    print(f"fuzz_raw_ops: {args.cases} cases, {counts['ok']} computed, "
          f"{counts['rejected']} rejected with an expected exception")
    if counts["ok"] == 0 or counts["rejected"] == 0:
        print("fuzz_raw_ops: the case mix is degenerate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
