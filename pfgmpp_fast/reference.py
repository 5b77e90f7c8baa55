"""Pure-PyTorch reference of PFGM++: the spec every fast path is tested against.

Readable first, float64 capable, no fused tricks. The mathematics is docs/DESIGN.md §1, the
random numbers §2, the fused-op contract docs/KERNEL_OPS.md.

Random numbers
--------------
Philox4x32-10 (Random123 constants), counter = (block j, sample id low, sample id high,
stream), key = (low, high) 32 bits of a key in [0, 2^63). Four uint32 outputs become four
float32 uniforms u = (float(x >> 8) + 0.5) * 2^-24 (float32 arithmetic, so every backend
rounds identically) and four float32 normals by Box–Muller. Element e of a sample (its
logical NCHW flat index) uses block e // 4, lane e % 4. Streams name the purpose:

    STREAM_NOISE = 0          perturbation noise g (training) and prior noise (sampling)
    STREAM_SIGMA = 1          training noise level: ln σ = P_mean + P_std · z[0]
    STREAM_CHI2  = 2          χ²_D attempts (Marsaglia–Tsang), one block per attempt
    STREAM_CLASS = 3          a seed's random class label in generation (generate.py)
    stream_churn(i) = 0x10000 + i   sampler churn noise at step i
    stream_alpha(i) = 0x20000 + i   sampler robustness noise (α) at step i
    STREAM_AUGMENT = 0x30000  augmentation draws of a training sample (augment.py)
    STREAM_LABEL_DROPOUT = 4  label dropout of a training sample: u0 of block 0 <= p drops it

Normals are float32 on every backend; float64 computations use them cast to float64.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "STREAM_NOISE",
    "STREAM_SIGMA",
    "STREAM_CHI2",
    "STREAM_CLASS",
    "STREAM_AUGMENT",
    "STREAM_LABEL_DROPOUT",
    "stream_churn",
    "stream_alpha",
    "CHI2_MAX_ATTEMPTS",
    "MAX_SCALE",
    "philox4x32",
    "uniform",
    "normal",
    "normal_unchecked",
    "chi2",
    "chi2_unchecked",
    "noise_scale",
    "training_scalars",
    "perturb",
    "perturb_published",
    "published_displacement",
    "prior",
    "precond",
    "coefficients",
    "time_steps",
    "compute_dtype",
    "training_loss",
    "sample",
    "optimal_denoiser",
    "ref_perturb",
    "ref_loss_fwd_bwd",
    "ref_sampler_update",
]

# ----------------------------------------------------------------------------------------
# Constants of the spec

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF

STREAM_NOISE = 0
STREAM_SIGMA = 1
STREAM_CHI2 = 2
STREAM_CLASS = 3
STREAM_AUGMENT = 0x30000
STREAM_LABEL_DROPOUT = 4
CHI2_MAX_ATTEMPTS = 16  # P(all rejected) < 0.05^16: a fixed bound every backend shares
MAX_SCALE = 1e30  # the per-sample scale is clamped so D << 1 stays finite
TWO_PI_F32 = 6.2831855  # float32(2π), used in float32 arithmetic


def stream_churn(step: int) -> int:
    return 0x10000 + int(step)


def stream_alpha(step: int) -> int:
    return 0x20000 + int(step)


# Argument checks live in checks.py: the public functions below call them once at entry;
# normal_unchecked and chi2_unchecked (also the reference backend of ops.philox_normal /
# ops.chi2) and the private _noise_scale, _training_scalars take checked arguments.
from pfgmpp_fast import checks  # noqa: E402
from pfgmpp_fast.reference_multistep import dpmpp2m_step, ipndm_step, multistep_step  # noqa: E402,F401

# ----------------------------------------------------------------------------------------
# Philox4x32-10 in integer tensor ops (uint32 values held in int64)


def _mulhilo(a: torch.Tensor, m: int):
    """(hi, lo) 32-bit halves of a*m for a < 2^32, exactly, without int64 overflow."""
    m_lo, m_hi = m & 0xFFFF, m >> 16
    p_lo = a * m_lo  # < 2^48
    p_hi = a * m_hi  # < 2^48;  a*m = p_hi * 2^16 + p_lo
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32(counter: torch.Tensor, key) -> torch.Tensor:
    """Philox4x32-10 of counters [..., 4] (uint32 values in an int64 tensor) under `key`.

    `key` is an int (k1 << 32 | k0, < 2^64 allowed here for the known-answer tests) or a
    pair (k0, k1). Returns int64 [..., 4] with values in [0, 2^32).
    """
    if not torch.is_tensor(counter) or counter.dtype != torch.int64 or counter.shape[-1] != 4:
        raise TypeError("counter must be an int64 tensor of shape [..., 4]")
    if isinstance(key, (tuple, list)):
        k0, k1 = int(key[0]) & MASK32, int(key[1]) & MASK32
    else:
        key = int(key)
        if not 0 <= key < 2**64:
            raise ValueError(f"key must be in [0, 2^64), got {key}")
        k0, k1 = key & MASK32, key >> 32
    c0, c1, c2, c3 = counter.unbind(-1)
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def _counters(sample_ids: torch.Tensor, blocks: torch.Tensor, stream: int) -> torch.Tensor:
    """Counters [B, J, 4] = (block, id low, id high, stream)."""
    B, J = sample_ids.shape[0], blocks.shape[0]
    ids = sample_ids.view(B, 1).expand(B, J)
    return torch.stack(
        [
            blocks.view(1, J).expand(B, J),
            ids & MASK32,
            (ids >> 32) & MASK32,
            torch.full((B, J), int(stream) & MASK32, dtype=torch.int64, device=sample_ids.device),
        ],
        dim=-1,
    )


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """uint32 values -> float32 uniforms in (0, 1] with the spec's float32 rounding."""
    return ((bits >> 8).to(torch.float32) + 0.5) * (2.0**-24)


