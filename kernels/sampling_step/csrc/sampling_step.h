// The fused sampler update: the per-element math shared by the CPU and the CUDA implementations.
//
// One pass reads x_t, ε_c (and ε_u, z when given) and writes x_prev (and x̂0 when asked), with fp32
// arithmetic whatever the storage dtype. The scalar coefficients arrive already gathered from the
// float64 schedule on the host (shared/diffusion/coefficients.py) and rounded to fp32 once.
//
// Notation (paper symbol → StepCoefs field), t the current step, s the next one (t−1 or t_prev):
//
//   w                       guidance_scale       ε̃ = ε_u + w·(ε_c − ε_u)   (Ho & Salimans 2022, Eq. 6)
//   √(1/ᾱ_t)                x0_coef_xt           x̂0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε̃
//   √(1/ᾱ_t − 1)            x0_coef_eps              (DDPM Eq. 15, solved for x0)
//   DDPM: posterior_mean_coef1   out_coef_x0     μ̃ = coef1·x̂0 + coef2·x_t           (DDPM Eq. 7)
//   DDPM: posterior_mean_coef2   out_coef_rest   x_{t−1} = μ̃ + σ_t·z                (DDPM Alg. 2)
//   DDIM: √ᾱ_s                   out_coef_x0     x_s = √ᾱ_s·x̂0 + √(1−ᾱ_s−σ²)·ε̃ + σ·z (DDIM Eq. 12)
//   DDIM: √(1 − ᾱ_s − σ²)        out_coef_rest
//   σ                       sigma                0 at DDPM t = 0; DDIM Eq. 16 times η
//
// With clipping, x̂0 is clamped to [−1, 1]; DDIM then recomputes ε̃ from the clipped x̂0 so that the
// direction term points at the image actually predicted: ε̃ = (√(1/ᾱ_t)·x_t − x̂0) / √(1/ᾱ_t − 1).
#pragma once

#include <c10/macros/Macros.h>

// The torch.library namespace, given by the build (kernels/build.py: OP_NAMESPACE) so that Python
// and C++ name it once. TORCH_LIBRARY pastes its argument, so it is expanded through one more macro.
#ifndef KERNELS_OP_NAMESPACE
#error "KERNELS_OP_NAMESPACE is not defined; build through kernels/build.py (setup.py or the JIT path)"
#endif
#define KERNELS_STRINGIFY_(x) #x
#define KERNELS_STRINGIFY(x) KERNELS_STRINGIFY_(x)
#define KERNELS_OP_NAME(op) KERNELS_STRINGIFY(KERNELS_OP_NAMESPACE) "::" op
#define KERNELS_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define KERNELS_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

#include <type_traits>

