"""The fused masked cross-entropy (MaskedCrossentropy, SparseMaskedCrossentropy).

Held to the composite of plain ops (`reference_masked_crossentropy`: the
masked MAE's cond times Keras' own categorical_crossentropy), to a NumPy
statement in float64 (tests/numpy_reference.py), and its deterministic exp/log
to NumPy over the float32 range. Values agree to float rounding (our exp/log
and summation order are not TensorFlow's), the mask bit for bit; gradients to
float rounding and by tf.test.compute_gradient in float64.
"""

import os
import tempfile

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
import numpy_reference as ref
from fused_masked_mae import _core
from fused_masked_mae._loader import ops_library

DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
# Relative tolerance of the loss and gradient against the composite, per dtype
# (the composite rounds every op to the dtype; we accumulate in float32).
RTOL = {tf.float16: 2e-2, tf.bfloat16: 8e-2, tf.float32: 2e-5, tf.float64: 1e-6}
START, END = 1, 5


def inputs(shape, dtype, from_logits, seed=0, tokens=(START, END), right=0.5):
    """One-hot targets with the tokens present, and predictions (logits, or
    their softmax) right at the target for about a fraction `right`."""
    rng = np.random.default_rng(seed)
    classes = shape[-1]
    labels = rng.integers(0, classes, size=shape[:-1])
    flat = labels.reshape(-1)
    for k, token in enumerate(tokens):
        if token < classes:
            flat[k::3] = token
    logits = rng.normal(scale=2.0, size=shape)
    right_mask = rng.random(labels.shape) < right
    np.put_along_axis(logits, labels[..., None],
                      np.where(right_mask, 8.0, logits.min() - 1)[..., None], axis=-1)
    y_pred = tf.constant(logits, dtype)
    if not from_logits:
        y_pred = tf.cast(tf.nn.softmax(tf.cast(y_pred, tf.float64)), dtype)
    return tf.one_hot(labels, classes, dtype=dtype), tf.constant(labels), y_pred


def f64(x):
    return tf.cast(x, tf.float64).numpy()


def assert_masked_exactly(got, want, t_argmax, y_pred, dtype):
    """Masked positions (cond 0, from tf.math.argmax) cost exactly 0; in
    float32/float64 the loss is 0 exactly where the composite's is."""
    p_argmax = tf.math.argmax(y_pred, axis=-1).numpy()
    masked = (t_argmax == p_argmax) & np.isin(t_argmax, [START, END])
    assert masked.any() and not masked.all()
    assert np.all(f64(got)[masked] == 0)
    if dtype in (tf.float32, tf.float64):
        assert np.array_equal(f64(got) == 0, f64(want) == 0)


def assert_close(got, want, dtype, scale=None):
    got, want = f64(got), f64(want)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    scale = np.abs(want[finite]).max(initial=1.0) if scale is None else scale
    np.testing.assert_allclose(got[finite], want[finite], rtol=RTOL[dtype],
                               atol=RTOL[dtype] * scale)


# --- the deterministic exp/log -------------------------------------------------------------


def ulp_error_f32(got, x, fn):
    """|got - fn(x)| in ulps of the float32 result (fn in float64); results
    that overflow float32 must be inf exactly."""
    with np.errstate(all="ignore"):
        want = fn(x.astype(np.float64))
        rounded = want.astype(np.float32)
        same = (np.isnan(got) & np.isnan(want)) | (got.astype(np.float64) == want) | \
            (np.isinf(rounded) & (got == rounded))
        ulp = np.spacing(np.abs(rounded)).astype(np.float64)
        ulp = np.where((ulp == 0) | ~np.isfinite(ulp), np.float64(np.spacing(np.float32(0))),
                       ulp)
        err = np.abs(got.astype(np.float64) - want) / ulp
    return np.where(same, 0.0, np.where(np.isnan(err), np.inf, err))


