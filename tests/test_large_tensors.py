"""Inputs with more than 2^31 elements in one tensor: a kernel that computed an
element offset (row * C + j) in 32 bits would read or write the wrong rows (or
crash) past element 2^31. Every row is compared with the same rows computed in
a small tensor.

y_pred is a [R, C] bfloat16 tensor (4 GiB) that repeats a block of K rows with
ties, NaN, inf and masked rows, so the expected loss of *every* row is known
from the block. Peak memory is y_pred plus the 4 GiB gradient (or the 4 GiB
dense y_true): about 9 GiB with TensorFlow. Each test skips when
/proc/meminfo's MemAvailable is short of what it needs.
"""

import gc

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
from fused_masked_mae import core
from raw_ops import raw_sparse_grad

pytestmark = pytest.mark.slow

GIB = 2**30
NUM_CLASSES = 1549
BLOCK_ROWS = 64
# Enough rows for element 2^31, and 16 blocks beyond it.
REPEATS = -(-(2**31 // NUM_CLASSES + 1) // BLOCK_ROWS) + 16
ROWS = BLOCK_ROWS * REPEATS
ELEMENTS = ROWS * NUM_CLASSES
TENSOR_GIB = ELEMENTS * 2 / GIB  # bfloat16
TOKENS = [0, 7, NUM_CLASSES - 1]
# The row holding element 2^31, and its neighbours.
BOUNDARY_ROWS = [2**31 // NUM_CLASSES + k for k in (-2, -1, 0, 1, 2)]

assert ELEMENTS > 2**31 and BOUNDARY_ROWS[-1] < ROWS


def mem_available_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    return 0.0


def require_memory(gib, what):
    gc.collect()
    available = mem_available_gib()
    if available < gib:
        pytest.skip(f"{what} needs about {gib:.1f} GiB free, MemAvailable is {available:.1f} GiB")


def make_block():
    """K rows of y_pred (float32 values), their ids and upstream gradients."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, NUM_CLASSES, size=BLOCK_ROWS)
    ids[::3] = rng.choice(TOKENS, size=len(ids[::3]))
    y_pred = rng.random((BLOCK_ROWS, NUM_CLASSES), dtype=np.float32)
    agree = np.arange(BLOCK_ROWS) % 2 == 0
    y_pred[agree, ids[agree]] = 2.0  # prediction argmax == target: masked if a token
    y_pred[1, 5] = np.nan
    y_pred[3, ids[3]] = np.inf  # masked row with infinite MAE: NaN loss
    ids[3] = TOKENS[0]
    y_pred[3, TOKENS[0]] = np.inf
    y_pred[5, :] = -np.inf  # no argmax candidate: argmax 0
    y_pred[9, [0, 10]] = 3.0  # tie: the first index wins
    y_pred[11, :7] = -0.0
    y_pred[13, NUM_CLASSES - 1] = 5.0
    weights = rng.normal(size=BLOCK_ROWS).astype(np.float32)
    return ids.astype(np.int32), y_pred, weights


def bits(x):
    x = x.numpy() if tf.is_tensor(x) else np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


@pytest.fixture(scope="module")
def block():
    ids, y_pred, weights = make_block()
    ids = tf.constant(ids)
    y_pred = tf.constant(y_pred, tf.bfloat16)
    weights = tf.constant(weights, tf.bfloat16)
    loss = fm.sparse.sparse_masked_mae_tokens(ids, y_pred, TOKENS)
    grad = raw_sparse_grad(
        y_true_ids=ids, y_pred=y_pred, grad_loss=weights, masked_tokens=TOKENS)
    # The block itself is right (against the composite reference) and not trivial.
    values = tf.cast(loss, tf.float64).numpy()
    expected = tf.cast(fm.reference_sparse_masked_mae(ids, y_pred, tokens=TOKENS),
                       tf.float64).numpy()
    np.testing.assert_array_equal(np.isnan(values), np.isnan(expected))
    np.testing.assert_array_equal(values == 0, expected == 0)
    finite = ~np.isnan(expected)
    np.testing.assert_allclose(values[finite], expected[finite], rtol=1.6e-2)
    assert (values == 0).any() and (values > 0).any() and np.isnan(values).any()
    return dict(ids=ids, y_pred=y_pred, weights=weights, loss=loss, grad=grad)


@pytest.fixture(scope="module")
def big(block):
    """The block repeated to ROWS rows: y_pred [ROWS, C] bfloat16 (4 GiB)."""
    require_memory(TENSOR_GIB + 1.0, "a [%d, %d] bfloat16 y_pred" % (ROWS, NUM_CLASSES))
    tensors = dict(
        ids=tf.tile(block["ids"], [REPEATS]),
        y_pred=tf.tile(block["y_pred"], [REPEATS, 1]),
        weights=tf.tile(block["weights"], [REPEATS]),
    )
    assert tensors["y_pred"].shape.num_elements() == ELEMENTS
    yield tensors
    tensors.clear()
    gc.collect()


def rows_to_check():
    rng = np.random.default_rng(1)
    rows = np.concatenate([
        np.arange(BLOCK_ROWS), BOUNDARY_ROWS, np.arange(ROWS - BLOCK_ROWS, ROWS),
        rng.integers(0, ROWS, size=2000),
    ])
    return rows.astype(np.int64)


def test_sparse_forward_beyond_2_31_elements(block, big):
    loss = fm.sparse.sparse_masked_mae_tokens(big["ids"], big["y_pred"], TOKENS)
    assert loss.shape == (ROWS,)
    # Every row, first to last, is bit for bit the row's loss in the small block.
    np.testing.assert_array_equal(bits(loss).reshape(REPEATS, BLOCK_ROWS),
                                  np.broadcast_to(bits(block["loss"]), (REPEATS, BLOCK_ROWS)))
    # And the first and last rows equal the op on just those rows, sliced out.
    for rows in (slice(0, BLOCK_ROWS), slice(ROWS - BLOCK_ROWS, ROWS)):
        alone = fm.sparse.sparse_masked_mae_tokens(big["ids"][rows], big["y_pred"][rows], TOKENS)
        np.testing.assert_array_equal(bits(loss[rows]), bits(alone))


def test_sparse_gradient_beyond_2_31_elements(block, big):
    require_memory(TENSOR_GIB + 0.5, "the [%d, %d] gradient" % (ROWS, NUM_CLASSES))
    grad = raw_sparse_grad(
        y_true_ids=big["ids"], y_pred=big["y_pred"], grad_loss=big["weights"],
        masked_tokens=TOKENS)
    assert grad.shape == (ROWS, NUM_CLASSES)
    # The first and last rows, the rows around element 2^31 and 2000 random
    # rows are bit for bit the rows of the block's gradient.
    rows = rows_to_check()
    np.testing.assert_array_equal(bits(tf.gather(grad, rows)),
                                  bits(tf.gather(block["grad"], rows % BLOCK_ROWS)))
    # And the first and last rows equal the op on just those rows, sliced out.
    for rows in (slice(0, BLOCK_ROWS), slice(ROWS - BLOCK_ROWS, ROWS)):
        alone = raw_sparse_grad(
            y_true_ids=big["ids"][rows], y_pred=big["y_pred"][rows],
            grad_loss=big["weights"][rows], masked_tokens=TOKENS)
        np.testing.assert_array_equal(bits(grad[rows]), bits(alone))
    assert (bits(block["grad"]) != 0).any()


def test_dense_forward_beyond_2_31_elements(block, big):
    require_memory(TENSOR_GIB + 0.5, "a [%d, %d] bfloat16 y_true" % (ROWS, NUM_CLASSES))
    y_true = tf.tile(tf.one_hot(block["ids"], NUM_CLASSES, dtype=tf.bfloat16), [REPEATS, 1])
    loss = fm.masked_mae_tokens(y_true, big["y_pred"], TOKENS)
    first = fm.masked_mae_tokens(y_true[:BLOCK_ROWS], big["y_pred"][:BLOCK_ROWS], TOKENS)
    last = fm.masked_mae_tokens(y_true[-BLOCK_ROWS:], big["y_pred"][-BLOCK_ROWS:], TOKENS)
    del y_true
    gc.collect()
    # The dense loss on one_hot(ids) is the sparse loss, bit for bit.
    np.testing.assert_array_equal(bits(loss).reshape(REPEATS, BLOCK_ROWS),
                                  np.broadcast_to(bits(block["loss"]), (REPEATS, BLOCK_ROWS)))
    np.testing.assert_array_equal(bits(loss[:BLOCK_ROWS]), bits(first))
    np.testing.assert_array_equal(bits(loss[-BLOCK_ROWS:]), bits(last))


def test_core_forward_beyond_2_31_elements(block):
    """The TF-free core on NumPy arrays, dense and sparse. np.zeros maps pages
    lazily, so the zero rows cost no memory; only the rows written are real."""
    require_memory(1.0, "core.forward on lazily zeroed arrays")
    ids = np.zeros(ROWS, np.int32)
    y_pred = np.zeros((ROWS, NUM_CLASSES), ml_dtypes.bfloat16)
    y_true = np.zeros((ROWS, NUM_CLASSES), ml_dtypes.bfloat16)
    block_ids, block_pred = block["ids"].numpy(), block["y_pred"].numpy()
    ends = np.r_[0:BLOCK_ROWS, ROWS - BLOCK_ROWS:ROWS]
    for start in (0, ROWS - BLOCK_ROWS):
        ids[start:start + BLOCK_ROWS] = block_ids
        y_pred[start:start + BLOCK_ROWS] = block_pred
        y_true[start:start + BLOCK_ROWS] = np.eye(NUM_CLASSES, dtype=ml_dtypes.bfloat16)[block_ids]
    ids[BLOCK_ROWS:ROWS - BLOCK_ROWS] = 5  # an unmasked id: zero rows cost 1/C
    y_true[BOUNDARY_ROWS, 5] = 1.0
    ids[BOUNDARY_ROWS] = 5
    zero_row = core.forward(np.array([5], np.int32), np.zeros((1, NUM_CLASSES), y_pred.dtype),
                            TOKENS, sparse=True)
    assert bits(zero_row)[0] != 0
    sparse = core.forward(ids, y_pred, TOKENS, sparse=True)
    dense = core.forward(y_true, y_pred, TOKENS)
    for loss in (sparse, dense):
        assert loss.shape == (ROWS,)
        np.testing.assert_array_equal(bits(loss[ends]), np.tile(bits(block["loss"]), 2))
    # The middle rows are zero rows with id 5: 1/C each in the sparse loss; in
    # the dense loss only the rows around element 2^31 have a one-hot target
    # (the others are all zero: MAE 0).
    middle = slice(BLOCK_ROWS, ROWS - BLOCK_ROWS)
    np.testing.assert_array_equal(np.unique(bits(sparse[middle])), bits(zero_row))
    expected_dense = np.zeros(ROWS, np.uint16)
    expected_dense[BOUNDARY_ROWS] = bits(zero_row)[0]
    np.testing.assert_array_equal(bits(dense[middle]), expected_dense[middle])
