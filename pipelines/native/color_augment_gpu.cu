// CUDA kernel of FlashdinoColorAugment. Same per-pixel math as the CPU kernel (color_ops.h).
//
// Per batch, on the operator's stream, with no host synchronization:
//   1. contrast mean  (only samples whose jitter includes contrast): per-block partial sums of the
//                     gray level the image has when contrast runs; the chain kernel adds a sample's
//                     partials in a fixed order (no float atomics: the result is bitwise reproducible)
//   2. chain          jitter in the sample's order + grayscale; samples without blur are finished
//                     here (solarize, normalize, cast, CHW store), blurred ones go to a float buffer
//   3. blur rows      blurred samples only
//   4. blur columns   + solarize, normalize, cast, store
// Blocks are laid out as (pixel blocks, sample): every block reads its sample descriptor once.
#include <cuda_runtime.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "color_augment.h"
#include "dali/core/access_order.h"
#include "dali/core/cuda_error.h"
#include "dali/core/float16.h"
#include "dali/kernels/dynamic_scratchpad.h"

namespace flashdino {
namespace {

constexpr int kBlock = 256;
constexpr int kMaxBlocksPerSample = 256;

struct GpuSample {
  const uint8_t *in;
  void *out;
  int H, W;
  int cpos;            // position of contrast in the jitter order, -1 if not applied
  SampleParams p;
  float *blur_a;       // H*W*3 floats (chain output), blurred samples only
  float *blur_b;       // H*W*3 floats (after the row pass)
  const float *taps;   // p.blur_window Gaussian taps
};

struct Finish {
  float mean[3];
  float std[3];
  float threshold;
  int chw;
};

template <typename OutT>
__device__ __forceinline__ OutT to_out(float v);
template <>
__device__ __forceinline__ float to_out<float>(float v) { return v; }
template <>
__device__ __forceinline__ ::dali::float16 to_out<::dali::float16>(float v) {
  return ::dali::float16(v);
}
template <>
__device__ __forceinline__ uint16_t to_out<uint16_t>(float v) { return float_to_bf16_bits(v); }

template <typename OutT>
__device__ __forceinline__ void store_pixel(OutT *out, int64_t pix, int64_t npix, float r, float g,
                                            float b, int solarize, const Finish &f) {
  float v[3] = {r, g, b};
#pragma unroll
  for (int c = 0; c < 3; c++) {
    float y = solarize_normalize(v[c], solarize, f.threshold, f.mean[c], f.std[c]);
    out[f.chw ? c * npix + pix : pix * 3 + c] = to_out<OutT>(y);
  }
}

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kBlock / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = 0.f;
  if (warp == 0) {
    v = lane < (kBlock / 32) ? warp_sums[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;  // valid in thread 0
}

__global__ void ContrastMeanKernel(const GpuSample *samples, float *partials) {
  const GpuSample s = samples[blockIdx.y];
  if (s.cpos < 0) return;  // uniform across the block
  const int64_t npix = static_cast<int64_t>(s.H) * s.W;
  const float k = 1.f / 255.f;
  float acc = 0.f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < npix;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint8_t *px = s.in + 3 * i;
    acc += pre_contrast_gray(px[0] * k, px[1] * k, px[2] * k, s.p, s.cpos);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.y * gridDim.x + blockIdx.x] = acc;
}

template <typename OutT>
__global__ void ChainKernel(const GpuSample *samples, const float *partials, Finish f) {
  GpuSample s = samples[blockIdx.y];
  const int64_t npix = static_cast<int64_t>(s.H) * s.W;
  if (s.cpos >= 0) {  // uniform across the block
    __shared__ float mean;
    if (threadIdx.x == 0) {
      const float *part = partials + blockIdx.y * gridDim.x;
      float total = 0.f;
      for (int b = 0; b < gridDim.x; b++) total += part[b];  // fixed order: deterministic
      mean = total / static_cast<float>(npix);
    }
    __syncthreads();
    s.p.contrast_mean = mean;
  }
  const float k = 1.f / 255.f;
  const bool blur = s.p.blur_window > 1;
  OutT *out = static_cast<OutT *>(s.out);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < npix;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint8_t *px = s.in + 3 * i;
    float r = px[0] * k, g = px[1] * k, b = px[2] * k;
    color_chain(r, g, b, s.p);
    if (blur) {
      s.blur_a[3 * i] = r;
      s.blur_a[3 * i + 1] = g;
      s.blur_a[3 * i + 2] = b;
    } else {
      store_pixel(out, i, npix, r, g, b, s.p.solarize, f);
    }
  }
}

__global__ void BlurRowsKernel(const GpuSample *samples) {
  const GpuSample s = samples[blockIdx.y];
  if (s.p.blur_window <= 1) return;
  const int64_t npix = static_cast<int64_t>(s.H) * s.W;
  const int k = s.p.blur_window, half = k / 2;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < npix;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int y = static_cast<int>(i / s.W), x = static_cast<int>(i % s.W);
    const float *row = s.blur_a + static_cast<int64_t>(y) * s.W * 3;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f;
    for (int t = 0; t < k; t++) {
      const float *q = row + 3 * reflect101(x + t - half, s.W);
      float w = s.taps[t];
      a0 += w * q[0];
      a1 += w * q[1];
      a2 += w * q[2];
    }
    s.blur_b[3 * i] = a0;
    s.blur_b[3 * i + 1] = a1;
    s.blur_b[3 * i + 2] = a2;
  }
}

