"""Metrics over image features: float64 running moments (FeatureStats, optionally keeping
the feature rows) that merge across shards, the Fréchet distance (FID / FDD /
FD-DINOv2), KID, Inception Score and precision/recall (torch-fidelity's metric code on our
features), and reference statistics in the published `.npz` format (mu, sigma; extra keys
for the other metrics). Result columns name the feature space where the plain name would
claim another (column_name): FDD outside Inception's space, precision_<space>/recall_<space>
always (torch-fidelity's precision/recall default to VGG-16 features).
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Optional

import numpy as np
import torch

from pfgmpp_fast.utils.io_utils import atomic_save_npz

__all__ = [
    "METRICS",
    "METRIC_COLUMNS",
    "LOWER_IS_BETTER",
    "FeatureStats",
    "frechet_distance",
    "save_stats",
    "load_stats",
    "parse_metrics",
    "column_name",
    "metric_columns",
    "lower_is_better",
    "compute_metrics",
    "save_reference",
    "load_reference",
]

METRICS = ("fid", "kid", "isc", "prc", "fd_dinov2")


# ----------------------------------------------------------------------------------------
# Statistics


class FeatureStats:
    """float64 running sums n, Σf, Σffᵀ of features (on the features' device); keep=True also
    keeps the rows themselves (float32, in update order) for KID, IS and precision/recall."""

    def __init__(self, dim: int, device="cpu", keep: bool = False):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        self.dim, self.keep, self._rows = dim, bool(keep), []
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
        if self.keep:
            self._rows.append(features.detach().to("cpu", torch.float32))
        return self

    @property
    def rows(self) -> torch.Tensor:
        """The kept feature rows [n, dim] (float32, CPU)."""
        if not self.keep:
            raise ValueError("these statistics keep only moments, not the features (keep=False)")
        if len(self._rows) != 1:
            self._rows = [torch.cat(self._rows) if self._rows else torch.zeros(0, self.dim)]
        return self._rows[0]

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self.n += other.n.to(self.n.device)
        self.sum += other.sum.to(self.sum.device)
        self.sum_outer += other.sum_outer.to(self.sum_outer.device)
        if self.keep:
            self._rows.append(other.rows)
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
        out = {
            "n": np.asarray(self.count, dtype=np.int64),
            "sum": self.sum.cpu().numpy(),
            "sum_outer": self.sum_outer.cpu().numpy(),
        }
        if self.keep:
            out["rows"] = self.rows.numpy()
        return out

    @classmethod
    def from_arrays(cls, n, s, so, rows=None) -> "FeatureStats":
        st = cls(int(np.asarray(s).shape[0]), keep=rows is not None)
        st.n = torch.tensor(float(n), dtype=torch.float64)
        st.sum = torch.from_numpy(np.asarray(s, dtype=np.float64)).clone()
        st.sum_outer = torch.from_numpy(np.asarray(so, dtype=np.float64)).clone()
        if rows is not None:
            st._rows = [torch.from_numpy(np.asarray(rows, dtype=np.float32)).clone()]
        return st


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), with scipy.linalg.sqrtm (float64)."""
    import scipy.linalg

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, value, shape in (
        ("mu1", mu1, (d,)),
        ("mu2", mu2, (d,)),
        ("sigma1", sigma1, (d, d)),
        ("sigma2", sigma2, (d, d)),
    ):
        if value.shape != shape:
            raise ValueError(f"{name} has shape {value.shape}, expected {shape} (mu [d], sigma [d, d] of one d)")
    m = np.square(mu1 - mu2).sum()
    with warnings.catch_warnings():  # `disp` (the published call) is deprecated in SciPy >= 1.17
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            s, _ = scipy.linalg.sqrtm(sigma1 @ sigma2, disp=False)
        except TypeError:  # SciPy >= 1.18: no `disp`, same result
            s = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(m + np.trace(sigma1 + sigma2 - 2 * s)))


