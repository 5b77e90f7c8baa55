// CUDA kernel of perturb: x = y + scale[b] * g, net_in = c_in[b] * x (KERNEL_OPS.md op 4).
// One thread per work unit (common.cuh) in a grid-stride loop; the maths is elementwise.h.
#include "common.cuh"

namespace pfgmpp {
namespace cuda {
namespace {
using namespace cuda_detail;

template <typename T, int C>
__global__ void __launch_bounds__(kThreads) perturb_kernel(PerturbParams p) {
  using U = Unit<C>;
  const PhiloxKey key = split_key(p.key);
  const int64_t units = U::per_sample(p.g), total = p.g.B * units;
  for (int64_t i = global_thread(); i < total; i += grid_stride()) {
    const int64_t b = i / units, u = i - b * units;
    const int cnt = U::count(p.g, u);
    const uint64_t sid = static_cast<uint64_t>(p.sample_ids[b]);
    const PerturbMath<T> m{static_cast<const T*>(p.scale)[b], static_cast<const T*>(p.c_in)[b]};
    T v[U::kRows][4], net[U::kRows][4];
    load_unit<T, C>(p.y, p.g, b, u, cnt, v);
#pragma unroll
    for (int r = 0; r < U::kRows; ++r) {
      float z[4];
      unit_normals<C>(sid, p.g, u, r, p.stream, key, z);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        v[r][k] = m.x(v[r][k], z[k]);
        net[r][k] = m.net_in(v[r][k]);
      }
    }
    store_unit<T, C>(p.net_in, p.g, b, u, cnt, net);
    if (p.x.ptr) store_unit<T, C>(p.x, p.g, b, u, cnt, v);
  }
}

template <typename T, int C>
void launch(const PerturbParams& p, cudaStream_t stream) {
  constexpr auto kernel = perturb_kernel<T, C>;
  const Launch l = launch_1d<kernel>(p.g.B * Unit<C>::per_sample(p.g));
  kernel<<<l.blocks, l.threads, 0, stream>>>(p);
}

}  // namespace

void perturb(const PerturbParams& p, void* stream) {
  with_unit(p.g, {p.y, p.net_in, p.x}, [&](auto C) {
    p.use_double ? launch<double, C()>(p, as_stream(stream)) : launch<float, C()>(p, as_stream(stream));
  });
  PFG_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace pfgmpp
