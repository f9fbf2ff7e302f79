"""Keras' own loss tests, ported: `MaskedMAE()` with nothing masked is
`MeanAbsoluteError`, and `TfKerasMaskedMAE()` is tf_keras' `MeanAbsoluteError`.

Sources (read with the project's repository mirror, not vendored):
- keras-team/keras, tag v3.15.1 (commit 250b42181ce9f37df68319d8f4753ec89a349a43):
  keras/src/losses/losses_test.py, class MeanAbsoluteErrorTest (11 tests), and
  keras/src/losses/loss_test.py, class LossTest (15 tests, on `ExampleLoss`,
  a squared error: ported to the absolute error of inputs with a class axis
  of 1, where MAE is |y_true - y_pred| per position).
- keras-team/tf-keras, tag v2.21.0 (commit 631ed411d9e55e40b1ecaae7b046bba14752f46e):
  tf_keras/losses_test.py, class MeanAbsoluteErrorTest (11 tests).

Every test body runs twice, for Keras' class and for ours (`loss_cls`), with
the original expected values; where a test computes a loss, ours must also
equal Keras' to float rounding (the op sums the classes in another order).
Adaptations are marked "Port:". Not ported: tf_keras' test_ragged_tensor (the
fused op takes dense [..., C] tensors; ragged inputs raise a TypeError/
ValueError, asserted below), Keras 3's test_get_method (it tests
`losses.get("mse")`; ported as get() of a serialized loss), and integer
predictions (tf_keras computes their MAE in integers; ours names y_pred in a
TypeError: the ports pass float32 predictions).
"""

import pickle

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops
from keras.src import backend, dtype_policies
from keras.src.losses.loss import squeeze_or_expand_to_same_rank
from keras.src.testing import TestCase

import fused_masked_mae as fm
from fused_masked_mae import losses as fm_losses

KERAS_LOSSES = {"keras": keras.losses.MeanAbsoluteError, "fused": fm.MaskedMAE}


@pytest.fixture(params=list(KERAS_LOSSES))
def loss_cls(request):
    return KERAS_LOSSES[request.param]


def assert_same_as_keras(make_and_call):
    """make_and_call(cls) -> loss: ours equals MeanAbsoluteError's."""
    theirs = make_and_call(keras.losses.MeanAbsoluteError)
    ours = make_and_call(fm.MaskedMAE)
    assert backend.standardize_dtype(ours.dtype) == backend.standardize_dtype(theirs.dtype)
    assert tuple(ours.shape) == tuple(theirs.shape)
    np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(theirs, np.float64),
                               rtol=2e-6, atol=1e-7)


# --- keras/src/losses/losses_test.py: MeanAbsoluteErrorTest (Keras 3.15.1) --------

Y_TRUE = np.array([[1, 9, 2], [-5, -2, 6]])
Y_PRED = np.array([[4, 8, 12], [8, 1, 3]], dtype="float32")


