// Schema, argument parsing and the CPU kernel of FlashdinoColorAugment.
#include "color_augment.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "dali/core/float16.h"
#include "dali/pipeline/util/thread_pool_interface.h"

namespace flashdino {

using ::dali::make_string;

ColorAugmentArgs::ColorAugmentArgs(const ::dali::OpSpec &spec)
    : brightness_("brightness", spec),
      contrast_("contrast", spec),
      saturation_("saturation", spec),
      hue_("hue", spec),
      blur_sigma_("blur_sigma", spec),
      grayscale_("grayscale", spec),
      solarize_("solarize", spec),
      blur_window_("blur_window", spec),
      order_("jitter_order", spec) {
  auto m = spec.GetRepeatedArgument<float>("mean");
  auto s = spec.GetRepeatedArgument<float>("std");
  DALI_ENFORCE(m.size() == 3 && s.size() == 3,
               make_string("flashdino_color_augment: `mean` and `std` need 3 values each, got ",
                           m.size(), " and ", s.size()));
  for (int c = 0; c < 3; c++) {
    DALI_ENFORCE(s[c] > 0, make_string("flashdino_color_augment: `std` must be > 0, got ", s[c]));
    mean[c] = m[c];
    std[c] = s[c];
  }
  solarize_threshold = spec.GetArgument<float>("solarize_threshold") / 255.f;
  std::string dtype = spec.GetArgument<std::string>("output_dtype");
  if (dtype == "float32") {
    kind = OutputKind::kFloat32;
  } else if (dtype == "float16") {
    kind = OutputKind::kFloat16;
  } else if (dtype == "bfloat16") {
    kind = OutputKind::kBFloat16;
  } else {
    DALI_FAIL(make_string("flashdino_color_augment: `output_dtype` must be float32, float16 or "
                          "bfloat16, got '", dtype, "'"));
  }
  std::string layout = spec.GetArgument<std::string>("output_layout");
  DALI_ENFORCE(layout == "CHW" || layout == "HWC",
               make_string("flashdino_color_augment: `output_layout` must be CHW or HWC, got '",
                           layout, "'"));
  chw_ = layout == "CHW";
}

void ColorAugmentArgs::Acquire(const ::dali::OpSpec &spec, const ::dali::ArgumentWorkspace &ws,
                               int n, std::vector<SampleParams> &params) {
  brightness_.Acquire(spec, ws, n);
  contrast_.Acquire(spec, ws, n);
  saturation_.Acquire(spec, ws, n);
  hue_.Acquire(spec, ws, n);
  blur_sigma_.Acquire(spec, ws, n);
  grayscale_.Acquire(spec, ws, n);
  solarize_.Acquire(spec, ws, n);
  blur_window_.Acquire(spec, ws, n);
  order_.Acquire(spec, ws, n, ::dali::TensorShape<1>{4});
  params.resize(n);
  for (int i = 0; i < n; i++) {
    SampleParams &p = params[i];
    p.brightness = brightness_[i].data[0];
    p.contrast = contrast_[i].data[0];
    p.saturation = saturation_[i].data[0];
    p.hue = hue_[i].data[0];
    DALI_ENFORCE(p.brightness >= 0 && p.contrast >= 0 && p.saturation >= 0,
                 make_string("flashdino_color_augment: sample ", i,
                             ": brightness/contrast/saturation factors must be >= 0, got ",
                             p.brightness, ", ", p.contrast, ", ", p.saturation));
    DALI_ENFORCE(p.hue >= -0.5f && p.hue <= 0.5f,
                 make_string("flashdino_color_augment: sample ", i,
                             ": hue must lie in [-0.5, 0.5], got ", p.hue));
    int seen = 0;
    for (int k = 0; k < 4; k++) {
      int op = order_[i].data[k];
      DALI_ENFORCE(op >= 0 && op < 4 && !(seen & (1 << op)),
                   make_string("flashdino_color_augment: sample ", i,
                               ": jitter_order must be a permutation of 0..3, got ", op,
                               " at position ", k));
      seen |= 1 << op;
      p.order[k] = op;
    }
    p.grayscale = grayscale_[i].data[0] != 0;
    p.solarize = solarize_[i].data[0] != 0;
    float sigma = blur_sigma_[i].data[0];
    int window = blur_window_[i].data[0];
    DALI_ENFORCE(sigma >= 0 && std::isfinite(sigma),
                 make_string("flashdino_color_augment: sample ", i,
                             ": blur_sigma must be >= 0 (0 = no blur), got ", sigma));
    DALI_ENFORCE(window >= 0 && (window == 0 || window % 2 == 1) && window <= kMaxBlurWindow,
                 make_string("flashdino_color_augment: sample ", i,
                             ": blur_window must be 0 (auto) or odd and <= ", kMaxBlurWindow,
                             ", got ", window));
    if (sigma == 0) {
      p.blur_sigma = 0;
      p.blur_window = 1;
    } else {
      p.blur_sigma = sigma;
      p.blur_window = window == 0 ? std::min(auto_blur_window(sigma), kMaxBlurWindow) : window;
    }
    p.contrast_mean = 0;
  }
}

::dali::TensorListShape<> ColorAugmentArgs::OutputShape(
    const ::dali::TensorListShape<> &in_shape, const ::dali::TensorLayout &in_layout) const {
  DALI_ENFORCE(in_shape.sample_dim() == 3,
               make_string("flashdino_color_augment: expected HWC images (3 dims), got ",
                           in_shape.sample_dim(), " dims"));
  DALI_ENFORCE(in_layout.empty() || in_layout == "HWC",
               make_string("flashdino_color_augment: expected layout HWC, got ", in_layout));
  int n = in_shape.num_samples();
  ::dali::TensorListShape<> out(n, 3);
  for (int i = 0; i < n; i++) {
    auto sh = in_shape[i];
    DALI_ENFORCE(sh[2] == 3, make_string("flashdino_color_augment: sample ", i,
                                         " has ", sh[2], " channels; expected 3 (RGB)"));
    if (chw_)
      out.set_tensor_shape(i, ::dali::TensorShape<>{3, sh[0], sh[1]});
    else
      out.set_tensor_shape(i, ::dali::TensorShape<>{sh[0], sh[1], 3});
  }
  return out;
}

::dali::DALIDataType ColorAugmentArgs::OutputType() const {
  switch (kind) {
    case OutputKind::kFloat16:  return DALI_FLOAT16;
    case OutputKind::kBFloat16: return DALI_UINT16;  // bfloat16 bits; torch views them
    default:                    return DALI_FLOAT;
  }
}

namespace {

template <typename OutT>
inline OutT cast_out(float v);
template <>
inline float cast_out<float>(float v) { return v; }
template <>
inline ::dali::float16 cast_out<::dali::float16>(float v) { return ::dali::float16(v); }
template <>
inline uint16_t cast_out<uint16_t>(float v) { return float_to_bf16_bits(v); }

// Separable blur of one float plane with reflect-101 borders: each row/column is copied into a
// padded line first, so the tap loops have no index arithmetic and vectorize.
void BlurPlane(float *plane, int H, int W, const float *taps, int k, std::vector<float> &line) {
  const int half = k / 2;
  line.resize(static_cast<size_t>(std::max(H, W) + 2 * half));
  for (int y = 0; y < H; y++) {
    float *row = plane + static_cast<int64_t>(y) * W;
    for (int i = -half; i < W + half; i++) line[i + half] = row[reflect101(i, W)];
    for (int x = 0; x < W; x++) {
      float acc = 0.f;
      for (int t = 0; t < k; t++) acc += taps[t] * line[x + t];
      row[x] = acc;
    }
  }
  // Columns: accumulate whole shifted rows (contiguous inner loop over x).
  std::vector<float> col_out(static_cast<size_t>(H) * W, 0.f);
  for (int y = 0; y < H; y++) {
    float *out = col_out.data() + static_cast<int64_t>(y) * W;
    for (int t = 0; t < k; t++) {
      const float *src = plane + static_cast<int64_t>(reflect101(y + t - half, H)) * W;
      const float w = taps[t];
      for (int x = 0; x < W; x++) out[x] += w * src[x];
    }
  }
  std::copy(col_out.begin(), col_out.end(), plane);
}

// The whole chain for one HWC uint8 image, op by op over planar float buffers (the per-pixel math
// is color_ops.h's, shared with the CUDA kernel; only the loop order differs, for vectorization).
// The contrast mean is taken from the image as it is when contrast runs, as torchvision does.
template <typename OutT>
void ProcessSample(const uint8_t *in, OutT *out, int H, int W, const SampleParams &p,
                   const ColorAugmentArgs &a, std::vector<float> &scratch) {
  const int64_t n = static_cast<int64_t>(H) * W;
  scratch.resize(static_cast<size_t>(n) * 3);
  float *r = scratch.data(), *g = r + n, *b = g + n;
  const float inv255 = 1.f / 255.f;
  for (int64_t i = 0; i < n; i++) {
    r[i] = in[3 * i] * inv255;
    g[i] = in[3 * i + 1] * inv255;
    b[i] = in[3 * i + 2] * inv255;
  }
  for (int k = 0; k < 4; k++) {
    const int op = p.order[k];
    if (!op_active(p, op)) continue;
    switch (op) {
      case kBrightness:
        for (float *plane : {r, g, b})
          for (int64_t i = 0; i < n; i++) plane[i] = blend(plane[i], 0.f, p.brightness);
        break;
      case kContrast: {
        double sum = 0;
        for (int64_t i = 0; i < n; i++) sum += gray_of(r[i], g[i], b[i]);
        const float mean = static_cast<float>(sum / n);
        for (float *plane : {r, g, b})
          for (int64_t i = 0; i < n; i++) plane[i] = blend(plane[i], mean, p.contrast);
        break;
      }
      case kSaturation:
        for (int64_t i = 0; i < n; i++) {
          const float l = gray_of(r[i], g[i], b[i]);
          r[i] = blend(r[i], l, p.saturation);
          g[i] = blend(g[i], l, p.saturation);
          b[i] = blend(b[i], l, p.saturation);
        }
        break;
      default:
        for (int64_t i = 0; i < n; i++) adjust_hue(r[i], g[i], b[i], p.hue);
        break;
    }
  }
  if (p.grayscale) {
    for (int64_t i = 0; i < n; i++) r[i] = g[i] = b[i] = gray_of(r[i], g[i], b[i]);
  }
  if (p.blur_window > 1) {
    float taps[kMaxBlurWindow];
    gaussian_taps(p.blur_sigma, p.blur_window, taps);
    thread_local std::vector<float> line;
    for (float *plane : {r, g, b}) BlurPlane(plane, H, W, taps, p.blur_window, line);
  }
  const float *planes[3] = {r, g, b};
  for (int c = 0; c < 3; c++) {
    const float *src = planes[c];
    const float mean = a.mean[c], std = a.std[c];
    if (a.chw_) {
      OutT *dst = out + c * n;
      for (int64_t i = 0; i < n; i++)
        dst[i] = cast_out<OutT>(solarize_normalize(src[i], p.solarize, a.solarize_threshold, mean, std));
    } else {
      for (int64_t i = 0; i < n; i++)
        out[3 * i + c] = cast_out<OutT>(solarize_normalize(src[i], p.solarize, a.solarize_threshold, mean, std));
    }
  }
}

}  // namespace

template <>
void ColorAugment<::dali::CPUBackend>::RunImpl(::dali::Workspace &ws) {
  const auto &input = ws.Input<::dali::CPUBackend>(0);
  auto &output = ws.Output<::dali::CPUBackend>(0);
  output.SetLayout(args_.OutputLayout());
  auto &tp = ws.GetThreadPool();
  const auto &shape = input.shape();
  for (int i = 0; i < shape.num_samples(); i++) {
    tp.AddWork(
        [&, i](int) {
          auto sh = shape[i];
          int H = sh[0], W = sh[1];
          const uint8_t *in = input.tensor<uint8_t>(i);
          thread_local std::vector<float> scratch;  // blur buffers, reused across batches
          switch (args_.kind) {
            case OutputKind::kFloat16:
              ProcessSample(in, output.mutable_tensor<::dali::float16>(i), H, W, params_[i], args_,
                            scratch);
              break;
            case OutputKind::kBFloat16:
              ProcessSample(in, output.mutable_tensor<uint16_t>(i), H, W, params_[i], args_,
                            scratch);
              break;
            default:
              ProcessSample(in, output.mutable_tensor<float>(i), H, W, params_[i], args_, scratch);
              break;
          }
        },
        shape.tensor_size(i));
  }
  tp.RunAll();
}

}  // namespace flashdino

