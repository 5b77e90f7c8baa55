// CPU kernels of the fused ops. Work is split into (sample, chunk) items run in parallel
// with at::parallel_for (OpenMP in torch's CPU build); inside a chunk, the stages (draw 4
// normals per Philox call, load/convert, fused arithmetic, convert/store) are simple
// loops over contiguous buffers so the compiler can vectorise them.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../backends.h"
#include "../philox.h"

namespace pfgmpp {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;  // elements per work item (multiple of 4)

// ---------------------------------------------------------------- vectorised normals
// Box-Muller needs float32 log, sin and cos. Scalar libm calls would cost more than the
// rest of the op, so these are evaluated in double precision with branch-free code the
// compiler vectorises, then rounded to float: correctly rounded except in rare near-ties
// (the spec's "accurate logf/sinf/cosf"; torch's own SIMD versions are within 1 ulp).
#define PFG_INLINE inline __attribute__((always_inline))

constexpr uint64_t kSqrtHalfBits = 0x3FE6A09E667F3BCDull;  // sqrt(0.5)
constexpr double kLn2 = 0.69314718055994530942;
constexpr double kRoundMagic = 6755399441055744.0;  // 1.5 * 2^52: x + magic rounds x
constexpr double kTwoOverPi = 0.63661977236758134308;
constexpr double kPiOver2Hi = 1.57079632673412561417;  // 33 bits: q * hi is exact for q <= 4
constexpr double kPiOver2Lo = 6.07710050650619224932e-11;

// log(x) for float x in (0, 1]: x = 2^k m, m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s).
PFG_INLINE float log_f32(float xf) {
  const int64_t t = std::bit_cast<int64_t>(static_cast<double>(xf)) - int64_t(kSqrtHalfBits);
  const uint64_t biased = static_cast<uint64_t>(t + (int64_t(64) << 52));  // k + 64 >= 0
  const double k = std::bit_cast<double>((biased >> 52) | 0x4330000000000000ull) -
                   (4503599627370496.0 + 64.0);
  const double m = std::bit_cast<double>((static_cast<uint64_t>(t) & 0x000FFFFFFFFFFFFFull) +
                                         kSqrtHalfBits);
  const double s = (m - 1.0) / (m + 1.0);  // |s| <= 0.1716
  const double s2 = s * s;
  double p = 1.0 / 17;  // atanh series; truncation < 1e-15 relative
  p = p * s2 + 1.0 / 15;
  p = p * s2 + 1.0 / 13;
  p = p * s2 + 1.0 / 11;
  p = p * s2 + 1.0 / 9;
  p = p * s2 + 1.0 / 7;
  p = p * s2 + 1.0 / 5;
  p = p * s2 + 1.0 / 3;
  p = p * s2 + 1.0;
  return static_cast<float>(k * kLn2 + 2.0 * s * p);
}

// sin and cos of a float angle in [0, 2 pi]: quadrant reduction, Taylor on |r| <= pi/4.
PFG_INLINE void sincos_f32(float thf, float& sf, float& cf) {
  const double th = static_cast<double>(thf);
  const double tq = th * kTwoOverPi + kRoundMagic;
  const uint64_t q = std::bit_cast<uint64_t>(tq);  // low bits: the quadrant
  const double qd = tq - kRoundMagic;
  const double r = (th - qd * kPiOver2Hi) - qd * kPiOver2Lo;
  const double r2 = r * r;
  double ps = -1.0 / 1307674368000.0;  // sin: up to r^15
  ps = ps * r2 + 1.0 / 6227020800.0;
  ps = ps * r2 - 1.0 / 39916800.0;
  ps = ps * r2 + 1.0 / 362880.0;
  ps = ps * r2 - 1.0 / 5040.0;
  ps = ps * r2 + 1.0 / 120.0;
  ps = ps * r2 - 1.0 / 6.0;
  const double sr = r + r * r2 * ps;
  double pc = -1.0 / 6402373705728000.0;  // cos: up to r^18
  pc = pc * r2 + 1.0 / 20922789888000.0;
  pc = pc * r2 - 1.0 / 87178291200.0;
  pc = pc * r2 + 1.0 / 479001600.0;
  pc = pc * r2 - 1.0 / 3628800.0;
  pc = pc * r2 + 1.0 / 40320.0;
  pc = pc * r2 - 1.0 / 720.0;
  pc = pc * r2 + 1.0 / 24.0;
  pc = pc * r2 - 0.5;
  const double cr = 1.0 + r2 * pc;
  const bool swap = (q & 1) != 0;
  double sv = swap ? cr : sr;
  double cv = swap ? sr : cr;
  sv = (q & 2) ? -sv : sv;
  cv = ((q + 1) & 2) ? -cv : cv;
  sf = static_cast<float>(sv);
  cf = static_cast<float>(cv);
}

constexpr int kBatch = 64;  // Philox blocks per vectorised batch (256 normals)

// Normals of blocks j0 .. j0+nb-1 (nb <= kBatch) of one sample and stream, 4 per block.
// Structure of arrays over the batch, so every loop below is a SIMD loop; compiled for
// AVX-512, AVX2 and the baseline ISA, picked at load time.
__attribute__((target_clones("avx512f", "avx2", "default")))
void normal_blocks(uint32_t id_lo, uint32_t id_hi, uint32_t stream, PhiloxKey key, uint32_t j0,
                   int nb, float* z) {
  uint32_t c0[kBatch], c1[kBatch], c2[kBatch], c3[kBatch];
  for (int i = 0; i < kBatch; ++i) {
    c0[i] = j0 + static_cast<uint32_t>(i);
    c1[i] = id_lo;
    c2[i] = id_hi;
    c3[i] = stream;
  }
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int i = 0; i < kBatch; ++i) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0[i];
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2[i];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[i] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[i] ^ k1;
      c0[i] = n0;
      c1[i] = static_cast<uint32_t>(p1);
      c2[i] = n2;
      c3[i] = static_cast<uint32_t>(p0);
    }
  }
  float za0[kBatch], za1[kBatch], zb0[kBatch], zb1[kBatch];
  for (int i = 0; i < kBatch; ++i) {
    const float ra = sqrtf(-2.0f * log_f32(philox_uniform(c0[i])));
    const float rb = sqrtf(-2.0f * log_f32(philox_uniform(c2[i])));
    float sa, ca, sb, cb;
    sincos_f32(6.2831855f * philox_uniform(c1[i]), sa, ca);
    sincos_f32(6.2831855f * philox_uniform(c3[i]), sb, cb);
    za0[i] = ra * ca;
    za1[i] = ra * sa;
    zb0[i] = rb * cb;
    zb1[i] = rb * sb;
  }
  for (int i = 0; i < nb; ++i) {
    z[4 * i] = za0[i];
    z[4 * i + 1] = za1[i];
    z[4 * i + 2] = zb0[i];
    z[4 * i + 3] = zb1[i];
  }
}

