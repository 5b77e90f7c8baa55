// CUDA kernel of sampler_update (KERNEL_OPS.md op 6): Euler / Heun state update with the
// step's alpha and churn noise and the next network input fused in.
#include <cmath>

#include "common.cuh"

namespace pfgmpp {
namespace cuda {
namespace {
using namespace cuda_detail;

template <typename T>
__global__ void sampler_kernel(SamplerParams p, int64_t blocks_per_sample) {
  const PhiloxKey key = split_key(p.key);
  const bool alpha = p.alpha_scale != 0.0, churn = p.churn_scale != 0.0;
  const T A = static_cast<T>(p.A), Bf = static_cast<T>(p.Bf), h1 = static_cast<T>(p.h1),
          h2 = static_cast<T>(p.h2), sa = static_cast<T>(p.alpha_scale),
          sc = static_cast<T>(p.churn_scale), cn = static_cast<T>(p.c_in_next);
  const int64_t total = p.g.B * blocks_per_sample;
  for (int64_t i = global_thread(); i < total; i += grid_stride()) {
    const int64_t b = i / blocks_per_sample, j = i - b * blocks_per_sample;
    const int64_t e0 = 4 * j;
    const int cnt = static_cast<int>(min64(4, p.g.N - e0));
    const uint64_t sid = static_cast<uint64_t>(p.sample_ids[b]);
    T xv[4], d[4] = {T(0), T(0), T(0), T(0)}, b0[4], out[4];
    load4<T>(p.x, p.g, b, e0, cnt, xv);
    if (p.F.ptr) {
      load4<T>(p.F, p.g, b, e0, cnt, d);
#pragma unroll
      for (int k = 0; k < 4; ++k) d[k] = A * xv[k] + Bf * d[k];
    }
    if (p.base.ptr) {
      load4<T>(p.base, p.g, b, e0, cnt, b0);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) b0[k] = xv[k];
    }
    if (p.y2.ptr) {
#pragma unroll
      for (int k = 0; k < 4; ++k) out[k] = b0[k] + h2 * d[k];
      store4<T>(p.y2, p.g, b, e0, cnt, out);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = b0[k] + h1 * d[k];
    float z[4];
    if (alpha) {
      philox_normal4(sid, (uint32_t)j, p.alpha_stream, key, z);
#pragma unroll
      for (int k = 0; k < 4; ++k) out[k] += sa * static_cast<T>(z[k]);
    }
    if (churn) {
      philox_normal4(sid, (uint32_t)j, p.churn_stream, key, z);
#pragma unroll
      for (int k = 0; k < 4; ++k) out[k] += sc * static_cast<T>(z[k]);
    }
    store4<T>(p.y1, p.g, b, e0, cnt, out);
    if (p.net_in.ptr) {
#pragma unroll
      for (int k = 0; k < 4; ++k) out[k] = cn * out[k];
      store4<T>(p.net_in, p.g, b, e0, cnt, out);
    }
  }
}

}  // namespace

void sampler_update(const SamplerParams& p, void* stream) {
  const int64_t blocks_per_sample = (p.g.N + 3) / 4;
  const int grid = grid_blocks(p.g.B * blocks_per_sample);
  if (p.use_double) {
    sampler_kernel<double><<<grid, kThreads, 0, as_stream(stream)>>>(p, blocks_per_sample);
  } else {
    sampler_kernel<float><<<grid, kThreads, 0, as_stream(stream)>>>(p, blocks_per_sample);
  }
  PFG_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace pfgmpp
