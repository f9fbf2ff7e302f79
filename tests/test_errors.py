"""Bad input gives a Python exception that says what is wrong, never a crash.

Where each error comes from:
- the Python wrapper (fm.masked_mae & co.): TypeError for non-float or mixed
  dtypes and non-integer token ids, ValueError for negative ids or too many;
- the op's shape function, at graph construction when shapes are static:
  ValueError;
- the kernels, eagerly and in graphs whose shapes are unknown until run time:
  tf.errors.InvalidArgumentError.
Every case is run through the public API and through the raw ops
(`ops_library.import_fused_masked_mae_masked_mae[_grad]`), eagerly and in graphs.
"""

import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
from fused_masked_mae import _loader
from fused_masked_mae._loader import ops_library
from raw_ops import raw_forward, raw_grad

IAE = tf.errors.InvalidArgumentError

FLOAT_DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]


def unknown_shape_function(fn, count, dtype=tf.float32):
    """fn as a tf.function whose inputs have unknown rank: only the kernel can check."""
    return tf.function(fn, input_signature=[tf.TensorSpec(None, dtype)] * count)


def public_forward(tokens):
    return lambda t, p: fm.masked_mae_tokens(t, p, tokens)


def raw_forward_fn(tokens):
    return lambda t, p: raw_forward(y_true=t, y_pred=p, masked_tokens=tokens)


# (name, y_true shape, y_pred shape, tokens, kernel message, shape-function message)
BAD_INPUTS = [
    ("mismatched-shapes", (2, 3), (3, 3), [0],
     r"y_true and y_pred must have the same shape, got y_true \[2,3\] and y_pred \[3,3\]",
     r"same shape, got y_true \[2,3\] and y_pred \[3,3\]"),
    ("mismatched-classes", (2, 4, 3), (2, 4, 5), [],
     r"same shape, got y_true \[2,4,3\] and y_pred \[2,4,5\]",
     r"same shape, got y_true \[2,4,3\] and y_pred \[2,4,5\]"),
    ("mismatched-rank", (6,), (2, 3), [],
     r"same shape, got y_true \[6\] and y_pred \[2,3\]",
     r"same shape, got y_true \[6\] and y_pred \[2,3\]"),
    ("rank-0", (), (), [], r"y_pred must have rank >= 1 \(a last axis of classes\), got shape \[\]",
     r"Shape must be at least rank 1 but is rank 0"),
    ("zero-classes", (2, 0), (2, 0), [],
     r"the last dimension \(classes\) must be positive, got shape \[2,0\]",
     r"the last dimension \(classes\) must be positive, got shape \[2,0\]"),
    ("token-equal-to-C", (2, 3), (2, 3), [0, 3],
     r"masked token id 3 is outside \[0, 3\) for inputs with 3 classes",
     r"masked token id 3 is outside \[0, 3\) for inputs with 3 classes"),
    ("token-far-out", (4, 5, 7), (4, 5, 7), [2**40],
     r"masked token id 1099511627776 is outside \[0, 7\) for inputs with 7 classes",
     r"masked token id 1099511627776 is outside \[0, 7\) for inputs with 7 classes"),
]
BAD_IDS = [case[0] for case in BAD_INPUTS]


@pytest.mark.parametrize("name, true_shape, pred_shape, tokens, kernel_msg, shape_fn_msg",
                         BAD_INPUTS, ids=BAD_IDS)
@pytest.mark.parametrize("api", ["public", "raw"])
def test_forward_rejects_bad_inputs(api, name, true_shape, pred_shape, tokens, kernel_msg,
                                    shape_fn_msg):
    y_true, y_pred = tf.zeros(true_shape), tf.ones(pred_shape)
    fn = public_forward(tokens) if api == "public" else raw_forward_fn(tokens)
    # Eager: the kernel's check.
    with pytest.raises(IAE, match=kernel_msg):
        fn(y_true, y_pred)
    # A graph with static shapes: the shape function, at graph construction.
    with pytest.raises(ValueError, match=shape_fn_msg):
        tf.function(fn)(y_true, y_pred)
    # A graph with unknown shapes: the kernel again, at run time.
    with pytest.raises(IAE, match=kernel_msg):
        unknown_shape_function(fn, 2)(y_true, y_pred)


