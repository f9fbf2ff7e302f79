"""XLA: inside jit-compiled graphs the losses run the fused kernels as XLA custom calls.

Keras 3 compiles `fit` with XLA by default when a GPU is present
(`jit_compile="auto"`), and `tf.function(jit_compile=True)` always does. There
a TensorFlow op cannot run, so the losses emit `XlaCallModule`s whose custom
calls (`fused_masked_mae_forward` / `_grad` and their sparse twins) the op
library registered with XLA's FFI. These tests run XLA on the CPU ("Host"
handlers) and hold it to the op outside XLA, bit for bit.
"""

import logging
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
import fused_masked_mae.reference
from fused_masked_mae import ops as fm_ops
from fused_masked_mae import xla as fm_xla
from raw_ops import raw_forward
from test_op_parity import seq2seq_batch

DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]
VOCAB, START, END, PAD = 12, 1, 10, 11


def bits(tensor):
    """Raw bytes, so that NaN == NaN and -0.0 != 0.0."""
    return tensor.numpy().tobytes()


def loss_and_grads(loss_fn, weights):
    def run(y_true, y_pred):
        with tf.GradientTape() as tape:
            tape.watch(y_pred)
            if y_true.dtype.is_floating:
                tape.watch(y_true)
            loss = loss_fn(y_true, y_pred)
            total = tf.reduce_sum(loss * tf.cast(weights, loss.dtype))
        grads = tape.gradient(total, [y_true, y_pred]) if y_true.dtype.is_floating else [
            tape.gradient(total, y_pred)]
        return [loss] + grads

    return run


def assert_jit_equals_eager(loss_fn, y_true, y_pred, weights, signature=None):
    run = loss_and_grads(loss_fn, weights)
    eager = run(y_true, y_pred)
    jit = tf.function(run, jit_compile=True, input_signature=signature)(y_true, y_pred)
    assert len(eager) == len(jit)
    for e, j in zip(eager, jit):
        assert e.dtype == j.dtype and e.shape == j.shape
        assert bits(e) == bits(j)
    return eager


@pytest.fixture
def spy(monkeypatch):
    """Records which XLA route each loss trace took."""
    calls = []
    custom = fm_xla.masked_mae_custom_call
    composite = fused_masked_mae.reference.reference_masked_mae_tokens

    def spy_custom(*args, **kwargs):
        calls.append("custom_call")
        return custom(*args, **kwargs)

    def spy_composite(*args, **kwargs):
        calls.append("composite")
        return composite(*args, **kwargs)

    monkeypatch.setattr(fm_xla, "masked_mae_custom_call", spy_custom)
    monkeypatch.setattr(fused_masked_mae.reference, "reference_masked_mae_tokens", spy_composite)
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

    @tf.function(jit_compile=True)
    def branches(x):
        return tf.cond(x > 0, lambda: (probe("cond branch"), x)[1], lambda: x)

    branches(tf.constant(1.0))
    assert seen == {"eager": False, "graph": False, "jit": True, "nested": True,
                    "cond branch": True}


def test_every_handler_registered_for_the_cpu():
    report = fm_xla.registration_report()
    # The masked MAE's four handlers and the masked cross-entropy's four.
    assert set(report["Host"]) == fm_xla.ALL_TARGETS | fm_xla.CE_TARGETS
    assert all(error is None for error in report["Host"].values()), report
    assert "Host" in fm_xla.REGISTERED_PLATFORMS
    assert "Host" in fm_xla.CE_REGISTERED_PLATFORMS


def test_a_failed_cpu_crossentropy_registration_is_an_import_error():
    ok = {target: None for target in fm_xla.ALL_TARGETS | fm_xla.CE_TARGETS}
    grad = fm_xla.CE_GRAD_TARGETS[True]
    with pytest.raises(ImportError, match=re.escape(f"{grad}: error: already registered")):
        fm_xla.check_ce_registrations({"Host": dict(ok, **{grad: "error: already registered"})})
    # The masked MAE's platforms do not depend on the cross-entropy's handlers.
    assert fm_xla.check_registrations({"Host": dict(ok, **{grad: "error: x"})}) == ["Host"]
    assert fm_xla.check_ce_registrations({"Host": ok, "CUDA": {
        t: None for t in fm_xla.ALL_TARGETS}}) == ["Host"]


