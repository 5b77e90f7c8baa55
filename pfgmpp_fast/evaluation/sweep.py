"""The sweep engine: one metric over a list of points — checkpoints of a run directory,
sampling steps (NFE), robustness noise α or weight bit widths — reusing one (compiled)
network. Each point keeps resumable shards in its own subdirectory; results are written
as `sweep-<kind>.csv`, `.md` (table) and `.png` (plot).
"""
from __future__ import annotations

import io
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from pfgmpp_fast.checkpoint import find_checkpoints
from pfgmpp_fast.evaluation import quantize as Q
from pfgmpp_fast.evaluation.calc import calc_stats, generator_source, weights_fingerprint
from pfgmpp_fast.evaluation.generate import load_generator_network, resolve_D
from pfgmpp_fast.evaluation.metrics import frechet_distance, load_stats
from pfgmpp_fast.utils import distributed
from pfgmpp_fast.utils.io_utils import atomic_write_bytes

__all__ = ["SWEEP_KINDS", "sweep"]


SWEEP_KINDS = ("checkpoints", "steps", "alpha", "bits")


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
    atomic_write_bytes(paths["csv"], buf.getvalue().encode())

    best = min(rows, key=lambda r: r[metric])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = [f"# {metric} sweep over {kind}", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    lines += ["", f"Best: {kind} = {best['value']} with {metric} = {best[metric]:.4f}", ""]
    atomic_write_bytes(paths["md"], "\n".join(lines).encode())

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
    atomic_write_bytes(paths["png"], png.getvalue())
    return paths


def sweep(kind: str, values: Optional[Sequence] = None, net=None, run_dir: Optional[str] = None,
          ref=None, extractor=None, seeds="0-49999", outdir: str = "fid-sweep", batch_size: int = 64,
          shard_size: int = 5000, device="cpu", make_fast: Optional[Callable] = None,
          load_network: Optional[Callable] = None, log: Callable[[str], None] = print,
          describe: Optional[dict] = None, **gen_kwargs) -> List[dict]:
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
    `describe` adds settings that change the images (e.g. generate.generator_numerics) to the
    shards' configuration, so a resume under other settings is refused.
    """
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
                **(describe or {}), "sweep": kind, "value": value, "checkpoint": path,
                "weights": weights_fingerprint(base)}, **kw)
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
    if distributed.get_rank() == 0:
        _write_sweep_outputs(rows, kind, metric, outdir, xlabel)
        best = min(rows, key=lambda r: r[metric])
        log(f"best: {kind} = {best['value']} ({metric} = {best[metric]:.4f})")
    return rows
