"""Thread safety: the ops (forward, gradient, sparse) and the TF-free core called
from 8 Python threads at once, each on its own inputs, give each thread exactly
the result it gets alone (computed sequentially first, compared bitwise)."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
from fused_masked_mae import core

NUM_THREADS = 8
ROUNDS = 4  # calls per thread in the concurrent phase

# Different shapes, dtypes and token sets per thread, so a kernel that shared
# state between calls (tokens, sizes, scratch buffers) would mix them up.
CONFIGS = [
    ((8, 32, 1549), tf.float32, [0, 1548]),
    ((4, 64, 333), tf.bfloat16, [2]),
    ((512, 37), tf.float16, [0, 1, 36]),
    ((16, 16, 700), tf.float64, [5, 699]),
    ((3, 5, 7, 129), tf.float32, []),
    ((256, 1000), tf.float32, [999, 0, 999]),
    ((2, 2048, 17), tf.bfloat16, [16]),
    ((1000, 64), tf.float64, [63, 1, 2, 3]),
]
assert len(CONFIGS) == NUM_THREADS


def make_inputs(shape, dtype, tokens, seed):
    rng = np.random.default_rng(seed)
    num_classes = shape[-1]
    ids = rng.integers(0, num_classes, size=shape[:-1])
    if tokens:
        use_token = rng.random(ids.shape) < 0.5
        ids[use_token] = rng.choice(tokens, size=use_token.sum())
    y_true = np.eye(num_classes, dtype=np.float32)[ids]
    y_pred = rng.random(shape, dtype=np.float32)
    agree = rng.random(ids.shape) < 0.5
    y_pred[agree] += y_true[agree]
    flat = y_pred.reshape(-1)
    flat[rng.integers(0, flat.size, size=flat.size // 500)] = np.nan
    weights = rng.normal(size=shape[:-1]).astype(np.float32)
    return dict(
        y_true=tf.constant(y_true, dtype), y_pred=tf.constant(y_pred, dtype),
        weights=tf.constant(weights, dtype), ids=tf.constant(ids, tf.int64), tokens=tokens,
    )


@pytest.fixture(scope="module")
def inputs():
    return [make_inputs(shape, dtype, tokens, seed) for seed, (shape, dtype, tokens)
            in enumerate(CONFIGS)]


def tf_results(case):
    """Bytes of: dense loss, dense d/dy_true and d/dy_pred, sparse loss and d/dy_pred."""
    y_true, y_pred, weights = case["y_true"], case["y_pred"], case["weights"]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y_true, y_pred])
        dense = fm.masked_mae_tokens(y_true, y_pred, case["tokens"])
        sparse = fm.sparse.sparse_masked_mae_tokens(case["ids"], y_pred, case["tokens"])
        dense_sum = tf.reduce_sum(dense * weights)
        sparse_sum = tf.reduce_sum(sparse * weights)
    results = [dense, *tape.gradient(dense_sum, [y_true, y_pred]), sparse,
               tape.gradient(sparse_sum, y_pred)]
    return [r.numpy().tobytes() for r in results]


def numpy_inputs(case):
    return (case["y_true"].numpy(), case["y_pred"].numpy(), case["weights"].numpy(),
            case["ids"].numpy())


def core_results(case):
    t, p, g, ids = numpy_inputs(case)
    tokens = case["tokens"]
    return [core.forward(t, p, tokens).tobytes(),
            core.gradient(t, p, g, tokens).tobytes(),
            core.forward(ids, p, tokens, sparse=True).tobytes(),
            core.gradient(ids, p, g, tokens, sparse=True).tobytes()]


def run_concurrently(fn, cases):
    """Each of NUM_THREADS threads computes fn(its case) ROUNDS times, all
    starting together; returns every thread's list of results."""
    barrier = threading.Barrier(len(cases))

    def worker(case):
        barrier.wait()
        return [fn(case) for _ in range(ROUNDS)]

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        return list(pool.map(worker, cases))


