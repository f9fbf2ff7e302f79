"""fused_masked_mae.torch: the fused kernels as torch.library custom ops.

Held to a composite written in torch ops (with tf.math.argmax's rule) and to
_core bit for bit; opcheck, gradcheck in float64, torch.compile(fullgraph=True)
with static and dynamic shapes, every dtype, sparse ids, NaN/Inf rows, empty
batches, bad inputs, and results independent of the CPU thread count.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fused_masked_mae import _core, core  # noqa: E402
from fused_masked_mae import torch as fmt  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
START, END, PAD = 1, 2, 3


def tf_argmax(x):
    lowest = torch.finfo(x.dtype).min
    candidates = torch.where(torch.isnan(x) | (x <= lowest), torch.tensor(-torch.inf, dtype=x.dtype),
                             x)
    return torch.argmax(candidates, dim=-1)


def torch_composite(y_true, y_pred, tokens):
    t_max, p_max = tf_argmax(y_true), tf_argmax(y_pred)
    masked = torch.zeros(t_max.shape, dtype=y_pred.dtype)
    for token in sorted(set(tokens)):
        masked = masked + (t_max == token).to(y_pred.dtype)
    cond = 1 - masked * (t_max == p_max).to(y_pred.dtype)
    return cond * torch.mean(torch.abs(y_pred - y_true), dim=-1)


def batch(shape, dtype, seed=0, hit_rate=0.5):
    rng = np.random.default_rng(seed)
    classes = shape[-1]
    ids = rng.integers(0, classes, shape[:-1])
    ids[..., -1] = END
    logits = rng.standard_normal(shape)
    hit = rng.random(shape[:-1]) < hit_rate
    np.put_along_axis(logits, ids[..., None], np.where(hit, 5.0, -5.0)[..., None], axis=-1)
    y_true = torch.from_numpy(np.eye(classes)[ids]).to(dtype)
    return y_true, torch.from_numpy(logits).to(dtype), torch.from_numpy(ids)


def bits(x):
    x = x.detach().contiguous()
    if x.dtype == torch.bfloat16:
        x = x.view(torch.int16)
    return x.numpy().tobytes()


def to_numpy(x):
    """A tensor as the NumPy array _core takes (bfloat16 through ml_dtypes)."""
    x = x.detach().contiguous()
    if x.dtype == torch.bfloat16:
        import ml_dtypes

        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


def max_ulps(a, b):
    a, b = to_numpy(a), to_numpy(b)
    ints = {4: np.int32, 8: np.int64}[a.dtype.itemsize]
    ulps = np.abs(a.view(ints).astype(np.int64) - b.view(ints).astype(np.int64))
    return int(np.where(a == b, 0, ulps).max(initial=0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [(), (START, END), (START, END, PAD)])
def test_values_and_gradients_match_the_torch_composite(dtype, tokens):
    y_true, y_pred, _ = batch((4, 6, 11), dtype)
    weights = torch.from_numpy(np.random.default_rng(1).random((4, 6))).to(dtype)
    grads = []
    for fn in (fmt.masked_mae_tokens, torch_composite):
        t, p = y_true.clone().requires_grad_(), y_pred.clone().requires_grad_()
        loss = fn(t, p, tokens)
        (loss * weights).sum().backward()
        grads.append((loss.detach(), t.grad, p.grad))
    (fused, fused_gt, fused_gp), (ref, ref_gt, ref_gp) = grads
    assert fused.dtype == dtype and fused.shape == (4, 6)
    rtol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6,
            torch.float64: 1e-14}[dtype]
    np.testing.assert_allclose(fused.double().numpy(), ref.double().numpy(), rtol=rtol, atol=0)
    assert int((fused == 0).sum()) == int((ref == 0).sum())
    if dtype in (torch.float32, torch.float64):
        assert max_ulps(fused_gp, ref_gp) <= 1 and max_ulps(fused_gt, ref_gt) <= 1
        assert torch.equal(torch.sign(fused_gp), torch.sign(ref_gp))
    else:
        np.testing.assert_allclose(fused_gp.double().numpy(), ref_gp.double().numpy(),
                                   rtol=rtol, atol=float(torch.finfo(dtype).eps) / 11)
    assert torch.equal(fused_gt, -fused_gp)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eager_compile_and_core_agree_bit_for_bit(dtype):
    torch._dynamo.reset()
    y_true, y_pred, _ = batch((3, 5, 13), dtype, seed=2)
    grad_loss = torch.from_numpy(np.random.default_rng(3).random((3, 5))).to(dtype)
    ref = core.forward(to_numpy(y_true), to_numpy(y_pred), [START, END])
    ref_grad = core.gradient(to_numpy(y_true), to_numpy(y_pred), to_numpy(grad_loss),
                             [START, END])

    def step(t, p):  # the backward runs AOT-compiled after the compiled forward
        loss = fmt.masked_mae(t, p, START, END)
        return loss, (loss * grad_loss).sum()

    runs = {"eager": step, "compile": torch.compile(step, fullgraph=True)}
    for name, run in runs.items():
        p = y_pred.clone().requires_grad_()
        loss, total = run(y_true, p)
        total.backward()
        assert bits(loss) == ref.tobytes(), name
        assert bits(p.grad) == ref_grad.tobytes(), name


def test_compile_dynamic_traces_once_for_every_batch_size():
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()  # counts graphs; the inductor backend runs in the test above

    @torch.compile(fullgraph=True, dynamic=True, backend=counter)
    def loss_and_total(t, p):
        loss = fmt.masked_mae(t, p, START, END)
        return loss, loss.sum()

    for rows in (2, 3, 7, 11):
        y_true, y_pred, _ = batch((rows, 4, 9), torch.float32, seed=rows)
        p = y_pred.clone().requires_grad_()
        loss, total = loss_and_total(y_true, p)
        total.backward()
        grad = p.grad
        assert bits(loss) == core.forward(y_true.numpy(), y_pred.numpy(), [START, END]).tobytes()
        assert bits(grad) == core.gradient(y_true.numpy(), y_pred.numpy(),
                                           np.ones((rows, 4), np.float32), [START, END]).tobytes()
    assert counter.frame_count == 1


def test_opcheck_passes_for_both_ops():
    y_true, y_pred, ids = batch((3, 4, 6), torch.float32)
    p = y_pred.clone().requires_grad_()
    for args in ((y_true, p, [START, END], False), (ids, p, [START], True),
                 (ids.int(), p, [], True)):
        torch.library.opcheck(torch.ops.fused_masked_mae.forward.default, args)
    keep = torch.ones(3, 4, dtype=torch.uint8)
    torch.library.opcheck(torch.ops.fused_masked_mae.gradient.default,
                          (y_true, y_pred, keep, torch.rand(3, 4), False))


def test_gradcheck_in_float64():
    y_true, y_pred, ids = batch((2, 3, 5), torch.float64, seed=5, hit_rate=0.0)
    t, p = y_true.clone().requires_grad_(), y_pred.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fmt.masked_mae(a, b, START, END), (t, p))
    assert torch.autograd.gradcheck(lambda b: fmt.sparse_masked_mae(ids, b, START, END), (p,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_sparse_equals_dense_on_one_hot(dtype, id_dtype):
    y_true, y_pred, ids = batch((4, 6, 9), dtype, seed=4)
    grads = []
    for fn, target in ((fmt.masked_mae, y_true), (fmt.sparse_masked_mae, ids.to(id_dtype))):
        p = y_pred.clone().requires_grad_()
        loss = fn(target, p, START, END)
        loss.sum().backward()
        grads.append((bits(loss), bits(p.grad)))
    assert grads[0] == grads[1]


def test_results_do_not_depend_on_the_thread_count():
    y_true, y_pred, ids = batch((512, 8, 257), torch.float32, seed=6)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            p = y_pred.clone().requires_grad_()
            loss = fmt.masked_mae(y_true, p, START, END)
            loss.sum().backward()
            results.append((bits(loss), bits(p.grad)))
    finally:
        torch.set_num_threads(before)
    assert all(r == results[0] for r in results)
    # _core's NumPy path takes the count as an argument.
    outs = {_core.forward(y_true.numpy(), y_pred.numpy(), [START], threads=n).tobytes()
            for n in (1, 2, 5, 0)}
    assert len(outs) == 1


def test_nan_inf_rows_and_ties_follow_the_core_bit_for_bit():
    rows = np.array([
        [np.nan, 1.0, 2.0], [1.0, 2.0, np.nan], [np.inf, 0.0, 0.0], [-np.inf, -np.inf, -np.inf],
        [-0.0, 0.0, -1.0], [2.0, 2.0, 2.0], [np.nan, np.nan, np.nan], [0.0, 3.0, 3.0],
    ], np.float64)
    y_true = np.eye(3)[[2, 1, 0, 0, 0, 0, 0, 1]]
    for dtype in DTYPES:
        t, p = torch.from_numpy(y_true).to(dtype), torch.from_numpy(rows).to(dtype)
        q = p.clone().requires_grad_()
        loss = fmt.masked_mae(t, q, 0, 1)
        loss.sum().backward()
        assert bits(loss) == core.forward(to_numpy(t), to_numpy(p), [0, 1]).tobytes()
        assert bits(q.grad) == core.gradient(to_numpy(t), to_numpy(p), to_numpy(torch.ones(
            8, dtype=dtype)), [0, 1]).tobytes()


def test_zero_sized_batch_and_non_contiguous_inputs():
    y = torch.zeros(0, 4, 7, requires_grad=True)
    loss = fmt.masked_mae(y.detach(), y, 0, 1)
    loss.sum().backward()
    assert loss.shape == (0, 4) and y.grad.shape == (0, 4, 7)
    y_true, y_pred, _ = batch((4, 6, 5), torch.float32)
    t, p = y_true.transpose(0, 1), y_pred.transpose(0, 1)
    assert bits(fmt.masked_mae(t, p, START)) == bits(fmt.masked_mae(t.contiguous(),
                                                                     p.contiguous(), START))


def test_bad_inputs_raise_clear_errors():
    y = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"same shape, got y_true \[2, 4\] and y_pred \[2, 3\]"):
        fmt.masked_mae(torch.zeros(2, 4), y)
    with pytest.raises(ValueError, match="rank >= 1"):
        fmt.masked_mae(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="classes.*positive"):
        fmt.masked_mae(torch.zeros(2, 0), torch.zeros(2, 0))
    with pytest.raises(TypeError, match="y_pred must be float16, bfloat16, float32 or float64"):
        fmt.masked_mae(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"masked token id 5 is outside \[0, 3\)"):
        fmt.masked_mae(y, y, 0, 5)
    with pytest.raises(TypeError, match="int32 or int64"):
        fmt.sparse_masked_mae(torch.zeros(2), y)
    with pytest.raises(ValueError, match=r"y_true_ids\[1\] \(flat index\) = 3 is outside \[0, 3\)"):
        fmt.sparse_masked_mae(torch.tensor([0, 3]), y)
    with pytest.raises(ValueError, match=r"y_true_ids\[0\] \(flat index\) = -1"):
        fmt.sparse_masked_mae(torch.tensor([-1, 0], dtype=torch.int32), y)
    # The raw operator validates too (what opcheck and compiled graphs call).
    with pytest.raises(ValueError, match="masked token id 7"):
        torch.ops.fused_masked_mae.forward(y, y, [7], False)
    assert float(fmt.masked_mae(y, y).sum()) == 0.0
