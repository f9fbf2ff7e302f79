"""Thread safety: the ops (forward, gradient, sparse) and the TF-free core called
from 8 Python threads at once, each on its own inputs, give each thread exactly
the result it gets alone (computed sequentially first, compared bitwise)."""

import random
import sys
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


# Inputs of the GIL test grow until one call lasts this long, or until they
# take this many bytes: then the call is as long as this machine makes it.
GIL_TEST_TARGET_SECONDS = 0.2
GIL_TEST_MAX_INPUT_BYTES = 1 << 30


def time_call(call):
    """(result, seconds) of one call after a warm-up call (page faults, caches)."""
    call()
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def held_gil_verdict(call, alone, expected):
    """Runs call() in a second thread 5 times while the main thread spins, and
    returns (held, ratios): each ratio is the main thread's longest stall
    during one try over the duration of that same call, measured inside the
    worker; held is True when every try stalled the main thread for at least
    half its call. A held GIL stalls it for the whole call (ratio about 1 or
    more); a released one only for a switch interval or an OS scheduling
    slice, whatever the call's length, because Python's switch interval is set
    to a small fraction of the call (`alone`) for the measurement. Judging each
    try by its own call keeps the verdict right when load changes the call's
    length from try to try."""

    def stall_ratio_during_call():
        done = threading.Event()
        result = []

        def worker():
            begin = time.perf_counter()
            result.append(call())
            result.append(time.perf_counter() - begin)
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
        value, duration = result
        expected(value)
        return stall / duration

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(min(old_interval, alone / 50))
    try:
        ratios = [stall_ratio_during_call() for _ in range(5)]  # best of 5: load noise
    finally:
        sys.setswitchinterval(old_interval)
    return min(ratios) >= 0.5, ratios


@pytest.mark.parametrize("which", ["forward", "gradient"])
def test_core_releases_the_gil(which):
    """While one thread is inside core.forward / core.gradient on a large input,
    another thread keeps running Python code. Nothing here depends on how fast
    the machine is: the stall is judged against the call's own duration."""
    # Short rows (C = 4): each row has a fixed cost besides its bytes, so a
    # call is long for its memory on any CPU.
    num_classes = 4

    def make_call(rows):
        ids = (np.arange(rows) % 3).astype(np.int32)
        y_pred = np.full((rows, num_classes), 0.25, np.float32)
        y_pred[::2, 0] = 1.0
        grad_loss = np.ones(rows, np.float32)
        if which == "forward":
            return lambda: core.forward(ids, y_pred, [0], sparse=True)
        return lambda: core.gradient(ids, y_pred, grad_loss, [0], sparse=True)

    def footprint(rows):  # ids, y_pred, grad_loss and the largest output
        return rows * (4 + 2 * 4 * num_classes + 4)

    rows = 1 << 16
    while True:
        call = make_call(rows)
        want, alone = time_call(call)
        if alone >= GIL_TEST_TARGET_SECONDS or footprint(2 * rows) > GIL_TEST_MAX_INPUT_BYTES:
            break
        rows *= 2

    def same_bytes(result):
        assert result.tobytes() == want.tobytes()

    held, ratios = held_gil_verdict(call, alone, same_bytes)
    assert not held, (f"core.{which} on {rows} rows (alone {alone:.4f} s): main thread stalls "
                      f"over call durations {ratios}")


def test_gil_verdict_catches_a_call_that_holds_the_gil():
    """The detector above can fail: sorting a list of ints runs in C with the
    GIL held and no bytecode in between, like a kernel that forgot to release it."""
    values = list(range(200_000))
    random.Random(0).shuffle(values)  # a sorted or reversed list would be one O(n) pass
    call = lambda: sorted(values)  # noqa: E731
    want, alone = time_call(call)
    while alone < 0.02:
        values = values * 2
        want, alone = time_call(call)

    def same_list(result):
        assert result == want

    held, ratios = held_gil_verdict(call, alone, same_list)
    assert held, f"sorted() (alone {alone:.4f} s): main thread stalls over call durations {ratios}"
