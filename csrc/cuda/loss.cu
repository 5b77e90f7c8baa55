// CUDA kernel of loss_fwd_bwd (KERNEL_OPS.md op 5). Grid (chunk, sample): each sample's work
// units are split into chunks so that even a small batch fills the device; every block writes
// one partial sum of its chunk and a second kernel adds each sample's partials in order, so
// the per-sample loss is deterministic (no atomics). The launch plan (chunks, block size) is
// ../loss_plan.h; the maths is elementwise.h.
#include "../loss_plan.h"
#include "common.cuh"

namespace pfgmpp {
namespace cuda {
namespace {
using namespace cuda_detail;

static_assert(kLossMaxThreads == kThreads, "the plan's largest block is the kernel's launch bound");

// Blocks per SM that the register cap must allow: float kernels at most 64 registers (50 %
// occupancy on sm_80/sm_90, without it <float, 3> takes 80: 37.5 %); the float64 ones keep
// what they need.
// Blocks of 256 threads per SM that the register cap must allow (sm_80 / sm_90: 65536 registers):
// float RGB units at most 64 registers (50 % occupancy; uncapped they take 66, 80 before y was
// loaded by rows: 37.5 %), the other float units at most 40 (75 %, where they were uncapped);
// the float64 kernels keep what they need.
template <typename T, int C>
constexpr int kLossMinBlocks = sizeof(T) == 4 ? (C == 3 ? 4 : 6) : 1;

template <typename T, int C>
__global__ void __launch_bounds__(kThreads, kLossMinBlocks<T, C>)
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
    for (int64_t u = u_begin + threadIdx.x; u < u_end; u += blockDim.x) {
      const int cnt = U::count(p.g, u);
      // F, then grad_F, for the whole unit (its store needs every row); y one row at a time, which
      // keeps 8 registers fewer live for RGB. The load order is the one that fits each unit's
      // register cap without spills (tests/test_cuda_compile.py).
      T f[U::kRows][4], yv[4];
      if constexpr (U::kRows == 1) load_row<T, C>(p.y, p.g, b, u, 0, cnt, yv);
      load_unit<T, C>(p.F, p.g, b, u, cnt, f);
#pragma unroll
      for (int r = 0; r < U::kRows; ++r) {
        if constexpr (U::kRows > 1) load_row<T, C>(p.y, p.g, b, u, r, cnt, yv);
        float z[4];
        unit_normals<C>(sid, p.g, u, r, p.stream, key, z);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const T diff = m.diff(f[r][k], yv[k], z[k]);
          if (k < cnt) acc += static_cast<float>(diff * diff);
          f[r][k] = m.grad(diff);
        }
      }
      store_unit<T, C>(p.grad_F, p.g, b, u, cnt, f);
    }
    // Block reduction in a fixed order (blockDim.x is whole warps, loss_plan.h).
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.f;
      for (unsigned w = 0; w < blockDim.x / 32; ++w) total += warp_sums[w];
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

template <typename T, int C>
LossPlan plan(const Geometry& g) {
  return loss_plan(Unit<C>::per_sample(g), g.B, sm_count(), int64_t(resident_blocks<loss_kernel<T, C>>()) * kThreads);
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
    const LossPlan pl = plan<T, C()>(p.g);
    chunks = pl.chunks;
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min(p.g.B, kLossMaxGridY)));
    const unsigned threads = static_cast<unsigned>(pl.threads);
    loss_kernel<T, C()><<<grid, threads, 0, as_stream(stream)>>>(p, pl.chunk_units, chunks, partials);
  });
  PFG_CUDA_KERNEL_LAUNCH_CHECK();
  constexpr auto sum = sum_partials_kernel;
  const Launch l = launch_1d<sum>(p.g.B);
  sum<<<l.blocks, l.threads, 0, as_stream(stream)>>>(partials, p.g.B, chunks, p.per_sample_loss);
  PFG_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace pfgmpp