// Normals z[e0 .. e0+n) of one sample; e0 is a multiple of 4.
void draw_normals(uint64_t sid, PhiloxKey key, uint32_t stream, int64_t e0, int64_t n,
                  float* z) {
  const uint32_t id_lo = static_cast<uint32_t>(sid & 0xFFFFFFFFu);
  const uint32_t id_hi = static_cast<uint32_t>(sid >> 32);
  const int64_t full = n / 4;
  uint32_t j = static_cast<uint32_t>(e0 / 4);
  for (int64_t q = 0; q < full; q += kBatch) {
    const int nb = static_cast<int>(std::min<int64_t>(kBatch, full - q));
    normal_blocks(id_lo, id_hi, stream, key, j, nb, z + 4 * q);
    j += static_cast<uint32_t>(nb);
  }
  if (n % 4) {
    float tail[4];
    normal_blocks(id_lo, id_hi, stream, key, j, 1, tail);
    for (int64_t i = 0; i < n % 4; ++i) z[4 * full + i] = tail[i];
  }
}

// Storage -> compute type (half types go through float, exactly).
template <typename T, typename S>
inline T convert(S v) {
  if constexpr (std::is_same_v<S, double> || std::is_same_v<S, float>) {
    return static_cast<T>(v);
  } else {
    return static_cast<T>(static_cast<float>(v));
  }
}

template <typename S, typename T>
void load_typed(const ImageArg& a, const Geometry& g, int64_t b, int64_t e0, int64_t n, T* dst) {
  const S* base = static_cast<const S*>(a.ptr) + b * g.N;
  if (!a.channels_last) {
    const S* p = base + e0;
    for (int64_t i = 0; i < n; ++i) dst[i] = convert<T>(p[i]);
    return;
  }
  int64_t c = e0 / g.HW, pix = e0 % g.HW;
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = convert<T>(base[pix * g.C + c]);
    if (++pix == g.HW) {
      pix = 0;
      ++c;
    }
  }
}

