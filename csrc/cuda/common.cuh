// Device helpers shared by the CUDA kernels: launch geometry (occupancy-sized persistent
// grids), the work unit of one thread (one Philox block, or 4 whole pixels of a channels-last
// image), dtype-dispatched loads and stores with vector accesses when aligned.
// Only CUDA headers here: no ATen and no c10 (c10/cuda/CUDAException.h alone triples the
// nvcc time of a file); launch errors are raised by the host layer (ops.cpp) with c10.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../elementwise.h"
#include "../kernel_params.h"
#include "../philox.h"

namespace pfgmpp {

// Defined in ops.cpp: raises the c10 CUDA error (C10_CUDA_CHECK) for a failed call.
void cuda_check(int error, const char* what, const char* file, int line);

// C10_CUDA_KERNEL_LAUNCH_CHECK without the c10 headers: checks every launch right away.
#define PFG_CUDA_KERNEL_LAUNCH_CHECK() \
  ::pfgmpp::cuda_check(static_cast<int>(cudaGetLastError()), "kernel launch", __FILE__, __LINE__)
#define PFG_CUDA_CHECK(call) ::pfgmpp::cuda_check(static_cast<int>(call), #call, __FILE__, __LINE__)

namespace cuda_detail {

constexpr int kThreads = 256;
constexpr int kMaxDevices = 64;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int sm_count() {
  static std::atomic<int> cache[kMaxDevices];  // 0: not known yet
  int dev = 0, sms = 0;
  PFG_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < kMaxDevices && cache[dev] > 0) return cache[dev];
  PFG_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (dev < kMaxDevices) cache[dev] = sms;
  return sms;
}

// How many blocks of `Kernel` (kThreads each) the current device runs at once (occupancy):
// the size of a persistent grid, whose blocks then stride over the work. Cached per kernel
// and device.
template <auto Kernel>
int resident_blocks() {
  static std::atomic<int> cache[kMaxDevices];  // 0: not known yet
  int dev = 0, per_sm = 0;
  PFG_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < kMaxDevices && cache[dev] > 0) return cache[dev];
  PFG_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, kThreads, 0));
  const int blocks = sm_count() * std::max(1, per_sm);
  if (dev < kMaxDevices) cache[dev] = blocks;
  return blocks;
}

struct Launch {
  int blocks, threads;
};

// Launch shape for `items` work items of one thread each, in a grid-stride kernel. With
// enough work for a full block on every SM: all resident blocks of kThreads (or fewer if
// less work). With less (a small batch, latency-bound): smaller blocks of whole warps, one
// or so per SM, so the work spreads over every SM instead of crowding a few.
template <auto Kernel>
Launch launch_1d(int64_t items) {
  const int64_t sms = sm_count();
  if (items >= sms * kThreads) {
    return Launch{static_cast<int>(std::min<int64_t>(ceil_div(items, kThreads), resident_blocks<Kernel>())), kThreads};
  }
  const int64_t threads = std::max<int64_t>(32, ceil_div(ceil_div(items, sms), 32) * 32);
  return Launch{static_cast<int>(std::max<int64_t>(1, ceil_div(items, threads))), static_cast<int>(threads)};
}

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// ------------------------------------------------------------------ element accesses

template <typename T>
__device__ __forceinline__ T load1(const ImageArg& a, int64_t idx) {
  switch (a.dtype) {
    case DType::F32: return static_cast<T>(static_cast<const float*>(a.ptr)[idx]);
    case DType::F64: return static_cast<T>(static_cast<const double*>(a.ptr)[idx]);
    case DType::BF16: return static_cast<T>(__bfloat162float(static_cast<const __nv_bfloat16*>(a.ptr)[idx]));
    default: return static_cast<T>(__half2float(static_cast<const __half*>(a.ptr)[idx]));
  }
}

