"""Gradients of the fused loss: numerical checks, and equality with autodiff of
the composite reference (the same formula, so float32/float64 agree bit for
bit, including at the |p - t| kink where sign(0) = 0)."""

import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
from raw_ops import raw_grad



def away_from_kink(shape, seed=0):
    """float64 one-hot targets and predictions with |p - t| in [0.05, 0.2]
    everywhere except a wrong argmax (1.3, at another class) in about half
    the rows; argmax margins >= 0.1, so a finite-difference step changes
    neither |.|'s branch nor the mask. Start 0 and end C - 1 are present, and
    the first position (end) is predicted right, so a row is masked."""
    rng = np.random.default_rng(seed)
    classes = shape[-1]
    labels = rng.integers(0, classes, size=shape[:-1])
    flat = labels.reshape(-1)
    flat[::3] = classes - 1
    flat[1::4] = 0
    y_true = np.zeros(shape)
    np.put_along_axis(y_true, labels[..., None], 1.0, axis=-1)
    offset = rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.05, 0.2, size=shape)
    y_pred = (y_true + offset).reshape(-1, classes)
    wrong = rng.random(flat.shape) < 0.5
    # The first position (the end token) is predicted right, the second wrong;
    # a single position is predicted wrong (kept: a non-zero gradient).
    wrong[0] = flat.size == 1
    wrong[1:2] = True
    other = (flat + rng.integers(1, classes, size=flat.shape)) % classes
    y_pred[wrong, other[wrong]] = 1.3
    return tf.constant(y_true), tf.constant(y_pred.reshape(shape))


def with_kinks(y_true, y_pred, fraction=0.2, seed=1):
    """Sets about `fraction` of y_pred's elements to y_true's (p == t)."""
    pick = tf.random.stateless_uniform(y_pred.shape, [seed, 2]) < fraction
    return tf.where(pick, y_true, y_pred)


def tape_gradients(loss_fn, y_true, y_pred, weights):
    """d sum(loss * weights) / d (y_true, y_pred)."""
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y_true, y_pred])
        loss = tf.reduce_sum(loss_fn(y_true, y_pred) * weights)
    return tape.gradient(loss, y_true), tape.gradient(loss, y_pred)


def fused_fn(start, end):
    return lambda t, p: fm.masked_mae(t, p, start, end)


def reference_fn(start, end):
    return lambda t, p: fm.reference_masked_mae(t, p, start, end)


@pytest.mark.parametrize("shape", [(6,), (3, 5), (2, 3, 7), (2, 40)], ids=str)
def test_compute_gradient_matches_finite_differences(shape):
    y_true, y_pred = away_from_kink(shape)
    end = shape[-1] - 1
    loss = fm.masked_mae(y_true, y_pred, 0, end).numpy()
    if loss.size > 1:
        assert (loss == 0).any() and (loss > 0).any()  # masked and kept rows
    for wrt, fn in ((y_pred, lambda p: fm.masked_mae(y_true, p, 0, end)),
                    (y_true, lambda t: fm.masked_mae(t, y_pred, 0, end))):
        theoretical, numerical = tf.test.compute_gradient(fn, [wrt], delta=1e-4)
        assert np.abs(theoretical[0]).max() > 0
        error = np.abs(theoretical[0] - numerical[0]).max()
        assert error < 1e-9, error


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode", ["eager", "tf.function", "tf.function-unknown-dims"])
@pytest.mark.parametrize("weights_kind", ["ones", "normal"])
def test_equal_to_reference_autodiff(dtype, mode, weights_kind, make_seq2seq):
    shape = (4, 6, 33)
    y_true, y_pred = make_seq2seq(shape, dtype, 0, 32)
    y_pred = with_kinks(y_true, y_pred)  # some elements exactly on the kink
    if weights_kind == "ones":
        weights = tf.ones(shape[:-1], dtype)
    else:
        weights = tf.constant(np.random.default_rng(3).normal(size=shape[:-1]), dtype)
    if mode == "eager":
        run = tape_gradients
    elif mode == "tf.function":
        run = tf.function(tape_gradients, autograph=False)
    else:
        spec = tf.TensorSpec([None, None, None], dtype)
        run = tf.function(
            lambda t, p, w: tape_gradients(fused_fn(0, 32), t, p, w),
            input_signature=[spec, spec, tf.TensorSpec([None, None], dtype)])
    if mode == "tf.function-unknown-dims":
        got_t, got_p = run(y_true, y_pred, weights)
    else:
        got_t, got_p = run(fused_fn(0, 32), y_true, y_pred, weights)
    # Against the eager reference: in a tf.function, Grappler may reassociate
    # the reference's own (g * w * cond) / C.
    want_t, want_p = tape_gradients(reference_fn(0, 32), y_true, y_pred, weights)
    assert got_p.shape == shape and got_t.shape == shape
    np.testing.assert_array_equal(got_p.numpy(), want_p.numpy())
    np.testing.assert_array_equal(got_t.numpy(), want_t.numpy())
    # Not trivially zero: kink elements and masked rows are 0, the rest not.
    grad = got_p.numpy()
    kink = (y_pred == y_true).numpy()
    assert kink.any() and (grad[kink] == 0).all()
    assert (grad != 0).any()
    masked_rows = fm.masked_mae(y_true, y_pred, 0, 32).numpy() == 0
    assert masked_rows.any() and (grad[masked_rows] == 0).all()


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("weights_kind", ["ones", "normal"])
def test_low_precision_gradients_match_reference(dtype, weights_kind, make_seq2seq,
                                                 to_f64_fn):
    """The fused gradient rounds g * keep / C to the dtype as TensorFlow's Mean
    gradient does, then multiplies by sign(p - t): the same values."""
    shape = (4, 6, 33)
    y_true, y_pred = make_seq2seq(shape, dtype, 0, 32)
    y_pred = with_kinks(y_true, y_pred)
    if weights_kind == "ones":
        weights = tf.ones(shape[:-1], dtype)
    else:
        weights = tf.constant(np.random.default_rng(3).normal(size=shape[:-1]), dtype)
    got = tape_gradients(fused_fn(0, 32), y_true, y_pred, weights)
    want = tape_gradients(reference_fn(0, 32), y_true, y_pred, weights)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        np.testing.assert_array_equal(to_f64_fn(g), to_f64_fn(w))
    assert (to_f64_fn(got[1]) != 0).any()


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64],
                         ids=["float16", "bfloat16", "float32", "float64"])
