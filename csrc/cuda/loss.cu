// CUDA kernel of loss_fwd_bwd (KERNEL_OPS.md op 5). Grid (chunk, sample): every block writes
// one partial sum of its chunk, a second kernel adds each sample's partials in order, so
// the per-sample loss is deterministic (no atomics).
#include "common.cuh"

namespace pfgmpp {
namespace cuda {
namespace {
using namespace cuda_detail;

constexpr int kItemsPerThread = 4;  // Philox blocks per thread per chunk
constexpr int64_t kBlocksPerChunk = int64_t(kThreads) * kItemsPerThread;

template <typename T>
__global__ void loss_kernel(LossParams p, int64_t blocks_per_sample, int64_t chunks, float* partials) {
  __shared__ float warp_sums[kThreads / 32];
  const PhiloxKey key = split_key(p.key);
  const T* scale = static_cast<const T*>(p.scale);
  const T* c_skip = static_cast<const T*>(p.c_skip);
  const T* c_out = static_cast<const T*>(p.c_out);
  const T gs2 = static_cast<T>(2.0 * p.grad_scale);
  const int64_t chunk = blockIdx.x;
  const int64_t j_begin = chunk * kBlocksPerChunk;
  const int64_t j_end = min64(blocks_per_sample, j_begin + kBlocksPerChunk);
  for (int64_t b = blockIdx.y; b < p.g.B; b += gridDim.y) {
    const uint64_t sid = static_cast<uint64_t>(p.sample_ids[b]);
    const T a = T(1) - c_skip[b], bz = c_skip[b] * scale[b], co = c_out[b];
    float acc = 0.f;
    for (int64_t j = j_begin + threadIdx.x; j < j_end; j += kThreads) {
      const int64_t e0 = 4 * j;
      const int cnt = static_cast<int>(min64(4, p.g.N - e0));
      float z[4];
      philox_normal4(sid, (uint32_t)j, p.stream, key, z);
      T f[4], yv[4];
      load4<T>(p.F, p.g, b, e0, cnt, f);
      load4<T>(p.y, p.g, b, e0, cnt, yv);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const T target = (a * yv[k] - bz * static_cast<T>(z[k])) / co;
        const T diff = f[k] - target;
        if (k < cnt) acc += static_cast<float>(diff * diff);
        f[k] = gs2 * diff;
      }
      store4<T>(p.grad_F, p.g, b, e0, cnt, f);
    }
    // Block reduction in a fixed order.
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
      partials[b * chunks + chunk] = total;
    }
    __syncthreads();
  }
}

__global__ void sum_partials_kernel(const float* partials, int64_t B, int64_t chunks, float* out) {
  for (int64_t b = global_thread(); b < B; b += grid_stride()) {
    float total = 0.f;
    for (int64_t c = 0; c < chunks; ++c) total += partials[b * chunks + c];
    out[b] = total;
  }
}

}  // namespace

int64_t loss_num_chunks(const Geometry& g) {
  const int64_t blocks_per_sample = (g.N + 3) / 4;
  return std::max<int64_t>(1, (blocks_per_sample + kBlocksPerChunk - 1) / kBlocksPerChunk);
}

void loss_fwd_bwd(const LossParams& p, float* partials, void* stream) {
  const int64_t blocks_per_sample = (p.g.N + 3) / 4;
  const int64_t chunks = loss_num_chunks(p.g);
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min<int64_t>(p.g.B, 65535)));
  if (p.use_double) {
    loss_kernel<double><<<grid, kThreads, 0, as_stream(stream)>>>(p, blocks_per_sample, chunks, partials);
  } else {
    loss_kernel<float><<<grid, kThreads, 0, as_stream(stream)>>>(p, blocks_per_sample, chunks, partials);
  }
  PFG_CUDA_KERNEL_LAUNCH_CHECK();
  sum_partials_kernel<<<grid_blocks(p.g.B), kThreads, 0, as_stream(stream)>>>(partials, p.g.B, chunks, p.per_sample_loss);
  PFG_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace pfgmpp