def _box_muller(u: torch.Tensor) -> torch.Tensor:
    """float32 uniforms [..., 4] -> float32 normals [..., 4] (pairs (u0,u1), (u2,u3))."""
    r01 = torch.sqrt(-2.0 * torch.log(u[..., 0]))
    r23 = torch.sqrt(-2.0 * torch.log(u[..., 2]))
    t01 = u[..., 1] * TWO_PI_F32
    t23 = u[..., 3] * TWO_PI_F32
    return torch.stack([r01 * torch.cos(t01), r01 * torch.sin(t01), r23 * torch.cos(t23), r23 * torch.sin(t23)], dim=-1)


def _blocks(key, sample_ids, num_blocks, stream) -> torch.Tensor:
    """Raw Philox outputs [B, num_blocks, 4] for every sample of one stream."""
    blocks = torch.arange(num_blocks, dtype=torch.int64, device=sample_ids.device)
    return philox4x32(_counters(sample_ids, blocks, stream), key)


def normal(key, sample_ids, n: int, stream: int = STREAM_NOISE) -> torch.Tensor:
    """Standard normals float32 [B, n]: element e of sample b from block e // 4, lane e % 4."""
    sample_ids, key = checks.check_sample_ids(sample_ids), checks.check_key(key)
    n = int(n)
    checks.check_elements_per_sample(None, "n", n)
    return normal_unchecked(key, sample_ids, n, stream)


def normal_unchecked(key: int, sample_ids: torch.Tensor, n: int, stream: int) -> torch.Tensor:
    num_blocks = (n + 3) // 4
    z = _box_muller(uniform(_blocks(key, sample_ids, num_blocks, stream)))
    return z.reshape(sample_ids.shape[0], num_blocks * 4)[:, :n]


# ----------------------------------------------------------------------------------------
# χ²_D per sample: 2·Gamma(D/2) by Marsaglia–Tsang (exact; no clipping)


def chi2(key, sample_ids, D, stream: int = STREAM_CHI2) -> torch.Tensor:
    """Exact χ²_D draws, float64 [B], for any real D > 0 (finite).

    Attempt a uses block a of the sample's counter: z = Box–Muller z0 (float32 -> float64),
    acceptance uniform u2; the boost uniform (shape < 1) is u3 of block 0.
    """
    sample_ids, key, D = checks.check_sample_ids(sample_ids), checks.check_key(key), checks.check_D(D)
    if math.isinf(D):
        raise ValueError("chi2 needs a finite D (D = inf means no χ² draw: s = σ)")
    return chi2_unchecked(key, sample_ids, D, stream)


