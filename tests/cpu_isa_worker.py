"""Runs the CPU kernels on a fixed battery of inputs and saves every output's
bytes, for tests/test_cpu_isa.py, which runs it once per instruction-set
variant (FUSED_MASKED_MAE_CPU_ISA is read once per process) and compares the
variants bit for bit.

    python tests/cpu_isa_worker.py OUT.npz core|tf

core: fused_masked_mae._core (forward with row_keep, gradient from row_keep);
tf: the TensorFlow ops (forward with row_keep, gradient op from row_keep, and
the registered gradient through GradientTape). Dense and sparse targets, every
dtype, C from 1 to 32000, NaN/Inf/signaling-NaN/denormal/tie rows, and inputs
that start one element past an aligned address.
"""

import sys

import ml_dtypes
import numpy as np

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32,
          "float64": np.float64}
UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
CLASSES = [1, 2, 3, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 255, 256, 1549, 4097, 32000]


def special_values(dtype):
    """Values that stress conversions and comparisons, as `dtype`."""
    values = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 6e-8,
              -6e-8, 1e-5, 65504.0, 3e38, -3e38, 1e-40]
    out = np.array(values, np.float64).astype(dtype)
    bits = out.view(UINT[out.itemsize]).copy()
    # Signaling NaNs and NaN payloads, and the smallest denormal, bit for bit.
    if out.itemsize == 2:
        extra = [0x7C01, 0xFC01, 0x7D55, 0x0001, 0x8001, 0x03FF] if dtype == np.float16 else \
            [0x7F81, 0xFF81, 0x7FC1, 0x0001, 0x8001, 0x007F]
    elif out.itemsize == 4:
        extra = [0x7F800001, 0xFF800001, 0x7FC00001, 0x00000001, 0x80000001]
    else:
        extra = [0x7FF0000000000001, 0xFFF0000000000001, 0x0000000000000001]
    return np.concatenate([bits, np.array(extra, bits.dtype)]).view(out.dtype)


def make_rows(rng, dtype, rows, classes):
    """y_true, y_pred [rows, classes]: one-hot, soft, tied and special rows."""
    kinds = rng.integers(0, 5, size=rows)
    y_true = np.zeros((rows, classes), np.float64)
    y_pred = rng.normal(scale=3.0, size=(rows, classes))
    labels = rng.integers(0, classes, size=rows)
    for r, kind in enumerate(kinds):
        if kind == 0:  # one-hot, prediction right at the label
            y_true[r, labels[r]] = 1.0
            y_pred[r, labels[r]] = 10.0
        elif kind == 1:  # soft targets
            y_true[r] = rng.random(classes)
        elif kind == 2:  # ties everywhere
            y_true[r] = rng.integers(0, 3, size=classes)
            y_pred[r] = rng.integers(0, 3, size=classes)
        else:
            y_true[r, labels[r]] = 1.0
    y_true, y_pred = y_true.astype(dtype), y_pred.astype(dtype)
    special = special_values(dtype)
    for r in np.flatnonzero(kinds == 4):  # NaN/Inf/denormal/signaling-NaN rows
        n = min(classes, 1 + rng.integers(0, 4))
        where = rng.choice(classes, size=n, replace=False)
        (y_true if rng.random() < 0.5 else y_pred)[r, where] = rng.choice(special, size=n)
    return y_true, y_pred