# The gradient op has no token ids (it takes the forward's row_keep).
GRAD_BAD_INPUTS = [case for case in BAD_INPUTS if not case[0].startswith("token")]


@pytest.mark.parametrize("name, true_shape, pred_shape, tokens, kernel_msg, shape_fn_msg",
                         GRAD_BAD_INPUTS, ids=[case[0] for case in GRAD_BAD_INPUTS])
def test_grad_op_rejects_bad_inputs(name, true_shape, pred_shape, tokens, kernel_msg,
                                    shape_fn_msg):
    y_true, y_pred = tf.zeros(true_shape), tf.ones(pred_shape)
    grad_loss = tf.ones(pred_shape[:-1])

    def fn(t, p, g):  # the gradient op alone, with a row_keep of the loss's shape
        return raw_grad(y_true=t, y_pred=p, grad_loss=g, row_keep=tf.ones_like(g, tf.uint8))

    with pytest.raises(IAE, match=kernel_msg):
        fn(y_true, y_pred, grad_loss)
    with pytest.raises(ValueError, match=shape_fn_msg):
        tf.function(fn)(y_true, y_pred, grad_loss)
    with pytest.raises(IAE, match=kernel_msg):
        unknown_shape_function(fn, 3)(y_true, y_pred, grad_loss)


@pytest.mark.parametrize("grad_shape, shown", [((3,), r"\[3\]"), ((2, 3, 1), r"\[2,3,1\]"),
                                               ((3, 2), r"\[3,2\]"), ((), r"\[\]")],
                         ids=["3", "2x3x1", "3x2", "scalar"])
def test_grad_op_rejects_mismatched_grad_loss(grad_shape, shown):
    y = tf.zeros((2, 3, 4))
    g = tf.ones(grad_shape)
    message = (r"grad_loss must have the shape of the loss \[2,3\] \(y_pred's shape without its "
               r"last dimension\), got " + shown)

    def fn(t, p, g):
        return raw_grad(y_true=t, y_pred=p, grad_loss=g, masked_tokens=[0])

    with pytest.raises(IAE, match=message):
        fn(y, y, g)
    with pytest.raises(ValueError, match=message):
        tf.function(fn)(y, y, g)
    with pytest.raises(IAE, match=message):
        unknown_shape_function(fn, 3)(y, y, g)
    # Partly known shapes: the loss shape is [2, ?] at trace time. A grad_loss
    # of another rank is caught then; [?, ?] only by the kernel.
    partly = tf.function(fn, input_signature=[tf.TensorSpec([2, None, 4])] * 2 +
                         [tf.TensorSpec([None] * len(grad_shape))])
    if len(grad_shape) == 2:
        with pytest.raises(IAE, match=message):
            partly(y, y, g)
    else:
        with pytest.raises(ValueError, match=r"grad_loss must have the shape of the loss \[2,\?\]"):
            partly(y, y, g)


@pytest.mark.parametrize("keep_shape, shown", [((3,), r"\[3\]"), ((2, 3, 1), r"\[2,3,1\]"),
                                               ((), r"\[\]")], ids=["3", "2x3x1", "scalar"])
def test_grad_op_rejects_mismatched_row_keep(keep_shape, shown):
    y = tf.zeros((2, 3, 4))
    message = (r"row_keep must have the shape of the loss \[2,3\] \(y_pred's shape without its "
               r"last dimension\), got " + shown)

    def fn(t, p, k):
        return raw_grad(y_true=t, y_pred=p, grad_loss=tf.ones((2, 3)), row_keep=k)

    keep = tf.ones(keep_shape, tf.uint8)
    with pytest.raises(IAE, match=message):
        fn(y, y, keep)
    with pytest.raises(ValueError, match=message):
        tf.function(fn)(y, y, keep)
    with pytest.raises(IAE, match=message):
        tf.function(fn, input_signature=[tf.TensorSpec(None, tf.float32)] * 2 +
                    [tf.TensorSpec(None, tf.uint8)])(y, y, keep)
    with pytest.raises((IAE, TypeError), match="uint8"):
        fn(y, y, tf.ones((2, 3), tf.int32))


