"""Metrics over image features: float64 running moments (FeatureStats) that merge across
shards and ranks, the Fréchet distance (FID / FDD), and reference statistics in the
published `.npz` format (mu, sigma).
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Dict, Optional

import numpy as np
import torch

from pfgmpp_fast.utils.io_utils import atomic_write_bytes

__all__ = ["FeatureStats", "frechet_distance", "npz_bytes", "save_stats", "load_stats"]


# ----------------------------------------------------------------------------------------
# Statistics

class FeatureStats:
    """float64 running sums n, Σf, Σffᵀ of features (on the features' device)."""

    def __init__(self, dim: int, device="cpu"):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        self.dim = dim
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> "FeatureStats":
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be [B, {self.dim}], got {tuple(features.shape)}")
        f = features.to(device=self.sum.device, dtype=torch.float64)
        if not bool(torch.isfinite(f).all()):
            raise ValueError("features contain NaN or Inf (check the images and the feature extractor)")
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self.n += other.n.to(self.n.device)
        self.sum += other.sum.to(self.sum.device)
        self.sum_outer += other.sum_outer.to(self.sum_outer.device)
        return self

    def all_reduce(self) -> "FeatureStats":
        """Sum over the ranks of the running torch.distributed group (no-op without one)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            flat = torch.cat([self.n.view(1), self.sum, self.sum_outer.view(-1)])
            torch.distributed.all_reduce(flat)
            self.n = flat[0].clone()
            self.sum = flat[1:1 + self.dim].clone()
            self.sum_outer = flat[1 + self.dim:].view(self.dim, self.dim).clone()
        return self

    @property
    def count(self) -> int:
        return int(round(float(self.n)))

    def mean_cov(self):
        """(μ [d], Σ [d, d]) as float64 numpy; Σ unbiased (n − 1), as the published fid.py."""
        n = self.count
        if n < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {n}")
        s = self.sum.cpu().numpy()
        so = self.sum_outer.cpu().numpy()
        mu = s / n
        sigma = (so - n * np.outer(mu, mu)) / (n - 1)
        return mu, sigma

    def to_arrays(self) -> Dict[str, np.ndarray]:
        return {"n": np.asarray(self.count, dtype=np.int64), "sum": self.sum.cpu().numpy(),
                "sum_outer": self.sum_outer.cpu().numpy()}

    @classmethod
    def from_arrays(cls, n, s, so) -> "FeatureStats":
        st = cls(int(np.asarray(s).shape[0]))
        st.n = torch.tensor(float(n), dtype=torch.float64)
        st.sum = torch.from_numpy(np.asarray(s, dtype=np.float64)).clone()
        st.sum_outer = torch.from_numpy(np.asarray(so, dtype=np.float64)).clone()
        return st


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), with scipy.linalg.sqrtm (float64)."""
    import scipy.linalg
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, value, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)), ("sigma1", sigma1, (d, d)),
                               ("sigma2", sigma2, (d, d))):
        if value.shape != shape:
            raise ValueError(f"{name} has shape {value.shape}, expected {shape} (mu [d], sigma [d, d] of one d)")
    m = np.square(mu1 - mu2).sum()
    with warnings.catch_warnings():      # `disp` (the published call) is deprecated in SciPy >= 1.17
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            s, _ = scipy.linalg.sqrtm(sigma1 @ sigma2, disp=False)
        except TypeError:                  # SciPy >= 1.18: no `disp`, same result
            s = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(m + np.trace(sigma1 + sigma2 - 2 * s)))


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def save_stats(path: str, mu, sigma) -> None:
    """Reference statistics in the published format (npz with mu, sigma), atomically."""
    atomic_write_bytes(path, npz_bytes(mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64)))


def load_stats(path: str, dim: Optional[int] = None):
    """(mu, sigma) from a published-format .npz; clear errors for anything else."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics not found: {path}")
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"{path} is not a reference-statistics .npz (mu, sigma): {exc}") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not a reference-statistics .npz (arrays mu, sigma), got a plain array")
    with f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise ValueError(f"{path} is not a reference-statistics file: expected arrays 'mu' and 'sigma', "
                             f"got {sorted(f.files)}")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu must be [d] and sigma [d, d], got {mu.shape} and {sigma.shape}")
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(f"{path} holds {mu.shape[0]}-d statistics but the feature extractor gives "
                         f"{dim}-d features (wrong reference file for these features?)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu/sigma contain NaN or Inf")
    return mu, sigma
