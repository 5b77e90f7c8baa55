"""The multistep solvers' spec (readable, float64 capable): one step of the probability-flow ODE
dx/dσ = (x − D(x; σ))/σ — the same for every D; only the prior depends on D — on the schedule
t_0 = σ_max > ... > t_{n-1} = σ_min > t_n = 0, one network evaluation D_i = D(x_i; t_i) per step
(n NFE). `reference.sample` runs them; `sampler.py` runs them on the fused sampler_update op.

- 'dpmpp2m': DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling
  of Diffusion Probabilistic Models", Algorithm 2) in EDM's parametrisation (α_t = 1, σ_t = σ,
  λ = −log σ). With h_i = λ_{i+1} − λ_i = log(t_i / t_{i+1}) and r_i = h_{i−1} / h_i:
      x_{i+1} = (t_{i+1}/t_i)·x_i − (e^{−h_i} − 1)·D',
      D' = (1 + 1/(2 r_i))·D_i − (1/(2 r_i))·D_{i−1},
  first order (D' = D_i) on the first step; the last step (t_n = 0, h = ∞) returns D_{n−1}.
  This is k-diffusion's `sample_dpmpp_2m` on `get_sigmas_karras(n, σ_min, σ_max, ρ)`.
- 'ipndm': improved PNDM (Zhang & Chen 2023, DEIS code; Zhou et al. 2024, "Fast ODE-based
  sampling for diffusion models in around 5 steps"): Adams–Bashforth in σ on the slopes
  d_j = (x_j − D_j)/t_j with the fixed coefficients of order min(i + 1, 4):
      x_{i+1} = x_i + (t_{i+1} − t_i)·Σ_k c_k·d_{i−k}.
  The fixed coefficients assume equal steps; EDM's ρ-schedule is far from that.
- 'ipndm_v': the variable-step version (iPNDM-v, Zhou et al. 2024, appendix): the same update
  with c_k = ∫ ℓ_k(σ) dσ / (t_{i+1} − t_i) over [t_i, t_{i+1}], ℓ_k the Lagrange basis on the
  nodes t_i, t_{i−1}, ... (the exact Adams–Bashforth weights on this grid; equal steps give
  the fixed ones).
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "IPNDM_COEFFICIENTS",
    "adams_bashforth_coefficients",
    "dpmpp2m_step",
    "ipndm_coefficients",
    "ipndm_step",
    "multistep_step",
]

# Adams–Bashforth coefficients (newest slope first) of orders 1 to 4.
IPNDM_COEFFICIENTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def dpmpp2m_step(
    x: torch.Tensor, denoised: torch.Tensor, t: Sequence[float], i: int, history: List[torch.Tensor]
) -> torch.Tensor:
    """x_{i+1} of DPM-Solver++(2M); `history` holds D_{i−1} (empty on the first step) and is
    replaced by [D_i]."""
    t_cur, t_next = t[i], t[i + 1]
    if t_next == 0:
        x_next = denoised  # h = ∞: e^{−h} = 0, first order
    else:
        h = math.log(t_cur / t_next)
        if history:
            r = math.log(t[i - 1] / t_cur) / h
            d_prime = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * history[-1]
        else:
            d_prime = denoised
        x_next = (t_next / t_cur) * x - math.expm1(-h) * d_prime
    history[:] = [denoised]
    return x_next


def adams_bashforth_coefficients(nodes: Sequence[float], t_from: float, t_to: float) -> Tuple[float, ...]:
    """(1 / (t_to − t_from))·∫ ℓ_k(σ) dσ over [t_from, t_to] for the Lagrange basis ℓ_k on `nodes`
    (newest first): 4-point Gauss–Legendre, exact for these polynomials of degree <= 3."""
    z, w = np.polynomial.legendre.leggauss(4)
    s = t_from + (z + 1) / 2 * (t_to - t_from)
    out = []
    for k, node in enumerate(nodes):
        basis = np.ones_like(s)
        for j, other in enumerate(nodes):
            if j != k:
                basis = basis * (s - other) / (node - other)
        out.append(float(np.sum(w * basis) / 2))
    return tuple(out)


def ipndm_coefficients(solver: str, t: Sequence[float], i: int) -> Tuple[float, ...]:
    """The weights c_0 (of d_i), c_1 (of d_{i−1}), ... of step i: order min(i + 1, 4)."""
    order = min(i + 1, 4)
    if solver == "ipndm":
        return IPNDM_COEFFICIENTS[order - 1]
    return adams_bashforth_coefficients([t[i - k] for k in range(order)], t[i], t[i + 1])


def ipndm_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    t: Sequence[float],
    i: int,
    history: List[torch.Tensor],
    solver: str = "ipndm",
) -> torch.Tensor:
    """x_{i+1} of iPNDM (solver 'ipndm') or iPNDM-v ('ipndm_v'); `history` holds the earlier
    slopes d_j (oldest first, at most 3) and gets d_i."""
    history.append((x - denoised) / t[i])
    del history[:-4]
    slope = sum(c * d for c, d in zip(ipndm_coefficients(solver, t, i), reversed(history)))
    del history[:-3]
    return x + (t[i + 1] - t[i]) * slope


def multistep_step(solver: str, x, denoised, t, i, history):
    """One step of `solver` (checks.MULTISTEP_SOLVERS)."""
    if solver == "dpmpp2m":
        return dpmpp2m_step(x, denoised, t, i, history)
    return ipndm_step(x, denoised, t, i, history, solver)
