// DALI operator `FlashdinoColorAugment` (Python: fn.flashdino_color_augment).
//
// One operator per crop does everything after crop/flip/resize in the SimDINO recipe (spec 1.1):
// colour jitter with torchvision semantics (the four ops in a per-sample order), grayscale, Gaussian
// blur, solarize, normalization, the layout change HWC -> CHW and the cast to the training dtype.
// Per-sample parameters arrive as argument inputs (CPU tensors), one value (or one 4-vector for
// `jitter_order`) per sample.
#ifndef FLASHDINO_PIPELINES_NATIVE_COLOR_AUGMENT_H_
#define FLASHDINO_PIPELINES_NATIVE_COLOR_AUGMENT_H_

#include <string>
#include <vector>

#include "dali/pipeline/operator/arg_helper.h"
#include "dali/pipeline/operator/operator.h"
#include "color_ops.h"

namespace flashdino {

enum class OutputKind { kFloat32, kFloat16, kBFloat16 };

// Reads and validates the operator's arguments for one batch.
class ColorAugmentArgs {
 public:
  explicit ColorAugmentArgs(const ::dali::OpSpec &spec);

  // Fills `params` (one entry per sample) from scalar or tensor arguments; throws on bad values.
  void Acquire(const ::dali::OpSpec &spec, const ::dali::ArgumentWorkspace &ws, int nsamples,
               std::vector<SampleParams> &params);

  // Checks the input batch (uint8, HWC, 3 channels) and returns the output shape.
  ::dali::TensorListShape<> OutputShape(const ::dali::TensorListShape<> &in_shape,
                                        const ::dali::TensorLayout &in_layout) const;

  ::dali::DALIDataType OutputType() const;
  const char *OutputLayout() const { return chw_ ? "CHW" : "HWC"; }

  float mean[3];
  float std[3];
  float solarize_threshold;  // in [0, 1] units
  OutputKind kind = OutputKind::kFloat32;
  bool chw_ = true;

 private:
  ::dali::ArgValue<float> brightness_, contrast_, saturation_, hue_, blur_sigma_;
  ::dali::ArgValue<int> grayscale_, solarize_, blur_window_;
  ::dali::ArgValue<int, 1> order_;
};

template <typename Backend>
class ColorAugment : public ::dali::Operator<Backend> {
 public:
  explicit ColorAugment(const ::dali::OpSpec &spec)
      : ::dali::Operator<Backend>(spec), args_(spec) {}

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc,
                 const ::dali::Workspace &ws) override {
    const auto &input = ws.Input<Backend>(0);
    DALI_ENFORCE(input.type() == DALI_UINT8,
                 ::dali::make_string("flashdino_color_augment: expected uint8 images, got ",
                                     input.type()));
    int n = input.num_samples();
    args_.Acquire(this->spec_, ws, n, params_);
    output_desc.resize(1);
    output_desc[0].shape = args_.OutputShape(input.shape(), input.GetLayout());
    output_desc[0].type = args_.OutputType();
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override;

  using ::dali::Operator<Backend>::RunImpl;

  ColorAugmentArgs args_;
  std::vector<SampleParams> params_;
};

}  // namespace flashdino

#endif  // FLASHDINO_PIPELINES_NATIVE_COLOR_AUGMENT_H_