def test_grad_op_reads_any_nonzero_keep_byte_as_kept():
    y_true = tf.constant([[1.0, 0.0, 0.0]] * 4)
    y_pred = tf.constant([[0.5, 0.2, 0.3]] * 4)
    grad = raw_grad(y_true=y_true, y_pred=y_pred, grad_loss=tf.ones((4,)),
                    row_keep=tf.constant([0, 1, 2, 255], tf.uint8)).numpy()
    assert (grad[0] == 0).all()
    np.testing.assert_array_equal(grad[1:], np.broadcast_to(grad[1], (3, 3)))
    assert (grad[1] != 0).all()


def test_grad_op_rejects_mismatched_grad_loss_dtype():
    y = tf.zeros((2, 3))
    with pytest.raises((IAE, TypeError), match="expected to be a float tensor but is a double"):
        raw_grad(y_true=y, y_pred=y, grad_loss=tf.ones((2,), tf.float64), masked_tokens=[])
    with pytest.raises(TypeError, match="float64.*float32|float32.*float64"):
        tf.function(lambda t, p, g: raw_grad(y_true=t, y_pred=p, grad_loss=g, masked_tokens=[]))(
            y, y, tf.ones((2,), tf.float64))


@pytest.mark.parametrize("dtype", [tf.int32, tf.int64, tf.uint8, tf.bool, tf.string,
                                   tf.complex64], ids=lambda d: d.name)
def test_non_float_dtypes(dtype):
    x = tf.zeros((2, 3), dtype)
    message = f"y_true must be float16, bfloat16, float32 or float64, got {dtype.name}"
    with pytest.raises(TypeError, match=message):
        fm.masked_mae(x, x, 0, 1)
    with pytest.raises(TypeError, match=message):
        tf.function(lambda a: fm.masked_mae(a, a, 0, 1))(x)
    with pytest.raises(TypeError, match="y_pred must be float16, bfloat16, float32 or float64"):
        fm.masked_mae(tf.zeros((2, 3)), x, 0, 1)
    # The raw op's type attr names the allowed types: eagerly a kernel-lookup
    # error, in a graph a TypeError from op construction.
    eager = (rf"Value for attr 'T' of {dtype.name} is not in the list of allowed values: "
             r"half, bfloat16, float, double")
    graph = (rf"Value passed to parameter 'y_true' has DataType {dtype.name} not in list of "
             r"allowed values: float16, bfloat16, float32, float64")
    with pytest.raises((IAE, TypeError), match=eager):
        raw_forward(y_true=x, y_pred=x, masked_tokens=[0])
    with pytest.raises(TypeError, match=graph):
        tf.function(lambda a: raw_forward(y_true=a, y_pred=a, masked_tokens=[0]))(x)
    with pytest.raises((IAE, TypeError), match=eager):
        raw_grad(y_true=x, y_pred=x, grad_loss=tf.zeros((2,), dtype),
                 row_keep=tf.ones((2,), tf.uint8))


def test_python_int_and_string_inputs_are_type_errors():
    with pytest.raises(TypeError, match="got int32"):
        fm.masked_mae([[0, 1]], [[1, 0]], 0, 1)
    with pytest.raises(TypeError, match="got string"):
        fm.masked_mae([["a", "b"]], [["a", "b"]], 0, 1)


def test_mixed_float_dtypes():
    with pytest.raises(TypeError, match="y_true and y_pred must have the same dtype, got float32 "
                                        "and float64"):
        fm.masked_mae(tf.zeros((2, 3)), tf.zeros((2, 3), tf.float64), 0, 1)
    with pytest.raises((IAE, TypeError), match="double|float64"):
        raw_forward(y_true=tf.zeros((2, 3)), y_pred=tf.zeros((2, 3), tf.float64),
                    masked_tokens=[])


