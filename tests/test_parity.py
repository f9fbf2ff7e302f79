"""The fused op against the composite Keras-ops reference (the parity oracle),
and its argmax rule against tf.math.argmax.

Tolerances (relative, on the per-position loss), from measurements over the
shapes and input kinds below; the largest relative differences seen were
float16 9.0e-4, bfloat16 6.7e-3, float32 3.6e-7, float64 5.0e-16:
- float32 / float64: only the summation order differs (the kernel's fixed
  16-lane tree vs Eigen's reduction);
- float16 / bfloat16: the reference rounds every |p - t| and the mean to the
  low dtype, the fused op accumulates in float32 and rounds once.
A wrong mask changes a position's loss from its MAE to 0 (a relative error of
1), far outside every tolerance, and the zero pattern is also compared exactly.
"""

import numpy as np
import pytest
import tensorflow as tf

import fused_masked_mae as fm
from raw_ops import raw_grad

DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]
DTYPE_IDS = [d.name for d in DTYPES]
RTOL = {tf.float16: 2e-3, tf.bfloat16: 1.6e-2, tf.float32: 1e-6, tf.float64: 1e-12}
ATOL = {tf.float16: 0.0, tf.bfloat16: 0.0, tf.float32: 1e-7, tf.float64: 1e-12}
# Unit roundoff: the fused low-precision loss is the exact mean rounded once.
UNIT_ROUNDOFF = {tf.float16: 2.0**-11, tf.bfloat16: 2.0**-8}

SHAPES = [
    (7,),
    (1, 1),
    (5, 1),
    (4, 9),
    (3, 5, 17),
    (2, 3, 4, 6),
    (3, 1549),
    (2, 32000),
]


def shape_id(shape):
    return "x".join(map(str, shape))


def assert_loss_close(got, want, dtype, to_f64):
    """NaN-aware closeness plus an exact comparison of the zero (masked) pattern."""
    got, want = to_f64(got), to_f64(want)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got == 0, want == 0)
    np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=ATOL[dtype], equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_one_hot_targets_match_reference(shape, dtype, make_seq2seq, to_f64_fn):
    start, end = 0, shape[-1] - 1
    y_true, y_pred = make_seq2seq(shape, dtype, start, end)
    fused = fm.masked_mae(y_true, y_pred, start, end)
    expected = fm.reference_masked_mae(y_true, y_pred, start, end)
    assert fused.shape == shape[:-1]
    assert fused.dtype == dtype
    assert_loss_close(fused, expected, dtype, to_f64_fn)

    loss = to_f64_fn(fused)
    unmasked = to_f64_fn(fm.masked_mae(y_true, y_pred, None, None))
    # Masking really happened: positions with a non-zero MAE cost 0 here.
    assert ((loss == 0) & (unmasked > 0)).any(), "nothing was masked: the test proves nothing"
    if shape[-1] > 1 and loss.size >= 3:
        assert (loss > 0).any(), "everything was masked: the test proves nothing"
    # Where nothing is masked, the loss is the plain MAE.
    kept = loss != 0
    np.testing.assert_array_equal(loss[kept], unmasked[kept])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["uniform", "normal", "ties"])
def test_random_dense_targets_match_reference(dtype, kind, make_random, to_f64_fn):
    y_true, y_pred = make_random((6, 7, 33), dtype, seed=3, kind=kind)
    for start, end in ((0, 32), (3, 3), (None, 5), (3, None), (None, None)):
        fused = fm.masked_mae(y_true, y_pred, start, end)
        assert_loss_close(fused, fm.reference_masked_mae(y_true, y_pred, start, end), dtype,
                          to_f64_fn)
    if kind == "ties":
        # Small integer values: argmaxes often agree, so masking happens.
        all_tokens = list(range(33))
        loss = to_f64_fn(fm.masked_mae_tokens(y_true, y_pred, all_tokens))
        assert (loss == 0).sum() > 0
        assert_loss_close(fm.masked_mae_tokens(y_true, y_pred, all_tokens),
                          fm.reference_masked_mae_tokens(y_true, y_pred, all_tokens), dtype,
                          to_f64_fn)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(4, 9, 33), (3, 1549), (2, 32000)], ids=shape_id)