def test_a_failed_cpu_registration_is_an_import_error_and_cuda_a_warning(caplog):
    ok = {target: None for target in fm_xla.ALL_TARGETS}
    grad = fm_xla.GRAD_TARGETS[False]
    broken = dict(ok, **{grad: "error: already registered"})
    with pytest.raises(ImportError, match=re.escape(f"{grad}: error: already registered")):
        fm_xla.check_registrations({"Host": broken})
    with pytest.raises(ImportError, match=re.escape(f"{fm_xla.FORWARD_TARGETS[False]}: not "
                                                    "registered")):
        fm_xla.check_registrations({"Host": {grad: None}})
    with caplog.at_level(logging.WARNING, logger="fused_masked_mae"):
        assert fm_xla.check_registrations({"Host": ok, "CUDA": broken}) == ["Host"]
    assert "XLA handlers for CUDA failed to register" in caplog.text


def test_raw_op_has_no_xla_kernel():
    """Why the custom calls exist: the TensorFlow op itself cannot be compiled."""
    t, p = seq2seq_batch((2, 3, 5), tf.float32, 0, 4)
    raw = tf.function(lambda a, b: raw_forward(a, b, [0]), jit_compile=True)
    with pytest.raises((tf.errors.InvalidArgumentError, tf.errors.UnimplementedError),
                       match="MaskedMae"):
        raw(t, p)


def full_size_opcodes(hlo, shape):
    """Opcodes of HLO instructions whose result has the inputs' full [..., C] shape."""
    dims = ",".join(map(str, shape))
    return {m.group(1) for m in re.finditer(r"= \w+\[" + dims + r"\]\{[^}]*\} ([\w-]+)\(", hlo)}


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_hlo_has_the_custom_calls_and_no_full_size_composite(sparse):
    t, p = seq2seq_batch((3, 4, 9), tf.float32, 0, 8)
    if sparse:
        t = tf.argmax(t, -1, output_type=tf.int32)
        loss_fn = lambda a, b: fm.sparse_masked_mae(a, b, 0, 8)  # noqa: E731
    else:
        loss_fn = lambda a, b: fm.masked_mae(a, b, 0, 8)  # noqa: E731
    run = tf.function(loss_and_grads(loss_fn, tf.ones((3, 4))), jit_compile=True)
    hlo = run.experimental_get_compiler_ir(t, p)(stage="hlo")
    targets = set(re.findall(r'custom_call_target="([\w.]+)"', hlo))
    assert targets == {fm_xla.FORWARD_TARGETS[sparse], fm_xla.GRAD_TARGETS[sparse]}, targets
    prefix = "fused_masked_mae_sparse_" if sparse else "fused_masked_mae_"
    assert all(t.startswith(prefix) for t in targets)
    assert "API_VERSION_TYPED_FFI" in hlo
    # Full-size tensors ([3, 4, 9], or [12, 9] as the custom calls see them) are
    # only passed around, never computed on: no composite argmax/abs/mean.
    full_size = full_size_opcodes(hlo, (3, 4, 9)) | full_size_opcodes(hlo, (12, 9))
    assert {"parameter", "custom-call"} <= full_size, full_size
    composite = {"abs", "compare", "reduce", "select", "subtract", "sign", "multiply", "divide",
                 "convert", "add", "maximum"}
    assert not full_size & composite, full_size


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("tokens", [(0, 8, ()), (None, None, ()), (3, None, [8, 2, 2])],
                         ids=["start-end", "none", "extra"])
def test_jit_equals_the_op_bit_for_bit(dtype, tokens):
    start, end, extra = tokens
    t, p = seq2seq_batch((3, 4, 9), dtype, 0, 8)
    weights = np.random.default_rng(1).normal(size=(3, 4))
    loss, *_ = assert_jit_equals_eager(lambda a, b: fm.masked_mae(a, b, start, end, extra),
                                       t, p, weights)
    if start is not None:
        assert (loss.numpy() == 0).any() and (loss.numpy() != 0).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("id_dtype", [tf.int32, tf.int64], ids=["int32", "int64"])
