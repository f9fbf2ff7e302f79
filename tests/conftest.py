"""Shared set-up and helpers for the fused_masked_mae test suite.

The tests import `fused_masked_mae` the way users do (the installed wheel in
CI; `PYTHONPATH=python` when run from a source build), never by a path
relative to the working directory.

Helpers are handed to tests as fixtures (`make_seq2seq`, `make_random`,
`crafted_rows`, `to_f64_fn`, `argmax_fn`), so test modules never import this
file.
"""

import os

# Before TensorFlow is imported anywhere: keep its C++ INFO/WARNING logs out of
# the test output (an explicit setting in the environment wins).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

try:
    import tensorflow as tf  # noqa: E402
except ImportError:  # a GPU machine without TensorFlow: only the TF-free tests run there
    tf = None

FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64) if tf else ()


def to_f64(x):
    """A tensor (any float dtype, bfloat16 included) as a float64 NumPy array."""
    return tf.cast(x, tf.float64).numpy()


def tf_argmax(x):
    """tf.math.argmax over the last axis, on CPU, as a NumPy int64 array."""
    with tf.device("/CPU:0"):
        return tf.math.argmax(x, axis=-1).numpy()


def seq2seq_inputs(shape, dtype, start, end, seed=0, right=0.6):
    """A seq2seq-like batch: one-hot targets `shape` with the start and end
    tokens present, and predictions whose argmax is the target's for about a
    fraction `right` of the positions (always for the first position, and for
    start/end positions among them), so the loss really masks something.

    Returns (y_true, y_pred) as tensors of `dtype`.
    """
    rng = np.random.default_rng(seed)
    classes = shape[-1]
    labels = rng.integers(0, classes, size=shape[:-1])
    flat = labels.reshape(-1)
    if end is not None:
        flat[::3] = end
    if start is not None:
        flat[1::4] = start
    correct = rng.random(flat.shape) < right
    if correct.size:
        correct[0] = True
    y_true = np.zeros(shape)
    np.put_along_axis(y_true, labels[..., None], 1.0, axis=-1)
    # Values in [0, 0.5) everywhere, + 1 at the target where the prediction is right.
    y_pred = rng.random(shape) * 0.5
    rows = y_pred.reshape(-1, classes)
    rows[correct, flat[correct]] += 1.0
    return tf.constant(y_true, dtype), tf.constant(y_pred, dtype)


def random_inputs(shape, dtype, seed=0, kind="uniform"):
    """Dense random y_true and y_pred (soft targets), as tensors of `dtype`.

    kind: "uniform" ([0, 1)), "normal" (N(0, 10^2), mixed signs and
    magnitudes) or "ties" (small integers, so argmax ties are frequent).
    """
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        values = rng.random((2,) + tuple(shape))
    elif kind == "normal":
        values = rng.normal(scale=10.0, size=(2,) + tuple(shape))
    elif kind == "ties":
        values = rng.integers(0, 4, size=(2,) + tuple(shape)).astype(np.float64)
    else:
        raise ValueError(kind)
    return tf.constant(values[0], dtype), tf.constant(values[1], dtype)


def special_rows(dtype):
    """Rows of 4 classes exercising the argmax rule: ties, NaN, +-inf, -0.0,
    all-NaN, and the dtype's lowest finite value (never a candidate).

    Returns a float64 NumPy array [rows, 4] whose values are exact in `dtype`.
    """
    nan, inf = np.nan, np.inf
    lowest = float(dtype.min)
    rows = [
        [1.0, nan, 2.0, 0.0],  # argmax 2
        [1.0, 2.0, nan, 0.0],  # 1
        [nan, 1.0, 2.0, 0.0],  # 2
        [2.0, 2.0, nan, 2.0],  # 0: first of a tie
        [nan, nan, nan, nan],  # 0: no candidate
        [-inf, -inf, -inf, -inf],  # 0
        [nan, -inf, nan, -inf],  # 0
        [-0.0, 0.0, -0.0, 0.0],  # 0: -0.0 and 0.0 tie
        [-1.0, -0.0, 0.0, -0.0],  # 1
        [inf, inf, 1.0, 0.0],  # 0
        [1.0, inf, nan, inf],  # 1
        [0.5, 0.5, 0.5, 0.5],  # 0
        [-inf, lowest, -inf, lowest],  # 0: lowest finite is no candidate
        [lowest, -inf, lowest / 2, -1.0],  # 3
        [lowest, nan, -inf, lowest],  # 0
        [-3.0, -2.0, -1.0, nan],  # 2
        [0.0, 0.0, 0.0, 1.0],  # 3
    ]
    return np.array(rows, dtype=np.float64)


@pytest.fixture
def to_f64_fn():
    return to_f64


@pytest.fixture
def make_seq2seq():
    return seq2seq_inputs


@pytest.fixture
def make_random():
    return random_inputs


@pytest.fixture
def crafted_rows():
    return special_rows


@pytest.fixture
def argmax_fn():
    return tf_argmax
