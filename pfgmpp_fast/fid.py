"""`python -m pfgmpp_fast fid {calc,ref,sweep}`: streaming, distributed, resumable FID.

Pipeline (no PNG round trip): seeds → generate_images (fused sampler, uint8 exactly as the
published pipeline) → feature extractor → float64 running sums (n, Σf, Σffᵀ), reduced
across ranks with torch.distributed → μ, Σ (unbiased, as the published fid.py) → Fréchet
distance with scipy's sqrtm (as the published code).

Feature extractors (one interface: `extractor(uint8 [B, C, H, W]) -> float64 [B, dim]`):
- `inception`: torch-fidelity's FeatureExtractorInceptionV3, 2048-d pool features (grey
  images are repeated to 3 channels, as the published pipeline does). Weights: torch-fidelity's
  file `weights-inception-2015-12-05-6726825d.pth`, downloaded on a connected machine into
  torch hub's cache, or `--inception-weights PATH` offline. torch-fidelity loads the file
  with pickle, so a file is only handed on after its SHA-256 matched INCEPTION_SHA256
  (or a digest the user passes explicitly with `--inception-sha256`, e.g. for their own
  conversion — that is the user vouching for the file).
- `digits`: the 64-d digit features of digits_features.py ("Fréchet Digit Distance").

Resume (`fid calc --outdir DIR`): the sorted seeds are cut into shards of `--shard-size`;
each finished shard is written atomically as `DIR/stats-<first>-<last>.npz` (n, sums, the
seeds it holds and the configuration it was computed with). A rerun loads finished shards
and computes only the missing ones; shards of another configuration or other boundaries
are an error, never silently mixed; the combine checks every seed is counted exactly once.

Reference statistics are `.npz` files with `mu` [d] and `sigma` [d, d] (the published format).
Sweeps (`fid sweep`, Python `sweep(...)`): over checkpoints of a run directory, steps/NFE,
alpha or weight bit widths, reusing one (compiled) network; each point resumable in its own
subdirectory; results as `sweep-<kind>.csv`, `.md` (table) and `.png` (plot).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import math
import os
import re
import sys
import time
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["INCEPTION_SHA256", "INCEPTION_URL", "FeatureStats", "frechet_distance", "save_stats", "load_stats",
           "InceptionFeatures", "make_random_inception_weights", "get_feature_extractor", "calc_stats",
           "images_source", "generator_source", "reference_stats", "sweep", "find_checkpoints", "weights_fingerprint",
           "add_arguments", "main"]

# torch-fidelity's Inception-v3 weights (feature_extractor_inceptionv3.URL_INCEPTION_V3). The
# file name carries the first 8 hex digits of its SHA-256 (torch.hub's convention); the full
# digest below starts with them.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
SHARD_RE = re.compile(r"^stats-(\d+)-(\d+)\.npz$")


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


def _atomic_write_bytes(path: str, data: bytes) -> None:
    from .io_utils import atomic_write_bytes
    atomic_write_bytes(path, data)


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def save_stats(path: str, mu, sigma) -> None:
    """Reference statistics in the published format (npz with mu, sigma), atomically."""
    _atomic_write_bytes(path, _npz_bytes(mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64)))


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


# ----------------------------------------------------------------------------------------
# Feature extractors

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unloaded_inception():
    """torch-fidelity's Inception-v3 architecture with its default (random) initialisation."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    import tempfile

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # keep the random init
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.pth")
        torch.save({}, empty)
        return _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)


