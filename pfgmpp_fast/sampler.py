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

NAN = float("nan")


class _NetAdapter:
    """F from either an EDMPrecond-like net (.raw, .sigma_data) or a plain denoiser D(x, σ)."""

    def __init__(self, net, B, device, class_labels):
        self.fused = hasattr(net, "raw") and hasattr(net, "sigma_data")
        self.net, self.B, self.device, self.labels = net, B, device, class_labels
        self.sd = float(net.sigma_data) if self.fused else None

    def coeffs(self, t: float):
        """(c_skip, c_out, c_in) at noise level t as Python floats."""
        return R.coefficients(t, self.sd)[:3] if self.fused else (0.0, 1.0, 1.0)

    def __call__(self, net_in, t: float):
        if self.fused:
            c_noise = torch.full((self.B,), R.coefficients(t, self.sd)[3], dtype=torch.float32, device=self.device)
            return self.net.raw(net_in, c_noise, self.labels)
        sigma = torch.full((self.B,), t, dtype=net_in.dtype, device=self.device)
        return self.net(net_in, sigma, self.labels)


class _StepFlags:
    """Per-seed index of the first step whose network output held NaN/Inf (-1: none), kept on
    the device: a few elementwise kernels per step, read once at the end of the call."""

    def __init__(self, B, device):
        self.first = torch.full((B,), -1, dtype=torch.int64, device=device)

    def update(self, F, step: int):
        bad = ~torch.isfinite(F).flatten(1).all(dim=1)
        self.first = torch.where((self.first < 0) & bad, step, self.first)


def sample(net, latents: torch.Tensor, D, key, seeds, num_steps: int = 18, sigma_min: float = 0.002,
           sigma_max: float = 80.0, rho: float = 7.0, solver: str = "heun", S_churn: float = 0.0,
           S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0, alpha: float = 0.0,
           class_labels=None, dtype=torch.float32, net_dtype=None, backend: str = "auto",
           progress: bool = False, channels_last=None, requires_grad: bool = False) -> torch.Tensor:
    """Heun / Euler sampling from latents at σ_max (reference.sample, fused steps).

    `net` is an EDMPrecond-like network (uses `.raw`: F from c_in·x, fused preconditioning)
    or any denoiser callable `net(x, sigma[B], class_labels) -> D(x)`.  dtype: state
    precision (float32 or float64); net_dtype: network input dtype (default float32 for
    an EDMPrecond-like net, the state dtype for a plain callable).  Runs under
    torch.no_grad() unless requires_grad=True (then on the differentiable reference updates).  NaN/Inf in the latents, in the network's
    output at any step or in the result raises FloatingPointError naming the seeds and the
    step (flags kept on the device, read once at the end).  D must be the network's own D.
    """
    sampler = Sampler(D, key, num_steps, sigma_min, sigma_max, rho, solver, S_churn, S_min, S_max, S_noise,
                      alpha, dtype, net_dtype, backend, progress, channels_last)
    return sampler(net, latents, seeds, class_labels, requires_grad)