def chi2_unchecked(key: int, sample_ids: torch.Tensor, D: float, stream: int) -> torch.Tensor:
    k = D / 2.0
    boost = k < 1.0
    kk = k + 1.0 if boost else k
    d = kk - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)

    bits = _blocks(key, sample_ids, CHI2_MAX_ATTEMPTS, stream)  # [B, A, 4]
    u = uniform(bits)
    z = _box_muller(u)[..., 0].to(torch.float64)  # [B, A]
    u_accept = u[..., 2].to(torch.float64)
    v = (1.0 + c * z) ** 3
    v_safe = torch.where(v > 0, v, torch.ones_like(v))
    accept = (v > 0) & (torch.log(u_accept) < 0.5 * z * z + d - d * v_safe + d * torch.log(v_safe))
    # First accepted attempt; if none (p < 1e-20) fall back to gamma = d.
    first = torch.where(accept.any(dim=1), accept.to(torch.int64).argmax(dim=1), torch.full_like(sample_ids, -1))
    v_first = v_safe.gather(1, first.clamp(min=0).view(-1, 1)).view(-1)
    gamma = torch.where(first >= 0, d * v_first, torch.full_like(v_first, d))
    log_gamma = torch.log(gamma)
    if boost:
        log_gamma = log_gamma + torch.log(u[:, 0, 3].to(torch.float64)) / k
    return 2.0 * torch.exp(log_gamma)


def noise_scale(sigma: torch.Tensor, D, key, sample_ids) -> torch.Tensor:
    """Per-sample s = σ·√(D/V), V ~ χ²_D (s = σ for D = inf); float64 [B], at most MAX_SCALE."""
    sample_ids, key, D = checks.check_sample_ids(sample_ids), checks.check_key(key), checks.check_D(D)
    return _noise_scale(sigma, D, key, sample_ids)


def _noise_scale(sigma: torch.Tensor, D: float, key: int, sample_ids: torch.Tensor) -> torch.Tensor:
    sigma = sigma.to(torch.float64)
    if math.isinf(D):
        return sigma.clone()
    V = chi2_unchecked(key, sample_ids, D, STREAM_CHI2)
    return (sigma * torch.sqrt(D / V)).clamp(max=MAX_SCALE)


def training_scalars(key, sample_ids, D, P_mean: float = -1.2, P_std: float = 1.2):
    """Training noise level σ ~ exp(N(P_mean, P_std²)) and scale s, float64 [B] each."""
    sample_ids, key, D = checks.check_sample_ids(sample_ids), checks.check_key(key), checks.check_D(D)
    checks.check_training_options(P_mean, P_std)
    return _training_scalars(key, sample_ids, D, P_mean, P_std)


def _training_scalars(key: int, sample_ids: torch.Tensor, D: float, P_mean: float, P_std: float):
    z = normal_unchecked(key, sample_ids, 1, STREAM_SIGMA)[:, 0].to(torch.float64)
    sigma = torch.exp(P_mean + P_std * z)
    return sigma, _noise_scale(sigma, D, key, sample_ids)


# ----------------------------------------------------------------------------------------
# Perturbation kernel and prior


def perturb(y: torch.Tensor, sigma, D, key, sample_ids) -> torch.Tensor:
    """x = y + σ·√(D/V)·g, g ~ N(0, I) (STREAM_NOISE), V ~ χ²_D; D = inf is EDM's Gaussian.

    Computed in y's dtype (float64 when y is float64). sigma: scalar or [B].
    """
    key, D, sample_ids = checks.check_common("y", y, key, D, sample_ids)
    sigma = checks.check_sigma(sigma, y.shape[0], y.device, torch.float64)
    s = _noise_scale(sigma, D, key, sample_ids).to(y.dtype)
    g = normal_unchecked(key, sample_ids, y[0].numel() if y.shape[0] else 0, STREAM_NOISE).to(y.dtype)
    return y + s.view(-1, *[1] * (y.dim() - 1)) * g.view(y.shape)


def perturb_published(y: torch.Tensor, sigma, D, generator: Optional[np.random.Generator] = None):
    """The published PFGM++ construction, kept for comparison only.

    R = r·√(β/(1−β)), β ~ Beta(N/2, D/2) drawn on the host with numpy, clipped to
    [1e-3, 1−1e-3], plus the 1e-8 fudges; u uniform on the sphere (a normalised Gaussian);
    x = y + R·u. D = inf: y + σ·n, n ~ N(0, I).
    """
    checks.check_images("y", y)
    D = checks.check_D(D)
    sigma = checks.check_sigma(sigma, y.shape[0], y.device, torch.float64)
    rng = generator if generator is not None else np.random.default_rng()
    torch_gen = torch.Generator(device=y.device).manual_seed(int(rng.integers(2**62)))
    return published_displacement(y, sigma, D, rng, torch_gen, torch.float64)