template <typename T>
__device__ __forceinline__ void store1(const ImageArg& a, int64_t idx, T v) {
  switch (a.dtype) {
    case DType::F32: static_cast<float*>(a.ptr)[idx] = static_cast<float>(v); break;
    case DType::F64: static_cast<double*>(a.ptr)[idx] = static_cast<double>(v); break;
    case DType::BF16: static_cast<__nv_bfloat16*>(a.ptr)[idx] = __float2bfloat16_rn(static_cast<float>(v)); break;
    default: static_cast<__half*>(a.ptr)[idx] = __float2half_rn(static_cast<float>(v)); break;
  }
}

// Elements idx .. idx+3 with idx % 4 == 0 of a 16-byte aligned tensor: one vector access
// (two for float64), since 4 elements are 16, 8 or 32 bytes from an aligned start.
template <typename T>
__device__ __forceinline__ void load_quad(const ImageArg& a, int64_t idx, T* v) {
  switch (a.dtype) {
    case DType::F32: {
      const float4 q = *reinterpret_cast<const float4*>(static_cast<const float*>(a.ptr) + idx);
      v[0] = static_cast<T>(q.x); v[1] = static_cast<T>(q.y); v[2] = static_cast<T>(q.z); v[3] = static_cast<T>(q.w);
      return;
    }
    case DType::F64: {
      const double2* p = reinterpret_cast<const double2*>(static_cast<const double*>(a.ptr) + idx);
      const double2 q0 = p[0], q1 = p[1];
      v[0] = static_cast<T>(q0.x); v[1] = static_cast<T>(q0.y); v[2] = static_cast<T>(q1.x); v[3] = static_cast<T>(q1.y);
      return;
    }
    case DType::BF16: {
      const uint2 q = *reinterpret_cast<const uint2*>(static_cast<const __nv_bfloat16*>(a.ptr) + idx);
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&q);
      const float2 f0 = __bfloat1622float2(h[0]), f1 = __bfloat1622float2(h[1]);
      v[0] = static_cast<T>(f0.x); v[1] = static_cast<T>(f0.y); v[2] = static_cast<T>(f1.x); v[3] = static_cast<T>(f1.y);
      return;
    }
    default: {
      const uint2 q = *reinterpret_cast<const uint2*>(static_cast<const __half*>(a.ptr) + idx);
      const __half2* h = reinterpret_cast<const __half2*>(&q);
      const float2 f0 = __half22float2(h[0]), f1 = __half22float2(h[1]);
      v[0] = static_cast<T>(f0.x); v[1] = static_cast<T>(f0.y); v[2] = static_cast<T>(f1.x); v[3] = static_cast<T>(f1.y);
      return;
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_quad(const ImageArg& a, int64_t idx, const T* v) {
  switch (a.dtype) {
    case DType::F32: {
      *reinterpret_cast<float4*>(static_cast<float*>(a.ptr) + idx) =
          make_float4(static_cast<float>(v[0]), static_cast<float>(v[1]), static_cast<float>(v[2]), static_cast<float>(v[3]));
      return;
    }
    case DType::F64: {
      double2* p = reinterpret_cast<double2*>(static_cast<double*>(a.ptr) + idx);
      p[0] = make_double2(static_cast<double>(v[0]), static_cast<double>(v[1]));
      p[1] = make_double2(static_cast<double>(v[2]), static_cast<double>(v[3]));
      return;
    }
    case DType::BF16: {
      uint2 q;
      __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&q);
      h[0] = __floats2bfloat162_rn(static_cast<float>(v[0]), static_cast<float>(v[1]));
      h[1] = __floats2bfloat162_rn(static_cast<float>(v[2]), static_cast<float>(v[3]));
      *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(a.ptr) + idx) = q;
      return;
    }
    default: {
      uint2 q;
      __half2* h = reinterpret_cast<__half2*>(&q);
      h[0] = __floats2half2_rn(static_cast<float>(v[0]), static_cast<float>(v[1]));
      h[1] = __floats2half2_rn(static_cast<float>(v[2]), static_cast<float>(v[3]));
      *reinterpret_cast<uint2*>(static_cast<__half*>(a.ptr) + idx) = q;
      return;
    }
  }
}

