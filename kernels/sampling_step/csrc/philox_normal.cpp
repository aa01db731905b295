// Per-sample normal noise (Philox4x32-10 + Box-Muller, philox.h): the op schema, its checks and the
// CPU kernel. The CUDA kernel is in cuda/philox_normal.cu; the eager reference, the Python wrapper
// and the fake kernel are in kernels/sampling_step/philox_reference.py and philox_op.py.
#include "philox.h"
#include "philox_normal.h"
#include "sampling_step.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace philox {

void check_seeds_and_stream(const char* op, const at::Tensor& seeds, const at::Tensor& stream) {
  TORCH_CHECK(seeds.dim() == 1, op, ": seeds must be a 1-d tensor [N], got shape ", seeds.sizes());
  TORCH_CHECK(seeds.scalar_type() == at::kLong, op, ": seeds must be int64, got ",
              seeds.scalar_type());
  TORCH_CHECK(seeds.is_contiguous(), op, ": seeds must be contiguous");
  TORCH_CHECK(stream.numel() == 1 && stream.dim() <= 1, op,
              ": stream must be a tensor of one element (0-d or [1]), got shape ", stream.sizes());
  TORCH_CHECK(stream.scalar_type() == at::kLong, op, ": stream must be int64, got ",
              stream.scalar_type());
  TORCH_CHECK(stream.device() == seeds.device(), op, ": stream is on ", stream.device(),
              " but seeds are on ", seeds.device(), "; they must be on the same device");
}

int64_t checked_sample_numel(const char* op, c10::IntArrayRef sample_shape) {
  int64_t numel = 1;
  for (const int64_t size : sample_shape) {
    TORCH_CHECK(size >= 0, op, ": sample_shape must hold sizes >= 0, got ", sample_shape);
    numel *= size;
  }
  TORCH_CHECK(numel <= kMaxSampleNumel, op, ": ", numel,
              " elements per sample exceed the generator's 2^34 per stream");
  return numel;
}

std::vector<int64_t> output_shape(int64_t n, c10::IntArrayRef sample_shape) {
  std::vector<int64_t> shape{n};
  shape.insert(shape.end(), sample_shape.begin(), sample_shape.end());
  return shape;
}

namespace {

using FillFn = void (*)(uint64_t, uint64_t, int64_t, int64_t, float*);

template <int W>
void fill_generic(uint64_t seed, uint64_t stream, int64_t first_block, int64_t count, float* out) {
  fill_normals<W>(seed, stream, first_block, count, out);
}

// One block at a time through the scalar instantiation, the one the CUDA kernel runs: tests compare it
// with the vector builds (KERNELS_X86_64_LEVEL=0), the nearest a CPU gets to checking the GPU's bits.
void fill_scalar(uint64_t seed, uint64_t stream, int64_t first_block, int64_t count, float* out) {
  for (int64_t done = 0; done < count; done += 4) {
    double z[4];
    normals<uint64_t, double>(seed, stream, static_cast<uint64_t>(first_block + done / 4), z[0], z[1],
                              z[2], z[3]);
    for (int m = 0; m < 4 && done + m < count; ++m) out[done + m] = static_cast<float>(z[m]);
  }
}

#ifdef SAMPLING_STEP_X86_LEVELS
__attribute__((target("arch=x86-64-v4"))) void fill_x86_64_v4(uint64_t seed, uint64_t stream,
                                                               int64_t first_block, int64_t count,
                                                               float* out) {
  fill_normals<8>(seed, stream, first_block, count, out);  // 8 float64 lanes: one zmm register
}

__attribute__((target("arch=x86-64-v3"))) void fill_x86_64_v3(uint64_t seed, uint64_t stream,
                                                               int64_t first_block, int64_t count,
                                                               float* out) {
  fill_normals<4>(seed, stream, first_block, count, out);  // one ymm register
}
#endif

}  // namespace

void fill_normals_cpu(uint64_t seed, uint64_t stream, int64_t first_block, int64_t count, float* out) {
#ifdef SAMPLING_STEP_X86_LEVELS
  static const FillFn fill = sampling_step::x86_64_level() == 4   ? fill_x86_64_v4
                             : sampling_step::x86_64_level() == 3 ? fill_x86_64_v3
                             : sampling_step::x86_64_level() == 0 ? fill_scalar
                                                                  : fill_generic<2>;
#else
  static const FillFn fill = fill_generic<4>;
#endif
  fill(seed, stream, first_block, count, out);
}

namespace {

at::Tensor philox_normal_cpu(const at::Tensor& seeds, const at::Tensor& stream,
                             c10::IntArrayRef sample_shape) {
  const char* op = KERNELS_OP_NAME("philox_normal");
  check_seeds_and_stream(op, seeds, stream);
  TORCH_CHECK(seeds.device().is_cpu(), op, ": the CPU kernel got seeds on ", seeds.device());
  const int64_t numel = checked_sample_numel(op, sample_shape);
  const int64_t n = seeds.size(0);
  at::Tensor out = at::empty(output_shape(n, sample_shape), seeds.options().dtype(at::kFloat));
  if (n == 0 || numel == 0) {
    return out;
  }
  const int64_t* seed_ptr = seeds.const_data_ptr<int64_t>();
  const uint64_t stream_value = static_cast<uint64_t>(stream.const_data_ptr<int64_t>()[0]);
  float* out_ptr = out.mutable_data_ptr<float>();
  // Work items are tiles of kTileValues values of one sample, so one large sample still spreads
  // over every thread; a tile starts on a block boundary (kTileValues is a multiple of 4).
  const int64_t tiles_per_sample = (numel + kTileValues - 1) / kTileValues;
  at::parallel_for(0, n * tiles_per_sample, kGrainTiles, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t sample = item / tiles_per_sample;
      const int64_t first = (item % tiles_per_sample) * kTileValues;
      const int64_t count = numel - first < kTileValues ? numel - first : kTileValues;
      fill_normals_cpu(static_cast<uint64_t>(seed_ptr[sample]), stream_value, first / 4, count,
                       out_ptr + sample * numel + first);
    }
  });
  return out;
}

}  // namespace

}  // namespace philox

TORCH_LIBRARY_FRAGMENT(KERNELS_OP_NAMESPACE, m) {
  // Standard normals [N, *sample_shape], float32: row i a function of (seeds[i], stream) alone.
  m.def("philox_normal(Tensor seeds, Tensor stream, int[] sample_shape) -> Tensor");
}

TORCH_LIBRARY_IMPL(KERNELS_OP_NAMESPACE, CPU, m) {
  m.impl("philox_normal", &philox::philox_normal_cpu);
}
