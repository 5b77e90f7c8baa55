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
#include "../elementwise.h"
#include "../philox.h"

namespace pfgmpp {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;  // elements per work item (multiple of 4)
// Below this many elements a call runs on the calling thread: waking the OpenMP pool
// costs more than the work (and far more on a loaded machine).
constexpr int64_t kMinParallelElements = 1 << 15;

// Grain size (in work items of up to kChunk elements) for at::parallel_for.
inline int64_t grain_items(int64_t n_per_sample) {
  const int64_t per_item = std::max<int64_t>(1, std::min(kChunk, n_per_sample));
  return std::max<int64_t>(1, kMinParallelElements / per_item);
}

// ---------------------------------------------------------------- vectorised normals
// Box-Muller needs float32 log, sin and cos. Scalar libm calls would cost more than the
// rest of the op, so they are branch-free float32 polynomial evaluations (the classic
// Cephes-style reductions and coefficients, about 1 ulp, like torch's own SIMD log/sin/cos)
// that the compiler vectorises 8 or 16 lanes wide.
#define PFG_INLINE inline __attribute__((always_inline))

// log(x) for float x in (0, 1]: x = m 2^e with m in [sqrt(1/2), sqrt(2)), then a
// polynomial in f = m - 1; ln 2 split in two so e ln 2 adds without rounding error.
PFG_INLINE float log_f32(float x) {
  const int32_t bits = std::bit_cast<int32_t>(x);
  int32_t e = ((bits >> 23) & 0xFF) - 126;                                 // x = m 2^e, m in [0.5, 1)
  const float m = std::bit_cast<float>((bits & 0x007FFFFF) | 0x3F000000);
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  const float f = low ? (m + m) - 1.0f : m - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float y = p * f * z;
  y = y + (-2.12194440e-4f) * fe;
  y = y - 0.5f * z;
  return (f + y) + 0.693359375f * fe;
}

// sin and cos of x in [0, 2 pi + 1e-6]: octant j (even), r = x - j pi/4 in three exact
// steps, one polynomial for each of sin r and cos r, swapped and signed by the octant.
PFG_INLINE void sincos_f32(float x, float& s, float& c) {
  const int32_t j = (static_cast<int32_t>(x * 1.27323954473516f) + 1) & ~1;
  const float jf = static_cast<float>(j);
  const float r = ((x - jf * 0.78515625f) - jf * 2.4187564849853515625e-4f) -
                  jf * 3.77489497744594108e-8f;
  const float z = r * r;
  float pc = 2.443315711809948e-5f;
  pc = pc * z - 1.388731625493765e-3f;
  pc = pc * z + 4.166664568298827e-2f;
  pc = (pc * z) * z - 0.5f * z + 1.0f;
  float ps = -1.9515295891e-4f;
  ps = ps * z + 8.3321608736e-3f;
  ps = ps * z - 1.6666654611e-1f;
  ps = (ps * z) * r + r;
  const bool swap = (j & 2) != 0;
  const float sv = swap ? pc : ps;
  const float cv = swap ? ps : pc;
  s = (j & 4) ? -sv : sv;
  c = ((j - 2) & 4) ? cv : -cv;
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
  at::parallel_for(0, g.B * chunks, grain_items(g.N), [&](int64_t begin, int64_t end) {
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
    const PerturbMath<T> m{scale[b], c_in[b]};
    for (int64_t i = 0; i < n; ++i) {
      xv[i] = m.x(xv[i], z[i]);
      net[i] = m.net_in(xv[i]);
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
    const LossMath<T> m(c_skip[b], scale[b], c_out[b], p.grad_scale);
    double acc = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const T diff = m.diff(f[i], yv[i], z[i]);
      acc += static_cast<double>(diff) * static_cast<double>(diff);
      f[i] = m.grad(diff);
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
  const SamplerMath<T> m(p);
  for_each_chunk(p.g, [&](int64_t b, int64_t e0, int64_t n, int64_t) {
    float z[kChunk];
    T xv[kChunk], d[kChunk], b0[kChunk], out[kChunk];
    const uint64_t sid = static_cast<uint64_t>(p.sample_ids[b]);
    load<T>(p.x, p.g, b, e0, n, xv);
    if (p.F.ptr) {
      load<T>(p.F, p.g, b, e0, n, d);
      for (int64_t i = 0; i < n; ++i) d[i] = m.drift(xv[i], d[i]);
    } else {
      std::fill(d, d + n, T(0));
    }
    if (p.base.ptr) {
      load<T>(p.base, p.g, b, e0, n, b0);
    } else {
      std::copy(xv, xv + n, b0);
    }
    if (p.y2.ptr) {
      for (int64_t i = 0; i < n; ++i) out[i] = m.y2(b0[i], d[i]);
      store<T>(p.y2, p.g, b, e0, n, out);
    }
    for (int64_t i = 0; i < n; ++i) out[i] = m.y1(b0[i], d[i]);
    if (alpha) {
      draw_normals(sid, key, p.alpha_stream, e0, n, z);
      for (int64_t i = 0; i < n; ++i) out[i] = m.add_alpha(out[i], z[i]);
    }
    if (churn) {
      draw_normals(sid, key, p.churn_stream, e0, n, z);
      for (int64_t i = 0; i < n; ++i) out[i] = m.add_churn(out[i], z[i]);
    }
    store<T>(p.y1, p.g, b, e0, n, out);
    if (p.net_in.ptr) {
      for (int64_t i = 0; i < n; ++i) out[i] = m.net_in(out[i]);
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
  at::parallel_for(0, p.B * chunks, grain_items(p.n), [&](int64_t begin, int64_t end) {
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
