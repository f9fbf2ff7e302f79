"""Second-order gradients: the gradient of the gradient ops.

The gradient ops compute, per row, grad_y_pred = s * sign(y_pred - y_true)
with s = (g * keep) / C (g the upstream gradient of the row's loss, keep its
keep byte). As functions of their inputs that is

- piecewise constant in y_pred and y_true: derivative zero (tf.sign's), as in
  TensorFlow's autodiff of MeanAbsoluteError and of the composite reference;
- linear in g: d<u, grad_y_pred>/dg = keep * sum_c(u * sign(y_pred - y_true) / C)
  for an upstream u of grad_y_pred's shape; the row keep (an argmax outcome)
  has no derivative.

`gradient_of_gradient` computes the latter with the operations (and in the
order) that TensorFlow's autodiff of the reference takes backwards through
its gradient (Mul, RealDiv, BroadcastTo's reduce_sum, Mul), so gradient
penalties and Hessian-vector products equal MeanAbsoluteError's where nothing
is masked. Used by the gradients registered for the gradient ops (ops.py,
sparse.py) and by the XLA custom calls' custom gradient (xla.py).
"""

import tensorflow as tf


def gradient_of_gradient(y_true_dense, y_pred, row_keep, upstream):
    """d<upstream, grad_y_pred> / d grad_loss, shape `[...]` (row_keep's).

    y_true_dense: targets `[..., C]` (one_hot(ids) for the sparse loss).
    """
    num_classes = tf.cast(tf.shape(y_pred)[-1], y_pred.dtype)
    per_element = (upstream * tf.sign(y_pred - y_true_dense)) / num_classes
    return tf.reduce_sum(per_element, axis=-1) * tf.cast(row_keep, y_pred.dtype)
