// CUDA kernel of loss_fwd_bwd (KERNEL_OPS.md op 5). Grid (chunk, sample): each sample's work
// units are split into chunks so that even a small batch fills the device; every block writes
// one partial sum of its chunk and a second kernel adds each sample's partials in order, so
// the per-sample loss is deterministic (no atomics). The maths is elementwise.h.
#include "common.cuh"

namespace pfgmpp {
namespace cuda {
namespace {
using namespace cuda_detail;

constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMinChunkUnits = 32;

template <typename T, int C>
__global__ void __launch_bounds__(kThreads)
    loss_kernel(LossParams p, int64_t chunk_units, int64_t chunks, float* partials) {
  using U = Unit<C>;
  __shared__ float warp_sums[kThreads / 32];
  const PhiloxKey key = split_key(p.key);
  const int64_t units = U::per_sample(p.g);
  const int64_t chunk = blockIdx.x;
  const int64_t u_begin = chunk * chunk_units;
  const int64_t u_end = min64(units, u_begin + chunk_units);
  for (int64_t b = blockIdx.y; b < p.g.B; b += gridDim.y) {
    const uint64_t sid = static_cast<uint64_t>(p.sample_ids[b]);
    const LossMath<T> m(static_cast<const T*>(p.c_skip)[b], static_cast<const T*>(p.scale)[b],
                        static_cast<const T*>(p.c_out)[b], p.grad_scale);
    float acc = 0.f;
    for (int64_t u = u_begin + threadIdx.x; u < u_end; u += kThreads) {
      const int cnt = U::count(p.g, u);
      T f[U::kRows][4], yv[U::kRows][4];
      load_unit<T, C>(p.F, p.g, b, u, cnt, f);
      load_unit<T, C>(p.y, p.g, b, u, cnt, yv);
#pragma unroll
      for (int r = 0; r < U::kRows; ++r) {
        float z[4];
        unit_normals<C>(sid, p.g, u, r, p.stream, key, z);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const T diff = m.diff(f[r][k], yv[r][k], z[k]);
          if (k < cnt) acc += static_cast<float>(diff * diff);
          f[r][k] = m.grad(diff);
        }
      }
      store_unit<T, C>(p.grad_F, p.g, b, u, cnt, f);
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

__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const float* partials, int64_t B, int64_t chunks, float* out) {
  for (int64_t b = global_thread(); b < B; b += grid_stride()) {
    float total = 0.f;
    for (int64_t c = 0; c < chunks; ++c) total += partials[b * chunks + c];
    out[b] = total;
  }
}

// Chunks per sample: enough blocks to fill the device (occupancy) when the batch alone does
// not, down to one warp of units per chunk (the rest of such a block idles, but the work of a
// small batch spreads over every SM instead of a few).
struct Plan {
  int64_t chunk_units, chunks;
};

template <typename T, int C>
Plan plan(const Geometry& g) {
  const int64_t units = Unit<C>::per_sample(g);
  const int64_t rows = std::max<int64_t>(1, std::min(g.B, kMaxGridY));
  const int64_t wanted = ceil_div(resident_blocks<loss_kernel<T, C>>(), rows);
  const int64_t chunks = std::max<int64_t>(1, std::min(wanted, ceil_div(units, kMinChunkUnits)));
  const int64_t chunk_units = std::max<int64_t>(1, ceil_div(units, chunks));
  return Plan{chunk_units, ceil_div(units, chunk_units)};
}

template <typename F>
void with_types(const LossParams& p, F&& f) {
  with_unit(p.g, {p.F, p.y, p.grad_F}, [&](auto C) {
    if (p.use_double) {
      f(double(), C);
    } else {
      f(float(), C);
    }
  });
}

}  // namespace

int64_t loss_num_chunks(const LossParams& p) {
  int64_t chunks = 1;
  with_types(p, [&](auto t, auto C) { chunks = plan<decltype(t), C()>(p.g).chunks; });
  return chunks;
}

void loss_fwd_bwd(const LossParams& p, float* partials, void* stream) {
  int64_t chunks = 1;
  with_types(p, [&](auto t, auto C) {
    using T = decltype(t);
    const Plan pl = plan<T, C()>(p.g);
    chunks = pl.chunks;
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min(p.g.B, kMaxGridY)));
    loss_kernel<T, C()><<<grid, kThreads, 0, as_stream(stream)>>>(p, pl.chunk_units, chunks, partials);
  });
  PFG_CUDA_KERNEL_LAUNCH_CHECK();
  constexpr auto sum = sum_partials_kernel;
  const Launch l = launch_1d<sum>(p.g.B);
  sum<<<l.blocks, l.threads, 0, as_stream(stream)>>>(partials, p.g.B, chunks, p.per_sample_loss);
  PFG_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace pfgmpp