def unaligned(array):
    """A C-contiguous copy of `array` that starts one element past an aligned address."""
    buffer = np.zeros(array.size + 64 // array.itemsize + 1, array.dtype)
    skip = (-buffer.ctypes.data % 64) // array.itemsize + 1
    out = buffer[skip:skip + array.size].reshape(array.shape)
    out[...] = array
    return out


def cases():
    """(name, y_true, y_true_ids, y_pred, grad_loss, tokens) for every dtype and C."""
    for dtype_name, dtype in DTYPES.items():
        for classes in CLASSES:
            rng = np.random.default_rng(classes * 7 + len(dtype_name))
            rows = 3 if classes >= 4097 else 24
            y_true, y_pred = make_rows(rng, dtype, rows, classes)
            ids = rng.integers(0, classes, size=rows)
            grad_loss = rng.normal(size=rows).astype(dtype)
            grad_loss[0] = np.nan
            tokens = sorted({0, classes - 1} | {int(t) for t in rng.integers(0, classes, 2)})
            name = f"{dtype_name}_C{classes}"
            yield name, y_true, ids, y_pred, grad_loss, tokens
            if classes in (17, 1549):
                yield (name + "_unaligned", unaligned(y_true), ids, unaligned(y_pred), grad_loss,
                       tokens)


def as_bits(array):
    array = np.ascontiguousarray(array)
    return array.view(UINT.get(array.itemsize, np.uint8)) if array.dtype.kind == "f" or \
        array.dtype == ml_dtypes.bfloat16 else array


def run_core(out):
    from fused_masked_mae import _core

    for name, y_true, ids, y_pred, grad_loss, tokens in cases():
        for sparse, targets in ((False, y_true), (True, ids.astype(np.int32)),
                                (True, ids.astype(np.int64))):
            key = f"{name}_{'sparse' + str(targets.dtype) if sparse else 'dense'}"
            loss, keep = _core.forward(targets, y_pred, tokens, sparse, True)
            grad = _core.gradient(targets, y_pred, grad_loss, sparse=sparse, row_keep=keep)
            out[key + "_loss"], out[key + "_keep"], out[key + "_grad"] = loss, keep, grad
            # The masked cross-entropy, from logits and from probabilities
            # (y_pred as given: special values, negative "probabilities" too).
            for from_logits in (True, False):
                smoothing = 0.0 if sparse else 0.1
                ce_key = f"{key}_ce{int(from_logits)}"
                loss, keep, stats = _core.ce_forward(targets, y_pred, tokens, sparse, from_logits,
                                                     smoothing, 1e-7, True)
                grad = _core.ce_gradient(targets, y_pred, grad_loss, sparse=sparse,
                                         from_logits=from_logits, label_smoothing=smoothing,
                                         row_keep=keep, row_stats=stats)
                out[ce_key + "_loss"], out[ce_key + "_keep"] = loss, keep
                out[ce_key + "_stats"], out[ce_key + "_grad"] = stats, grad
    # The deterministic exp/log over float32 bit patterns and float64 values.
    rng = np.random.default_rng(5)
    x32 = np.concatenate([rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
                          .view(np.float32), np.linspace(-110, 95, 20001, dtype=np.float32),
                          special_values(np.float32)])
    x64 = np.concatenate([rng.integers(0, 2**63, 100_000, dtype=np.uint64).view(np.float64),
                          -rng.integers(0, 2**63, 100_000, dtype=np.uint64).view(np.float64),
                          np.linspace(-760, 720, 20001), special_values(np.float64)])
    for name, x in (("det32", x32), ("det64", x64)):
        out[name + "_exp"], out[name + "_log"] = _core.det_exp_log(x)
    return _core.cpu_isa()


def run_tf(out):
    import tensorflow as tf

    import fused_masked_mae as fm
    from fused_masked_mae import _loader
    from raw_ops import (raw_forward_with_keep, raw_grad, raw_sparse_forward_with_keep,
                         raw_sparse_grad)

    for name, y_true, ids, y_pred, grad_loss, tokens in cases():
        t, p = tf.constant(y_true), tf.constant(y_pred)
        g = tf.constant(grad_loss)
        for kind, targets, forward, gradient in (
                ("tf", t, raw_forward_with_keep, raw_grad),
                ("tfsparse", tf.constant(ids.astype(np.int64)), raw_sparse_forward_with_keep,
                 raw_sparse_grad)):
            loss, keep = forward(targets, p, tokens)
            grad = gradient(targets, p, g, row_keep=keep)
            out[f"{name}_{kind}_loss"], out[f"{name}_{kind}_keep"] = loss.numpy(), keep.numpy()
            out[f"{name}_{kind}_grad"] = grad.numpy()
        for from_logits in (True, False):
            with tf.GradientTape() as tape:
                tape.watch(p)
                loss = fm.crossentropy.masked_crossentropy_tokens(t, p, tokens, from_logits, 0.1)
            dp = tape.gradient(loss, p, output_gradients=g)
            out[f"{name}_ce{int(from_logits)}_loss"] = loss.numpy()
            out[f"{name}_ce{int(from_logits)}_dp"] = dp.numpy()
            ids64 = tf.constant(ids.astype(np.int64))
            with tf.GradientTape() as tape:
                tape.watch(p)
                loss = fm.crossentropy.sparse_masked_crossentropy_tokens(ids64, p, tokens,
                                                                         from_logits)
            dp = tape.gradient(loss, p, output_gradients=g)
            out[f"{name}_sce{int(from_logits)}_loss"] = loss.numpy()
            out[f"{name}_sce{int(from_logits)}_dp"] = dp.numpy()
        with tf.GradientTape() as tape:  # the registered gradient, both inputs
            tape.watch([t, p])
            loss = fm.masked_mae_tokens(t, p, tokens)
        dt, dp = tape.gradient(loss, [t, p], output_gradients=g)
        out[name + "_tape_loss"], out[name + "_tape_dt"], out[name + "_tape_dp"] = (
            loss.numpy(), dt.numpy(), dp.numpy())
    assert _loader.op_library_cpu_isa() == fm.cpu_isa()
    return _loader.op_library_cpu_isa()


def main():
    path, front_door = sys.argv[1], sys.argv[2]
    out = {}
    isa = run_core(out) if front_door == "core" else run_tf(out)
    np.savez(path, isa=np.array(isa), **{k: as_bits(v) for k, v in out.items()})
    print(isa)


if __name__ == "__main__":
    main()
