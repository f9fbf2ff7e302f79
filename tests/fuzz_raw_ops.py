"""A fuzzer of the raw ops (forward, gradient, sparse; the masked MAE's and the
masked cross-entropy's) and of _core and the XLA handlers, run under
the sanitizers by `./build.sh sanitize`.

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
from fused_masked_mae._loader import ops_library
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


def one_ce_case(rng):
    """The masked cross-entropy's entry points: raw forward/gradient ops
    (dense, sparse), _core, and the XLA handlers, with valid and invalid
    options, ids, tokens and per-row inputs."""
    shape = draw_shape(rng)
    dtype = FLOATS[rng.integers(len(FLOATS))] if rng.random() < 0.95 else tf.int32
    classes = shape[-1] if shape and shape[-1] > 0 else 1
    loss_shape = shape[:-1] if shape else []
    sparse = rng.random() < 0.4
    options = dict(from_logits=bool(rng.random() < 0.5),
                   epsilon=float(rng.choice([1e-7, 1e-7, 1e-3, 0.0])))
    smoothing = float(rng.choice([0.0, 0.0, 0.1, 1.5]))
    if not sparse:
        options["label_smoothing"] = smoothing
    tokens = [int(t) for t in rng.integers(0 if rng.random() < 0.95 else -1,
                                           classes if rng.random() < 0.85 else 70,
                                           size=int(rng.integers(0, 4)))]
    y_pred = draw_tensor(rng, shape, dtype)
    if sparse:
        ids_shape = loss_shape if rng.random() < 0.85 else draw_shape(rng)
        y_true = draw_tensor(rng, ids_shape, tf.int32 if rng.random() < 0.5 else tf.int64)
        if shape and shape[-1] > 0 and rng.random() < 0.7:
            y_true = tf.constant(rng.integers(0, shape[-1], size=ids_shape), y_true.dtype)
    else:
        y_true = draw_tensor(rng, shape if rng.random() < 0.85 else draw_shape(rng), dtype)
    grad_loss = draw_tensor(rng, loss_shape if rng.random() < 0.85 else draw_shape(rng), dtype)
    row_keep = tf.constant(rng.integers(0, 256, size=loss_shape if rng.random() < 0.9
                                        else draw_shape(rng)), tf.uint8)
    stats_shape = loss_shape + [2] if rng.random() < 0.9 else draw_shape(rng)
    row_stats = tf.constant(rng.choice(VALUES, size=stats_shape), tf.float64)
    kind = rng.choice(["op", "op_grad", "core", "core_grad", "xla", "xla_grad"])
    name = "sparse_masked_crossentropy" if sparse else "masked_crossentropy"
    targets = {"y_true_ids" if sparse else "y_true": y_true}
    try:
        if kind == "op":
            out = getattr(ops_library, "import_fused_masked_mae_" + name)(
                **targets, y_pred=y_pred, masked_tokens=tokens, **options)
            assert out[0].shape == loss_shape and out[2].shape == loss_shape + [2]
        elif kind == "op_grad":
            out = getattr(ops_library, "import_fused_masked_mae_" + name + "_grad")(
                **targets, y_pred=y_pred, row_keep=row_keep, row_stats=row_stats,
                grad_loss=grad_loss, **options)
            assert out.shape == shape
        elif kind in ("core", "core_grad"):
            args = dict(sparse=sparse, from_logits=options["from_logits"],
                        label_smoothing=smoothing, epsilon=options["epsilon"])
            if kind == "core":
                out = _core.ce_forward(y_true.numpy(), y_pred.numpy(), tokens, **args)
                assert list(out.shape) == loss_shape
            else:
                with_stats = rng.random() < 0.5
                out = _core.ce_gradient(
                    y_true.numpy(), y_pred.numpy(), grad_loss.numpy(),
                    [] if with_stats else tokens, **args,
                    row_keep=row_keep.numpy() if with_stats else None,
                    row_stats=row_stats.numpy() if with_stats else None)
                assert list(out.shape) == shape
        else:
            attrs = (f"from_logits = {int(options['from_logits'])} : i64, "
                     f"label_smoothing = {smoothing:.9e} : f32, "
                     f"epsilon = {options['epsilon']:.9e} : f32")
            platforms = fm_xla.CE_REGISTERED_PLATFORMS
            if kind == "xla":
                attr = "masked_tokens = array<i64" + (
                    ": " + ", ".join(map(str, tokens)) if tokens else "") + ">, " + attrs
                out = fm_xla._call(fm_xla.CE_FORWARD_TARGETS[sparse], [y_true, y_pred],
                                   [(loss_shape, dtype), (loss_shape, tf.uint8),
                                    (stats_shape, tf.float64)], attr, platforms)
                assert out[0].shape.as_list() == loss_shape
            else:
                out = fm_xla._call(fm_xla.CE_GRAD_TARGETS[sparse],
                                   [y_true, y_pred, row_keep, row_stats, grad_loss],
                                   [(shape, dtype)], attrs, platforms)
                assert out[0].shape.as_list() == shape
        return "ok"
    except EXPECTED_ERRORS:
        return "rejected"


def one_case(rng):
    if rng.random() < 0.35:
        return one_ce_case(rng)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)  # 3e38 cast to float16 overflows: meant
    rng = np.random.default_rng(args.seed)
    counts = {"ok": 0, "rejected": 0}
    for _ in range(args.cases):
        counts[one_case(rng)] += 1
    print(f"fuzz_raw_ops: {args.cases} cases, {counts['ok']} computed, "
          f"{counts['rejected']} rejected with an expected exception")
    if counts["ok"] == 0 or counts["rejected"] == 0:
        print("fuzz_raw_ops: the case mix is degenerate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
