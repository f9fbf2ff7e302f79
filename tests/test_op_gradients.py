"""Gradients: numerical checks, and equality with autodiff of the reference."""

import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
from fused_masked_mae._loader import ops_library
from test_op_parity import seq2seq_batch


def away_from_kink(shape, seed=0):
    """float64 inputs with |p - t| >= 0.05 everywhere, so |.| is differentiable."""
    rng = np.random.default_rng(seed)
    y_true, y_pred = seq2seq_batch(shape, tf.float64, 0, shape[-1] - 1, seed)
    offset = rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.05, 0.2, size=shape)
    y_pred = tf.constant(y_true.numpy() + np.where(y_pred.numpy() > 1, 0.3, offset))
    return y_true, y_pred


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 7)])
def test_compute_gradient_numerical(shape):
    y_true, y_pred = away_from_kink(shape)
    end = shape[-1] - 1
    theoretical, numerical = tf.test.compute_gradient(
        lambda p: fm.masked_mae(y_true, p, 0, end), [y_pred], delta=1e-4)
    assert np.abs(theoretical[0]).max() > 0
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-7)
    theoretical, numerical = tf.test.compute_gradient(
        lambda t: fm.masked_mae(t, y_pred, 0, end), [y_true], delta=1e-4)
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-7)


def tape_gradients(loss_fn, y_true, y_pred, weights):
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y_true, y_pred])
        loss = tf.reduce_sum(loss_fn(y_true, y_pred) * weights)
    return tape.gradient(loss, y_true), tape.gradient(loss, y_pred)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=lambda d: d.name)
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
def test_equal_to_reference_autodiff_bit_for_bit(dtype, graph):
    y_true, y_pred = seq2seq_batch((4, 6, 33), dtype, 0, 32)
    # Put some elements exactly on the kink p == t (sign(0) = 0 there).
    y_pred = tf.where(tf.random.stateless_uniform(y_pred.shape, [1, 2]) < 0.2, y_true, y_pred)
    weights = tf.constant(np.random.default_rng(3).normal(size=(4, 6)), dtype)
    fused = lambda t, p: fm.masked_mae(t, p, 0, 32)  # noqa: E731
    ref = lambda t, p: fm.reference_masked_mae(t, p, 0, 32)  # noqa: E731
    run = tf.function(tape_gradients, autograph=False) if graph else tape_gradients
    got_t, got_p = run(fused, y_true, y_pred, weights)
    # Against the eager reference: in a tf.function, Grappler's arithmetic
    # optimizer may reassociate the reference's (g * w * cond) / C (1 ulp).
    want_t, want_p = tape_gradients(ref, y_true, y_pred, weights)
    np.testing.assert_array_equal(got_p.numpy(), want_p.numpy())
    np.testing.assert_array_equal(got_t.numpy(), want_t.numpy())
    assert (got_p.numpy() == 0).any() and (got_p.numpy() != 0).any()


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=lambda d: d.name)
def test_low_precision_gradients_match_reference(dtype):
    y_true, y_pred = seq2seq_batch((4, 6, 33), dtype, 0, 32)
    weights = tf.ones((4, 6), dtype)
    got = tape_gradients(lambda t, p: fm.masked_mae(t, p, 0, 32), y_true, y_pred, weights)
    want = tape_gradients(lambda t, p: fm.reference_masked_mae(t, p, 0, 32), y_true, y_pred,
                          weights)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(tf.cast(g, tf.float64).numpy(),
                                      tf.cast(w, tf.float64).numpy())


def test_no_gradient_through_argmax():
    # Moving the prediction's argmax changes the mask, but the gradient of a
    # kept position is always keep * sign / C: no term from the argmax.
    y_true = tf.constant([[0.0, 1.0, 0.0]])
    y_pred = tf.constant([[0.2, 0.5, 0.3]])
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        loss = fm.masked_mae(y_true, y_pred, None, 1)  # argmax both 1 -> masked
    np.testing.assert_array_equal(tape.gradient(loss, y_pred).numpy(), np.zeros((1, 3)))


def test_gradient_of_unconnected_y_true_is_skipped_but_correct_when_asked():
    y_true, y_pred = seq2seq_batch((2, 3, 5), tf.float32, 0, 4)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y_true, y_pred])
        loss = fm.masked_mae(y_true, y_pred, 0, 4)
    np.testing.assert_array_equal(tape.gradient(loss, y_true).numpy(),
                                  -tape.gradient(loss, y_pred).numpy())


def test_empty_batch_gradient():
    y_true = tf.zeros((0, 3, 4))
    y_pred = tf.zeros((0, 3, 4))
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        loss = fm.masked_mae(y_true, y_pred, 0, 3)
    assert loss.shape == (0, 3)
    assert tape.gradient(loss, y_pred).shape == (0, 3, 4)
    raw = ops_library.import_fused_masked_mae_masked_mae_grad(
        y_true=y_true, y_pred=y_pred, grad_loss=tf.zeros((0, 3)), masked_tokens=[0])
    assert raw.shape == (0, 3, 4)
