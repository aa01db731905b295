// Per-sample normal noise from Philox4x32-10: the math shared by the CPU and the CUDA kernels.
//
// Sample i with seed s, stream k (x_T is stream 0, sampler step j draws stream j + 1):
//
//   key     (k0, k1)         = (s mod 2³², ⌊s / 2³²⌋ mod 2³²)
//   counter (c0, c1, c2, c3) = (b, 0, k, 0)             block b of the sample
//   words   (w0, w1, w2, w3) = Philox4x32-10(counter, key)  (Salmon et al. 2011, Sec. 3.2)
//   u       = ((w >> 9)·2 + 1)·2⁻²⁴ ∈ (0, 1)               exact in float64
//   (z0, z1) = Box-Muller(u(w0), u(w1)),  (z2, z3) = Box-Muller(u(w2), u(w3))
//   Box-Muller: z = √(−2 ln u1)·(cos 2πu2, sin 2πu2) in float64, rounded once to float32
//
// Element 4b + m of a sample (row-major) is z_m of block b. The eager reference is
// kernels/sampling_step/philox_reference.py.
//
// Every function here is written once for a scalar (the GPU: one thread per block of 4 outputs) and
// for GCC vector types of W lanes (the CPU: W blocks at a time, one 64-bit lane per block). The
// transcendental functions are our own, from + − × ÷ √ only, which IEEE 754 rounds the same on both
// (no FMA contraction: -ffp-contract=off, --fmad=false): the CPU and the CUDA op give bitwise equal
// noise. Against the eager reference (which uses the library's log, cos and sin) they differ by a
// few float64 ulps before the one rounding to float32, i.e. bitwise equal but for the rare value
// within a few float64 ulps of a float32 rounding boundary, which then differs by one float32 ulp.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace philox {

// Philox4x32 round constants (Salmon et al. 2011, Sec. 3.2; Random123's philox.h).
constexpr uint64_t kM0 = 0xD2511F53u;  // multipliers
constexpr uint64_t kM1 = 0xCD9E8D57u;
constexpr uint64_t kW0 = 0x9E3779B9u;  // key schedule: golden ratio and √3 − 1, as 32-bit fractions
constexpr uint64_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;
constexpr uint64_t kMask32 = 0xFFFFFFFFu;
constexpr int kUniformBits = 23;  // u from the top 23 bits of a word: (2m + 1)·2⁻²⁴

// The float64 bit pattern of 2⁵² (and of 1.5·2⁵²): adding an integer below 2⁵¹ to it and
// subtracting it back converts that integer exactly, with integer and float add only (what every
// vector width has; AVX2 has no int64 → double conversion).
constexpr uint64_t kTwo52Bits = 0x4330000000000000ull;
constexpr uint64_t kOneHalfTwo52Bits = 0x4338000000000000ull;
constexpr double kTwo52 = 4503599627370496.0;
constexpr double kOneHalfTwo52 = 6755399441055744.0;
constexpr double kTwoPi = 6.283185307179586;  // 2π rounded to float64, the reference's 2.0 * math.pi

// ln 2 = kLn2Hi + kLn2Lo, the high part with 32 significant bits (21 trailing zeros), so e·kLn2Hi is
// exact for |e| < 2²¹ (the split of fdlibm's e_log.c).
constexpr double kLn2Hi = 6.93147180369123816490e-01;
constexpr double kLn2Lo = 1.90821492927058770002e-10;
constexpr double kSqrtHalf = 0.70710678118654752440;

// Same-width reinterpretation (uint64 lanes ↔ float64 lanes).
template <typename To, typename From>
C10_HOST_DEVICE C10_ALWAYS_INLINE To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  memcpy(&to, &from, sizeof(to));
  return to;
}