def make_random_inception_weights(path: str, seed: int = 0) -> str:
    """A randomly initialised state dict of torch-fidelity's Inception-v3, saved the way
    torch-fidelity expects (for tests and throughput benchmarks — not for real FIDs).
    Returns its SHA-256."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        net = _unloaded_inception()
    sd = {k: v.clone() for k, v in torch.nn.Module.state_dict(net).items()}
    buf = io.BytesIO()
    torch.save(sd, buf)
    _atomic_write_bytes(path, buf.getvalue())
    return _sha256(path)


def _verified_inception_path(weights: Optional[str], sha256: Optional[str]) -> str:
    """A local weights file whose SHA-256 is the expected one (downloading the published
    file into torch hub's cache when no path is given)."""
    expected = (sha256 or INCEPTION_SHA256).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ValueError(f"inception_sha256 must be 64 hex digits, got {sha256!r}")
    if weights is None:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))
        if not os.path.exists(cached):
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, cached, hash_prefix=INCEPTION_SHA256[:8])
        weights = cached
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"Inception weights not found: {weights}")
    actual = _sha256(weights)
    if actual != expected:
        raise ValueError(
            f"refusing to load Inception weights {weights}: SHA-256 {actual} does not match the expected "
            f"{expected} ({'torch-fidelity pt_inception-2015-12-05' if sha256 is None else 'given'}). "
            "torch-fidelity unpickles this file (it could run code); pass --inception-sha256 with the file's "
            "digest only if you trust it.")
    return weights


class InceptionFeatures(torch.nn.Module):
    """torch-fidelity's Inception-v3 2048-d pool features of uint8 images (C = 1 or 3)."""

    name = "inception"
    dim = 2048

    def __init__(self, weights: Optional[str] = None, sha256: Optional[str] = None, device="cpu"):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        path = _verified_inception_path(weights, sha256)
        self.sha256 = _sha256(path)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=path).to(device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError("images must be a uint8 tensor [B, C, H, W]")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        if images.shape[1] != 3:
            raise ValueError(f"Inception features need 1 or 3 channels, got {images.shape[1]}")
        dev = next(self.net.parameters()).device
        return self.net(images.to(dev))[0].to(torch.float64)


def get_feature_extractor(name: str, device="cpu", inception_weights: Optional[str] = None,
                          inception_sha256: Optional[str] = None, digits_cache: Optional[str] = None):
    """'inception' or 'digits' (module docstring); the returned module has .name, .dim, .sha256."""
    if name == "inception":
        return InceptionFeatures(inception_weights, inception_sha256, device=device)
    if name == "digits":
        from .digits_features import DigitsFeatures
        return DigitsFeatures(digits_cache).to(device)
    raise ValueError(f"features must be 'inception' or 'digits', got {name!r}")


# ----------------------------------------------------------------------------------------
# Sources of uint8 images, addressed by integer ids (seeds, or image indices)

class Source:
    """ids (sorted int64), describe() (a JSON-able configuration) and batches(ids, batch)."""

    ids: np.ndarray

    def describe(self) -> dict:
        raise NotImplementedError

    def batches(self, ids: np.ndarray, batch_size: int) -> Iterable[torch.Tensor]:
        raise NotImplementedError


class generator_source(Source):
    """Images generated from seeds by `net` (generate.generate_images keyword arguments)."""

    def __init__(self, net, seeds, device="cpu", describe: Optional[dict] = None, **gen_kwargs):
        from .generate import check_seeds
        self.net, self.device, self.gen_kwargs = net, torch.device(device), gen_kwargs
        self.ids = check_seeds(seeds)
        self._describe = dict(describe or {})

    def describe(self) -> dict:
        kw = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in self.gen_kwargs.items()}
        kw = {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in kw.items()}
        return {"source": "generator", **kw, **self._describe}

    def batches(self, ids, batch_size):
        from .generate import generate_images
        for _, images in generate_images(self.net, ids, batch_size, device=self.device, **self.gen_kwargs):
            yield images


class images_source(Source):
    """Images of a data set / folder / zip / npz (data.load_dataset), ids = indices."""

    def __init__(self, spec: str, device="cpu"):
        from .data import load_dataset, dataset_to_uint8
        if isinstance(spec, torch.Tensor):
            self.images, self.spec = spec, "<tensor>"
        else:
            self.images, self.spec = dataset_to_uint8(load_dataset(spec)), str(spec)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise TypeError("images must be uint8 [N, C, H, W]")
        self.ids = np.arange(self.images.shape[0], dtype=np.int64)
        self.device = torch.device(device)
        # content, not only the name, identifies the images (shards of other data never mix)
        self.sha256 = hashlib.sha256(self.images.cpu().contiguous().numpy().tobytes()).hexdigest()

    def describe(self) -> dict:
        return {"source": "images", "spec": self.spec, "count": int(self.images.shape[0]), "sha256": self.sha256}

    def batches(self, ids, batch_size):
        for start in range(0, len(ids), batch_size):
            idx = torch.from_numpy(np.asarray(ids[start:start + batch_size]))
            yield self.images.index_select(0, idx).to(self.device)


