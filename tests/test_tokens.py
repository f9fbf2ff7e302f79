"""Any set of masked tokens: `tokens=` on masked_mae, MaskedMAE and the reference."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
from fused_masked_mae import _core
from fused_masked_mae import ops as fm_ops
from fused_masked_mae.losses import MaskedMAE, masked_mae_loss_fn
from test_op_parity import RTOL, f64

C = 11


def batch_with_tokens(tokens, shape=(6, 7, C), dtype=tf.float32, seed=0):
    """Targets that often are one of `tokens`, predictions right about half the time."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, shape[-1], size=shape[:-1]).reshape(-1)
    if tokens:
        pick = rng.random(labels.shape) < 0.5
        labels[pick] = rng.choice(list(tokens), size=pick.sum())
    right = rng.random(labels.shape) < 0.6
    y_true = np.eye(shape[-1])[labels]
    y_pred = rng.random(y_true.shape) * 0.5
    y_pred[right, labels[right]] += 1.0
    return (tf.constant(y_true.reshape(shape), dtype), tf.constant(y_pred.reshape(shape), dtype))


TOKEN_LISTS = [(), (0,), (10,), (3, 3, 3), (1, 5, 1, 2), (0, 2, 4, 6, 8, 10), tuple(range(C))]


@pytest.mark.parametrize("tokens", TOKEN_LISTS, ids=str)
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64, tf.float16], ids=lambda d: d.name)
def test_tokens_match_reference(tokens, dtype):
    t, p = batch_with_tokens(tokens, dtype=dtype)
    fused = fm.masked_mae(t, p, tokens=tokens)
    ref = fm.reference_masked_mae(t, p, tokens=tokens)
    np.testing.assert_allclose(f64(fused), f64(ref), rtol=RTOL[dtype])
    np.testing.assert_array_equal(f64(fused) == 0, f64(ref) == 0)
    masked = f64(fused) == 0
    assert masked.any() == bool(tokens), "the data must exercise the mask (or its absence)"
    # Through the ..._tokens entry points too.
    np.testing.assert_array_equal(f64(fm.masked_mae_tokens(t, p, list(tokens))), f64(fused))
    np.testing.assert_array_equal(f64(fm.reference_masked_mae_tokens(t, p, list(tokens))),
                                  f64(ref))


def test_zero_tokens_is_plain_mae():
    t, p = batch_with_tokens(())
    np.testing.assert_allclose(fm.masked_mae(t, p).numpy(),
                               tf.reduce_mean(tf.abs(p - t), -1).numpy(), rtol=2e-6)


def test_start_end_and_tokens_combine_as_one_set():
    t, p = batch_with_tokens((2, 5, 9))
    union = fm.masked_mae(t, p, tokens=[2, 5, 9]).numpy()
    np.testing.assert_array_equal(fm.masked_mae(t, p, 2, 5, tokens=[9]).numpy(), union)
    np.testing.assert_array_equal(fm.masked_mae(t, p, 2, None, [5, 9, 2]).numpy(), union)
    np.testing.assert_array_equal(fm.masked_mae(t, p, start_token=9, tokens=(5, 2)).numpy(), union)
    # The existing positional form keeps working.
    np.testing.assert_array_equal(fm.masked_mae(t, p, 2, 5).numpy(),
                                  fm.masked_mae(t, p, tokens=[2, 5]).numpy())
    np.testing.assert_allclose(fm.reference_masked_mae(t, p, 2, 5, [9]).numpy(), union, rtol=2e-6)


def test_duplicates_are_dropped_before_the_op():
    assert fm_ops.masked_token_list(3, 3, [1, 3, 1, 0]) == [3, 1, 0]
    t, p = batch_with_tokens((1, 3))
    graph = tf.function(lambda a, b: fm.masked_mae(a, b, 3, 3, [1, 3, 1])).get_concrete_function(
        t, p).graph
    (op,) = [op for op in graph.get_operations() if op.type == "Import_fused_masked_mae>MaskedMae"]
    assert op.get_attr("masked_tokens") == [3, 1]


