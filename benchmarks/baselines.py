"""The published PFGM++ code path for the three fused operations, written as plain torch.

What the published implementation (an EDM fork: training/loss.py, generate.py) does:

* perturbation (training loss): draws β ~ Beta(N/2, D/2) per sample **on the host with
  numpy**, clips it to [1e-3, 1 − 1e-3], forms R = r·√(β/(1−β+1e-8) + 1e-8) with
  r = σ√D, copies R to the device, draws a full Gaussian [B, N], normalises every row to the
  unit sphere (a norm reduction over N and a division), scales by R, adds y, and the network
  wrapper (EDMPrecond) then multiplies by c_in and casts in separate ops.  Every step is its
  own kernel launch and full read/write of [B, N].
* loss: the network output F becomes D_x = c_skip·x + c_out·F, then
  weight·(D_x − y)² with weight λ(σ), summed; backward runs through autograd over the same
  chain (the perturbed x is kept in memory for it).
* sampler: the state is float64; every step computes denoised = net(x).to(float64),
  d = (x − denoised)/t, x' = x + h·d and the Heun correction as separate float64 ops, then
  the network input (c_in·x).to(float32) in EDMPrecond.

These functions reproduce that work per call so benchmarks/bench_kernels.py can time it on
the same tensors as the fused ops.  They are a comparison baseline, not a spec.
"""

from __future__ import annotations

import numpy as np
import torch

from pfgmpp_fast import reference as R


def published_perturb_net_input(y, sigma, D, c_in, rng: np.random.Generator, out_dtype=torch.float32):
    """Host Beta draw + sphere normalisation + separate ops (reference.published_displacement),
    then c_in·x in out_dtype."""
    x = R.published_displacement(y, sigma, D, rng)
    return (c_in.view((-1,) + (1,) * (y.dim() - 1)) * x).to(out_dtype), x


def published_loss_fwd_bwd(F, x, y, sigma, c_skip, c_out, sigma_data=0.5):
    """weight·(c_skip·x + c_out·F − y)², summed / B, and dL/dF through autograd."""
    F = F.detach().requires_grad_(True)
    shape = (-1,) + (1,) * (y.dim() - 1)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    D_x = c_skip.view(shape) * x + c_out.view(shape) * F.to(torch.float32)
    loss = (weight.view(shape) * (D_x - y) ** 2).sum() / y.shape[0]
    loss.backward()
    return loss.detach(), F.grad


def published_sampler_stage1(x_hat, F, t_hat, t_next, c_skip, c_out, c_in_next):
    """float64 Euler step from the network output, plus the next network input."""
    denoised = (c_skip * x_hat.to(torch.float32) + c_out * F.to(torch.float32)).to(torch.float64)
    d_cur = (x_hat - denoised) / t_hat
    x_next = x_hat + (t_next - t_hat) * d_cur
    return x_next, d_cur, (c_in_next * x_next).to(torch.float32)


def published_sampler_stage2(x_hat, x_next, d_cur, F, t_hat, t_next, c_skip, c_out, c_in_next):
    """float64 Heun correction, plus the next network input."""
    denoised = (c_skip * x_next.to(torch.float32) + c_out * F.to(torch.float32)).to(torch.float64)
    d_prime = (x_next - denoised) / t_next
    x_new = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_new, (c_in_next * x_new).to(torch.float32)