def test_sparse_jit_equals_the_op_bit_for_bit(dtype, id_dtype):
    t, p = seq2seq_batch((3, 4, 9), dtype, 0, 8)
    ids = tf.argmax(t, -1, output_type=id_dtype)
    weights = np.random.default_rng(2).normal(size=(3, 4))
    assert_jit_equals_eager(lambda a, b: fm.sparse_masked_mae(a, b, 0, 8, tokens=[5]),
                            ids, p, weights)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_nan_inf_and_tie_rows_follow_the_op_not_xla(dtype):
    """The op's argmax (NaN never chosen, ties to the first, only values above
    the dtype's lowest count), not XLA's: the custom call runs the op's code."""
    lowest = float(dtype.min)
    t = tf.constant([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-0.0, 0.0, 0.0]]], dtype)
    p = tf.constant([[[0.1, 0.2, np.nan], [np.inf, 0.1, 0.0], [-np.inf, lowest, -np.inf],
                      [0.0, -0.0, 0.5]]], dtype)
    loss, _, grad = assert_jit_equals_eager(lambda a, b: fm.masked_mae(a, b, 0, 2, [1]), t, p,
                                            np.ones((1, 4)))
    xla_argmax = tf.function(lambda b: tf.math.argmax(b, -1), jit_compile=True)(p)
    if dtype == tf.float32:
        assert int(xla_argmax[0, 0]) == 2  # XLA's own argmax picks the NaN; ours does not
    assert np.isnan(float(loss[0, 0]))
    assert float(tf.cast(grad[0, 0, 0], tf.float32)) != 0  # row charged: argmaxes 1 != 2


GPU_SKIP_REASON = (
    "the CUDA XLA handlers need TensorFlow to see an NVIDIA GPU and the handlers to be "
    "registered (a CUDA build on an r525+ driver); here: GPUs "
    f"{[d.name for d in tf.config.list_physical_devices('GPU')]}, XLA platforms "
    f"{fm_xla.REGISTERED_PLATFORMS}")


@pytest.mark.skipif(not tf.config.list_physical_devices("GPU")
                    or "CUDA" not in fm_xla.REGISTERED_PLATFORMS, reason=GPU_SKIP_REASON)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_cuda_handlers_equal_the_gpu_op_bit_for_bit(dtype, sparse):
    """On a GPU, the CUDA handlers run on XLA's stream the same launchers as
    the op's GPU kernels: the same bits, values and gradients, and the HLO
    holds the custom calls. Row sizes cover the lane-group and whole-block
    paths of the kernels."""
    for classes in (9, 1549):
        with tf.device("/GPU:0"):
            t, p = seq2seq_batch((5, 7, classes), dtype, 0, 8)
            if sparse:
                t = tf.argmax(t, -1, output_type=tf.int32)
                loss_fn = lambda a, b: fm.sparse_masked_mae(a, b, 0, 8, tokens=[5])  # noqa: E731
            else:
                loss_fn = lambda a, b: fm.masked_mae(a, b, 0, 8, [5])  # noqa: E731
            weights = np.random.default_rng(3).normal(size=(5, 7))
            assert_jit_equals_eager(loss_fn, t, p, weights)
            hlo = tf.function(loss_and_grads(loss_fn, weights), jit_compile=True
                              ).experimental_get_compiler_ir(t, p)(stage="hlo")
        assert "fused_masked_mae_" in hlo and "custom-call" in hlo


def test_zero_size_batch_under_xla():
    t = tf.zeros((0, 4, 9))
    loss, grad_t, grad_p = assert_jit_equals_eager(lambda a, b: fm.masked_mae(a, b, 0, 8), t, t,
                                                   np.ones((0, 4)))
    assert loss.shape == (0, 4) and grad_p.shape == (0, 4, 9)


