"""One behaviour at every front door (issue 18): the op (eager, tf.function,
jit), the sparse op, `fused_masked_mae.core` and the losses agree on
denormals, misaligned and strided arrays, token rules, Keras' rank rules,
symbolic inputs, tf_keras loading and second-order gradients.

Each test here failed on main 01600fe. In the sanitizer suite (build.sh
sanitize) the misaligned-array tests run under UBSan's alignment check.
"""

import os
import subprocess
import sys
import textwrap

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
from fused_masked_mae import _core, core

NP_DTYPES = {tf.float16: np.float16, tf.bfloat16: ml_dtypes.bfloat16,
             tf.float32: np.float32, tf.float64: np.float64}
# A denormal of each dtype as the kernels see it (float16 denormals are normal
# float32 values once widened, so they are not flushed: TensorFlow's result).
TINY = {tf.float16: 1e-7, tf.bfloat16: 1e-40, tf.float32: 1e-40, tf.float64: 1e-310}
MIN_NORMAL = {tf.float16: 6.103515625e-05, tf.bfloat16: 1.1754943508222875e-38,
              tf.float32: 1.1754943508222875e-38, tf.float64: 2.2250738585072014e-308}


def bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def assert_same_bits(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    np.testing.assert_array_equal(bits(a), bits(b), err_msg=what)


def op_loss_and_grad(y_true, y_pred, tokens, grad_loss, mode="eager", sparse=False):
    """The TF op's loss and d loss / d y_pred for upstream grad_loss."""
    def run(y_true, y_pred, grad_loss):
        with tf.GradientTape() as tape:
            tape.watch(y_pred)
            if sparse:
                loss = fm.sparse_masked_mae(y_true, y_pred, tokens=tokens)
            else:
                loss = fm.masked_mae_tokens(y_true, y_pred, tokens)
        return loss, tape.gradient(loss, y_pred, output_gradients=grad_loss)

    if mode != "eager":
        run = tf.function(run, jit_compile=mode == "jit")
    loss, grad = run(tf.constant(y_true), tf.constant(y_pred), tf.constant(grad_loss))
    return loss.numpy(), grad.numpy()


# --- 1. Denormals: TensorFlow's semantics (DAZ + FTZ) at every front door ---------

def test_issue_examples_core_equals_the_op():
    yt = np.array([[0, 1e-40, 0, 0]], np.float32)
    yp = np.array([[0, 1, 0, 0]], np.float32)
    assert tf.math.argmax(yt, axis=-1).numpy()[0] == 0  # TensorFlow reads 1e-40 as 0
    for mode in ("eager", "function", "jit"):
        loss, _ = op_loss_and_grad(yt, yp, [1], np.ones(1, np.float32), mode)
        assert_same_bits(core.forward(yt, yp, [1]), loss, mode)
    assert core.forward(yt, yp, [1])[0] == 0.25  # argmax 0: not masked

    yt = np.array([[3e-40, 0, 0, 1e-40]], np.float32)
    yp = np.zeros_like(yt)
    g = np.array([1e-38], np.float32)
    for mode in ("eager", "function", "jit"):
        _, grad = op_loss_and_grad(yt, yp, [], g, mode)
        assert_same_bits(core.gradient(yt, yp, g), grad, mode)
    assert not np.signbit(core.gradient(yt, yp, g)).any()  # +0, not -2.5e-39


def denormal_rows(dtype, rows, classes, seed):
    """Rows built from denormals, the smallest normals and sums of them whose
    differences are denormal, zeros of both signs, ones and NaN."""
    rng = np.random.default_rng(seed)
    tiny, low = TINY[dtype], MIN_NORMAL[dtype]
    values = np.array([0.0, -0.0, tiny, -tiny, 3 * tiny, low, -low, 1.25 * low, 1.5 * low,
                       2 * low, 1.0, 0.5, np.nan], np.float64)
    np_dtype = NP_DTYPES[dtype]
    y_true = rng.choice(values, size=(rows, classes)).astype(np_dtype)
    y_pred = rng.choice(values, size=(rows, classes)).astype(np_dtype)
    grad_loss = rng.choice(values[:-1], size=rows).astype(np_dtype)
    return y_true, y_pred, grad_loss


@pytest.mark.parametrize("dtype", list(NP_DTYPES), ids=lambda d: d.name)
@pytest.mark.parametrize("classes", [1, 4, 17, 40])
def test_denormal_rows_core_equals_the_op(dtype, classes):
    y_true, y_pred, grad_loss = denormal_rows(dtype, 300, classes, seed=classes)
    tokens = list(range(min(classes, 3)))
    loss, grad = op_loss_and_grad(y_true, y_pred, tokens, grad_loss)
    assert_same_bits(core.forward(y_true, y_pred, tokens), loss, "forward")
    assert_same_bits(core.gradient(y_true, y_pred, grad_loss, tokens), grad, "gradient")
    for mode in ("function", "jit"):
        loss_m, grad_m = op_loss_and_grad(y_true, y_pred, tokens, grad_loss, mode)
        assert_same_bits(loss_m, loss, mode)
        assert_same_bits(grad_m, grad, mode)
    # Sparse: ids, with predictions full of denormals.
    ids = np.random.default_rng(classes).integers(0, classes, size=300).astype(np.int32)
    loss_s, grad_s = op_loss_and_grad(ids, y_pred, tokens, grad_loss, sparse=True)
    assert_same_bits(core.forward(ids, y_pred, tokens, sparse=True), loss_s, "sparse forward")
    assert_same_bits(core.gradient(ids, y_pred, grad_loss, tokens, sparse=True), grad_s,
                     "sparse gradient")
    for mode in ("function", "jit"):
        loss_m, grad_m = op_loss_and_grad(ids, y_pred, tokens, grad_loss, mode, sparse=True)
        assert_same_bits(loss_m, loss_s, "sparse " + mode)
        assert_same_bits(grad_m, grad_s, "sparse " + mode)


def test_core_leaves_the_callers_floating_point_mode_alone():
    y = np.full((64, 33), 1e-40, np.float32)
    core.forward(y, y, [])
    core.gradient(y, y, np.ones(64, np.float32))
    # NumPy's thread still has gradual underflow (IEEE), not the kernels' mode.
    assert np.float32(1e-39) * np.float32(1.0) != 0
    assert np.float32(1e-39) + np.float32(0.0) == np.float32(1e-39)


# --- 2. Misaligned and strided arrays in core ----------------------------------------

@pytest.mark.parametrize("np_dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_misaligned_arrays_are_copied_not_misread(np_dtype):
    itemsize = np.dtype(np_dtype).itemsize
    rng = np.random.default_rng(itemsize)

    def misaligned(values):
        buffer = np.zeros(values.size * itemsize + 1, np.uint8)
        array = np.ndarray(values.shape, np_dtype, buffer=buffer, offset=1)
        array[...] = values
        assert array.ctypes.data % itemsize == 1 % itemsize and array.flags.c_contiguous
        return array

    y_true = np.eye(7, dtype=np_dtype)[rng.integers(0, 7, size=(5, 3))]
    y_pred = rng.random((5, 3, 7)).astype(np_dtype)
    grad_loss = rng.random((5, 3)).astype(np_dtype)
    expected = core.forward(y_true, y_pred, [0, 2])
    expected_grad = core.gradient(y_true, y_pred, grad_loss, [0, 2])
    if itemsize > 1:
        got = _core.forward(misaligned(y_true), misaligned(y_pred), [0, 2])
        assert_same_bits(got, expected)
        got = _core.gradient(misaligned(y_true), misaligned(y_pred), misaligned(grad_loss), [0, 2])
        assert_same_bits(got, expected_grad)
    assert_same_bits(core.forward(misaligned(y_true), misaligned(y_pred), [0, 2]), expected)
    # The issue's array.
    a = np.ndarray((2, 3), np.float64, buffer=np.zeros(49, np.uint8), offset=1)
    a[...] = [[0, 1, 2], [3, 4, 5]]
    assert_same_bits(core.forward(a, a, [1]), core.forward(np.array(a), np.array(a), [1]))


def test_strided_arrays_through_core_equal_the_op():
    y = np.random.default_rng(0).random((6, 10)).astype(np.float32)
    y_true, y_pred = y[:, ::2], y[::-1, 1::2]
    assert not y_true.flags.c_contiguous
    assert_same_bits(core.forward(y_true, y_pred, [1]),
                     fm.masked_mae_tokens(y_true, y_pred, [1]).numpy())
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.forward(y_true, y_pred, [1])  # the raw module still refuses them


# --- 3. One token rule ------------------------------------------------------------

def front_doors():
    y = np.eye(4, dtype=np.float32)[[0, 1, 2]]

    def keras_loss(tokens):
        return fm.MaskedMAE(tokens=tokens)(y, y)

    return {
        "core": lambda tokens: core.forward(y, y, tokens),
        "core.gradient": lambda tokens: core.gradient(y, y, np.ones(3, np.float32), tokens),
        "op": lambda tokens: fm.masked_mae(y, y, tokens=tokens),
        "masked_mae_tokens": lambda tokens: fm.masked_mae_tokens(y, y, tokens),
        "sparse": lambda tokens: fm.sparse_masked_mae(np.array([0, 1, 2]), y, tokens=tokens),
        "tf.function": lambda tokens: tf.function(lambda: fm.masked_mae(y, y, tokens=tokens))(),
        "jit": lambda tokens: tf.function(lambda: fm.masked_mae(y, y, tokens=tokens),
                                          jit_compile=True)(),
        "MaskedMAE": keras_loss,
    }


@pytest.mark.parametrize("door", list(front_doors()))
def test_one_token_rule_everywhere(door):
    call = front_doors()[door]
    # Accepted: Python and NumPy integers, repeated ids (counted once).
    call([np.int64(1), np.int32(2), 3])
    call([0] * 257)
    call(list(range(4)) * 100)
    # Refused with the same exception type everywhere.
    for bad in ([1.5], [True], [np.bool_(True)], ["1"], [None, 1.0]):
        with pytest.raises(TypeError, match="integer class id"):
            call(bad)
    for bad, value in (([2**63], "9223372036854775808"), ([-1], "-1"), ([-(2**70)], "-1180")):
        with pytest.raises(ValueError, match=value):
            call(bad)
    with pytest.raises(ValueError, match="257 distinct"):
        call(list(range(257)))
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="outside"):
        call([4])  # C = 4


def test_cxx_token_rule_collapses_repeats_and_counts_distinct_ids():
    from raw_ops import raw_forward

    y = np.eye(300, dtype=np.float32)[:3]
    # The raw op and _core take repeated ids (the Python rule removed them
    # before; the C++ rule is the same one).
    raw_forward(y, y, [7] * 300)
    _core.forward(y, y, [7] * 300)
    with pytest.raises(tf.errors.InvalidArgumentError, match="257 distinct"):
        raw_forward(y, y, list(range(257)))
    with pytest.raises(ValueError, match="257 distinct"):
        _core.forward(y, y, list(range(257)))


# --- 4. Keras' rank rules ---------------------------------------------------------

def test_rank_rules_like_mean_absolute_error():
    rng = np.random.default_rng(0)
    cases = [((5,), (5, 1)), ((5, 1), (5,)), ((4, 3), (4, 3, 1)), ((4, 3, 1), (4, 3)),
             ((4, 3), (4, 3))]
    for true_shape, pred_shape in cases:
        y_true = rng.random(true_shape).astype(np.float32)
        y_pred = rng.random(pred_shape).astype(np.float32)
        for reduction in (None, "sum_over_batch_size"):
            ours = fm.MaskedMAE(reduction=reduction)(y_true, y_pred)
            theirs = keras.losses.MeanAbsoluteError(reduction=reduction)(y_true, y_pred)
            assert ours.shape == theirs.shape, (true_shape, pred_shape)
            np.testing.assert_allclose(ours, theirs, rtol=1e-6)
        fn = fm.masked_mae_loss_fn()(y_true, y_pred)
        assert fn.shape == keras.losses.mean_absolute_error(y_true, y_pred).shape
    mismatch = (ValueError, tf.errors.InvalidArgumentError)
    with pytest.raises(mismatch, match="must have the same shape"):
        fm.MaskedMAE()(np.zeros((4, 3), np.float32), np.zeros((4, 2), np.float32))
    with pytest.raises(mismatch, match="must have the same shape"):
        fm.MaskedMAE()(np.zeros((4,), np.float32), np.zeros((4, 2), np.float32))


# --- 5. Symbolic KerasTensors -----------------------------------------------------

def test_symbolic_keras_tensors_like_mean_absolute_error():
    for true_shape, pred_shape in (((None, 7), (None, 7)), ((None, 5, 7), (None, 5, 7)),
                                   ((None,), (None, 1)), ((4, 7), (4, 7)), ((4, 5), (4, 5, 1))):
        y_true = keras.KerasTensor(true_shape)
        y_pred = keras.KerasTensor(pred_shape)
        # (Keras' own "sum_over_batch_size" fails on an unknown batch size.)
        reductions = (None, "sum") + (("sum_over_batch_size",) if None not in true_shape else ())
        for reduction in reductions:
            ours = fm.MaskedMAE(reduction=reduction)(y_true, y_pred)
            theirs = keras.losses.MeanAbsoluteError(reduction=reduction)(y_true, y_pred)
            assert isinstance(ours, keras.KerasTensor)
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    ids = keras.KerasTensor((None, 5), dtype="int32")
    out = fm.SparseMaskedMAE(reduction=None)(ids, keras.KerasTensor((None, 5, 7)))
    assert isinstance(out, keras.KerasTensor) and out.shape == (None, 5)


# --- 6. tf_keras .keras files reload in a fresh process ---------------------------

def run_python(code, tmp_path, **env):
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_tf_keras_model_reloads_in_a_fresh_process(tmp_path):
    path = tmp_path / "model.keras"
    run_python(f"""
        import numpy as np, tf_keras
        from fused_masked_mae.losses import TfKerasMaskedMAE
        model = tf_keras.Sequential([tf_keras.layers.Dense(4, input_shape=(3,))])
        model.compile(loss=TfKerasMaskedMAE(1, 2, tokens=[3]))
        model.save({str(path)!r})
        """, tmp_path)
    for order in ("import fused_masked_mae, tf_keras", "import tf_keras, fused_masked_mae",
                  "import fused_masked_mae; import tensorflow as tf; tf_keras = tf.keras"):
        out = run_python(f"""
            import sys
            {order}
            model = tf_keras.models.load_model({str(path)!r})
            print("LOADED", type(model.loss).__name__, model.loss.get_config()["tokens"])
            """, tmp_path, TF_USE_LEGACY_KERAS="1" if "tf.keras" in order else "0")
        assert "LOADED TfKerasMaskedMAE [3]" in out, (order, out)
    # Importing the package alone still leaves tf_keras unimported.
    out = run_python("import sys, fused_masked_mae; print('TFK', 'tf_keras' in sys.modules)",
                     tmp_path)
    assert "TFK False" in out


def test_when_imported_runs_now_or_after_the_import(tmp_path):
    (tmp_path / "late_framework.py").write_text("VALUE = 42\n")
    out = run_python("""
        import sys
        from fused_masked_mae import _lazy
        seen = []
        _lazy.when_imported("late_framework", lambda m: seen.append(("late", m.VALUE)))
        _lazy.when_imported("os", lambda m: seen.append(("now", m.__name__)))
        assert "late_framework" not in sys.modules and seen == [("now", "os")], seen
        import late_framework
        _lazy.when_imported("late_framework", lambda m: seen.append(("again", 1)))
        print("SEEN", seen)
        """, tmp_path, PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert "SEEN [('now', 'os'), ('late', 42), ('again', 1)]" in out


# --- 7. Second-order gradients ----------------------------------------------------

def second_order(loss_fn, y_true, y_pred, weights, probe, mode):
    """(d/d weights, d/d y_pred) of <probe, d(sum(weights * loss))/d y_pred>."""
    def run(y_true, y_pred, weights):
        with tf.GradientTape(persistent=True) as outer:
            outer.watch([y_pred, weights])
            with tf.GradientTape() as inner:
                inner.watch(y_pred)
                total = tf.reduce_sum(weights * loss_fn(y_true, y_pred))
            grad = inner.gradient(total, y_pred)
            penalty = tf.reduce_sum(grad * probe)
        return grad, outer.gradient(penalty, weights), outer.gradient(penalty, y_pred)

    if mode != "eager":
        run = tf.function(run, jit_compile=mode == "jit")
    return [t.numpy() for t in run(y_true, y_pred, weights)]


def assert_equal_gradients(got, expected, mode):
    # Eagerly the same TensorFlow ops run in the same order: bit for bit. In
    # graphs, grappler (and XLA) rewrite x / C as x * (1 / C) in either
    # computation: to the last bit of float64.
    for g, e in zip(got, expected):
        if mode == "eager":
            np.testing.assert_array_equal(g, e)
        else:
            np.testing.assert_allclose(g, e, rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("mode", ["eager", "function", "jit"])
def test_second_order_gradients_equal_mean_absolute_errors(mode):
    rng = np.random.default_rng(1)
    y_true = tf.constant(rng.integers(-2, 3, size=(6, 5, 9)).astype(np.float64))
    y_pred = tf.constant(rng.integers(-2, 3, size=(6, 5, 9)) + rng.random((6, 5, 9)) * 0.5)
    weights = tf.constant(rng.random((6, 5)))
    probe = tf.constant(rng.standard_normal((6, 5, 9)))
    mae = lambda t, p: keras.losses.mean_absolute_error(t, p)  # noqa: E731
    expected = second_order(mae, y_true, y_pred, weights, probe, "eager")
    assert np.abs(expected[1]).sum() > 0  # linear in the upstream gradient
    got = second_order(fm.masked_mae, y_true, y_pred, weights, probe, mode)
    assert_equal_gradients(got, expected, mode)
    # Masked rows: the composite reference's autodiff, sparse and dense.
    ids = tf.constant(rng.integers(0, 9, size=(6, 5)))
    one_hot = tf.one_hot(ids, 9, dtype=tf.float64)
    y_pred = tf.constant(np.where(rng.random((6, 5, 9)) < 0.5, 0.0, 1.0) * 0.5 + one_hot * 0.7)
    tokens = list(range(9))
    reference = lambda t, p: fm.reference_masked_mae(t, p, tokens=tokens)  # noqa: E731
    expected = second_order(reference, one_hot, y_pred, weights, probe, "eager")
    assert (fm.masked_mae(one_hot, y_pred, tokens=tokens).numpy() == 0).any()
    got = second_order(lambda t, p: fm.masked_mae(t, p, tokens=tokens), one_hot, y_pred,
                       weights, probe, mode)
    assert_equal_gradients(got, expected, mode)
    got = second_order(lambda t, p: fm.sparse_masked_mae(t, p, tokens=tokens), ids, y_pred,
                       weights, probe, mode)
    assert_equal_gradients(got, expected, mode)


def test_keras_loss_gradient_penalty_runs():
    # A gradient penalty through MaskedMAE (WGAN-GP style): needs the second order.
    y_true = tf.constant(np.eye(4, dtype=np.float32)[[0, 1, 2]])
    w = tf.Variable(tf.ones((3, 4)))
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = fm.MaskedMAE(0, 3)(y_true, w * 0.5)
        penalty = tf.reduce_sum(tf.square(inner.gradient(loss, w)))
    assert outer.gradient(penalty, w) is not None


# --- 8. Small ---------------------------------------------------------------------

def test_integer_y_pred_is_named():
    for call in (lambda t, p: fm.masked_mae_loss_fn()(t, p), fm.masked_mae):
        with pytest.raises(TypeError, match="y_pred must be float"):
            call(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int32))


def test_masked_mae_docstring_names_the_xla_route():
    doc = fm.MaskedMAE.__doc__
    assert "custom calls" in doc
    assert "jit_compile=True`) by the composite" not in doc


# --- The differential fuzz's harness (tests/fuzz_entries.py) -----------------------

def test_fuzz_harness_agrees_on_the_real_entries_and_catches_a_planted_difference():
    import fuzz_entries

    rng = np.random.default_rng(5)
    entries = fuzz_entries.available_entries("masked_mae")  # JAX/torch where installed
    cases = [fuzz_entries.draw_case(rng) for _ in range(40)]
    assert all(fuzz_entries.check_case(case, entries) is None for case in cases)

    def off_by_one_bit(case):
        loss, grad = fuzz_entries.core_entry(case)
        loss = loss.copy()
        loss.view(np.dtype(f"u{loss.dtype.itemsize}")).flat[0] ^= 1
        return loss, grad

    computed = [c for c in cases if fuzz_entries.outcome(fuzz_entries.core_entry, c)[0] == "ok"
                and c.y_pred.size]
    assert computed
    message = fuzz_entries.check_case(computed[0], {"op": fuzz_entries.op_entry,
                                                    "planted": off_by_one_bit})
    assert message and "planted differs from op" in message