@pytest.mark.parametrize("kwargs, message", [
    (dict(start_token=-1, end_token=2), r"start_token must be a class id in \[0, 2\*\*63\), got -1"),
    (dict(start_token=0, end_token=-5), r"end_token must be a class id in \[0, 2\*\*63\), got -5"),
    (dict(start_token=0, end_token=1, tokens=[2, -3]), r"tokens must be a class id in \[0, 2\*\*63\), got -3"),
], ids=["start", "end", "tokens"])
def test_negative_token_ids_in_the_wrapper(kwargs, message):
    x = tf.zeros((2, 3))
    with pytest.raises(ValueError, match=message):
        fm.masked_mae(x, x, **kwargs)
    with pytest.raises(ValueError, match=message):
        fm.MaskedMAE(**kwargs)


def test_negative_token_ids_in_the_raw_ops():
    x = tf.zeros((2, 3))
    # At kernel construction, before the inputs (and C) are known.
    with pytest.raises(IAE, match=r"masked token id -1 is negative: class ids are >= 0"):
        raw_forward(y_true=x, y_pred=x, masked_tokens=[0, -1])
    # In a graph the shape function applies the same rule, before C is known.
    with pytest.raises(ValueError, match=r"masked token id -1 is negative: class ids are >= 0"):
        unknown_shape_function(raw_forward_fn([-1]), 2)(x, x)
    # With a static C the shape function names the id and C.
    with pytest.raises(ValueError, match=r"masked token id -1 is outside \[0, 3\) for inputs "
                                         r"with 3 classes"):
        tf.function(raw_forward_fn([-1]))(x, x)


@pytest.mark.parametrize("token, shown", [(1.5, "1.5"), ("1", "'1'"), (True, "True"),
                                          ([1], r"\[1\]")], ids=["float", "str", "bool", "list"])
def test_non_integer_token_ids(token, shown):
    x = tf.zeros((2, 3))
    with pytest.raises(TypeError, match=f"end_token must be an integer class id or None, got "
                                        f"{shown}"):
        fm.masked_mae(x, x, 0, token)
    with pytest.raises(TypeError, match="start_token must be an integer class id or None"):
        fm.MaskedMAE(token, 1)


def test_numpy_integer_token_ids_are_accepted():
    x = tf.one_hot([[1, 2]], 3)
    loss = fm.masked_mae(x, x, np.int64(1), np.int32(2))
    np.testing.assert_array_equal(loss.numpy(), [[0.0, 0.0]])


def test_tokens_must_be_a_list():
    with pytest.raises(TypeError, match="tokens must be a list of integer class ids"):
        fm.masked_mae(tf.zeros((2, 3)), tf.zeros((2, 3)), tokens="12")
    with pytest.raises(TypeError, match="tokens must be a list of integer class ids"):
        fm.masked_mae(tf.zeros((2, 3)), tf.zeros((2, 3)), tokens=5)


def test_too_many_masked_tokens():
    x = tf.zeros((2, 300))
    with pytest.raises(ValueError, match=r"got 257 distinct masked token ids, but the fused op "
                                         r"supports at most 256"):
        fm.masked_mae_tokens(x, x, list(range(257)))
    with pytest.raises(IAE, match="got 257 distinct masked token ids, but the fused op "
                                  "supports at most 256"):
        raw_forward(y_true=x, y_pred=x, masked_tokens=list(range(257)))
    # The one token rule: repeats count once in the raw op too.
    raw_forward(y_true=x, y_pred=x, masked_tokens=[5] * 300)
    # 256 distinct ids (with repeats) are fine.
    loss = fm.masked_mae_tokens(x, x, list(range(256)) + [0, 1])
    np.testing.assert_array_equal(loss.numpy(), [0.0, 0.0])


def test_out_of_range_token_through_the_keras_loss():
    x = tf.zeros((2, 4))
    with pytest.raises(IAE, match=r"masked token id 9 is outside \[0, 4\) for inputs with 4 "
                                  r"classes"):
        fm.MaskedMAE(0, 9)(x, x)


