"""A NumPy statement of the loss, independent of TensorFlow and of our C++.

Used to check the TF-free `_core` (CPU and CUDA) where TensorFlow is absent
(the GPU machine). Computes in float64 and rounds once to the input dtype.
"""

import ml_dtypes
import numpy as np

LOWEST_FINITE = {
    np.dtype(np.float16): float(np.finfo(np.float16).min),
    np.dtype(ml_dtypes.bfloat16): float(ml_dtypes.finfo(ml_dtypes.bfloat16).min),
    np.dtype(np.float32): float(np.finfo(np.float32).min),
    np.dtype(np.float64): float(np.finfo(np.float64).min),
}


def tf_argmax(x):
    """tf.math.argmax over the last axis on CPU: the first index of the largest
    element above the dtype's lowest finite value (never NaN), else 0."""
    wide = np.asarray(x).astype(np.float64)
    candidates = wide > LOWEST_FINITE[np.asarray(x).dtype]
    return np.argmax(np.where(candidates, wide, -np.inf), axis=-1)


def keep_factor(y_true, y_pred, tokens):
    t, p = tf_argmax(y_true), tf_argmax(y_pred)
    masked = (t == p) & np.isin(t, np.asarray(list(tokens), dtype=np.int64))
    return np.where(masked, 0.0, 1.0)


@np.errstate(invalid="ignore")  # inf - inf and 0 * NaN are meant to give NaN
def loss(y_true, y_pred, tokens):
    dtype = np.asarray(y_pred).dtype
    diff = np.asarray(y_pred).astype(np.float64) - np.asarray(y_true).astype(np.float64)
    mean = np.abs(diff).mean(axis=-1)
    return (keep_factor(y_true, y_pred, tokens) * mean).astype(dtype)


@np.errstate(invalid="ignore")
def gradient(y_true, y_pred, grad_loss, tokens):
    """d loss / d y_pred, with the row factor rounded to the dtype as TF does."""
    dtype = np.asarray(y_pred).dtype
    num_classes = np.asarray(y_pred).shape[-1]
    keep = keep_factor(y_true, y_pred, tokens)
    scale = ((np.asarray(grad_loss).astype(np.float64) * keep) / num_classes).astype(dtype)
    diff = np.asarray(y_pred).astype(np.float64) - np.asarray(y_true).astype(np.float64)
    return (scale.astype(np.float64)[..., None] * np.sign(diff)).astype(dtype)


def crafted_rows(num_classes=4):
    """Rows that exercise the argmax rule: ties, NaN, +-inf, -0.0, all-NaN."""
    nan, inf = np.nan, np.inf
    rows = [
        [1.0, nan, 2.0, 0.0],
        [1.0, 2.0, nan, 0.0],
        [nan, 1.0, 2.0, 0.0],
        [2.0, 2.0, nan, 2.0],
        [nan, nan, nan, nan],
        [-inf, -inf, -inf, -inf],
        [nan, -inf, nan, -inf],
        [-0.0, 0.0, -0.0, 0.0],
        [0.0, -0.0, -1.0, -0.0],
        [inf, inf, 1.0, 0.0],
        [1.0, inf, nan, inf],
        [0.5, 0.5, 0.5, 0.5],
    ]
    assert num_classes == 4
    return np.array(rows, dtype=np.float64)


# --- the masked cross-entropy (Keras 3's categorical_crossentropy with the mask) ---


@np.errstate(all="ignore")
def crossentropy(y_true, y_pred, tokens, from_logits=False, label_smoothing=0.0, epsilon=1e-7,
                 sparse=False):
    """cond * CE in float64, rounded once to y_pred's dtype. sparse: y_true
    holds class ids. CE as Keras' TensorFlow backend defines it (see
    python/fused_masked_mae/crossentropy.py)."""
    dtype = np.asarray(y_pred).dtype
    z = np.asarray(y_pred).astype(np.float64)
    num_classes = z.shape[-1]
    if sparse:
        ids = np.asarray(y_true).astype(np.int64)
        t = np.zeros(z.shape)
        np.put_along_axis(t, ids[..., None], 1.0, axis=-1)
        t_argmax = ids
    else:
        t = np.asarray(y_true).astype(np.float64)
        t_argmax = tf_argmax(y_true)
        if label_smoothing:
            t = t * (1 - label_smoothing) + label_smoothing / num_classes
    p_argmax = tf_argmax(y_pred)
    masked = (t_argmax == p_argmax) & np.isin(t_argmax, np.asarray(list(tokens), np.int64))
    cond = np.where(masked, 0.0, 1.0)
    if from_logits:
        m = np.max(z, axis=-1, keepdims=True)
        log_softmax = z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))
        if sparse:
            ce = -np.take_along_axis(log_softmax, ids[..., None], axis=-1)[..., 0]
        else:
            ce = -np.sum(t * log_softmax, axis=-1)
    elif sparse:
        clipped = np.clip(z, epsilon, 1 - epsilon)
        ce = np.log(clipped.sum(-1)) - np.log(np.take_along_axis(clipped, ids[..., None],
                                                                 axis=-1)[..., 0])
    else:
        q = np.clip(z / z.sum(-1, keepdims=True), epsilon, 1 - epsilon)
        ce = -np.sum(t * np.log(q), axis=-1)
    return (cond * ce).astype(dtype)
