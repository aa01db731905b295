// The philox_normal op's host side, shared by its CPU and CUDA kernels and by the sampling step's
// in-kernel noise (defined in philox_normal.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <vector>

namespace philox {

// Counter word c0 numbers the blocks of 4 values of a sample: 2³² blocks, 2³⁴ values per stream.
constexpr int64_t kMaxSampleNumel = int64_t{1} << 34;
// CPU work item: this many values of one sample (a multiple of 4: tiles start on block boundaries).
constexpr int64_t kTileValues = 4096;
// Tiles per at::parallel_for task: 32768 values, ATen's grain for cheap element-wise loops
// (at::internal::GRAIN_SIZE).
constexpr int64_t kGrainTiles = 32768 / kTileValues;

// TORCH_CHECKs on the op's seeds (int64 [N], contiguous) and stream (int64, one element, same device).
void check_seeds_and_stream(const char* op, const at::Tensor& seeds, const at::Tensor& stream);
// The product of sample_shape, checked: sizes >= 0 and at most kMaxSampleNumel values.
int64_t checked_sample_numel(const char* op, c10::IntArrayRef sample_shape);
// [n, *sample_shape]
std::vector<int64_t> output_shape(int64_t n, c10::IntArrayRef sample_shape);
// Values [4·first_block, 4·first_block + count) of (seed, stream) into out, float32, on the CPU, with
// the widest vector code this CPU runs.
void fill_normals_cpu(uint64_t seed, uint64_t stream, int64_t first_block, int64_t count, float* out);

}  // namespace philox