// The (hi, lo) 32-bit words of a·m, a < 2³² in a 64-bit lane: the product fits 64 bits exactly.
template <typename U>
C10_HOST_DEVICE C10_ALWAYS_INLINE void mulhilo(U a, uint64_t m, U& hi, U& lo) {
  const U product = a * m;
  hi = product >> 32;
  lo = product & kMask32;
}

#if !defined(__CUDACC__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
// On the x86-64 builds (philox_normal.cpp: 8 lanes with AVX-512, 4 with AVX2, 2 with SSE2) GCC
// multiplies 64-bit lanes with vpmullq (3 µops) even when both factors fit 32 bits, and intrinsics
// cannot be inlined into these target-neutral templates; (v)pmuludq, the 32 × 32 → 64 multiply
// Philox needs, goes in as one instruction. The 8- and 4-lane forms are only instantiated inside
// functions built for AVX-512 and AVX2.
typedef uint64_t U64x8 __attribute__((vector_size(64)));
typedef uint64_t U64x4 __attribute__((vector_size(32)));
typedef uint64_t U64x2 __attribute__((vector_size(16)));

template <typename V>
C10_ALWAYS_INLINE void mulhilo_x86(V a, uint64_t m, V& hi, V& lo) {
  V product = V{} + m;
  if constexpr (sizeof(V) == 16) {
    asm("pmuludq %1, %0" : "+x"(product) : "x"(a));
  } else {
    asm("vpmuludq %1, %0, %0" : "+v"(product) : "v"(a));
  }
  hi = product >> 32;
  lo = product & kMask32;
}

C10_ALWAYS_INLINE void mulhilo(U64x8 a, uint64_t m, U64x8& hi, U64x8& lo) { mulhilo_x86(a, m, hi, lo); }
C10_ALWAYS_INLINE void mulhilo(U64x4 a, uint64_t m, U64x4& hi, U64x4& lo) { mulhilo_x86(a, m, hi, lo); }
C10_ALWAYS_INLINE void mulhilo(U64x2 a, uint64_t m, U64x2& hi, U64x2& lo) { mulhilo_x86(a, m, hi, lo); }
#endif

// Philox4x32-10 on 64-bit lanes holding 32-bit words (U = uint64_t or a vector of them).
template <typename U>
C10_HOST_DEVICE C10_ALWAYS_INLINE void philox4x32_10(U& c0, U& c1, U& c2, U& c3, U k0, U k1) {
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    if (r > 0) {  // the key is bumped before every round but the first
      k0 = (k0 + kW0) & kMask32;
      k1 = (k1 + kW1) & kMask32;
    }
    U hi0, lo0, hi1, lo1;
    mulhilo(c0, kM0, hi0, lo0);
    mulhilo(c2, kM1, hi1, lo1);
    const U next0 = hi1 ^ c1 ^ k0;
    const U next2 = hi0 ^ c3 ^ k1;
    c0 = next0;
    c1 = lo1;
    c2 = next2;
    c3 = lo0;
  }
}