DALI_REGISTER_OPERATOR(FlashdinoColorAugment, ::flashdino::ColorAugment<::dali::CPUBackend>,
                       ::dali::CPU);

DALI_SCHEMA(FlashdinoColorAugment)
    .DocStr(R"(Fused SimDINO colour augmentation of one crop per sample: colour jitter with
torchvision semantics (brightness, contrast, saturation, hue in a per-sample order; contrast blends
with the mean gray level of the image as it is when contrast runs; torchvision's HSV hue math),
grayscale, Gaussian blur (torchvision taps, reflect border), solarize, normalization, HWC -> CHW and
the cast to the output dtype, in one operator. Input: uint8 HWC RGB. Identity factors (brightness,
contrast, saturation 1, hue 0) mean "op not applied".)")
    .NumInput(1)
    .NumOutput(1)
    .InputLayout(0, "HWC")
    .AddOptionalArg("brightness", "Brightness factor (1 = not applied).", 1.f, true)
    .AddOptionalArg("contrast", "Contrast factor (1 = not applied).", 1.f, true)
    .AddOptionalArg("saturation", "Saturation factor (1 = not applied).", 1.f, true)
    .AddOptionalArg("hue", "Hue shift in turns, in [-0.5, 0.5] (0 = not applied).", 0.f, true)
    .AddOptionalArg("jitter_order",
                    "Order of the jitter ops: a permutation of 0 brightness, 1 contrast, "
                    "2 saturation, 3 hue.",
                    std::vector<int>{0, 1, 2, 3}, true)
    .AddOptionalArg("grayscale", "1: convert to 3-channel grayscale after the jitter.", 0, true)
    .AddOptionalArg("blur_sigma", "Gaussian blur sigma (0 = no blur).", 0.f, true)
    .AddOptionalArg("blur_window",
                    "Odd blur window; 0 chooses 2*ceil(3*sigma)+1 (torchvision recipe: 9).", 0,
                    true)
    .AddOptionalArg("solarize", "1: invert pixels >= solarize_threshold (after the blur).", 0,
                    true)
    .AddOptionalArg("solarize_threshold", "Solarize threshold on the 0..255 scale.", 128.f)
    .AddOptionalArg("mean", "Per-channel mean on the 0..1 scale.",
                    std::vector<float>{0.485f, 0.456f, 0.406f})
    .AddOptionalArg("std", "Per-channel std on the 0..1 scale.",
                    std::vector<float>{0.229f, 0.224f, 0.225f})
    .AddOptionalArg("output_dtype", "float32, float16 or bfloat16 (stored as uint16 bits).",
                    std::string("float32"))
    .AddOptionalArg("output_layout", "CHW or HWC.", std::string("CHW"));
