"""The sweep engine: the metric set over a list of points — checkpoints of a run directory,
sampling steps (NFE), robustness noise α, weight bit widths, post-hoc EMA lengths or guidance weights —
reusing one (compiled) network whose weights are swapped per point. Each point keeps
resumable shards in its own subdirectory; results are written as `sweep-<kind>.csv`, `.md`
(table) and one figure per metric (`sweep-<kind>.png` for the first metric,
`sweep-<kind>-<metric>.png` for the others), the measured points marked.

Pieces (also used by apps/experiments.py): `make_points` (what to measure), `PointNetwork`
(puts a point's weights into the shared network and restores them), `score_point` (one
point: sharded calc + metrics), `write_sweep_outputs`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from pfgmpp_fast import phema
from pfgmpp_fast.checkpoint import find_checkpoints
from pfgmpp_fast.evaluation import quantize as Q
from pfgmpp_fast.evaluation.calc import GeneratorSource, calc_stats, weights_fingerprint
from pfgmpp_fast.evaluation.features import Detectors
from pfgmpp_fast.evaluation.generate import load_generator_network, resolve_D
from pfgmpp_fast.evaluation.metrics import compute_metrics, load_reference, lower_is_better, metric_columns
from pfgmpp_fast.utils import distributed
from pfgmpp_fast.utils.io_utils import atomic_save_csv, atomic_write_text
from pfgmpp_fast.utils.plots import new_figure, save_figure

__all__ = [
    "SWEEP_KINDS",
    "Point",
    "make_points",
    "point_weights",
    "PointNetwork",
    "as_reference",
    "score_point",
    "write_sweep_outputs",
    "sweep",
]


SWEEP_KINDS = ("checkpoints", "steps", "alpha", "bits", "ema", "guidance")
XLABELS = {
    "checkpoints": "kimg",
    "steps": "NFE",
    "alpha": "alpha",
    "bits": "weight bits",
    "ema": "EMA length (relative std)",
    "guidance": "guidance weight W",
}


@dataclass
class Point:
    """One measurement: `kind` = `value`, sampler overrides `gen`, weights from `path`."""

    kind: str
    value: object
    gen: Dict[str, object] = field(default_factory=dict)
    path: Optional[str] = None


def make_points(kind: str, values: Optional[Sequence], run_dir: Optional[str] = None) -> List[Point]:
    """The points of one sweep, in order (checkpoints: every snapshot of run_dir, or the kimgs
    in `values`)."""
    if kind not in SWEEP_KINDS:
        raise ValueError(f"kind must be one of {SWEEP_KINDS}, got {kind!r}")
    if kind == "checkpoints":
        if run_dir is None:
            raise ValueError("kind='checkpoints' needs run_dir")
        # every rank takes rank 0's list: a run that is still training may add a snapshot between two ranks' looks
        ckpts = [(kimg, path) for kimg, path in distributed.rank_0_value(lambda: find_checkpoints(run_dir))]
        if values is not None:
            wanted = {int(v) for v in values}
            ckpts = [c for c in ckpts if c[0] in wanted]
            if not ckpts:
                raise ValueError(f"none of the kimgs {sorted(wanted)} is in {run_dir}")
        return [Point(kind, kimg, path=path) for kimg, path in ckpts]
    if values is None or len(values) == 0:
        raise ValueError(f"kind={kind!r} needs a non-empty list of values")
    if kind == "ema":
        if run_dir is None:
            raise ValueError("kind='ema' needs run_dir (a training run with --phema snapshots)")
        bad = [v for v in values if not (isinstance(v, (int, float)) and 0 < float(v) < 1)]
        if bad:
            raise ValueError(f"EMA lengths (relative std) must be numbers in (0, 1), got {bad}")
        return [Point(kind, float(v), path=run_dir) for v in values]
    if kind == "steps":
        return [Point(kind, int(v), gen={"num_steps": int(v)}) for v in values]
    if kind == "alpha":
        return [Point(kind, float(v), gen={"alpha": float(v)}) for v in values]
    if kind == "guidance":
        return [Point(kind, float(v), gen={"guidance": float(v)}) for v in values]
    return [Point(kind, int(v)) for v in values]


def point_weights(point: Point, load_network: Callable, device="cpu", at_kimg: Optional[float] = None):
    """The network whose weights a checkpoint / EMA point uses (None for the other kinds)."""
    if point.kind == "checkpoints":
        return load_network(point.path)
    if point.kind == "ema":
        return phema.reconstruct_network(point.path, float(point.value), at_kimg=at_kimg, device=device)
    return None


class PointNetwork:
    """One network shared by all points (compiled once): `apply(point)` writes the point's
    weights into it (snapshot, post-hoc EMA reconstruction, quantised weights), `restore()`
    puts the original weights back."""

    def __init__(self, net, load_network: Callable, device="cpu", at_kimg: Optional[float] = None):
        self.net, self.load_network, self.device, self.at_kimg = net, load_network, device, at_kimg
        self.original = {k: v.detach().clone() for k, v in net.state_dict().items()}

    @torch.no_grad()
    def apply(self, point: Point) -> None:
        other = point_weights(point, self.load_network, self.device, self.at_kimg)
        if other is not None:
            resolve_D(self.net, getattr(other, "D", None))
            self.net.load_state_dict(other.state_dict())
        elif point.kind == "bits":
            self.net.load_state_dict(self.original)
            params = dict(self.net.named_parameters())
            for name, q in Q.quantized_state_dict(self.net, int(point.value)).items():
                params[name].copy_(q)

    @torch.no_grad()
    def restore(self) -> None:
        self.net.load_state_dict(self.original)


def as_reference(ref, detectors: Detectors) -> Dict[str, np.ndarray]:
    """A reference as load_reference's dict, from a path, a dict or (mu, sigma)."""
    if isinstance(ref, (str, os.PathLike)):
        return load_reference(str(ref), dim=detectors.dim, metrics=detectors.metrics)
    ref = dict(ref) if isinstance(ref, dict) else {"mu": ref[0], "sigma": ref[1]}
    if np.asarray(ref["mu"]).shape != (detectors.dim,):
        raise ValueError(f"reference statistics are {np.asarray(ref['mu']).shape[0]}-d, features {detectors.dim}-d")
    return ref