def test_low_precision_is_the_exact_loss_rounded_once(dtype, shape, make_random, make_seq2seq,
                                                      to_f64_fn):
    """float16/bfloat16 accumulate in float32: within one rounding of the
    float64 loss of the same (exactly representable) inputs."""
    for y_true, y_pred in (make_random(shape, dtype, seed=1, kind="normal"),
                           make_seq2seq(shape, dtype, 0, shape[-1] - 1, seed=2)):
        fused = to_f64_fn(fm.masked_mae(y_true, y_pred, 0, shape[-1] - 1))
        exact = fm.reference_masked_mae(tf.cast(y_true, tf.float64), tf.cast(y_pred, tf.float64),
                                        0, shape[-1] - 1).numpy()
        np.testing.assert_array_equal(fused == 0, exact == 0)
        np.testing.assert_allclose(fused, exact, rtol=1.01 * UNIT_ROUNDOFF[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_none_tokens(dtype, make_seq2seq, to_f64_fn):
    y_true, y_pred = make_seq2seq((4, 6, 11), dtype, 0, 10)
    unmasked = fm.masked_mae(y_true, y_pred, None, None)
    plain_mae = fm.reference_masked_mae_tokens(y_true, y_pred, [])
    assert_loss_close(unmasked, plain_mae, dtype, to_f64_fn)
    assert (to_f64_fn(unmasked) > 0).all()
    both = to_f64_fn(fm.masked_mae(y_true, y_pred, 0, 10))
    only_start = fm.masked_mae(y_true, y_pred, 0, None)
    only_end = fm.masked_mae(y_true, y_pred, None, 10)
    assert_loss_close(only_start, fm.reference_masked_mae(y_true, y_pred, 0, None), dtype,
                      to_f64_fn)
    assert_loss_close(only_end, fm.reference_masked_mae(y_true, y_pred, None, 10), dtype,
                      to_f64_fn)
    # Each token masks its own positions, and both together mask the union.
    start_zero, end_zero = to_f64_fn(only_start) == 0, to_f64_fn(only_end) == 0
    assert start_zero.any() and end_zero.any()
    assert not (start_zero & end_zero).any()
    np.testing.assert_array_equal(both == 0, start_zero | end_zero)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=["float32", "float64"])
def test_start_equal_to_end_is_one_token(dtype, make_seq2seq, to_f64_fn):
    y_true, y_pred = make_seq2seq((4, 6, 11), dtype, 3, 3)
    loss = to_f64_fn(fm.masked_mae(y_true, y_pred, 3, 3))
    assert (loss >= 0).all()
    assert (loss == 0).any()
    np.testing.assert_array_equal(loss, to_f64_fn(fm.masked_mae(y_true, y_pred, 3, None)))
    np.testing.assert_array_equal(loss, to_f64_fn(fm.masked_mae_tokens(y_true, y_pred, [3, 3, 3])))
    assert_loss_close(fm.masked_mae(y_true, y_pred, 3, 3),
                      fm.reference_masked_mae(y_true, y_pred, 3, 3), dtype, to_f64_fn)


def test_token_lists_match_reference(make_random, to_f64_fn):
    y_true, y_pred = make_random((5, 8, 12), tf.float32, seed=4, kind="ties")
    for tokens in ([], [0], [11, 0, 5], list(range(12)), [2, 2, 7]):
        assert_loss_close(fm.masked_mae_tokens(y_true, y_pred, tokens),
                          fm.reference_masked_mae_tokens(y_true, y_pred, tokens), tf.float32,
                          to_f64_fn)
    np.testing.assert_array_equal(
        to_f64_fn(fm.masked_mae(y_true, y_pred, 1, 2, tokens=[5])),
        to_f64_fn(fm.masked_mae_tokens(y_true, y_pred, [1, 2, 5])))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_crafted_rows_match_reference(dtype, crafted_rows, to_f64_fn):
    """Every pair (target row, prediction row) of the special rows: ties, NaN,
    +-inf, -0.0, lowest finite. NaN where the reference has NaN, equal elsewhere."""
    rows = crafted_rows(dtype)
    y_true = tf.constant(np.repeat(rows, len(rows), axis=0), dtype)
    y_pred = tf.constant(np.tile(rows, (len(rows), 1)), dtype)
    for tokens in ([0, 3], [1, 2], [0], [0, 1, 2, 3], []):
        fused = fm.masked_mae_tokens(y_true, y_pred, tokens)
        expected = fm.reference_masked_mae_tokens(y_true, y_pred, tokens)
        assert_loss_close(fused, expected, dtype, to_f64_fn)
    assert np.isnan(to_f64_fn(fused)).any() and np.isinf(to_f64_fn(fused)).any()


# --- The argmax rule, observed directly ------------------------------------
#
# The loss alone cannot show whether a row was masked when its MAE is NaN
# (0 * NaN = NaN) or 0. The gradient can: the grad op writes
# grad_loss * keep / C * sign(p - t) for every element, so a probe column
# whose p - t is finite and non-zero reads keep / C. The probe column holds
# values that are never argmax candidates: y_true -inf, y_pred the dtype's
# lowest finite value (sign(lowest - (-inf)) = 1).


def observed_keep(y_true_rows, y_pred_rows, tokens, dtype):
    """Runs the raw grad op on the rows with a probe column appended; returns
    (keep per row as a bool array, the augmented tensors)."""
    rows = y_true_rows.shape[0]
    lowest = float(dtype.min)
    t = np.concatenate([y_true_rows, np.full((rows, 1), -np.inf)], axis=1)
    p = np.concatenate([y_pred_rows, np.full((rows, 1), lowest)], axis=1)
    t, p = tf.constant(t, dtype), tf.constant(p, dtype)
    grad = raw_grad(
        y_true=t, y_pred=p, grad_loss=tf.ones((rows,), dtype), masked_tokens=tokens)
    probe = tf.cast(grad[:, -1], tf.float64).numpy()
    one_over_c = tf.cast(tf.constant(1.0 / t.shape[-1], dtype), tf.float64).numpy()
    assert np.isin(probe, [0.0, one_over_c]).all(), probe
    return probe != 0, t, p


def expected_keep(t, p, tokens):
    ta, pa = tf.math.argmax(t, axis=-1).numpy(), tf.math.argmax(p, axis=-1).numpy()
    return ~((ta == pa) & np.isin(ta, np.asarray(tokens, dtype=np.int64)))


SPEC_EXAMPLES = [  # (row, tf.math.argmax) from the argmax rule
    ([1.0, np.nan, 2.0], 2),
    ([1.0, 2.0, np.nan], 1),
    ([np.nan, 1.0, 2.0], 2),
    ([2.0, 2.0, np.nan, 2.0], 0),
    ([np.nan, np.nan, np.nan], 0),
    ([-np.inf, -np.inf], 0),
    ([-0.0, 0.0], 0),
    ([0.0, -0.0, -1.0], 0),
    ([-1.0, -0.0, 0.0], 1),
    ([np.inf, np.nan, np.inf], 0),
    ([np.nan, -np.inf, 3.0, np.inf], 3),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("row, argmax", SPEC_EXAMPLES, ids=[str(r) for r, _ in SPEC_EXAMPLES])
def test_spec_examples_mask_exactly_at_tf_argmax(row, argmax, dtype, argmax_fn):
    row = np.array(row, dtype=np.float64)
    classes = row.size
    assert argmax_fn(tf.constant(row, dtype)) == argmax  # the oracle agrees with the rule
    # Prediction `row`, one-hot target at every class k: masked exactly for k == argmax.
    y_pred = np.tile(row, (classes, 1))
    y_true = np.eye(classes)
    keep, t, p = observed_keep(y_true, y_pred, list(range(classes)), dtype)
    np.testing.assert_array_equal(keep, np.arange(classes) != argmax)
    np.testing.assert_array_equal(keep, expected_keep(t, p, list(range(classes))))
    # The same rule for the target: target `row`, one-hot prediction at every k.
    keep, t, p = observed_keep(y_pred, y_true, list(range(classes)), dtype)
    np.testing.assert_array_equal(keep, np.arange(classes) != argmax)
    # And the forward op, where the plain MAE is finite and non-zero.
    yt, yp = tf.constant(y_true, dtype), tf.constant(y_pred, dtype)
    plain = tf.cast(fm.masked_mae_tokens(yt, yp, []), tf.float64).numpy()
    loss = tf.cast(fm.masked_mae_tokens(yt, yp, list(range(classes))), tf.float64).numpy()
    visible = np.isfinite(plain) & (plain != 0)
    np.testing.assert_array_equal((loss == 0)[visible], (np.arange(classes) == argmax)[visible])


@pytest.mark.parametrize("dtype, row, argmax", [
    (tf.float32, [-np.inf, -np.finfo(np.float32).max], 0),  # -FLT_MAX is float32's lowest
    (tf.float64, [-np.inf, -np.finfo(np.float32).max], 1),  # ... but a candidate in float64
    (tf.float16, [-np.inf, -65504.0, -65000.0], 2),
    (tf.float16, [-65504.0, -65504.0], 0),
    (tf.bfloat16, [-np.inf, float(tf.bfloat16.min), -1e38], 2),
    (tf.float64, [np.finfo(np.float64).min, -np.inf, np.nan], 0),
], ids=["f32-fltmax", "f64-fltmax", "f16-lowest", "f16-all-lowest", "bf16-lowest", "f64-lowest"])
def test_lowest_finite_value_is_no_candidate(dtype, row, argmax, argmax_fn):
    row = np.array(row, dtype=np.float64)
    classes = row.size
    assert argmax_fn(tf.constant(row, dtype)) == argmax
    keep, _, _ = observed_keep(np.eye(classes), np.tile(row, (classes, 1)),
                               list(range(classes)), dtype)
    np.testing.assert_array_equal(keep, np.arange(classes) != argmax)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_crafted_rows_mask_exactly_where_tf_argmaxes_agree(dtype, crafted_rows):
    """All pairs of special rows as (target, prediction)."""
    rows = crafted_rows(dtype)
    y_true = np.repeat(rows, len(rows), axis=0)
    y_pred = np.tile(rows, (len(rows), 1))
    for tokens in ([0, 1, 2, 3], [0], [2, 3]):
        keep, t, p = observed_keep(y_true, y_pred, tokens, dtype)
        expected = expected_keep(t, p, tokens)
        np.testing.assert_array_equal(keep, expected)
        assert (~expected).any() and expected.any()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("classes", [1, 2, 15, 16, 17, 63, 64, 65, 129, 1549])
def test_random_ties_and_specials_mask_where_tf_argmaxes_agree(classes, dtype):
    """Small integers (frequent ties) sprinkled with NaN, +-inf, -0.0 and the
    lowest finite value, at widths around the kernel's 16-lane and 64-element
    blocks (the probe column makes the width classes + 1)."""
    rng = np.random.default_rng(classes)
    rows = 64 if classes < 1000 else 16
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, float(dtype.min)])

    def sample():
        x = rng.integers(0, 3, size=(rows, classes)).astype(np.float64)
        hit = rng.random(x.shape) < 0.15
        x[hit] = rng.choice(specials, size=hit.sum())
        return x

    y_true, y_pred = sample(), sample()
    # Half the rows: the prediction copies the target (argmaxes agree).
    y_pred[::2] = y_true[::2]
    tokens = list(range(0, classes + 1, max(1, classes // 200)))[:256]
    keep, t, p = observed_keep(y_true, y_pred, tokens, dtype)
    expected = expected_keep(t, p, tokens)
    np.testing.assert_array_equal(keep, expected)
    assert (~expected).any()


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("classes", [200, 32000])
def test_first_of_two_maxima_anywhere_in_a_long_row(classes, dtype, to_f64_fn):
    """The prediction's maximum appears at positions i < j (around lane and
    block boundaries, and the ends); NaN and +-inf-free noise elsewhere, NaN
    before i in half the rows. Target at i: masked; target at j: kept."""
    positions = [0, 1, 15, 16, 17, 63, 64, 65, 127, 128, classes // 2, classes - 2, classes - 1]
    pairs = [(i, j) for i in positions for j in positions if i < j]
    rng = np.random.default_rng(7)
    y_pred = rng.random((len(pairs), classes))
    first, second = np.array(pairs).T
    y_pred[np.arange(len(pairs)), first] = 2.0
    y_pred[np.arange(len(pairs)), second] = 2.0
    for r, i in enumerate(first):
        if r % 2 and i > 0:
            y_pred[r, rng.integers(0, i)] = np.nan
    y_pred = np.concatenate([y_pred, y_pred])
    targets = np.concatenate([first, second])
    y_true = np.zeros((len(targets), classes))
    y_true[np.arange(len(targets)), targets] = 1.0
    t, p = tf.constant(y_true, dtype), tf.constant(y_pred, dtype)
    assert (tf.math.argmax(p, axis=-1).numpy() == np.concatenate([first, first])).all()
    # The forward op on the rows without NaN (their loss is finite and non-zero when kept).
    loss = to_f64_fn(fm.masked_mae_tokens(t, p, positions))
    finite = ~np.isnan(y_pred).any(axis=1)
    masked = np.arange(len(targets)) < len(pairs)
    np.testing.assert_array_equal((loss == 0)[finite], masked[finite])
    assert (loss[finite & ~masked] > 0).all()
    # All rows, through the gradient probe.
    keep, _, _ = observed_keep(y_true, y_pred, positions, dtype)
    np.testing.assert_array_equal(keep, ~masked)


# --- Eager and graph execution ---------------------------------------------


def test_graph_mode_matches_eager(make_seq2seq):
    y_true, y_pred = make_seq2seq((3, 4, 20), tf.float32, 1, 19)
    eager = fm.masked_mae(y_true, y_pred, 1, 19).numpy()
    assert (eager == 0).any()
    graph = tf.function(lambda t, p: fm.masked_mae(t, p, 1, 19))
    np.testing.assert_array_equal(graph(y_true, y_pred).numpy(), eager)
    spec = tf.TensorSpec([None, None, None], tf.float32)
    unknown_dims = tf.function(lambda t, p: fm.masked_mae(t, p, 1, 19),
                               input_signature=[spec, spec])
    np.testing.assert_array_equal(unknown_dims(y_true, y_pred).numpy(), eager)
    assert unknown_dims.get_concrete_function().structured_outputs.shape.as_list() == [None, None]
    unknown_rank = tf.function(lambda t, p: fm.masked_mae(t, p, 1, 19),
                               input_signature=[tf.TensorSpec(None, tf.float32)] * 2)
    np.testing.assert_array_equal(unknown_rank(y_true, y_pred).numpy(), eager)
    # The same graph serves other shapes.
    y_true2, y_pred2 = make_seq2seq((2, 20), tf.float32, 1, 19, seed=5)
    np.testing.assert_array_equal(unknown_rank(y_true2, y_pred2).numpy(),
                                  fm.masked_mae(y_true2, y_pred2, 1, 19).numpy())


def test_graph_uses_the_fused_op(make_seq2seq):
    y_true, y_pred = make_seq2seq((3, 4, 20), tf.float32, 1, 19)

    @tf.function
    def loss_and_grad(t, p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = tf.reduce_sum(fm.masked_mae(t, p, 1, 19))
        return loss, tape.gradient(loss, p)

    graph = loss_and_grad.get_concrete_function(y_true, y_pred).graph
    types = {op.type for op in graph.get_operations()}
    assert "Import_fused_masked_mae>MaskedMae" in types
    assert "Import_fused_masked_mae>MaskedMaeGrad" in types
    assert "ArgMax" not in types  # not the composite


def test_static_shape_inference():
    @tf.function(input_signature=[tf.TensorSpec([None, 7, 5]), tf.TensorSpec([3, None, 5])])
    def f(t, p):
        out = fm.masked_mae(t, p, 0, 4)
        assert out.shape.as_list() == [3, 7], out.shape
        return out

    f.get_concrete_function()
    out = f(tf.one_hot(tf.fill((3, 7), 1), 5), tf.ones((3, 7, 5)))  # argmax 1 vs 0: kept
    np.testing.assert_allclose(out.numpy(), np.full((3, 7), 0.8), rtol=1e-6)
    out = f(tf.zeros((3, 7, 5)), tf.ones((3, 7, 5)))  # argmax 0 == 0, a masked token
    np.testing.assert_array_equal(out.numpy(), np.zeros((3, 7)))


def test_numpy_and_list_inputs(make_seq2seq):
    y_true, y_pred = make_seq2seq((2, 3, 5), tf.float64, 0, 4)
    from_numpy = fm.masked_mae(y_true.numpy(), y_pred.numpy(), 0, 4)
    assert from_numpy.dtype == tf.float64
    np.testing.assert_array_equal(from_numpy.numpy(), fm.masked_mae(y_true, y_pred, 0, 4).numpy())
    from_list = fm.masked_mae([[0.0, 1.0, 0.0]], [[0.1, 0.7, 0.2]], None, 1)
    np.testing.assert_array_equal(from_list.numpy(), [0.0])
    from_list = fm.masked_mae([[0.0, 1.0, 0.0]], [[0.1, 0.7, 0.2]], None, 2)
    np.testing.assert_allclose(from_list.numpy(), [0.2], rtol=1e-6)