def test_raw_grad_op_is_the_formula(dtype, make_random, to_f64_fn):
    """grad_y_pred = round(g * keep / C) * sign(p - t), keep from the argmax rule."""
    shape = (5, 7, 12)
    y_true, y_pred = make_random(shape, dtype, seed=2, kind="ties")  # ties and p == t
    grad_loss = tf.constant(np.random.default_rng(4).normal(size=shape[:-1]), dtype)
    tokens = [0, 1, 2, 5]
    got = to_f64_fn(raw_grad(y_true=y_true, y_pred=y_pred, grad_loss=grad_loss,
                             masked_tokens=tokens))
    t_arg = tf.math.argmax(y_true, axis=-1).numpy()
    p_arg = tf.math.argmax(y_pred, axis=-1).numpy()
    keep = ~((t_arg == p_arg) & np.isin(t_arg, tokens))
    assert (~keep).any() and keep.any()
    scale = to_f64_fn(tf.cast(to_f64_fn(grad_loss) * keep / shape[-1], dtype))
    expected = scale[..., None] * np.sign(to_f64_fn(y_pred) - to_f64_fn(y_true))
    expected = to_f64_fn(tf.cast(expected, dtype))
    np.testing.assert_array_equal(got, expected)
    assert (got == 0).any() and (got != 0).any()


def test_upstream_gradients_that_are_not_ones(make_seq2seq):
    """loss * weights, a mean over the batch, and a per-position upstream: the
    gradient scales row by row with the upstream value."""
    y_true, y_pred = make_seq2seq((3, 4, 10), tf.float64, 0, 9)
    y_pred = with_kinks(y_true, y_pred)
    weights = tf.constant(np.random.default_rng(0).uniform(-2, 3, size=(3, 4)))
    _, unit = tape_gradients(fused_fn(0, 9), y_true, y_pred, tf.ones((3, 4), tf.float64))
    _, weighted = tape_gradients(fused_fn(0, 9), y_true, y_pred, weights)
    np.testing.assert_allclose(weighted.numpy(), unit.numpy() * weights.numpy()[..., None],
                               rtol=1e-15, atol=0)
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        loss = tf.reduce_mean(fm.masked_mae(y_true, y_pred, 0, 9))
    np.testing.assert_allclose(tape.gradient(loss, y_pred).numpy(), unit.numpy() / 12,
                               rtol=1e-15, atol=0)
    # Through the raw op: grad_loss is used per position.
    direct = raw_grad(y_true=y_true, y_pred=y_pred, grad_loss=weights, masked_tokens=[0, 9])
    np.testing.assert_array_equal(direct.numpy(), weighted.numpy())