// Channels-last addresses of consecutive logical elements e0, e0+1, ... of sample b: one
// division for the first, then a pixel step with channel wrap (see kernel_params.h).
struct ChannelsLastWalk {
  int64_t c, pix, index;
  __device__ __forceinline__ ChannelsLastWalk(const Geometry& g, int64_t b, int64_t e0) {
    c = e0 / g.HW;
    pix = e0 - c * g.HW;
    index = b * g.N + pix * g.C + c;
  }
  __device__ __forceinline__ void next(const Geometry& g) {
    if (++pix == g.HW) {
      pix = 0;
      ++c;
      index += 1 - (g.HW - 1) * g.C;  // back to pixel 0, next channel
    } else {
      index += g.C;
    }
  }
};

// ------------------------------------------------------------------------ work units
// The work of one thread. C == 0: one Philox block u, the logical elements 4u .. 4u+3 of a
// sample (fewer at its end). C = 1 or 3 (see unit_channels): the pixels 4u .. 4u+3 with all
// their channels, i.e. the Philox blocks c*HW/4 + u (row c of the unit), for a 4-D image
// with H*W % 4 == 0. A channels-last operand then holds the unit as one
// contiguous run of 4C elements, a contiguous operand as C aligned runs of 4: every access
// is a vector access and a warp's stores are contiguous, instead of one element per access
// strided by C. The row count is a compile-time constant, so the arrays stay in registers.
template <int C>
struct Unit {
  static_assert(C == 0 || C == 1 || C == 3, "whole-pixel units for gray and RGB images");
  static constexpr int kRows = C > 0 ? C : 1;

  __host__ __device__ static int64_t per_sample(const Geometry& g) {
    return C > 0 ? g.HW / 4 : (g.N + 3) / 4;
  }
  // Number of valid elements in each row of unit u.
  __device__ static int count(const Geometry& g, int64_t u) {
    return C > 0 ? 4 : static_cast<int>(min64(4, g.N - 4 * u));
  }
  // Philox block (counter word 0) of row r of unit u.
  __device__ static uint32_t block(const Geometry& g, int64_t u, int r) {
    return static_cast<uint32_t>(C > 0 ? r * (g.HW / 4) + u : u);
  }
};

// The unit's C for an op's image operands (ptr == nullptr: absent): whole pixels when one is
// channels-last, all are 16-byte aligned and C is 1 or 3 (gray and RGB: each C is one more
// instantiation of every kernel). Everything else, the unaligned case included, takes the
// C == 0 path, which keeps the whole-pixel code free of scalar fallbacks.
inline int unit_channels(const Geometry& g, std::initializer_list<ImageArg> operands) {
  bool any_cl = false, aligned = true;
  for (const ImageArg& a : operands) {
    if (!a.ptr) continue;
    any_cl = any_cl || a.channels_last;
    aligned = aligned && a.aligned16;
  }
  return any_cl && aligned && g.HW > 0 && g.HW % 4 == 0 && (g.C == 1 || g.C == 3) ? static_cast<int>(g.C) : 0;
}