def test_det_exp_log_float32_over_the_whole_range():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        np.linspace(-110, 95, 400_001, dtype=np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, 88.72283, 88.72284, -87.33655,
                  -103.97208, -103.97209, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38],
                 np.float32)])
    e, lg = _core.det_exp_log(x)
    assert e.dtype == lg.dtype == np.float32
    exp_err, log_err = ulp_error_f32(e, x, np.exp), ulp_error_f32(lg, x, np.log)
    # Within 2 ulp of the float64 result everywhere, denormal results included
    # (measured here: below 1 ulp for both).
    assert exp_err.max() <= 2.0, x[np.argmax(exp_err)]
    assert log_err.max() <= 2.0, x[np.argmax(log_err)]
    with np.errstate(all="ignore"):
        assert np.array_equal(np.isnan(e), np.isnan(np.exp(x)))
        assert np.array_equal(np.isnan(lg), np.isnan(np.log(x)))
        assert np.array_equal(np.isinf(e), np.isinf(np.exp(x.astype(np.float64)).astype(
            np.float32)))
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, -1.0, 100.0, -200.0], np.float32)
    e, lg = _core.det_exp_log(special)
    assert list(e[:2]) == [np.inf, 0.0] and np.isnan(e[2]) and e[3] == 1.0 and e[6] == np.inf
    assert e[7] == 0.0
    assert lg[0] == np.inf and np.isnan(lg[1]) and np.isnan(lg[2]) and lg[3] == -np.inf
    assert lg[4] == -np.inf and np.isnan(lg[5])


def test_det_exp_log_float64():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.integers(0, 2**64, 400_000, dtype=np.uint64).view(np.float64),
                        np.linspace(-760, 720, 200_001),
                        np.array([0.0, np.inf, -np.inf, np.nan, 5e-324, 2.2e-308, 709.78,
                                  -745.13, 1.7976931348623157e308])])
    e, lg = _core.det_exp_log(x)
    with np.errstate(all="ignore"):
        for got, want in ((e, np.exp(x.astype(np.longdouble))),
                          (lg, np.log(x.astype(np.longdouble)))):
            rounded = want.astype(np.float64)
            same = (np.isnan(got) & np.isnan(want)) | (got == want) | \
                (np.isinf(rounded) & (got == rounded))
            ulp = np.spacing(np.abs(rounded))
            ulp = np.where((ulp == 0) | ~np.isfinite(ulp), 5e-324, ulp)
            err = np.abs((got.astype(np.longdouble) - want) / ulp).astype(np.float64)
            err = np.where(same, 0.0, np.where(np.isnan(err), np.inf, err))
            assert err.max() < 1.0, x[np.argmax(err)]


def test_det_exp_log_rejects_other_dtypes():
    with pytest.raises(TypeError, match="float32 or float64"):
        _core.det_exp_log(np.ones(3, np.float16))


# --- parity with the composite ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("shape", [(16, 7), (4, 6, 33), (2, 3, 1549), (1, 2, 4, 17)])
def test_values_match_the_composite(dtype, from_logits, shape):
    y_true, ids, y_pred = inputs(shape, dtype, from_logits)
    for smoothing in (0.0, 0.1):
        got = fm.masked_crossentropy(y_true, y_pred, START, END, from_logits=from_logits,
                                     label_smoothing=smoothing)
        want = fm.reference_masked_crossentropy(y_true, y_pred, START, END,
                                                from_logits=from_logits,
                                                label_smoothing=smoothing)
        assert got.dtype == dtype and got.shape == shape[:-1]
        assert_close(got, want, dtype)
        assert_masked_exactly(got, want, ids.numpy(), y_pred, dtype)
    got = fm.sparse_masked_crossentropy(ids, y_pred, START, END, from_logits=from_logits)
    want = fm.reference_sparse_masked_crossentropy(ids, y_pred, START, END,
                                                   from_logits=from_logits)
    assert_close(got, want, dtype)
    assert_masked_exactly(got, want, ids.numpy(), y_pred, dtype)
    # The sparse loss is the dense loss on one_hot(ids) when from logits.
    if from_logits:
        dense = fm.masked_crossentropy(y_true, y_pred, START, END, from_logits=True)
        assert_close(got, dense, dtype)


