// Per-pixel colour math of the fused augmentation, shared by the CPU and the CUDA kernels.
//
// Semantics are torchvision's functional ops on float tensors in [0, 1] (spec section 1.1):
//   brightness  clamp(f * x)
//   contrast    clamp(f * x + (1 - f) * mean(gray(image)))   mean over the whole image *as it is
//                                                            when contrast runs* (so it depends on
//                                                            the ops before it in the random order)
//   saturation  clamp(f * x + (1 - f) * gray(x))
//   hue         rgb -> hsv (torchvision's _rgb2hsv), h = (h + f) mod 1, hsv -> rgb (_hsv2rgb)
//   grayscale   gray = 0.2989 r + 0.587 g + 0.114 b, replicated to 3 channels
//   solarize    x >= threshold ? 1 - x : x
//   normalize   (x - mean) / std
// Everything here is header-only and free of DALI types so that it compiles for host and device.
#ifndef FLASHDINO_PIPELINES_NATIVE_COLOR_OPS_H_
#define FLASHDINO_PIPELINES_NATIVE_COLOR_OPS_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FD_HOST_DEVICE inline
#endif

namespace flashdino {

enum JitterOp : int { kBrightness = 0, kContrast = 1, kSaturation = 2, kHue = 3 };

// Largest blur window accepted (sigma <= 2 needs 13 with the 3-sigma rule, torchvision uses 9).
constexpr int kMaxBlurWindow = 63;

// Everything the kernels need to know about one sample, after argument parsing.
struct SampleParams {
  float brightness = 1.f, contrast = 1.f, saturation = 1.f, hue = 0.f;
  int order[4] = {0, 1, 2, 3};
  int grayscale = 0;
  int solarize = 0;
  int blur_window = 1;      // odd; 1 = no blur
  float blur_sigma = 0.f;
  float contrast_mean = 0.f;  // filled in by the reduction pass when the contrast op is active
};

FD_HOST_DEVICE float clamp01(float x) { return fminf(fmaxf(x, 0.f), 1.f); }

FD_HOST_DEVICE float gray_of(float r, float g, float b) {
  return 0.2989f * r + 0.587f * g + 0.114f * b;
}

// torchvision's _blend: ratio * a + (1 - ratio) * b, clamped to [0, 1].
FD_HOST_DEVICE float blend(float a, float b, float ratio) {
  return clamp01(ratio * a + (1.f - ratio) * b);
}

// An op whose factor is the identity is "not applied" (jitter did not fire); skipping it keeps the
// hue round trip (not bit-exact in float) away from samples that should pass through untouched.
FD_HOST_DEVICE bool op_active(const SampleParams &p, int op) {
  switch (op) {
    case kBrightness: return p.brightness != 1.f;
    case kContrast:   return p.contrast != 1.f;
    case kSaturation: return p.saturation != 1.f;
    default:          return p.hue != 0.f;
  }
}

FD_HOST_DEVICE void adjust_hue(float &r, float &g, float &b, float hue_factor) {
  // torchvision _rgb2hsv
  float maxc = fmaxf(r, fmaxf(g, b));
  float minc = fminf(r, fminf(g, b));
  bool eqc = maxc == minc;
  float cr = maxc - minc;
  float s = cr / (eqc ? 1.f : maxc);
  float cr_div = eqc ? 1.f : cr;
  float rc = (maxc - r) / cr_div;
  float gc = (maxc - g) / cr_div;
  float bc = (maxc - b) / cr_div;
  float hr = (maxc == r) ? (bc - gc) : 0.f;
  float hg = (maxc == g && maxc != r) ? (2.f + rc - bc) : 0.f;
  float hb = (maxc != g && maxc != r) ? (4.f + gc - rc) : 0.f;
  float h = hr + hg + hb;
  h = fmodf(h / 6.f + 1.f, 1.f);
  float v = maxc;
  // adjust_hue: python-style remainder, result in [0, 1)
  h = h + hue_factor;
  h = h - floorf(h);
  // torchvision _hsv2rgb
  float h6 = h * 6.f;
  float fi = floorf(h6);
  float f = h6 - fi;
  int i = static_cast<int>(fi);
  float p = clamp01(v * (1.f - s));
  float q = clamp01(v * (1.f - s * f));
  float t = clamp01(v * (1.f - s * (1.f - f)));
  i = ((i % 6) + 6) % 6;
  switch (i) {
    case 0:  r = v; g = t; b = p; break;
    case 1:  r = q; g = v; b = p; break;
    case 2:  r = p; g = v; b = t; break;
    case 3:  r = p; g = q; b = v; break;
    case 4:  r = t; g = p; b = v; break;
    default: r = v; g = p; b = q; break;
  }
}

FD_HOST_DEVICE void apply_jitter_op(int op, float &r, float &g, float &b, const SampleParams &p) {
  switch (op) {
    case kBrightness:
      r = blend(r, 0.f, p.brightness);
      g = blend(g, 0.f, p.brightness);
      b = blend(b, 0.f, p.brightness);
      break;
    case kContrast:
      r = blend(r, p.contrast_mean, p.contrast);
      g = blend(g, p.contrast_mean, p.contrast);
      b = blend(b, p.contrast_mean, p.contrast);
      break;
    case kSaturation: {
      float l = gray_of(r, g, b);
      r = blend(r, l, p.saturation);
      g = blend(g, l, p.saturation);
      b = blend(b, l, p.saturation);
      break;
    }
    default:
      adjust_hue(r, g, b, p.hue);
      break;
  }
}

// Position of the contrast op in the sample's order, or -1 when contrast is not applied.
FD_HOST_DEVICE int contrast_position(const SampleParams &p) {
  if (!op_active(p, kContrast)) return -1;
  for (int k = 0; k < 4; k++)
    if (p.order[k] == kContrast) return k;
  return -1;
}

// Gray value of a pixel just before the contrast op runs (what the contrast mean averages).
FD_HOST_DEVICE float pre_contrast_gray(float r, float g, float b, const SampleParams &p, int cpos) {
  for (int k = 0; k < cpos; k++) {
    int op = p.order[k];
    if (op_active(p, op)) apply_jitter_op(op, r, g, b, p);
  }
  return gray_of(r, g, b);
}

// Jitter in the sample's order, then grayscale: the part of the chain before the blur.
FD_HOST_DEVICE void color_chain(float &r, float &g, float &b, const SampleParams &p) {
  for (int k = 0; k < 4; k++) {
    int op = p.order[k];
    if (op_active(p, op)) apply_jitter_op(op, r, g, b, p);
  }
  if (p.grayscale) {
    float l = gray_of(r, g, b);
    r = g = b = l;
  }
}

FD_HOST_DEVICE float solarize_normalize(float x, int solarize, float threshold, float mean,
                                        float std) {
  if (solarize && x >= threshold) x = 1.f - x;
  // torchvision's Normalize subtracts then divides (not a multiply by 1/std).
  return (x - mean) / std;
}

// Reflect-101 border (torchvision's "reflect" padding), valid for any offset.
FD_HOST_DEVICE int reflect101(int i, int n) {
  if (n <= 1) return 0;
  int period = 2 * (n - 1);
  i = i % period;
  if (i < 0) i += period;
  return i < n ? i : period - i;
}

// bfloat16 bits of a finite float, rounded to nearest even.
FD_HOST_DEVICE uint16_t float_to_bf16_bits(float x) {
#if defined(__CUDA_ARCH__)
  uint32_t u = __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
#endif
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Gaussian taps as torchvision builds them: x = linspace(-(k-1)/2, (k-1)/2, k),
// w = exp(-x^2 / (2 sigma^2)), normalized to sum 1.
inline void gaussian_taps(float sigma, int window, float *taps) {
  double half = (window - 1) * 0.5, sum = 0;
  for (int i = 0; i < window; i++) {
    double x = -half + i;
    double w = std::exp(-0.5 * (x / sigma) * (x / sigma));
    taps[i] = static_cast<float>(w);
    sum += w;
  }
  for (int i = 0; i < window; i++) taps[i] = static_cast<float>(taps[i] / sum);
}

// Window for a sigma when none is given: the 3-sigma rule, odd.
inline int auto_blur_window(float sigma) {
  int half = static_cast<int>(std::ceil(3.0 * sigma));
  if (half < 1) half = 1;
  return 2 * half + 1;
}

}  // namespace flashdino

#endif  // FLASHDINO_PIPELINES_NATIVE_COLOR_OPS_H_