// Calls f(std::integral_constant<int, C>{}) with C = unit_channels(g, operands).
template <typename F>
void with_unit(const Geometry& g, std::initializer_list<ImageArg> operands, F&& f) {
  switch (unit_channels(g, operands)) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// Loads unit u of sample b into v[row][k] (logical order; k < cnt valid).
template <typename T, int C>
__device__ __forceinline__ void load_unit(const ImageArg& a, const Geometry& g, int64_t b, int64_t u, int cnt,
                                          T (&v)[Unit<C>::kRows][4]) {
  if constexpr (C == 0) {
    const int64_t e0 = 4 * u, idx = b * g.N + e0;
    if (!a.channels_last) {
      if (cnt == 4 && a.aligned16 && (idx & 3) == 0) return load_quad<T>(a, idx, v[0]);
#pragma unroll
      for (int k = 0; k < 4; ++k)
        if (k < cnt) v[0][k] = load1<T>(a, idx + k);
      return;
    }
    ChannelsLastWalk w(g, b, e0);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k < cnt) {
        v[0][k] = load1<T>(a, w.index);
        w.next(g);
      }
    }
  } else {
    if (!a.channels_last) {
#pragma unroll
      for (int c = 0; c < C; ++c) load_quad<T>(a, b * g.N + c * g.HW + 4 * u, v[c]);
      return;
    }
    T run[4 * C];  // pixel-major: run[k*C + c] is channel c of pixel 4u + k
    const int64_t start = b * g.N + 4 * u * C;
#pragma unroll
    for (int q = 0; q < C; ++q) load_quad<T>(a, start + 4 * q, run + 4 * q);
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int c = 0; c < C; ++c) v[c][k] = run[k * C + c];
  }
}

// Loads row r of unit u of sample b alone into v[k] (logical order; k < cnt valid): for a
// kernel that uses the rows one after the other, so only one row is live in registers. A
// contiguous operand's row is one aligned run of 4 (whole-pixel units), a channels-last
// operand's is 4 elements C apart (then served from L1: the unit's other rows share its lines).
template <typename T, int C>
__device__ __forceinline__ void load_row(const ImageArg& a, const Geometry& g, int64_t b, int64_t u, int r, int cnt,
                                         T (&v)[4]) {
  if constexpr (C == 0) {
    T unit[1][4];
    load_unit<T, C>(a, g, b, u, cnt, unit);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = unit[0][k];
  } else {
    if (!a.channels_last || C == 1) return load_quad<T>(a, b * g.N + r * g.HW + 4 * u, v);  // C = 1: the same run
    const int64_t start = b * g.N + 4 * u * C + r;
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = load1<T>(a, start + k * C);
  }
}

// Stores v[row][k] (k < cnt) as unit u of sample b.
template <typename T, int C>
__device__ __forceinline__ void store_unit(const ImageArg& a, const Geometry& g, int64_t b, int64_t u, int cnt,
                                           const T (&v)[Unit<C>::kRows][4]) {
  if constexpr (C == 0) {
    const int64_t e0 = 4 * u, idx = b * g.N + e0;
    if (!a.channels_last) {
      if (cnt == 4 && a.aligned16 && (idx & 3) == 0) return store_quad<T>(a, idx, v[0]);
#pragma unroll
      for (int k = 0; k < 4; ++k)
        if (k < cnt) store1<T>(a, idx + k, v[0][k]);
      return;
    }
    ChannelsLastWalk w(g, b, e0);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k < cnt) {
        store1<T>(a, w.index, v[0][k]);
        w.next(g);
      }
    }
  } else {
    if (!a.channels_last) {
#pragma unroll
      for (int c = 0; c < C; ++c) store_quad<T>(a, b * g.N + c * g.HW + 4 * u, v[c]);
      return;
    }
    T run[4 * C];
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int c = 0; c < C; ++c) run[k * C + c] = v[c][k];
    const int64_t start = b * g.N + 4 * u * C;
#pragma unroll
    for (int q = 0; q < C; ++q) store_quad<T>(a, start + 4 * q, run + 4 * q);
  }
}

// Normals of row r of unit u of one sample (stream `stream`).
template <int C>
__device__ __forceinline__ void unit_normals(uint64_t sample_id, const Geometry& g, int64_t u, int r,
                                             uint32_t stream, PhiloxKey key, float z[4]) {
  philox_normal4(sample_id, Unit<C>::block(g, u, r), stream, key, z);
}

}  // namespace cuda_detail
}  // namespace pfgmpp
