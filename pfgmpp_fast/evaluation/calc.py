"""Streaming, sharded, resumable feature statistics of image sources (no PNG round trip).

Pipeline: ids (seeds or image indices) → a Source's uint8 batches (generate_images, or a
data set) → feature extractor → float64 running sums, the same on every rank.

Identical by construction: the sorted ids are cut into grid batches of `batch_size`
(batch c = positions [c·batch_size, (c+1)·batch_size) of the whole list), and every image and
every feature row is computed in its grid batch, whatever the mode: one process or many ranks
(rank r computes every world-th batch), one pass or shards, fresh or resumed. So a row never
depends on how a BLAS or convolution kernel treats another batch shape or row position. The
float64 sums are added batch by batch in grid order on every rank (the rows are gathered, not
the sums reduced), per shard of `shard_size` positions, and the shards in order: the same
reduction order for any number of ranks, with or without shard files. A grid batch that two
shards share is computed once and carried over (recomputed, identically, after a resume).

Resume (`fid calc --outdir DIR`): each finished shard is written atomically as
`DIR/stats-<first>-<last>.npz` (n, sums, the ids it holds and the configuration it was
computed with; with several detectors (features.Detectors) also the feature rows KID /
precision-recall need, Inception's logits for IS and `<output>.n/.sum/.sum_outer` of the
others, e.g. DINOv2). A rerun loads finished shards and computes only the missing ones;
shards of another configuration or other boundaries are an error, never silently mixed.
Inside a utils.preemption.Preemption (`fid calc`, `fid sweep`) a preemption signal stops the
work after the current shard (written, with --outdir), on every rank alike (Preempted).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from typing import Callable, Dict, Iterable, Optional, Union

import numpy as np
import torch

from pfgmpp_fast import checks
from pfgmpp_fast.evaluation.features import Detectors
from pfgmpp_fast.evaluation.metrics import FeatureStats
from pfgmpp_fast.utils import distributed
from pfgmpp_fast.utils.io_utils import atomic_save_npz, is_temp_file
from pfgmpp_fast.utils.preemption import stop_if_requested
from pfgmpp_fast.utils.run_lock import acquire_run_dir

__all__ = [
    "Source",
    "GeneratorSource",
    "ImagesSource",
    "calc_stats",
    "reference_stats",
    "weights_fingerprint",
    "SHARD_RE",
]

SHARD_RE = re.compile(r"^stats-(\d+)-(\d+)\.npz$")


# ----------------------------------------------------------------------------------------
# Sources of uint8 images, addressed by integer ids (seeds, or image indices)


class Source:
    """ids (sorted int64), describe() (a JSON-able configuration) and batches(ids, batch)."""

    ids: np.ndarray

    def describe(self) -> dict:
        raise NotImplementedError

    def batches(self, ids: np.ndarray, batch_size: int) -> Iterable[torch.Tensor]:
        raise NotImplementedError


class GeneratorSource(Source):
    """Images generated from seeds by `net` (generate.generate_images keyword arguments: options=
    a SamplerOptions and/or its fields as keywords, class_idx, D, key, ...; checked here, once)."""

    def __init__(self, net, seeds, device="cpu", describe: Optional[dict] = None, **gen_kwargs):
        from pfgmpp_fast.sampler import split_sampler_options

        self.net, self.device = net, torch.device(device)
        self.options, self.gen_kwargs = split_sampler_options(gen_kwargs)
        self.ids = checks.check_seeds(seeds)
        self._describe = dict(describe or {})

    def describe(self) -> dict:
        kw = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in self.gen_kwargs.items() if k != "gnet"}
        gnet = self.gen_kwargs.get("gnet")
        if self.options.guidance != 1.0 and gnet is not None:  # the guide changes the images: its weights
            kw["gnet"] = (
                weights_fingerprint(gnet)
                if isinstance(gnet, torch.nn.Module)
                else gnet
                if isinstance(gnet, str)
                else type(gnet).__name__
            )
        kw = {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in kw.items()}
        return {"source": "generator", **self.options.describe(), **kw, **self._describe}

    def batches(self, ids, batch_size):
        from pfgmpp_fast.evaluation.generate import generate_images

        for _, images in generate_images(
            self.net, ids, batch_size, options=self.options, device=self.device, **self.gen_kwargs
        ):
            yield images


class ImagesSource(Source):
    """Images of a data set / folder / zip / npz (data.load_dataset), ids = indices."""

    def __init__(self, spec: str, device="cpu"):
        from pfgmpp_fast.training.data import dataset_to_uint8, load_dataset

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
            idx = torch.from_numpy(np.asarray(ids[start : start + batch_size]))
            yield self.images.index_select(0, idx).to(self.device)


# ----------------------------------------------------------------------------------------
# Streaming, sharded, resumable statistics


def _config_string(source: Source, extractor, device="cpu") -> str:
    """Everything that changes the images or their features (the source's description holds the
    sampler settings, weights and resolved network numerics; features run on ``device``)."""
    cfg = {
        "source": source.describe(),
        "features": getattr(extractor, "name", type(extractor).__name__),
        "dim": int(extractor.dim),
        "features_sha256": getattr(extractor, "sha256", None),
        "features_device_type": torch.device(device).type,
    }
    if extractor.extra_config():  # FID alone: the configuration of older shards
        cfg["detectors"] = extractor.extra_config()
    return json.dumps(cfg, sort_keys=True, default=str)


def _shard_name(ids: np.ndarray) -> str:
    return f"stats-{int(ids[0])}-{int(ids[-1])}.npz"


def _empty_stats(detectors: Detectors, device) -> Dict[str, FeatureStats]:
    return {k: FeatureStats(dim, device=device, keep=keep) for k, (dim, keep) in detectors.layout.items()}


def _grid_cells(lo: int, hi: int, batch_size: int) -> range:
    """The grid batches that positions [lo, hi) of the id list touch (module docstring)."""
    return range(lo // batch_size, -(-hi // batch_size))


def _cell_rows(
    source: Source, detectors: Detectors, ids: np.ndarray, cell: int, batch_size: int, device
) -> torch.Tensor:
    """Every detector output of grid batch `cell`, float64 [batch_size, Σ dims] on `device` (the
    rows of a short last batch padded with zeros, so every rank gathers one shape)."""
    images = torch.cat(list(source.batches(ids[cell * batch_size : (cell + 1) * batch_size], batch_size)))
    out = detectors(images)
    rows = torch.cat([out[k].to(device, torch.float64) for k in detectors.layout], dim=1)
    return torch.nn.functional.pad(rows, (0, 0, 0, batch_size - rows.shape[0]))


def _stats_of(
    source: Source,
    detectors: Detectors,
    ids: np.ndarray,
    lo: int,
    hi: int,
    batch_size: int,
    device,
    carry: Dict[int, torch.Tensor],
) -> Dict[str, FeatureStats]:
    """Statistics of positions [lo, hi) of `ids`, on the batch grid (module docstring).

    Rank r computes every world-th grid batch; each turn's rows are gathered, so every rank
    adds every batch, in grid order. `carry` holds the rows of a grid batch the previous
    shard computed and this one continues (and receives this shard's last batch if the
    next shard continues it)."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    stats = _empty_stats(detectors, device)
    dims = [dim for dim, _ in detectors.layout.values()]
    ready = {c: rows for c, rows in carry.items() if c in _grid_cells(lo, hi, batch_size)}
    carry.clear()
    todo = [c for c in _grid_cells(lo, hi, batch_size) if c not in ready]
    for turn in [todo[i : i + world] for i in range(0, len(todo), world)] or [[]]:
        if turn:
            rows = (
                _cell_rows(source, detectors, ids, turn[rank], batch_size, device)
                if rank < len(turn)
                else torch.zeros(batch_size, sum(dims), dtype=torch.float64, device=device)
            )
            ready.update(zip(turn, distributed.all_gather(rows)))
        for cell in sorted(ready):
            rows, start = ready.pop(cell), cell * batch_size
            first, last = max(lo, start), min(hi, start + batch_size)
            for st, part in zip(stats.values(), rows[first - start : last - start].split(dims, 1)):
                st.update(part)
            if last < min(start + batch_size, len(ids)):  # the next shard goes on in this batch
                carry[cell] = rows
    return stats