def test_masked_rows_have_zero_gradient_and_kept_rows_sign_over_c():
    y_true = tf.constant([[0.0, 1.0, 0.0, 0.0],   # target 1, predicted 1: masked
                          [0.0, 1.0, 0.0, 0.0],   # target 1, predicted 2: kept
                          [1.0, 0.0, 0.0, 0.0]])  # target 0, predicted 0, 0 not masked: kept
    y_pred = tf.constant([[0.2, 0.5, 0.3, 0.0],
                          [0.2, 0.3, 0.5, 0.0],
                          [0.9, 0.0, 0.1, 0.3]])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y_true, y_pred])
        loss = fm.masked_mae(y_true, y_pred, None, 1)
    grad_p = tape.gradient(loss, y_pred).numpy()
    grad_t = tape.gradient(loss, y_true).numpy()
    np.testing.assert_array_equal(
        grad_p, [[0, 0, 0, 0], [0.25, -0.25, 0.25, 0], [-0.25, 0, 0.25, 0.25]])
    np.testing.assert_array_equal(grad_t, -grad_p)
    np.testing.assert_allclose(loss.numpy(), [0.0, 0.35, 0.125], rtol=1e-6)


def test_gradient_for_one_input_only(make_seq2seq):
    y_true, y_pred = make_seq2seq((2, 3, 5), tf.float32, 0, 4)
    both_t, both_p = tape_gradients(fused_fn(0, 4), y_true, y_pred, tf.ones((2, 3)))
    with tf.GradientTape() as tape:
        tape.watch(y_true)
        loss = fm.masked_mae(y_true, y_pred, 0, 4)
    np.testing.assert_array_equal(tape.gradient(loss, y_true).numpy(), both_t.numpy())
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        loss = fm.masked_mae(y_true, y_pred, 0, 4)
    np.testing.assert_array_equal(tape.gradient(loss, y_pred).numpy(), both_p.numpy())
    np.testing.assert_array_equal(both_t.numpy(), -both_p.numpy())
    assert (both_p.numpy() != 0).any()


def test_gradient_of_variables_under_tf_function(make_seq2seq):
    """A training-step-like use: gradients of a variable through a tf.function."""
    y_true, y_pred = make_seq2seq((4, 5, 8), tf.float32, 0, 7)
    logits = tf.Variable(y_pred)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(fm.masked_mae(y_true, logits, 0, 7))
        return loss, tape.gradient(loss, logits)

    loss, grad = step()
    with tf.GradientTape() as tape:
        ref = tf.reduce_mean(fm.reference_masked_mae(y_true, logits, 0, 7))
    np.testing.assert_allclose(loss.numpy(), ref.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(grad.numpy(), tape.gradient(ref, logits).numpy())


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=["float32", "float64"])
def test_crafted_rows_gradients_match_reference(dtype, crafted_rows):
    """NaN/inf/-0.0 rows: same gradients as the reference's autodiff, NaN where it is NaN."""
    rows = crafted_rows(dtype)
    y_true = tf.constant(np.repeat(rows, len(rows), axis=0), dtype)
    y_pred = tf.constant(np.tile(rows, (len(rows), 1)), dtype)
    weights = tf.ones((len(rows) ** 2,), dtype)
    got = tape_gradients(fused_fn(0, 3), y_true, y_pred, weights)
    want = tape_gradients(reference_fn(0, 3), y_true, y_pred, weights)
    for g, w in zip(got, want):
        g, w = g.numpy(), w.numpy()
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
        np.testing.assert_array_equal(g, w)  # NaN == NaN for assert_array_equal
    assert np.isnan(got[1].numpy()).any() and (got[1].numpy() != 0).any()


@pytest.mark.parametrize("shape", [(0, 5, 3), (3, 0, 4), (0, 2)], ids=str)
def test_empty_batch_gives_empty_gradients(shape):
    y_true = tf.zeros(shape)
    y_pred = tf.zeros(shape)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y_true, y_pred])
        loss = fm.masked_mae(y_true, y_pred, 0, shape[-1] - 1)
    assert loss.shape == shape[:-1]
    assert tape.gradient(loss, y_pred).shape == shape
    assert tape.gradient(loss, y_true).shape == shape
    raw = raw_grad(y_true=y_true, y_pred=y_pred, grad_loss=tf.zeros(shape[:-1]),
                   masked_tokens=[0])
    assert raw.shape == shape and raw.dtype == tf.float32