def save_stats(path: str, mu, sigma) -> None:
    """Reference statistics in the published format (npz with mu, sigma), atomically."""
    atomic_save_npz(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


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
            raise ValueError(
                f"{path} is not a reference-statistics file: expected arrays 'mu' and 'sigma', got {sorted(f.files)}"
            )
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu must be [d] and sigma [d, d], got {mu.shape} and {sigma.shape}")
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(
            f"{path} holds {mu.shape[0]}-d statistics but the feature extractor gives "
            f"{dim}-d features (wrong reference file for these features?)"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu/sigma contain NaN or Inf")
    return mu, sigma


# ----------------------------------------------------------------------------------------
# The metric set (torch-fidelity's metric code on our features)

# Result columns per metric, and whether lower is better (for "best" in sweeps).
METRIC_COLUMNS = {
    "fid": ("FID",),
    "kid": ("KID", "KID_std"),
    "isc": ("IS", "IS_std"),
    "prc": ("precision", "recall"),
    "fd_dinov2": ("FD_DINOv2",),
}
LOWER_IS_BETTER = {
    "FID": True,
    "FDD": True,
    "KID": True,
    "FD_DINOv2": True,
    "IS": False,
    "precision": False,
    "recall": False,
}
# Columns named with their feature space: torch-fidelity computes precision/recall on VGG-16
# features (fc2_relu) by default, ours on the main space (Inception pool or digits), so under
# the plain names the numbers would read as comparable with theirs.
SPACE_NAMED = ("precision", "recall")


def parse_metrics(metrics) -> tuple:
    """'fid,kid' or a sequence -> a tuple in METRICS order; unknown names are an error."""
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    names = [m for m in names if m]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"--metrics must be a comma-separated subset of {','.join(METRICS)}, got {metrics!r}")
    return tuple(m for m in METRICS if m in names)


def column_name(column: str, space: str) -> str:
    """A METRIC_COLUMNS column as results name it in feature space `space`: 'FDD' for 'FID'
    outside Inception's space, 'precision_<space>' / 'recall_<space>' (SPACE_NAMED) always."""
    if column == "FID" and space != "inception":
        return "FDD"
    return f"{column}_{space}" if column in SPACE_NAMED else column


def metric_columns(metrics, space: str) -> list:
    """The result columns of `metrics` in feature space `space` (column_name)."""
    return [column_name(c, space) for m in parse_metrics(metrics) for c in METRIC_COLUMNS[m]]


def lower_is_better(column: str) -> bool:
    """Whether a smaller value of result column `column` (any space's name) is better."""
    base = column.rsplit("_", 1)[0] if column.startswith(tuple(c + "_" for c in SPACE_NAMED)) else column
    return LOWER_IS_BETTER.get(base, True)


def compute_metrics(
    stats: Dict[str, FeatureStats],
    ref: Dict[str, np.ndarray],
    metrics,
    space: str,
    kid_subset_size: int = 1000,
    isc_splits: int = 10,
    seed: int = 2020,
) -> Dict[str, float]:
    """{column: value} of `metrics` for the statistics of one calc (calc.calc_stats with
    Detectors) against a reference (load_reference), named by column_name. KID (polynomial
    kernel, unbiased MMD² over subsets), IS and precision/recall (k = 3) are torch-fidelity's
    functions, on the features of `space`."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    out = {}
    for m in parse_metrics(metrics):
        if m == "fid":
            out[column_name("FID", space)] = frechet_distance(*stats["features"].mean_cov(), ref["mu"], ref["sigma"])
        elif m == "fd_dinov2":
            out["FD_DINOv2"] = frechet_distance(*stats["dinov2"].mean_cov(), ref["dinov2_mu"], ref["dinov2_sigma"])
        elif m == "kid":
            gen, real = stats["features"].rows, torch.from_numpy(ref["features"])
            size = min(kid_subset_size, len(gen), len(real))
            r = kid_features_to_metric(gen, real, kid_subsets=100, kid_subset_size=size, rng_seed=seed, verbose=False)
            out["KID"], out["KID_std"] = r["kernel_inception_distance_mean"], r["kernel_inception_distance_std"]
        elif m == "isc":
            logits = stats["logits"].rows
            r = isc_features_to_metric(logits, splits=min(isc_splits, len(logits)), shuffle=True, rng_seed=seed)
            out["IS"], out["IS_std"] = r["inception_score_mean"], r["inception_score_std"]
        elif m == "prc":
            r = prc_features_to_metric(stats["features"].rows, torch.from_numpy(ref["features"]), verbose=False)
            out[column_name("precision", space)], out[column_name("recall", space)] = r["precision"], r["recall"]
    bad = {k: v for k, v in out.items() if not np.isfinite(v)}
    if bad:
        raise ValueError(f"metrics are not finite: {bad} (check the images, the features and the reference)")
    return out


def save_reference(path: str, stats: Dict[str, FeatureStats]) -> None:
    """Reference statistics of every detector in one `.npz`: mu, sigma (the published keys)
    plus `features` (rows, for KID / precision-recall) and dinov2_mu / dinov2_sigma."""
    mu, sigma = stats["features"].mean_cov()
    arrays = {"mu": mu, "sigma": sigma}
    if stats["features"].keep:
        arrays["features"] = stats["features"].rows.numpy()
    if "dinov2" in stats:
        arrays["dinov2_mu"], arrays["dinov2_sigma"] = stats["dinov2"].mean_cov()
    atomic_save_npz(path, **arrays)


def load_reference(path: str, dim: Optional[int] = None, metrics=("fid",)) -> Dict[str, np.ndarray]:
    """The arrays of a reference `.npz` that `metrics` need (IS needs none), checked."""
    mu, sigma = load_stats(path, dim=dim)
    out = {"mu": mu, "sigma": sigma}
    metrics = parse_metrics(metrics)
    need = {"features"} if {"kid", "prc"} & set(metrics) else set()
    need |= {"dinov2_mu", "dinov2_sigma"} if "fd_dinov2" in metrics else set()
    with np.load(path, allow_pickle=False) as f:
        missing = sorted(need - set(f.files))
        if missing:
            raise ValueError(
                f"{path} has no {missing} for --metrics {','.join(metrics)}: make it with "
                f"`fid ref --metrics {','.join(metrics)}`"
            )
        for k in need:
            out[k] = f[k].astype(np.float32 if k == "features" else np.float64)
    if "features" in out and (out["features"].ndim != 2 or out["features"].shape[1] != mu.shape[0]):
        raise ValueError(f"{path}: features must be [n, {mu.shape[0]}], got {out['features'].shape}")
    if "dinov2_mu" in out and out["dinov2_sigma"].shape != (out["dinov2_mu"].shape[0],) * 2:
        raise ValueError(f"{path}: dinov2_sigma must be [d, d] for dinov2_mu [d]")
    if not all(np.isfinite(v).all() for v in out.values()):
        raise ValueError(f"{path}: reference arrays contain NaN or Inf")
    return out
