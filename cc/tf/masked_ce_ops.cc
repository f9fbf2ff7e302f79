// Op registration and shape functions for the fused masked cross-entropy
// (the masked MAE's loss family: same inputs, tokens and keep rule; see
// cc/math/masked_ce_row.h). As for the masked MAE, the shape functions reject
// what is known at graph-construction time and the kernels re-check at run time.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace fused_masked_mae {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

constexpr int kRowStats = 2;  // kCeRowStats in cc/math/masked_ce_row.h

Status ValidateCeClasses(InferenceContext* c, ShapeHandle y_pred) {
  DimensionHandle classes = c->Dim(y_pred, -1);
  if (!c->ValueKnown(classes)) return absl::OkStatus();
  const int64_t num_classes = c->Value(classes);
  if (num_classes == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the last dimension (classes) must be positive, got shape ", c->DebugString(y_pred)));
  }
  std::vector<int64_t> tokens;
  if (!c->GetAttr("masked_tokens", &tokens).ok()) tokens.clear();
  for (int64_t token : tokens) {
    if (token < 0 || token >= num_classes) {
      return absl::InvalidArgumentError(absl::StrCat("masked token id ", token,
                                                     " is outside [0, ", num_classes,
                                                     ") for inputs with ", num_classes,
                                                     " classes"));
    }
  }
  return absl::OkStatus();
}

// Sets *loss_shape from y_true/y_true_ids (input 0) and y_pred (input 1).
Status CeLossShape(InferenceContext* c, bool sparse, ShapeHandle* loss_shape) {
  ShapeHandle y_true = c->input(0), y_pred = c->input(1);
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(y_pred, 1, &y_pred));
  if (sparse) {
    ShapeHandle prefix;
    TF_RETURN_IF_ERROR(c->Subshape(y_pred, 0, -1, &prefix));
    if (!c->Merge(y_true, prefix, loss_shape).ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "y_true_ids must have y_pred's shape without its last dimension, got y_true_ids ",
          c->DebugString(y_true), " and y_pred ", c->DebugString(y_pred)));
    }
    return ValidateCeClasses(c, y_pred);
  }
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(y_true, 1, &y_true));
  ShapeHandle merged;
  if (!c->Merge(y_true, y_pred, &merged).ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("y_true and y_pred must have the same shape, got y_true ",
                     c->DebugString(y_true), " and y_pred ", c->DebugString(y_pred)));
  }
  TF_RETURN_IF_ERROR(ValidateCeClasses(c, merged));
  return c->Subshape(merged, 0, -1, loss_shape);
}

Status CeForwardShape(InferenceContext* c, bool sparse) {
  ShapeHandle loss_shape, stats_shape;
  TF_RETURN_IF_ERROR(CeLossShape(c, sparse, &loss_shape));
  TF_RETURN_IF_ERROR(c->Concatenate(loss_shape, c->Vector(kRowStats), &stats_shape));
  c->set_output(0, loss_shape);
  c->set_output(1, loss_shape);
  c->set_output(2, stats_shape);
  return absl::OkStatus();
}

Status CeGradShape(InferenceContext* c, bool sparse) {
  ShapeHandle loss_shape, stats_shape, unused;
  TF_RETURN_IF_ERROR(CeLossShape(c, sparse, &loss_shape));
  TF_RETURN_IF_ERROR(c->Concatenate(loss_shape, c->Vector(kRowStats), &stats_shape));
  const struct {
    int index;
    const char* name;
    ShapeHandle expected;
  } row_inputs[] = {{2, "row_keep", loss_shape}, {3, "row_stats", stats_shape},
                    {4, "grad_loss", loss_shape}};
  for (const auto& input : row_inputs) {
    if (!c->Merge(c->input(input.index), input.expected, &unused).ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          input.name, " must have the shape ", c->DebugString(input.expected),
          " (from the forward), got ", c->DebugString(c->input(input.index))));
    }
  }
  c->set_output(0, c->input(1));
  return absl::OkStatus();
}

}  // namespace

// loss[...] = keep * CE(y_true, y_pred) over the last axis, CE as Keras 3's
// categorical_crossentropy (from_logits, label_smoothing; for probabilities
// normalised by the row sum and clipped to [epsilon, 1 - epsilon]), keep the
// masked MAE's (0 where argmax y_true == argmax y_pred is in masked_tokens).
// row_keep and row_stats ([..., 2], float64) are what the gradient op reads.
REGISTER_OP("Import_fused_masked_mae>MaskedCrossentropy")
    .Input("y_true: T")
    .Input("y_pred: T")
    .Output("loss: T")
    .Output("row_keep: uint8")
    .Output("row_stats: double")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("masked_tokens: list(int) = []")
    .Attr("from_logits: bool = false")
    .Attr("label_smoothing: float = 0.0")
    .Attr("epsilon: float = 1e-7")
    .SetShapeFn([](InferenceContext* c) { return CeForwardShape(c, false); });

// d loss / d y_pred from the forward's row_keep and row_stats: one pass.
REGISTER_OP("Import_fused_masked_mae>MaskedCrossentropyGrad")
    .Input("y_true: T")
    .Input("y_pred: T")
    .Input("row_keep: uint8")
    .Input("row_stats: double")
    .Input("grad_loss: T")
    .Output("grad_y_pred: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("from_logits: bool = false")
    .Attr("label_smoothing: float = 0.0")
    .Attr("epsilon: float = 1e-7")
    .SetShapeFn([](InferenceContext* c) { return CeGradShape(c, false); });

// The sparse loss: class ids [...] standing for one_hot(ids), as Keras 3's
// sparse_categorical_crossentropy (which has no label smoothing).
REGISTER_OP("Import_fused_masked_mae>SparseMaskedCrossentropy")
    .Input("y_true_ids: Tidx")
    .Input("y_pred: T")
    .Output("loss: T")
    .Output("row_keep: uint8")
    .Output("row_stats: double")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tidx: {int32, int64} = DT_INT64")
    .Attr("masked_tokens: list(int) = []")
    .Attr("from_logits: bool = false")
    .Attr("epsilon: float = 1e-7")
    .SetShapeFn([](InferenceContext* c) { return CeForwardShape(c, true); });

REGISTER_OP("Import_fused_masked_mae>SparseMaskedCrossentropyGrad")
    .Input("y_true_ids: Tidx")
    .Input("y_pred: T")
    .Input("row_keep: uint8")
    .Input("row_stats: double")
    .Input("grad_loss: T")
    .Output("grad_y_pred: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tidx: {int32, int64} = DT_INT64")
    .Attr("from_logits: bool = false")
    .Attr("epsilon: float = 1e-7")
    .SetShapeFn([](InferenceContext* c) { return CeGradShape(c, true); });

}  // namespace fused_masked_mae
