"""The fused op against the composite Keras-ops reference (the parity oracle)."""

import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
import numpy_reference

DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]
# Relative tolerance of the loss per dtype. float32/float64: only the summation
# order differs (16 fixed lanes vs Eigen's). float16/bfloat16: the reference
# computes |p - t| and the mean in the low dtype, we accumulate in float32.
RTOL = {tf.float16: 2e-3, tf.bfloat16: 1.6e-2, tf.float32: 2e-6, tf.float64: 1e-13}
SHAPES = [(7,), (5, 1), (4, 9), (3, 5, 17), (2, 3, 4, 6), (2, 3, 1549), (2, 32000)]


def seq2seq_batch(shape, dtype, start, end, seed=0):
    """One-hot targets with start/end tokens, predictions right about half the time."""
    rng = np.random.default_rng(seed)
    classes = shape[-1]
    labels = rng.integers(0, classes, size=shape[:-1])
    flat = labels.reshape(-1)
    flat[::3] = end
    flat[1::5] = start
    right = rng.random(flat.shape) < 0.6
    right[0] = True
    y_true = np.zeros(shape)
    np.put_along_axis(y_true, labels[..., None], 1.0, axis=-1)
    y_pred = rng.random(shape) * 0.5
    y_pred.reshape(-1, classes)[right, flat[right]] += 1.0  # argmax where right
    return tf.constant(y_true, dtype), tf.constant(y_pred, dtype)


def f64(x):
    return tf.cast(x, tf.float64).numpy()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype):
    start, end = 0, shape[-1] - 1
    y_true, y_pred = seq2seq_batch(shape, dtype, start, end)
    fused = fm.masked_mae(y_true, y_pred, start, end)
    expected = fm.reference_masked_mae(y_true, y_pred, start, end)
    assert fused.shape == shape[:-1] and fused.dtype == dtype
    np.testing.assert_allclose(f64(fused), f64(expected), rtol=RTOL[dtype], atol=0)
    # The mask itself is exact: the same positions cost nothing.
    np.testing.assert_array_equal(f64(fused) == 0, f64(expected) == 0)
    if shape[-1] > 1:
        assert (f64(fused) == 0).any(), "no position was masked: the test would prove nothing"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_random_dense_targets(dtype):
    rng = np.random.default_rng(5)
    y_true = tf.constant(rng.random((6, 7, 33)), dtype)
    y_pred = tf.constant(rng.random((6, 7, 33)), dtype)
    for start, end in ((0, 32), (None, 5), (3, None), (None, None)):
        np.testing.assert_allclose(f64(fm.masked_mae(y_true, y_pred, start, end)),
                                   f64(fm.reference_masked_mae(y_true, y_pred, start, end)),
                                   rtol=RTOL[dtype])


def test_none_tokens_mask_nothing():
    y_true, y_pred = seq2seq_batch((4, 6, 11), tf.float32, 0, 10)
    unmasked = fm.masked_mae(y_true, y_pred, None, None)
    plain_mae = tf.reduce_mean(tf.abs(y_pred - y_true), axis=-1)
    np.testing.assert_allclose(unmasked.numpy(), plain_mae.numpy(), rtol=2e-6)
    only_end = fm.masked_mae(y_true, y_pred, None, 10)
    np.testing.assert_allclose(only_end.numpy(),
                               fm.reference_masked_mae(y_true, y_pred, None, 10).numpy(),
                               rtol=2e-6)


def test_equal_start_and_end_is_one_token():
    y_true, y_pred = seq2seq_batch((4, 6, 11), tf.float32, 3, 3)
    loss = fm.masked_mae(y_true, y_pred, 3, 3)
    assert (loss.numpy() >= 0).all()
    np.testing.assert_array_equal(loss.numpy(), fm.masked_mae(y_true, y_pred, 3, None).numpy())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_crafted_rows_ties_nan_inf_negative_zero(dtype):
    rows = numpy_reference.crafted_rows()
    y_true = np.repeat(rows, len(rows), axis=0)
    y_pred = np.tile(rows, (len(rows), 1))
    t, p = tf.constant(y_true, dtype), tf.constant(y_pred, dtype)
    for start, end in ((0, 3), (1, 2), (0, None)):
        fused = f64(fm.masked_mae(t, p, start, end))
        expected = f64(fm.reference_masked_mae(t, p, start, end))
        np.testing.assert_array_equal(np.isnan(fused), np.isnan(expected))
        finite = ~np.isnan(expected)
        np.testing.assert_allclose(fused[finite], expected[finite], rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_masking_happens_exactly_where_tf_argmax_agrees(dtype):
    """Direct check of the argmax rule: one-hot targets at every class; the
    position is masked iff tf.math.argmax(y_pred) is that class."""
    rows = numpy_reference.crafted_rows()
    classes = rows.shape[-1]
    y_pred = tf.constant(np.repeat(rows, classes, axis=0), dtype)
    targets = np.tile(np.arange(classes), len(rows))
    y_true = tf.one_hot(targets, classes, dtype=dtype)
    agrees = tf.math.argmax(y_pred, axis=-1).numpy() == targets
    # The plain MAE tells a masked position apart where it is non-zero and not
    # NaN: masked gives 0 (or 0 * inf = NaN), unmasked gives the MAE itself.
    plain = f64(fm.masked_mae_tokens(y_true, y_pred, []))
    known = ~np.isnan(plain) & (plain != 0)
    assert known.sum() > len(rows)
    for tokens, maskable in (([0], targets == 0), (list(range(classes)), True)):
        loss = f64(fm.masked_mae_tokens(y_true, y_pred, tokens))
        masked = np.where(np.isinf(plain), np.isnan(loss), loss == 0)
        np.testing.assert_array_equal(masked[known], (agrees & maskable)[known])


def test_graph_mode_matches_eager():
    y_true, y_pred = seq2seq_batch((3, 4, 20), tf.float32, 1, 19)
    graph = tf.function(lambda t, p: fm.masked_mae(t, p, 1, 19))
    np.testing.assert_array_equal(graph(y_true, y_pred).numpy(),
                                  fm.masked_mae(y_true, y_pred, 1, 19).numpy())
    unknown = tf.function(
        lambda t, p: fm.masked_mae(t, p, 1, 19),
        input_signature=[tf.TensorSpec(None, tf.float32), tf.TensorSpec(None, tf.float32)],
    )
    np.testing.assert_array_equal(unknown(y_true, y_pred).numpy(),
                                  fm.masked_mae(y_true, y_pred, 1, 19).numpy())
    assert unknown.get_concrete_function().structured_outputs.shape.rank is None


def test_deterministic_and_thread_count_independent():
    y_true, y_pred = seq2seq_batch((16, 64, 1549), tf.float32, 0, 1548)
    first = fm.masked_mae(y_true, y_pred, 0, 1548).numpy().tobytes()
    for _ in range(5):
        assert fm.masked_mae(y_true, y_pred, 0, 1548).numpy().tobytes() == first