class TestMeanAbsoluteError:
    t = TestCase()

    def test_config(self, loss_cls):
        self.t.run_class_serialization_test(loss_cls(name="myname"))

    def test_all_correct_unweighted(self, loss_cls):
        mae_obj = loss_cls()
        y_true = np.array([[4, 8, 12], [8, 1, 3]])
        loss = mae_obj(y_true, y_true)
        self.t.assertAlmostEqual(loss, 0.0)
        assert_same_as_keras(lambda cls: cls()(y_true, y_true))

    def test_unweighted(self, loss_cls):
        loss = loss_cls()(Y_TRUE, Y_PRED)
        self.t.assertAlmostEqual(loss, 5.5)
        assert_same_as_keras(lambda cls: cls()(Y_TRUE, Y_PRED))

    def test_scalar_weighted(self, loss_cls):
        loss = loss_cls()(Y_TRUE, Y_PRED, sample_weight=2.3)
        self.t.assertAlmostEqual(loss, 12.65)
        assert_same_as_keras(lambda cls: cls()(Y_TRUE, Y_PRED, sample_weight=2.3))

    def test_sample_weighted(self, loss_cls):
        sample_weight = np.array([[1.2], [3.4]])
        loss = loss_cls()(Y_TRUE, Y_PRED, sample_weight=sample_weight)
        self.t.assertAlmostEqual(loss, 81.4 / 6)
        assert_same_as_keras(lambda cls: cls()(Y_TRUE, Y_PRED, sample_weight=sample_weight))

    def test_timestep_weighted(self, loss_cls):
        y_true = np.asarray([1, 9, 2, -5, -2, 6]).reshape(2, 3, 1)
        y_pred = np.asarray([4, 8, 12, 8, 1, 3]).reshape(2, 3, 1)
        sample_weight = np.array([3, 6, 5, 0, 4, 2]).reshape((2, 3))
        loss = loss_cls()(y_true, y_pred, sample_weight=sample_weight)
        self.t.assertAlmostEqual(loss, 13.833333)
        assert_same_as_keras(lambda cls: cls()(y_true, y_pred, sample_weight=sample_weight))

    def test_zero_weighted(self, loss_cls):
        loss = loss_cls()(Y_TRUE, Y_PRED, sample_weight=0)
        self.t.assertAlmostEqual(loss, 0.0)

    def test_no_reduction(self, loss_cls):
        loss = loss_cls(reduction=None)(Y_TRUE, Y_PRED, sample_weight=2.3)
        self.t.assertAlmostEqual(loss, [10.7333, 14.5666])
        assert_same_as_keras(lambda cls: cls(reduction=None)(Y_TRUE, Y_PRED, sample_weight=2.3))

    def test_sum_reduction(self, loss_cls):
        loss = loss_cls(reduction="sum")(Y_TRUE, Y_PRED, sample_weight=2.3)
        self.t.assertAlmostEqual(loss, 25.29999)
        assert_same_as_keras(lambda cls: cls(reduction="sum")(Y_TRUE, Y_PRED, sample_weight=2.3))

    def test_mean_with_sample_weight_reduction(self, loss_cls):
        sample_weight = np.array([[1.2], [3.4]])
        loss = loss_cls(reduction="mean_with_sample_weight")(Y_TRUE, Y_PRED,
                                                              sample_weight=sample_weight)
        self.t.assertAlmostEqual(loss, (14 / 3 * 1.2 + 19 / 3 * 3.4) / (1.2 + 3.4))
        assert_same_as_keras(lambda cls: cls(reduction="mean_with_sample_weight")(
            Y_TRUE, Y_PRED, sample_weight=sample_weight))

    def test_dtype_arg(self, loss_cls):
        loss = loss_cls(dtype="bfloat16")(Y_TRUE, Y_PRED)
        self.t.assertDType(loss, "bfloat16")
        assert_same_as_keras(lambda cls: cls(dtype="bfloat16")(Y_TRUE, Y_PRED))


# --- keras/src/losses/loss_test.py: LossTest (Keras 3.15.1) ------------------------
# Port: ExampleLoss is (y_true - y_pred) ** 2 on [4] inputs; here the loss is
# the MAE of [4, 1] inputs (one class), |y_true - y_pred| per position, so
# every expected value uses abs() where the original squares.

def column(x):
    return np.asarray(x)[:, None]