# ----------------------------------------------------------------------------------------
# Streaming, sharded, resumable statistics

def _config_string(source: Source, extractor) -> str:
    cfg = {"source": source.describe(), "features": getattr(extractor, "name", type(extractor).__name__),
           "dim": int(extractor.dim), "features_sha256": getattr(extractor, "sha256", None)}
    return json.dumps(cfg, sort_keys=True, default=str)


def _shard_name(ids: np.ndarray) -> str:
    return f"stats-{int(ids[0])}-{int(ids[-1])}.npz"


def _stats_of(source: Source, extractor, ids: np.ndarray, batch_size: int, device) -> FeatureStats:
    from .generate import dist_info
    rank, world = dist_info()
    stats = FeatureStats(int(extractor.dim), device=device)
    for images in source.batches(ids[rank::world], batch_size):
        stats.update(extractor(images))
    return stats.all_reduce()


def calc_stats(source: Source, extractor, num: Optional[int] = None, batch_size: int = 64,
               outdir: Optional[str] = None, shard_size: int = 5000, device="cpu",
               progress: bool = False, log: Callable[[str], None] = lambda s: None) -> FeatureStats:
    """Feature statistics of the first `num` ids of `source` (all when None).

    With `outdir`, progress is kept there in shards (module docstring) and a rerun resumes.
    Under torch.distributed every rank must call this; each rank takes ids[rank::world] of
    every shard and the sums are all-reduced; rank 0 writes the shard files.
    """
    from .generate import dist_info
    rank, world = dist_info()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    ids = np.asarray(source.ids, dtype=np.int64)
    if num is not None:
        if isinstance(num, bool) or not isinstance(num, int) or num < 2:
            raise ValueError(f"num (number of images) must be an int >= 2, got {num!r}")
        if len(ids) < num:
            raise ValueError(f"fewer images than requested: {num} images requested for the statistics but "
                             f"only {len(ids)} are available ({len(ids)} seeds/images in the source)")
        ids = ids[:num]
    if outdir is None:
        stats = _stats_of(source, extractor, ids, batch_size, device)
        if stats.count != len(ids):
            raise RuntimeError(f"counted {stats.count} images, expected {len(ids)}")
        return stats

    config = _config_string(source, extractor)
    shards = [ids[i:i + shard_size] for i in range(0, len(ids), shard_size)]
    expected = {_shard_name(s) for s in shards}
    os.makedirs(outdir, exist_ok=True)
    if rank == 0:                        # leftovers of a write that was killed half-way
        from .io_utils import is_temp_file
        for name in os.listdir(outdir):
            if is_temp_file(name) and name.startswith(".stats-"):
                os.unlink(os.path.join(outdir, name))
    present = {f for f in os.listdir(outdir) if SHARD_RE.match(f)}
    foreign = sorted(present - expected)
    if foreign:
        raise ValueError(f"{outdir} holds shard files of another run ({foreign[:3]}...): other seeds or "
                         "another --shard-size; use a fresh --outdir (or delete them)")
    total = FeatureStats(int(extractor.dim), device="cpu")
    counted = []
    iterator = shards
    if progress and rank == 0:
        from tqdm import tqdm
        iterator = tqdm(shards, desc="FID shards", unit="shard", file=sys.stderr)
    for shard in iterator:
        path = os.path.join(outdir, _shard_name(shard))
        if os.path.exists(path):
            with np.load(path, allow_pickle=False) as f:
                if str(f["config"]) != config:
                    raise ValueError(f"{path} was computed with another configuration; use a fresh --outdir.\n"
                                     f"  file: {f['config']}\n  now:  {config}")
                if not np.array_equal(f["seeds"], shard):
                    raise ValueError(f"{path} holds other seeds than expected; use a fresh --outdir")
                part = FeatureStats.from_arrays(f["n"], f["sum"], f["sum_outer"])
            log(f"shard {_shard_name(shard)}: resumed from disk")
        else:
            part = _stats_of(source, extractor, shard, batch_size, device)
            if rank == 0:
                _atomic_write_bytes(path, _npz_bytes(config=np.asarray(config), seeds=shard,
                                                     **part.to_arrays()))
            if world > 1:
                torch.distributed.barrier()
            log(f"shard {_shard_name(shard)}: computed")
        if part.count != len(shard):
            raise RuntimeError(f"shard {path}: counted {part.count} images for {len(shard)} seeds")
        total.merge(part)
        counted.append(shard)
    all_ids = np.concatenate(counted)
    if total.count != len(ids) or not np.array_equal(np.sort(all_ids), ids):
        raise RuntimeError("combined shards do not cover every seed exactly once")
    return total