def test_the_mask_really_masks_and_equals_the_raw_keep_bytes():
    y_true, ids, y_pred = inputs((64, 9), tf.float32, True, right=0.7)
    loss, keep, stats = ops_library.import_fused_masked_mae_masked_crossentropy(
        y_true=y_true, y_pred=y_pred, masked_tokens=[START, END], from_logits=True)
    t, p = tf.math.argmax(y_true, -1).numpy(), tf.math.argmax(y_pred, -1).numpy()
    expected_keep = ~((t == p) & np.isin(t, [START, END]))
    assert 0 < (~expected_keep).sum() < 64
    assert np.array_equal(keep.numpy().astype(bool), expected_keep)
    assert np.all(loss.numpy()[~expected_keep] == 0)
    assert np.all(loss.numpy()[expected_keep] > 0)
    assert stats.shape == (64, 2) and stats.dtype == tf.float64
    # Logits: (row max, sum of exp(z - max)).
    z = y_pred.numpy().astype(np.float64)
    np.testing.assert_allclose(stats[:, 0], z.max(-1))
    np.testing.assert_allclose(stats[:, 1], np.exp(z - z.max(-1, keepdims=True)).sum(-1),
                               rtol=1e-6)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_core_matches_numpy_and_the_op(from_logits, sparse, dtype):
    y_true, ids, y_pred = inputs((5, 8, 37), dtype, from_logits, seed=3)
    np_dtype = {tf.bfloat16: ml_dtypes.bfloat16}.get(dtype, dtype.as_numpy_dtype)
    pred = y_pred.numpy().astype(np_dtype)
    targets = ids.numpy() if sparse else y_true.numpy().astype(np_dtype)
    smoothing = 0.0 if sparse else 0.2
    got = _core.ce_forward(targets, pred, [START, END], sparse, from_logits, smoothing)
    want = ref.crossentropy(targets, pred, [START, END], from_logits, smoothing, sparse=sparse)
    assert_close(got.astype(np.float64), want.astype(np.float64), dtype)
    if sparse:
        op = fm.crossentropy.sparse_masked_crossentropy_tokens(ids, y_pred, [START, END],
                                                               from_logits)
    else:
        op = fm.crossentropy.masked_crossentropy_tokens(y_true, y_pred, [START, END],
                                                        from_logits, smoothing)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), f64(op).astype(np_dtype)
                                  .view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("sparse", [False, True])
def test_gradients_match_the_composite(dtype, from_logits, sparse):
    y_true, ids, y_pred = inputs((6, 5, 40), dtype, from_logits, seed=2)
    upstream = tf.cast(tf.random.stateless_normal((6, 5), seed=(1, 2)), dtype)

    def grad(fn):
        with tf.GradientTape() as tape:
            tape.watch(y_pred)
            loss = fn()
        return tape.gradient(loss, y_pred, output_gradients=upstream)

    if sparse:
        got = grad(lambda: fm.sparse_masked_crossentropy(ids, y_pred, START, END,
                                                         from_logits=from_logits))
        want = grad(lambda: fm.reference_sparse_masked_crossentropy(ids, y_pred, START, END,
                                                                    from_logits=from_logits))
    else:
        got = grad(lambda: fm.masked_crossentropy(y_true, y_pred, START, END,
                                                  from_logits=from_logits, label_smoothing=0.1))
        want = grad(lambda: fm.reference_masked_crossentropy(
            y_true, y_pred, START, END, from_logits=from_logits, label_smoothing=0.1))
    assert got.dtype == dtype
    if dtype == tf.float16 and not from_logits:
        # The float16 composite overflows in 1 / p (its clip floor 1e-7 is
        # 1.2e-7 in float16); we compute in float32. Compare with the float64
        # composite where that fits float16.
        y64 = tf.cast(y_pred, tf.float64)
        up64 = tf.cast(upstream, tf.float64)
        with tf.GradientTape() as tape:
            tape.watch(y64)
            if sparse:
                loss = fm.reference_sparse_masked_crossentropy(ids, y64, START, END)
            else:
                loss = fm.reference_masked_crossentropy(tf.cast(y_true, tf.float64), y64, START,
                                                        END, label_smoothing=0.1)
        want64 = tape.gradient(loss, y64, output_gradients=up64).numpy()
        fits = np.abs(want64) < 3e4
        np.testing.assert_allclose(f64(got)[fits], want64[fits], rtol=2e-2,
                                   atol=2e-2 * np.abs(want64[fits]).max())
        return
    # Masked rows have no gradient, like the composite's.
    assert_close(got, want, dtype)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("sparse", [False, True])
