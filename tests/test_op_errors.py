"""Bad input gives a Python exception that names what is wrong, never a crash:
through the public API (eager and graph) and through the raw ops, where the
kernels re-check at run time what the shape functions could not know."""

import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
from fused_masked_mae import _loader
from fused_masked_mae._loader import ops_library

Invalid = (tf.errors.InvalidArgumentError, ValueError)
raw_forward = ops_library.import_fused_masked_mae_masked_mae
raw_grad = ops_library.import_fused_masked_mae_masked_mae_grad


@pytest.mark.parametrize(
    "y_true, y_pred, tokens, error, match",
    [
        (np.zeros((2, 3)), np.zeros((3, 3)), [0], Invalid,
         r"same shape, got y_true \[2,3\] and y_pred \[3,3\]"),
        (np.float32(1), np.float32(1), [0], Invalid, "rank"),
        (np.zeros((2, 0)), np.zeros((2, 0)), [], Invalid, r"must be positive, got shape \[2,0\]"),
        (np.zeros((2, 3)), np.zeros((2, 3)), [3], Invalid,
         r"masked token id 3 is outside \[0, 3\) for inputs with 3 classes"),
        (np.zeros((2, 3)), np.zeros((2, 3)), [7, 1], Invalid, "masked token id 7"),
    ],
)
def test_raw_forward_rejects(y_true, y_pred, tokens, error, match):
    t, p = tf.constant(y_true, tf.float32), tf.constant(y_pred, tf.float32)
    with pytest.raises(error, match=match):
        raw_forward(y_true=t, y_pred=p, masked_tokens=tokens)
    # Same in a graph whose shapes are unknown until run time (kernel checks).
    spec = tf.TensorSpec(None, tf.float32)
    graph = tf.function(lambda a, b: raw_forward(y_true=a, y_pred=b, masked_tokens=tokens),
                        input_signature=[spec, spec])
    with pytest.raises(error, match=match):
        graph(t, p)


def test_negative_token_rejected_by_the_op_and_the_wrapper():
    t = tf.zeros((2, 3))
    with pytest.raises(tf.errors.InvalidArgumentError, match="masked token ids must be >= 0, got -1"):
        raw_forward(y_true=t, y_pred=t, masked_tokens=[-1])
    with pytest.raises(ValueError, match="start_token must be a class id >= 0, got -2"):
        fm.masked_mae(t, t, -2, 1)
    with pytest.raises(TypeError, match="end_token must be an integer class id"):
        fm.masked_mae(t, t, 0, 1.5)


def test_public_api_out_of_range_token():
    t = tf.zeros((2, 4))
    with pytest.raises(Invalid, match=r"masked token id 9 is outside \[0, 4\)"):
        fm.masked_mae(t, t, 0, 9)
    with pytest.raises(Invalid, match=r"masked token id 9 is outside \[0, 4\)"):
        tf.function(lambda a: fm.masked_mae(a, a, 0, 9))(t)


@pytest.mark.parametrize("dtype", [tf.int32, tf.int64, tf.string, tf.bool])
def test_non_float_dtypes_are_type_errors(dtype):
    x = tf.zeros((2, 3), dtype)
    with pytest.raises(TypeError, match=f"y_true must be float16, bfloat16, float32 or float64, "
                                        f"got {dtype.name}"):
        fm.masked_mae(x, x, 0, 1)
    # The raw op's type check (an attr constraint) names the allowed dtypes.
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError),
                       match="half, bfloat16, float, double"):
        raw_forward(y_true=x, y_pred=x, masked_tokens=[0])


def test_mixed_float_dtypes_are_a_type_error():
    with pytest.raises(TypeError, match="same dtype, got float32 and float64"):
        fm.masked_mae(tf.zeros((2, 3)), tf.zeros((2, 3), tf.float64), 0, 1)


def test_grad_op_rejects_mismatched_upstream_shape():
    t = tf.zeros((2, 3, 4))
    with pytest.raises(Invalid, match=r"grad_loss must have the shape of the loss \[2,3\].*got \[3,2\]"):
        raw_grad(y_true=t, y_pred=t, grad_loss=tf.zeros((3, 2)), masked_tokens=[0])
    spec = tf.TensorSpec(None, tf.float32)
    graph = tf.function(
        lambda a, b, g: raw_grad(y_true=a, y_pred=b, grad_loss=g, masked_tokens=[0]),
        input_signature=[spec, spec, spec])
    with pytest.raises(tf.errors.InvalidArgumentError, match="grad_loss must have the shape"):
        graph(t, t, tf.zeros((2, 3, 1)))
    with pytest.raises(Invalid, match="same shape"):
        raw_grad(y_true=t, y_pred=tf.zeros((2, 3, 5)), grad_loss=tf.zeros((2, 3)),
                 masked_tokens=[0])
    with pytest.raises(Invalid, match=r"masked token id 4 is outside \[0, 4\)"):
        raw_grad(y_true=t, y_pred=t, grad_loss=tf.zeros((2, 3)), masked_tokens=[4])


def test_empty_batch_gives_empty_results():
    t = tf.zeros((0, 5, 3))
    assert fm.masked_mae(t, t, 0, 2).shape == (0, 5)
    assert raw_grad(y_true=t, y_pred=t, grad_loss=tf.zeros((0, 5)), masked_tokens=[]).shape == \
        (0, 5, 3)
    assert fm.masked_mae(tf.zeros((3, 0, 2)), tf.zeros((3, 0, 2)), 0, 1).shape == (3, 0)


def test_version_check_names_both_versions():
    with pytest.raises(ImportError, match=r"built against TensorFlow 2\.21\.0, but TensorFlow "
                                          r"2\.22\.1 is installed.*tensorflow==2\.21\.\*"):
        _loader.check_tensorflow_version(installed="2.22.1", built="2.21.0")
    _loader.check_tensorflow_version(installed="2.21.3", built="2.21.0")  # same minor: fine
    with pytest.raises(ImportError, match="2.20.0"):
        _loader.check_tensorflow_version(installed="2.20.0", built="2.21.0")
