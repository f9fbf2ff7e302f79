"""The TensorFlow-free core on NumPy arrays: against a NumPy statement of the
loss, and bit for bit against the TensorFlow CPU kernel (same row code)."""

import importlib.util

import ml_dtypes
import numpy as np
import pytest

import numpy_reference as ref
from fused_masked_mae import _core, core

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]
# Loss tolerance against the float64 NumPy statement: our accumulation is in
# float32 (float64 for float64), rounded once to the dtype.
LOSS_RTOL = {np.float16: 1e-3, ml_dtypes.bfloat16: 8e-3, np.float32: 2e-6, np.float64: 1e-12}
HAVE_TF = importlib.util.find_spec("tensorflow") is not None


def assert_same(actual, expected):
    """Equal values, NaN where NaN (compared in float64: ml_dtypes' bfloat16 is
    not NaN-aware in assert_array_equal)."""
    np.testing.assert_array_equal(
        np.asarray(actual).astype(np.float64), np.asarray(expected).astype(np.float64)
    )


def make_inputs(shape, dtype, tokens, seed=0):
    """One-hot targets (tokens frequent) and predictions that often agree."""
    rng = np.random.default_rng(seed)
    num_classes = shape[-1]
    labels = rng.integers(0, num_classes, size=shape[:-1])
    if tokens:
        use_token = rng.random(shape[:-1]) < 0.5
        labels = np.where(use_token, rng.choice(tokens, size=shape[:-1]), labels)
    agree = rng.random(shape[:-1]) < 0.5
    if tokens:  # at least one masked position: the first, a correctly predicted token
        labels.flat[0], agree.flat[0] = tokens[0], True
    y_true = np.eye(num_classes)[labels]
    y_pred = rng.random(shape)
    y_pred = np.where(agree[..., None], y_pred * 0.5 + y_true, y_pred)
    return y_true.astype(dtype), y_pred.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(5,), (3, 1), (4, 7), (2, 3, 33), (2, 2, 2, 16), (3, 1549)])
def test_forward_and_gradient_match_numpy(shape, dtype):
    tokens = [0, shape[-1] - 1]
    y_true, y_pred = make_inputs(shape, dtype, tokens)
    loss = core.forward(y_true, y_pred, tokens)
    expected = ref.loss(y_true, y_pred, tokens)
    assert loss.shape == shape[:-1] and loss.dtype == np.dtype(dtype)
    np.testing.assert_allclose(
        loss.astype(np.float64), expected.astype(np.float64), rtol=LOSS_RTOL[dtype], atol=0
    )
    # Masked positions are exactly zero in both.
    np.testing.assert_array_equal(loss == 0, expected == 0)
    assert (ref.keep_factor(y_true, y_pred, tokens) == 0).any()

    grad_loss = np.random.default_rng(1).normal(size=shape[:-1]).astype(dtype)
    grad = core.gradient(y_true, y_pred, grad_loss, tokens)
    # The row factor and the signs are exact, so the gradient is too.
    assert_same(grad, ref.gradient(y_true, y_pred, grad_loss, tokens))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_crafted_rows_follow_tf_argmax(dtype):
    rows = ref.crafted_rows().astype(dtype)
    # Every pair of crafted rows, so NaN/inf/ties meet in both inputs.
    y_true = np.repeat(rows, len(rows), axis=0)
    y_pred = np.tile(rows, (len(rows), 1))
    for tokens in ([0], [1, 2], [0, 1, 2, 3]):
        loss = core.forward(y_true, y_pred, tokens)
        expected = ref.loss(y_true, y_pred, tokens)
        np.testing.assert_array_equal(np.isnan(loss), np.isnan(expected))
        finite = ~np.isnan(expected)
        np.testing.assert_allclose(
            loss[finite].astype(np.float64), expected[finite].astype(np.float64),
            rtol=LOSS_RTOL[dtype],
        )
        ones = np.ones(len(y_true), dtype)
        assert_same(core.gradient(y_true, y_pred, ones, tokens),
                    ref.gradient(y_true, y_pred, ones, tokens))


def test_lowest_finite_is_per_dtype():
    # float64 [-inf, -FLT_MAX] has a candidate (index 1); float32 has none (index 0).
    # The MAE is inf, so a masked position gives keep * inf = 0 * inf = NaN
    # (as in the reference), an unmasked one inf.
    row = np.array([[-np.inf, -np.finfo(np.float32).max]])
    one_hot_1 = np.array([[0.0, 1.0]])
    assert np.isnan(core.forward(one_hot_1, row, [1])[0])
    assert np.isinf(core.forward(one_hot_1.astype(np.float32), row.astype(np.float32), [1])[0])


