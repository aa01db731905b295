// The fused sampler update: op schemas, input checks, the CPU implementation, the module init.
//
// Schemas are declared once here (TORCH_LIBRARY); each backend registers its implementation with
// TORCH_LIBRARY_IMPL (CPU below, CUDA in cuda/sampling_step.cu). The Python wrappers, the fake
// kernels for torch.compile are in kernels/sampling_step/op.py, the float64 coefficient math in
// shared/diffusion/coefficients.py.
#include "sampling_step.h"

#include "philox_normal.h"

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>

namespace sampling_step {

namespace {

// Elements per at::parallel_for task: below this a second thread costs more than it saves. The value
// is ATen's own for cheap element-wise loops (at::internal::GRAIN_SIZE in ATen/TensorIterator.h).
constexpr int64_t kGrainSize = 32768;

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x_t) {
  TORCH_CHECK(t.sizes() == x_t.sizes(), op, ": ", name, " has shape ", t.sizes(),
              " but x_t has shape ", x_t.sizes(), "; they must match");
  TORCH_CHECK(t.scalar_type() == x_t.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x_t has dtype ", x_t.scalar_type(), "; they must match");
  TORCH_CHECK(t.device() == x_t.device(), op, ": ", name, " is on ", t.device(),
              " but x_t is on ", x_t.device(), "; they must be on the same device");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name,
              " must be contiguous (call .contiguous() on it first)");
}

}  // namespace

void check_inputs(const char* op, const at::Tensor& x_t, const at::Tensor& eps,
                  const std::optional<at::Tensor>& eps_uncond, const std::optional<at::Tensor>& noise,
                  const std::optional<at::Tensor>& noise_seeds,
                  const std::optional<at::Tensor>& noise_stream, const StepCoefs& coefs) {
  const auto dtype = x_t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": x_t has dtype ", dtype, "; supported are float32, float16 and bfloat16");
  TORCH_CHECK(x_t.is_contiguous(), op, ": x_t must be contiguous (call .contiguous() on it first)");
  check_like(op, "eps", eps, x_t);
  if (eps_uncond.has_value()) {
    check_like(op, "eps_uncond", *eps_uncond, x_t);
  }
  if (noise.has_value()) {
    check_like(op, "noise", *noise, x_t);
  }
  TORCH_CHECK(noise_seeds.has_value() == noise_stream.has_value(), op,
              ": noise_seeds and noise_stream go together (in-kernel noise), got only one");
  if (noise_seeds.has_value()) {
    TORCH_CHECK(!noise.has_value(), op, ": give either noise or noise_seeds/noise_stream, not both");
    philox::check_seeds_and_stream(op, *noise_seeds, *noise_stream);
    TORCH_CHECK(x_t.dim() >= 1 && noise_seeds->size(0) == x_t.size(0), op, ": noise_seeds has ",
                noise_seeds->size(0), " seeds but x_t has shape ", x_t.sizes(), "; one seed per sample");
    TORCH_CHECK(noise_seeds->device() == x_t.device(), op, ": noise_seeds is on ",
                noise_seeds->device(), " but x_t is on ", x_t.device());
    philox::checked_sample_numel(op, x_t.sizes().slice(1));
  }
  const float all[] = {coefs.guidance_scale, coefs.x0_coef_xt, coefs.x0_coef_eps,
                       coefs.out_coef_x0,    coefs.out_coef_rest, coefs.sigma};
  for (float value : all) {
    TORCH_CHECK(std::isfinite(value), op, ": every scalar coefficient must be finite, got ", value);
  }
  TORCH_CHECK(coefs.sigma >= 0.0f, op, ": sigma must be >= 0, got ", coefs.sigma);
  TORCH_CHECK(coefs.x0_coef_eps > 0.0f, op, ": sqrt_recipm1_alphas_cumprod must be > 0, got ",
              coefs.x0_coef_eps);
  TORCH_CHECK(coefs.sigma == 0.0f || noise.has_value() || noise_seeds.has_value(), op,
              ": noise is required when sigma > 0 (DDPM at t > 0, DDIM with eta > 0), got none; pass "
              "noise, or noise_seeds and noise_stream");
}