def test_compute_gradient_float64(from_logits, sparse):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 4, 6))
    y_pred = tf.constant(logits if from_logits else np.exp(logits) / np.exp(logits).sum(-1,
                                                                                       keepdims=True))
    ids = tf.constant(rng.integers(0, 6, size=(3, 4)))
    y_true = tf.one_hot(ids, 6, dtype=tf.float64)

    def fn(p):
        if sparse:
            return fm.sparse_masked_crossentropy(ids, p, 0, 2, from_logits=from_logits)
        return fm.masked_crossentropy(y_true, p, 0, 2, from_logits=from_logits,
                                      label_smoothing=0.1)

    theoretical, numerical = tf.test.compute_gradient(fn, [y_pred], delta=1e-6)
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-5, atol=1e-6)


# --- special values ------------------------------------------------------------------------


@pytest.mark.parametrize("from_logits", [True, False])
def test_nan_and_inf_propagate_like_the_composite(from_logits):
    nan, inf = np.nan, np.inf
    rows = np.array([
        [1.0, nan, 2.0, 0.0], [inf, 1.0, 0.0, 0.0], [-inf, 1.0, 2.0, 0.0],
        [-inf, -inf, -inf, -inf], [nan, nan, nan, nan], [0.3, 0.2, 0.4, 0.1],
        [inf, inf, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-1.0, 2.0, 0.5, 0.5],
    ])
    y_pred = tf.constant(rows, tf.float32)
    ids = tf.constant([1, 0, 2, 3, 1, 2, 0, 1, 1])
    y_true = tf.one_hot(ids, 4)
    for sparse in (False, True):
        if sparse:
            got = fm.sparse_masked_crossentropy(ids, y_pred, 2, from_logits=from_logits)
            want = fm.reference_sparse_masked_crossentropy(ids, y_pred, 2,
                                                           from_logits=from_logits)
        else:
            got = fm.masked_crossentropy(y_true, y_pred, 2, from_logits=from_logits)
            want = fm.reference_masked_crossentropy(y_true, y_pred, 2, from_logits=from_logits)
        got, want = got.numpy(), want.numpy()
        assert np.array_equal(np.isnan(got), np.isnan(want)), (sparse, got, want)
        assert np.array_equal(np.isinf(got), np.isinf(want)), (sparse, got, want)
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1e4, 1e30, 3e38])
def test_huge_logits_do_not_overflow(scale):
    rng = np.random.default_rng(6)
    z = tf.constant(rng.uniform(-1, 1, size=(8, 50)) * scale, tf.float32)
    ids = tf.constant(rng.integers(0, 50, size=8))
    got = fm.sparse_masked_crossentropy(ids, z, from_logits=True)
    want = tf.nn.sparse_softmax_cross_entropy_with_logits(ids, z)
    assert np.all(np.isfinite(got.numpy())) == np.all(np.isfinite(want.numpy()))
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)
    with tf.GradientTape() as tape:
        tape.watch(z)
        loss = fm.sparse_masked_crossentropy(ids, z, from_logits=True)
    g = tape.gradient(loss, z).numpy()
    assert np.all(np.isfinite(g)) and np.all(np.abs(g) <= 1.0)


