// Counter-based random numbers shared by the CPU (C++) and CUDA kernels.
// Philox4x32-10 with Random123's constants, float32 uniforms and Box-Muller, and the
// per-sample chi-square draw (Marsaglia-Tsang in float64). The spec is
// docs/KERNEL_OPS.md; pfgmpp_fast/reference.py implements the same maths in torch.
#pragma once
#include <stdint.h>
#include <math.h>

#ifdef __CUDACC__
#define PFG_HD __host__ __device__ __forceinline__
#else
#define PFG_HD inline
#endif

namespace pfgmpp {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t x0, x1, x2, x3;
};

PFG_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#ifdef __CUDA_ARCH__
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = (uint64_t)a * (uint64_t)b;
  lo = (uint32_t)p;
  hi = (uint32_t)(p >> 32);
#endif
}

// Ten rounds; the key is bumped between rounds (Random123 philox4x32_R(10, ...)).
PFG_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                             uint32_t k0, uint32_t k1) {
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{c0, c1, c2, c3};
}

// u = (float(x >> 8) + 0.5f) * 2^-24, every step in float32 (u may round to exactly 1).
PFG_HD float philox_uniform(uint32_t x) {
  const float half_step = (float)(x >> 8) + 0.5f;
  return half_step * 5.9604644775390625e-08f;
}

// One Box-Muller pair from two uniforms, float32, accurate libm functions. On the device,
// sincosf shares one argument reduction (and its local-memory scratch) between sin and cos;
// it is the same accurate routine as sinf/cosf (2 ulp, CUDA Programming Guide, not the
// __sincosf intrinsic, whose ~1e-6 absolute error times |radius| <= 5.6 would break the
// 1e-6 agreement with the reference), so the normals' error bound is unchanged.
PFG_HD void box_muller(float ua, float ub, float& za, float& zb) {
  const float radius = sqrtf(-2.0f * logf(ua));
  const float theta = 6.2831855f * ub;
#ifdef __CUDA_ARCH__
  float s, c;
  sincosf(theta, &s, &c);
  za = radius * c;
  zb = radius * s;
#else
  za = radius * cosf(theta);
  zb = radius * sinf(theta);
#endif
}

// The counter of block j of one sample: (j, id low 32, id high 32, stream).
struct PhiloxKey {
  uint32_t k0, k1;
};

PFG_HD PhiloxKey split_key(uint64_t key) {
  return PhiloxKey{(uint32_t)(key & 0xFFFFFFFFu), (uint32_t)(key >> 32)};
}

// Normals z[4j .. 4j+3] of one sample.
PFG_HD void philox_normal4(uint64_t sample_id, uint32_t block, uint32_t stream, PhiloxKey key,
                           float z[4]) {
  const Philox4 r = philox4x32_10(block, (uint32_t)(sample_id & 0xFFFFFFFFu),
                                  (uint32_t)(sample_id >> 32), stream, key.k0, key.k1);
  box_muller(philox_uniform(r.x0), philox_uniform(r.x1), z[0], z[1]);
  box_muller(philox_uniform(r.x2), philox_uniform(r.x3), z[2], z[3]);
}

constexpr int kChi2Attempts = 16;

// V ~ chi2_D = 2 Gamma(D/2) for one sample (KERNEL_OPS.md, "chi2_D"): Marsaglia-Tsang in
// float64; attempt a uses block a of the sample's counter in the given stream.
PFG_HD double chi2_draw(uint64_t sample_id, PhiloxKey key, double D, uint32_t stream) {
  const double k = 0.5 * D;
  const bool boost = k < 1.0;
  const double kk = boost ? k + 1.0 : k;
  const double d = kk - 1.0 / 3.0;
  const double c = 1.0 / sqrt(9.0 * d);
  const uint32_t id_lo = (uint32_t)(sample_id & 0xFFFFFFFFu);
  const uint32_t id_hi = (uint32_t)(sample_id >> 32);
  double gamma = d;
  float boost_uniform = 0.5f;
  for (int a = 0; a < kChi2Attempts; ++a) {
    const Philox4 r = philox4x32_10((uint32_t)a, id_lo, id_hi, stream, key.k0, key.k1);
    if (a == 0) boost_uniform = philox_uniform(r.x3);
    float z0f, z1f;
    box_muller(philox_uniform(r.x0), philox_uniform(r.x1), z0f, z1f);
    (void)z1f;
    const double z = (double)z0f;
    const double u = (double)philox_uniform(r.x2);
    const double t = 1.0 + c * z;
    const double v = t * t * t;
    if (v > 0.0 && log(u) < 0.5 * z * z + d - d * v + d * log(v)) {
      gamma = d * v;
      break;
    }
  }
  double log_gamma = log(gamma);
  if (boost) log_gamma += log((double)boost_uniform) / k;
  return 2.0 * exp(log_gamma);
}

}  // namespace pfgmpp