class TestLoss:
    t = TestCase()

    @pytest.fixture(autouse=True)
    def keep_global_dtype_state(self):
        policy, floatx = dtype_policies.dtype_policy.dtype_policy(), backend.floatx()
        yield
        dtype_policies.dtype_policy.set_dtype_policy(policy)
        backend.set_floatx(floatx)

    def test_squeeze_or_expand(self):
        # Port: our rule (fused_masked_mae.losses._same_rank) against Keras'.
        for a_shape, b_shape in (((3,), (3, 1)), ((3, 2), (3, 2, 1)), ((3, 1), (3,)),
                                 ((3, 2, 1), (3, 2)), ((3, 2), (3, 2)), ((3, 2), (3, 2, 2))):
            a, b = ops.ones(a_shape), ops.ones(b_shape)
            ours = fm_losses._same_rank(a, b)
            theirs = squeeze_or_expand_to_same_rank(a, b)
            assert [tuple(x.shape) for x in ours] == [tuple(x.shape) for x in theirs]
        x1, x2 = fm_losses._same_rank(ops.ones((3,)), ops.ones((3, 1)))
        assert tuple(ops.shape(x1)) == (3, 1) and tuple(ops.shape(x2)) == (3, 1)
        x1, x2 = fm_losses._same_rank(ops.ones((3, 2)), ops.ones((3, 2, 1)))
        assert tuple(ops.shape(x1)) == (3, 2) and tuple(ops.shape(x2)) == (3, 2)

    def test_reduction(self, loss_cls):
        y_true = column([1.0, 0.0, 1.0, 0.0])
        y_pred = column([0.1, 0.2, 0.3, 0.4])
        diff = np.abs(y_true - y_pred)[:, 0]
        loss = loss_cls(reduction=None)(y_true, y_pred)
        assert backend.standardize_dtype(loss.dtype) == "float32"
        self.t.assertAllClose(diff, loss)
        loss = loss_cls(reduction="sum")(y_true, y_pred)
        self.t.assertAllClose(np.sum(diff), loss)
        loss = loss_cls(reduction="sum_over_batch_size")(y_true, y_pred)
        self.t.assertAllClose(np.sum(diff) / 4, loss)
        with pytest.raises(ValueError, match="Invalid value for argument"):
            loss_cls(reduction="abc")
        for reduction in (None, "sum", "sum_over_batch_size"):
            assert_same_as_keras(lambda cls: cls(reduction=reduction)(y_true, y_pred))

    def test_mask(self, loss_cls):
        mask = np.array([True, False, True, True])
        masked_y_true = np.array([1.0, 1.0, 0.0])
        masked_y_pred = np.array([0.1, 0.3, 0.4])

        def call(cls, mask):
            y_true = ops.convert_to_tensor(column([1.0, 0.0, 1.0, 0.0]))
            y_pred = ops.convert_to_tensor(column([0.1, 0.2, 0.3, 0.4]))
            backend.set_keras_mask(y_pred, ops.convert_to_tensor(mask))
            return cls()(y_true, y_pred)

        loss = call(loss_cls, mask)
        assert backend.standardize_dtype(loss.dtype) == "float32"
        self.t.assertAllClose(np.sum(np.abs(masked_y_true - masked_y_pred)) / 3, loss)
        assert_same_as_keras(lambda cls: call(cls, mask))
        # Everything masked: no NaN.
        loss = call(loss_cls, np.array([False] * 4))
        self.t.assertAllClose(loss, 0)

    def test_sample_weight(self, loss_cls):
        sample_weight = np.array([0.4, 0.3, 0.2, 0.1])
        y_true = column([1.0, 0.0, 1.0, 0.0])
        y_pred = column([0.1, 0.2, 0.3, 0.4])
        loss = loss_cls()(y_true, y_pred, sample_weight=sample_weight)
        assert backend.standardize_dtype(loss.dtype) == "float32"
        self.t.assertAllClose(np.sum(sample_weight * np.abs(y_true - y_pred)[:, 0]) / 4, loss)
        assert_same_as_keras(lambda cls: cls()(y_true, y_pred, sample_weight=sample_weight))
        loss = loss_cls()(y_true, y_pred, sample_weight=np.zeros(4))
        self.t.assertAllClose(loss, 0)

    def masked_call(self, cls, sample_weight, mask, y_true, y_pred):
        y_true, y_pred = ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
        backend.set_keras_mask(y_pred, ops.convert_to_tensor(mask))
        return cls()(y_true, y_pred, sample_weight=sample_weight)

    def test_mask_and_sample_weight(self, loss_cls):
        sample_weight = np.array([0.4, 0.3, 0.2, 0.1])
        mask = np.array([True, False, True, True])
        masked_sample_weight = np.array([0.4, 0.2, 0.1])
        masked_y_true = np.array([1.0, 1.0, 0.0])
        masked_y_pred = np.array([0.1, 0.3, 0.4])
        args = (sample_weight, mask, column([1.0, 0.0, 1.0, 0.0]), column([0.1, 0.2, 0.3, 0.4]))
        loss = self.masked_call(loss_cls, *args)
        assert backend.standardize_dtype(loss.dtype) == "float32"
        self.t.assertAllClose(
            np.sum(masked_sample_weight * np.abs(masked_y_true - masked_y_pred)) / 3, loss)
        assert_same_as_keras(lambda cls: self.masked_call(cls, *args))

    def test_mask_and_sample_weight_rank2(self, loss_cls):
        sample_weight = np.array([0.4, 0.3, 0.2, 0.1])
        mask = np.array([True, False, True, True])
        y_true = column([1.0, 0.0, 1.0, 0.0])
        y_pred = column([0.1, 0.2, 0.3, 0.4])
        rank1_loss = self.masked_call(loss_cls, sample_weight, mask, y_true, y_pred)
        # Duplicate rows. Port: [2, 4, 1] inputs.
        tile = lambda x: np.tile(x[None], (2,) + (1,) * x.ndim)  # noqa: E731
        rank2_loss = self.masked_call(loss_cls, tile(sample_weight), tile(mask), tile(y_true),
                                      tile(y_pred))
        self.t.assertAllClose(rank1_loss, rank2_loss)

    @pytest.mark.parametrize("uprank", ["mask", "sample_weight", "ys"])
    def test_rank_adjustment(self, loss_cls, uprank):
        sample_weight = np.array([0.4, 0.3, 0.2, 0.1])
        y_true = column([1.0, 0.0, 1.0, 0.0])
        y_pred = column([0.1, 0.2, 0.3, 0.4])
        mask = np.array([True, False, True, True])
        if uprank == "mask":
            mask = np.expand_dims(mask, -1)
        elif uprank == "sample_weight":
            sample_weight = np.expand_dims(sample_weight, -1)
        elif uprank == "ys":
            y_true = np.expand_dims(y_true, -1)
            y_pred = np.expand_dims(y_pred, -1)
        masked_sample_weight = np.array([0.4, 0.2, 0.1])
        masked_y_true = np.array([1.0, 1.0, 0.0])
        masked_y_pred = np.array([0.1, 0.3, 0.4])
        args = (sample_weight, mask, y_true, y_pred)
        loss = self.masked_call(loss_cls, *args)
        assert backend.standardize_dtype(loss.dtype) == "float32"
        self.t.assertAllClose(
            np.sum(masked_sample_weight * np.abs(masked_y_true - masked_y_pred)) / 3, loss)
        assert_same_as_keras(lambda cls: self.masked_call(cls, *args))

    def test_mixed_dtypes(self, loss_cls):
        sample_weight = np.array([0.4, 0.3, 0.2, 0.1], dtype="float64")
        y_true = column(np.array([1.0, 0.0, 1.0, 0.0], dtype="int32"))
        y_pred = column(np.array([0.1, 0.2, 0.3, 0.4], dtype="float32"))
        loss = loss_cls()(y_true, y_pred, sample_weight=sample_weight)
        assert backend.standardize_dtype(loss.dtype) == "float32"
        self.t.assertAllClose(np.sum(sample_weight * np.abs(y_true - y_pred)[:, 0]) / 4, loss)
        assert_same_as_keras(lambda cls: cls()(y_true, y_pred, sample_weight=sample_weight))

    def test_pickle(self, loss_cls):
        # Port: the loss object instead of the "mse" function.
        loss = pickle.loads(pickle.dumps(loss_cls(reduction="sum", name="x")))
        assert isinstance(loss, loss_cls) and loss.get_config() == loss_cls(
            reduction="sum", name="x").get_config()

    def test_get_method(self, loss_cls):
        # Port: losses.get of a serialized loss (and None, and a typo).
        loss = keras.losses.get(keras.losses.serialize(loss_cls(reduction="sum")))
        assert isinstance(loss, loss_cls) and loss.reduction == "sum"
        assert keras.losses.get(None) is None
        with pytest.raises(ValueError):
            keras.losses.get("typo")

    def test_dtype_arg(self, loss_cls):
        y_true = column(np.array([1.0, 0.0, 1.0, 0.0], dtype="float32"))
        y_pred = column(np.array([0.1, 0.2, 0.3, 0.4], dtype="float32"))
        loss = loss_cls(dtype="float16")(y_true, y_pred)
        self.t.assertDType(loss, "float16")
        loss_fn = loss_cls(dtype=dtype_policies.DTypePolicy("mixed_float16"))
        self.t.assertDType(loss_fn(y_true, y_pred), "float16")
        with pytest.raises(AttributeError):
            loss_fn.dtype = "bfloat16"

    def test_default_dtype(self, loss_cls):
        y_true = column(np.array([1.0, 0.0, 1.0, 0.0], dtype="float32"))
        y_pred = column(np.array([0.1, 0.2, 0.3, 0.4], dtype="float32"))
        dtype_policies.dtype_policy.set_dtype_policy("mixed_float16")
        self.t.assertDType(loss_cls()(y_true, y_pred), "float32")
        backend.set_floatx("float16")
        self.t.assertDType(loss_cls()(y_true, y_pred), backend.floatx())


