"""CUDA kernels through the TensorFlow-free core, on PyTorch and CuPy arrays.

Runs where a GPU, a CUDA-enabled _core and PyTorch or CuPy exist (the lent GPU
machine, via tools/gpu_check.sh); skips with the reason elsewhere. Compared
with the NumPy statement of the loss (tests/numpy_reference.py) and with the
CPU path of the same core.
"""

import importlib.util
import os

import ml_dtypes
import numpy as np
import pytest

import numpy_reference as ref
from fused_masked_mae import _core, core


def _gpu_backends():
    backends = []
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            backends.append("torch")
    if importlib.util.find_spec("cupy") is not None:
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() > 0:
                backends.append("cupy")
                if os.environ.get("FUSED_MASKED_MAE_CUPY_POOL") == "off":
                    # Under compute-sanitizer (tools/gpu_check.sh): every array its
                    # own allocation, so an overrun is not hidden inside a pool block.
                    cupy.cuda.set_allocator(None)
        except Exception:  # no driver or no device
            pass
    return backends


BACKENDS = _gpu_backends()
if os.environ.get("GPU_TEST_BACKENDS"):  # e.g. "cupy" under compute-sanitizer
    BACKENDS = [b for b in BACKENDS if b in os.environ["GPU_TEST_BACKENDS"].split(",")]
pytestmark = [
    pytest.mark.skipif(not _core.WITH_CUDA, reason="_core was built without CUDA"),
    pytest.mark.skipif(not BACKENDS, reason="no CUDA GPU with PyTorch or CuPy on this machine"),
]

CLASS_COUNTS = [1, 7, 32, 33, 1000, 1549, 4096, 32000, 131072]
DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]
LOSS_RTOL = {np.float16: 1e-3, ml_dtypes.bfloat16: 8e-3, np.float32: 5e-6, np.float64: 1e-12}