def published_displacement(
    y: torch.Tensor, sigma: torch.Tensor, D: float, rng: np.random.Generator, torch_gen=None, noise_dtype=torch.float32
) -> torch.Tensor:
    """y + R·u of `perturb_published` on checked arguments (benchmarks/baselines.py times this).
    The published code draws its Gaussian in float32; the reference uses float64."""
    B, N = y.shape[0], y[0].numel() if y.shape[0] else 0
    if math.isinf(D):
        n = torch.randn(y.shape, generator=torch_gen, device=y.device, dtype=y.dtype)
        return y + sigma.to(y.dtype).view(-1, *[1] * (y.dim() - 1)) * n
    r = sigma.to(torch.float64) * math.sqrt(D)
    beta = np.clip(rng.beta(N / 2.0, D / 2.0, size=B), 1e-3, 1 - 1e-3)
    inverse_beta = torch.from_numpy(beta / (1 - beta + 1e-8)).to(y.device)  # host -> device
    radius = (r * torch.sqrt(inverse_beta + 1e-8)).view(B, 1)
    gaussian = torch.randn(B, N, generator=torch_gen, device=y.device, dtype=noise_dtype)
    unit = gaussian / torch.norm(gaussian, p=2, dim=1, keepdim=True)
    return y + (unit * radius).to(y.dtype).view(y.shape)


def prior(shape: Sequence[int], D, sigma_max: float, key, seeds, dtype=torch.float64, device=None):
    """Latents x_T = σ_max·√(D/V)·g for a batch of shape [B, ...], one seed per image.

    The same kernel as `perturb` at σ_max with y = 0: an image depends only on its seed.
    """
    shape, D, sigma_max, key, seeds = checks.check_prior(shape, D, sigma_max, key, seeds, device)
    sigma = torch.full((shape[0],), sigma_max, dtype=torch.float64, device=seeds.device)
    s = _noise_scale(sigma, D, key, seeds).to(dtype)
    g = normal_unchecked(key, seeds, math.prod(shape[1:]), STREAM_NOISE).to(dtype)
    return (s.view(-1, 1) * g).view(shape)


# ----------------------------------------------------------------------------------------
# EDM preconditioning, schedule, loss


def precond(sigma, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) of EDM; unchanged by D."""
    return coefficients(sigma, checks.check_positive("sigma_data", sigma_data))


def coefficients(sigma, sigma_data: float):
    """`precond` on a checked sigma_data: the one definition the networks, the loss and the
    sampler use. σ: a tensor (computed in its dtype) or a Python float (floats back)."""
    if torch.is_tensor(sigma):
        sigma = sigma if sigma.is_floating_point() else sigma.to(torch.float64)
        sqrt, log = torch.sqrt, torch.log
    else:
        sigma, sqrt, log = float(sigma), math.sqrt, math.log
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / sqrt(sigma**2 + sd2)
    c_in = 1.0 / sqrt(sigma**2 + sd2)
    c_noise = log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


def time_steps(
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    dtype=torch.float64,
    device=None,
) -> torch.Tensor:
    """EDM's schedule t_0 = σ_max > ... > t_{n-1} = σ_min, plus t_n = 0: [n + 1]."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    sigma_min = checks.check_positive("sigma_min", sigma_min)
    sigma_max = checks.check_sigma_max("sigma_max", sigma_max)
    if sigma_min > sigma_max:
        raise ValueError(f"sigma_min ({sigma_min}) must be <= sigma_max ({sigma_max})")
    rho = checks.check_positive("rho", rho)
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    denom = max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)]).to(dtype)