def score_point(
    fast,
    base,
    point: Point,
    seeds,
    detectors: Detectors,
    ref: Dict[str, np.ndarray],
    outdir: Optional[str],
    batch_size: int,
    shard_size: int = 5000,
    device="cpu",
    describe: Optional[dict] = None,
    **gen_kwargs,
) -> dict:
    """The metrics of one point (its weights already applied to `base`, which `fast` runs):
    a row {kind, value, x, images, steps, nfe, <metric columns>, seconds}. `describe` adds
    settings that change the images (e.g. generate.generator_numerics) to the shards'
    configuration, so a resume under other settings is refused."""
    kw = {**gen_kwargs, **point.gen}
    source = GeneratorSource(
        fast,
        seeds,
        device=device,
        describe={
            **(describe or {}),
            "sweep": point.kind,
            "value": point.value,
            "checkpoint": point.path,
            "weights": weights_fingerprint(base),
        },
        **kw,
    )
    t0 = time.perf_counter()
    stats = calc_stats(source, detectors, batch_size=batch_size, outdir=outdir, shard_size=shard_size, device=device)
    scores = compute_metrics(stats, ref, detectors.metrics, detectors.name)
    steps, nfe = source.options.num_steps, source.options.nfe
    return {
        "kind": point.kind,
        "value": point.value,
        "x": nfe if point.kind == "steps" else point.value,
        "images": stats["features"].count,
        "steps": steps,
        "nfe": nfe,
        **scores,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def best_row(rows: List[dict], column: str) -> dict:
    return (min if lower_is_better(column) else max)(rows, key=lambda r: r[column])


def _metric_figure(rows: List[dict], columns: Sequence[str], kind: str, path: str) -> None:
    """One metric (one or two columns, e.g. precision and recall) vs the swept value."""
    fig, ax = new_figure(figsize=(5, 3.5))
    xs = [r["x"] for r in rows]
    for c in columns:
        ax.plot(xs, [r[c] for r in rows], "o-", ms=6, label=c)
        best = best_row(rows, c)
        ax.plot([best["x"]], [best[c]], "*", ms=14, color="tab:red", zorder=3)
    ax.set_xlabel(XLABELS[kind])
    ax.set_ylabel(" / ".join(columns))
    ax.set_title(f"{' / '.join(columns)} sweep over {kind} (★ best)")
    ax.grid(alpha=0.3)
    if len(columns) > 1:
        ax.legend(fontsize=8)
    if kind in ("steps", "bits", "ema"):  # discrete settings: ticks at the measured values only
        ax.set_xticks(xs)
    save_figure(fig, path)


def write_sweep_outputs(
    rows: List[dict], kind: str, metric_groups: Sequence[Sequence[str]], outdir: str
) -> Dict[str, str]:
    """sweep-<kind>.csv, .md (table, best point per metric) and one PNG per metric group."""
    columns = list(rows[0].keys())
    paths = {k: os.path.join(outdir, f"sweep-{kind}.{k}") for k in ("csv", "md")}
    atomic_save_csv(paths["csv"], rows)

    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    names = [c for group in metric_groups for c in group]
    lines = [
        f"# {', '.join(names)} sweep over {kind}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    lines.append("")
    for c in names:
        best = best_row(rows, c)
        lines.append(f"Best: {kind} = {best['value']} with {c} = {best[c]:.4f}")
    atomic_write_text(paths["md"], "\n".join(lines) + "\n")
    for i, group in enumerate(metric_groups):
        key = "png" if i == 0 else f"{group[0]}_png"
        paths[key] = os.path.join(outdir, f"sweep-{kind}.png" if i == 0 else f"sweep-{kind}-{group[0]}.png")
        _metric_figure(rows, group, kind, paths[key])
    return paths


def _metric_groups(detectors: Detectors) -> List[List[str]]:
    """Columns plotted together: one figure per metric (precision with recall)."""
    return [[c for c in metric_columns([m], detectors.name) if not c.endswith("_std")] for m in detectors.metrics]


def sweep(
    kind: str,
    values: Optional[Sequence] = None,
    net=None,
    run_dir: Optional[str] = None,
    ref=None,
    extractor=None,
    seeds="0-49999",
    outdir: str = "fid-sweep",
    batch_size: int = 64,
    shard_size: int = 5000,
    device="cpu",
    make_fast: Optional[Callable] = None,
    load_network: Optional[Callable] = None,
    log: Callable[[str], None] = print,
    metrics=None,
    at_kimg: Optional[float] = None,
    describe: Optional[dict] = None,
    **gen_kwargs,
) -> List[dict]:
    """One sweep in one call, reusing the network: kind in SWEEP_KINDS.

    - 'checkpoints': every snapshot in `run_dir` (metrics vs kimg); `values` optionally
      restricts the kimgs.
    - 'steps': values = numbers of sampling steps (NFE = 2n − 1 for Heun).
    - 'alpha': values = robustness-noise levels α.
    - 'bits': values = weight bit widths (quantize.py; 32 = unquantised).
    - 'ema': values = EMA lengths (relative std); each network is reconstructed post hoc
      from the phema snapshots of `run_dir` (training.phema.reconstruct_network, at `at_kimg`).
    - 'guidance': values = guidance weights W, with the guide `gnet` (a keyword: another
      network, or 'uncond'); W = 1 is the unguided point.
    `extractor`: a features.Detectors, or one feature extractor (then `metrics`, default
    'fid'); `ref`: a reference .npz path, its load_reference dict, or (mu, sigma). Each point
    keeps its shards in outdir/<kind>-<value>/ (resumable). Returns the rows (also written by
    write_sweep_outputs); FID is called FDD outside Inception's space. `describe`: see score_point.
    """
    if extractor is None:
        raise ValueError("extractor is required (get_feature_extractor('inception'|'digits'))")
    detectors = extractor if isinstance(extractor, Detectors) else Detectors(extractor, metrics or ("fid",))
    ref = as_reference(ref, detectors)
    points = make_points(kind, values, run_dir)
    load_network = load_network or (lambda p: load_generator_network(p, device))
    if net is None and kind not in ("checkpoints", "ema"):
        raise ValueError(f"kind={kind!r} needs net")
    if kind == "guidance" and gen_kwargs.get("gnet") is None:
        raise ValueError("kind='guidance' needs gnet (a guide network, or 'uncond' for classifier-free guidance)")
    base = net if net is not None else point_weights(points[0], load_network, device, at_kimg)
    resolve_D(base, gen_kwargs.get("D"))
    fast = (make_fast or (lambda n: n))(base)
    shared = PointNetwork(base, load_network, device, at_kimg)
    rows = []
    try:
        for point in points:
            shared.apply(point)
            row = score_point(
                fast,
                base,
                point,
                seeds,
                detectors,
                ref,
                os.path.join(outdir, f"{kind}-{point.value}"),
                batch_size,
                shard_size,
                device,
                describe,
                **gen_kwargs,
            )
            rows.append(row)
            scores = ", ".join(f"{c} = {row[c]:.4f}" for g in _metric_groups(detectors) for c in g)
            log(f"{kind}={point.value}: {scores} ({row['images']} images)")
    finally:
        shared.restore()
    if distributed.get_rank() == 0:
        groups = _metric_groups(detectors)
        write_sweep_outputs(rows, kind, groups, outdir)
        for c in (c for g in groups for c in g):
            best = best_row(rows, c)
            log(f"best: {kind} = {best['value']} ({c} = {best[c]:.4f})")
    return rows
