// Device helpers shared by the CUDA kernels: launch geometry, dtype-dispatched loads and
// stores of one Philox block (4 logical elements), 16-byte vector accesses when aligned.
// Only CUDA headers here: no ATen and no c10 (c10/cuda/CUDAException.h alone triples the
// nvcc time of a file); launch errors are raised by the host layer (ops.cpp) with c10.
#pragma once
#include <algorithm>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

// Enough blocks to fill the device; the kernels stride over the rest.
inline int grid_blocks(int64_t items) {
  static int sm_count[64] = {0};
  int dev = 0;
  PFG_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 64) dev = 63;
  if (sm_count[dev] == 0)
    PFG_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count[dev], cudaDevAttrMultiProcessorCount, dev));
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sm_count[dev]) * 16)));
}

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

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

// Loads logical elements e0 .. e0+cnt-1 (cnt <= 4, e0 % 4 == 0) of sample b.
template <typename T>
__device__ __forceinline__ void load4(const ImageArg& a, const Geometry& g, int64_t b, int64_t e0, int cnt, T v[4]) {
  const int64_t idx = b * g.N + e0;
  if (!a.channels_last && cnt == 4 && a.aligned16 && (idx & 3) == 0) {
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
  if (!a.channels_last) {
    for (int k = 0; k < cnt; ++k) v[k] = load1<T>(a, idx + k);
    return;
  }
  ChannelsLastWalk w(g, b, e0);
  for (int k = 0; k < cnt; ++k, w.next(g)) v[k] = load1<T>(a, w.index);
}

template <typename T>
__device__ __forceinline__ void store4(const ImageArg& a, const Geometry& g, int64_t b, int64_t e0, int cnt, const T v[4]) {
  const int64_t idx = b * g.N + e0;
  if (!a.channels_last && cnt == 4 && a.aligned16 && (idx & 3) == 0) {
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
  if (!a.channels_last) {
    for (int k = 0; k < cnt; ++k) store1<T>(a, idx + k, v[k]);
    return;
  }
  ChannelsLastWalk w(g, b, e0);
  for (int k = 0; k < cnt; ++k, w.next(g)) store1<T>(a, w.index, v[k]);
}

}  // namespace cuda_detail
}  // namespace pfgmpp
