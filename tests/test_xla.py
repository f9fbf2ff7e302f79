"""XLA: inside jit-compiled graphs the loss falls back to the composite.

The fused op has no XLA kernel. Keras 3 compiles `fit` with XLA by default when
a GPU is present (`jit_compile="auto"`), and `tf.function(jit_compile=True)`
always does, so `masked_mae_tokens` builds the composite of plain ops
(`reference_masked_mae_tokens`) whenever it is traced in an XLA context. These
tests run XLA on the CPU with an explicit `jit_compile=True`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
import fused_masked_mae.reference
from fused_masked_mae import ops as fm_ops
from test_op_parity import RTOL, f64, seq2seq_batch
from raw_ops import raw_forward

FUSED_OP = "Import_fused_masked_mae>MaskedMae"
VOCAB, START, END, PAD = 12, 1, 10, 11


def op_types(concrete_function):
    """Op types of a concrete function's graph and of every function it calls."""
    graph = concrete_function.graph
    types = {op.type for op in graph.get_operations()}
    for fdef in graph.as_graph_def().library.function:
        types.update(node.op for node in fdef.node_def)
    return types


@pytest.fixture
def spy(monkeypatch):
    """Counts the composite's calls and whether each was in an XLA context."""
    calls = []
    composite = fused_masked_mae.reference.reference_masked_mae_tokens

    def spying(y_true, y_pred, tokens):
        calls.append(fm_ops.in_xla_context())
        return composite(y_true, y_pred, tokens)

    monkeypatch.setattr(fused_masked_mae.reference, "reference_masked_mae_tokens", spying)
    return calls


def test_detection_of_xla_contexts():
    seen = {}

    def probe(tag):
        seen[tag] = fm_ops.in_xla_context()

    probe("eager")
    tf.function(lambda: probe("graph"))()
    tf.function(lambda: probe("jit"), jit_compile=True)()

    inner = tf.function(lambda: probe("nested"))
    tf.function(lambda: inner(), jit_compile=True)()
    inner_no_jit = tf.function(lambda: probe("jit_compile=False inside jit"), jit_compile=False)
    tf.function(lambda: inner_no_jit(), jit_compile=True)()

    @tf.function(jit_compile=True)
    def branches(x):
        return tf.cond(x > 0, lambda: (probe("cond branch"), x)[1], lambda: x)

    branches(tf.constant(1.0))
    assert seen == {
        "eager": False,
        "graph": False,
        "jit": True,
        "nested": True,
        "jit_compile=False inside jit": True,  # XLA compiles the whole cluster
        "cond branch": True,
    }


def test_raw_op_has_no_xla_kernel():
    """Why the fallback exists: the op itself cannot be compiled."""
    t, p = seq2seq_batch((2, 3, 5), tf.float32, 0, 4)
    raw = tf.function(
        lambda a, b: raw_forward(y_true=a, y_pred=b,
                                                             masked_tokens=[0]),
        jit_compile=True)
    with pytest.raises((tf.errors.InvalidArgumentError, tf.errors.UnimplementedError),
                       match="MaskedMae"):
        raw(t, p)


def test_jit_graph_uses_the_composite_and_plain_graph_the_op():
    t, p = seq2seq_batch((2, 3, 5), tf.float32, 0, 4)
    loss = lambda a, b: fm.masked_mae(a, b, 0, 4)  # noqa: E731
    assert FUSED_OP not in op_types(tf.function(loss, jit_compile=True).get_concrete_function(t, p))
    assert FUSED_OP in op_types(tf.function(loss).get_concrete_function(t, p))


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64],
                         ids=lambda d: d.name)
@pytest.mark.parametrize("tokens", [(0, 8), (None, None), (3, None, [8, 2, 2])],
                         ids=["start-end", "none", "extra"])