def _shard_arrays(stats: Dict[str, FeatureStats]) -> Dict[str, np.ndarray]:
    """'features' under the plain keys n, sum, sum_outer (, rows); the others prefixed."""
    return {(a if k == "features" else f"{k}.{a}"): v for k, st in stats.items() for a, v in st.to_arrays().items()}


def _load_shard(f, detectors: Detectors) -> Dict[str, FeatureStats]:
    out = {}
    for k, (_, keep) in detectors.layout.items():
        p = "" if k == "features" else f"{k}."
        out[k] = FeatureStats.from_arrays(f[p + "n"], f[p + "sum"], f[p + "sum_outer"], f[p + "rows"] if keep else None)
    return out


def _first_ids(source: Source, num: Optional[int]) -> np.ndarray:
    ids = np.asarray(source.ids, dtype=np.int64)
    if num is not None:
        if isinstance(num, bool) or not isinstance(num, int) or num < 2:
            raise ValueError(f"num (number of images) must be an int >= 2, got {num!r}")
        if len(ids) < num:
            raise ValueError(
                f"fewer images than requested: {num} images requested for the statistics but "
                f"only {len(ids)} are available ({len(ids)} seeds/images in the source)"
            )
        ids = ids[:num]
    return ids


def calc_stats(
    source: Source,
    extractor,
    num: Optional[int] = None,
    batch_size: int = 64,
    outdir: Optional[str] = None,
    shard_size: int = 5000,
    device="cpu",
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> Union[FeatureStats, Dict[str, FeatureStats]]:
    """Feature statistics of the first `num` ids of `source` (all when None): a FeatureStats
    for one extractor, {output: FeatureStats} for a features.Detectors (one pass for all).

    The ids are computed in the grid batches and summed per shard of `shard_size` (module
    docstring), so the result is the same bits with or without `outdir`, for any number of
    ranks and after any resume. With `outdir`, progress is kept there in shard files and a
    rerun resumes. Under torch.distributed every rank must call this; every rank gets the
    totals, rank 0 writes the shard files.
    """
    single = not isinstance(extractor, Detectors)
    extractor = Detectors(extractor) if single else extractor
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    ids = _first_ids(source, num)
    if outdir is None:
        total = _sharded_stats(source, extractor, ids, batch_size, None, shard_size, device, progress, log)
    else:
        with acquire_run_dir(outdir, "fid calc"):  # one job per shard directory
            total = _sharded_stats(source, extractor, ids, batch_size, outdir, shard_size, device, progress, log)
    return total["features"] if single else total


def _prepare_outdir(outdir: str, expected: set) -> None:
    """Remove what a killed write left behind; refuse shard files of another run."""
    os.makedirs(outdir, exist_ok=True)
    if distributed.get_rank() == 0:  # leftovers of a write that was killed half-way
        for name in os.listdir(outdir):
            if is_temp_file(name):  # shards, stats.npz, result.json
                os.unlink(os.path.join(outdir, name))
    present = {f for f in os.listdir(outdir) if SHARD_RE.match(f)}
    foreign = sorted(present - expected)
    if foreign:
        raise ValueError(
            f"{outdir} holds shard files of another run ({foreign[:3]}...): other seeds or "
            "another --shard-size; use a fresh --outdir (or delete them)"
        )


def _shards_on_disk(outdir: str, names: list) -> list:
    """Which of the shard files `names` a previous run finished, as rank 0 sees them before
    this run writes any: a rank that looked for each file when it got there could find one
    a faster rank had just written (a shard computed from carried rows alone needs no
    collective) and skip the barrier that follows the write."""
    return distributed.rank_0_value(lambda: [os.path.exists(os.path.join(outdir, n)) for n in names])


def _read_shard(path: str, config: str, shard: np.ndarray, extractor: Detectors) -> Dict[str, FeatureStats]:
    with np.load(path, allow_pickle=False) as f:
        if str(f["config"]) != config:
            raise ValueError(
                f"{path} was computed with another configuration; use a fresh --outdir.\n"
                f"  file: {f['config']}\n  now:  {config}"
            )
        if not np.array_equal(f["seeds"], shard):
            raise ValueError(f"{path} holds other seeds than expected; use a fresh --outdir")
        return _load_shard(f, extractor)


def _sharded_stats(
    source, extractor: Detectors, ids, batch_size, outdir, shard_size, device, progress, log
) -> Dict[str, FeatureStats]:
    """calc_stats shard by shard, with shard files in `outdir` (the caller owns it) or none."""
    rank = distributed.get_rank()
    config = _config_string(source, extractor, device) if outdir else None
    bounds = [(lo, min(lo + shard_size, len(ids))) for lo in range(0, len(ids), shard_size)]
    on_disk = [False] * len(bounds)
    if outdir:
        _prepare_outdir(outdir, {_shard_name(ids[lo:hi]) for lo, hi in bounds})
        on_disk = _shards_on_disk(outdir, [_shard_name(ids[lo:hi]) for lo, hi in bounds])
    total = _empty_stats(extractor, "cpu")
    carry: Dict[int, torch.Tensor] = {}  # a grid batch two shards share is computed once
    iterator = bounds
    if progress and rank == 0:
        from tqdm import tqdm

        iterator = tqdm(bounds, desc="shards", unit="shard", file=sys.stderr)
    for (lo, hi), resume in zip(iterator, on_disk):
        shard = ids[lo:hi]
        path = os.path.join(outdir, _shard_name(shard)) if outdir else None
        if resume:
            part = _read_shard(path, config, shard, extractor)
            carry.clear()
            log(f"shard {_shard_name(shard)}: resumed from disk")
        else:
            part = _stats_of(source, extractor, ids, lo, hi, batch_size, device, carry)
            if path:
                if rank == 0:
                    atomic_save_npz(path, config=np.asarray(config), seeds=shard, **_shard_arrays(part))
                distributed.barrier()
                log(f"shard {_shard_name(shard)}: computed")
        if any(st.count != len(shard) for st in part.values()):
            raise RuntimeError(
                f"shard {_shard_name(shard)}: counted {part['features'].count} images for {len(shard)} seeds"
            )
        for k, st in part.items():
            total[k].merge(st)
        if hi < len(ids):  # a signal stops the work here, between shards (utils/preemption.py)
            stop_if_requested(
                f"{hi} of {len(ids)} images done; "
                + (
                    f"the finished shards are in {outdir}: rerun the same command to continue"
                    if outdir
                    else "nothing was kept (no --outdir): rerun the same command, with --outdir to make it resumable"
                )
            )
    if total["features"].count != len(ids):
        raise RuntimeError(f"counted {total['features'].count} images, expected {len(ids)}")
    return total


# ----------------------------------------------------------------------------------------
# Reference statistics from a data set


def reference_stats(data, extractor, batch_size: int = 256, num: Optional[int] = None, device="cpu"):
    """(mu, sigma) of a data set ('digits', folder, zip, npz or a uint8 tensor); for a
    features.Detectors, {output: FeatureStats} (metrics.save_reference writes them)."""
    source = ImagesSource(data, device=device)
    stats = calc_stats(source, extractor, num=num, batch_size=batch_size, device=device)
    return stats if isinstance(extractor, Detectors) else stats.mean_cov()


def weights_fingerprint(net) -> str:
    """SHA-256 over a network's state (names, dtypes, shapes, values): shards computed with
    other weights are never resumed into this network's statistics."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
