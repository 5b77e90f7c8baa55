"""EDM Algorithm 2 with the PFGM++ prior on the fused sampler-update kernel.

Per step i (t̂ = t_i(1+γ)), the kernel calls are
    stage 1: x' = x̂ + h·d,  base = x̂ + (h/2)·d,  net input c_in(t_{i+1})·x'
    stage 2: x_{i+1} = base + (h/2)·d'  (+ step i+1's α and churn noise, giving x̂_{i+1}),
             net input c_in(t̂_{i+1})·x̂_{i+1}
with d = A·x + Bf·F (A = (1 − c_skip)/t, Bf = −c_out/t).  Euler steps (the last one, or
solver='euler') are one call.  All schedule scalars are Python floats computed once; nothing
goes back to the host inside the loop.
"""
from __future__ import annotations

import math

import torch

from pfgmpp_fast import ops
from pfgmpp_fast import checks
from pfgmpp_fast import reference as R


class _NetAdapter:
    """F from either an EDMPrecond-like net (.raw, .sigma_data) or a plain denoiser D(x, σ)."""

    def __init__(self, net, B, device, class_labels):
        self.fused = hasattr(net, "raw") and hasattr(net, "sigma_data")
        self.net, self.B, self.device, self.labels = net, B, device, class_labels
        self.sd = float(net.sigma_data) if self.fused else None

    def coeffs(self, t: float):
        """(c_skip, c_out, c_in) at noise level t as Python floats."""
        if not self.fused:
            return 0.0, 1.0, 1.0
        sd2 = self.sd ** 2
        return sd2 / (t * t + sd2), t * self.sd / math.sqrt(t * t + sd2), 1.0 / math.sqrt(t * t + sd2)

    def __call__(self, net_in, t: float):
        if self.fused:
            c_noise = torch.full((self.B,), math.log(t) / 4, dtype=torch.float32, device=self.device)
            return self.net.raw(net_in, c_noise, self.labels)
        sigma = torch.full((self.B,), t, dtype=net_in.dtype, device=self.device)
        return self.net(net_in, sigma, self.labels)


def sample(net, latents: torch.Tensor, D, key, seeds, num_steps: int = 18, sigma_min: float = 0.002,
           sigma_max: float = 80.0, rho: float = 7.0, solver: str = "heun", S_churn: float = 0.0,
           S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0, alpha: float = 0.0,
           class_labels=None, dtype=torch.float32, net_dtype=None, backend: str = "auto",
           progress: bool = False, channels_last=None) -> torch.Tensor:
    """Heun / Euler sampling from latents at σ_max (reference.sample, fused steps).

    `net` is an EDMPrecond-like network (uses `.raw`: F from c_in·x, fused preconditioning)
    or any denoiser callable `net(x, sigma[B], class_labels) -> D(x)`.  dtype: state
    precision (float32 or float64); net_dtype: network input dtype (default float32 for
    an EDMPrecond-like net, the state dtype for a plain callable).
    """
    checks.check_images("latents", latents)
    seeds = checks.check_sample_ids(seeds, name="seeds", device=latents.device)
    checks.check_images("latents", latents, batch=seeds.shape[0])
    key = checks.check_key(key)
    checks.check_D(D)
    checks.check_sampler_options(solver, S_churn, S_min, S_max, S_noise, alpha, dtype)
    B = latents.shape[0]
    adapter = _NetAdapter(net, B, latents.device, class_labels)
    if net_dtype is None:
        net_dtype = torch.float32 if adapter.fused else dtype
    if net_dtype not in ops.NET_DTYPES:
        raise TypeError(f"net_dtype must be one of {ops.NET_DTYPES}, got {net_dtype}")
    if channels_last is None:
        channels_last = bool(getattr(net, "channels_last", False))
    channels_last = bool(channels_last) and latents.dim() == 4
    t = R.time_steps(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64).tolist()  # host, once
    nan = float("nan")

    def step_noise(i):
        """(t̂_i, α scale, churn scale) of step i."""
        t_cur = t[i]
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        churn = math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise if gamma > 0 else 0.0
        return t_hat, (alpha * t_cur if alpha > 0 else 0.0), churn

    # A plain denoiser whose input is the state itself (c_in = 1, same dtype, contiguous) reads
    # y1 directly: no separate network-input copy is written.
    state_is_net_input = not adapter.fused and net_dtype == dtype and not channels_last

    def update(x, F, base, A, Bf, h1, h2, noise_step, c_in_next):
        a_s, c_s = (0.0, 0.0) if noise_step is None else noise_step[1:3]
        i = 0 if noise_step is None else noise_step[3]
        direct = state_is_net_input and not math.isnan(c_in_next)
        y1, y2, net_in = ops.sampler_update(x, F, base, A, Bf, h1, h2, seeds, key, a_s, R.stream_alpha(i),
                                            c_s, R.stream_churn(i), nan if direct else c_in_next,
                                            net_dtype, channels_last, backend=backend)
        return y1, y2, (y1 if direct else net_in)

    def noise_of(i):
        if i >= num_steps:
            return None, nan
        t_hat, a_s, c_s = step_noise(i)
        return (t_hat, a_s, c_s, i), adapter.coeffs(t_hat)[2]

    x = latents.to(dtype).contiguous()
    if B == 0:  # nothing to sample; do not call the network with an empty batch
        return x.clone()
    nz, c_in0 = noise_of(0)
    x_hat, _, net_in = update(x, None, None, 0.0, 0.0, 0.0, nan, nz, c_in0)
    steps = range(num_steps)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="sampling", unit="step")
    for i in steps:
        t_hat, t_next = nz[0], t[i + 1]
        h = t_next - t_hat
        c_skip, c_out, _ = adapter.coeffs(t_hat)
        A, Bf = (1.0 - c_skip) / t_hat, -c_out / t_hat
        F = adapter(net_in, t_hat)
        nz_next, c_in_next = noise_of(i + 1)
        if solver == "heun" and i < num_steps - 1:
            c_in_t = adapter.coeffs(t_next)[2]
            x_prime, base, net_in = update(x_hat, F, None, A, Bf, h, 0.5 * h, None, c_in_t)
            F2 = adapter(net_in, t_next)
            c_skip2, c_out2, _ = adapter.coeffs(t_next)
            x_hat, _, net_in = update(x_prime, F2, base, (1.0 - c_skip2) / t_next, -c_out2 / t_next,
                                      0.5 * h, nan, nz_next, c_in_next)
        else:
            x_hat, _, net_in = update(x_hat, F, None, A, Bf, h, nan, nz_next, c_in_next)
        nz = nz_next
    return x_hat
