"""The fused kernels in PyTorch: `torch.library.custom_op`s over the `_core` launchers.

    from fused_masked_mae import torch as fmt
    loss = fmt.masked_mae(y_true, y_pred, start_token=2, end_token=1548)       # [..., C] -> [...]
    loss = fmt.sparse_masked_mae(ids, y_pred, start_token=2, end_token=1548)   # ids [...]
    loss.mean().backward()

Two operators, `torch.ops.fused_masked_mae.forward` (loss and the keep byte
per position) and `torch.ops.fused_masked_mae.gradient` (one pass from the
keep bytes: no argmax), with fake (meta) implementations and autograd
registered, so they work in eager mode, under `torch.compile(fullgraph=True)`
(static or `dynamic=True` shapes, no graph break) and pass
`torch.library.opcheck`. CPU tensors run the CPU row loops (the variant
`fused_masked_mae.cpu_isa()` names) on `torch.get_num_threads()` threads of
_core's pool, with results independent of the thread count; CUDA tensors run
the CUDA kernels on the current stream (builds with CUDA). Values and
gradients are the TensorFlow op's and the JAX calls' bit for bit.

Errors: shapes, ranks, dtypes, C = 0 and token ids raise ValueError/TypeError
before any kernel runs; on the CPU an id outside [0, C) raises ValueError
naming it; on the GPU it gives NaN. Second derivatives are not supported.
"""

from typing import List, Tuple

import torch

from fused_masked_mae import _core
from fused_masked_mae import core as _device_core
from fused_masked_mae.tokens import MAX_MASKED_TOKENS, masked_token_list  # noqa: F401 (API)

__all__ = ["masked_mae", "masked_mae_tokens", "sparse_masked_mae", "sparse_masked_mae_tokens"]

_FLOATS = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
           torch.float64: "float64"}
_IDS = {torch.int32: "int32", torch.int64: "int64"}