namespace {

// W values of storage type scalar_t to and from a vector of W fp32 lanes, without a per-lane branch.
template <int W>
struct VecTypes {
  using F = typename VecOf<W>::type;
  typedef uint16_t U16 __attribute__((vector_size(W * sizeof(uint16_t))));
  typedef uint32_t U32 __attribute__((vector_size(W * sizeof(uint32_t))));
#if defined(__FLT16_MAX__)
  typedef _Float16 H __attribute__((vector_size(W * sizeof(_Float16))));
#endif
};

template <typename scalar_t, int W>
struct Lanes;

template <int W>
struct Lanes<float, W> {
  using F = typename VecTypes<W>::F;
  static C10_ALWAYS_INLINE F load(const float* p) {
    F v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static C10_ALWAYS_INLINE void store(float* p, F v) { std::memcpy(p, &v, sizeof(v)); }
};

// bfloat16 is the upper half of an fp32: widening is a shift, narrowing rounds to nearest even with
// NaN kept quiet, bit for bit as c10::BFloat16(float) does.
template <int W>
struct Lanes<c10::BFloat16, W> {
  using T = VecTypes<W>;
  static C10_ALWAYS_INLINE typename T::F load(const c10::BFloat16* p) {
    typename T::U16 h;
    std::memcpy(&h, p, sizeof(h));
    const typename T::U32 bits = __builtin_convertvector(h, typename T::U32) << 16;
    typename T::F v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  }
  static C10_ALWAYS_INLINE void store(c10::BFloat16* p, typename T::F v) {
    typename T::U32 bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const typename T::U32 rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
    const typename T::U32 quiet_nan = typename T::U32{} + 0x7FC0u;
    const typename T::U32 out = v != v ? quiet_nan : rounded;
    const typename T::U16 h = __builtin_convertvector(out, typename T::U16);
    std::memcpy(p, &h, sizeof(h));
  }
};

// float16 through the compiler's _Float16, whose vector conversions become vcvtph2ps / vcvtps2ph
// where F16C exists (x86-64-v3 and v4) and correctly rounded library calls elsewhere; compilers
// without _Float16 convert lane by lane through c10::Half (same values).
template <int W>
struct Lanes<c10::Half, W> {
  using T = VecTypes<W>;
#if defined(__FLT16_MAX__)
  static C10_ALWAYS_INLINE typename T::F load(const c10::Half* p) {
    typename T::H h;
    std::memcpy(&h, p, sizeof(h));
    return __builtin_convertvector(h, typename T::F);
  }
  static C10_ALWAYS_INLINE void store(c10::Half* p, typename T::F v) {
    const typename T::H h = __builtin_convertvector(v, typename T::H);
    std::memcpy(p, &h, sizeof(h));
  }
#else
  static C10_ALWAYS_INLINE typename T::F load(const c10::Half* p) {
    typename T::F v;
    for (int k = 0; k < W; ++k) v[k] = static_cast<float>(p[k]);
    return v;
  }
  static C10_ALWAYS_INLINE void store(c10::Half* p, typename T::F v) {
    for (int k = 0; k < W; ++k) p[k] = static_cast<c10::Half>(v[k]);
  }
#endif
};

// The tensors of one call; absent ones are nullptr and never touched (x0_out unless x̂0 is returned).
template <typename scalar_t>
struct CpuPointers {
  const scalar_t* __restrict__ x_t;
  const scalar_t* __restrict__ eps;
  const scalar_t* __restrict__ eps_uncond;
  const scalar_t* __restrict__ noise;
  scalar_t* __restrict__ x_prev;
  scalar_t* __restrict__ x0_out;
};

// One contiguous run [begin, end) of the update: W elements at a time, then the last few one by one
// with the same element function. Loads convert to fp32, the math is fp32, stores round once. The
// x0_out test is one branch per W elements, always taken the same way.
template <typename scalar_t, Mode MODE, bool GUIDED, bool CLIP, bool NOISE, int W>
C10_ALWAYS_INLINE void run_lanes(const CpuPointers<scalar_t>& p, const StepCoefs& c, int64_t begin,
                                 int64_t end) {
  using L = Lanes<scalar_t, W>;
  using F = typename VecTypes<W>::F;
  int64_t i = begin;
  for (; i + W <= end; i += W) {
    const F zero{};
    F out, x0;
    step_element<MODE, GUIDED, CLIP, NOISE>(L::load(p.x_t + i), L::load(p.eps + i),
                                            GUIDED ? L::load(p.eps_uncond + i) : zero,
                                            NOISE ? L::load(p.noise + i) : zero, c, out, x0);
    L::store(p.x_prev + i, out);
    if (p.x0_out != nullptr) {
      L::store(p.x0_out + i, x0);
    }
  }
  for (; i < end; ++i) {
    float out, x0;
    step_element<MODE, GUIDED, CLIP, NOISE>(
        static_cast<float>(p.x_t[i]), static_cast<float>(p.eps[i]),
        GUIDED ? static_cast<float>(p.eps_uncond[i]) : 0.0f,
        NOISE ? static_cast<float>(p.noise[i]) : 0.0f, c, out, x0);
    p.x_prev[i] = static_cast<scalar_t>(out);
    if (p.x0_out != nullptr) {
      p.x0_out[i] = static_cast<scalar_t>(x0);
    }
  }
}

// The loop for each x86-64 level (sampling_step.h): v4 with 16 lanes, v3 with 8, the baseline with 4;
// one 8-lane build elsewhere, which the vector unit splits as it can.
#ifdef SAMPLING_STEP_X86_LEVELS
template <typename scalar_t, Mode MODE, bool GUIDED, bool CLIP, bool NOISE>
__attribute__((target("arch=x86-64-v4"))) void run_x86_64_v4(const CpuPointers<scalar_t>& p,
                                                               const StepCoefs& c, int64_t begin,
                                                               int64_t end) {
  run_lanes<scalar_t, MODE, GUIDED, CLIP, NOISE, 16>(p, c, begin, end);
}

template <typename scalar_t, Mode MODE, bool GUIDED, bool CLIP, bool NOISE>
__attribute__((target("arch=x86-64-v3"))) void run_x86_64_v3(const CpuPointers<scalar_t>& p,
                                                               const StepCoefs& c, int64_t begin,
                                                               int64_t end) {
  run_lanes<scalar_t, MODE, GUIDED, CLIP, NOISE, 8>(p, c, begin, end);
}

#endif

template <typename scalar_t, Mode MODE, bool GUIDED, bool CLIP, bool NOISE>
void cpu_run(const CpuPointers<scalar_t>& p, const StepCoefs& c, int64_t begin, int64_t end) {
#ifdef SAMPLING_STEP_X86_LEVELS
  switch (x86_64_level()) {
    case 4:
      return run_x86_64_v4<scalar_t, MODE, GUIDED, CLIP, NOISE>(p, c, begin, end);
    case 3:
      return run_x86_64_v3<scalar_t, MODE, GUIDED, CLIP, NOISE>(p, c, begin, end);
    default:
      return run_lanes<scalar_t, MODE, GUIDED, CLIP, NOISE, 4>(p, c, begin, end);
  }
#else
  run_lanes<scalar_t, MODE, GUIDED, CLIP, NOISE, 8>(p, c, begin, end);
#endif
}

// The update with in-kernel noise: per tile of one sample (philox_normal.h), the tile's noise is made
// into a buffer that stays in L1, rounded to the storage dtype as noise.to(dtype) would be, and read
// by the same loop as a noise tensor. One pass over memory fewer than drawing the noise apart.
template <typename scalar_t, Mode MODE, bool GUIDED, bool CLIP>
void cpu_run_philox(const CpuPointers<scalar_t>& p, const StepCoefs& c, const int64_t* seeds,
                    uint64_t stream, int64_t n_samples, int64_t sample_numel) {
  constexpr int64_t kTile = philox::kTileValues;
  const int64_t tiles_per_sample = (sample_numel + kTile - 1) / kTile;
  at::parallel_for(0, n_samples * tiles_per_sample, philox::kGrainTiles, [&](int64_t begin, int64_t end) {
    float z[kTile];
    scalar_t z_stored[std::is_same_v<scalar_t, float> ? 1 : kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t sample = item / tiles_per_sample;
      const int64_t first = (item % tiles_per_sample) * kTile;
      const int64_t count = std::min(sample_numel - first, kTile);
      philox::fill_normals_cpu(static_cast<uint64_t>(seeds[sample]), stream, first / 4, count, z);
      const scalar_t* noise = nullptr;
      if constexpr (std::is_same_v<scalar_t, float>) {
        noise = z;
      } else {
        for (int64_t k = 0; k < count; ++k) z_stored[k] = static_cast<scalar_t>(z[k]);
        noise = z_stored;
      }
      const int64_t offset = sample * sample_numel + first;
      const CpuPointers<scalar_t> tile{
          p.x_t + offset, p.eps + offset, p.eps_uncond != nullptr ? p.eps_uncond + offset : nullptr,
          noise,          p.x_prev + offset, p.x0_out != nullptr ? p.x0_out + offset : nullptr};
      cpu_run<scalar_t, MODE, GUIDED, CLIP, true>(tile, c, 0, count);
    }
  });
}

template <Mode MODE>
std::tuple<at::Tensor, at::Tensor> step_cpu(const char* op, const at::Tensor& x_t,
                                            const at::Tensor& eps,
                                            const std::optional<at::Tensor>& eps_uncond,
                                            const std::optional<at::Tensor>& noise,
                                            const std::optional<at::Tensor>& noise_seeds,
                                            const std::optional<at::Tensor>& noise_stream,
                                            const StepCoefs& coefs, bool clip_x0, bool return_x0) {
  check_inputs(op, x_t, eps, eps_uncond, noise, noise_seeds, noise_stream, coefs);
  TORCH_CHECK(x_t.device().is_cpu(), op, ": the CPU kernel got a tensor on ", x_t.device());
  at::Tensor x_prev = at::empty_like(x_t);
  at::Tensor x0_pred = return_x0 ? at::empty_like(x_t) : at::empty({0}, x_t.options());
  const int64_t n = x_t.numel();
  // A zero sigma (DDPM t = 0, DDIM η = 0) adds nothing, so the noise is not even read.
  const bool use_noise = noise.has_value() && coefs.sigma != 0.0f;
  const bool philox_noise = noise_seeds.has_value() && coefs.sigma != 0.0f && n > 0;

  AT_DISPATCH_V2(x_t.scalar_type(), "sampling_step_cpu", AT_WRAP([&] {
    const CpuPointers<scalar_t> ptrs{
        x_t.const_data_ptr<scalar_t>(),
        eps.const_data_ptr<scalar_t>(),
        eps_uncond.has_value() ? eps_uncond->const_data_ptr<scalar_t>() : nullptr,
        use_noise ? noise->const_data_ptr<scalar_t>() : nullptr,
        x_prev.mutable_data_ptr<scalar_t>(),
        return_x0 ? x0_pred.mutable_data_ptr<scalar_t>() : nullptr};
    dispatch_bool(eps_uncond.has_value(), [&](auto guided) {
      dispatch_bool(clip_x0, [&](auto clip) {
        if (philox_noise) {
          return cpu_run_philox<scalar_t, MODE, decltype(guided)::value, decltype(clip)::value>(
              ptrs, coefs, noise_seeds->const_data_ptr<int64_t>(),
              static_cast<uint64_t>(noise_stream->const_data_ptr<int64_t>()[0]), x_t.size(0),
              n / x_t.size(0));
        }
        dispatch_bool(use_noise, [&](auto with_noise) {
          at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
            cpu_run<scalar_t, MODE, decltype(guided)::value, decltype(clip)::value,
                    decltype(with_noise)::value>(ptrs, coefs, begin, end);
          });
        });
      });
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {x_prev, x0_pred};
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_cpu(
    const at::Tensor& x_t, const at::Tensor& eps, const std::optional<at::Tensor>& eps_uncond,
    const std::optional<at::Tensor>& noise, double guidance_scale, double sqrt_recip_alphas_cumprod,
    double sqrt_recipm1_alphas_cumprod, double posterior_mean_coef1, double posterior_mean_coef2,
    double sigma, bool clip_x0, bool return_x0, const std::optional<at::Tensor>& noise_seeds,
    const std::optional<at::Tensor>& noise_stream) {
  const StepCoefs coefs = make_coefs(guidance_scale, sqrt_recip_alphas_cumprod,
                                     sqrt_recipm1_alphas_cumprod, posterior_mean_coef1,
                                     posterior_mean_coef2, sigma);
  return step_cpu<Mode::kDDPM>(KERNELS_OP_NAME("ddpm_step"), x_t, eps, eps_uncond, noise,
                               noise_seeds, noise_stream, coefs, clip_x0, return_x0);
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cpu(
    const at::Tensor& x_t, const at::Tensor& eps, const std::optional<at::Tensor>& eps_uncond,
    const std::optional<at::Tensor>& noise, double guidance_scale, double sqrt_recip_alphas_cumprod,
    double sqrt_recipm1_alphas_cumprod, double sqrt_alphas_cumprod_prev, double direction_coef,
    double sigma, bool clip_x0, bool return_x0, const std::optional<at::Tensor>& noise_seeds,
    const std::optional<at::Tensor>& noise_stream) {
  const StepCoefs coefs = make_coefs(guidance_scale, sqrt_recip_alphas_cumprod,
                                     sqrt_recipm1_alphas_cumprod, sqrt_alphas_cumprod_prev,
                                     direction_coef, sigma);
  return step_cpu<Mode::kDDIM>(KERNELS_OP_NAME("ddim_step"), x_t, eps, eps_uncond, noise,
                               noise_seeds, noise_stream, coefs, clip_x0, return_x0);
}

}  // namespace

#ifdef SAMPLING_STEP_X86_LEVELS
int x86_64_level() {
  static const int level = [] {
    const int supported = __builtin_cpu_supports("x86-64-v4")   ? 4
                          : __builtin_cpu_supports("x86-64-v3") ? 3
                                                                : 1;
    // KERNELS_X86_64_LEVEL=0|1|3 caps the level, so the narrower builds can be tested on any CPU;
    // 0 runs the baseline step and the noise's scalar code, the GPU kernel's instantiation.
    const char* cap = std::getenv("KERNELS_X86_64_LEVEL");
    return cap != nullptr && cap[0] != '\0' ? std::clamp(std::atoi(cap), 0, supported) : supported;
  }();
  return level;
}
#endif

KERNELS_LIBRARY(KERNELS_OP_NAMESPACE, m) {
  // Both ops return (x_prev, x0_pred); x0_pred is an empty [0] tensor unless return_x0 is true.
  // noise_seeds [N] and noise_stream draw z in-kernel (philox_normal's values) instead of reading noise.
  m.def(
      "ddpm_step(Tensor x_t, Tensor eps, Tensor? eps_uncond, Tensor? noise, float guidance_scale, "
      "float sqrt_recip_alphas_cumprod, float sqrt_recipm1_alphas_cumprod, "
      "float posterior_mean_coef1, float posterior_mean_coef2, float sigma, bool clip_x0, "
      "bool return_x0, Tensor? noise_seeds=None, Tensor? noise_stream=None) -> (Tensor, Tensor)");
  m.def(
      "ddim_step(Tensor x_t, Tensor eps, Tensor? eps_uncond, Tensor? noise, float guidance_scale, "
      "float sqrt_recip_alphas_cumprod, float sqrt_recipm1_alphas_cumprod, "
      "float sqrt_alphas_cumprod_prev, float direction_coef, float sigma, bool clip_x0, "
      "bool return_x0, Tensor? noise_seeds=None, Tensor? noise_stream=None) -> (Tensor, Tensor)");
}

KERNELS_LIBRARY_IMPL(KERNELS_OP_NAMESPACE, CPU, m) {
  m.impl("ddpm_step", &ddpm_step_cpu);
  m.impl("ddim_step", &ddim_step_cpu);
}

}  // namespace sampling_step

// Importing the module (kernels.sampling_step._C) loads the library, which runs the registrations
// above; the module itself only says whether the CUDA kernels were compiled in.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused DDPM/DDIM sampling update; the ops live in torch.ops." KERNELS_STRINGIFY(KERNELS_OP_NAMESPACE);
#ifdef SAMPLING_STEP_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