def test_one_class():
    for from_logits in (True, False):
        y_pred = tf.constant([[0.5], [3.0], [-2.0]])
        got = fm.masked_crossentropy(tf.ones((3, 1)), y_pred, from_logits=from_logits)
        want = fm.reference_masked_crossentropy(tf.ones((3, 1)), y_pred,
                                                from_logits=from_logits)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)
        got = fm.sparse_masked_crossentropy(tf.zeros(3, tf.int32), y_pred, tokens=[0],
                                            from_logits=from_logits)
        assert np.all(got.numpy() == 0)  # argmax 0 == target 0, a masked token


@pytest.mark.parametrize("shape", [(0, 5), (3, 0, 5)])
def test_zero_sized_batches(shape):
    y_pred = tf.zeros(shape)
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        loss = fm.masked_crossentropy(tf.zeros(shape), y_pred, 0, 1, from_logits=True)
    assert loss.shape == shape[:-1]
    assert tape.gradient(loss, y_pred).shape == shape
    sparse = fm.sparse_masked_crossentropy(tf.zeros(shape[:-1], tf.int64), y_pred, 0, 1)
    assert sparse.shape == shape[:-1]
    assert _core.ce_forward(np.zeros(shape, np.float32), np.zeros(shape, np.float32)).shape == \
        shape[:-1]


# --- errors --------------------------------------------------------------------------------


def test_bad_ids_and_tokens_raise_clear_errors():
    y_pred = tf.random.uniform((4, 6))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"y_true_ids\[2\].* = 6 is outside"):
        fm.sparse_masked_crossentropy(tf.constant([0, 1, 6, 2]), y_pred)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"= -1 is outside"):
        fm.sparse_masked_crossentropy(tf.constant([0, -1, 1, 2]), y_pred, from_logits=True)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError),
                       match="masked token id 6 is outside"):
        fm.masked_crossentropy(tf.one_hot([0, 1, 2, 3], 6), y_pred, end_token=6)
    with pytest.raises(ValueError, match="start_token must be a class id in \\[0, 2\\*\\*63\\), got -1"):
        fm.masked_crossentropy(tf.one_hot([0, 1, 2, 3], 6), y_pred, start_token=-1)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="same shape"):
        fm.masked_crossentropy(tf.zeros((4, 5)), y_pred)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        fm.masked_crossentropy(tf.zeros((4, 6), tf.int32), tf.zeros((4, 6), tf.int32))
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        fm.masked_crossentropy(tf.zeros((4, 6)), y_pred, label_smoothing=1.5)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        fm.MaskedCrossentropy(label_smoothing=-0.1)
    with pytest.raises(ValueError, match="dense targets only"):
        _core.ce_forward(np.zeros(4, np.int64), np.ones((4, 6), np.float32), sparse=True,
                         label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"y_true_ids\[0\].* = 9 is outside"):
        _core.ce_forward(np.array([9, 0, 0, 0]), np.ones((4, 6), np.float32), sparse=True)
    with pytest.raises(ValueError, match="row_stats must have the shape"):
        _core.ce_gradient(np.zeros((4, 6), np.float32), np.ones((4, 6), np.float32),
                          np.ones(4, np.float32), row_keep=np.ones(4, np.uint8),
                          row_stats=np.ones((4, 3)))


def test_raw_ops_reject_bad_row_inputs():
    y_true, _, y_pred = inputs((4, 6), tf.float32, True)
    loss, keep, stats = ops_library.import_fused_masked_mae_masked_crossentropy(
        y_true=y_true, y_pred=y_pred, from_logits=True)
    grad = ops_library.import_fused_masked_mae_masked_crossentropy_grad
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="row_stats"):
        grad(y_true=y_true, y_pred=y_pred, row_keep=keep, row_stats=stats[:, :1],
             grad_loss=tf.ones(4), from_logits=True)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="grad_loss"):
        grad(y_true=y_true, y_pred=y_pred, row_keep=keep, row_stats=stats,
             grad_loss=tf.ones(3), from_logits=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="epsilon must be in"):
        ops_library.import_fused_masked_mae_masked_crossentropy(y_true=y_true, y_pred=y_pred,
                                                                epsilon=0.0)