template <typename T>
void load(const ImageArg& a, const Geometry& g, int64_t b, int64_t e0, int64_t n, T* dst) {
  switch (a.dtype) {
    case DType::F32: return load_typed<float, T>(a, g, b, e0, n, dst);
    case DType::F64: return load_typed<double, T>(a, g, b, e0, n, dst);
    case DType::BF16: return load_typed<c10::BFloat16, T>(a, g, b, e0, n, dst);
    case DType::F16: return load_typed<c10::Half, T>(a, g, b, e0, n, dst);
  }
}

template <typename S, typename T>
void store_typed(const ImageArg& a, const Geometry& g, int64_t b, int64_t e0, int64_t n,
                 const T* src) {
  S* base = static_cast<S*>(a.ptr) + b * g.N;
  if (!a.channels_last) {
    S* p = base + e0;
    for (int64_t i = 0; i < n; ++i) {
      if constexpr (std::is_same_v<S, double> || std::is_same_v<S, float>) {
        p[i] = static_cast<S>(src[i]);
      } else {
        p[i] = S(static_cast<float>(src[i]));
      }
    }
    return;
  }
  int64_t c = e0 / g.HW, pix = e0 % g.HW;
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<S, double> || std::is_same_v<S, float>) {
      base[pix * g.C + c] = static_cast<S>(src[i]);
    } else {
      base[pix * g.C + c] = S(static_cast<float>(src[i]));
    }
    if (++pix == g.HW) {
      pix = 0;
      ++c;
    }
  }
}

template <typename T>
void store(const ImageArg& a, const Geometry& g, int64_t b, int64_t e0, int64_t n, const T* src) {
  switch (a.dtype) {
    case DType::F32: return store_typed<float, T>(a, g, b, e0, n, src);
    case DType::F64: return store_typed<double, T>(a, g, b, e0, n, src);
    case DType::BF16: return store_typed<c10::BFloat16, T>(a, g, b, e0, n, src);
    case DType::F16: return store_typed<c10::Half, T>(a, g, b, e0, n, src);
  }
}

// Runs fn(b, e0, n, item) over all (sample, chunk) items in parallel.
template <typename Fn>
void for_each_chunk(const Geometry& g, Fn&& fn) {
  const int64_t chunks = (g.N + kChunk - 1) / kChunk;
  at::parallel_for(0, g.B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks;
      const int64_t e0 = (item % chunks) * kChunk;
      fn(b, e0, std::min(kChunk, g.N - e0), item);
    }
  });
}

template <typename T>
void perturb_impl(const PerturbParams& p) {
  const PhiloxKey key = split_key(p.key);
  const T* scale = static_cast<const T*>(p.scale);
  const T* c_in = static_cast<const T*>(p.c_in);
  for_each_chunk(p.g, [&](int64_t b, int64_t e0, int64_t n, int64_t) {
    float z[kChunk];
    T xv[kChunk], net[kChunk];
    draw_normals(static_cast<uint64_t>(p.sample_ids[b]), key, p.stream, e0, n, z);
    load<T>(p.y, p.g, b, e0, n, xv);
    const T s = scale[b], ci = c_in[b];
    for (int64_t i = 0; i < n; ++i) {
      xv[i] = xv[i] + s * static_cast<T>(z[i]);
      net[i] = ci * xv[i];
    }
    store<T>(p.net_in, p.g, b, e0, n, net);
    if (p.x.ptr) store<T>(p.x, p.g, b, e0, n, xv);
  });
}

template <typename T>
void loss_impl(const LossParams& p) {
  const PhiloxKey key = split_key(p.key);
  const T* scale = static_cast<const T*>(p.scale);
  const T* c_skip = static_cast<const T*>(p.c_skip);
  const T* c_out = static_cast<const T*>(p.c_out);
  const int64_t chunks = (p.g.N + kChunk - 1) / kChunk;
  std::vector<double> partial(p.g.B * chunks);
  for_each_chunk(p.g, [&](int64_t b, int64_t e0, int64_t n, int64_t item) {
    float z[kChunk];
    T f[kChunk], yv[kChunk];
    draw_normals(static_cast<uint64_t>(p.sample_ids[b]), key, p.stream, e0, n, z);
    load<T>(p.F, p.g, b, e0, n, f);
    load<T>(p.y, p.g, b, e0, n, yv);
    const T a = T(1) - c_skip[b], bz = c_skip[b] * scale[b], co = c_out[b];
    const T gs2 = static_cast<T>(2.0 * p.grad_scale);
    double acc = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const T target = (a * yv[i] - bz * static_cast<T>(z[i])) / co;
      const T diff = f[i] - target;
      acc += static_cast<double>(diff) * static_cast<double>(diff);
      f[i] = gs2 * diff;
    }
    partial[item] = acc;
    store<T>(p.grad_F, p.g, b, e0, n, f);
  });
  // Deterministic: each sample sums its chunks in order, whatever the thread count.
  for (int64_t b = 0; b < p.g.B; ++b) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += partial[b * chunks + c];
    p.per_sample_loss[b] = static_cast<float>(total);
  }
}