def to_device(array, backend, offset=0):
    """Copies a NumPy array to the GPU; offset > 0 starts it `offset` elements
    into a larger buffer, so its rows are not 16-byte aligned."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if backend == "torch":
        import torch

        if array.dtype == ml_dtypes.bfloat16:
            buf = torch.empty(flat.size + offset, dtype=torch.bfloat16, device="cuda")
            bits = torch.from_numpy(flat.view(np.int16).copy()).cuda()
            buf[offset:].view(torch.int16).copy_(bits)
        else:
            buf = torch.empty(flat.size + offset, dtype=getattr(torch, array.dtype.name),
                              device="cuda")
            buf[offset:].copy_(torch.from_numpy(flat.copy()).cuda())
        return buf[offset:].view(array.shape)
    import cupy

    buf = cupy.empty(flat.size + offset, dtype=array.dtype)
    buf[offset:] = cupy.asarray(flat)
    return buf[offset:].reshape(array.shape)


def to_host(array, dtype):
    if type(array).__module__.split(".")[0] == "torch":
        import torch

        array = array.cpu()
        if array.dtype == torch.bfloat16:
            return array.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return array.numpy()
    return array.get().astype(dtype)


def backends_for(dtype):
    """The backends that hold `dtype` (CuPy has no bfloat16); skips rather than
    passing vacuously when there is none."""
    backends = [b for b in BACKENDS if not (b == "cupy" and dtype == ml_dtypes.bfloat16)]
    if not backends:
        pytest.skip(f"no backend here holds {np.dtype(dtype).name} (bfloat16 needs PyTorch)")
    return backends


def torch_or_skip():
    if "torch" not in BACKENDS:
        pytest.skip("needs PyTorch with CUDA")
    import torch

    return torch


def inputs(rows, num_classes, dtype, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, rows)
    labels[: rows // 2] = num_classes - 1  # end-token padding, as in the seed
    y_true = np.eye(num_classes, dtype=np.float32)[labels] if num_classes <= 4096 else \
        np.zeros((rows, num_classes), np.float32)
    if num_classes > 4096:
        y_true[np.arange(rows), labels] = 1
    y_pred = rng.random((rows, num_classes), dtype=np.float32)
    y_pred[::2] += y_true[::2]  # every other row predicts its target
    return y_true.astype(dtype), y_pred.astype(dtype)


def assert_same(actual, expected):
    np.testing.assert_array_equal(np.asarray(actual, np.float64), np.asarray(expected, np.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_forward_and_gradient_match_reference(num_classes, dtype, offset):
    rows = max(2, min(64, (1 << 21) // num_classes))
    tokens = [0, num_classes - 1]
    y_true, y_pred = inputs(rows, num_classes, dtype, seed=num_classes)
    grad_loss = np.random.default_rng(1).normal(size=rows).astype(dtype)
    expected_loss = ref.loss(y_true, y_pred, tokens)
    expected_grad = ref.gradient(y_true, y_pred, grad_loss, tokens)
    for backend in backends_for(dtype):
        t, p = to_device(y_true, backend, offset), to_device(y_pred, backend, offset)
        g = to_device(grad_loss, backend, offset)
        loss = to_host(core.forward(t, p, tokens), dtype)
        np.testing.assert_allclose(loss.astype(np.float64), expected_loss.astype(np.float64),
                                   rtol=LOSS_RTOL[dtype], atol=0)
        np.testing.assert_array_equal(loss == 0, expected_loss == 0)
        # keep, the row factor and the signs are exact: so is the gradient.
        assert_same(to_host(core.gradient(t, p, g, tokens), dtype), expected_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("num_classes", [1, 33, 1549, 32000])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64], ids=["int32", "int64"])
def test_sparse_equals_dense_on_one_hot(num_classes, dtype, id_dtype):
    rows = max(2, min(64, (1 << 20) // num_classes))
    y_true, y_pred = inputs(rows, num_classes, dtype, seed=3)
    ids = np.argmax(np.asarray(y_true, np.float32), axis=-1).astype(id_dtype)
    tokens = [0, num_classes - 1]
    grad_loss = np.random.default_rng(2).normal(size=rows).astype(dtype)
    for backend in backends_for(dtype):
        i, t, p = to_device(ids, backend), to_device(y_true, backend), to_device(y_pred, backend)
        g = to_device(grad_loss, backend)
        # The GPU's dense and sparse kernels reduce in the same order: bit for bit.
        assert_same(to_host(core.forward(i, p, tokens, sparse=True), dtype),
                    to_host(core.forward(t, p, tokens), dtype))
        assert_same(to_host(core.gradient(i, p, g, tokens, sparse=True), dtype),
                    ref.gradient(y_true, y_pred, grad_loss, tokens))


def test_sparse_invalid_id_gives_nan_on_gpu():
    backend = BACKENDS[0]
    ids = to_device(np.array([0, 7, -1], np.int64), backend)
    p = to_device(np.ones((3, 7), np.float32), backend)
    loss = to_host(core.forward(ids, p, [0], sparse=True), np.float32)
    assert not np.isnan(loss[0]) and np.isnan(loss[1]) and np.isnan(loss[2])
    grad = to_host(core.gradient(ids, p, to_device(np.ones(3, np.float32), backend), [0],
                                 sparse=True), np.float32)
    assert np.isnan(grad[1:]).all() and not np.isnan(grad[0]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_crafted_rows_follow_tf_argmax(dtype):
    rows = ref.crafted_rows().astype(dtype)
    y_true = np.repeat(rows, len(rows), axis=0)
    y_pred = np.tile(rows, (len(rows), 1))
    ones = np.ones(len(y_true), dtype)
    for backend in backends_for(dtype):
        t, p = to_device(y_true, backend), to_device(y_pred, backend)
        for tokens in ([0], [1, 2], [0, 1, 2, 3]):
            loss = to_host(core.forward(t, p, tokens), dtype)
            expected = ref.loss(y_true, y_pred, tokens)
            np.testing.assert_array_equal(np.isnan(loss.astype(np.float64)),
                                          np.isnan(expected.astype(np.float64)))
            assert_same(to_host(core.gradient(t, p, to_device(ones, backend), tokens), dtype),
                        ref.gradient(y_true, y_pred, ones, tokens))


@pytest.mark.parametrize("num_classes", [33, 1549, 131072])
def test_results_are_bitwise_reproducible(num_classes):
    dtype = np.float32
    y_true, y_pred = inputs(16, num_classes, dtype, seed=7)
    backend = BACKENDS[0]
    t, p = to_device(y_true, backend), to_device(y_pred, backend)
    g = to_device(np.ones(16, dtype), backend)
    first_loss = to_host(core.forward(t, p, [0]), dtype)
    first_grad = to_host(core.gradient(t, p, g, [0]), dtype)
    for _ in range(20):
        assert to_host(core.forward(t, p, [0]), dtype).tobytes() == first_loss.tobytes()
        assert to_host(core.gradient(t, p, g, [0]), dtype).tobytes() == first_grad.tobytes()
    # The same values at another address (unaligned) give the same bits too.
    t1, p1 = to_device(y_true, backend, 1), to_device(y_pred, backend, 1)
    assert to_host(core.forward(t1, p1, [0]), dtype).tobytes() == first_loss.tobytes()


def test_empty_batch_launches_nothing():
    backend = BACKENDS[0]
    y = to_device(np.zeros((0, 5), np.float32), backend)
    assert tuple(core.forward(y, y, [1]).shape) == (0,)


def test_bad_device_inputs_raise():
    backend = BACKENDS[0]
    a = to_device(np.zeros((2, 3), np.float32), backend)
    b = to_device(np.zeros((3, 3), np.float32), backend)
    with pytest.raises(ValueError, match=r"same shape"):
        core.forward(a, b, [0])
    with pytest.raises(ValueError, match=r"token id 3 is outside \[0, 3\)"):
        core.forward(a, a, [3])
    with pytest.raises(ValueError, match="grad_loss"):
        core.gradient(a, a, to_device(np.zeros(3, np.float32), backend), [0])
    strided = to_device(np.zeros((2, 6), np.float32), backend)[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        core.forward(strided, strided, [0])


# --- Blind spots: lanes, warps and blocks, grids, streams, devices, out= -----------


def tie_rows(num_classes, dtype, rng):
    """Rows whose maxima tie across lanes, warps and blocks: the same maximum
    at indices that different lanes (and for wide rows different warps) see,
    first at a late position, and rows where a later lane holds the first index."""
    rows = []
    for first in sorted({0, 1, num_classes // 3, num_classes // 2, num_classes - 1}):
        for extra in (num_classes - 1, first + 33, first + 129, first + 1025):
            row = rng.random(num_classes) * 0.5
            row[first] = 1.0
            if first < extra < num_classes:
                row[extra] = 1.0  # a tie later: argmax must stay at `first`
            rows.append(row)
    return np.array(rows).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("num_classes", [33, 200, 1549, 32000])
def test_argmax_ties_across_lanes_and_warps(num_classes, dtype):
    # C = 200 float32 is the 16-lane path; 1549 and 32000 take whole blocks.
    rng = np.random.default_rng(num_classes)
    y_pred = tie_rows(num_classes, dtype, rng)
    # Targets: the same tied rows (argmaxes agree) and shifted ones (they differ).
    y_true = np.concatenate([y_pred, np.roll(y_pred, 1, axis=0)])
    y_pred = np.concatenate([y_pred, y_pred])
    firsts = np.argmax(np.asarray(y_true, np.float64), axis=-1)
    tokens = sorted(set(firsts.tolist()))[:8]
    ones = np.ones(len(y_true), dtype)
    for backend in backends_for(dtype):
        t, p = to_device(y_true, backend), to_device(y_pred, backend)
        loss = to_host(core.forward(t, p, tokens), dtype)
        expected = ref.loss(y_true, y_pred, tokens)
        np.testing.assert_array_equal(loss == 0, expected == 0)  # masking is exact
        assert_same(to_host(core.gradient(t, p, to_device(ones, backend), tokens), dtype),
                    ref.gradient(y_true, y_pred, ones, tokens))


def test_out_writes_into_given_arrays():
    backend = BACKENDS[0]
    y_true, y_pred = inputs(8, 40, np.float32, seed=5)
    t, p = to_device(y_true, backend), to_device(y_pred, backend)
    loss_out = to_device(np.full(8, 7.0, np.float32), backend)
    grad_out = to_device(np.full((8, 40), 7.0, np.float32), backend)
    assert core.forward(t, p, [0], out=loss_out) is loss_out
    g = to_device(np.ones(8, np.float32), backend)
    assert core.gradient(t, p, g, [0], out=grad_out) is grad_out
    assert_same(to_host(loss_out, np.float32), to_host(core.forward(t, p, [0]), np.float32))
    assert_same(to_host(grad_out, np.float32), ref.gradient(y_true, y_pred, np.ones(8), [0]))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0, 7), (0,)], ids=str)
def test_zero_size_inputs(shape):
    backend = BACKENDS[0]
    if shape[-1] == 0 or len(shape) == 1 and shape[0] == 0:
        y = to_device(np.zeros(shape, np.float32), backend)
        with pytest.raises(ValueError, match="must be positive"):
            core.forward(y, y, [])
        return
    y = to_device(np.zeros(shape, np.float32), backend)
    assert tuple(core.forward(y, y, [1]).shape) == shape[:-1]
    g = to_device(np.zeros(shape[:-1], np.float32), backend)
    assert tuple(core.gradient(y, y, g, [1]).shape) == shape


def test_non_default_stream_is_used():
    torch = torch_or_skip()
    y_true, y_pred = inputs(512, 1549, np.float32, seed=11)
    t, p = to_device(y_true, "torch"), to_device(y_pred, "torch")
    g = to_device(np.ones(512, np.float32), "torch")
    expected_loss = to_host(core.forward(t, p, [0]), np.float32)
    expected_grad = to_host(core.gradient(t, p, g, [0]), np.float32)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)  # the stream is busy: work queued behind it waits
        loss = core.forward(t, p, [0])
        grad = core.gradient(t, p, g, [0])
        done = torch.cuda.Event()
        done.record(stream)
    assert not done.query(), "the launches did not queue on the given stream"
    stream.synchronize()
    assert_same(to_host(loss, np.float32), expected_loss)
    assert_same(to_host(grad, np.float32), expected_grad)


def test_rows_beyond_the_grid_cap():
    # The launchers cap grids at 2^20 blocks and grid-stride: the block-per-row
    # forward (C = 1040 float32) with 2^20 + 3 rows, and the gradient stream
    # with more than 2^20 * 256 16-byte chunks (1.09e9 elements).
    torch = torch_or_skip()
    if torch.cuda.get_device_properties(0).total_memory < 48 * 2**30:
        pytest.skip("needs a GPU with 48 GiB")
    rows, num_classes = (1 << 20) + 3, 1040
    y_pred = torch.rand(rows, num_classes, device="cuda")
    y_true = torch.zeros_like(y_pred)
    y_true[:, 3] = 1
    y_pred[-1, 3] = 5.0  # the last row predicts its masked target: loss 0
    loss, keep = core.forward(y_true, y_pred, [3], return_keep=True)
    expected = (y_pred - y_true).abs().mean(-1)
    expected[-1] = 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert int(keep[-1]) == 0 and int(keep[:-1].min()) == 1
    grad = core.gradient(y_true, y_pred, torch.ones(rows, device="cuda"), row_keep=keep)
    sign = torch.sign(y_pred - y_true) / num_classes
    sign[-1] = 0
    assert torch.equal(grad, sign)
    del grad, y_true, y_pred


def test_arrays_on_another_device_run_there():
    torch = torch_or_skip()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    y_true, y_pred = inputs(64, 1549, np.float32, seed=13)
    expected = ref.loss(y_true, y_pred, [0])
    with torch.cuda.device(0):  # current device 0, arrays on cuda:1
        t = torch.from_numpy(y_true).to("cuda:1")
        p = torch.from_numpy(y_pred).to("cuda:1")
        loss = core.forward(t, p, [0])
    assert loss.device.index == 1
    np.testing.assert_allclose(loss.cpu().numpy(), expected, rtol=5e-6)
    with pytest.raises(ValueError, match="device"):
        core.forward(t, torch.from_numpy(y_pred).to("cuda:0"), [0])


def test_bfloat16_runs_when_pytorch_is_present():
    # The bf16 cases above skip (not pass) without PyTorch; say so here too.
    torch_or_skip()
    assert backends_for(ml_dtypes.bfloat16) == ["torch"]


def test_cupy_arrays_on_another_device_run_there():
    if "cupy" not in BACKENDS:
        pytest.skip("needs CuPy")
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    y_true, y_pred = inputs(64, 1549, np.float32, seed=14)
    expected = ref.loss(y_true, y_pred, [0])
    with cupy.cuda.Device(1):
        t, p = cupy.asarray(y_true), cupy.asarray(y_pred)
    with cupy.cuda.Device(0):  # current device 0, arrays on device 1
        loss = core.forward(t, p, [0])
    assert loss.device.id == 1
    np.testing.assert_allclose(cupy.asnumpy(loss), expected, rtol=5e-6)


def test_preload_then_capture_a_cuda_graph():
    torch = torch_or_skip()
    core.preload()  # every visible GPU
    core.preload(torch.device("cuda", 0))
    y_true, y_pred = inputs(32, 1549, np.float32, seed=15)
    t = torch.from_numpy(y_true).cuda()
    p = torch.from_numpy(y_pred).cuda()
    out = torch.empty(32, device="cuda")
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        core.forward(t, p, [0], out=out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    np.testing.assert_allclose(out.cpu().numpy(), ref.loss(y_true, y_pred, [0]), rtol=5e-6)