// ln u for u = k·2⁻²⁴, k the odd integer of a word (1 ≤ k < 2²⁴): ln u = e·ln 2 + ln f with
// k·2⁻²⁴ = 2ᵉ·f, f ∈ [√½, √2), and ln f = 2 atanh s = 2(s + s³/3 + s⁵/5 + …), s = (f − 1)/(f + 1),
// |s| ≤ 0.172 so ten terms reach float64 precision (the next is < 3·10⁻¹⁷ relative).
template <typename U, typename D>
C10_HOST_DEVICE C10_ALWAYS_INLINE D log_of_odd(U k) {
  const D x = bit_cast<D>(k | kTwo52Bits) - kTwo52;        // k as a float64, exactly
  const U bits = bit_cast<U>(x);
  U biased_exponent = bits >> 52;
  D f = bit_cast<D>((bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);  // [1, 2)
  const auto big = f > kSqrtHalf * 2.0;
  f = big ? f * 0.5 : f;
  biased_exponent = biased_exponent + (big ? U{} + 1 : U{});
  // e = biased − 1023 − 24 ∈ [−24, 0], as a float64 through the 1.5·2⁵² offset (negative e wraps).
  const D e = bit_cast<D>(biased_exponent - (1023 + 24) + kOneHalfTwo52Bits) - kOneHalfTwo52;
  const D s = (f - 1.0) / (f + 1.0);
  const D s2 = s * s;
  D series = D{} + 1.0 / 21.0;
  series = series * s2 + 1.0 / 19.0;
  series = series * s2 + 1.0 / 17.0;
  series = series * s2 + 1.0 / 15.0;
  series = series * s2 + 1.0 / 13.0;
  series = series * s2 + 1.0 / 11.0;
  series = series * s2 + 1.0 / 9.0;
  series = series * s2 + 1.0 / 7.0;
  series = series * s2 + 1.0 / 5.0;
  series = series * s2 + 1.0 / 3.0;
  const D log_f = 2.0 * s + 2.0 * s * (s2 * series);
  return e * kLn2Hi + (log_f + e * kLn2Lo);
}

// (cos 2πu, sin 2πu) for u = k·2⁻²⁴: the quadrant q = round(4u) comes off exactly in integers,
// r = 2π(u − q/4) ∈ [−π/4, π/4], and sin r, cos r are their Taylor series to r¹⁵ / r¹⁶ (the next
// terms are < 5·10⁻¹⁷). Then (cos, sin) is rotated by q quarter turns.
template <typename U, typename D>
C10_HOST_DEVICE C10_ALWAYS_INLINE void cos_sin_turns(U k, D& cos_out, D& sin_out) {
  constexpr uint64_t kQuarter = uint64_t{1} << 22;  // a quarter turn in units of 2⁻²⁴
  const U q = (k + kQuarter / 2) >> 22;             // 0 … 4
  const U offset = k - (q << 22);                   // in [−2²¹, 2²¹], negative values wrapped
  const D t = bit_cast<D>(offset + kOneHalfTwo52Bits) - kOneHalfTwo52;
  const D r = kTwoPi * (t * (1.0 / 16777216.0));
  const D r2 = r * r;
  D sin_poly = D{} - 1.0 / 1307674368000.0;              // −1/15!
  sin_poly = sin_poly * r2 + 1.0 / 6227020800.0;     // 1/13!
  sin_poly = sin_poly * r2 - 1.0 / 39916800.0;       // 1/11!
  sin_poly = sin_poly * r2 + 1.0 / 362880.0;         // 1/9!
  sin_poly = sin_poly * r2 - 1.0 / 5040.0;
  sin_poly = sin_poly * r2 + 1.0 / 120.0;
  sin_poly = sin_poly * r2 - 1.0 / 6.0;
  const D sin_r = r + r * (r2 * sin_poly);
  D cos_poly = D{} + 1.0 / 20922789888000.0;              // 1/16!
  cos_poly = cos_poly * r2 - 1.0 / 87178291200.0;    // 1/14!
  cos_poly = cos_poly * r2 + 1.0 / 479001600.0;      // 1/12!
  cos_poly = cos_poly * r2 - 1.0 / 3628800.0;        // 1/10!
  cos_poly = cos_poly * r2 + 1.0 / 40320.0;
  cos_poly = cos_poly * r2 - 1.0 / 720.0;
  cos_poly = cos_poly * r2 + 1.0 / 24.0;
  cos_poly = cos_poly * r2 - 0.5;
  const D cos_r = 1.0 + r2 * cos_poly;
  const auto odd = (q & 1) != 0;   // a quarter or three quarters: cos and sin swap
  const auto back = (q & 2) != 0;  // a half turn or more: both change sign...
  const auto up = ((q + 1) & 2) != 0;  // ...cos in quadrants 1 and 2, sin in quadrants 2 and 3
  const D c = odd ? sin_r : cos_r;
  const D s = odd ? cos_r : sin_r;
  cos_out = up ? -c : c;
  sin_out = back ? -s : s;
}

// √x on every lane: the hardware's correctly rounded square root (vsqrtpd on the CPU, with
// -fno-math-errno so the lane loop vectorises; sqrt on the GPU).
C10_HOST_DEVICE C10_ALWAYS_INLINE double sqrt_lanes(double x) { return ::sqrt(x); }
#if !defined(__CUDACC__)
template <typename D>
C10_ALWAYS_INLINE D sqrt_lanes(D x) {
  for (int i = 0; i < static_cast<int>(sizeof(D) / sizeof(double)); ++i) {
    x[i] = __builtin_sqrt(x[i]);
  }
  return x;
}
#endif

// Two words → two N(0, 1) in float64 (Box & Muller 1958).
template <typename U, typename D>
C10_HOST_DEVICE C10_ALWAYS_INLINE void box_muller(U w0, U w1, D& z0, D& z1) {
  const U k0 = ((w0 >> (32 - kUniformBits)) << 1) | 1;
  const U k1 = ((w1 >> (32 - kUniformBits)) << 1) | 1;
  const D radius = sqrt_lanes(-2.0 * log_of_odd<U, D>(k0));
  D c, s;
  cos_sin_turns<U, D>(k1, c, s);
  z0 = radius * c;
  z1 = radius * s;
}

// The 4 normals (float64) of block `block` of (seed, stream); U, D: matching scalar or vector types.
template <typename U, typename D>
C10_HOST_DEVICE C10_ALWAYS_INLINE void normals(uint64_t seed, uint64_t stream, U block, D& z0, D& z1,
                                               D& z2, D& z3) {
  U c0 = block, c1 = U{} + 0, c2 = U{} + (stream & kMask32), c3 = U{} + 0;
  philox4x32_10(c0, c1, c2, c3, U{} + (seed & kMask32), U{} + ((seed >> 32) & kMask32));
  box_muller<U, D>(c0, c1, z0, z1);
  box_muller<U, D>(c2, c3, z2, z3);
}

#if !defined(__CUDACC__)
// The CPU's vectors of W lanes: one Philox block per 64-bit lane.
template <int W>
struct Lanes {
  typedef uint64_t U __attribute__((vector_size(W * sizeof(uint64_t))));
  typedef double D __attribute__((vector_size(W * sizeof(double))));
  typedef float F __attribute__((vector_size(W * sizeof(float))));
};

// Normals [4·first_block, 4·first_block + count) of (seed, stream) into out[0, count), float32, W
// blocks (4·W values) at a time. A last group cut short is computed whole and stored in part, so
// every value comes from the same code whatever the batch, the tile or the count.
template <int W>
C10_ALWAYS_INLINE void fill_normals(uint64_t seed, uint64_t stream, int64_t first_block, int64_t count,
                                    float* out) {
  using L = Lanes<W>;
  typename L::U block;
  for (int j = 0; j < W; ++j) block[j] = static_cast<uint64_t>(first_block + j);
  for (int64_t done = 0; done < count; done += 4 * W) {
    typename L::D z[4];
    normals<typename L::U, typename L::D>(seed, stream, block, z[0], z[1], z[2], z[3]);
    block += W;
    typename L::F f[4];
    for (int m = 0; m < 4; ++m) f[m] = __builtin_convertvector(z[m], typename L::F);
    float interleaved[4 * W];  // element 4j + m is z_m of block j
    for (int j = 0; j < W; ++j) {
      for (int m = 0; m < 4; ++m) interleaved[4 * j + m] = f[m][j];
    }
    const int64_t n = count - done < 4 * W ? count - done : 4 * W;
    if (n == 4 * W) {
      memcpy(out + done, interleaved, sizeof(interleaved));
    } else {
      memcpy(out + done, interleaved, static_cast<size_t>(n) * sizeof(float));
    }
  }
}
#endif

}  // namespace philox
