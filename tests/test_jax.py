"""fused_masked_mae.jax: the fused kernels as XLA FFI custom calls in JAX.

Held to a composite written in jax.numpy (with tf.math.argmax's rule, the
project's semantics) and to _core, which runs the same launchers: values and
gradients, eager, jit, vmap, grad, jax.export with a symbolic batch, every
dtype, dense, sparse and token sets, NaN/Inf rows, empty batches, bad inputs.
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)  # float64 and int64 ids

from fused_masked_mae import core  # noqa: E402
from fused_masked_mae import jax as fmj  # noqa: E402

DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64]
START, END, PAD = 1, 2, 3


def tf_argmax(x):
    """tf.math.argmax's rule in jnp: the first index of the largest element above
    the dtype's lowest finite value; NaN never; 0 when none qualifies."""
    lowest = jnp.finfo(x.dtype).min
    candidates = jnp.where(jnp.isnan(x) | (x <= lowest), -jnp.inf, x)
    return jnp.argmax(candidates, axis=-1)


def jnp_composite(y_true, y_pred, tokens):
    t_max, p_max = tf_argmax(y_true), tf_argmax(y_pred)
    masked = jnp.zeros(t_max.shape, y_pred.dtype)
    for token in sorted(set(tokens)):
        masked = masked + (t_max == token).astype(y_pred.dtype)
    cond = 1 - masked * (t_max == p_max).astype(y_pred.dtype)
    return cond * jnp.mean(jnp.abs(y_pred - y_true), axis=-1)


def batch(shape, dtype, seed=0, hit_rate=0.5):
    """One-hot targets and logits whose argmax often equals the target's."""
    rng = np.random.default_rng(seed)
    classes = shape[-1]
    ids = rng.integers(0, classes, shape[:-1])
    ids[..., -1] = END  # padding-like rows
    logits = rng.standard_normal(shape)
    hit = rng.random(shape[:-1]) < hit_rate
    np.put_along_axis(logits, ids[..., None], np.where(hit, 5.0, -5.0)[..., None], axis=-1)
    y_true = np.eye(classes)[ids]
    return (jnp.asarray(y_true, dtype), jnp.asarray(logits, dtype), jnp.asarray(ids, jnp.int32))


def np_bits(x):
    return np.asarray(x).tobytes()


def as_numpy(x):
    return np.asarray(x)


