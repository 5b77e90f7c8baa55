"""EDM Algorithm 2 with the PFGM++ prior on the fused sampler-update kernel.

Per step i (t̂ = t_i(1+γ)), the kernel calls are
    stage 1: x' = x̂ + h·d,  base = x̂ + (h/2)·d,  net input c_in(t_{i+1})·x'
    stage 2: x_{i+1} = base + (h/2)·d'  (+ step i+1's α and churn noise, giving x̂_{i+1}),
             net input c_in(t̂_{i+1})·x̂_{i+1}
with d = A·x + Bf·F (A = (1 − c_skip)/t, Bf = −c_out/t).  Euler steps (the last one, or
solver='euler') are one call.  The multistep solvers (DPM-Solver++(2M), iPNDM, iPNDM-v:
one network evaluation per step) are `_MultistepStepper`, on the same op.  All schedule
scalars are Python floats computed once, the network's noise inputs one table sent once per
call; nothing goes back to the host inside the loop.

The settings are one frozen `SamplerOptions`, checked when built; `sample` and `Sampler` take
it as `options=` and/or its fields as keywords (`sampler_options`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from pfgmpp_fast import checks, ops
from pfgmpp_fast import reference as R
from pfgmpp_fast import reference_multistep as RM
from pfgmpp_fast.guidance import UNCOND, Guide, check_guide
from pfgmpp_fast.networks import is_precond_net
from pfgmpp_fast.utils import distributed
from pfgmpp_fast.utils.cli_errors import InvalidValue

__all__ = ["SamplerOptions", "SOLVERS", "UNCOND", "sampler_options", "split_sampler_options", "sample", "Sampler"]

# A new solver: its name in checks.SOLVERS, its network evaluations in SamplerOptions.nfe, its step
# loop next to _Stepper.
SOLVERS = checks.SOLVERS


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """How to sample (EDM's Algorithm 2 settings, named as there): the schedule, the solver, the
    stochasticity and the numerics. Shared by `sample`, `Sampler`, `generate`, FID and sweeps.
    Checked once, here (every error names the field, the value and the allowed range);
    `replace(...)` gives a changed copy, checked again."""

    num_steps: int = 18  # n steps: t_0 = sigma_max > ... > t_{n-1} = sigma_min, t_n = 0
    sigma_min: float = 0.002  # the last noise level, in (0, sigma_max]
    sigma_max: float = 80.0  # the first noise level (the prior's σ), in (0, 1e30]
    rho: float = 7.0  # schedule exponent ρ (EDM eq. 5), > 0
    solver: str = "heun"  # one of SOLVERS: 'heun' (2nd order, Euler on the last step) | 'euler' |
    # multistep, 1 NFE per step: 'dpmpp2m' (DPM-Solver++(2M)) | 'ipndm' |
    # 'ipndm_v' (iPNDM, variable-step iPNDM; see reference_multistep)
    S_churn: float = 0.0  # churn γ = min(S_churn / n, √2 − 1) for t_i in [S_min, S_max]; >= 0
    S_min: float = 0.0  # lowest noise level that gets churn, >= 0
    S_max: float = float("inf")  # highest noise level that gets churn, >= S_min
    S_noise: float = 1.0  # scale of the churn noise, >= 0
    alpha: float = 0.0  # robustness noise x += α·t_i·ε before each step, >= 0 (0: off)
    guidance: float = 1.0  # guidance weight W: D_G + W·(D − D_G) with the guide `gnet`, finite,
    # >= 0 (1: no guidance, the guide is not called)
    dtype: torch.dtype = torch.float32  # sampler state precision: float32 | float64
    net_dtype: Optional[torch.dtype] = None  # network input dtype (None: float32 for an EDMPrecond-like
    # network, else `dtype`)
    channels_last: Optional[bool] = None  # channels-last network input (None: the network's channels_last)
    backend: str = "auto"  # fused-op backend, one of checks.BACKENDS
    progress: bool = False  # a progress bar over the steps

    def __post_init__(self):
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen: normalise once)
        fix("num_steps", int(checks.check_number("num_steps", self.num_steps, integer=True)))
        fix("sigma_min", checks.check_positive("sigma_min", self.sigma_min))
        fix("sigma_max", checks.check_sigma_max("sigma_max", self.sigma_max))
        if self.sigma_min > self.sigma_max:
            raise ValueError(f"sigma_min must be in (0, sigma_max = {self.sigma_max:g}], got {self.sigma_min:g}")
        fix("rho", checks.check_positive("rho", self.rho))
        checks.check_sampler_options(
            self.solver, self.S_churn, self.S_min, self.S_max, self.S_noise, self.alpha, self.dtype
        )
        for name in ("S_churn", "S_min", "S_max", "S_noise", "alpha"):
            fix(name, float(getattr(self, name)))
        fix("guidance", float(checks.check_number("guidance", self.guidance, allow_zero=True)))
        if self.net_dtype is not None and self.net_dtype not in ops.NET_DTYPES:
            raise TypeError(f"net_dtype must be None or one of {ops.NET_DTYPES}, got {self.net_dtype}")
        if self.channels_last is not None:
            fix("channels_last", checks.as_bool("channels_last", self.channels_last))
        checks.check_backend(self.backend)
        fix("progress", checks.as_bool("progress", self.progress))

    @property
    def nfe(self) -> int:
        """Network evaluations per image."""
        return 2 * self.num_steps - 1 if self.solver == "heun" else self.num_steps

    def replace(self, **changes) -> "SamplerOptions":
        return sampler_options(self, **changes)

    def describe(self) -> dict:
        """The settings that can change an image, JSON-able (dtypes as text, inf as 'inf'), e.g. for
        the configuration of FID shards. Left out: progress, guidance 1 (no guidance), and what is
        None (then resolved from the network, which the caller describes)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "progress" or value is None or (f.name == "guidance" and value == 1.0):
                continue
            out[f.name] = (
                str(value)
                if isinstance(value, torch.dtype)
                else repr(value)
                if isinstance(value, float) and not math.isfinite(value)
                else value
            )
        return out


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(SamplerOptions))