# --- tf_keras/losses_test.py: MeanAbsoluteErrorTest (tf-keras 2.21.0) --------------
# Run eagerly and inside tf.function (the original's "graph" and "eager" modes).

@pytest.fixture(params=["keras", "fused"])
def tf_keras_loss_cls(request):
    tf_keras = pytest.importorskip("tf_keras")
    if request.param == "keras":
        return tf_keras.losses.MeanAbsoluteError
    return fm_losses.TfKerasMaskedMAE


@pytest.fixture(params=["eager", "function"])
def run_mode(request):
    if request.param == "eager":
        return lambda f: f()
    return lambda f: tf.function(f)()


def tf_keras_same(make_and_call):
    tf_keras = pytest.importorskip("tf_keras")
    theirs = make_and_call(tf_keras.losses.MeanAbsoluteError)
    ours = make_and_call(fm_losses.TfKerasMaskedMAE)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=2e-6)


TK_TRUE = lambda: tf.constant([1, 9, 2, -5, -2, 6], shape=(2, 3))  # noqa: E731
TK_PRED = lambda: tf.constant([4, 8, 12, 8, 1, 3], shape=(2, 3), dtype=tf.float32)  # noqa: E731


class TestTfKerasMeanAbsoluteError:
    def test_config(self, tf_keras_loss_cls):
        from tf_keras.losses import Reduction  # losses_utils.ReductionV2

        mae_obj = tf_keras_loss_cls(reduction=Reduction.SUM, name="mae_1")
        assert mae_obj.name == "mae_1"
        assert mae_obj.reduction == Reduction.SUM

    def test_all_correct_unweighted(self, tf_keras_loss_cls, run_mode):
        # Port: y_pred as float32 (the original's int32 y_pred gives tf_keras an
        # int32 loss; the fused loss refuses integer predictions, naming y_pred).
        loss = run_mode(lambda: tf_keras_loss_cls()(TK_TRUE(), tf.cast(TK_TRUE(), tf.float32)))
        assert loss.numpy() == pytest.approx(0.0, abs=1e-3)

    def test_unweighted(self, tf_keras_loss_cls, run_mode):
        loss = run_mode(lambda: tf_keras_loss_cls()(TK_TRUE(), TK_PRED()))
        assert loss.numpy() == pytest.approx(5.5, abs=1e-3)
        tf_keras_same(lambda cls: run_mode(lambda: cls()(TK_TRUE(), TK_PRED())))

    def test_scalar_weighted(self, tf_keras_loss_cls, run_mode):
        loss = run_mode(lambda: tf_keras_loss_cls()(TK_TRUE(), TK_PRED(), sample_weight=2.3))
        assert loss.numpy() == pytest.approx(12.65, abs=1e-3)
        tf_keras_same(lambda cls: run_mode(lambda: cls()(TK_TRUE(), TK_PRED(), sample_weight=2.3)))

    def test_sample_weighted(self, tf_keras_loss_cls, run_mode):
        weight = lambda: tf.constant([1.2, 3.4], shape=(2, 1))  # noqa: E731
        loss = run_mode(lambda: tf_keras_loss_cls()(TK_TRUE(), TK_PRED(), sample_weight=weight()))
        assert loss.numpy() == pytest.approx(81.4 / 6, abs=1e-3)
        tf_keras_same(lambda cls: run_mode(
            lambda: cls()(TK_TRUE(), TK_PRED(), sample_weight=weight())))

    def test_timestep_weighted(self, tf_keras_loss_cls, run_mode):
        def call(cls):
            y_true = tf.constant([1, 9, 2, -5, -2, 6], shape=(2, 3, 1))
            y_pred = tf.constant([4, 8, 12, 8, 1, 3], shape=(2, 3, 1), dtype=tf.float32)
            sample_weight = tf.constant([3, 6, 5, 0, 4, 2], shape=(2, 3))
            return cls()(y_true, y_pred, sample_weight=sample_weight)

        assert run_mode(lambda: call(tf_keras_loss_cls)).numpy() == pytest.approx(83 / 6, abs=1e-3)
        tf_keras_same(lambda cls: run_mode(lambda: call(cls)))

    def test_zero_weighted(self, tf_keras_loss_cls, run_mode):
        loss = run_mode(lambda: tf_keras_loss_cls()(TK_TRUE(), TK_PRED(), sample_weight=0))
        assert loss.numpy() == pytest.approx(0.0, abs=1e-3)

    def test_invalid_sample_weight(self, tf_keras_loss_cls):
        # Port: y_pred made float32 (ours refuses integer predictions by design:
        # the original's int32 y_pred reaches tf_keras' MAE only through a cast).
        y_true = tf.constant([1, 9, 2, -5, -2, 6], shape=(2, 3, 1))
        y_pred = tf.constant([4, 8, 12, 8, 1, 3], shape=(2, 3, 1), dtype=tf.float32)
        sample_weight = tf.constant([3, 6, 5, 0], shape=(2, 2))
        with pytest.raises((ValueError, tf.errors.InvalidArgumentError),
                           match=r"Incompatible shapes: \[2,3\] vs. \[2,2\]|Dimensions must be "
                                 r"equal"):
            tf_keras_loss_cls()(y_true, y_pred, sample_weight=sample_weight)

    def test_no_reduction(self, tf_keras_loss_cls, run_mode):
        from tf_keras.losses import Reduction

        def call(cls):
            return cls(reduction=Reduction.NONE)(TK_TRUE(), TK_PRED(),
                                                                sample_weight=2.3)

        np.testing.assert_allclose(run_mode(lambda: call(tf_keras_loss_cls)).numpy(),
                                   [10.7333, 14.5666], atol=1e-3)
        tf_keras_same(lambda cls: run_mode(lambda: call(cls)))

    def test_sum_reduction(self, tf_keras_loss_cls, run_mode):
        from tf_keras.losses import Reduction

        def call(cls):
            return cls(reduction=Reduction.SUM)(TK_TRUE(), TK_PRED(),
                                                               sample_weight=2.3)

        assert run_mode(lambda: call(tf_keras_loss_cls)).numpy() == pytest.approx(25.29999,
                                                                                   abs=1e-3)
        tf_keras_same(lambda cls: run_mode(lambda: call(cls)))

    def test_ragged_tensor_is_refused_clearly(self):
        # Not ported: tf_keras' MAE averages rows of different lengths; the
        # fused op takes dense [..., C] tensors and says so.
        y_true = tf.ragged.constant([[1, 9, 2], [-5, -2]], dtype=tf.float32)
        y_pred = tf.ragged.constant([[4, 8, 12], [8, 1]], dtype=tf.float32)
        with pytest.raises((TypeError, ValueError)):
            fm_losses.TfKerasMaskedMAE()(y_true, y_pred)