def max_ulps(a, b):
    a, b = as_numpy(a), as_numpy(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    ints = {4: np.int32, 8: np.int64}[a.dtype.itemsize]
    ulps = np.abs(a.view(ints).astype(np.int64) - b.view(ints).astype(np.int64))
    return int(np.where(a == b, 0, ulps).max(initial=0))  # -0.0 == 0.0 (masked rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [(), (START, END), (START, END, PAD)])
def test_values_and_gradients_match_the_jnp_composite(dtype, tokens):
    y_true, y_pred, _ = batch((4, 6, 11), dtype)
    fused = fmj.masked_mae_tokens(y_true, y_pred, tokens)
    composite = jnp_composite(y_true, y_pred, tokens)
    assert fused.dtype == dtype and fused.shape == (4, 6)
    rtol = {jnp.float16: 2e-3, jnp.bfloat16: 1e-2, jnp.float32: 1e-6, jnp.float64: 1e-14}[dtype]
    np.testing.assert_allclose(as_numpy(fused).astype(np.float64),
                               as_numpy(composite).astype(np.float64), rtol=rtol, atol=0)
    assert (as_numpy(fused) == 0).sum() == (as_numpy(composite) == 0).sum()
    weights = jnp.asarray(np.random.default_rng(1).random((4, 6)), dtype)
    grads = jax.grad(lambda t, p: (fmj.masked_mae_tokens(t, p, tokens) * weights).sum(),
                     argnums=(0, 1))(y_true, y_pred)
    grads_ref = jax.grad(lambda t, p: (jnp_composite(t, p, tokens) * weights).sum(),
                         argnums=(0, 1))(y_true, y_pred)
    if dtype in (jnp.float32, jnp.float64):
        # Within one ulp of the composite's gradient: the kernel rounds the row
        # factor (g * cond) / C as TensorFlow's Mean gradient does; jnp.mean's
        # backward rounds it differently (TF's composite is matched bit for bit
        # in tests/test_gradients.py).
        for fused_grad, ref_grad in zip(grads, grads_ref):
            assert max_ulps(fused_grad, ref_grad) <= 1
            assert np.array_equal(np.sign(as_numpy(fused_grad)), np.sign(as_numpy(ref_grad)))
    else:
        np.testing.assert_allclose(as_numpy(grads[1]).astype(np.float64),
                                   as_numpy(grads_ref[1]).astype(np.float64), rtol=rtol,
                                   atol=float(jnp.finfo(dtype).eps) / 11)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eager_jit_vmap_and_core_agree_bit_for_bit(dtype):
    y_true, y_pred, _ = batch((3, 5, 13), dtype, seed=2)
    tokens = (START, END)
    eager = fmj.masked_mae_tokens(y_true, y_pred, tokens)
    jitted = jax.jit(lambda t, p: fmj.masked_mae_tokens(t, p, tokens))(y_true, y_pred)
    mapped = jax.vmap(lambda t, p: fmj.masked_mae_tokens(t, p, tokens))(y_true, y_pred)
    mapped_axis1 = jax.vmap(lambda t, p: fmj.masked_mae_tokens(t, p, tokens), in_axes=1,
                            out_axes=1)(y_true, y_pred)
    # y_true unbatched under vmap: broadcast_all hands the handler a full y_true.
    unbatched = jax.vmap(lambda p: fmj.masked_mae_tokens(y_true[0], p, tokens))(y_pred[:1])
    ref = core.forward(as_numpy(y_true), as_numpy(y_pred), tokens)
    for result in (eager, jitted, mapped, mapped_axis1):
        assert np_bits(result) == ref.tobytes()
    assert np_bits(unbatched[0]) == ref[0].tobytes()
    grad_loss = jnp.asarray(np.random.default_rng(3).random((3, 5)), dtype)
    grad = jax.jit(jax.grad(lambda p: (fmj.masked_mae_tokens(y_true, p, tokens) *
                                       grad_loss).sum()))(y_pred)
    grad_ref = core.gradient(as_numpy(y_true), as_numpy(y_pred), as_numpy(grad_loss), tokens)
    assert np_bits(grad) == grad_ref.tobytes()
    grad_of_vmap = jax.grad(lambda p: (jax.vmap(
        lambda t, q: fmj.masked_mae_tokens(t, q, tokens))(y_true, p) * grad_loss).sum())(y_pred)
    assert np_bits(grad_of_vmap) == grad_ref.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("id_dtype", [jnp.int32, jnp.int64])
def test_sparse_equals_dense_on_one_hot(dtype, id_dtype):
    y_true, y_pred, ids = batch((4, 6, 9), dtype, seed=4)
    ids = ids.astype(id_dtype)
    tokens = (START, END)
    dense = jax.value_and_grad(lambda p: fmj.masked_mae_tokens(y_true, p, tokens).sum())(y_pred)
    sparse = jax.jit(jax.value_and_grad(
        lambda p: fmj.sparse_masked_mae_tokens(ids, p, tokens).sum()))(y_pred)
    assert np_bits(fmj.sparse_masked_mae(ids, y_pred, START, END)) == np_bits(
        fmj.masked_mae(y_true, y_pred, START, END))
    assert np_bits(dense[1]) == np_bits(sparse[1])
    # Integer ids get a float0 cotangent, not an error.
    grads = jax.grad(lambda i, p: fmj.sparse_masked_mae_tokens(i, p, tokens).sum(),
                     argnums=1)(ids, y_pred)
    assert grads.shape == y_pred.shape


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_check_grads_numerically(dtype):
    from jax.test_util import check_grads

    y_true, y_pred, _ = batch((2, 3, 5), jnp.float64, seed=5, hit_rate=0.0)
    check_grads(lambda p: fmj.masked_mae(y_true, p, START, END), (y_pred,), order=1,
                modes=["rev"], eps=1e-6)


def test_nan_inf_rows_and_ties_follow_the_core_bit_for_bit():
    rows = np.array([
        [np.nan, 1.0, 2.0], [1.0, 2.0, np.nan], [np.inf, 0.0, 0.0], [-np.inf, -np.inf, -np.inf],
        [-0.0, 0.0, -1.0], [2.0, 2.0, 2.0], [np.nan, np.nan, np.nan], [0.0, 3.0, 3.0],
    ], np.float32)
    y_true = np.eye(3, dtype=np.float32)[[2, 1, 0, 0, 0, 0, 0, 1]]
    for dtype in DTYPES:
        t, p = jnp.asarray(y_true, dtype), jnp.asarray(rows, dtype)
        ref = core.forward(as_numpy(t), as_numpy(p), [0, 1])
        assert np_bits(fmj.masked_mae(t, p, 0, 1)) == ref.tobytes()
        grad = jax.grad(lambda q: fmj.masked_mae(t, q, 0, 1).sum())(p)
        assert np_bits(grad) == core.gradient(as_numpy(t), as_numpy(p),
                                              np.ones(8, as_numpy(t).dtype), [0, 1]).tobytes()


def test_zero_sized_batch():
    y = jnp.zeros((0, 4, 7), jnp.float32)
    assert fmj.masked_mae(y, y, 0, 1).shape == (0, 4)
    assert jax.grad(lambda p: fmj.masked_mae(y, p, 0, 1).sum())(y).shape == (0, 4, 7)
    assert jax.jit(lambda i, p: fmj.sparse_masked_mae(i, p, 0))(
        jnp.zeros((0, 4), jnp.int32), y).shape == (0, 4)


def test_export_with_a_symbolic_batch_runs_every_size():
    from jax import export

    spec = export.symbolic_shape("b, 5, 9")
    f = jax.jit(jax.value_and_grad(lambda t, p: fmj.masked_mae(t, p, START, END).sum(),
                                   argnums=1))
    exported = export.export(f, disabled_checks=fmj.DISABLED_CHECKS)(
        jax.ShapeDtypeStruct(spec, jnp.float32), jax.ShapeDtypeStruct(spec, jnp.float32))
    restored = export.deserialize(exported.serialize())
    for rows in (1, 3, 8):
        y_true, y_pred, _ = batch((rows, 5, 9), jnp.float32, seed=rows)
        value, grad = restored.call(y_true, y_pred)
        assert np_bits(grad) == np_bits(f(y_true, y_pred)[1])
    # Without disabling the check, jax.export refuses the custom call by name.
    with pytest.raises(ValueError, match="fused_masked_mae"):
        export.export(f)(jax.ShapeDtypeStruct(spec, jnp.float32),
                         jax.ShapeDtypeStruct(spec, jnp.float32))


def test_bad_inputs_raise_clear_errors():
    y = jnp.zeros((2, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"same shape, got y_true \[2, 4\] and y_pred \[2, 3\]"):
        fmj.masked_mae(jnp.zeros((2, 4), jnp.float32), y)
    with pytest.raises(ValueError, match="rank >= 1"):
        fmj.masked_mae(jnp.float32(1), jnp.float32(1))
    with pytest.raises(ValueError, match="classes.*positive"):
        fmj.masked_mae(jnp.zeros((2, 0)), jnp.zeros((2, 0)))
    with pytest.raises(TypeError, match="y_pred must be float16, bfloat16, float32 or float64"):
        fmj.masked_mae(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"masked token id 5 is outside \[0, 3\)"):
        fmj.masked_mae(y, y, 0, 5)
    with pytest.raises(ValueError, match=r"start_token must be a class id in \[0, 2\*\*63\), got -1"):
        fmj.masked_mae(y, y, -1)
    with pytest.raises(TypeError, match="int32 or int64"):
        fmj.sparse_masked_mae(jnp.zeros((2,), jnp.float32), y)
    # An id outside [0, C) is found by the CPU handler when it runs, eagerly and under jit.
    for run in (fmj.sparse_masked_mae, jax.jit(fmj.sparse_masked_mae)):
        with pytest.raises(Exception, match=r"INVALID_ARGUMENT: y_true_ids\[1\] \(flat index\) "
                                            r"= 3 is outside \[0, 3\)"):
            jax.block_until_ready(run(jnp.asarray([0, 3], jnp.int32), y))
    # The process is still healthy afterwards.
    assert float(fmj.masked_mae(y, y).sum()) == 0.0


def test_cpu_handlers_are_registered_and_run_on_xla_threads():
    assert "cpu" in fmj.PLATFORMS and fmj.supports_platform("cpu")
    # A large batch runs sharded (XLA's intra-op pool): same bits as _core.
    y_true, y_pred, _ = batch((256, 64, 33), jnp.float32, seed=9)
    assert np_bits(fmj.masked_mae(y_true, y_pred, START, END)) == core.forward(
        as_numpy(y_true), as_numpy(y_pred), [START, END]).tobytes()