template <typename OutT>
__global__ void BlurColsKernel(const GpuSample *samples, Finish f) {
  const GpuSample s = samples[blockIdx.y];
  if (s.p.blur_window <= 1) return;
  const int64_t npix = static_cast<int64_t>(s.H) * s.W;
  const int k = s.p.blur_window, half = k / 2;
  OutT *out = static_cast<OutT *>(s.out);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < npix;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int y = static_cast<int>(i / s.W), x = static_cast<int>(i % s.W);
    float a0 = 0.f, a1 = 0.f, a2 = 0.f;
    for (int t = 0; t < k; t++) {
      const float *q = s.blur_b + (static_cast<int64_t>(reflect101(y + t - half, s.H)) * s.W + x) * 3;
      float w = s.taps[t];
      a0 += w * q[0];
      a1 += w * q[1];
      a2 += w * q[2];
    }
    store_pixel(out, i, npix, a0, a1, a2, s.p.solarize, f);
  }
}

int BlocksPerSample(int64_t max_pix) {
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>((max_pix + kBlock - 1) / kBlock, kMaxBlocksPerSample)));
}

template <typename OutT>
void Launch(const GpuSample *samples, float *partials, const Finish &f, int n, int64_t max_pix,
            bool any_contrast, bool any_blur, cudaStream_t stream) {
  dim3 grid(BlocksPerSample(max_pix), n);
  if (any_contrast) ContrastMeanKernel<<<grid, kBlock, 0, stream>>>(samples, partials);
  ChainKernel<OutT><<<grid, kBlock, 0, stream>>>(samples, partials, f);
  if (any_blur) {
    BlurRowsKernel<<<grid, kBlock, 0, stream>>>(samples);
    BlurColsKernel<OutT><<<grid, kBlock, 0, stream>>>(samples, f);
  }
  CUDA_CALL(cudaGetLastError());
}

}  // namespace

template <>
void ColorAugment<::dali::GPUBackend>::RunImpl(::dali::Workspace &ws) {
  const auto &input = ws.Input<::dali::GPUBackend>(0);
  auto &output = ws.Output<::dali::GPUBackend>(0);
  output.SetLayout(args_.OutputLayout());
  const int n = input.num_samples();
  if (n == 0) return;
  cudaStream_t stream = ws.stream();
  ::dali::kernels::DynamicScratchpad scratch{::dali::AccessOrder(stream)};
  const auto &shape = input.shape();

  // Host-side descriptors; blur buffers and taps are laid out in two flat device allocations.
  std::vector<GpuSample> host(n);
  std::vector<float> taps;
  std::vector<int64_t> taps_offset(n, -1), blur_offset(n, -1);
  int64_t max_pix = 0, blur_floats = 0;
  bool any_contrast = false, any_blur = false;
  for (int i = 0; i < n; i++) {
    auto sh = shape[i];
    GpuSample &s = host[i];
    s.in = input.tensor<uint8_t>(i);
    s.out = output.raw_mutable_tensor(i);
    s.H = static_cast<int>(sh[0]);
    s.W = static_cast<int>(sh[1]);
    s.p = params_[i];
    s.cpos = contrast_position(s.p);
    int64_t npix = static_cast<int64_t>(s.H) * s.W;
    max_pix = std::max(max_pix, npix);
    any_contrast |= s.cpos >= 0;
    if (s.p.blur_window > 1) {
      any_blur = true;
      taps_offset[i] = static_cast<int64_t>(taps.size());
      taps.resize(taps.size() + s.p.blur_window);
      gaussian_taps(s.p.blur_sigma, s.p.blur_window, taps.data() + taps_offset[i]);
      blur_offset[i] = blur_floats;
      blur_floats += npix * 3;
    }
  }
  // Descriptors go up through pinned staging buffers (ToContiguousGPU): a cudaMemcpyAsync from
  // pageable memory (ToGPU on a std::vector) may block this thread until the stream catches up.
  float *taps_dev = any_blur ? std::get<0>(scratch.ToContiguousGPU(stream, taps)) : nullptr;
  float *blur_dev = any_blur ? scratch.AllocateGPU<float>(2 * blur_floats) : nullptr;
  for (int i = 0; i < n; i++) {
    GpuSample &s = host[i];
    if (blur_offset[i] >= 0) {
      s.blur_a = blur_dev + blur_offset[i];
      s.blur_b = blur_dev + blur_floats + blur_offset[i];
      s.taps = taps_dev + taps_offset[i];
    } else {
      s.blur_a = s.blur_b = nullptr;
      s.taps = nullptr;
    }
  }
  // Every block of a contrast sample writes its partial sum, so no zeroing is needed.
  float *partials = scratch.AllocateGPU<float>(static_cast<size_t>(n) * BlocksPerSample(max_pix));
  static_assert(std::is_trivially_copyable<GpuSample>::value, "descriptors are copied as bytes");
  GpuSample *samples_dev = std::get<0>(scratch.ToContiguousGPU(stream, host));

  Finish f;
  for (int c = 0; c < 3; c++) {
    f.mean[c] = args_.mean[c];
    f.std[c] = args_.std[c];
  }
  f.threshold = args_.solarize_threshold;
  f.chw = args_.chw_ ? 1 : 0;
  switch (args_.kind) {
    case OutputKind::kFloat16:
      Launch<::dali::float16>(samples_dev, partials, f, n, max_pix, any_contrast, any_blur, stream);
      break;
    case OutputKind::kBFloat16:
      Launch<uint16_t>(samples_dev, partials, f, n, max_pix, any_contrast, any_blur, stream);
      break;
    default:
      Launch<float>(samples_dev, partials, f, n, max_pix, any_contrast, any_blur, stream);
      break;
  }
}

}  // namespace flashdino

DALI_REGISTER_OPERATOR(FlashdinoColorAugment, ::flashdino::ColorAugment<::dali::GPUBackend>,
                       ::dali::GPU);
