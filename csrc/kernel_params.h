// Plain-C++ descriptions of the fused ops' arguments, shared by the host layer (ops.cpp),
// the CPU kernels and the CUDA kernels. No torch headers here, so the .cu files stay light.
#pragma once
#include <stdint.h>

namespace pfgmpp {

enum class DType : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

// Batch geometry. Every image tensor is [B, ...] with N elements per sample; a 4-D image
// also has C channels and HW = H*W pixels (non-4-D tensors use C = N, HW = 1, for which
// the channels-last address below equals the contiguous one).
struct Geometry {
  int64_t B = 0, N = 0, C = 0, HW = 0;
};

// One image tensor: logical NCHW element e of sample b lives at
//   contiguous:    b*N + e
//   channels-last: b*N + (e % HW)*C + e / HW
struct ImageArg {
  void* ptr = nullptr;
  DType dtype = DType::F32;
  bool channels_last = false;
  bool aligned16 = false;  // data pointer is 16-byte aligned (vector loads allowed)
};

struct NormalParams {  // philox_normal
  const int64_t* sample_ids;
  float* out;  // [B, n] contiguous
  int64_t B, n;
  uint64_t key;
  uint32_t stream;
};

struct Chi2Params {
  const int64_t* sample_ids;
  double* out;  // [B]
  int64_t B;
  uint64_t key;
  double D;
  uint32_t stream;
};

struct RawPhiloxParams {
  const int64_t* counter;  // [M, 4], values taken modulo 2^32
  int64_t* out;            // [M, 4]
  int64_t M;
  uint64_t key;
};

// Per-sample vectors are contiguous arrays of the op's compute type (float or double).
struct PerturbParams {
  Geometry g;
  ImageArg y;        // input (compute type)
  ImageArg net_in;   // output, any of the four dtypes
  ImageArg x;        // output (compute type, contiguous) or ptr == nullptr
  const void* scale;
  const void* c_in;
  const int64_t* sample_ids;
  uint64_t key;
  uint32_t stream;
  bool use_double;
};

struct LossParams {
  Geometry g;
  ImageArg F;       // network output
  ImageArg y;       // data (compute type)
  ImageArg grad_F;  // output: F's dtype and layout
  const void* scale;
  const void* c_skip;
  const void* c_out;
  const int64_t* sample_ids;
  float* per_sample_loss;  // [B]
  uint64_t key;
  uint32_t stream;
  double grad_scale;
  bool use_double;
};

struct SamplerParams {
  Geometry g;
  ImageArg x;       // state (compute type, contiguous)
  ImageArg F;       // network output or ptr == nullptr
  ImageArg base;    // state or ptr == nullptr (then base = x)
  ImageArg y1;      // state output
  ImageArg y2;      // state output or ptr == nullptr
  ImageArg net_in;  // network input output or ptr == nullptr
  double A, Bf, h1, h2, alpha_scale, churn_scale, c_in_next;
  const int64_t* sample_ids;
  uint64_t key;
  uint32_t alpha_stream, churn_stream;
  bool use_double;
};

}  // namespace pfgmpp