def check(fn, cases):
    expected = [fn(case) for case in cases]  # alone, one after the other
    # The inputs differ, so a result given to the wrong thread is caught.
    assert len({e[0] for e in expected}) == len(cases)
    for index, (want, got) in enumerate(zip(expected, run_concurrently(fn, cases))):
        for round_result in got:
            assert round_result == want, f"thread {index} ({CONFIGS[index]})"


def test_tf_ops_from_8_threads(inputs):
    check(tf_results, inputs)


def test_tf_function_from_8_threads(inputs):
    # One traced function per case, traced first, then called concurrently.
    fns = {}

    def run(case):
        key = (tuple(case["y_pred"].shape), case["y_pred"].dtype, tuple(case["tokens"]))
        return [r.numpy().tobytes() for r in fns[key](case["y_true"], case["y_pred"],
                                                      case["weights"], case["ids"])]

    for case in inputs:
        tokens = case["tokens"]

        def loss_and_grad(y_true, y_pred, weights, ids, tokens=tokens):
            with tf.GradientTape() as tape:
                tape.watch(y_pred)
                dense = fm.masked_mae_tokens(y_true, y_pred, tokens)
                sparse = fm.sparse.sparse_masked_mae_tokens(ids, y_pred, tokens)
                total = tf.reduce_sum((dense + sparse) * weights)
            return dense, sparse, tape.gradient(total, y_pred)

        key = (tuple(case["y_pred"].shape), case["y_pred"].dtype, tuple(tokens))
        fns[key] = tf.function(loss_and_grad, autograph=False)
        run(case)  # trace outside the concurrent phase
    check(run, inputs)


def test_core_from_8_threads(inputs):
    check(core_results, inputs)


@pytest.mark.parametrize("which", ["forward", "gradient"])
def test_core_releases_the_gil(which):
    """While one thread is inside core.forward / core.gradient on a large input,
    another thread keeps running Python code. (If the call held the GIL, the
    main thread would stall for the whole call.)"""
    num_classes = 1549

    def make_call(rows):
        ids = (np.arange(rows) % 3).astype(np.int32)
        y_pred = np.full((rows, num_classes), 0.25, np.float16)
        y_pred[::2, 0] = 1.0
        grad_loss = np.ones(rows, np.float16)
        if which == "forward":
            return lambda: core.forward(ids, y_pred, [0], sparse=True)
        return lambda: core.gradient(ids, y_pred, grad_loss, [0], sparse=True)

    # Grow the input until one call lasts long enough to observe a stall
    # (the kernels are fast: a fixed size would make this test skip).
    rows = 8192
    while True:
        call = make_call(rows)
        call()  # warm up
        start = time.perf_counter()
        expected = call()
        alone = time.perf_counter() - start
        if alone >= 0.1 or rows >= 262144:
            break
        rows *= 2
    assert alone >= 0.05, f"core.{which} on {rows} rows took only {alone:.3f} s"

    def max_stall_during_call():
        done = threading.Event()
        result = []

        def worker():
            result.append(call())
            done.set()

        thread = threading.Thread(target=worker)
        # The clock runs from before the thread starts to after it is done, so
        # a stall anywhere (even before the loop's first pass) is counted.
        last, stall = time.perf_counter(), 0.0
        thread.start()
        while not done.is_set():
            now = time.perf_counter()
            stall, last = max(stall, now - last), now
        stall = max(stall, time.perf_counter() - last)
        thread.join()
        assert result[0].tobytes() == expected.tobytes()
        return stall

    # A held GIL stalls the main thread for about the whole call every time; a
    # released one only for a scheduling slice. Best of 3 against load noise.
    stalls = [max_stall_during_call() for _ in range(3)]
    assert min(stalls) < 0.5 * alone, f"call alone {alone:.3f} s, main thread stalls {stalls}"
