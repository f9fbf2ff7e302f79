// Op registration and shape functions for the fused masked MAE loss.
//
// Shape functions reject what can be known at graph-construction time (ranks,
// unequal static shapes, C = 0, token ids >= a static C); the kernels re-check
// everything at run time, where shapes are always known.
#include <string>
#include <vector>

#include "cc/cpu/masked_mae_cpu.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace fused_masked_mae {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// A positive number of classes (the last dimension), and the masked token ids
// by the one token rule (MakeMaskedTokenSet): below the number of classes
// when it is known.
Status ValidateClasses(InferenceContext* c, ShapeHandle y_pred) {
  DimensionHandle classes = c->Dim(y_pred, -1);
  const int64_t num_classes = c->ValueKnown(classes) ? c->Value(classes) : -1;
  if (num_classes == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the last dimension (classes) must be positive, got shape ", c->DebugString(y_pred)));
  }
  std::vector<int64_t> ids;  // the forward's; the gradient ops have none
  if (!c->GetAttr("masked_tokens", &ids).ok()) ids.clear();
  fused_masked_mae::MaskedTokenSet tokens;
  const std::string invalid =
      fused_masked_mae::MakeMaskedTokenSet(ids.data(), ids.size(), num_classes, &tokens);
  if (!invalid.empty()) return absl::InvalidArgumentError(invalid);
  return absl::OkStatus();
}

// y_true and y_pred: rank >= 1, the same shape, valid classes. Sets *merged to
// their common shape.
Status ValidatePair(InferenceContext* c, ShapeHandle y_true, ShapeHandle y_pred,
                    ShapeHandle* merged) {
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(y_true, 1, &y_true));
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(y_pred, 1, &y_pred));
  if (!c->Merge(y_true, y_pred, merged).ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("y_true and y_pred must have the same shape, got y_true ",
                     c->DebugString(y_true), " and y_pred ", c->DebugString(y_pred)));
  }
  return ValidateClasses(c, *merged);
}

// y_true_ids: y_pred's shape without its last dimension. Sets *loss_shape.
Status ValidateSparsePair(InferenceContext* c, ShapeHandle y_true_ids, ShapeHandle y_pred,
                          ShapeHandle* loss_shape) {
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(y_pred, 1, &y_pred));
  ShapeHandle prefix;
  TF_RETURN_IF_ERROR(c->Subshape(y_pred, 0, -1, &prefix));
  if (!c->Merge(y_true_ids, prefix, loss_shape).ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "y_true_ids must have y_pred's shape without its last dimension, got y_true_ids ",
        c->DebugString(y_true_ids), " and y_pred ", c->DebugString(y_pred)));
  }
  return ValidateClasses(c, y_pred);
}

// The gradient's per-row inputs (row_keep, grad_loss) have the loss's shape.
Status CheckRowInputShapes(InferenceContext* c, ShapeHandle loss_shape) {
  const char* names[] = {"row_keep", "grad_loss"};
  for (int k = 0; k < 2; ++k) {
    ShapeHandle input = c->input(2 + k), unused;
    if (!c->Merge(input, loss_shape, &unused).ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          names[k], " must have the shape of the loss ", c->DebugString(loss_shape),
          " (y_pred's shape without its last dimension), got ", c->DebugString(input)));
    }
  }
  return absl::OkStatus();
}

Status MaskedMaeShape(InferenceContext* c) {
  ShapeHandle merged;
  TF_RETURN_IF_ERROR(ValidatePair(c, c->input(0), c->input(1), &merged));
  ShapeHandle loss_shape;
  TF_RETURN_IF_ERROR(c->Subshape(merged, 0, -1, &loss_shape));
  c->set_output(0, loss_shape);
  c->set_output(1, loss_shape);
  return absl::OkStatus();
}

Status MaskedMaeGradShape(InferenceContext* c) {
  ShapeHandle merged;
  TF_RETURN_IF_ERROR(ValidatePair(c, c->input(0), c->input(1), &merged));
  ShapeHandle loss_shape;
  TF_RETURN_IF_ERROR(c->Subshape(merged, 0, -1, &loss_shape));
  TF_RETURN_IF_ERROR(CheckRowInputShapes(c, loss_shape));
  c->set_output(0, merged);
  return absl::OkStatus();
}

Status SparseMaskedMaeShape(InferenceContext* c) {
  ShapeHandle loss_shape;
  TF_RETURN_IF_ERROR(ValidateSparsePair(c, c->input(0), c->input(1), &loss_shape));
  c->set_output(0, loss_shape);
  c->set_output(1, loss_shape);
  return absl::OkStatus();
}

Status SparseMaskedMaeGradShape(InferenceContext* c) {
  ShapeHandle loss_shape;
  TF_RETURN_IF_ERROR(ValidateSparsePair(c, c->input(0), c->input(1), &loss_shape));
  TF_RETURN_IF_ERROR(CheckRowInputShapes(c, loss_shape));
  c->set_output(0, c->input(1));
  return absl::OkStatus();
}

}  // namespace

// loss[...] = keep * mean(|y_pred - y_true|, axis=-1), where keep = 0 when
// argmax(y_true) == argmax(y_pred) (tf.math.argmax semantics: first index of the
// maximum, NaN never selected) and that id is in masked_tokens, else 1.
// row_keep[...] is keep as a byte, kept for the gradient so that it never
// re-derives the argmaxes.
REGISTER_OP("Import_fused_masked_mae>MaskedMae")
    .Input("y_true: T")
    .Input("y_pred: T")
    .Output("loss: T")
    .Output("row_keep: uint8")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("masked_tokens: list(int) = []")
    .SetShapeFn(MaskedMaeShape);

// grad_y_pred = grad_loss[..., None] * keep / C * sign(y_pred - y_true), sign(0) = 0,
// with keep = (row_keep != 0) from the forward. The gradient for y_true is its
// negative; nothing flows through the argmax.
REGISTER_OP("Import_fused_masked_mae>MaskedMaeGrad")
    .Input("y_true: T")
    .Input("y_pred: T")
    .Input("row_keep: uint8")
    .Input("grad_loss: T")
    .Output("grad_y_pred: T")
    .Attr("T: {half, bfloat16, float, double}")
    .SetShapeFn(MaskedMaeGradShape);

// The sparse loss: y_true_ids [...] (int32/int64 class ids) stands for
// one_hot(y_true_ids, C); same values and gradients as the dense op on it,
// without building the one-hot tensor. Ids outside [0, C) are an
// InvalidArgument error on CPU and give NaN on GPU.
REGISTER_OP("Import_fused_masked_mae>SparseMaskedMae")
    .Input("y_true_ids: Tidx")
    .Input("y_pred: T")
    .Output("loss: T")
    .Output("row_keep: uint8")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tidx: {int32, int64} = DT_INT64")
    .Attr("masked_tokens: list(int) = []")
    .SetShapeFn(SparseMaskedMaeShape);

REGISTER_OP("Import_fused_masked_mae>SparseMaskedMaeGrad")
    .Input("y_true_ids: Tidx")
    .Input("y_pred: T")
    .Input("row_keep: uint8")
    .Input("grad_loss: T")
    .Output("grad_y_pred: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tidx: {int32, int64} = DT_INT64")
    .SetShapeFn(SparseMaskedMaeGradShape);

}  // namespace fused_masked_mae