# --- Keras ---------------------------------------------------------------------------------


def test_keras_losses_equal_keras_categorical_crossentropy_without_tokens():
    """No tokens: nothing is masked, so the loss is Keras' own, with every
    reduction and sample_weight."""
    y_true, ids, y_pred = inputs((4, 5, 11), tf.float32, False, seed=8)
    weights = tf.constant(np.random.default_rng(1).random((4, 5)), tf.float32)
    for reduction in ("sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none"):
        for smoothing in (0.0, 0.2):
            ours = fm.MaskedCrossentropy(label_smoothing=smoothing, reduction=reduction)
            keras_loss = keras.losses.CategoricalCrossentropy(label_smoothing=smoothing,
                                                              reduction=reduction)
            # -log(q) for q near 1 amplifies q's last-bit rounding: atol.
            np.testing.assert_allclose(ours(y_true, y_pred, weights),
                                       keras_loss(y_true, y_pred, weights), rtol=1e-5,
                                       atol=1e-6)
        ours = fm.SparseMaskedCrossentropy(reduction=reduction)
        keras_loss = keras.losses.SparseCategoricalCrossentropy(reduction=reduction)
        np.testing.assert_allclose(ours(ids, y_pred, weights), keras_loss(ids, y_pred, weights),
                                   rtol=1e-5, atol=1e-6)


def test_softmax_outputs_use_their_logits_like_keras():
    """keras.ops.softmax outputs carry their logits; Keras' cross-entropy (and
    ours) then computes from the logits, which differs from the probability
    route for saturated rows."""
    logits = tf.constant([[30.0, 0.0, -30.0], [0.0, 1.0, 2.0]])
    probabilities = keras.ops.softmax(logits)
    y_true = tf.constant([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    ours = fm.masked_crossentropy(y_true, probabilities)
    keras_value = keras.losses.categorical_crossentropy(y_true, probabilities)
    np.testing.assert_allclose(ours, keras_value, rtol=1e-6)
    assert ours.numpy()[0] > 50  # from the logits: 60, not -log(1e-7) = 16.1
    ours_sparse = fm.sparse_masked_crossentropy(tf.constant([2, 0]), probabilities)
    np.testing.assert_allclose(ours_sparse, keras_value, rtol=1e-6)


def make_model(classes, seed=0):
    keras.utils.set_random_seed(seed)
    inputs_ = keras.Input((6, 8))
    hidden = keras.layers.Dense(16, activation="relu")(inputs_)
    outputs = keras.layers.Dense(classes, activation="softmax")(hidden)
    return keras.Model(inputs_, outputs)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_keras_fit_equals_keras_crossentropy_without_tokens(jit_compile):
    classes = 12
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6, 8)).astype(np.float32)
    y = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, size=(64, 6))]
    histories = []
    for loss in (fm.MaskedCrossentropy(), keras.losses.CategoricalCrossentropy()):
        model = make_model(classes)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, jit_compile=jit_compile)
        histories.append(model.fit(x, y, batch_size=16, epochs=2, verbose=0,
                                   shuffle=False).history["loss"])
    np.testing.assert_allclose(histories[0], histories[1], rtol=1e-5)


