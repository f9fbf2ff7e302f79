"""Property-based tests (hypothesis): the fused op against its oracles on random
shapes (zero-sized dimensions included), dtypes, token sets and values drawn
from a small pool (so argmax ties, NaN, +-inf, -0.0 and the dtype's lowest
finite value are frequent).

Properties:
  * fused loss == the composite reference (NaN where NaN, per-dtype tolerance
    on the rest, exactly the same masked positions);
  * on unmasked positions the loss is bit for bit the unmasked MAE, and masked
    positions are exactly where numpy_reference's tf.math.argmax rule says;
  * fused gradient == TF autodiff of the reference, bit for bit (eager);
  * sparse op == dense op on one_hot(ids), bit for bit, loss and gradient;
  * `core.forward` / `core.gradient` == the TF kernels, bit for bit.

Runs are reproducible (derandomize=True, no example database) and bounded;
FUZZ_EXAMPLES=<n> raises the number of examples per property (e.g. under the
sanitizers or in a nightly job).
"""

import dataclasses
import math
import os

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fused_masked_mae as fm
import numpy_reference
from fused_masked_mae import core
from test_op_parity import RTOL
from raw_ops import raw_forward, raw_grad, raw_sparse_forward, raw_sparse_grad

DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]
DEFAULT_EXAMPLES = 200
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", DEFAULT_EXAMPLES))

PROPERTY_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    # Cases are built from several arrays; hypothesis finds them "large".
    suppress_health_check=[HealthCheck.data_too_large, HealthCheck.too_slow],
)

LOWEST = "lowest"  # placeholder for the dtype's lowest finite value
# Duplicates make ties likelier; values are small, so |p - t| never overflows
# in the low dtypes except through +-inf or the lowest finite value (where the
# reference and the op overflow alike).
VALUE_POOL = [0.0, math.nan, 1.0, -math.inf, -0.0, math.inf, 0.5, LOWEST, -2.0, 3.0, 1.0]
SPECIAL_VALUES = [1, 3, 5, 7, 1, 4]  # indices of NaN (twice), -inf, +inf, lowest, -0.0
WEIGHT_POOL = [1.0, -1.0, 0.5, -3.0, 0.0, -0.0, 7.0, math.inf, math.nan]


def pool_for(dtype):
    lowest = float(dtype.min)
    return np.array([lowest if v is LOWEST else v for v in VALUE_POOL], np.float64)


@dataclasses.dataclass
class Case:
    dtype: tf.DType
    tokens: list
    y_true: np.ndarray  # float64 values, exactly representable in dtype
    y_pred: np.ndarray
    weights: np.ndarray  # upstream gradient, loss-shaped
    ids: np.ndarray  # class ids, loss-shaped (for the sparse properties)

    def __repr__(self):
        return (
            f"Case(dtype={self.dtype.name}, shape={list(self.y_pred.shape)}, "
            f"tokens={self.tokens},\n  y_true={self.y_true.tolist()!r},\n"
            f"  y_pred={self.y_pred.tolist()!r},\n  weights={self.weights.tolist()!r},\n"
            f"  ids={self.ids.tolist()!r})"
        )

    def tensors(self):
        return tf.constant(self.y_true, self.dtype), tf.constant(self.y_pred, self.dtype)


@st.composite
def cases(draw, dtypes=tuple(DTYPES)):
    dtype = draw(st.sampled_from(dtypes))
    lead = draw(st.lists(st.integers(1, 5), max_size=3))
    if lead and draw(st.sampled_from([False] * 5 + [True])):  # a zero-sized batch
        lead[draw(st.integers(0, len(lead) - 1))] = 0
    num_classes = draw(st.sampled_from([3, 17, 1, 2, 4, 5, 15, 16, 33, 40]))
    shape = tuple(lead) + (num_classes,)
    loss_shape = shape[:-1]
    # Values from a few pool entries per case: ties, NaN and +-inf are frequent.
    pool = pool_for(dtype)
    subset = draw(st.lists(st.sampled_from(range(len(pool))), min_size=1, max_size=3,
                           unique=True))
    if draw(st.sampled_from([True, True, False])):
        subset.append(draw(st.sampled_from(SPECIAL_VALUES)))
    pick = st.sampled_from(subset)

    ids = draw(hnp.arrays(np.int64, loss_shape, elements=st.integers(0, num_classes - 1)))
    if draw(st.booleans()):  # one-hot targets, as in training
        y_true = np.eye(num_classes)[ids]
    else:
        y_true = pool[draw(hnp.arrays(np.int8, shape, elements=pick, fill=pick))]
    y_pred = pool[draw(hnp.arrays(np.int8, shape, elements=pick, fill=pick))]
    # Predictions that copy the target in whole rows (but for a few elements) and
    # in single elements: argmaxes agree often, so masking (and 0 * inf) happens.
    copy_rows = draw(hnp.arrays(np.bool_, loss_shape, elements=st.booleans(),
                                fill=st.booleans()))
    edit = draw(hnp.arrays(np.bool_, shape, elements=st.booleans(), fill=st.just(False)))
    copy_elements = draw(hnp.arrays(np.bool_, shape, elements=st.booleans(), fill=st.just(False)))
    copy = (copy_rows[..., None] & ~edit) | copy_elements
    y_pred = np.where(copy, y_true, y_pred)
    tokens = draw(st.lists(st.integers(0, num_classes - 1), max_size=4))
    if y_true.size and draw(st.booleans()):
        # Mask the target argmax of a few rows (so those rows can be masked).
        targets = numpy_reference.tf_argmax(to_numpy_dtype(y_true, dtype)).reshape(-1)
        rows = draw(st.lists(st.integers(0, targets.size - 1), min_size=1, max_size=3))
        tokens += [int(targets[r]) for r in rows]
        tokens = draw(st.permutations(tokens))
    weights = np.array(WEIGHT_POOL)[
        draw(hnp.arrays(np.int8, loss_shape, elements=st.integers(0, len(WEIGHT_POOL) - 1)))
    ]
    return Case(dtype, list(tokens), y_true, y_pred, weights, ids)