@torch.library.custom_op("fused_masked_mae::forward", mutates_args=())
def _forward(y_true: torch.Tensor, y_pred: torch.Tensor, tokens: List[int],
             sparse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    y_true, y_pred = y_true.contiguous(), y_pred.contiguous()
    if y_pred.is_cuda:  # the CUDA launchers on the current stream (fused_masked_mae.core)
        return _device_core.forward(y_true, y_pred, tokens, sparse=sparse, return_keep=True)
    loss = y_pred.new_empty(y_pred.shape[:-1])
    row_keep = y_pred.new_empty(y_pred.shape[:-1], dtype=torch.uint8)
    _core.cpu_forward(y_true.data_ptr(), y_pred.data_ptr(), loss.data_ptr(), row_keep.data_ptr(),
                      list(y_pred.shape), _FLOATS[y_pred.dtype], list(tokens),
                      _IDS[y_true.dtype] if sparse else "", torch.get_num_threads())
    return loss, row_keep


@_forward.register_fake
def _forward_fake(y_true, y_pred, tokens, sparse):
    return (y_pred.new_empty(y_pred.shape[:-1]),
            y_pred.new_empty(y_pred.shape[:-1], dtype=torch.uint8))


@torch.library.custom_op("fused_masked_mae::gradient", mutates_args=())
def _gradient(y_true: torch.Tensor, y_pred: torch.Tensor, row_keep: torch.Tensor,
              grad_loss: torch.Tensor, sparse: bool) -> torch.Tensor:
    y_true, y_pred = y_true.contiguous(), y_pred.contiguous()
    row_keep, grad_loss = row_keep.contiguous(), grad_loss.contiguous()
    grad = torch.empty_like(y_pred)
    if y_pred.is_cuda:
        _device_core.gradient(y_true, y_pred, grad_loss, out=grad, sparse=sparse,
                              row_keep=row_keep)
        return grad
    _core.cpu_gradient(y_true.data_ptr(), y_pred.data_ptr(), row_keep.data_ptr(),
                       grad_loss.data_ptr(), grad.data_ptr(), list(y_pred.shape),
                       _FLOATS[y_pred.dtype], _IDS[y_true.dtype] if sparse else "",
                       torch.get_num_threads())
    return grad


@_gradient.register_fake
def _gradient_fake(y_true, y_pred, row_keep, grad_loss, sparse):
    return torch.empty_like(y_pred)


def _setup_context(ctx, inputs, output):
    y_true, y_pred, _, sparse = inputs
    _, row_keep = output
    ctx.save_for_backward(y_true, y_pred, row_keep)
    ctx.sparse = sparse
    ctx.mark_non_differentiable(row_keep)


def _backward(ctx, grad_loss, _grad_row_keep):
    y_true, y_pred, row_keep = ctx.saved_tensors
    grad = _gradient(y_true, y_pred, row_keep, grad_loss.to(y_pred.dtype), ctx.sparse)
    grad_true = -grad if (not ctx.sparse and ctx.needs_input_grad[0]) else None
    return grad_true, grad, None, None


_forward.register_autograd(_backward, setup_context=_setup_context)


def _check(y_true, y_pred, tokens, sparse):
    if not isinstance(y_pred, torch.Tensor) or not isinstance(y_true, torch.Tensor):
        raise TypeError(f"y_true and y_pred must be torch tensors, got {type(y_true).__name__} "
                        f"and {type(y_pred).__name__}")
    if y_pred.dtype not in _FLOATS:
        raise TypeError(f"y_pred must be float16, bfloat16, float32 or float64, got {y_pred.dtype}")
    if y_pred.dim() == 0:
        raise ValueError("y_pred must have rank >= 1 (a last axis of classes), got shape []")
    if sparse:
        if y_true.dtype not in _IDS:
            raise TypeError(f"y_true_ids must be int32 or int64 class ids, got {y_true.dtype}")
        if y_true.shape != y_pred.shape[:-1]:
            raise ValueError(f"y_true_ids must have y_pred's shape without its last axis, got "
                             f"y_true_ids {list(y_true.shape)} and y_pred {list(y_pred.shape)}")
    else:
        if y_true.dtype != y_pred.dtype:
            raise TypeError(f"y_true and y_pred must have the same dtype, got {y_true.dtype} and "
                            f"{y_pred.dtype}")
        if y_true.shape != y_pred.shape:
            raise ValueError(f"y_true and y_pred must have the same shape, got y_true "
                             f"{list(y_true.shape)} and y_pred {list(y_pred.shape)}")
    if y_true.device != y_pred.device:
        raise ValueError(f"y_true and y_pred are on different devices: {y_true.device} and "
                         f"{y_pred.device}")
    classes = y_pred.shape[-1]
    if classes <= 0:
        raise ValueError(f"the last dimension (classes) must be positive, got shape "
                         f"{list(y_pred.shape)}")
    for token in tokens:
        if token >= classes:
            raise ValueError(f"masked token id {token} is outside [0, {classes}) for inputs with "
                             f"{classes} classes")


def masked_mae_tokens(y_true, y_pred, tokens):
    """The fused loss for a list of masked token ids (see `masked_mae`)."""
    tokens = masked_token_list(None, None, tokens)
    _check(y_true, y_pred, tokens, sparse=False)
    return _forward(y_true, y_pred, tokens, False)[0]


def sparse_masked_mae_tokens(y_true_ids, y_pred, tokens):
    """The fused sparse loss for a list of masked token ids (see `sparse_masked_mae`)."""
    tokens = masked_token_list(None, None, tokens)
    _check(y_true_ids, y_pred, tokens, sparse=True)
    return _forward(y_true_ids, y_pred, tokens, True)[0]


def masked_mae(y_true, y_pred, start_token=None, end_token=None, tokens=()):
    """Fused masked MAE over the last axis: `keep * mean(|y_pred - y_true|, -1)`, shape `[...]`
    (see fused_masked_mae.masked_mae for the masking and argmax rules)."""
    return masked_mae_tokens(y_true, y_pred, masked_token_list(start_token, end_token, tokens))


def sparse_masked_mae(y_true_ids, y_pred, start_token=None, end_token=None, tokens=()):
    """`masked_mae(one_hot(ids, C), y_pred, ...)` for int32/int64 class ids `[...]`,
    without building the one-hot tensor (values and gradients equal bit for bit)."""
    return sparse_masked_mae_tokens(y_true_ids, y_pred,
                                    masked_token_list(start_token, end_token, tokens))