def test_keras_fit_evaluate_save_load_with_tokens():
    classes = 10
    rng = np.random.default_rng(1)
    x = rng.normal(size=(48, 6, 8)).astype(np.float32)
    ids = rng.integers(0, classes, size=(48, 6))
    ids[:, 3:] = END
    y = np.eye(classes, dtype=np.float32)[ids]
    for loss, targets in ((fm.MaskedCrossentropy(START, END, label_smoothing=0.05), y),
                          (fm.SparseMaskedCrossentropy(START, END, tokens=[7]), ids)):
        model = make_model(classes)
        model.compile(optimizer="adam", loss=loss)
        history = model.fit(x, targets, batch_size=16, epochs=2, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        before = model.evaluate(x, targets, verbose=0)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.keras")
            model.save(path)
            loaded = keras.models.load_model(path)
        assert type(loaded.loss) is type(loss)
        assert loaded.loss.get_config() == loss.get_config()
        np.testing.assert_allclose(loaded.evaluate(x, targets, verbose=0), before, rtol=1e-6)


def test_config_round_trip():
    loss = fm.MaskedCrossentropy(2, 9, from_logits=True, label_smoothing=0.1, tokens=[4],
                                 reduction="sum", name="ce")
    config = loss.get_config()
    assert config["from_logits"] is True and config["label_smoothing"] == 0.1
    assert config["start_token"] == 2 and config["end_token"] == 9 and config["tokens"] == [4]
    again = fm.MaskedCrossentropy.from_config(config)
    assert again.get_config() == config
    sparse = fm.SparseMaskedCrossentropy(2, 9, from_logits=True)
    assert fm.SparseMaskedCrossentropy.from_config(sparse.get_config()).get_config() == \
        sparse.get_config()


# --- XLA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=lambda d: d.name)
def test_xla_custom_calls_equal_the_op_bit_for_bit(sparse, from_logits, dtype):
    y_true, ids, y_pred = inputs((3, 5, 21), dtype, from_logits, seed=9)
    targets = ids if sparse else y_true

    def fn(targets, y_pred):
        with tf.GradientTape() as tape:
            tape.watch(y_pred)
            if sparse:
                loss = fm.sparse_masked_crossentropy(targets, y_pred, START, END,
                                                     from_logits=from_logits)
            else:
                loss = fm.masked_crossentropy(targets, y_pred, START, END,
                                              from_logits=from_logits, label_smoothing=0.1)
            total = tf.reduce_sum(loss)
        return loss, tape.gradient(total, y_pred)

    eager = fn(targets, y_pred)
    jitted = tf.function(fn, jit_compile=True)
    compiled = jitted(targets, y_pred)
    for a, b in zip(eager, compiled):
        np.testing.assert_array_equal(f64(a), f64(b))
    hlo = jitted.experimental_get_compiler_ir(targets, y_pred)(stage="hlo")
    forward = "fused_masked_ce_sparse_forward" if sparse else "fused_masked_ce_forward"
    assert f'custom_call_target="{forward}.import_fused_masked_mae"' in hlo
    assert "_grad.import_fused_masked_mae" in hlo


def test_xla_unknown_batch_one_trace():
    traces = []

    @tf.function(jit_compile=True, input_signature=[tf.TensorSpec([None, 7], tf.int64),
                                                    tf.TensorSpec([None, 7, 13], tf.float32)])
    def fn(ids, y_pred):
        traces.append(1)
        return fm.sparse_masked_crossentropy(ids, y_pred, 0, 1, from_logits=True)

    for batch in (2, 5):
        _, ids, y_pred = inputs((batch, 7, 13), tf.float32, True, seed=batch)
        np.testing.assert_array_equal(
            fn(ids, y_pred).numpy(),
            fm.sparse_masked_crossentropy(ids, y_pred, 0, 1, from_logits=True).numpy())
    assert len(traces) == 1


def test_determinism_across_threads_and_runs():
    y_true, _, y_pred = inputs((64, 8, 300), tf.float32, True, seed=11)
    first = fm.masked_crossentropy(y_true, y_pred, START, END, from_logits=True).numpy()
    for _ in range(3):
        again = fm.masked_crossentropy(y_true, y_pred, START, END, from_logits=True).numpy()
        assert first.tobytes() == again.tobytes()
    # _core runs every row on one thread: the same bytes as the op's thread pool.
    core = _core.ce_forward(y_true.numpy(), y_pred.numpy(), [START, END], False, True)
    assert core.tobytes() == first.tobytes()