def training_loss(
    net: Callable,
    y: torch.Tensor,
    D,
    key,
    sample_ids,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_data: float = 0.5,
    labels=None,
    augment_labels=None,
):
    """EDM/PFGM++ objective: Σ_pixels λ(σ)·(D_θ(x, σ) − y)², averaged over the batch.

    σ ~ exp(N(P_mean, P_std²)) and x = perturb(y, σ) both come from the RNG keyed by
    (key, sample id). `net` is a denoiser net(x, sigma[B], class_labels, ...).
    """
    key, D, sample_ids = checks.check_common("y", y, key, D, sample_ids)
    checks.check_training_options(P_mean, P_std)
    checks.check_positive("sigma_data", sigma_data)
    sigma, s = _training_scalars(key, sample_ids, D, P_mean, P_std)
    g = normal_unchecked(key, sample_ids, y[0].numel() if y.shape[0] else 0, STREAM_NOISE)
    shape = (-1, *[1] * (y.dim() - 1))
    x = y + s.to(y.dtype).view(shape) * g.to(y.dtype).view(y.shape)
    sigma_net = sigma.to(y.dtype)
    kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
    denoised = net(x, sigma_net, labels, **kwargs)
    weight = (sigma_net**2 + sigma_data**2) / (sigma_net * sigma_data) ** 2
    per_element = weight.view(shape) * (denoised.to(y.dtype) - y) ** 2
    return per_element.sum() / max(y.shape[0], 1)


# ----------------------------------------------------------------------------------------
# Sampler: EDM Algorithm 2 with the PFGM++ prior


def sample(
    denoiser: Callable,
    latents: torch.Tensor,
    D,
    key,
    seeds,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    solver: str = "heun",
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    alpha: float = 0.0,
    class_labels=None,
    dtype=torch.float64,
) -> torch.Tensor:
    """Heun, Euler, DPM-Solver++(2M) or iPNDM sampling from latents x_T (already at σ_max,
    e.g. from `prior`).

    Per step i: x += α·t_i·ε_α (stream_alpha(i)); churn t̂ = t_i(1+γ),
    x̂ = x + √(t̂² − t_i²)·S_noise·ε_c (stream_churn(i)); Euler step; Heun correction
    when i < n − 1; the multistep solvers (no churn) step as in `reference_multistep`.
    `denoiser(x, sigma[B], class_labels)` returns D(x).
    """
    key, D, seeds = checks.check_common("latents", latents, key, D, seeds, ids_name="seeds")
    checks.check_sampler_options(solver, S_churn, S_min, S_max, S_noise, alpha, dtype)

    B, N = latents.shape[0], latents[0].numel() if latents.shape[0] else 0
    t_steps = time_steps(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64)
    x_next = latents.to(dtype)
    history = []  # the multistep solvers' earlier evaluations
    for i in range(num_steps):
        t_cur, t_next = float(t_steps[i]), float(t_steps[i + 1])
        x_cur = x_next
        if alpha > 0:
            eps = normal_unchecked(key, seeds, N, stream_alpha(i)).to(dtype).view(latents.shape)
            x_cur = x_cur + alpha * t_cur * eps
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            eps = normal_unchecked(key, seeds, N, stream_churn(i)).to(dtype).view(latents.shape)
            x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * S_noise * eps
        else:
            x_hat = x_cur
        sig = torch.full((B,), t_hat, dtype=dtype, device=latents.device)
        denoised = denoiser(x_hat, sig, class_labels).to(dtype)
        if solver in checks.MULTISTEP_SOLVERS:
            x_next = multistep_step(solver, x_hat, denoised, t_steps.tolist(), i, history)
            continue
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if solver == "heun" and i < num_steps - 1:
            sig = torch.full((B,), t_next, dtype=dtype, device=latents.device)
            denoised = denoiser(x_next, sig, class_labels).to(dtype)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def optimal_denoiser(data: torch.Tensor, D) -> Callable:
    """The exact E[y | x] under p_r for a finite data set {y_i}: Σ w_i y_i / Σ w_i.

    log w_i = −(N+D)/2 · log(‖x − y_i‖² + r²), r = σ√D (a softmax, stable in log space);
    D = inf: log w_i = −‖x − y_i‖² / (2σ²). Works in x's dtype.
    """
    checks.check_images("data", data)
    D = checks.check_D(D)
    flat_data = data.reshape(data.shape[0], -1)
    N = flat_data.shape[1]

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        xf = x.reshape(x.shape[0], N)
        yd = flat_data.to(device=x.device, dtype=x.dtype)
        dist2 = torch.cdist(xf, yd).square()  # [B, M]
        sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)
        if math.isinf(D):
            logw = -dist2 / (2 * sig**2)
        else:
            logw = -0.5 * (N + D) * torch.log(dist2 + sig**2 * D)
        w = torch.softmax(logw, dim=1)
        return (w @ yd).view(x.shape)

    return denoiser