def sampler_options(options: Optional[SamplerOptions] = None, **settings) -> SamplerOptions:
    """`options` (default: SamplerOptions()) with `settings` (SamplerOptions fields) replaced, checked."""
    unknown = sorted(set(settings) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown sampler option(s): {', '.join(unknown)}; known: {', '.join(OPTION_NAMES)}")
    if options is None:
        return SamplerOptions(**settings)
    if not isinstance(options, SamplerOptions):
        raise TypeError(f"options must be a SamplerOptions, got {type(options).__name__}")
    return dataclasses.replace(options, **settings) if settings else options


def split_sampler_options(kwargs: dict):
    """(SamplerOptions of kwargs' `options` and sampler settings, the other kwargs)."""
    rest = dict(kwargs)
    settings = {name: rest.pop(name) for name in OPTION_NAMES if name in rest}
    return sampler_options(rest.pop("options", None), **settings), rest


class _NetAdapter:
    """F from either an EDMPrecond-like net (.raw, .sigma_data) or a plain denoiser D(x, σ);
    with a guide (guidance.Guide), the guided F_G + W·(F − F_G) or D_G + W·(D − D_G)."""

    def __init__(self, net, B, device, class_labels, guide: Optional[Guide] = None):
        # EDMPrecond-like: the sampler calls net.raw and applies c_skip / c_out / c_in in the update kernels.
        self.precond_in_kernels = is_precond_net(net) and (guide is None or guide.raw_compatible)
        self.net, self.B, self.device, self.labels, self.guide = net, B, device, class_labels, guide
        self.sd = float(net.sigma_data) if self.precond_in_kernels else None
        self.noise_inputs = {}

    def coeffs(self, t: float):
        """(c_skip, c_out, c_in) at noise level t as Python floats."""
        return R.coefficients(t, self.sd)[:3] if self.precond_in_kernels else (0.0, 1.0, 1.0)

    def prepare(self, levels, net_dtype) -> None:
        """The network's noise input [B] at every noise level of the call (c_noise, or σ in
        `net_dtype` for a plain denoiser), made on the host and sent in one copy, so the step
        loop launches nothing for it. The values are converted as torch.full converts them (one
        conversion, c10::convert), and each row starts aligned like a fresh allocation."""
        levels = sorted(set(levels))
        dtype = torch.float32 if self.precond_in_kernels else net_dtype
        values = [R.coefficients(t, self.sd)[3] for t in levels] if self.precond_in_kernels else levels
        values = torch.tensor(values, dtype=dtype)  # on the host
        if not bool(torch.isfinite(values).all()):  # torch.full would refuse to convert them
            raise InvalidValue("net_dtype", f"{dtype} cannot hold the denoiser's σ input up to {max(levels):g}")
        table = torch.empty(len(levels), -(-self.B // _ROW_ALIGN) * _ROW_ALIGN, dtype=dtype)
        table[:, : self.B] = values.unsqueeze(1)
        rows = distributed.to_device(table, self.device)[:, : self.B].unbind(0)
        self.noise_inputs = dict(zip(levels, rows))

    def __call__(self, net_in, t: float):
        noise = self.noise_inputs[t]
        if self.precond_in_kernels:
            if self.guide is not None:
                return self.guide.raw(net_in, noise)
            return self.net.raw(net_in, noise, self.labels)
        if self.guide is not None:
            return self.guide.denoise(net_in, noise)
        return self.net(net_in, noise, self.labels)


_ROW_ALIGN = 128  # elements: 512 bytes in float32, the CUDA caching allocator's alignment


class _StepFlags:
    """Per-seed index of the first step whose network output held NaN/Inf (-1: none). One
    reduction per network evaluation, kept on the device: max |F| per sample (an ∞-norm, which
    propagates NaN, so it is finite exactly when every element is); `first` reduces them once
    at the end of the call."""

    def __init__(self, B, device):
        self.B, self.device = B, device
        self.peaks = []  # per step: the max |F| [B] of each of its network evaluations

    def update(self, F, step: int):
        with torch.no_grad():
            peak = torch.linalg.vector_norm(F, math.inf, dim=tuple(range(1, F.dim())))
        if step == len(self.peaks):
            self.peaks.append([peak])
        else:
            self.peaks[step].append(peak)

    @property
    def first(self) -> torch.Tensor:
        if not self.peaks:
            return torch.full((self.B,), -1, dtype=torch.int64, device=self.device)
        n, k = len(self.peaks), max(map(len, self.peaks))  # k evaluations per step: repeat a step's last
        rows = [step[min(j, len(step) - 1)] for step in self.peaks for j in range(k)]
        bad = ~torch.isfinite(torch.stack(rows).view(n, k, self.B)).all(dim=1)
        steps = torch.arange(n, dtype=torch.int64, device=self.device).unsqueeze(1)
        first = torch.where(bad, steps, n).amin(dim=0)
        return torch.where(first == n, -1, first)


def sample(
    net,
    latents: torch.Tensor,
    D,
    key,
    seeds,
    options: Optional[SamplerOptions] = None,
    *,
    class_labels=None,
    requires_grad: bool = False,
    gnet=None,
    **settings,
) -> torch.Tensor:
    """Heun / Euler / multistep (dpmpp2m, ipndm, ipndm_v) sampling from latents at σ_max
    (reference.sample, fused steps).

    `options`: a SamplerOptions; keyword `settings` (its fields: num_steps=, solver=, S_churn=,
    dtype=, backend=, ...) build one or replace its fields.
    `net` is an EDMPrecond-like network (uses `.raw`: F from c_in·x, the preconditioning in the
    update kernels) or any denoiser callable `net(x, sigma[B], class_labels) -> D(x)`. Runs
    under torch.no_grad() unless requires_grad=True (then on the differentiable reference
    updates). NaN/Inf in the latents, in the network's output at any step or in the result
    raises FloatingPointError naming the seeds and the step (flags kept on the device, read
    once at the end). D must be the network's own D.
    `guidance=W` (a setting) with `gnet`: the guided denoiser D_G + W·(D − D_G) (guidance.py);
    gnet is another network or denoiser of the same D (autoguidance) or UNCOND ('uncond': `net`
    without labels, classifier-free guidance, one batched call). W = 1 ignores gnet.
    """
    return Sampler(D, key, options, **settings)(net, latents, seeds, class_labels, requires_grad, gnet=gnet)


class Sampler:
    """D, key and the SamplerOptions, checked once at construction (options= and/or keyword
    settings, as `sample`); then called once per batch (generate.py builds one per run).
    `prior` draws the matching latents."""

    def __init__(self, D, key, options: Optional[SamplerOptions] = None, **settings):
        self.D, self.key = checks.parse_D(D), checks.check_key(key)
        self.options = sampler_options(options, **settings)
        o = self.options
        self.t = R.time_steps(o.num_steps, o.sigma_min, o.sigma_max, o.rho, dtype=torch.float64).tolist()  # once

    @property
    def sigma_max(self) -> float:
        return self.options.sigma_max

    def prior(self, shape, seeds: torch.Tensor) -> torch.Tensor:
        """Latents at σ_max for `seeds` (checked int64 ids on the target device)."""
        o = self.options
        return ops.prior_unchecked(tuple(shape), self.D, o.sigma_max, self.key, seeds, o.dtype, o.backend)

    def __call__(
        self, net, latents, seeds, class_labels=None, requires_grad: bool = False, *, gnet=None
    ) -> torch.Tensor:
        checks.check_images("latents", latents)
        seeds = checks.check_sample_ids(seeds, name="seeds", device=latents.device)
        checks.check_images("latents", latents, batch=seeds.shape[0])
        checks.check_net_D(net, self.D)
        gnet = check_guide(net, gnet, self.options.guidance, self.D)  # None: unguided
        # The fused update kernels have no backward: a differentiable run takes the reference ops.
        options = dataclasses.replace(self.options, backend="reference") if requires_grad else self.options
        with torch.set_grad_enabled(bool(requires_grad)):
            return _sample(net, latents, self.key, seeds, self.t, options, class_labels, gnet)


def _sample(net, latents, key: int, seeds, t, options: SamplerOptions, class_labels=None, gnet=None) -> torch.Tensor:
    """`sample` on checked arguments and the schedule t (n + 1 Python floats), guided by the
    checked `gnet` (None: unguided); reports NaN/Inf."""
    B = latents.shape[0]
    guide = None if gnet is None else Guide(net, gnet, options.guidance, class_labels, B, latents.device)
    adapter = _NetAdapter(net, B, latents.device, class_labels, guide)
    net_dtype = options.net_dtype
    if net_dtype is None:
        net_dtype = torch.float32 if adapter.precond_in_kernels else options.dtype
    channels_last = options.channels_last
    if channels_last is None:
        channels_last = bool(getattr(net, "channels_last", False))
    channels_last = channels_last and latents.dim() == 4
    report = checks.DeviceReport()
    report.ids(seeds, "seeds")
    report.nonfinite("latents", latents, seeds, "seeds")
    x = latents.to(options.dtype).contiguous()
    if latents.shape[0] == 0:  # nothing to sample; do not call the network with an empty batch
        return x.clone()
    flags = _StepFlags(latents.shape[0], latents.device)
    stepper_class = _MultistepStepper if options.solver in checks.MULTISTEP_SOLVERS else _Stepper
    stepper = stepper_class(adapter, seeds, key, t, options, net_dtype, channels_last)
    x = stepper.run(x, flags, options.progress)
    n = len(t) - 1
    report.add(
        flags.first,
        lambda rows, steps: (
            f"the network returned NaN/Inf for seeds "
            f"{checks.format_ids(seeds, rows)} (first at step {sorted(set(steps))[:8]} of steps 0..{n - 1})"
        ),
    )
    report.nonfinite(
        "the sampled images",
        x,
        seeds,
        "seeds",
        hint=" (the sampler update overflowed; check the schedule and the network's scale)",
    )
    report.raise_if_any()
    return x


class _Stepper:
    """The step loop on the fused sampler-update kernel (two calls per Heun step, one per Euler)."""

    def __init__(self, adapter, seeds, key, t, options: SamplerOptions, net_dtype, channels_last: bool):
        self.adapter, self.seeds, self.key, self.t, self.options = adapter, seeds, key, t, options
        self.net_dtype, self.channels_last = net_dtype, channels_last
        # A plain denoiser whose input is the state itself (c_in = 1, same dtype, contiguous) reads
        # y1 directly: no separate network-input copy is written.
        self.state_is_net_input = not adapter.precond_in_kernels and net_dtype == options.dtype and not channels_last
        self.num_steps = len(t) - 1

    def step_noise(self, i):
        """(t̂_i, α scale, churn scale, i) of step i, or None past the last step."""
        if i >= self.num_steps:
            return None
        o, t_cur = self.options, self.t[i]
        gamma = min(o.S_churn / self.num_steps, math.sqrt(2) - 1) if o.S_min <= t_cur <= o.S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        churn = math.sqrt(t_hat**2 - t_cur**2) * o.S_noise if gamma > 0 else 0.0
        return t_hat, (o.alpha * t_cur if o.alpha > 0 else 0.0), churn, i

    def c_in_of(self, noise):
        """c_in of the next network input, or None after the last step (no network input)."""
        return None if noise is None else self.adapter.coeffs(noise[0])[2]

    def update(self, x, F, base, A, Bf, h1, h2, noise, c_in_next):
        """One sampler_update; h2 / c_in_next None: no y2 / no network input."""
        a_s, c_s, i = (0.0, 0.0, 0) if noise is None else noise[1:4]
        direct = self.state_is_net_input and c_in_next is not None
        y1, y2, net_in = ops.sampler_update(
            x,
            F,
            base,
            A,
            Bf,
            h1,
            h2,
            self.seeds,
            self.key,
            a_s,
            R.stream_alpha(i),
            c_s,
            R.stream_churn(i),
            None if direct else c_in_next,
            self.net_dtype,
            self.channels_last,
            backend=self.options.backend,
        )
        return y1, y2, (y1 if direct else net_in)

    def noise_levels(self):
        """Where the network is evaluated: t̂_i of every step, and t_{i+1} of each Heun correction."""
        heun = self.t[1 : self.num_steps] if self.options.solver == "heun" else []
        return [self.step_noise(i)[0] for i in range(self.num_steps)] + heun

    def run(self, x, flags: _StepFlags, progress: bool):
        adapter, t = self.adapter, self.t
        adapter.prepare(self.noise_levels(), self.net_dtype)
        nz = self.step_noise(0)
        x_hat, _, net_in = self.update(x, None, None, 0.0, 0.0, 0.0, None, nz, self.c_in_of(nz))
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
            if self.options.solver == "heun" and i < self.num_steps - 1:
                c_skip2, c_out2, c_in_t = adapter.coeffs(t_next)
                x_prime, base, net_in = self.update(
                    x_hat, F, None, (1.0 - c_skip) / t_hat, -c_out / t_hat, h, 0.5 * h, None, c_in_t
                )
                F2 = adapter(net_in, t_next)
                flags.update(F2, i)
                x_hat, _, net_in = self.update(
                    x_prime,
                    F2,
                    base,
                    (1.0 - c_skip2) / t_next,
                    -c_out2 / t_next,
                    0.5 * h,
                    None,
                    nz_next,
                    self.c_in_of(nz_next),
                )
            else:
                x_hat, _, net_in = self.update(
                    x_hat, F, None, (1.0 - c_skip) / t_hat, -c_out / t_hat, h, None, nz_next, self.c_in_of(nz_next)
                )
            nz = nz_next
        return x_hat


class _MultistepStepper(_Stepper):
    """DPM-Solver++(2M) / iPNDM / iPNDM-v (reference_multistep) on the fused sampler_update op,
    one network evaluation per step (no churn: t̂_i = t_i). The history — D_{i−1}, or the slopes
    d_j — stays on the device as op outputs; all coefficients are Python floats."""

    def noise_levels(self):
        return self.t[: self.num_steps]

    def run(self, x, flags: _StepFlags, progress: bool):
        adapter, t = self.adapter, self.t
        adapter.prepare(self.noise_levels(), self.net_dtype)
        nz = self.step_noise(0)
        x, _, net_in = self.update(x, None, None, 0.0, 0.0, 0.0, None, nz, self.c_in_of(nz))
        step = self.dpmpp2m_step if self.options.solver == "dpmpp2m" else self.ipndm_step
        if self.options.solver != "dpmpp2m":  # iPNDM: the base of d_i, and every step's weights, once
            self.zeros = torch.zeros_like(x)
            self.weights = [RM.ipndm_coefficients(self.options.solver, t, i) for i in range(self.num_steps)]
        history = []
        steps = range(self.num_steps)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="sampling", unit="step")
        for i in steps:
            c_skip, c_out, _ = adapter.coeffs(t[i])
            F = adapter(net_in, t[i])
            flags.update(F, i)
            x, net_in = step(i, x, F, (1.0 - c_skip) / t[i], -c_out / t[i], history, self.step_noise(i + 1))
        return x

    def dpmpp2m_step(self, i, x, F, A, Bf, history, nz):
        """x_{i+1} = ρ·x + (1 − ρ)·(a·D_i − b·D_{i−1}), ρ = t_{i+1}/t_i, a = 1 + b, b = 1/(2r).
        First order (an Euler step) on the first and the last step. Otherwise two calls: the
        first gives D_i (y2) and P = (ρ·x + (1 − ρ)·a·D_i)/Λ, Λ = ρ + (1 − ρ)·a (y1: its x and
        D_i weights are tied, hence the scale), the second Λ·P − (1 − ρ)·b·D_{i−1} with D_{i−1}
        in the F slot."""
        t_cur, t_next = self.t[i], self.t[i + 1]
        c_in = self.c_in_of(nz)
        keep = None if t_next == 0 else -t_cur  # y2 = x − t·d = D_i, for the next step
        if not history or t_next == 0:
            x, denoised, net_in = self.update(x, F, None, A, Bf, t_next - t_cur, keep, nz, c_in)
        else:
            rho = t_next / t_cur
            b = 0.5 * math.log(t_cur / t_next) / math.log(self.t[i - 1] / t_cur)
            a = 1.0 + b
            lam = rho + (1.0 - rho) * a
            partial, denoised, _ = self.update(x, F, None, A, Bf, -t_cur * (1.0 - rho) * a / lam, keep, None, None)
            x, _, net_in = self.update(partial, history[0], None, lam - 1.0, -(1.0 - rho) * b, 1.0, None, nz, c_in)
        history[:] = [denoised]
        return x, net_in

    def ipndm_step(self, i, x, F, A, Bf, history, nz):
        """x_{i+1} = x + h·(c_0·d_i + G), G = Σ_{k>=1} c_k·d_{i−k}: d_i from one call (base 0), G
        (as G' = G/g) from the history in one call (order >= 3), then x + h·(c_0·d_i + g·G')."""
        h, c = self.t[i + 1] - self.t[i], self.weights[i]
        c_in = self.c_in_of(nz)
        slope = self.update(x, F, self.zeros, A, Bf, 1.0, None, None, None)[0]  # d_i = A·x + Bf·F
        if len(c) == 1:
            x_next, _, net_in = self.update(x, F, None, A, Bf, h, None, nz, c_in)
        else:
            older, scale = history[-1], 1.0  # G' = G / scale
            if len(c) == 3:
                older = self.update(history[-1], history[-2], None, c[1] - 1.0, c[2], 1.0, None, None, None)[0]
            elif len(c) == 4:  # d_{i−1} (the largest weight) in the base slot, whose weight is 1
                older = self.update(
                    history[-2], history[-3], history[-1], c[2] / c[1], c[3] / c[1], 1.0, None, None, None
                )[0]
                scale = c[1]
            x_next, _, net_in = self.update(slope, older, x, c[0], c[1] if len(c) == 2 else scale, h, None, nz, c_in)
        history.append(slope)
        del history[:-3]
        return x_next, net_in
