// The fused sampler update: op schemas, input checks, the CPU implementation, the module init.
//
// Schemas are declared once here (TORCH_LIBRARY); each backend registers its implementation with
// TORCH_LIBRARY_IMPL (CPU below, CUDA in cuda/sampling_step.cu). The Python wrappers, the fake
// kernels for torch.compile are in kernels/sampling_step/op.py, the float64 coefficient math in
// kernels/sampling_step/coefficients.py.
#include "sampling_step.h"

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
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
                  const StepCoefs& coefs) {
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
  const float all[] = {coefs.guidance_scale, coefs.x0_coef_xt, coefs.x0_coef_eps,
                       coefs.out_coef_x0,    coefs.out_coef_rest, coefs.sigma};
  for (float value : all) {
    TORCH_CHECK(std::isfinite(value), op, ": every scalar coefficient must be finite, got ", value);
  }
  TORCH_CHECK(coefs.sigma >= 0.0f, op, ": sigma must be >= 0, got ", coefs.sigma);
  TORCH_CHECK(coefs.x0_coef_eps > 0.0f, op, ": sqrt_recipm1_alphas_cumprod must be > 0, got ",
              coefs.x0_coef_eps);
  TORCH_CHECK(coefs.sigma == 0.0f || noise.has_value(), op,
              ": noise is required when sigma > 0 (DDPM at t > 0, DDIM with eta > 0), got none");
}

