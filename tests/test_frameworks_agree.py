"""One kernel, every front door: values and gradients bit for bit equal across
the TensorFlow op (eager), TensorFlow under jit_compile (XLA custom calls),
JAX (eager, jit, vmap, grad) and PyTorch (eager, torch.compile), on the same
inputs: all four dtypes, dense, sparse and token sets, NaN/Inf rows, and
zero-sized batches. Each framework runs in this process on NumPy copies of
the same bytes."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

jax.config.update("jax_enable_x64", True)

import fused_masked_mae as fm  # noqa: E402
from fused_masked_mae import jax as fmj  # noqa: E402
from fused_masked_mae import torch as fmt  # noqa: E402

DTYPES = ["float16", "bfloat16", "float32", "float64"]
TOKENS = [1, 2, 5]


def np_dtype(name):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def inputs(dtype, rows, classes=13, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, classes, rows)
    ids[::4] = 2
    logits = rng.standard_normal((rows, classes))
    logits[1::4, 2] = 9.0  # argmax hits on masked ids
    if rows >= 8:
        logits[3, 4] = np.nan
        logits[5, :] = -np.inf
        logits[6, 7] = np.inf
        logits[7, :2] = [-0.0, 0.0]
    y_true = np.eye(classes)[ids].astype(np_dtype(dtype)).reshape(2, rows // 2, classes)
    y_pred = logits.astype(np_dtype(dtype)).reshape(2, rows // 2, classes)
    grad_loss = rng.random(rows).astype(np_dtype(dtype)).reshape(2, rows // 2)
    return y_true, y_pred, ids.reshape(2, rows // 2).astype(np.int32), grad_loss


def tf_results(y_true, y_pred, ids, grad_loss, sparse):
    def run(t, p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = (fm.sparse_masked_mae(t, p, tokens=TOKENS) if sparse
                    else fm.masked_mae(t, p, tokens=TOKENS))
            total = tf.reduce_sum(loss * grad_loss)
        return loss, tape.gradient(total, p)

    t = tf.constant(ids if sparse else y_true)
    p = tf.constant(y_pred)
    eager = run(t, p)
    jit = tf.function(run, jit_compile=True)(t, p)
    return {"tf": eager, "tf_jit": jit}


def jax_results(y_true, y_pred, ids, grad_loss, sparse):
    t = jnp.asarray(ids if sparse else y_true)
    p = jnp.asarray(y_pred)
    g = jnp.asarray(grad_loss)
    fn = fmj.sparse_masked_mae_tokens if sparse else fmj.masked_mae_tokens

    def run(t, p):
        loss, vjp = jax.vjp(lambda q: fn(t, q, TOKENS), p)
        return loss, vjp(g)[0]

    def vmapped(t, p):
        loss, vjp = jax.vjp(lambda q: jax.vmap(lambda a, b: fn(a, b, TOKENS))(t, q), p)
        return loss, vjp(g)[0]

    grad = jax.grad(lambda q: (fn(t, q, TOKENS) * g).sum())(p)
    return {"jax": run(t, p), "jax_jit": jax.jit(run)(t, p), "jax_vmap": vmapped(t, p),
            "jax_grad": (fn(t, p, TOKENS), grad)}


def torch_tensor(array):
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def torch_results(y_true, y_pred, ids, grad_loss, sparse):
    fn = fmt.sparse_masked_mae_tokens if sparse else fmt.masked_mae_tokens
    t = torch_tensor(ids if sparse else y_true)
    g = torch_tensor(grad_loss)

    def step(t, p):
        loss = fn(t, p, TOKENS)
        return loss, (loss * g).sum()

    out = {}
    for name, run in (("torch", step), ("torch_compile", torch.compile(step, fullgraph=True))):
        p = torch_tensor(y_pred).requires_grad_()
        loss, total = run(t, p)
        total.backward()
        out[name] = (loss.detach(), p.grad)
    return out


def raw(x):
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy().tobytes()
    return np.asarray(x).tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("rows", [16, 0])
def test_every_front_door_gives_the_same_bits(dtype, sparse, rows):
    torch._dynamo.reset()
    y_true, y_pred, ids, grad_loss = inputs(dtype, rows)
    results = {}
    for runner in (tf_results, jax_results, torch_results):
        results.update(runner(y_true, y_pred, ids, grad_loss, sparse))
    reference_loss, reference_grad = (raw(x) for x in results["tf"])
    for name, (loss, grad) in results.items():
        assert raw(loss) == reference_loss, name
        assert raw(grad) == reference_grad, name
    if rows:  # the inputs do hold NaN/Inf rows and masked positions
        loss = np.asarray(results["jax"][0]).astype(np.float64)
        assert np.isnan(loss).any() and (loss == 0).any()