# ----------------------------------------------------------------------------------------
# Reference statistics from a data set

def reference_stats(data, extractor, batch_size: int = 256, num: Optional[int] = None, device="cpu"):
    """(mu, sigma) of a data set ('digits', folder, zip, npz or a uint8 tensor)."""
    source = images_source(data, device=device)
    stats = calc_stats(source, extractor, num=num, batch_size=batch_size, device=device)
    return stats.mean_cov()


# ----------------------------------------------------------------------------------------
# Sweeps

SWEEP_KINDS = ("checkpoints", "steps", "alpha", "bits")
_KIMG_RE = re.compile(r"(\d+)\.(safetensors|pkl|pt)$")


def find_checkpoints(run_dir: str) -> List[tuple]:
    """[(kimg, path)] of network snapshots in a run directory, sorted by kimg (the number at
    the end of the file name: network-snapshot-000200.safetensors → 200)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    out = []
    for path in glob.glob(os.path.join(run_dir, "*")):
        name = os.path.basename(path)
        m = _KIMG_RE.search(name)
        if m and ("snapshot" in name or "network" in name) and not name.startswith("."):
            out.append((int(m.group(1)), path))
    if not out:
        raise ValueError(f"no network snapshots (network-snapshot-<kimg>.safetensors) in {run_dir}")
    return sorted(out)


def weights_fingerprint(net) -> str:
    """SHA-256 over a network's state (names, dtypes, shapes, values): shards computed with
    other weights are never resumed into this network's statistics."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _nfe(steps: int, solver: str) -> int:
    return 2 * steps - 1 if solver == "heun" else steps


