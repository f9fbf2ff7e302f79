"""Native XLA: the fused kernels inside `jit_compile`, through XLA FFI custom calls.

Inside XLA compilation (`tf.function(jit_compile=True)`, Keras'
`compile(jit_compile=True)` and its GPU default `jit_compile="auto"`) a
TensorFlow custom op cannot run, so the losses emit an `XlaCallModule` whose
StableHLO module is one `stablehlo.custom_call` to our handlers (cc/xla/, in
the TensorFlow-free library _xla_ffi.so), registered with TensorFlow's XLA
when this module is imported:

    fused_masked_mae_forward(y_true, y_pred) -> (loss, row_keep)
    fused_masked_mae_grad(y_true, y_pred, row_keep, grad_loss) -> grad_y_pred
    fused_masked_mae_sparse_forward / fused_masked_mae_sparse_grad (int ids)

(each named with the suffix ".import_fused_masked_mae", see FORWARD_TARGETS)

for the "Host" (CPU) and, in CUDA builds, the "CUDA" platform. They run the
same launchers as the TensorFlow kernels, so results are the op's bit for bit.
The handlers live in the TensorFlow-free library _xla_ffi.so
(fused_masked_mae._handlers), which JAX uses too; this module registers them
with TensorFlow's XLA once, on import.
The gradient is the grad custom call (`tf.custom_gradient`), fed by the
forward's row_keep.

Inputs are viewed as [rows, C]; an unknown number of rows (Keras' `None`
batch) gives a shape-polymorphic module: one trace, and XLA specializes it per
shape when it compiles. Where no handler can run (a TPU, a GPU without CUDA
handlers, an unknown number of classes) `use_custom_call()` is False and the
losses build the composite of plain ops instead, saying so once in the log.
"""

import logging
import os

import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla as _tf_xla

from fused_masked_mae import _handlers
from fused_masked_mae._handlers import ALL_TARGETS, FORWARD_TARGETS, GRAD_TARGETS  # noqa: F401
from fused_masked_mae._second_order import gradient_of_gradient

_log = logging.getLogger("fused_masked_mae")

# XlaCallModule's platform names for the FFI platforms the handlers register for.
_CALL_MODULE_PLATFORMS = {"Host": "CPU", "CUDA": "CUDA"}

_MLIR_TYPES = {
    tf.float16: "f16", tf.bfloat16: "bf16", tf.float32: "f32", tf.float64: "f64",
    tf.int32: "i32", tf.int64: "i64", tf.uint8: "ui8",
}


def registration_report():
    """{platform: {target: None if registered, else the error message}}, as the
    handler library (_xla_ffi.so) recorded its registrations with TensorFlow's
    XLA (made on the first call, once per process)."""
    return _handlers.register_with_tensorflow()


def check_registrations(report):
    """The platforms whose four handlers all registered. Raises ImportError when
    the CPU ones did not (XLA on CPU would fail later with a NotFoundError);
    a failed CUDA registration is logged and leaves GPUs on the composite."""
    platforms = []
    for platform, targets in sorted(report.items()):
        missing = ALL_TARGETS - set(targets)
        errors = {t: e for t, e in targets.items() if e is not None}
        if not errors and not missing:
            platforms.append(platform)
            continue
        detail = "; ".join([f"{t}: {e}" for t, e in sorted(errors.items())] +
                           [f"{t}: not registered" for t in sorted(missing)])
        if platform == "Host":
            raise ImportError(
                f"fused_masked_mae could not register its XLA handlers for the CPU ({detail}). "
                "Rebuild the package (./build.sh) against the installed TensorFlow."
            )
        _log.warning("fused_masked_mae: XLA handlers for %s failed to register (%s); under "
                     "jit_compile on %s the losses use the composite of plain ops.",
                     platform, detail, platform)
    if "Host" not in platforms:
        raise ImportError("fused_masked_mae's op library registered no XLA handlers for the CPU; "
                          "rebuild the package (./build.sh).")
    return platforms


REGISTERED_PLATFORMS = check_registrations(registration_report())

_fallback_logged = set()


def _fall_back(reason):
    if reason not in _fallback_logged:
        _fallback_logged.add(reason)
        _log.warning("fused_masked_mae: under XLA, %s; using the composite of plain ops "
                     "(XLA's argmax semantics).", reason)
    return False


def use_custom_call(num_classes):
    """Whether the custom calls can run wherever this XLA computation may be
    placed. Logs once per reason when not."""
    if os.environ.get("FUSED_MASKED_MAE_XLA") == "composite":
        return _fall_back("FUSED_MASKED_MAE_XLA=composite is set")
    if num_classes is None:
        return _fall_back("the number of classes is unknown at trace time")
    if tf.config.list_logical_devices("TPU"):
        return _fall_back("TPUs are present and the fused kernels have no TPU handler")
    if tf.config.list_logical_devices("GPU") and "CUDA" not in REGISTERED_PLATFORMS:
        return _fall_back("GPUs are present but no CUDA handlers are registered (a build "
                          "without CUDA, an NVIDIA driver below r525, or a failed registration)")
    return True


def _tensor_type(dims, dtype):
    return "tensor<" + "".join(f"{'?' if d is None else d}x" for d in dims) + \
        _MLIR_TYPES[dtype] + ">"


