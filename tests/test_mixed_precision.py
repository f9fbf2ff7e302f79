"""Mixed precision: training under the mixed_float16 / mixed_bfloat16 policies."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
from fused_masked_mae.losses import MaskedMAE
from test_op_parity import f64, seq2seq_batch

VOCAB, START, END = 12, 1, 10


@pytest.fixture
def policy(request):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy(previous)


def copy_task(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(2, VOCAB - 1, size=(n, 6))
    x[:, 0] = START
    x[:, 4:] = END
    return x, np.eye(VOCAB, dtype=np.float32)[x]


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("loss_dtype", [None, "low"])
@pytest.mark.parametrize("jit_compile", [False, True], ids=["op", "xla"])
def test_fit_under_mixed_policy(policy, loss_dtype, jit_compile):
    compute = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}[policy]
    keras.utils.set_random_seed(0)
    x, y = copy_task()
    model = keras.Sequential([
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(VOCAB, 16),
        keras.layers.Dense(VOCAB, activation="softmax"),  # float16/bfloat16 outputs
    ])
    assert model.layers[-1].compute_dtype == compute
    loss = MaskedMAE(START, END, dtype=compute if loss_dtype == "low" else None)
    assert loss.dtype == (compute if loss_dtype == "low" else "float32")
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=loss, jit_compile=jit_compile)
    if policy == "mixed_float16":
        # Keras wraps the optimizer for dynamic loss scaling.
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = model.fit(x, y, epochs=4, batch_size=32, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)), history
    assert history[-1] < 0.8 * history[0], history
    # The trained model's loss: what the op computes on its low-precision predictions.
    pred = model.predict(x, verbose=0)
    assert str(pred.dtype) == compute
    evaluated = model.evaluate(x, y, batch_size=64, verbose=0)
    loss_dtype_tf = tf.as_dtype(loss.dtype)
    expected = tf.reduce_mean(tf.cast(
        fm.reference_masked_mae(tf.cast(y, loss_dtype_tf), tf.cast(pred, loss_dtype_tf),
                                START, END), tf.float32))
    # Under XLA, evaluate's and predict's compiled low-precision forward passes
    # may round differently (the loss itself equals the op's: tests/test_xla.py).
    rtol = 2e-2 if loss_dtype or (jit_compile and compute == "bfloat16") else 1e-5
    np.testing.assert_allclose(evaluated, float(expected), rtol=rtol)


@pytest.mark.parametrize("dtype, rtol", [("float16", 2e-3), ("bfloat16", 1.6e-2)])
def test_low_dtype_loss_matches_reference(dtype, rtol):
    y_true, y_pred = seq2seq_batch((4, 5, 13), tf.as_dtype(dtype), START, END)
    weights = tf.constant(np.random.default_rng(4).random((4, 5)), tf.float32)
    for reduction in ("none", "sum_over_batch_size"):
        fused = MaskedMAE(START, END, tokens=[3], dtype=dtype, reduction=reduction)(
            y_true, y_pred, weights)
        ref = fm.ReferenceMaskedMAE(START, END, tokens=[3], dtype=dtype, reduction=reduction)(
            y_true, y_pred, weights)
        assert fused.dtype == tf.as_dtype(dtype)
        np.testing.assert_allclose(f64(fused), f64(ref), rtol=rtol)


def test_default_loss_dtype_is_float32_for_low_precision_predictions():
    y_true, y_pred = seq2seq_batch((4, 5, 13), tf.float16, START, END)
    loss = MaskedMAE(START, END, reduction="none")(y_true, y_pred)
    assert loss.dtype == tf.float32
    np.testing.assert_allclose(
        loss.numpy(),
        fm.masked_mae(tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32), START, END),
        rtol=1e-6)
