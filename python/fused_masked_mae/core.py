"""TensorFlow-free access to the fused kernels.

    from fused_masked_mae import core
    loss = core.forward(y_true, y_pred, masked_tokens=[start, end])
    grad = core.gradient(y_true, y_pred, grad_loss, masked_tokens=[start, end])

NumPy arrays run on the CPU (the TensorFlow CPU kernel's row code). PyTorch CUDA
tensors and CuPy arrays (anything with `__cuda_array_interface__`) run the CUDA
kernels on the arrays' device and current stream, when `_core` was built with them.
Results come back as the input's array type; `out=` writes into a given one.
The gradient is d loss / d y_pred; d loss / d y_true is its negative.
"""

import numpy as np

from fused_masked_mae import _core

_TYPESTR_DTYPES = {
    "|u1": "uint8", "<f2": "float16", "<f4": "float32", "<f8": "float64", "<i4": "int32", "<i8": "int64",
}
_FLOATS = ("float16", "bfloat16", "float32", "float64")
_IDS = ("int32", "int64")


class _DeviceArray:
    """What the CUDA launchers need from a CuPy array or a PyTorch CUDA tensor."""

    def __init__(self, array, name, allowed=_FLOATS):
        self.array = array
        self.name = name
        module = type(array).__module__.split(".")[0]
        if module == "torch":
            # Read torch tensors directly: their __cuda_array_interface__ refuses bfloat16.
            import torch

            self.ptr = array.data_ptr()
            self.shape = tuple(array.shape)
            self.dtype = str(array.dtype).replace("torch.", "")
            self.contiguous = array.is_contiguous()
            self.device = ("cuda", array.device.index)
            self.stream = torch.cuda.current_stream(array.device).cuda_stream
            self._empty = lambda shape, dtype=None: torch.empty(
                shape, dtype=getattr(torch, dtype) if dtype else array.dtype, device=array.device
            )
        else:
            cai = array.__cuda_array_interface__
            self.ptr = cai["data"][0]
            self.shape = tuple(cai["shape"])
            self.dtype = _TYPESTR_DTYPES.get(cai["typestr"], cai["typestr"])
            itemsize = int(cai["typestr"][2:]) if cai["typestr"][2:].isdigit() else 0
            self.contiguous = cai.get("strides") is None or tuple(cai["strides"]) == _c_strides(
                self.shape, itemsize
            )
            self.device = ("cuda", getattr(getattr(array, "device", None), "id", None))
            # CAI v3: None means the legacy default stream; 1 and 2 are the
            # legacy and per-thread default streams, which CUDA accepts as-is.
            self.stream = cai.get("stream") or 0
            if module == "cupy":
                import cupy

                # CuPy's interface names the current device's stream, and
                # cupy.empty allocates on the current device: for an array on
                # another device, take that device's current stream and
                # allocate there.
                with array.device:
                    self.stream = cupy.cuda.get_current_stream().ptr

                def empty(shape, dtype=None):
                    with array.device:
                        return cupy.empty(shape, dtype=dtype or array.dtype)

                self._empty = empty
            else:
                self._empty = None
        if self.dtype not in allowed:
            raise TypeError(f"{name} must be one of {', '.join(allowed)}, got {self.dtype}")
        if not self.contiguous:
            raise ValueError(f"{name} must be C-contiguous")

    def empty(self, shape, dtype=None):
        """A new array of `shape` beside this one (this one's dtype unless given)."""
        if self._empty is None:
            raise TypeError(f"pass out= to write results for {type(self.array).__name__} arrays")
        return self._empty(shape, dtype)


def _c_strides(shape, itemsize):
    strides, step = [], itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


def _is_device_array(array):
    if type(array).__module__.split(".")[0] == "torch":
        return array.is_cuda
    return hasattr(array, "__cuda_array_interface__")


def _require_cuda():
    if not _core.WITH_CUDA:
        raise RuntimeError("fused_masked_mae._core was built without CUDA (no CUDA toolchain at build time, see build.sh)")


def _device_inputs(y_true, y_pred, sparse):
    p = _DeviceArray(y_pred, "y_pred")
    if not p.shape:
        raise ValueError("y_pred must have rank >= 1 (a last axis of classes), got shape []")
    if sparse:
        t = _DeviceArray(y_true, "y_true_ids", allowed=_IDS)
        if t.shape != p.shape[:-1]:
            raise ValueError(
                f"y_true_ids must have y_pred's shape without its last axis, got y_true_ids "
                f"{list(t.shape)} and y_pred {list(p.shape)}"
            )
    else:
        t = _DeviceArray(y_true, "y_true")
        if t.shape != p.shape:
            raise ValueError(
                f"y_true and y_pred must have the same shape, got y_true {list(t.shape)} and "
                f"y_pred {list(p.shape)}"
            )
        if t.dtype != p.dtype:
            raise TypeError(
                f"y_true and y_pred must have the same dtype, got {t.dtype} and {p.dtype}"
            )
    if t.device != p.device:
        raise ValueError(f"y_true and y_pred are on different devices: {t.device} and {p.device}")
    return t, p


