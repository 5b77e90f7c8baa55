// CUDA kernels of the raw RNG ops: philox4x32, philox_normal, chi2.
#include "common.cuh"

namespace pfgmpp {
namespace cuda {
namespace {
using namespace cuda_detail;

__global__ void __launch_bounds__(kThreads) philox_raw_kernel(RawPhiloxParams p) {
  const PhiloxKey key = split_key(p.key);
  for (int64_t m = global_thread(); m < p.M; m += grid_stride()) {
    const int64_t* c = p.counter + 4 * m;
    const Philox4 r = philox4x32_10((uint32_t)c[0], (uint32_t)c[1], (uint32_t)c[2], (uint32_t)c[3], key.k0, key.k1);
    int64_t* o = p.out + 4 * m;
    o[0] = r.x0;
    o[1] = r.x1;
    o[2] = r.x2;
    o[3] = r.x3;
  }
}

__global__ void __launch_bounds__(kThreads) philox_normal_kernel(NormalParams p, int64_t blocks_per_row) {
  const PhiloxKey key = split_key(p.key);
  const int64_t total = p.B * blocks_per_row;
  const bool vec = (p.n & 3) == 0;
  for (int64_t i = global_thread(); i < total; i += grid_stride()) {
    const int64_t b = i / blocks_per_row, j = i - b * blocks_per_row;
    float z[4];
    philox_normal4(static_cast<uint64_t>(p.sample_ids[b]), (uint32_t)j, p.stream, key, z);
    float* out = p.out + b * p.n + 4 * j;
    if (vec) {
      *reinterpret_cast<float4*>(out) = make_float4(z[0], z[1], z[2], z[3]);
    } else {
      const int64_t cnt = p.n - 4 * j;
#pragma unroll
      for (int k = 0; k < 4; ++k)  // constant indices: z stays in registers
        if (k < cnt) out[k] = z[k];
    }
  }
}

__global__ void __launch_bounds__(kThreads) chi2_kernel(Chi2Params p) {
  const PhiloxKey key = split_key(p.key);
  for (int64_t b = global_thread(); b < p.B; b += grid_stride())
    p.out[b] = chi2_draw(static_cast<uint64_t>(p.sample_ids[b]), key, p.D, p.stream);
}

}  // namespace

void philox4x32(const RawPhiloxParams& p, void* stream) {
  const Launch l = launch_1d<philox_raw_kernel>(p.M);
  philox_raw_kernel<<<l.blocks, l.threads, 0, as_stream(stream)>>>(p);
  PFG_CUDA_KERNEL_LAUNCH_CHECK();
}

void philox_normal(const NormalParams& p, void* stream) {
  const int64_t blocks_per_row = (p.n + 3) / 4;
  const Launch l = launch_1d<philox_normal_kernel>(p.B * blocks_per_row);
  philox_normal_kernel<<<l.blocks, l.threads, 0, as_stream(stream)>>>(p, blocks_per_row);
  PFG_CUDA_KERNEL_LAUNCH_CHECK();
}

void chi2(const Chi2Params& p, void* stream) {
  const Launch l = launch_1d<chi2_kernel>(p.B);
  chi2_kernel<<<l.blocks, l.threads, 0, as_stream(stream)>>>(p);
  PFG_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace pfgmpp