def test_errors_leave_the_op_usable():
    """After every kind of rejected input, the op still computes correctly."""
    good_t = tf.one_hot([[1, 2, 0]], 3)
    good_p = tf.constant([[[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]]])
    before = fm.masked_mae(good_t, good_p, 1, 2).numpy()
    for bad in (lambda: fm.masked_mae(tf.zeros((2, 3)), tf.zeros((3, 3))),
                lambda: fm.masked_mae(tf.zeros((2, 0)), tf.zeros((2, 0))),
                lambda: fm.masked_mae(tf.zeros((2, 3)), tf.zeros((2, 3)), 0, 3)):
        with pytest.raises(IAE):
            bad()
    np.testing.assert_array_equal(fm.masked_mae(good_t, good_p, 1, 2).numpy(), before)
    np.testing.assert_allclose(before, [[0.0, 1.8 / 3, 1.6 / 3]], rtol=1e-6)


# --- Empty inputs -------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=[d.name for d in FLOAT_DTYPES])
@pytest.mark.parametrize("shape", [(0, 3), (0, 5, 3), (3, 0, 2), (2, 3, 0, 4)], ids=str)
def test_empty_batch_gives_empty_results(shape, dtype):
    y_true, y_pred = tf.zeros(shape, dtype), tf.ones(shape, dtype)
    loss = fm.masked_mae(y_true, y_pred, 0, shape[-1] - 1)
    assert loss.shape == shape[:-1] and loss.dtype == dtype
    grad = raw_grad(y_true=y_true, y_pred=y_pred, grad_loss=tf.ones(shape[:-1], dtype),
                    masked_tokens=[0])
    assert grad.shape == shape and grad.dtype == dtype
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y_true, y_pred])
        loss = tf.reduce_sum(fm.masked_mae(y_true, y_pred, 0, 1))
    assert float(loss) == 0.0
    assert tape.gradient(loss, y_pred).shape == shape
    assert tape.gradient(loss, y_true).shape == shape
    # The same in a graph whose shapes are only known at run time.
    graph = unknown_shape_function(lambda t, p: fm.masked_mae(t, p, 0, 1), 2, dtype)
    assert graph(y_true, y_pred).shape == shape[:-1]


def test_empty_batch_still_checks_classes_and_tokens():
    with pytest.raises(IAE, match=r"must be positive, got shape \[0,0\]"):
        fm.masked_mae(tf.zeros((0, 0)), tf.zeros((0, 0)))
    with pytest.raises(IAE, match=r"masked token id 5 is outside \[0, 3\)"):
        fm.masked_mae(tf.zeros((0, 3)), tf.zeros((0, 3)), 0, 5)
    with pytest.raises(IAE, match=r"grad_loss must have the shape of the loss \[0\]"):
        raw_grad(y_true=tf.zeros((0, 3)), y_pred=tf.zeros((0, 3)), grad_loss=tf.zeros((1,)),
                 masked_tokens=[])


# --- The TensorFlow version check ---------------------------------------------


@pytest.mark.parametrize("installed, built", [
    ("2.22.1", "2.21.0"),
    ("2.20.0", "2.21.0"),
    ("3.21.0", "2.21.0"),
    ("2.2.0", "2.21.0"),
])
def test_version_check_rejects_another_minor_version(installed, built):
    with pytest.raises(ImportError) as raised:
        _loader.check_tensorflow_version(installed=installed, built=built)
    message = str(raised.value)
    assert f"built against TensorFlow {built}" in message
    assert f"TensorFlow {installed} is installed" in message
    assert "tensorflow==2.21.*" in message


@pytest.mark.parametrize("installed", ["2.21.0", "2.21.3", "2.21.0rc1", "2.21.1.post1"])
def test_version_check_accepts_the_same_minor_version(installed):
    assert _loader.check_tensorflow_version(installed=installed, built="2.21.0") is None


def test_version_check_of_this_installation():
    # The defaults compare tf.__version__ with the version the library was built for.
    assert _loader.check_tensorflow_version() is None
    built = _loader._build_info.TF_VERSION
    assert built.split(".")[:2] == tf.__version__.split(".")[:2]