def _write_sweep_outputs(rows: List[dict], kind: str, metric: str, outdir: str, xlabel: str) -> Dict[str, str]:
    import csv
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    columns = list(rows[0].keys())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths = {k: os.path.join(outdir, f"sweep-{kind}.{k}") for k in ("csv", "md", "png")}
    _atomic_write_bytes(paths["csv"], buf.getvalue().encode())

    best = min(rows, key=lambda r: r[metric])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = [f"# {metric} sweep over {kind}", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    lines += ["", f"Best: {kind} = {best['value']} with {metric} = {best[metric]:.4f}", ""]
    _atomic_write_bytes(paths["md"], "\n".join(lines).encode())

    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [r["x"] for r in rows]
    ax.plot(xs, [r[metric] for r in rows], "o-")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {xlabel}")
    ax.grid(alpha=0.3)
    if kind in ("steps", "bits"):  # discrete settings: ticks at the measured values only
        ax.set_xticks(xs)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    _atomic_write_bytes(paths["png"], png.getvalue())
    return paths


def sweep(kind: str, values: Optional[Sequence] = None, net=None, run_dir: Optional[str] = None,
          ref=None, extractor=None, seeds="0-49999", outdir: str = "fid-sweep", batch_size: int = 64,
          shard_size: int = 5000, device="cpu", make_fast: Optional[Callable] = None,
          load_network: Optional[Callable] = None, log: Callable[[str], None] = print,
          **gen_kwargs) -> List[dict]:
    """One sweep in one call, reusing the network: kind in SWEEP_KINDS.

    - 'checkpoints': every snapshot in `run_dir` (FID vs kimg); the snapshots' weights are
      copied into one network (compiled once), `values` optionally restricts the kimgs.
    - 'steps': values = numbers of sampling steps (NFE = 2n − 1 for Heun).
    - 'alpha': values = robustness-noise levels α.
    - 'bits': values = weight bit widths (quantize.py; 32 = unquantised).
    `ref` is (mu, sigma) or a reference .npz path; `extractor` a feature extractor (default
    digits features for 1-channel 8×8 networks is NOT assumed: pass one). Each point keeps
    its shards in outdir/<kind>-<value>/ (resumable). Returns the rows (also written as
    sweep-<kind>.csv/.md/.png in `outdir`); metric column 'FID' (inception) or 'FDD' (digits).
    """
    from . import quantize as Q
    from .generate import resolve_D
    if kind not in SWEEP_KINDS:
        raise ValueError(f"kind must be one of {SWEEP_KINDS}, got {kind!r}")
    if extractor is None:
        raise ValueError("extractor is required (get_feature_extractor('inception'|'digits'))")
    mu_ref, sigma_ref = load_stats(ref, dim=int(extractor.dim)) if isinstance(ref, (str, os.PathLike)) else ref
    if np.asarray(mu_ref).shape != (extractor.dim,):
        raise ValueError(f"reference statistics are {np.asarray(mu_ref).shape[0]}-d, features {extractor.dim}-d")
    metric = "FID" if getattr(extractor, "name", "") == "inception" else "FDD"
    make_fast = make_fast or (lambda n: n)
    gen_kwargs = dict(gen_kwargs)
    solver = gen_kwargs.get("solver", "heun")

    if kind == "checkpoints":
        if run_dir is None:
            raise ValueError("kind='checkpoints' needs run_dir")
        ckpts = find_checkpoints(run_dir)
        if values is not None:
            wanted = {int(v) for v in values}
            ckpts = [c for c in ckpts if c[0] in wanted]
            if not ckpts:
                raise ValueError(f"none of the kimgs {sorted(wanted)} is in {run_dir}")
        if load_network is None:
            from .generate import load_generator_network
            load_network = lambda p: load_generator_network(p, device)
        base = load_network(ckpts[0][1]) if net is None else net
        points = [(kimg, path) for kimg, path in ckpts]
    else:
        if net is None:
            raise ValueError(f"kind={kind!r} needs net")
        if values is None or len(values) == 0:
            raise ValueError(f"kind={kind!r} needs a non-empty list of values")
        base = net
        points = [(v, None) for v in values]
    resolve_D(base, gen_kwargs.get("D"))
    fast = make_fast(base)
    original = {k: v.detach().clone() for k, v in base.state_dict().items()}
    rows = []
    try:
        for value, path in points:
            kw = dict(gen_kwargs)
            with torch.no_grad():
                if kind == "checkpoints":
                    other = load_network(path)
                    resolve_D(base, getattr(other, "D", None))
                    base.load_state_dict(other.state_dict())
                    del other
                elif kind == "bits":
                    base.load_state_dict(original)
                    params = dict(base.named_parameters())
                    for name, q in Q.quantized_state_dict(base, int(value)).items():
                        params[name].copy_(q)
            if kind == "steps":
                kw["num_steps"] = int(value)
            elif kind == "alpha":
                kw["alpha"] = float(value)
            point_dir = os.path.join(outdir, f"{kind}-{value}")
            source = generator_source(fast, seeds, device=device, describe={
                "sweep": kind, "value": value, "checkpoint": path, "weights": weights_fingerprint(base)}, **kw)
            t0 = time.perf_counter()
            stats = calc_stats(source, extractor, batch_size=batch_size, outdir=point_dir,
                               shard_size=shard_size, device=device)
            mu, sigma = stats.mean_cov()
            score = frechet_distance(mu, sigma, mu_ref, sigma_ref)
            steps = int(kw.get("num_steps", 18))
            row = {"kind": kind, "value": value, "x": value, "images": stats.count,
                   "steps": steps, "nfe": _nfe(steps, solver), metric: score,
                   "seconds": round(time.perf_counter() - t0, 3)}
            if kind == "steps":
                row["x"] = row["nfe"]
            rows.append(row)
            log(f"{kind}={value}: {metric} = {score:.4f} ({stats.count} images)")
    finally:
        with torch.no_grad():
            base.load_state_dict(original)
    xlabel = {"checkpoints": "kimg", "steps": "NFE", "alpha": "alpha", "bits": "weight bits"}[kind]
    from .generate import dist_info
    if dist_info()[0] == 0:
        _write_sweep_outputs(rows, kind, metric, outdir, xlabel)
        best = min(rows, key=lambda r: r[metric])
        log(f"best: {kind} = {best['value']} ({metric} = {best[metric]:.4f})")
    return rows


# ----------------------------------------------------------------------------------------
# CLI

def _add_feature_arguments(p):
    p.add_argument("--features", choices=["inception", "digits"], default="inception",
                   help="feature space: inception (FID) or digits (Fréchet Digit Distance)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="local torch-fidelity Inception weights (default: download into torch hub's cache)")
    p.add_argument("--inception-sha256", default=None, metavar="HEX",
                   help="trust a weights file with this SHA-256 instead of the published file's")
    p.add_argument("--digits-cache", default=None, metavar="PATH", help="digits feature network cache file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .generate import add_sampler_arguments
    sub = parser.add_subparsers(dest="fid_command", metavar="{calc,ref,sweep}")
    calc = sub.add_parser("calc", help="statistics (and FID) of generated images or an image folder")
    add_sampler_arguments(calc)
    calc.add_argument("--images", default=None, help="an image folder/zip/npz instead of --network")
    calc.add_argument("--seeds", default=None, help="seeds (default 0-(num-1))")
    calc.add_argument("--num-images", "--num", dest="num", type=int, default=50000,
                      help="number of images (default 50000; under torchrun write --num-images)")
    calc.add_argument("--ref", default=None, help="reference statistics .npz (mu, sigma): print the FID")
    calc.add_argument("--outdir", default=None, help="keep resumable shards here (and stats.npz, result.json)")
    calc.add_argument("--shard-size", type=int, default=5000)
    calc.add_argument("--dest", default=None, help="also write the statistics (mu, sigma) here")
    _add_feature_arguments(calc)
    ref = sub.add_parser("ref", help="reference statistics (published .npz format) of a data set")
    ref.add_argument("--data", required=True, help="'digits', an image folder/zip, or .npy/.npz")
    ref.add_argument("--dest", required=True, help="output .npz (mu, sigma)")
    ref.add_argument("--num-images", "--num", dest="num", type=int, default=None,
                     help="use the first N images (default all)")
    ref.add_argument("--batch", type=int, default=256)
    ref.add_argument("--device", default=None)
    _add_feature_arguments(ref)
    sw = sub.add_parser("sweep", help="FID over checkpoints, steps/NFE, alpha or weight bits")
    add_sampler_arguments(sw)
    sw.add_argument("--kind", choices=SWEEP_KINDS, required=True)
    sw.add_argument("--values", default=None, help="comma-separated values (steps, alphas, bits, kimgs)")
    sw.add_argument("--run-dir", default=None, help="run directory with network snapshots (kind=checkpoints)")
    sw.add_argument("--ref", required=True, help="reference statistics .npz")
    sw.add_argument("--seeds", default="0-49999")
    sw.add_argument("--outdir", default="fid-sweep")
    sw.add_argument("--shard-size", type=int, default=5000)
    _add_feature_arguments(sw)


def _extractor(args, device):
    return get_feature_extractor(args.features, device, args.inception_weights, args.inception_sha256,
                                 args.digits_cache)


def _values(text: Optional[str], kind: str):
    if text is None:
        return None
    parts = [t.strip() for t in text.split(",") if t.strip()]
    conv = float if kind == "alpha" else int
    try:
        return [conv(t) for t in parts]
    except ValueError:
        raise ValueError(f"--values must be comma-separated {conv.__name__}s for kind={kind}, got {text!r}") from None


def main(args) -> int:
    from .generate import (init_distributed, load_generator_network, make_generator_fast, resolve_D,
                           sampler_kwargs_from_args, dist_info)
    cmd = getattr(args, "fid_command", None)
    if cmd is None:
        print("usage: python -m pfgmpp_fast fid {calc,ref,sweep} ... (see --help)", file=sys.stderr)
        return 2
    try:
        device = init_distributed(args.device)
        rank = dist_info()[0]
        say = (lambda s: print(s, flush=True)) if rank == 0 else (lambda s: None)
        if cmd == "ref":
            extractor = _extractor(args, device)
            mu, sigma = reference_stats(args.data, extractor, batch_size=args.batch, num=args.num, device=device)
            if rank == 0:
                save_stats(args.dest, mu, sigma)
            say(f"wrote {extractor.dim}-d reference statistics of {args.data} to {args.dest}")
            return 0
        extractor = _extractor(args, device)
        ref = load_stats(args.ref, dim=int(extractor.dim)) if args.ref else None
        if cmd == "calc":
            if (args.network is None) == (args.images is None):
                raise ValueError("give exactly one of --network (generate) or --images (folder/zip/npz)")
            if args.images is not None:
                source = images_source(args.images, device=device)
            else:
                seeds = args.seeds if args.seeds is not None else f"0-{args.num - 1}"
                kw = sampler_kwargs_from_args(args)
                net = load_generator_network(args.network, device, trust_pickle=args.trust_pickle, D=kw["D"])
                resolve_D(net, kw["D"])
                fast = make_generator_fast(net, device, args.net_dtype, args.compile, args.cuda_graphs)
                source = generator_source(fast, seeds, device=device,
                                          describe={"network": os.path.abspath(args.network),
                                                    "weights": weights_fingerprint(net)}, **kw)
            t0 = time.perf_counter()
            stats = calc_stats(source, extractor, num=args.num, batch_size=getattr(args, "batch", 64),
                               outdir=args.outdir, shard_size=args.shard_size, device=device,
                               progress=rank == 0, log=say)
            mu, sigma = stats.mean_cov()
            result = {"images": stats.count, "features": extractor.name, "seconds": time.perf_counter() - t0}
            if ref is not None:
                result["FID" if extractor.name == "inception" else "FDD"] = frechet_distance(mu, sigma, *ref)
            if rank == 0:
                if args.dest:
                    save_stats(args.dest, mu, sigma)
                if args.outdir:
                    save_stats(os.path.join(args.outdir, "stats.npz"), mu, sigma)
                    _atomic_write_bytes(os.path.join(args.outdir, "result.json"),
                                        (json.dumps(result, indent=2) + "\n").encode())
            say(json.dumps(result))
            return 0
        # sweep
        kw = sampler_kwargs_from_args(args)
        values = _values(args.values, args.kind)
        net = None
        if args.kind != "checkpoints":
            if not args.network:
                raise ValueError(f"--network is required for --kind {args.kind}")
            net = load_generator_network(args.network, device, trust_pickle=args.trust_pickle, D=kw["D"])
        fast = lambda n: make_generator_fast(n, device, args.net_dtype, args.compile, args.cuda_graphs)
        load = lambda p: load_generator_network(p, device, trust_pickle=args.trust_pickle, D=kw["D"])
        sweep(args.kind, values, net=net, run_dir=args.run_dir, ref=ref, extractor=extractor, seeds=args.seeds,
              outdir=args.outdir, batch_size=args.batch, shard_size=args.shard_size, device=device,
              make_fast=fast, load_network=load, log=say, **kw)
        say(f"wrote {args.outdir}/sweep-{args.kind}.csv, .md, .png")
        return 0
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
