// Per-element maths of the fused ops (docs/KERNEL_OPS.md ops 4-6), one source for the CPU
// kernels (cpu/kernels_cpu.cpp) and the CUDA kernels (cuda/*.cu): the CPU tests check the
// very expressions the GPU runs. Callers only index, load/convert, draw normals and store.
// T is the compute type (float or double); z is a float32 normal from philox.h.
#pragma once
#include "kernel_params.h"
#include "philox.h"

namespace pfgmpp {

// ------------------------------------------------------------------------- perturb
// x = y + scale[b] z,  net_in = c_in[b] x.
template <typename T>
struct PerturbMath {
  T scale, c_in;
  PFG_HD T x(T y, float z) const { return y + scale * static_cast<T>(z); }
  PFG_HD T net_in(T x) const { return c_in * x; }
};

// ---------------------------------------------------------------------------- loss
// target = ((1 - c_skip) y - c_skip scale z) / c_out,  diff = F - target,
// loss += diff^2 (summed by the caller),  grad_F = 2 grad_scale diff.
template <typename T>
struct LossMath {
  T a, bz, c_out, gs2;
  PFG_HD LossMath(T c_skip, T scale, T c_out_, double grad_scale)
      : a(T(1) - c_skip), bz(c_skip * scale), c_out(c_out_), gs2(static_cast<T>(2.0 * grad_scale)) {}
  PFG_HD T diff(T f, T y, float z) const { return f - (a * y - bz * static_cast<T>(z)) / c_out; }
  PFG_HD T grad(T diff) const { return gs2 * diff; }
};

// ------------------------------------------------------------------------- sampler
// d = A x + Bf F (0 without F),  y2 = base + h2 d,  y1 = base + h1 d + sa z_alpha + sc z_churn,
// net_in = c_in_next y1. The noise terms are added one after the other, in this order.
template <typename T>
struct SamplerMath {
  T A, Bf, h1, h2, sa, sc, cn;
  PFG_HD explicit SamplerMath(const SamplerParams& p)
      : A(static_cast<T>(p.A)), Bf(static_cast<T>(p.Bf)), h1(static_cast<T>(p.h1)),
        h2(static_cast<T>(p.h2)), sa(static_cast<T>(p.alpha_scale)),
        sc(static_cast<T>(p.churn_scale)), cn(static_cast<T>(p.c_in_next)) {}
  PFG_HD T drift(T x, T F) const { return A * x + Bf * F; }
  PFG_HD T y2(T base, T d) const { return base + h2 * d; }
  PFG_HD T y1(T base, T d) const { return base + h1 * d; }
  PFG_HD T add_alpha(T y, float z) const { return y + sa * static_cast<T>(z); }
  PFG_HD T add_churn(T y, float z) const { return y + sc * static_cast<T>(z); }
  PFG_HD T net_in(T y1) const { return cn * y1; }
};

}  // namespace pfgmpp
