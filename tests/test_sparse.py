"""The sparse loss (class-id targets) equals the dense loss on one_hot(ids)."""

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
import numpy_reference as ref
from fused_masked_mae import core

DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]


def make(shape, num_classes, dtype, id_dtype=tf.int32, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, num_classes, size=shape)
    ids[..., shape[-1] // 2:] = num_classes - 1  # end-token padding
    y_pred = rng.random(shape + (num_classes,))
    # Every other position predicts its target (so masking happens).
    np.put_along_axis(y_pred, ids[..., None], 2.0, axis=-1)
    y_pred[..., ::2, :] = rng.random(y_pred[..., ::2, :].shape)
    return tf.constant(ids, id_dtype), tf.constant(y_pred, dtype)


def as_f64(x):
    return tf.cast(x, tf.float64).numpy()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("id_dtype", [tf.int32, tf.int64], ids=lambda d: d.name)
@pytest.mark.parametrize("shape,num_classes", [((5,), 1), ((3, 8), 7), ((2, 4, 6), 1549)])
def test_equals_dense_on_one_hot_bit_for_bit(shape, num_classes, dtype, id_dtype):
    ids, y_pred = make(shape, num_classes, dtype, id_dtype)
    one_hot = tf.one_hot(ids, num_classes, dtype=dtype)
    end = num_classes - 1
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(y_pred)
        sparse = fm.sparse_masked_mae(ids, y_pred, 0, end)
        dense = fm.masked_mae(one_hot, y_pred, 0, end)
    np.testing.assert_array_equal(as_f64(sparse), as_f64(dense))
    np.testing.assert_array_equal(as_f64(tape.gradient(sparse, y_pred)),
                                  as_f64(tape.gradient(dense, y_pred)))
    if num_classes > 1:
        assert (as_f64(sparse) == 0).any()  # some positions were masked
    # And the composite reference on one_hot agrees.
    np.testing.assert_allclose(
        as_f64(sparse), as_f64(fm.reference_sparse_masked_mae(ids, y_pred, 0, end)),
        rtol={tf.float16: 2e-3, tf.bfloat16: 2e-2, tf.float32: 1e-6, tf.float64: 1e-12}[dtype],
    )


def sparse_loss_and_grad(ids, y_pred):
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        loss = fm.sparse_masked_mae(ids, y_pred, 1, 8)
    return loss, tape.gradient(loss, y_pred)


def test_tf_function_with_unknown_shapes():
    ids, y_pred = make((4, 6), 9, tf.float32)
    loss_and_grad = tf.function(sparse_loss_and_grad, input_signature=[
        tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None, None, None], tf.float32)])
    loss, grad = loss_and_grad(ids, y_pred)
    dense = fm.masked_mae(tf.one_hot(ids, 9), y_pred, 1, 8)
    np.testing.assert_array_equal(loss.numpy(), dense.numpy())
    assert grad.shape == y_pred.shape


def test_core_sparse_matches_numpy():
    ids, y_pred = make((3, 5), 11, tf.float32, tf.int64)
    ids, y_pred = ids.numpy(), y_pred.numpy()
    one_hot = np.eye(11, dtype=np.float32)[ids]
    np.testing.assert_array_equal(core.forward(ids, y_pred, [0, 10], sparse=True),
                                  core.forward(one_hot, y_pred, [0, 10]))
    g = np.ones((3, 5), np.float32)
    np.testing.assert_array_equal(core.gradient(ids, y_pred, g, [0, 10], sparse=True),
                                  ref.gradient(one_hot, y_pred, g, [0, 10]))
    bf = y_pred.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(
        core.forward(ids.astype(np.int32), bf, [10], sparse=True).astype(np.float64),
        core.forward(one_hot.astype(ml_dtypes.bfloat16), bf, [10]).astype(np.float64))


def test_keras_fit_with_sparse_loss():
    import keras

    keras.utils.set_random_seed(0)
    vocab = 12
    x = np.random.default_rng(0).integers(0, vocab, size=(64, 5))
    y = x.copy()
    y[:, 3:] = vocab - 1
    model = keras.Sequential([keras.Input((5,), dtype="int32"),
                              keras.layers.Embedding(vocab, 16),
                              keras.layers.Dense(vocab, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=fm.SparseMaskedMAE(0, vocab - 1))
    history = model.fit(x, y, epochs=5, batch_size=16, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < history[0]
    # Same value as the dense loss on one-hot targets.
    pred = model.predict(x, verbose=0)
    sparse = fm.SparseMaskedMAE(0, vocab - 1)(y, pred)
    dense = fm.MaskedMAE(0, vocab - 1)(np.eye(vocab, dtype=np.float32)[y], pred)
    np.testing.assert_allclose(sparse.numpy(), dense.numpy(), rtol=1e-6)
    config = fm.SparseMaskedMAE(0, vocab - 1).get_config()
    assert fm.SparseMaskedMAE.from_config(config).get_config() == config


@pytest.mark.parametrize(
    "ids, pred_shape, error, match",
    [
        ([[0, 5]], (1, 2, 5), tf.errors.InvalidArgumentError, r"y_true_ids\[1\].* = 5 is outside \[0, 5\)"),
        ([[0, -1]], (1, 2, 5), tf.errors.InvalidArgumentError, r"= -1 is outside"),
        ([[0, 1, 2]], (1, 2, 5), (ValueError, tf.errors.InvalidArgumentError),
         r"y_true_ids must have y_pred's shape without its last dimension"),
    ],
)
def test_bad_ids_raise(ids, pred_shape, error, match):
    with pytest.raises(error, match=match):
        fm.sparse_masked_mae(tf.constant(ids, tf.int32), tf.zeros(pred_shape), 1, 2)


def test_float_ids_are_a_type_error():
    with pytest.raises(TypeError, match="int32 or int64"):
        fm.sparse_masked_mae(tf.constant([[0.0, 1.0]]), tf.zeros((1, 2, 5)), 1, 2)


def test_empty_batch():
    ids = tf.zeros((0, 4), tf.int32)
    y_pred = tf.zeros((0, 4, 6))
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        loss = fm.sparse_masked_mae(ids, y_pred, 1, 5)
    assert loss.shape == (0, 4)
    assert tape.gradient(loss, y_pred).shape == (0, 4, 6)


def test_sparse_loss_under_xla_falls_back_to_the_composite():
    ids, y_pred = make((4, 6), 9, tf.float32)
    loss, grad = tf.function(sparse_loss_and_grad, jit_compile=True)(ids, y_pred)
    eager, eager_grad = sparse_loss_and_grad(ids, y_pred)
    np.testing.assert_allclose(loss.numpy(), eager.numpy(), rtol=1e-6)
    np.testing.assert_allclose(grad.numpy(), eager_grad.numpy(), atol=1e-7)
