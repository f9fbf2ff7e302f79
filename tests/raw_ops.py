"""The raw ops, called the way most tests want them.

The forward ops return `(loss, row_keep)`; the gradient ops take the forward's
`row_keep` (one byte per position: 1 = counted, 0 = masked) instead of the
masked tokens. `raw_grad(..., masked_tokens=...)` runs the forward op for the
keep bytes first, as the registered gradient gets them; pass `row_keep=` to
call the gradient op alone.
"""

from fused_masked_mae._loader import ops_library

_forward = ops_library.import_fused_masked_mae_masked_mae
_grad = ops_library.import_fused_masked_mae_masked_mae_grad
_sparse_forward = ops_library.import_fused_masked_mae_sparse_masked_mae
_sparse_grad = ops_library.import_fused_masked_mae_sparse_masked_mae_grad


def raw_forward_with_keep(y_true, y_pred, masked_tokens=()):
    return _forward(y_true=y_true, y_pred=y_pred, masked_tokens=list(masked_tokens))


def raw_forward(y_true, y_pred, masked_tokens=()):
    return raw_forward_with_keep(y_true, y_pred, masked_tokens)[0]


def raw_grad(y_true, y_pred, grad_loss, masked_tokens=(), row_keep=None):
    if row_keep is None:
        row_keep = raw_forward_with_keep(y_true, y_pred, masked_tokens)[1]
    return _grad(y_true=y_true, y_pred=y_pred, row_keep=row_keep, grad_loss=grad_loss)


def raw_sparse_forward_with_keep(y_true_ids, y_pred, masked_tokens=()):
    return _sparse_forward(y_true_ids=y_true_ids, y_pred=y_pred, masked_tokens=list(masked_tokens))


def raw_sparse_forward(y_true_ids, y_pred, masked_tokens=()):
    return raw_sparse_forward_with_keep(y_true_ids, y_pred, masked_tokens)[0]


def raw_sparse_grad(y_true_ids, y_pred, grad_loss, masked_tokens=(), row_keep=None):
    if row_keep is None:
        row_keep = raw_sparse_forward_with_keep(y_true_ids, y_pred, masked_tokens)[1]
    return _sparse_grad(y_true_ids=y_true_ids, y_pred=y_pred, row_keep=row_keep,
                        grad_loss=grad_loss)