class Sampler:
    """The sampler's options, checked once at construction; then called once per batch
    (generate.py builds one per run). `prior` draws the matching latents."""

    def __init__(self, D, key, num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, solver: str = "heun", S_churn: float = 0.0, S_min: float = 0.0,
                 S_max: float = float("inf"), S_noise: float = 1.0, alpha: float = 0.0, dtype=torch.float32,
                 net_dtype=None, backend: str = "auto", progress: bool = False, channels_last=None):
        self.D, self.key = checks.parse_D(D), checks.check_key(key)
        checks.check_sampler_options(solver, S_churn, S_min, S_max, S_noise, alpha, dtype)
        if net_dtype is not None and net_dtype not in ops.NET_DTYPES:
            raise TypeError(f"net_dtype must be one of {ops.NET_DTYPES}, got {net_dtype}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.t = R.time_steps(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64).tolist()  # host, once
        self.sigma_max = float(sigma_max)
        self.options = dict(solver=solver, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise,
                            alpha=alpha, dtype=dtype, net_dtype=net_dtype, backend=backend, progress=progress,
                            channels_last=channels_last)

    def prior(self, shape, seeds: torch.Tensor) -> torch.Tensor:
        """Latents at σ_max for `seeds` (checked int64 ids on the target device)."""
        return ops._prior(tuple(shape), self.D, self.sigma_max, self.key, seeds, self.options["dtype"],
                          self.options["backend"])

    def __call__(self, net, latents, seeds, class_labels=None, requires_grad: bool = False) -> torch.Tensor:
        checks.check_images("latents", latents)
        seeds = checks.check_sample_ids(seeds, name="seeds", device=latents.device)
        checks.check_images("latents", latents, batch=seeds.shape[0])
        checks.check_net_D(net, self.D)
        # The fused update kernels have no backward: a differentiable run takes the reference ops.
        options = dict(self.options, backend="reference") if requires_grad else self.options
        with torch.set_grad_enabled(bool(requires_grad)):
            return _sample(net, latents, self.key, seeds, self.t, class_labels=class_labels, **options)


def _sample(net, latents, key: int, seeds, t, solver="heun", S_churn=0.0, S_min=0.0, S_max=float("inf"),
            S_noise=1.0, alpha=0.0, class_labels=None, dtype=torch.float32, net_dtype=None, backend="auto",
            progress=False, channels_last=None) -> torch.Tensor:
    """`sample` on checked arguments and the schedule t (n + 1 Python floats); reports NaN/Inf."""
    adapter = _NetAdapter(net, latents.shape[0], latents.device, class_labels)
    if net_dtype is None:
        net_dtype = torch.float32 if adapter.fused else dtype
    if channels_last is None:
        channels_last = bool(getattr(net, "channels_last", False))
    channels_last = bool(channels_last) and latents.dim() == 4
    report = checks.DeviceReport()
    report.ids(seeds, "seeds")
    report.nonfinite("latents", latents, seeds, "seeds")
    x = latents.to(dtype).contiguous()
    if latents.shape[0] == 0:  # nothing to sample; do not call the network with an empty batch
        return x.clone()
    flags = _StepFlags(latents.shape[0], latents.device)
    stepper = _Stepper(adapter, seeds, key, t, solver, S_churn, S_min, S_max, S_noise, alpha, dtype, net_dtype,
                       backend, channels_last)
    x = stepper.run(x, flags, progress)
    n = len(t) - 1
    report.add(flags.first, lambda rows, steps: f"the network returned NaN/Inf for seeds "
               f"{checks.format_ids(seeds, rows)} (first at step {sorted(set(steps))[:8]} of steps 0..{n - 1})")
    report.nonfinite("the sampled images", x, seeds, "seeds",
                     hint=" (the sampler update overflowed; check the schedule and the network's scale)")
    report.raise_if_any()
    return x


class _Stepper:
    """The step loop on the fused sampler-update kernel (two calls per Heun step, one per Euler)."""

    def __init__(self, adapter, seeds, key, t, solver, S_churn, S_min, S_max, S_noise, alpha, dtype, net_dtype,
                 backend, channels_last):
        self.adapter, self.seeds, self.key, self.t, self.solver = adapter, seeds, key, t, solver
        self.churn = (S_churn, S_min, S_max, S_noise)
        self.alpha, self.dtype, self.net_dtype, self.backend = alpha, dtype, net_dtype, backend
        self.channels_last = channels_last
        # A plain denoiser whose input is the state itself (c_in = 1, same dtype, contiguous) reads
        # y1 directly: no separate network-input copy is written.
        self.state_is_net_input = not adapter.fused and net_dtype == dtype and not channels_last
        self.num_steps = len(t) - 1

    def step_noise(self, i):
        """(t̂_i, α scale, churn scale, i) of step i, or None past the last step."""
        if i >= self.num_steps:
            return None
        S_churn, S_min, S_max, S_noise = self.churn
        t_cur = self.t[i]
        gamma = min(S_churn / self.num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        churn = math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise if gamma > 0 else 0.0
        return t_hat, (self.alpha * t_cur if self.alpha > 0 else 0.0), churn, i

    def c_in_of(self, noise):
        return NAN if noise is None else self.adapter.coeffs(noise[0])[2]

    def update(self, x, F, base, A, Bf, h1, h2, noise, c_in_next):
        a_s, c_s, i = (0.0, 0.0, 0) if noise is None else noise[1:4]
        direct = self.state_is_net_input and not math.isnan(c_in_next)
        y1, y2, net_in = ops.sampler_update(x, F, base, A, Bf, h1, h2, self.seeds, self.key, a_s, R.stream_alpha(i),
                                            c_s, R.stream_churn(i), NAN if direct else c_in_next,
                                            self.net_dtype, self.channels_last, backend=self.backend)
        return y1, y2, (y1 if direct else net_in)

    def run(self, x, flags: _StepFlags, progress: bool):
        adapter, t = self.adapter, self.t
        nz = self.step_noise(0)
        x_hat, _, net_in = self.update(x, None, None, 0.0, 0.0, 0.0, NAN, nz, self.c_in_of(nz))
        steps = range(self.num_steps)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc="sampling", unit="step")
        for i in steps:
            t_hat, t_next = nz[0], t[i + 1]
            h = t_next - t_hat
            c_skip, c_out, _ = adapter.coeffs(t_hat)
            F = adapter(net_in, t_hat)
            flags.update(F, i)
            nz_next = self.step_noise(i + 1)
            if self.solver == "heun" and i < self.num_steps - 1:
                c_skip2, c_out2, c_in_t = adapter.coeffs(t_next)
                x_prime, base, net_in = self.update(x_hat, F, None, (1.0 - c_skip) / t_hat, -c_out / t_hat, h,
                                                    0.5 * h, None, c_in_t)
                F2 = adapter(net_in, t_next)
                flags.update(F2, i)
                x_hat, _, net_in = self.update(x_prime, F2, base, (1.0 - c_skip2) / t_next, -c_out2 / t_next,
                                               0.5 * h, NAN, nz_next, self.c_in_of(nz_next))
            else:
                x_hat, _, net_in = self.update(x_hat, F, None, (1.0 - c_skip) / t_hat, -c_out / t_hat, h, NAN,
                                               nz_next, self.c_in_of(nz_next))
            nz = nz_next
        return x_hat
