// Per-sample normal noise on CUDA: one thread per Philox block (4 values), a grid-stride loop over
// every block of every sample, launched on the current stream. The seeds and the stream are read on
// the device (a captured CUDA graph replays with a new stream); the math is ../philox.h, shared with
// the CPU kernel, so both give the same bits.
#include "../philox.h"
#include "../philox_normal.h"
#include "../sampling_step.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace philox {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kBlocksPerSm = 8;  // resident thread blocks per SM; the grid-stride loop covers the rest

__global__ void __launch_bounds__(kThreadsPerBlock)
    philox_normal_kernel(const int64_t* __restrict__ seeds, const int64_t* __restrict__ stream,
                         float* __restrict__ out, int64_t n_samples, int64_t sample_numel,
                         int64_t blocks_per_sample) {
  const uint64_t stream_value = static_cast<uint64_t>(*stream);
  const int64_t total = n_samples * blocks_per_sample;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // Whole float4 stores when every sample starts 16-byte aligned (sample_numel % 4 == 0).
  const bool whole_blocks = sample_numel % 4 == 0;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < total;
       item += step) {
    const int64_t sample = item / blocks_per_sample;
    const int64_t block = item - sample * blocks_per_sample;
    double z[4];
    normals<uint64_t, double>(static_cast<uint64_t>(seeds[sample]), stream_value,
                              static_cast<uint64_t>(block), z[0], z[1], z[2], z[3]);
    float* row = out + sample * sample_numel;
    const int64_t first = block * 4;
    if (whole_blocks) {
      reinterpret_cast<float4*>(row + first)[0] =
          make_float4(static_cast<float>(z[0]), static_cast<float>(z[1]),
                      static_cast<float>(z[2]), static_cast<float>(z[3]));
    } else {
      for (int m = 0; m < 4 && first + m < sample_numel; ++m) {
        row[first + m] = static_cast<float>(z[m]);
      }
    }
  }
}

at::Tensor philox_normal_cuda(const at::Tensor& seeds, const at::Tensor& stream,
                              c10::IntArrayRef sample_shape) {
  const char* op = KERNELS_OP_NAME("philox_normal");
  check_seeds_and_stream(op, seeds, stream);
  TORCH_CHECK(seeds.is_cuda(), op, ": the CUDA kernel got seeds on ", seeds.device());
  const int64_t numel = checked_sample_numel(op, sample_shape);
  const c10::cuda::CUDAGuard guard(seeds.device());
  const int64_t n = seeds.size(0);
  at::Tensor out = at::empty(output_shape(n, sample_shape), seeds.options().dtype(at::kFloat));
  if (n == 0 || numel == 0) {
    return out;
  }
  const int64_t blocks_per_sample = (numel + 3) / 4;
  const int64_t work = n * blocks_per_sample;
  int device = 0;
  int sm_count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t max_blocks = static_cast<int64_t>(sm_count) * kBlocksPerSm;
  const int grid = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>((work + kThreadsPerBlock - 1) / kThreadsPerBlock, max_blocks)));
  philox_normal_kernel<<<grid, kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
      seeds.const_data_ptr<int64_t>(), stream.const_data_ptr<int64_t>(),
      out.mutable_data_ptr<float>(), n, numel, blocks_per_sample);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace philox

TORCH_LIBRARY_IMPL(KERNELS_OP_NAMESPACE, CUDA, m) {
  m.impl("philox_normal", &philox::philox_normal_cuda);
}