namespace {

// Each hot loop is compiled three times, for AVX-512 (x86-64-v4), AVX2 + FMA + F16C (x86-64-v3) and
// the baseline, and the loader picks the best one the CPU has (GCC function multi-versioning, an ifunc
// resolved once at load): the module stays portable and uses the wide registers where they exist.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define SAMPLING_STEP_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SAMPLING_STEP_CPU_CLONES
#endif

// kLanes values of storage type scalar_t to and from a VecF of fp32, without a per-element branch.
template <typename scalar_t>
struct Lanes;

template <>
struct Lanes<float> {
  static C10_ALWAYS_INLINE VecF load(const float* p) {
    VecF v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static C10_ALWAYS_INLINE void store(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }
};

typedef uint16_t VecU16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t VecU32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// bfloat16 is the upper half of an fp32: widening is a shift, narrowing rounds to nearest even with
// NaN kept quiet, bit for bit as c10::BFloat16(float) does.
template <>
struct Lanes<c10::BFloat16> {
  static C10_ALWAYS_INLINE VecF load(const c10::BFloat16* p) {
    VecU16 h;
    std::memcpy(&h, p, sizeof(h));
    const VecU32 bits = __builtin_convertvector(h, VecU32) << 16;
    VecF v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  }
  static C10_ALWAYS_INLINE void store(c10::BFloat16* p, VecF v) {
    VecU32 bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const VecU32 rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
    const VecU32 quiet_nan = VecU32{} + 0x7FC0u;
    const VecU32 out = v != v ? quiet_nan : rounded;
    const VecU16 h = __builtin_convertvector(out, VecU16);
    std::memcpy(p, &h, sizeof(h));
  }
};

// float16 through the compiler's _Float16, whose vector conversions become vcvtph2ps / vcvtps2ph
// where F16C exists (the x86-64-v3 and v4 clones) and correctly rounded library calls elsewhere;
// compilers without _Float16 convert lane by lane through c10::Half (same values).
template <>
struct Lanes<c10::Half> {
#if defined(__FLT16_MAX__)
  typedef _Float16 VecH __attribute__((vector_size(kLanes * sizeof(_Float16))));
  static C10_ALWAYS_INLINE VecF load(const c10::Half* p) {
    VecH h;
    std::memcpy(&h, p, sizeof(h));
    return __builtin_convertvector(h, VecF);
  }
  static C10_ALWAYS_INLINE void store(c10::Half* p, VecF v) {
    const VecH h = __builtin_convertvector(v, VecH);
    std::memcpy(p, &h, sizeof(h));
  }
#else
  static C10_ALWAYS_INLINE VecF load(const c10::Half* p) {
    VecF v;
    for (int k = 0; k < kLanes; ++k) v[k] = static_cast<float>(p[k]);
    return v;
  }
  static C10_ALWAYS_INLINE void store(c10::Half* p, VecF v) {
    for (int k = 0; k < kLanes; ++k) p[k] = static_cast<c10::Half>(v[k]);
  }
#endif
};

// One contiguous run [begin, end) of the update: kLanes elements at a time through VecF, then the
// last few one by one with the same element function. Loads convert to fp32, the math is fp32,
// stores round once. x0_out is nullptr unless x̂0 is returned (a branch per kLanes elements that is
// always taken the same way).
template <typename scalar_t, Mode MODE, bool GUIDED, bool CLIP, bool NOISE>
SAMPLING_STEP_CPU_CLONES void cpu_run(const scalar_t* __restrict__ x_t,
                                      const scalar_t* __restrict__ eps,
                                      const scalar_t* __restrict__ eps_uncond,
                                      const scalar_t* __restrict__ noise,
                                      scalar_t* __restrict__ x_prev, scalar_t* __restrict__ x0_out,
                                      const StepCoefs c, int64_t begin, int64_t end) {
  using L = Lanes<scalar_t>;
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    const VecF zero{};
    VecF out, x0;
    step_element<MODE, GUIDED, CLIP, NOISE>(L::load(x_t + i), L::load(eps + i),
                                            GUIDED ? L::load(eps_uncond + i) : zero,
                                            NOISE ? L::load(noise + i) : zero, c, out, x0);
    L::store(x_prev + i, out);
    if (x0_out != nullptr) {
      L::store(x0_out + i, x0);
    }
  }
  for (; i < end; ++i) {
    float out, x0;
    step_element<MODE, GUIDED, CLIP, NOISE>(
        static_cast<float>(x_t[i]), static_cast<float>(eps[i]),
        GUIDED ? static_cast<float>(eps_uncond[i]) : 0.0f, NOISE ? static_cast<float>(noise[i]) : 0.0f,
        c, out, x0);
    x_prev[i] = static_cast<scalar_t>(out);
    if (x0_out != nullptr) {
      x0_out[i] = static_cast<scalar_t>(x0);
    }
  }
}

template <Mode MODE>
std::tuple<at::Tensor, at::Tensor> step_cpu(const char* op, const at::Tensor& x_t,
                                            const at::Tensor& eps,
                                            const std::optional<at::Tensor>& eps_uncond,
                                            const std::optional<at::Tensor>& noise,
                                            const StepCoefs& coefs, bool clip_x0, bool return_x0) {
  check_inputs(op, x_t, eps, eps_uncond, noise, coefs);
  TORCH_CHECK(x_t.device().is_cpu(), op, ": the CPU kernel got a tensor on ", x_t.device());
  at::Tensor x_prev = at::empty_like(x_t);
  at::Tensor x0_pred = return_x0 ? at::empty_like(x_t) : at::empty({0}, x_t.options());
  const int64_t n = x_t.numel();
  // A zero sigma (DDPM t = 0, DDIM η = 0) adds nothing, so the noise is not even read.
  const bool use_noise = noise.has_value() && coefs.sigma != 0.0f;

  AT_DISPATCH_V2(x_t.scalar_type(), "sampling_step_cpu", AT_WRAP([&] {
    const scalar_t* x_ptr = x_t.const_data_ptr<scalar_t>();
    const scalar_t* eps_ptr = eps.const_data_ptr<scalar_t>();
    const scalar_t* eps_u_ptr = eps_uncond.has_value() ? eps_uncond->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* noise_ptr = use_noise ? noise->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_ptr = x_prev.mutable_data_ptr<scalar_t>();
    scalar_t* x0_ptr = return_x0 ? x0_pred.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_bool(eps_uncond.has_value(), [&](auto guided) {
      dispatch_bool(clip_x0, [&](auto clip) {
        dispatch_bool(use_noise, [&](auto with_noise) {
          at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
            cpu_run<scalar_t, MODE, decltype(guided)::value, decltype(clip)::value,
                    decltype(with_noise)::value>(x_ptr, eps_ptr, eps_u_ptr, noise_ptr, out_ptr, x0_ptr,
                                                 coefs, begin, end);
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
    double sigma, bool clip_x0, bool return_x0) {
  const StepCoefs coefs = make_coefs(guidance_scale, sqrt_recip_alphas_cumprod,
                                     sqrt_recipm1_alphas_cumprod, posterior_mean_coef1,
                                     posterior_mean_coef2, sigma);
  return step_cpu<Mode::kDDPM>(KERNELS_OP_NAME("ddpm_step"), x_t, eps, eps_uncond, noise, coefs,
                               clip_x0, return_x0);
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cpu(
    const at::Tensor& x_t, const at::Tensor& eps, const std::optional<at::Tensor>& eps_uncond,
    const std::optional<at::Tensor>& noise, double guidance_scale, double sqrt_recip_alphas_cumprod,
    double sqrt_recipm1_alphas_cumprod, double sqrt_alphas_cumprod_prev, double direction_coef,
    double sigma, bool clip_x0, bool return_x0) {
  const StepCoefs coefs = make_coefs(guidance_scale, sqrt_recip_alphas_cumprod,
                                     sqrt_recipm1_alphas_cumprod, sqrt_alphas_cumprod_prev,
                                     direction_coef, sigma);
  return step_cpu<Mode::kDDIM>(KERNELS_OP_NAME("ddim_step"), x_t, eps, eps_uncond, noise, coefs,
                               clip_x0, return_x0);
}

}  // namespace

KERNELS_LIBRARY(KERNELS_OP_NAMESPACE, m) {
  // Both ops return (x_prev, x0_pred); x0_pred is an empty [0] tensor unless return_x0 is true.
  m.def(
      "ddpm_step(Tensor x_t, Tensor eps, Tensor? eps_uncond, Tensor? noise, float guidance_scale, "
      "float sqrt_recip_alphas_cumprod, float sqrt_recipm1_alphas_cumprod, "
      "float posterior_mean_coef1, float posterior_mean_coef2, float sigma, bool clip_x0, "
      "bool return_x0) -> (Tensor, Tensor)");
  m.def(
      "ddim_step(Tensor x_t, Tensor eps, Tensor? eps_uncond, Tensor? noise, float guidance_scale, "
      "float sqrt_recip_alphas_cumprod, float sqrt_recipm1_alphas_cumprod, "
      "float sqrt_alphas_cumprod_prev, float direction_coef, float sigma, bool clip_x0, "
      "bool return_x0) -> (Tensor, Tensor)");
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
