// CUDA kernel of perturb: x = y + scale[b] * g, net_in = c_in[b] * x (KERNEL_OPS.md op 4).
// One thread per Philox block (4 logical elements) in a grid-stride loop.
#include "common.cuh"

namespace pfgmpp {
namespace cuda {
namespace {
using namespace cuda_detail;

template <typename T>
__global__ void perturb_kernel(PerturbParams p, int64_t blocks_per_sample) {
  const PhiloxKey key = split_key(p.key);
  const T* scale = static_cast<const T*>(p.scale);
  const T* c_in = static_cast<const T*>(p.c_in);
  const int64_t total = p.g.B * blocks_per_sample;
  for (int64_t i = global_thread(); i < total; i += grid_stride()) {
    const int64_t b = i / blocks_per_sample, j = i - b * blocks_per_sample;
    const int64_t e0 = 4 * j;
    const int cnt = static_cast<int>(min64(4, p.g.N - e0));
    float z[4];
    philox_normal4(static_cast<uint64_t>(p.sample_ids[b]), (uint32_t)j, p.stream, key, z);
    T v[4], net[4];
    load4<T>(p.y, p.g, b, e0, cnt, v);
    const T s = scale[b], ci = c_in[b];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[k] = v[k] + s * static_cast<T>(z[k]);
      net[k] = ci * v[k];
    }
    store4<T>(p.net_in, p.g, b, e0, cnt, net);
    if (p.x.ptr) store4<T>(p.x, p.g, b, e0, cnt, v);
  }
}

}  // namespace

void perturb(const PerturbParams& p, void* stream) {
  const int64_t blocks_per_sample = (p.g.N + 3) / 4;
  const int grid = grid_blocks(p.g.B * blocks_per_sample);
  if (p.use_double) {
    perturb_kernel<double><<<grid, kThreads, 0, as_stream(stream)>>>(p, blocks_per_sample);
  } else {
    perturb_kernel<float><<<grid, kThreads, 0, as_stream(stream)>>>(p, blocks_per_sample);
  }
  PFG_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace pfgmpp
