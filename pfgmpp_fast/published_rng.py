"""The random numbers of the published PFGM++ ``generate.py``, per seed, for ``--rng published``.

Our default latents come from the counter-based Philox streams (docs/DESIGN.md §2): an image is a
function of its seed on every backend and batch size. The published sampler draws differently,
so the same seed gives another image there. `PublishedRNG` draws a batch's latents (and random
class labels) exactly as the published code does for each seed, so the same network and seeds
give the same images as the published sampler (to the precision of our sampler's state):

* finite D (the published ``--pfgmpp=1 --aug_dim=D``): the CPU generator seeded with the seed
  (``torch.manual_seed(seed)`` there) draws β ~ Beta(N/2, D/2) in float32 through
  torch.distributions (Dirichlet) and then N float32 normals g; on the sampling device
  x_T = g/‖g‖ · √(β/(1−β)) · σ_r · √D in float64, with σ_r = 80 unless N > 256·256·3 (then
  σ_max), as published. No clipping of β here (the published training loss clips; its
  generate.py does not).
* D = ∞ (``--pfgmpp=0``, EDM): one ``torch.Generator(device)`` per seed, seeded with
  seed mod 2³², draws the float32 normals of the image; x_T = g·σ_max in float64.
* random class labels: ``randint(label_dim)`` from the same per-seed device generator, after
  the D = ∞ latents (the finite-D prior does not touch that generator).

The published per-step churn noise also comes from the per-seed generators; our sampler draws
churn noise from Philox, so `check_published_sampling` refuses settings that add churn noise.

Why per-seed Python loops here: the published streams are per seed by construction (one
torch.Generator, or a reseeded global generator, per image), so they cannot be drawn as one
batched call. They run once per batch, before sampling; the sampling loop itself is unchanged.
Our own generators stand in for the published global one, so the caller's RNG state is never
touched.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from pfgmpp_fast import checks
from pfgmpp_fast import reference as R

__all__ = ["PUBLISHED_RADIUS_SIGMA", "PUBLISHED_LARGE_N", "PublishedRNG", "published_prior", "check_published_sampling"]

PUBLISHED_RADIUS_SIGMA = 80.0  # the published finite-D prior radius σ_r ...
PUBLISHED_LARGE_N = 256 * 256 * 3  # ... unless N exceeds this (then the sampler's σ_max)


class PublishedRNG:
    """The published generator state of one batch of seeds on `device`. Draw in the published
    order: `prior` first, then `class_indices`."""

    def __init__(self, seeds: Sequence[int], device="cpu"):
        self.seeds = [int(s) for s in seeds]
        bad = [s for s in self.seeds if not 0 <= s < 2**63]
        if bad:
            raise ValueError(f"seeds must be in [0, 2^63), got {bad[:4]}")
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(s % (1 << 32)) for s in self.seeds]

    def prior(self, shape: Sequence[int], D, sigma_max: float = 80.0) -> torch.Tensor:
        """x_T, float64 [B, C, H, W] on the device, as the published generate.py draws it."""
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or shape[0] != len(self.seeds) or min(shape) < 1:
            raise ValueError(
                f"shape must be [B, ...] with B = {len(self.seeds)} seeds and every size >= 1, got {list(shape)}"
            )
        D = checks.parse_D(D)
        sigma_max = checks.check_positive("sigma_max", sigma_max)
        if math.isinf(D):
            g = torch.stack([torch.randn(shape[1:], generator=gen, device=self.device) for gen in self.generators])
            return g.double() * sigma_max
        N = math.prod(shape[1:])
        radius_sigma = sigma_max if N > PUBLISHED_LARGE_N else PUBLISHED_RADIUS_SIGMA
        return torch.stack(
            [_finite_D_latent(seed, N, D, radius_sigma, self.device).reshape(shape[1:]) for seed in self.seeds]
        )

    def class_indices(self, label_dim: int) -> torch.Tensor:
        """The random class of each seed, int64 [B] on the device (after `prior`, as published)."""
        if isinstance(label_dim, bool) or not isinstance(label_dim, int) or label_dim < 1:
            raise ValueError(f"label_dim must be an int >= 1, got {label_dim!r}")
        return torch.stack(
            [torch.randint(label_dim, size=[], generator=gen, device=self.device) for gen in self.generators]
        ).to(torch.int64)


def _finite_D_latent(seed: int, N: int, D: float, radius_sigma: float, device) -> torch.Tensor:
    """One seed's finite-D latent, flat float64 [N]: the published operations in their order."""
    cpu = torch.Generator().manual_seed(seed)  # the published torch.manual_seed(seed)
    concentration = torch.tensor([[N / 2.0, D / 2.0]], dtype=torch.float32)
    beta = torch._sample_dirichlet(concentration, generator=cpu)[..., 0]  # Beta(N/2, D/2).sample()
    beta = beta.to(device).double()
    radius = torch.sqrt(beta / (1 - beta)) * radius_sigma * math.sqrt(D)
    g = torch.randn(N, generator=cpu).to(device)
    return g / torch.norm(g, p=2) * radius


def published_prior(shape: Sequence[int], D, seeds: Sequence[int], device="cpu", sigma_max: float = 80.0):
    """x_T of `seeds` as the published generate.py draws it (float64; see the module docstring)."""
    return PublishedRNG(seeds, device).prior(shape, D, sigma_max)


def check_published_sampling(options) -> None:
    """ValueError when the sampler (a SamplerOptions) would add churn noise: the published code
    draws it from the per-seed generators, ours from Philox, so the images could not match."""
    S_churn, S_noise = options.S_churn, options.S_noise
    if not (S_churn > 0 and S_noise != 0):
        return
    t = R.time_steps(
        options.num_steps, options.sigma_min, options.sigma_max, options.rho, dtype=torch.float64
    ).tolist()[:-1]
    if any(options.S_min <= t_i <= options.S_max for t_i in t):
        raise ValueError(
            f"rng 'published' reproduces the published sampler's latents, not its churn noise "
            f"(S_churn={S_churn:g}, S_noise={S_noise:g} add noise at some step); use S_noise 0 "
            "(the published default: S_churn then only raises t̂, as published) or rng 'philox'"
        )
