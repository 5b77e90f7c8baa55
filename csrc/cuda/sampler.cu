// CUDA kernel of sampler_update (KERNEL_OPS.md op 6): Euler / Heun state update with the
// step's alpha and churn noise and the next network input fused in. One thread per work unit
// (common.cuh) in a grid-stride loop; the maths is elementwise.h.
#include "common.cuh"

namespace pfgmpp {
namespace cuda {
namespace {
using namespace cuda_detail;

template <typename T, int C>
__global__ void __launch_bounds__(kThreads) sampler_kernel(SamplerParams p) {
  using U = Unit<C>;
  constexpr int R = U::kRows;
  const PhiloxKey key = split_key(p.key);
  const bool alpha = p.alpha_scale != 0.0, churn = p.churn_scale != 0.0;
  const SamplerMath<T> m(p);
  const int64_t units = U::per_sample(p.g), total = p.g.B * units;
  for (int64_t i = global_thread(); i < total; i += grid_stride()) {
    const int64_t b = i / units, u = i - b * units;
    const int cnt = U::count(p.g, u);
    const uint64_t sid = static_cast<uint64_t>(p.sample_ids[b]);
    T xv[R][4], d[R][4], base[R][4], out[R][4];
    load_unit<T, C>(p.x, p.g, b, u, cnt, xv);
    if (p.F.ptr) {
      load_unit<T, C>(p.F, p.g, b, u, cnt, d);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int k = 0; k < 4; ++k) d[r][k] = m.drift(xv[r][k], d[r][k]);
    } else {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int k = 0; k < 4; ++k) d[r][k] = T(0);
    }
    if (p.base.ptr) {
      load_unit<T, C>(p.base, p.g, b, u, cnt, base);
    } else {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int k = 0; k < 4; ++k) base[r][k] = xv[r][k];
    }
    if (p.y2.ptr) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int k = 0; k < 4; ++k) out[r][k] = m.y2(base[r][k], d[r][k]);
      store_unit<T, C>(p.y2, p.g, b, u, cnt, out);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float z[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) out[r][k] = m.y1(base[r][k], d[r][k]);
      if (alpha) {
        unit_normals<C>(sid, p.g, u, r, p.alpha_stream, key, z);
#pragma unroll
        for (int k = 0; k < 4; ++k) out[r][k] = m.add_alpha(out[r][k], z[k]);
      }
      if (churn) {
        unit_normals<C>(sid, p.g, u, r, p.churn_stream, key, z);
#pragma unroll
        for (int k = 0; k < 4; ++k) out[r][k] = m.add_churn(out[r][k], z[k]);
      }
    }
    store_unit<T, C>(p.y1, p.g, b, u, cnt, out);
    if (p.net_in.ptr) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int k = 0; k < 4; ++k) out[r][k] = m.net_in(out[r][k]);
      store_unit<T, C>(p.net_in, p.g, b, u, cnt, out);
    }
  }
}

template <typename T, int C>
void launch(const SamplerParams& p, cudaStream_t stream) {
  constexpr auto kernel = sampler_kernel<T, C>;
  const Launch l = launch_1d<kernel>(p.g.B * Unit<C>::per_sample(p.g));
  kernel<<<l.blocks, l.threads, 0, stream>>>(p);
}

}  // namespace

void sampler_update(const SamplerParams& p, void* stream) {
  with_unit(p.g, {p.x, p.F, p.base, p.y1, p.y2, p.net_in}, [&](auto C) {
    p.use_double ? launch<double, C()>(p, as_stream(stream)) : launch<float, C()>(p, as_stream(stream));
  });
  PFG_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace pfgmpp