def test_jit_matches_reference_and_the_op(dtype, tokens):
    start, end, *extra = tokens
    extra = extra[0] if extra else ()
    t, p = seq2seq_batch((3, 4, 9), dtype, 0, 8)
    fused = fm.masked_mae(t, p, start, end, extra)
    reference = fm.reference_masked_mae(t, p, start, end, extra)
    jit = tf.function(lambda a, b: fm.masked_mae(a, b, start, end, extra), jit_compile=True)(t, p)
    assert jit.dtype == dtype and jit.shape == (3, 4)
    # Outside XLA the op matches the reference as everywhere; inside, the
    # XLA-compiled composite does (XLA's reduction order, hence the tolerance).
    np.testing.assert_allclose(f64(fused), f64(reference), rtol=RTOL[dtype])
    np.testing.assert_allclose(f64(jit), f64(reference), rtol=max(RTOL[dtype], 1e-5))
    np.testing.assert_array_equal(f64(jit) == 0, f64(fused) == 0)  # the same mask
    if start is not None:
        assert (f64(jit) == 0).any()


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=lambda d: d.name)
def test_gradients_under_xla(dtype):
    t, p = seq2seq_batch((3, 4, 9), dtype, 0, 8)
    weights = tf.constant(np.random.default_rng(2).random((3, 4)), dtype)

    def grads(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            loss = tf.reduce_sum(weights * fm.masked_mae(a, b, 0, 8, tokens=[3]))
        return tape.gradient(loss, [a, b])

    jit_t, jit_p = tf.function(grads, jit_compile=True)(t, p)
    fused_t, fused_p = grads(t, p)
    assert float(tf.reduce_max(tf.abs(fused_p))) > 0
    np.testing.assert_allclose(jit_p.numpy(), fused_p.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(jit_t.numpy(), fused_t.numpy(), rtol=1e-6, atol=0)


def test_static_shape_errors_under_xla_name_the_shapes():
    jit = tf.function(lambda a, b: fm.masked_mae(a, b, 0, 2), jit_compile=True)
    with pytest.raises(ValueError, match=r"same shape, got y_true \[2,3\] and y_pred \[3,3\]"):
        jit(tf.zeros((2, 3)), tf.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"masked token id 5 is outside \[0, 3\)"):
        tf.function(lambda a: fm.masked_mae(a, a, 0, 5), jit_compile=True)(tf.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"classes\) must be positive"):
        tf.function(lambda a: fm.masked_mae(a, a), jit_compile=True)(tf.zeros((2, 0)))


def test_nan_rows_follow_xla_argmax_under_xla():
    """Documented difference (docs/integration.md): under XLA the argmax is
    XLA's, which may pick a NaN's index; tf.math.argmax (and the op) never does.
    The loss of a row with a NaN is NaN either way (its mean is NaN); the
    gradient of the row's other elements can differ."""
    with tf.device("/CPU:0"):
        t = tf.constant([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])  # targets: END=2, then 0
        p = tf.constant([[[0.1, 0.2, np.nan], [0.9, 0.1, 0.0]]])

        def loss_and_grad(a, b):
            with tf.GradientTape() as tape:
                tape.watch(b)
                loss = fm.masked_mae(a, b, None, 2)
            return loss, tape.gradient(loss, b)

        plain_loss, plain_grad = loss_and_grad(t, p)
        jit_loss, jit_grad = tf.function(loss_and_grad, jit_compile=True)(t, p)
        argmax_jit = tf.function(lambda b: tf.math.argmax(b, -1), jit_compile=True)(p)
    assert int(tf.math.argmax(p, -1)[0, 0]) == 1  # tf.math.argmax skips the NaN
    assert int(argmax_jit[0, 0]) == 2  # XLA's argmax (CPU) picks the NaN's index
    assert np.isnan(plain_loss[0, 0]) and np.isnan(jit_loss[0, 0])
    np.testing.assert_allclose(plain_loss[0, 1], jit_loss[0, 1], rtol=1e-6)
    # Outside XLA: argmaxes 2 != 1, the row is charged: gradient sign(p - t) / 3.
    np.testing.assert_allclose(plain_grad[0, 0, :2], [1 / 3, 1 / 3], rtol=1e-6)
    # Under XLA: argmaxes 2 == 2 == END, the row is masked: no gradient.
    np.testing.assert_array_equal(jit_grad[0, 0, :2], [0.0, 0.0])
    np.testing.assert_allclose(plain_grad[0, 1], jit_grad[0, 1], rtol=1e-6)


def test_lowest_finite_value_rows_follow_xla_argmax_under_xla():
    """tf.math.argmax only takes values above the dtype's lowest finite value
    (so [-inf, -FLT_MAX, -inf] gives 0); XLA's takes the true maximum (1). With
    target 1 masked, the row is charged inf outside XLA and 0 * inf = NaN inside."""
    with tf.device("/CPU:0"):
        t = tf.constant([[0.0, 1.0, 0.0]])
        p = tf.constant([[-np.inf, np.finfo(np.float32).min, -np.inf]])
        plain = fm.masked_mae(t, p, 1)
        jit = tf.function(lambda a, b: fm.masked_mae(a, b, 1), jit_compile=True)(t, p)
    assert np.isposinf(plain[0]) and np.isnan(jit[0])


def tiny_model():
    return keras.Sequential([
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(VOCAB, 8),
        keras.layers.Dense(VOCAB, activation="softmax"),
    ])


def copy_task(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(2, VOCAB - 2, size=(n, 6))
    x[:, 0] = START
    x[:, 3] = END
    x[:, 4:] = PAD
    return x, np.eye(VOCAB, dtype=np.float32)[x]


def fit_history(jit_compile, weights=None):
    keras.utils.set_random_seed(0)
    x, y = copy_task()
    model = tiny_model()
    if weights is not None:
        model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss=fm.MaskedMAE(START, END, tokens=[PAD]), jit_compile=jit_compile)
    assert model.jit_compile == jit_compile
    history = model.fit(x, y, epochs=4, batch_size=32, shuffle=False, verbose=0)
    evaluated = model.evaluate(x, y, batch_size=64, verbose=0)
    return model, history.history["loss"], evaluated


def test_keras_fit_with_jit_compile_trains_like_without(spy):
    keras.utils.set_random_seed(0)
    initial = tiny_model().get_weights()
    model, xla_losses, xla_eval = fit_history(True, initial)
    assert spy and all(spy), "the jit-compiled train/test steps did not use the composite"
    assert xla_losses[-1] < 0.8 * xla_losses[0], xla_losses
    spy.clear()
    _, plain_losses, plain_eval = fit_history(False, initial)
    assert not spy, "outside XLA the fused op must be used"
    np.testing.assert_allclose(xla_losses, plain_losses, rtol=1e-5)
    np.testing.assert_allclose(xla_eval, plain_eval, rtol=1e-5)
    # evaluate under XLA agrees with the loss of the predictions, computed by the op
    x, y = copy_task()
    expected = float(tf.reduce_mean(fm.masked_mae(y, model.predict(x, verbose=0), START, END,
                                                  tokens=[PAD])))
    np.testing.assert_allclose(xla_eval, expected, rtol=1e-5)