def test_gradient_with_tokens_matches_reference():
    t, p = batch_with_tokens((0, 4, 7))
    grads = []
    for loss_fn in (fm.masked_mae, fm.reference_masked_mae):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = tf.reduce_sum(loss_fn(t, p, 0, None, [4, 7]))
        grads.append(tape.gradient(loss, p).numpy())
    np.testing.assert_array_equal(grads[0], grads[1])
    assert (np.abs(grads[0]).sum(-1) == 0).any()  # some positions masked


def test_max_masked_tokens_is_the_op_capacity():
    assert fm_ops.MAX_MASKED_TOKENS == _core.MAX_MASKED_TOKENS == 256


def test_256_distinct_tokens_work():
    n = 300
    tokens = list(range(256)) + list(range(100))  # 356 ids, 256 distinct
    t, p = batch_with_tokens(tuple(range(256)), shape=(4, n))
    fused = fm.masked_mae(t, p, tokens=tokens)
    np.testing.assert_allclose(fused.numpy(), fm.reference_masked_mae(t, p, tokens=tokens).numpy(),
                               rtol=2e-6)
    assert (fused.numpy() == 0).any()


@pytest.mark.parametrize("make", [
    lambda ids: fm.masked_mae(tf.zeros((2, 300)), tf.zeros((2, 300)), tokens=ids),
    lambda ids: fm.masked_mae(tf.zeros((2, 300)), tf.zeros((2, 300)), 1, None, ids),
    lambda ids: fm.masked_mae_tokens(tf.zeros((2, 300)), tf.zeros((2, 300)), ids),
    lambda ids: MaskedMAE(tokens=ids),
    lambda ids: masked_mae_loss_fn(tokens=ids),
], ids=["masked_mae", "start+tokens", "masked_mae_tokens", "MaskedMAE", "loss_fn"])
def test_more_than_256_tokens_is_a_clear_value_error(make):
    with pytest.raises(ValueError, match=r"got 257 distinct masked token ids, but the fused op "
                                         r"supports at most 256"):
        make(list(range(1, 258)))


def test_bad_token_values():
    t = tf.zeros((2, 4))
    with pytest.raises(TypeError, match="tokens must be an integer class id or None, got 1.5"):
        fm.masked_mae(t, t, tokens=[0, 1.5])
    with pytest.raises(ValueError, match=r"tokens must be a class id in \[0, 2\*\*63\), got -1"):
        MaskedMAE(tokens=[-1])
    with pytest.raises(TypeError, match="tokens must be a list"):
        fm.masked_mae(t, t, 0, 1, 3)
    # The signature: reduction is the third positional argument.
    assert MaskedMAE(0, 1, "sum").reduction == "sum"


def test_masked_mae_config_round_trip_with_tokens():
    loss = MaskedMAE(2, None, tokens=(7, 9), reduction="sum", name="seq")
    config = loss.get_config()
    assert config["start_token"] == 2 and config["end_token"] is None
    assert config["tokens"] == [7, 9]
    clone = MaskedMAE.from_config(config)
    assert clone.get_config() == config
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, MaskedMAE) and restored.get_config() == config
    t, p = batch_with_tokens((2, 7, 9))
    np.testing.assert_array_equal(restored(t, p).numpy(), loss(t, p).numpy())
    # Defaults: nothing masked.
    assert MaskedMAE().get_config()["tokens"] == []


def test_masked_mae_with_tokens_matches_reference_loss():
    t, p = batch_with_tokens((2, 7, 9))
    weights = tf.constant(np.random.default_rng(3).random((6, 7)), tf.float32)
    for reduction in ("sum_over_batch_size", "none"):
        fused = MaskedMAE(2, 7, tokens=[9], reduction=reduction)(t, p, weights)
        ref = fm.ReferenceMaskedMAE(2, 7, tokens=[9], reduction=reduction)(t, p, weights)
        np.testing.assert_allclose(fused.numpy(), ref.numpy(), rtol=2e-6)
    config = fm.ReferenceMaskedMAE(2, 7, tokens=[9]).get_config()
    assert config["tokens"] == [9]
    assert fm.ReferenceMaskedMAE.from_config(config).get_config() == config


def test_loss_fn_matches_the_class():
    t, p = batch_with_tokens((2, 7, 9))
    fn = masked_mae_loss_fn(2, 7, tokens=[9])
    np.testing.assert_array_equal(fn(t, p).numpy(),
                                  MaskedMAE(2, 7, reduction="none", tokens=[9])(t, p).numpy())