def test_unknown_batch_and_time_trace_once():
    signature = [tf.TensorSpec([None, None, 9], tf.float32)] * 2
    run = tf.function(loss_and_grads(lambda a, b: fm.masked_mae(a, b, 0, 8), 1.0),
                      jit_compile=True, input_signature=signature)
    for shape in [(3, 4, 9), (1, 7, 9), (5, 1, 9), (0, 2, 9)]:
        t, p = seq2seq_batch(shape, tf.float32, 0, 8) if shape[0] else (tf.zeros(shape),) * 2
        jit = run(t, p)
        eager = loss_and_grads(lambda a, b: fm.masked_mae(a, b, 0, 8), 1.0)(t, p)
        assert [bits(x) for x in jit] == [bits(x) for x in eager]
    assert run.experimental_get_tracing_count() == 1
    hlo = run.experimental_get_compiler_ir(*seq2seq_batch((3, 4, 9), tf.float32, 0, 8))(
        stage="hlo")
    assert f'custom_call_target="{fm_xla.FORWARD_TARGETS[False]}"' in hlo


def test_bad_inputs_under_xla():
    jit = tf.function(lambda a, b: fm.masked_mae(a, b, 0, 2), jit_compile=True)
    with pytest.raises(ValueError, match=r"same shape, got y_true \[2,3\] and y_pred \[3,3\]"):
        jit(tf.zeros((2, 3)), tf.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"masked token id 5 is outside \[0, 3\)"):
        tf.function(lambda a: fm.masked_mae(a, a, 0, 5), jit_compile=True)(tf.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"masked token id 5 is outside \[0, 3\)"):
        tf.function(lambda a, b: fm.sparse_masked_mae(a, b, 0, 5), jit_compile=True)(
            tf.zeros((2,), tf.int32), tf.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"classes\) must be positive"):
        tf.function(lambda a: fm.masked_mae(a, a), jit_compile=True)(tf.zeros((2, 0)))
    sparse = tf.function(lambda a, b: fm.sparse_masked_mae(a, b, 0, 2), jit_compile=True)
    for bad in (3, -1):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=rf"y_true_ids\[1\] \(flat index\) = {bad} is outside \[0, 3\)"):
            sparse(tf.constant([0, bad]), tf.zeros((2, 3)))
    # Shapes that only differ at run time: the handler's check.
    dynamic = tf.function(lambda a, b: fm.masked_mae(a, b, 0, 2), jit_compile=True,
                          input_signature=[tf.TensorSpec([None, 3])] * 2)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"same shape, got y_true \[2,3\] and y_pred \[4,3\]"):
        dynamic(tf.zeros((2, 3)), tf.zeros((4, 3)))


def test_composite_fallback_is_logged_once(monkeypatch, caplog, spy):
    monkeypatch.setenv("FUSED_MASKED_MAE_XLA", "composite")
    monkeypatch.setattr(fm_xla, "_fallback_logged", set())
    t, p = seq2seq_batch((2, 3, 5), tf.float32, 0, 4)
    with caplog.at_level(logging.WARNING, logger="fused_masked_mae"):
        for _ in range(2):
            tf.function(lambda a, b: fm.masked_mae(a, b, 0, 4), jit_compile=True)(t, p)
    assert spy == ["composite", "composite"]
    assert caplog.text.count("using the composite of plain ops") == 1


def test_no_cuda_handlers_means_the_composite_where_gpus_are(monkeypatch):
    monkeypatch.setattr(fm_xla, "_fallback_logged", set())
    monkeypatch.setattr(fm_xla, "REGISTERED_PLATFORMS", ["Host"])
    real = tf.config.list_logical_devices
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: ["gpu0"] if kind == "GPU" else real(kind))
    assert fm_xla.use_custom_call(9) is False
    monkeypatch.setattr(fm_xla, "REGISTERED_PLATFORMS", ["CUDA", "Host"])
    assert fm_xla.use_custom_call(9) is True
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: ["tpu0"] if kind == "TPU" else real(kind))
    assert fm_xla.use_custom_call(9) is False