def test_empty_batch():
    y = np.zeros((0, 3, 5), np.float32)
    assert core.forward(y, y, [1]).shape == (0, 3)
    assert core.gradient(y, y, np.zeros((0, 3), np.float32), [1]).shape == (0, 3, 5)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: _core.forward(np.zeros((2, 3)), np.zeros((3, 3))), ValueError,
         r"same shape, got y_true \[2, 3\] and y_pred \[3, 3\]"),
        (lambda: _core.forward(np.array(1.0), np.array(1.0)), ValueError, "rank >= 1"),
        (lambda: _core.forward(np.zeros((2, 0)), np.zeros((2, 0))), ValueError, "must be positive"),
        (lambda: _core.forward(np.zeros((2, 3)), np.zeros((2, 3)), [3]), ValueError,
         r"token id 3 is outside \[0, 3\)"),
        (lambda: _core.forward(np.zeros((2, 3)), np.zeros((2, 3)), [-1]), ValueError,
         "token id -1"),
        (lambda: _core.forward(np.zeros((2, 3), np.int32), np.zeros((2, 3), np.int32)), TypeError,
         "int32"),
        (lambda: _core.forward(np.zeros((2, 3), np.float32), np.zeros((2, 3))), TypeError,
         "float32"),
        (lambda: _core.forward(np.zeros((2, 6))[:, ::2], np.zeros((2, 6))[:, ::2]), ValueError,
         "C-contiguous"),
        (lambda: _core.forward(np.zeros((1, 300)), np.zeros((1, 300)), list(range(257))),
         ValueError, "at most 256 masked tokens are supported, got 257"),
        (lambda: _core.gradient(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((3,))), ValueError,
         r"grad_loss must have the shape of the loss \[2\], got \[3\]"),
        (lambda: _core.gradient(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2,)),
                                row_keep=np.ones((3,), np.uint8)), ValueError,
         r"row_keep must have the shape of the loss \[2\], got \[3\]"),
        (lambda: _core.gradient(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2,)),
                                row_keep=np.ones((2,), np.int32)), TypeError,
         r"row_keep has dtype int32, expected uint8"),
        (lambda: _core.gradient(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2,)), [0],
                                row_keep=np.ones((2,), np.uint8)), ValueError,
         r"pass masked_tokens or row_keep, not both"),
    ],
)
def test_bad_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_gradient_from_the_forwards_keep_bytes_equals_the_gradient_from_tokens():
    y_true, y_pred = make_inputs((6, 9, 33), np.float32, [0, 32], seed=5)
    grad_loss = np.random.default_rng(1).normal(size=(6, 9)).astype(np.float32)
    loss, row_keep = core.forward(y_true, y_pred, [0, 32], return_keep=True)
    assert row_keep.dtype == np.uint8 and row_keep.shape == loss.shape
    assert set(np.unique(row_keep)) == {0, 1}
    np.testing.assert_array_equal(row_keep == 0, ref.loss(y_true, y_pred, [0, 32]) == 0)
    assert_same(core.gradient(y_true, y_pred, grad_loss, row_keep=row_keep),
                core.gradient(y_true, y_pred, grad_loss, [0, 32]))


def test_misaligned_rows_are_read_correctly():
    # A view that starts 4 bytes into its buffer: contiguous but not 16-byte aligned.
    buf = np.random.default_rng(0).random(1 + 6 * 9).astype(np.float32)
    y_pred = buf[1:].reshape(6, 9)
    assert y_pred.ctypes.data % 16 != 0
    y_true = np.eye(9, dtype=np.float32)[[0, 1, 2, 3, 4, 8]]
    np.testing.assert_allclose(core.forward(y_true, y_pred, [8]), ref.loss(y_true, y_pred, [8]),
                               rtol=2e-6)


@pytest.mark.skipif(not HAVE_TF, reason="TensorFlow is not installed")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_core_equals_tensorflow_kernel_bit_for_bit(dtype):
    import tensorflow as tf

    import fused_masked_mae as fm

    tokens = [0, 1548]
    y_true, y_pred = make_inputs((4, 8, 1549), dtype, tokens, seed=3)
    crafted = ref.crafted_rows().astype(dtype)
    tf_dtype = tf.as_dtype(np.dtype(dtype))
    # The CPU core against the op's CPU kernel: pinned, or TensorFlow would
    # place the op on a GPU where it sees one (whose sums run in another order).
    with tf.device("/CPU:0"):
        fused = fm.masked_mae_tokens(tf.constant(y_true, tf_dtype), tf.constant(y_pred, tf_dtype),
                                     tokens)
        fused_crafted = fm.masked_mae_tokens(
            tf.constant(np.roll(crafted, 1, axis=0), tf_dtype), tf.constant(crafted, tf_dtype),
            [0, 1])
    assert fused.device.endswith("CPU:0") and fused_crafted.device.endswith("CPU:0"), fused.device
    assert_same(core.forward(y_true, y_pred, tokens), fused.numpy())
    assert_same(core.forward(np.roll(crafted, 1, axis=0), crafted, [0, 1]), fused_crafted.numpy())


@pytest.mark.skipif(not _core.WITH_CUDA, reason="_core was built without CUDA")
def test_device_entry_rejects_shapes_before_touching_memory():
    # Null pointers: any launch would fault, so these must fail in validation.
    huge = [2**40, 2**40]  # 2^80 elements: overflows int64
    with pytest.raises(ValueError, match=r"more than 2\^63 elements"):
        _core.cuda_forward(0, 0, 0, huge, "float32", [], 0)
    with pytest.raises(ValueError, match="must be positive"):
        _core.cuda_forward(0, 0, 0, [4, 0], "float32", [], 0)
    with pytest.raises(ValueError, match="negative dimension"):
        _core.cuda_gradient(0, 0, 0, 0, 0, [-1, 3], "float32", 0)
    with pytest.raises(ValueError, match="row_keep is a null device pointer"):
        _core.cuda_gradient(8, 8, 0, 8, 8, [2, 3], "float32", 0)
    with pytest.raises(ValueError, match=r"token id 3 is outside \[0, 3\)"):
        _core.cuda_forward(0, 0, 0, [2, 3], "float32", [3], 0)
    with pytest.raises(ValueError, match="null device pointer"):
        _core.cuda_forward(0, 0, 0, [2, 3], "float32", [], 0)
    with pytest.raises(TypeError, match="int8"):
        _core.cuda_forward(8, 8, 8, [2, 3], "int8", [], 0)
    with pytest.raises(TypeError, match="id_dtype"):
        _core.cuda_forward(8, 8, 8, [2, 3], "float32", [], 0, "float32")