def _device_output(like, out, shape, name):
    out = like.empty(shape) if out is None else out
    o = _DeviceArray(out, name)
    if o.shape != tuple(shape) or o.dtype != like.dtype or o.device != like.device:
        raise ValueError(
            f"{name} must be a {like.dtype} array of shape {list(shape)} on {like.device}, got "
            f"{o.dtype} {list(o.shape)} on {o.device}"
        )
    return out, o


def preload(device=None):
    """Loads the CUDA kernels into a GPU's primary context now.

    They are otherwise loaded at the first call on each GPU; a CUDA graph
    capture cannot load them (nor JIT-compile the PTX on a GPU without a
    cubin), so call this before capturing calls into a graph. `device`: an
    ordinal, a `torch.device`, a `cupy.cuda.Device`, or None for every
    visible GPU (as numbered by the CUDA driver)."""
    _require_cuda()
    if device is None:
        devices = range(_core.cuda_device_count())
    else:
        index = getattr(device, "index", None)
        if index is None:
            index = getattr(device, "id", device)
        devices = [int(index)]
    for d in devices:
        _core.cuda_preload(d)


def forward(y_true, y_pred, masked_tokens=(), out=None, sparse=False, return_keep=False):
    """Per-position loss `[...]` of inputs `[..., C]` (see fused_masked_mae.masked_mae).

    With sparse=True, y_true holds int32/int64 class ids `[...]` (see
    sparse_masked_mae); on the GPU an id outside [0, C) gives NaN.
    With return_keep=True, returns `(loss, row_keep)`: row_keep is the uint8
    keep byte per position (0 where the position is masked) that `gradient`
    takes to skip re-deriving the argmaxes.
    """
    tokens = [int(t) for t in masked_tokens]
    if not _is_device_array(y_pred):
        if out is not None:
            raise TypeError("out= is for device arrays; NumPy results are returned")
        return _core.forward(np.asarray(y_true), np.asarray(y_pred), tokens, sparse, return_keep)
    _require_cuda()
    t, p = _device_inputs(y_true, y_pred, sparse)
    out, o = _device_output(p, out, p.shape[:-1], "loss")
    keep = p.empty(p.shape[:-1], "uint8") if return_keep else None
    _core.cuda_forward(t.ptr, p.ptr, o.ptr, list(p.shape), p.dtype, tokens, p.stream,
                       t.dtype if sparse else "", _DeviceArray(keep, "row_keep", ("uint8",)).ptr
                       if keep is not None else 0)
    return (out, keep) if return_keep else out


def gradient(y_true, y_pred, grad_loss, masked_tokens=(), out=None, sparse=False, row_keep=None):
    """d loss / d y_pred, shape `[..., C]`, for an upstream gradient `grad_loss` `[...]`.

    Pass the forward's `row_keep` (`forward(..., return_keep=True)`) for the
    one-pass gradient; without it the masked tokens decide, and the forward
    runs first to find the keep bytes.
    """
    tokens = [int(t) for t in masked_tokens]
    if not _is_device_array(y_pred):
        if out is not None:
            raise TypeError("out= is for device arrays; NumPy results are returned")
        return _core.gradient(
            np.asarray(y_true), np.asarray(y_pred), np.asarray(grad_loss), tokens, sparse,
            None if row_keep is None else np.asarray(row_keep),
        )
    _require_cuda()
    t, p = _device_inputs(y_true, y_pred, sparse)
    g = _DeviceArray(grad_loss, "grad_loss")
    if g.shape != p.shape[:-1] or g.dtype != p.dtype or g.device != p.device:
        raise ValueError(
            f"grad_loss must be a {p.dtype} array of shape {list(p.shape[:-1])} on {p.device}, "
            f"got {g.dtype} {list(g.shape)} on {g.device}"
        )
    if row_keep is None:
        _, row_keep = forward(y_true, y_pred, tokens, sparse=sparse, return_keep=True)
    elif tokens:
        raise ValueError("pass masked_tokens or row_keep, not both: row_keep already says "
                         "which rows are masked")
    k = _DeviceArray(row_keep, "row_keep", ("uint8",))
    if k.shape != p.shape[:-1] or k.device != p.device:
        raise ValueError(
            f"row_keep must be a uint8 array of shape {list(p.shape[:-1])} on {p.device}, "
            f"got {list(k.shape)} on {k.device}"
        )
    out, o = _device_output(p, out, p.shape, "grad_y_pred")
    _core.cuda_gradient(t.ptr, p.ptr, k.ptr, g.ptr, o.ptr, list(p.shape), p.dtype, p.stream,
                        t.dtype if sparse else "")
    return out