def f64(x):
    return np.asarray(tf.cast(x, tf.float64).numpy() if tf.is_tensor(x) else x).astype(np.float64)


def as_numpy(x):
    return x.numpy() if tf.is_tensor(x) else np.asarray(x)


def assert_bitwise(actual, expected):
    """Same dtype, shape and bits; NaN where NaN (NaN payload and sign are not
    compared). Distinguishes -0.0 from 0.0."""
    a, e = np.atleast_1d(as_numpy(actual)), np.atleast_1d(as_numpy(expected))
    assert a.dtype == e.dtype, (a.dtype, e.dtype)
    assert a.shape == e.shape, (a.shape, e.shape)
    a_nan, e_nan = np.isnan(a.astype(np.float64)), np.isnan(e.astype(np.float64))
    np.testing.assert_array_equal(a_nan, e_nan, err_msg="NaN positions differ")
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    np.testing.assert_array_equal(
        a.view(bits)[~a_nan], e.view(bits)[~e_nan],
        err_msg=f"bits differ: actual {a[~a_nan]} expected {e[~e_nan]}",
    )


def tape_gradients(loss_fn, y_true, y_pred, weights):
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([y_true, y_pred])
        loss = tf.reduce_sum(loss_fn(y_true, y_pred) * weights)
    return tape.gradient(loss, y_true), tape.gradient(loss, y_pred)


def to_numpy_dtype(values, dtype):
    return values.astype(ml_dtypes.bfloat16 if dtype == tf.bfloat16 else dtype.as_numpy_dtype)


def keep_factor(case):
    t, p = to_numpy_dtype(case.y_true, case.dtype), to_numpy_dtype(case.y_pred, case.dtype)
    return numpy_reference.keep_factor(t, p, case.tokens)


# --- Properties ---------------------------------------------------------------


@PROPERTY_SETTINGS
@given(case=cases())
def test_loss_equals_reference(case):
    y_true, y_pred = case.tensors()
    fused = fm.masked_mae_tokens(y_true, y_pred, case.tokens)
    expected = fm.reference_masked_mae_tokens(y_true, y_pred, case.tokens)
    assert fused.dtype == case.dtype and fused.shape == case.y_pred.shape[:-1]
    got, want = f64(fused), f64(expected)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg="NaN positions")
    # The mask is exact: the same positions cost nothing.
    np.testing.assert_array_equal(got == 0, want == 0, err_msg="zero (masked) positions")
    finite = ~np.isnan(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=RTOL[case.dtype], atol=0)


@PROPERTY_SETTINGS
@given(case=cases())
def test_mask_follows_tf_argmax_rule_and_unmasked_loss_is_plain_mae(case):
    """A metamorphic form of the loss: masked positions are 0 (NaN if their MAE
    is inf or NaN), the others are bit for bit the loss with no masked tokens."""
    y_true, y_pred = case.tensors()
    loss = as_numpy(fm.masked_mae_tokens(y_true, y_pred, case.tokens))
    plain = as_numpy(fm.masked_mae_tokens(y_true, y_pred, []))
    keep = keep_factor(case).astype(bool)
    assert_bitwise(loss[keep], plain[keep])
    masked_plain = plain[~keep].astype(np.float64)
    masked_loss = loss[~keep].astype(np.float64)
    finite = np.isfinite(masked_plain)
    np.testing.assert_array_equal(np.isnan(masked_loss), ~finite)  # 0 * inf, 0 * NaN
    assert_bitwise(masked_loss[finite], np.zeros(finite.sum()))