template <typename T>
void sampler_impl(const SamplerParams& p) {
  const PhiloxKey key = split_key(p.key);
  const bool alpha = p.alpha_scale != 0.0, churn = p.churn_scale != 0.0;
  const T A = static_cast<T>(p.A), Bf = static_cast<T>(p.Bf), h1 = static_cast<T>(p.h1),
          h2 = static_cast<T>(p.h2), sa = static_cast<T>(p.alpha_scale),
          sc = static_cast<T>(p.churn_scale), cn = static_cast<T>(p.c_in_next);
  for_each_chunk(p.g, [&](int64_t b, int64_t e0, int64_t n, int64_t) {
    float z[kChunk];
    T xv[kChunk], d[kChunk], b0[kChunk], out[kChunk];
    const uint64_t sid = static_cast<uint64_t>(p.sample_ids[b]);
    load<T>(p.x, p.g, b, e0, n, xv);
    if (p.F.ptr) {
      load<T>(p.F, p.g, b, e0, n, d);
      for (int64_t i = 0; i < n; ++i) d[i] = A * xv[i] + Bf * d[i];
    } else {
      std::fill(d, d + n, T(0));
    }
    if (p.base.ptr) {
      load<T>(p.base, p.g, b, e0, n, b0);
    } else {
      std::copy(xv, xv + n, b0);
    }
    if (p.y2.ptr) {
      for (int64_t i = 0; i < n; ++i) out[i] = b0[i] + h2 * d[i];
      store<T>(p.y2, p.g, b, e0, n, out);
    }
    for (int64_t i = 0; i < n; ++i) out[i] = b0[i] + h1 * d[i];
    if (alpha) {
      draw_normals(sid, key, p.alpha_stream, e0, n, z);
      for (int64_t i = 0; i < n; ++i) out[i] += sa * static_cast<T>(z[i]);
    }
    if (churn) {
      draw_normals(sid, key, p.churn_stream, e0, n, z);
      for (int64_t i = 0; i < n; ++i) out[i] += sc * static_cast<T>(z[i]);
    }
    store<T>(p.y1, p.g, b, e0, n, out);
    if (p.net_in.ptr) {
      for (int64_t i = 0; i < n; ++i) out[i] = cn * out[i];
      store<T>(p.net_in, p.g, b, e0, n, out);
    }
  });
}

}  // namespace

void philox4x32(const RawPhiloxParams& p) {
  const PhiloxKey key = split_key(p.key);
  at::parallel_for(0, p.M, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t* c = p.counter + 4 * m;
      const Philox4 r = philox4x32_10((uint32_t)c[0], (uint32_t)c[1], (uint32_t)c[2],
                                      (uint32_t)c[3], key.k0, key.k1);
      int64_t* o = p.out + 4 * m;
      o[0] = r.x0;
      o[1] = r.x1;
      o[2] = r.x2;
      o[3] = r.x3;
    }
  });
}

void philox_normal(const NormalParams& p) {
  const PhiloxKey key = split_key(p.key);
  const int64_t chunks = (p.n + kChunk - 1) / kChunk;
  at::parallel_for(0, p.B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, e0 = (item % chunks) * kChunk;
      draw_normals(static_cast<uint64_t>(p.sample_ids[b]), key, p.stream, e0,
                   std::min(kChunk, p.n - e0), p.out + b * p.n + e0);
    }
  });
}

void chi2(const Chi2Params& p) {
  const PhiloxKey key = split_key(p.key);
  at::parallel_for(0, p.B, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      p.out[b] = chi2_draw(static_cast<uint64_t>(p.sample_ids[b]), key, p.D, p.stream);
  });
}

void perturb(const PerturbParams& p) {
  p.use_double ? perturb_impl<double>(p) : perturb_impl<float>(p);
}

void loss_fwd_bwd(const LossParams& p) {
  p.use_double ? loss_impl<double>(p) : loss_impl<float>(p);
}

void sampler_update(const SamplerParams& p) {
  p.use_double ? sampler_impl<double>(p) : sampler_impl<float>(p);
}

}  // namespace cpu
}  // namespace pfgmpp
