"""Determinism: the loss and its gradient are bitwise identical run to run,
across intra-op thread counts (1, 2, 8), with TensorFlow's op determinism on,
eager vs tf.function, and whatever the rows' position in the batch or the
input's address (README: "each row is reduced in a fixed order by one CPU
thread ... results are bitwise identical run to run and independent of the
thread count and of input addresses").

Thread counts must be set before TensorFlow's runtime starts, so each setting
runs `compute_hashes()` in a fresh interpreter (this file, imported after the
setting).
"""

import hashlib
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
from fused_masked_mae import core

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# Large enough that TensorFlow's ParallelFor splits the rows over the pool
# (4096 rows x 1549 classes x 8 cycles per element).
BIG_SHAPE = (64, 64, 1549)
TOKENS = [0, 2, 1548]


def make_inputs(shape, dtype, seed=0, specials=True):
    """One-hot targets (masked tokens frequent), predictions that agree with the
    target in about half the rows, and a sprinkle of NaN/inf/-0.0/ties."""
    rng = np.random.default_rng(seed)
    num_classes = shape[-1]
    ids = rng.integers(0, num_classes, size=shape[:-1])
    token_rows = rng.random(ids.shape) < 0.5
    ids[token_rows] = rng.choice(tokens_for(num_classes), size=token_rows.sum())
    y_true = np.eye(num_classes, dtype=np.float32)[ids]
    y_pred = rng.random(shape, dtype=np.float32)
    agree = rng.random(ids.shape) < 0.5
    y_pred[agree] += y_true[agree]
    if specials:
        flat = y_pred.reshape(-1)
        where = rng.integers(0, flat.size, size=flat.size // 997)
        flat[where] = rng.choice(np.array([np.nan, np.inf, -np.inf, -0.0, 1.0, 0.0], np.float32),
                                 size=where.size)
    weights = rng.normal(size=shape[:-1]).astype(np.float32)
    return (tf.constant(y_true, dtype), tf.constant(y_pred, dtype), tf.constant(weights, dtype),
            tf.constant(ids, tf.int32))


def tokens_for(num_classes):
    return [t for t in TOKENS if t < num_classes]


def loss_and_grads(y_true, y_pred, weights, ids):
    """Dense loss, d/dy_true, d/dy_pred; sparse loss, d/dy_pred (eager)."""
    tokens = tokens_for(y_pred.shape[-1])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y_true, y_pred])
        dense = fm.masked_mae_tokens(y_true, y_pred, tokens)
        sparse = fm.sparse.sparse_masked_mae_tokens(ids, y_pred, tokens)
        dense_sum = tf.reduce_sum(dense * weights)
        sparse_sum = tf.reduce_sum(sparse * weights)
    grad_t, grad_p = tape.gradient(dense_sum, [y_true, y_pred])
    return [dense, grad_t, grad_p, sparse, tape.gradient(sparse_sum, y_pred)]


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(np.ascontiguousarray(t.numpy()).tobytes())
    return h.hexdigest()


def compute_hashes():
    """{case: sha256 of every result's bytes} on fixed inputs."""
    out = {}
    for name, shape, dtype in [
        ("float32", BIG_SHAPE, tf.float32),
        ("bfloat16", BIG_SHAPE, tf.bfloat16),
        ("float64", (32, 64, 1549), tf.float64),
        ("float16-small-rows", (2, 3000, 37), tf.float16),  # many short rows
    ]:
        y_true, y_pred, weights, ids = make_inputs(shape, dtype)
        results = loss_and_grads(y_true, y_pred, weights, ids)
        # Guard against vacuous hashes: masking happened, NaN propagated.
        dense = results[0].numpy().astype(np.float64)
        assert (dense == 0).any() and (dense > 0).any() and np.isnan(dense).any(), name
        out[name] = digest(results)
    return out