@PROPERTY_SETTINGS
@given(case=cases())
def test_gradient_equals_reference_autodiff(case):
    y_true, y_pred = case.tensors()
    weights = tf.constant(case.weights, case.dtype)
    got_t, got_p = tape_gradients(
        lambda t, p: fm.masked_mae_tokens(t, p, case.tokens), y_true, y_pred, weights)
    want_t, want_p = tape_gradients(
        lambda t, p: fm.reference_masked_mae_tokens(t, p, case.tokens), y_true, y_pred, weights)
    # float32/float64 are documented bit for bit; float16/bfloat16 turn out to
    # be too (the row factor is rounded once to the dtype in both).
    assert_bitwise(got_p, want_p)
    assert_bitwise(got_t, want_t)


@PROPERTY_SETTINGS
@given(case=cases(), id_dtype=st.sampled_from([tf.int32, tf.int64]))
def test_sparse_equals_dense_on_one_hot(case, id_dtype):
    _, y_pred = case.tensors()
    num_classes = case.y_pred.shape[-1]
    ids = tf.constant(case.ids, id_dtype)
    one_hot = tf.one_hot(ids, num_classes, dtype=case.dtype)
    weights = tf.constant(case.weights, case.dtype)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(y_pred)
        sparse = fm.sparse.sparse_masked_mae_tokens(ids, y_pred, case.tokens)
        dense = fm.masked_mae_tokens(one_hot, y_pred, case.tokens)
        sparse_sum = tf.reduce_sum(sparse * weights)
        dense_sum = tf.reduce_sum(dense * weights)
    assert_bitwise(sparse, dense)
    assert_bitwise(tape.gradient(sparse_sum, y_pred), tape.gradient(dense_sum, y_pred))


@PROPERTY_SETTINGS
@given(case=cases())
def test_core_equals_tf_kernels(case):
    y_true, y_pred = case.tensors()
    weights = tf.constant(case.weights, case.dtype)
    t, p, g = y_true.numpy(), y_pred.numpy(), weights.numpy()
    assert_bitwise(core.forward(t, p, case.tokens),
                   raw_forward(
                       y_true=y_true, y_pred=y_pred, masked_tokens=case.tokens))
    assert_bitwise(core.gradient(t, p, g, case.tokens),
                   raw_grad(
                       y_true=y_true, y_pred=y_pred, grad_loss=weights,
                       masked_tokens=case.tokens))
    ids = tf.constant(case.ids, tf.int32)
    assert_bitwise(core.forward(ids.numpy(), p, case.tokens, sparse=True),
                   raw_sparse_forward(
                       y_true_ids=ids, y_pred=y_pred, masked_tokens=case.tokens))
    assert_bitwise(core.gradient(ids.numpy(), p, g, case.tokens, sparse=True),
                   raw_sparse_grad(
                       y_true_ids=ids, y_pred=y_pred, grad_loss=weights,
                       masked_tokens=case.tokens))


# --- The strategy reaches the interesting cases ---------------------------------
# (otherwise the properties above could pass vacuously)

class Reached(Exception):
    """Raised by the search below when a case meets the condition."""


def reaches(condition, max_examples=3000):
    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate], report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck))
    @given(case=cases())
    def search(case):
        if condition(case):
            raise Reached

    try:
        search()
    except Reached:
        return True
    return False


def has_masked_position(case):
    keep = keep_factor(case)
    return keep.size > 0 and (keep == 0).any()


def has_masked_inf_mae(case):
    """A masked position whose MAE is infinite: the loss must be NaN (0 * inf)."""
    with np.errstate(invalid="ignore"):
        mae = np.abs(case.y_pred - case.y_true).mean(axis=-1)
    return (np.isinf(mae) & (keep_factor(case) == 0)).any()


def has_argmax_tie_with_nan_and_negative_zero(case):
    rows = case.y_pred.reshape(-1, case.y_pred.shape[-1])
    for row in rows:
        finite = row[~np.isnan(row)]
        if (np.isnan(row).any() and finite.size > 1 and (finite == finite.max()).sum() > 1
                and np.signbit(row[row == 0]).any()):
            return True
    return False


@pytest.mark.parametrize(
    "condition",
    [
        has_masked_position,
        has_masked_inf_mae,
        has_argmax_tie_with_nan_and_negative_zero,
        lambda c: 0 in c.y_pred.shape,
        lambda c: len(c.tokens) != len(set(c.tokens)),
        lambda c: c.y_pred.shape[-1] == 17 and has_masked_position(c),
        lambda c: (c.y_pred == float(c.dtype.min)).any(),
    ],
    ids=["masked", "masked-inf-mae", "tie-nan-negzero", "zero-sized", "duplicate-tokens",
         "C=17-masked", "lowest-finite"],
)
def test_strategy_reaches(condition):
    assert reaches(condition)