def _module(target, args, results, backend_config):
    """StableHLO text of a module whose main calls `target` once.

    args, results: (dims, dtype) pairs, dims of [rows] or [rows, C] where rows
    may be None (shape-polymorphic: each result gets a shape operand built from
    the runtime rows, which XLA's shape refinement turns into a static shape).
    """
    platforms = [_CALL_MODULE_PLATFORMS[p] for p in REGISTERED_PLATFORMS]
    arg_types = [_tensor_type(d, t) for d, t in args]
    result_types = [_tensor_type(d, t) for d, t in results]
    params = [f"%arg{i}: {t}" for i, t in enumerate(arg_types)]
    if len(platforms) > 1:  # XlaCallModule passes the platform index first
        params.insert(0, "%platform_index: tensor<i32>")
    body, extra = [], ""
    operands = [f"%arg{i}" for i in range(len(args))]
    operand_types = list(arg_types)
    dynamic = any(None in d for d, _ in args)
    if dynamic:
        body += [
            f"%rows = stablehlo.get_dimension_size %arg1, dim = 0 : ({arg_types[1]}) -> "
            "tensor<i32>",
            "%rows1 = stablehlo.reshape %rows : (tensor<i32>) -> tensor<1xi32>",
        ]
        shape_indices = []
        for k, (dims, _) in enumerate(results):
            shape = "%rows1"
            if len(dims) == 2:
                body += [
                    f"%classes{k} = stablehlo.constant dense<{dims[1]}> : tensor<1xi32>",
                    f"%shape{k} = stablehlo.concatenate %rows1, %classes{k}, dim = 0 : "
                    "(tensor<1xi32>, tensor<1xi32>) -> tensor<2xi32>",
                ]
                shape = f"%shape{k}"
            shape_indices.append(len(operands))
            operands.append(shape)
            operand_types.append(f"tensor<{len(dims)}xi32>")
        extra = (", indices_of_shape_operands = dense<[" + ", ".join(map(str, shape_indices)) +
                 f"]> : tensor<{len(shape_indices)}xi64>")
    config = f", backend_config = {{{backend_config}}}" if backend_config else ""
    results_sig = ", ".join(result_types)
    body.append(
        f"%0:{len(results)} = stablehlo.custom_call @\"{target}\"({', '.join(operands)}) "
        f"{{api_version = 4 : i32{config}{extra}}} : ({', '.join(operand_types)}) -> "
        f"({results_sig})"
    )
    returns = ", ".join(f"%0#{k}" for k in range(len(results)))
    body.append(f"return {returns} : {results_sig}")
    attrs = " attributes {jax.uses_shape_polymorphism = true}" if dynamic else ""
    lines = "\n    ".join(body)
    return (f"module @fused_masked_mae{attrs} {{\n"
            f"  func.func public @main({', '.join(params)}) -> ({results_sig}) {{\n"
            f"    {lines}\n  }}\n}}\n")


def _call(target, args, results, backend_config=""):
    """Runs the custom call on [rows, ...] tensors; results as (dims, dtype)."""
    module = _module(target, [(a.shape.as_list(), a.dtype) for a in args], results,
                     backend_config)
    return _tf_xla.call_module(
        list(args), version=9, module=module,
        Tout=[dtype for _, dtype in results],
        Sout=[tf.TensorShape(dims) for dims, _ in results],
        platforms=[_CALL_MODULE_PLATFORMS[p] for p in REGISTERED_PLATFORMS],
    )


def masked_mae_custom_call(y_true, y_pred, tokens, sparse=False):
    """The per-position loss by the forward custom call, differentiable through
    the grad custom call. y_pred's last dimension must be static."""
    num_classes = y_pred.shape[-1]
    rows = y_pred.shape[:-1].num_elements()  # None when a leading dimension is unknown
    loss_shape = tf.shape(y_pred)[:-1] if rows is None else y_pred.shape[:-1]
    dtype = y_pred.dtype
    tokens_attr = "masked_tokens = array<i64" + (": " + ", ".join(map(str, tokens))
                                                 if tokens else "") + ">"

    def rows_view(y_true, y_pred):
        flat_pred = tf.reshape(y_pred, [-1 if rows is None else rows, num_classes])
        flat_true = tf.reshape(y_true, [-1 if rows is None else rows] +
                               ([] if sparse else [num_classes]))
        return flat_true, flat_pred

    @tf.custom_gradient
    def loss_fn(y_true, y_pred):
        flat_true, flat_pred = rows_view(y_true, y_pred)
        loss, row_keep = _call(FORWARD_TARGETS[sparse], [flat_true, flat_pred],
                               [([rows], dtype), ([rows], tf.uint8)], tokens_attr)

        # The grad custom call, differentiable in turn (second order: zero
        # in y_true and y_pred, linear in grad_loss; see _second_order.py).
        @tf.custom_gradient
        def grad_call(flat_true, flat_pred, flat_grad_loss):
            (grad_y_pred,) = _call(GRAD_TARGETS[sparse],
                                   [flat_true, flat_pred, row_keep, flat_grad_loss],
                                   [([rows, num_classes], dtype)])

            def grad_of_grad(upstream):
                dense_true = (tf.one_hot(flat_true, num_classes, dtype=dtype) if sparse
                              else flat_true)
                return (None if sparse else tf.zeros_like(flat_true), tf.zeros_like(flat_pred),
                        gradient_of_gradient(dense_true, flat_pred, row_keep, upstream))

            return grad_y_pred, grad_of_grad

        def grad(grad_loss):
            flat_grad_loss = tf.reshape(grad_loss, [-1 if rows is None else rows])
            grad_y_pred = grad_call(flat_true, flat_pred, flat_grad_loss)
            grad_y_pred = tf.reshape(grad_y_pred, tf.shape(y_pred))
            return (None if sparse else -grad_y_pred), grad_y_pred

        return tf.reshape(loss, loss_shape), grad

    return loss_fn(y_true, y_pred)
