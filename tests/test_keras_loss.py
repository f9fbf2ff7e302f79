"""MaskedMAE as a Keras 3 loss: reductions and sample_weight against the
reference wrapped by Keras itself, compile/fit/evaluate, get_config /
from_config, serialization and the `.keras` round trip."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
from test_op_parity import seq2seq_batch

VOCAB, START, END, STEPS = 12, 1, 11, 6
REDUCTIONS = ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None]


def loss_function_wrapper():
    """Keras' wrapper of a plain loss function into a Loss (the reductions and
    sample_weight handling of Keras' own MeanAbsoluteError). Keras 3.15 does
    not export it as keras.losses.LossFunctionWrapper, only from keras.src."""
    public = getattr(keras.losses, "LossFunctionWrapper", None)
    if public is not None:
        return public
    from keras.src.losses import LossFunctionWrapper

    return LossFunctionWrapper


def tiny_model():
    return keras.Sequential([
        keras.Input((STEPS,), dtype="int32"),
        keras.layers.Embedding(VOCAB, 12),
        keras.layers.Dense(VOCAB, activation="softmax"),
    ])


def copy_task(n=64, seed=0):
    """Token sequences START x x x END END and their one-hot copies [n, STEPS, VOCAB]."""
    rng = np.random.default_rng(seed)
    x = rng.integers(2, VOCAB - 1, size=(n, STEPS))
    x[:, 0] = START
    x[:, 4:] = END
    return x.astype(np.int32), np.eye(VOCAB, dtype=np.float32)[x]


@pytest.mark.parametrize("reduction", REDUCTIONS, ids=str)
def test_installed_keras_accepts_every_reduction(reduction):
    # Our test matrix relies on these names; a Keras without one fails here.
    assert keras.losses.MeanAbsoluteError(reduction=reduction).reduction == reduction
    assert fm.MaskedMAE(START, END, reduction=reduction).reduction == reduction


def test_unknown_reduction_is_rejected():
    with pytest.raises(ValueError, match="Invalid value for argument `reduction`"):
        fm.MaskedMAE(START, END, reduction="average")


@pytest.mark.parametrize("reduction", REDUCTIONS, ids=str)
@pytest.mark.parametrize("weights", ["none", "per-sample", "per-position"])
def test_reductions_and_sample_weight_match_keras_wrapped_reference(reduction, weights,
                                                                   make_seq2seq):
    y_true, y_pred = make_seq2seq((4, 5, 9), tf.float32, START, 8)
    rng = np.random.default_rng(1)
    sample_weight = {
        "none": None,
        # Keras 3 broadcasts [B, 1] (not [B]) against a [B, T] loss.
        "per-sample": tf.constant(rng.random((4, 1)), tf.float32),
        "per-position": tf.constant(rng.random((4, 5)) * (rng.random((4, 5)) < 0.7), tf.float32),
    }[weights]
    fused = fm.MaskedMAE(START, 8, reduction=reduction)
    reference = loss_function_wrapper()(
        fm.reference_masked_mae, start_token=START, end_token=8, reduction=reduction)
    got = fused(y_true, y_pred, sample_weight=sample_weight)
    want = reference(y_true, y_pred, sample_weight=sample_weight)
    assert got.shape == want.shape
    assert got.shape == ((4, 5) if reduction in ("none", None) else ())
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)
    # The package's own reference Loss class agrees as well.
    np.testing.assert_allclose(
        fm.ReferenceMaskedMAE(START, 8, reduction=reduction)(
            y_true, y_pred, sample_weight=sample_weight).numpy(), got.numpy(), rtol=1e-6,
        atol=1e-7)
    # The reduction saw a masked loss, not the plain MAE.
    unmasked = loss_function_wrapper()(
        fm.reference_masked_mae, reduction=reduction)(y_true, y_pred, sample_weight=sample_weight)
    assert not np.allclose(got.numpy(), unmasked.numpy(), rtol=1e-3)


def test_reductions_in_a_tf_function(make_seq2seq):
    y_true, y_pred = make_seq2seq((4, 5, 9), tf.float32, START, 8)
    weights = tf.constant(np.random.default_rng(2).random((4, 5)), tf.float32)
    for reduction in REDUCTIONS:
        loss = fm.MaskedMAE(START, 8, reduction=reduction)
        graph = tf.function(lambda t, p, w, loss=loss: loss(t, p, sample_weight=w))
        np.testing.assert_array_equal(graph(y_true, y_pred, weights).numpy(),
                                      loss(y_true, y_pred, sample_weight=weights).numpy())


def test_loss_dtype_and_integer_targets(make_seq2seq):
    y_true, y_pred = make_seq2seq((2, 3, 7), tf.float32, 0, 6)
    loss = fm.MaskedMAE(0, 6, reduction="none")
    # One-hot targets as integers are cast to the prediction's dtype.
    np.testing.assert_array_equal(loss(tf.cast(y_true, tf.int32), y_pred).numpy(),
                                  loss(y_true, y_pred).numpy())
    as_f64 = fm.MaskedMAE(0, 6, reduction="none", dtype="float64")(y_true, y_pred)
    assert as_f64.dtype == tf.float64
    np.testing.assert_allclose(
        as_f64.numpy(),
        fm.reference_masked_mae(tf.cast(y_true, tf.float64), tf.cast(y_pred, tf.float64), 0,
                                6).numpy(), rtol=1e-12)
    assert (as_f64.numpy() == 0).any()


def test_fit_reduces_the_loss_and_evaluate_agrees():
    keras.utils.set_random_seed(0)
    x, y = copy_task()
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=fm.MaskedMAE(START, END),
                  jit_compile=False)  # the fused op (XLA would use the composite)
    history = model.fit(x, y, epochs=5, batch_size=32, verbose=0).history["loss"]
    assert all(np.isfinite(history))
    assert history[-1] < 0.8 * history[0], history
    evaluated = model.evaluate(x, y, batch_size=len(x), verbose=0)
    predictions = model.predict(x, batch_size=len(x), verbose=0)
    expected = float(tf.reduce_mean(fm.reference_masked_mae(y, predictions, START, END)))
    np.testing.assert_allclose(evaluated, expected, rtol=1e-5)
    # The trained model predicts start/end right somewhere, so the loss masks.
    assert (fm.masked_mae(y, predictions, START, END).numpy() == 0).any()


def test_fit_with_sample_weight_matches_reference_loss():
    """One step from the same weights: fused and reference losses give the same update."""
    x, y = copy_task(32, seed=3)
    sample_weight = np.random.default_rng(4).random((32, STEPS)).astype(np.float32)
    trained = []
    for loss in (fm.MaskedMAE(START, END), fm.ReferenceMaskedMAE(START, END)):
        keras.utils.set_random_seed(5)
        model = tiny_model()
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss, jit_compile=False)
        history = model.fit(x, y, sample_weight=sample_weight, epochs=2, batch_size=32,
                            shuffle=False, verbose=0).history["loss"]
        trained.append((history, model.get_weights()))
    (fused_history, fused_weights), (ref_history, ref_weights) = trained
    np.testing.assert_allclose(fused_history, ref_history, rtol=1e-5)
    for a, b in zip(fused_weights, ref_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not np.allclose(fused_weights[0], tiny_weights_at_seed(5)[0])  # it did train


def tiny_weights_at_seed(seed):
    keras.utils.set_random_seed(seed)
    return tiny_model().get_weights()


def test_get_config_from_config_and_serialization():
    loss = fm.MaskedMAE(START, END, reduction="sum", name="seq_loss")
    config = loss.get_config()
    assert config["start_token"] == START and config["end_token"] == END
    assert config["reduction"] == "sum" and config["name"] == "seq_loss"
    clone = fm.MaskedMAE.from_config(config)
    assert isinstance(clone, fm.MaskedMAE)
    assert clone.get_config() == config
    assert keras.saving.get_registered_name(fm.MaskedMAE) == "fused_masked_mae>MaskedMAE"
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, fm.MaskedMAE) and restored.get_config() == config
    y_true, y_pred = copy_task(4)[1], np.random.default_rng(0).random((4, STEPS, VOCAB))
    y_pred = y_pred.astype(np.float32)
    y_pred[:, 0, START] = 2.0  # the start token predicted right: masked
    for other in (clone, restored):
        np.testing.assert_array_equal(other(y_true, y_pred).numpy(), loss(y_true, y_pred).numpy())
    # None tokens survive the round trip too.
    none_config = fm.MaskedMAE(None, END).get_config()
    assert none_config["start_token"] is None
    assert fm.MaskedMAE.from_config(none_config).get_config() == none_config


def test_keras_file_round_trip(tmp_path):
    keras.utils.set_random_seed(1)
    x, y = copy_task(32)
    model = tiny_model()
    model.compile(optimizer="adam", loss=fm.MaskedMAE(START, END, reduction="sum"),
                  jit_compile=False)
    model.fit(x, y, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.loss, fm.MaskedMAE)
    assert loaded.loss.get_config() == model.loss.get_config()
    assert loaded.loss.reduction == "sum"
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    np.testing.assert_allclose(loaded.evaluate(x, y, verbose=0), model.evaluate(x, y, verbose=0),
                               rtol=1e-6)
    before = loaded.evaluate(x, y, verbose=0)
    loaded.fit(x, y, epochs=2, verbose=0)  # the restored loss trains too
    assert loaded.evaluate(x, y, verbose=0) != before


def test_integer_one_hot_targets_are_cast():
    y_true, y_pred = seq2seq_batch((2, 3, 5), tf.float32, 0, 4)
    loss = fm.MaskedMAE(0, 4)
    np.testing.assert_allclose(loss(tf.cast(y_true, tf.int32), y_pred).numpy(),
                               loss(y_true, y_pred).numpy())
