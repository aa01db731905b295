// The fused sampler update on CUDA: one grid-stride pass, 16-byte loads where every pointer is
// aligned, fp32 math (the element math is shared with the CPU path in ../sampling_step.h), launched
// on the current stream so it orders correctly under torch.compile, CUDA graphs and user streams.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers, which a
// minimal toolkit (nvcc + cudart) does not have.
#include "../philox.h"
#include "../sampling_step.h"

#include <ATen/Dispatch_v2.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace sampling_step {
namespace {

// Bytes per vectorised access: one 128-bit load/store per thread and tensor (LDG.128/STG.128).
constexpr int kVectorBytes = 16;
constexpr int kThreadsPerBlock = 256;
// Enough resident blocks per SM to hide memory latency; the grid-stride loop covers the rest.
constexpr int kBlocksPerSm = 8;

template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

template <typename scalar_t>
constexpr int vector_width() {
  return kVectorBytes / static_cast<int>(sizeof(scalar_t));
}

// Pointers to the tensors of one step; absent ones are nullptr and never touched.
template <typename scalar_t>
struct StepPointers {
  const scalar_t* __restrict__ x_t;
  const scalar_t* __restrict__ eps;
  const scalar_t* __restrict__ eps_uncond;
  const scalar_t* __restrict__ noise;
  scalar_t* __restrict__ x_prev;
  scalar_t* __restrict__ x0_pred;
  // In-kernel noise (instead of `noise`): sample n's seed and the stream, both read on the device.
  const int64_t* __restrict__ noise_seeds;
  const int64_t* __restrict__ noise_stream;
  int64_t sample_numel;
};

// z of element e (flat index) from the seeds: philox_normal's value, rounded to the storage dtype as
// noise.to(dtype) would be. `cache` keeps the last Philox block, so a pack spanning one block makes
// it once.
struct NoiseBlockCache {
  int64_t sample = -1;
  int64_t block = -1;
  double z[4];
};

template <typename scalar_t>
__device__ __forceinline__ float philox_noise(const StepPointers<scalar_t>& p, int64_t e,
                                              NoiseBlockCache& cache) {
  const int64_t sample = e / p.sample_numel;
  const int64_t within = e - sample * p.sample_numel;
  const int64_t block = within >> 2;
  if (sample != cache.sample || block != cache.block) {
    philox::normals<uint64_t, double>(static_cast<uint64_t>(p.noise_seeds[sample]),
                                      static_cast<uint64_t>(*p.noise_stream),
                                      static_cast<uint64_t>(block), cache.z[0], cache.z[1],
                                      cache.z[2], cache.z[3]);
    cache.sample = sample;
    cache.block = block;
  }
  return static_cast<float>(static_cast<scalar_t>(static_cast<float>(cache.z[within & 3])));
}

// Elements [i * W, i * W + W) through one aligned pack per tensor, W = 1 for the scalar path.
// Mode, guidance and clipping are template parameters; noise and the x̂0 output are warp-uniform
// run-time checks (nullptr when absent): that keeps the build at 48 kernels per arch instead of 192
// (CI compiles four arches on two cores) and costs nothing measurable in a memory-bound kernel.
template <typename scalar_t, int W, Mode MODE, bool GUIDED, bool CLIP>
__device__ __forceinline__ void step_pack(const StepPointers<scalar_t>& p, const StepCoefs& c,
                                          int64_t i) {
  using P = Pack<scalar_t, W>;
  const P x = reinterpret_cast<const P*>(p.x_t)[i];
  const P e = reinterpret_cast<const P*>(p.eps)[i];
  P eu, z, out, x0;
  if constexpr (GUIDED) eu = reinterpret_cast<const P*>(p.eps_uncond)[i];
  const bool with_noise = p.noise != nullptr;
  if (with_noise) z = reinterpret_cast<const P*>(p.noise)[i];
  const bool with_philox = p.noise_seeds != nullptr;
  NoiseBlockCache cache;
#pragma unroll
  for (int k = 0; k < W; ++k) {
    float o, x0k;
    const float zk = with_noise    ? static_cast<float>(z.v[k])
                     : with_philox ? philox_noise(p, i * W + k, cache)
                                   : 0.0f;
    // Without noise sigma is 0 (checked on the host), so adding sigma * 0 leaves the result as is.
    step_element<MODE, GUIDED, CLIP, true>(
        static_cast<float>(x.v[k]), static_cast<float>(e.v[k]),
        GUIDED ? static_cast<float>(eu.v[k]) : 0.0f, zk, c, o, x0k);
    out.v[k] = static_cast<scalar_t>(o);
    x0.v[k] = static_cast<scalar_t>(x0k);
  }
  reinterpret_cast<P*>(p.x_prev)[i] = out;
  if (p.x0_pred != nullptr) reinterpret_cast<P*>(p.x0_pred)[i] = x0;
}

template <typename scalar_t, int W, Mode MODE, bool GUIDED, bool CLIP>
__global__ void __launch_bounds__(kThreadsPerBlock)
    step_kernel(const StepPointers<scalar_t> p, const StepCoefs c, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_packs = n / W;
  for (int64_t i = first; i < n_packs; i += stride) {
    step_pack<scalar_t, W, MODE, GUIDED, CLIP>(p, c, i);
  }
  if constexpr (W > 1) {
    // The last n % W elements (numel not a multiple of the vector width), one per thread.
    const int64_t tail = n_packs * W + first;
    if (tail < n) {
      step_pack<scalar_t, 1, MODE, GUIDED, CLIP>(p, c, tail);
    }
  }
}

bool aligned(const void* ptr) {
  return ptr == nullptr || reinterpret_cast<std::uintptr_t>(ptr) % kVectorBytes == 0;
}

template <typename scalar_t, Mode MODE, bool GUIDED, bool CLIP>
void launch(const StepPointers<scalar_t>& p, const StepCoefs& c, int64_t n) {
  constexpr int kWidth = vector_width<scalar_t>();
  const bool vectorise = aligned(p.x_t) && aligned(p.eps) && aligned(p.eps_uncond) &&
                         aligned(p.noise) && aligned(p.x_prev) && aligned(p.x0_pred);
  const int64_t work = vectorise ? (n + kWidth - 1) / kWidth : n;
  int device = 0;
  int sm_count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t max_blocks = static_cast<int64_t>(sm_count) * kBlocksPerSm;
  const int blocks = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((work + kThreadsPerBlock - 1) / kThreadsPerBlock, max_blocks)));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vectorise) {
    step_kernel<scalar_t, kWidth, MODE, GUIDED, CLIP>
        <<<blocks, kThreadsPerBlock, 0, stream>>>(p, c, n);
  } else {
    step_kernel<scalar_t, 1, MODE, GUIDED, CLIP>
        <<<blocks, kThreadsPerBlock, 0, stream>>>(p, c, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Mode MODE>
std::tuple<at::Tensor, at::Tensor> step_cuda(const char* op, const at::Tensor& x_t,
                                             const at::Tensor& eps,
                                             const std::optional<at::Tensor>& eps_uncond,
                                             const std::optional<at::Tensor>& noise,
                                             const std::optional<at::Tensor>& noise_seeds,
                                             const std::optional<at::Tensor>& noise_stream,
                                             const StepCoefs& coefs, bool clip_x0, bool return_x0) {
  check_inputs(op, x_t, eps, eps_uncond, noise, noise_seeds, noise_stream, coefs);
  TORCH_CHECK(x_t.is_cuda(), op, ": the CUDA kernel got a tensor on ", x_t.device());
  const c10::cuda::CUDAGuard guard(x_t.device());
  at::Tensor x_prev = at::empty_like(x_t);
  at::Tensor x0_pred = return_x0 ? at::empty_like(x_t) : at::empty({0}, x_t.options());
  const int64_t n = x_t.numel();
  if (n == 0) {
    return {x_prev, x0_pred};
  }
  const bool use_noise = noise.has_value() && coefs.sigma != 0.0f;
  const bool philox_noise = noise_seeds.has_value() && coefs.sigma != 0.0f;

  AT_DISPATCH_V2(x_t.scalar_type(), "sampling_step_cuda", AT_WRAP([&] {
    StepPointers<scalar_t> p{
        x_t.const_data_ptr<scalar_t>(),
        eps.const_data_ptr<scalar_t>(),
        eps_uncond.has_value() ? eps_uncond->const_data_ptr<scalar_t>() : nullptr,
        use_noise ? noise->const_data_ptr<scalar_t>() : nullptr,
        x_prev.mutable_data_ptr<scalar_t>(),
        return_x0 ? x0_pred.mutable_data_ptr<scalar_t>() : nullptr,
        philox_noise ? noise_seeds->const_data_ptr<int64_t>() : nullptr,
        philox_noise ? noise_stream->const_data_ptr<int64_t>() : nullptr,
        philox_noise ? n / x_t.size(0) : 0};  // per-sample size: only the in-kernel noise uses it
    dispatch_bool(eps_uncond.has_value(), [&](auto guided) {
      dispatch_bool(clip_x0, [&](auto clip) {
        launch<scalar_t, MODE, decltype(guided)::value, decltype(clip)::value>(p, coefs, n);
      });
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {x_prev, x0_pred};
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_cuda(
    const at::Tensor& x_t, const at::Tensor& eps, const std::optional<at::Tensor>& eps_uncond,
    const std::optional<at::Tensor>& noise, double guidance_scale, double sqrt_recip_alphas_cumprod,
    double sqrt_recipm1_alphas_cumprod, double posterior_mean_coef1, double posterior_mean_coef2,
    double sigma, bool clip_x0, bool return_x0, const std::optional<at::Tensor>& noise_seeds,
    const std::optional<at::Tensor>& noise_stream) {
  const StepCoefs coefs = make_coefs(guidance_scale, sqrt_recip_alphas_cumprod,
                                     sqrt_recipm1_alphas_cumprod, posterior_mean_coef1,
                                     posterior_mean_coef2, sigma);
  return step_cuda<Mode::kDDPM>(KERNELS_OP_NAME("ddpm_step"), x_t, eps, eps_uncond, noise,
                                noise_seeds, noise_stream, coefs, clip_x0, return_x0);
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cuda(
    const at::Tensor& x_t, const at::Tensor& eps, const std::optional<at::Tensor>& eps_uncond,
    const std::optional<at::Tensor>& noise, double guidance_scale, double sqrt_recip_alphas_cumprod,
    double sqrt_recipm1_alphas_cumprod, double sqrt_alphas_cumprod_prev, double direction_coef,
    double sigma, bool clip_x0, bool return_x0, const std::optional<at::Tensor>& noise_seeds,
    const std::optional<at::Tensor>& noise_stream) {
  const StepCoefs coefs = make_coefs(guidance_scale, sqrt_recip_alphas_cumprod,
                                     sqrt_recipm1_alphas_cumprod, sqrt_alphas_cumprod_prev,
                                     direction_coef, sigma);
  return step_cuda<Mode::kDDIM>(KERNELS_OP_NAME("ddim_step"), x_t, eps, eps_uncond, noise,
                                noise_seeds, noise_stream, coefs, clip_x0, return_x0);
}

}  // namespace

KERNELS_LIBRARY_IMPL(KERNELS_OP_NAMESPACE, CUDA, m) {
  m.impl("ddpm_step", &ddpm_step_cuda);
  m.impl("ddim_step", &ddim_step_cuda);
}

}  // namespace sampling_step