# ----------------------------------------------------------------------------------------
# Kernel-level references: what each fused op computes (docs/KERNEL_OPS.md)


def _logical_noise(key, sample_ids, like: torch.Tensor, stream: int, dtype) -> torch.Tensor:
    """Noise shaped like `like`, element e = logical NCHW index (layout independent)."""
    n = like[0].numel() if like.shape[0] else 0
    return normal_unchecked(key, sample_ids, n, stream).to(dtype).view(like.shape)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The arithmetic dtype of the fused ops for an input: float64 stays, anything else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _per_sample(v: torch.Tensor, ndim: int, dtype) -> torch.Tensor:
    return v.to(dtype).view(-1, *[1] * (ndim - 1))


def ref_perturb(y, scale, c_in, sample_ids, key, stream, out_dtype, channels_last, write_x):
    """(net_in, x): x = y + scale·g, net_in = c_in·x in out_dtype; x float32/float64."""
    cd = compute_dtype(y)
    g = _logical_noise(key, sample_ids, y, stream, cd)
    x = y.to(cd) + _per_sample(scale, y.dim(), cd) * g
    net_in = (_per_sample(c_in, y.dim(), cd) * x).to(out_dtype)
    fmt = torch.channels_last if channels_last and y.dim() == 4 else torch.contiguous_format
    net_in = net_in.contiguous(memory_format=fmt)
    x_out = x.contiguous() if write_x else torch.empty(0, dtype=cd, device=y.device)
    return net_in, x_out


def ref_loss_fwd_bwd(F, y, scale, c_skip, c_out, sample_ids, key, stream, grad_scale):
    """(per-sample Σ(F − T)² float32 [B], grad_scale·2(F − T) in F's dtype and layout)."""
    cd = torch.float64 if torch.float64 in (F.dtype, y.dtype) else torch.float32
    g = _logical_noise(key, sample_ids, y, stream, cd)
    cs, co, s = (_per_sample(v, y.dim(), cd) for v in (c_skip, c_out, scale))
    target = ((1 - cs) * y.to(cd) - cs * s * g) / co
    diff = F.to(cd) - target
    per_sample = diff.square().flatten(1).sum(dim=1).to(torch.float32)  # flatten: B = 0 safe
    grad = torch.empty_like(F)  # keeps F's memory format
    grad.copy_(grad_scale * 2 * diff)
    return per_sample, grad


def ref_sampler_update(
    x,
    F: Optional[torch.Tensor],
    base: Optional[torch.Tensor],
    A: float,
    Bf: float,
    h1: float,
    h2: Optional[float],
    sample_ids,
    key,
    alpha_scale,
    alpha_stream,
    churn_scale,
    churn_stream,
    c_in_next: Optional[float],
    net_dtype,
    channels_last,
):
    """(y1, y2, net_in): d = A·x + Bf·F (0 when F is None); y1 = base + h1·d + α-noise + churn-noise
    (base None: x); y2 = base + h2·d (h2 None: empty); net_in = c_in_next·y1 in net_dtype
    (c_in_next None: empty). Arithmetic in x's dtype."""
    sd = x.dtype
    d = A * x + Bf * F.to(sd) if F is not None else torch.zeros_like(x)
    b0 = base if base is not None else x
    y1 = b0 + h1 * d
    if alpha_scale != 0:
        y1 = y1 + alpha_scale * _logical_noise(key, sample_ids, x, alpha_stream, sd)
    if churn_scale != 0:
        y1 = y1 + churn_scale * _logical_noise(key, sample_ids, x, churn_stream, sd)
    y2 = (b0 + h2 * d) if h2 is not None else torch.empty(0, dtype=sd, device=x.device)
    if c_in_next is None:
        net_in = torch.empty(0, dtype=net_dtype, device=x.device)
    else:
        fmt = torch.channels_last if channels_last and x.dim() == 4 else torch.contiguous_format
        net_in = (c_in_next * y1).to(net_dtype).contiguous(memory_format=fmt)
    return y1.contiguous(), y2, net_in
