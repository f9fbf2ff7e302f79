"""MaskedMAE as a Keras loss: compile/fit/evaluate, reductions, sample_weight,
serialization and .keras round trips."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
from test_op_parity import seq2seq_batch

VOCAB, START, END = 16, 1, 15


def tiny_model():
    return keras.Sequential([
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(VOCAB, 16),
        keras.layers.Dense(VOCAB, activation="softmax"),
    ])


def copy_task(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(2, VOCAB - 1, size=(n, 6))
    x[:, 0] = START
    x[:, 4:] = END
    return x, np.eye(VOCAB, dtype=np.float32)[x]


def test_fit_reduces_the_loss_and_evaluate_agrees():
    keras.utils.set_random_seed(0)
    x, y = copy_task()
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=fm.MaskedMAE(START, END))
    history = model.fit(x, y, epochs=6, batch_size=32, verbose=0).history["loss"]
    assert history[-1] < 0.8 * history[0], history
    evaluated = model.evaluate(x, y, batch_size=96, verbose=0)
    expected = keras.ops.mean(fm.masked_mae(y, model.predict(x, verbose=0), START, END))
    np.testing.assert_allclose(evaluated, float(expected), rtol=1e-5)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean",
                                       "mean_with_sample_weight", "none", None])
@pytest.mark.parametrize("weighted", [False, True])
def test_reductions_and_sample_weight_match_reference(reduction, weighted):
    y_true, y_pred = seq2seq_batch((4, 5, 9), tf.float32, START, 8)
    sample_weight = tf.constant(np.random.default_rng(1).random((4, 5)), tf.float32) \
        if weighted else None
    fused = fm.MaskedMAE(START, 8, reduction=reduction)(y_true, y_pred, sample_weight)
    ref = fm.ReferenceMaskedMAE(START, 8, reduction=reduction)(y_true, y_pred, sample_weight)
    assert fused.shape == ref.shape
    np.testing.assert_allclose(fused.numpy(), ref.numpy(), rtol=2e-6)


def test_integer_one_hot_targets_are_cast():
    y_true, y_pred = seq2seq_batch((2, 3, 5), tf.float32, 0, 4)
    loss = fm.MaskedMAE(0, 4)
    np.testing.assert_allclose(loss(tf.cast(y_true, tf.int32), y_pred).numpy(),
                               loss(y_true, y_pred).numpy())


def test_config_round_trip_and_serialization():
    loss = fm.MaskedMAE(START, END, reduction="sum", name="seq_loss")
    config = loss.get_config()
    assert config["start_token"] == START and config["end_token"] == END
    clone = fm.MaskedMAE.from_config(config)
    assert clone.get_config() == config
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, fm.MaskedMAE) and restored.get_config() == config


def test_keras_file_round_trip(tmp_path):
    keras.utils.set_random_seed(1)
    x, y = copy_task(32)
    model = tiny_model()
    model.compile(optimizer="adam", loss=fm.MaskedMAE(START, END))
    model.fit(x, y, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.loss, fm.MaskedMAE)
    assert loaded.loss.get_config() == model.loss.get_config()
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    np.testing.assert_allclose(loaded.evaluate(x, y, verbose=0), model.evaluate(x, y, verbose=0),
                               rtol=1e-6)
    loaded.fit(x, y, epochs=1, verbose=0)  # the restored loss trains too


def test_loss_in_low_precision_dtype():
    y_true, y_pred = seq2seq_batch((2, 3, 7), tf.float16, 0, 6)
    loss = fm.MaskedMAE(0, 6, dtype="float16", reduction="none")(y_true, y_pred)
    assert loss.dtype == tf.float16
    np.testing.assert_allclose(
        loss.numpy().astype(np.float64),
        fm.reference_masked_mae(y_true, y_pred, 0, 6).numpy().astype(np.float64), rtol=2e-3)