namespace sampling_step {

enum class Mode { kDDPM, kDDIM };

// Per-step scalars, one set for the whole batch (the samplers use a single t per step).
struct StepCoefs {
  float guidance_scale;
  float x0_coef_xt;
  float x0_coef_eps;
  float out_coef_x0;
  float out_coef_rest;
  float sigma;
};

// The op's float64 scalars (the schema's `float`), rounded to fp32 once for the kernels.
inline StepCoefs make_coefs(double guidance_scale, double x0_coef_xt, double x0_coef_eps,
                            double out_coef_x0, double out_coef_rest, double sigma) {
  return StepCoefs{static_cast<float>(guidance_scale), static_cast<float>(x0_coef_xt),
                   static_cast<float>(x0_coef_eps),    static_cast<float>(out_coef_x0),
                   static_cast<float>(out_coef_rest),  static_cast<float>(sigma)};
}

// x̂0 clamped to [−1, 1] as two selects (NaN stays NaN, as torch.clamp): host compilers and nvcc emit
// min/max instructions for it, never a branch.
C10_HOST_DEVICE C10_ALWAYS_INLINE float clamp_unit(float x) {
  x = x < -1.0f ? -1.0f : x;
  x = x > 1.0f ? 1.0f : x;
  return x;
}

#if !defined(__CUDACC__)
// The CPU loops are compiled for three x86-64 levels — v4 (AVX-512), v3 (AVX2, FMA, F16C) and the
// baseline (SSE2) — and the widest the CPU supports runs, so the module stays portable and uses the
// wide registers where they exist. Other compilers and CPUs get one build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define SAMPLING_STEP_X86_LEVELS 1
// 4, 3 or 1: the x86-64 level of this CPU, asked once (sampling_step.cpp); 0 when a test asks for
// the scalar noise code.
int x86_64_level();
#endif

// The CPU loop works on W lanes at a time through a GCC/Clang vector type, W the width of the
// registers of the function being compiled (16 with AVX-512, 8 with AVX2, 4 with SSE2): every
// operation, comparisons included, then maps to one instruction, and a select is a blend, never a
// branch. (A vector wider than the registers gets its comparisons split into scalar ones.)
template <int W>
struct VecOf {
  typedef float type __attribute__((vector_size(W * sizeof(float))));
};

template <typename V>
C10_ALWAYS_INLINE V clamp_unit(V x) {
  const V lo = V{} - 1.0f;
  const V hi = V{} + 1.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  return x;
}
#endif

// The update for one value (V = float, on the GPU and for the CPU tail) or W values (V = VecOf<W>::type).
// Every flag is a template parameter so the loops carry no per-element branch on the mode, and absent
// inputs (ε_u, z) are never read. The operations and their order are those of the eager reference
// (shared.diffusion.steps.ddpm_update / ddim_update), each rounded separately (no FMA contraction: build flags), so
// fp32 results equal the eager step's.
template <Mode MODE, bool GUIDED, bool CLIP, bool NOISE, typename V>
C10_HOST_DEVICE C10_ALWAYS_INLINE void step_element(V x_t, V eps_cond, V eps_uncond, V noise,
                                                    const StepCoefs& c, V& x_prev, V& x0_pred) {
  V eps = eps_cond;
  if constexpr (GUIDED) {
    eps = eps_uncond + c.guidance_scale * (eps_cond - eps_uncond);
  }
  V x0 = c.x0_coef_xt * x_t - c.x0_coef_eps * eps;
  if constexpr (CLIP) {
    x0 = clamp_unit(x0);
  }
  V out;
  if constexpr (MODE == Mode::kDDPM) {
    out = c.out_coef_x0 * x0 + c.out_coef_rest * x_t;
  } else {
    if constexpr (CLIP) {
      eps = (c.x0_coef_xt * x_t - x0) / c.x0_coef_eps;
    }
    out = c.out_coef_x0 * x0 + c.out_coef_rest * eps;
  }
  if constexpr (NOISE) {
    out = out + c.sigma * noise;
  }
  x_prev = out;
  x0_pred = x0;
}

// Turns a run-time bool into a compile-time one: f(std::true_type{}) or f(std::false_type{}).
template <typename F>
inline void dispatch_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace sampling_step

#include <ATen/core/Tensor.h>

#include <optional>

namespace sampling_step {

// Validates the op's inputs (shapes, dtypes, devices, contiguity, coefficients) with TORCH_CHECK, so
// a bad call becomes one clear Python RuntimeError. Shared by both backends; defined in the .cpp.
// noise_seeds [N] and noise_stream (one element) ask for in-kernel noise instead of a noise tensor:
// z of sample n is philox_normal(noise_seeds[n], noise_stream), rounded to x_t's dtype.
void check_inputs(const char* op, const at::Tensor& x_t, const at::Tensor& eps,
                  const std::optional<at::Tensor>& eps_uncond, const std::optional<at::Tensor>& noise,
                  const std::optional<at::Tensor>& noise_seeds,
                  const std::optional<at::Tensor>& noise_stream, const StepCoefs& coefs);

}  // namespace sampling_step