def test_module_text_for_two_platforms_takes_the_platform_index(monkeypatch):
    monkeypatch.setattr(fm_xla, "REGISTERED_PLATFORMS", ["CUDA", "Host"])
    text = fm_xla._module(fm_xla.FORWARD_TARGETS[False], [([None, 9], tf.float32)] * 2,
                          [([None], tf.float32), ([None], tf.uint8)], "masked_tokens = array<i64>")
    assert "@main(%platform_index: tensor<i32>, %arg0: tensor<?x9xf32>" in text
    assert "indices_of_shape_operands = dense<[2, 3]>" in text


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


def fit_history(jit_compile, weights, loss):
    x, y = copy_task()
    if isinstance(loss, fm.SparseMaskedMAE):
        y = x  # the copy task's targets as class ids
    model = tiny_model()
    model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=loss, jit_compile=jit_compile)
    assert model.jit_compile == jit_compile
    sample_weight = np.random.default_rng(3).random((64, 6)).astype(np.float32)
    history = model.fit(x, y, sample_weight=sample_weight, epochs=3, batch_size=32,
                        shuffle=False, verbose=0)
    return history.history["loss"], model.evaluate(x, y, batch_size=64, verbose=0)


@pytest.mark.parametrize("loss", [
    fm.MaskedMAE(START, END, tokens=[PAD]),
    fm.MaskedMAE(START, END, reduction="sum"),
    fm.SparseMaskedMAE(START, END, tokens=[PAD]),
], ids=["dense", "dense-sum", "sparse"])
def test_keras_fit_with_jit_compile_equals_without(spy, loss):
    keras.utils.set_random_seed(0)
    initial = tiny_model().get_weights()
    xla_losses, xla_eval = fit_history(True, initial, loss)
    assert spy and set(spy) == {"custom_call"}, spy
    spy.clear()
    plain_losses, plain_eval = fit_history(False, initial, loss)
    assert not spy, "outside XLA the TensorFlow op is used"
    assert xla_losses[-1] < 0.9 * xla_losses[0], xla_losses
    # The same kernels either way; the optimizer step is XLA's, so allow rounding.
    np.testing.assert_allclose(xla_losses, plain_losses, rtol=1e-5)
    np.testing.assert_allclose(xla_eval, plain_eval, rtol=1e-5)


SAVED_MODEL_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    if sys.argv[2] == "import":
        import fused_masked_mae  # registers the XLA handlers
    loaded = tf.saved_model.load(sys.argv[1])
    y = tf.one_hot([[1, 3, 10], [1, 2, 10]], 12)
    p = tf.nn.softmax(tf.constant(np.random.default_rng(0).normal(size=(2, 3, 12)), tf.float32))
    print("LOSS", loaded.loss(y, p).numpy().tobytes().hex())
""")


def test_saved_model_of_a_jit_function_reloads_in_a_fresh_process(tmp_path):
    class Jitted(tf.Module):
        # autograph=False: autograph re-parses this nested method's source and,
        # after other test modules ran, picked up the enclosing test instead.
        @tf.function(input_signature=[tf.TensorSpec([None, None, 12], tf.float32)] * 2,
                     jit_compile=True, autograph=False)
        def loss(self, y, p):
            return fm.masked_mae(y, p, START, END)

    tf.saved_model.save(Jitted(), str(tmp_path / "jit"))
    y = tf.one_hot([[1, 3, 10], [1, 2, 10]], 12)
    p = tf.nn.softmax(tf.constant(np.random.default_rng(0).normal(size=(2, 3, 12)), tf.float32))
    expected = fm.masked_mae(y, p, START, END).numpy().tobytes().hex()

    def run(mode):
        return subprocess.run([sys.executable, "-c", SAVED_MODEL_SCRIPT, str(tmp_path / "jit"),
                               mode], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))

    with_import = run("import")
    assert with_import.returncode == 0, with_import.stderr[-3000:]
    assert f"LOSS {expected}" in with_import.stdout
    without = run("no-import")
    assert without.returncode != 0
    assert "No FFI handler registered for fused_masked_mae_forward.import_fused_masked_mae" in \
        without.stderr, without.stderr[-3000:]