def run_in_subprocess(threads, op_determinism):
    code = "\n".join([
        "import json, sys",
        "import tensorflow as tf",
        "from tensorflow.python.framework import config as tf_config",
        f"threads, op_determinism = {threads!r}, {op_determinism!r}",
        "if threads:",
        "    tf.config.threading.set_intra_op_parallelism_threads(threads)",
        "if op_determinism:",
        "    tf.config.experimental.enable_op_determinism()",
        f"sys.path.insert(0, {TESTS_DIR!r})",
        "import test_determinism",
        "hashes = test_determinism.compute_hashes()",
        "print('RESULT ' + json.dumps({",
        "    'threads': tf.config.threading.get_intra_op_parallelism_threads(),",
        "    'determinism': tf_config.is_op_determinism_enabled(),",
        "    'hashes': hashes}))",
    ])
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def parse(proc, timeout=300):
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-4000:]
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, stdout[-4000:] + stderr[-4000:]
    return json.loads(lines[0][len("RESULT "):])


def test_hashes_equal_across_thread_counts_and_op_determinism():
    settings = [(1, False), (2, False), (8, False), (0, True), (8, True)]
    results = {}
    for first in range(0, len(settings), 2):  # two at a time (a 2-core machine)
        procs = [(s, run_in_subprocess(*s)) for s in settings[first:first + 2]]
        try:
            results.update((s, parse(p)) for s, p in procs)
        finally:
            for _, p in procs:
                if p.poll() is None:
                    p.kill()
    for (threads, op_determinism), result in results.items():
        if threads:
            assert result["threads"] == threads
        assert result["determinism"] == op_determinism
    in_process = compute_hashes()
    for setting, result in results.items():
        assert result["hashes"] == in_process, f"{setting} differs from the default pool"


def test_repeated_runs_with_fresh_buffers_are_bitwise_identical():
    y_true, y_pred, weights, ids = make_inputs((16, 64, 1549), tf.float32, seed=1)
    first = digest(loss_and_grads(y_true, y_pred, weights, ids))
    for _ in range(4):
        # New tensors (new buffers) with the same values.
        copies = [tf.constant(t.numpy()) for t in (y_true, y_pred, weights, ids)]
        assert digest(loss_and_grads(*copies)) == first


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=lambda d: d.name)
def test_row_results_do_not_depend_on_position_in_batch(dtype):
    """Permuting rows permutes the results, bit for bit: a row's reduction does
    not depend on which shard or thread gets it."""
    y_true, y_pred, weights, ids = make_inputs((4096, 333), dtype, seed=2)
    perm = np.random.default_rng(0).permutation(4096)
    inverse = np.argsort(perm)
    base = loss_and_grads(y_true, y_pred, weights, ids)
    permuted = loss_and_grads(*(tf.gather(t, perm) for t in (y_true, y_pred, weights, ids)))
    for b, p in zip(base, permuted):
        assert digest([b]) == digest([tf.gather(p, inverse)])
    # And a single row computed alone is the same as in the batch.
    for row in (0, 1234, 4095):
        alone = loss_and_grads(*(t[row:row + 1] for t in (y_true, y_pred, weights, ids)))
        for b, a in zip(base, alone):
            assert digest([b[row:row + 1]]) == digest([a])


def test_tf_function_equals_eager():
    y_true, y_pred, weights, ids = make_inputs((8, 64, 1549), tf.float32, seed=3)
    eager = loss_and_grads(y_true, y_pred, weights, ids)
    graph = tf.function(loss_and_grads, autograph=False)(y_true, y_pred, weights, ids)
    assert digest(eager) == digest(graph)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float64],
                         ids=["float32", "bfloat16", "float64"])
def test_core_is_independent_of_address_and_alignment(dtype):
    y_true, y_pred, weights, ids = make_inputs((64, 333), tf.float32, seed=4)
    t, p, g = (x.numpy().astype(dtype) for x in (y_true, y_pred, weights))
    tokens = tokens_for(333)
    expected_loss = core.forward(t, p, tokens)
    expected_grad = core.gradient(t, p, g, tokens)
    assert (expected_loss.astype(np.float64) == 0).any()
    misaligned = 0
    for shift in (1, 2, 3, 5):
        # Copies that start `shift` elements into a buffer: unaligned for SIMD.
        def shifted(a):
            buf = np.empty(a.size + shift, a.dtype)
            view = buf[shift:].reshape(a.shape)
            view[...] = a
            return view

        st, sp, sg = shifted(t), shifted(p), shifted(g)
        misaligned += sp.ctypes.data % 16 != 0
        assert core.forward(st, sp, tokens).tobytes() == expected_loss.tobytes()
        assert core.gradient(st, sp, sg, tokens).tobytes() == expected_grad.tobytes()
    assert misaligned
