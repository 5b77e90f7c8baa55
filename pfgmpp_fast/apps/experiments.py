"""`python -m pfgmpp_fast experiment robustness`: the paper's robustness claim, on digits.

PFGM++ (Xu et al., 2023, §5 / Fig. 4–5) reports that finite D trades rigidity for
robustness: under noise injected during sampling (x ← x + α·t·ε at every step), under
post-training weight quantisation and with few sampling steps, small D degrades gracefully
while D → ∞ (diffusion) breaks down, with a middle D as the sweet spot. This experiment lets
a user check that with the package's own tools on data that ships with it:

1. train the demo's small network (digits.SMALL_NETWORK, digits.RECIPE: same recipe, same
   budget, same seed) on the digits' training split for every D in `D_values`;
2. sweep each trained (EMA) network over α (robustness noise), weight bit widths
   (quantize.py, per-channel symmetric fake quantisation) and NFE (Heun: NFE = 2·steps − 1);
   the base point of every sweep is α = 0, 32 bits, 18 steps (35 NFE), computed once;
3. score every point through the sweep engine (evaluation.sweep: the same PointNetwork and
   score_point as `fid sweep`) with every metric of the digits feature space — the Fréchet
   Digit Distance, KID and precision/recall (torch-fidelity's code) — to the training split,
   on `sets` disjoint seed sets of `set_size` images (set k = seeds k·set_size ...) →
   mean ± spread (sample standard deviation over the sets). The same seeds are used for
   every D and every point (common random numbers), and the held-out real digits give the
   floor.

Resumable: each finished training leaves `train/D<D>/done.json`, each finished point a
`points/D<D>/<point>/set<k>.json` (all written atomically); a rerun skips them and an
unfinished training continues from its newest training state. The run's configuration is
kept in `config.json`; a rerun with another configuration in the same folder is refused.

Outputs (results folder, default `results/robustness`): per sweep (alpha, bits, nfe)
`robustness-<sweep>.csv` (long format: one row per D and value), `robustness-<sweep>.md`
(tables: rows D, columns the sweep values, cells mean ± spread of the FDD, and of the
degradation = FDD minus the same D's base-point FDD on the same seed set) and
`robustness-<sweep>.png` (FDD vs the swept value, one line per D; the same tables and
`robustness-<sweep>-{kid,precision,recall}.png` for the other metrics); plus `summary.md`
(all tables and figures, training facts, floor), `training-loss.png` (loss per D),
`results.json` (every point) and `log.txt`. `--report-only` writes these from the points
finished so far without computing anything (for a run stopped early).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

from pfgmpp_fast import checks
from pfgmpp_fast.apps.digits import (D_label, DigitsScorer, digits_uint8_split, latest_snapshot, load_snapshot,
                                     mean_spread, read_stats, sampling_network, train_small, versions)
from pfgmpp_fast.evaluation.calc import reference_stats
from pfgmpp_fast.evaluation.features import Detectors
from pfgmpp_fast.evaluation.sweep import Point, PointNetwork, score_point
from pfgmpp_fast.training.options import TrainingError
from pfgmpp_fast.utils import distributed
from pfgmpp_fast.utils.cli_errors import add_threads_argument
from pfgmpp_fast.utils.io_utils import append_line, atomic_save_csv, atomic_save_json, atomic_write_text
from pfgmpp_fast.utils.plots import save_sweep_figure

__all__ = ["FULL_CONFIG", "TINY_CONFIG", "EXPERIMENTS", "run_robustness", "make_config", "add_arguments", "main"]

FULL_CONFIG = dict(
    D_values=[8.0, 64.0, 128.0, 2048.0, float("inf")],
    alpha=[0.0, 0.05, 0.1, 0.2, 0.3],
    bits=[32, 8, 6, 5, 4],
    steps=[3, 5, 7, 11, 18],          # NFE 5, 9, 13, 21, 35 (Heun)
    base_steps=18,
    duration_kimg=64.0,
    sets=3,
    set_size=360,
    seed=0,
)
# CI: two D values, two points per sweep, a few training steps (< 90 s on a 2-core CPU).
TINY_CONFIG = dict(
    D_values=[128.0, float("inf")],
    alpha=[0.0, 0.3],
    bits=[32, 4],
    steps=[3, 5],                     # NFE 5, 9
    base_steps=5,
    duration_kimg=1.0,
    sets=2,
    set_size=100,
    seed=0,
)
SWEEPS = ("alpha", "bits", "nfe")
EXPERIMENTS = ("robustness",)


def _point_name(alpha: float, bits: int, steps: int) -> str:
    return f"alpha{alpha:g}-bits{bits}-steps{steps}"


def make_config(tiny: bool = False, **overrides) -> dict:
    """The experiment configuration (FULL_CONFIG / TINY_CONFIG plus overrides), validated."""
    config = dict(TINY_CONFIG if tiny else FULL_CONFIG)
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in config:
            raise TypeError(f"unknown experiment option {k!r}; known: {sorted(config)}")
        config[k] = v
    config["D_values"] = [checks.parse_D(d) for d in config["D_values"]]
    if len(set(config["D_values"])) != len(config["D_values"]) or not config["D_values"]:
        raise ValueError(f"D_values must be distinct and non-empty, got {config['D_values']}")
    for a in config["alpha"]:
        if not (isinstance(a, (int, float)) and math.isfinite(a) and a >= 0):
            raise ValueError(f"alpha values must be finite numbers >= 0, got {a!r}")
    for b in config["bits"]:
        if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 32:
            raise ValueError(f"bits values must be ints in [2, 32], got {b!r}")
    for s in config["steps"] + [config["base_steps"]]:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"steps values must be ints >= 1, got {s!r}")
    if not (isinstance(config["sets"], int) and config["sets"] >= 1):
        raise ValueError(f"sets must be an int >= 1, got {config['sets']!r}")
    if not (isinstance(config["set_size"], int) and 2 <= config["set_size"]):
        raise ValueError(f"set_size must be an int >= 2, got {config['set_size']!r}")
    if not (isinstance(config["duration_kimg"], (int, float)) and 0 < config["duration_kimg"] < math.inf):
        raise ValueError(f"duration_kimg must be a positive number, got {config['duration_kimg']!r}")
    if isinstance(config["seed"], bool) or not isinstance(config["seed"], int) or not 0 <= config["seed"] < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2^63), got {config['seed']!r}")
    config["alpha"] = [float(a) for a in config["alpha"]]
    config["duration_kimg"] = float(config["duration_kimg"])
    return config


def _config_json(config: dict) -> dict:
    return {k: ([D_label(d) for d in v] if k == "D_values" else v) for k, v in config.items()}


def _points(config: dict) -> Dict[str, dict]:
    """{name: {alpha, bits, steps}} of every distinct point (the base point once)."""
    base = dict(alpha=0.0, bits=32, steps=config["base_steps"])
    points = {}
    for a in config["alpha"]:
        points.setdefault(_point_name(a, 32, base["steps"]), dict(base, alpha=a))
    for b in config["bits"]:
        points.setdefault(_point_name(0.0, b, base["steps"]), dict(base, bits=b))
    for s in config["steps"]:
        points.setdefault(_point_name(0.0, 32, s), dict(base, steps=s))
    return points


def _sweep_points(config: dict, sweep: str) -> List[tuple]:
    """[(x value, point name)] of one sweep, in the configured order."""
    base_steps = config["base_steps"]
    if sweep == "alpha":
        return [(a, _point_name(a, 32, base_steps)) for a in config["alpha"]]
    if sweep == "bits":
        return [(b, _point_name(0.0, b, base_steps)) for b in config["bits"]]
    return [(2 * s - 1, _point_name(0.0, 32, s)) for s in config["steps"]]


# ----------------------------------------------------------------------------------------
# The run

class _Log:
    def __init__(self, path: Optional[str]):
        self.path = path

    def __call__(self, msg: str):
        print(msg, flush=True)
        if self.path:
            append_line(self.path, msg)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _train(config: dict, D: float, outdir: str, device, log: _Log, progress, backend: str = "auto",
           compute: bool = True) -> Optional[dict]:
    """Train (or resume, or skip) the network for D; returns its done.json record (None when
    it is not finished and compute=False)."""
    run_dir = os.path.join(outdir, "train", f"D{D_label(D)}")
    done_path = os.path.join(run_dir, "done.json")
    done = _read_json(done_path)
    if done is not None:
        log(f"D={D_label(D)}: training finished earlier ({done['kimg']:g} kimg) -> skipped")
        return done
    if not compute:
        log(f"D={D_label(D)}: training not finished (report only: left out)")
        return None
    states = glob.glob(os.path.join(run_dir, "training-state-*.pt"))
    if not states and os.path.isdir(run_dir):      # a start that left no state: begin afresh
        for f in glob.glob(os.path.join(run_dir, "*")):
            if os.path.isfile(f):
                os.unlink(f)
    log(f"D={D_label(D)}: training {config['duration_kimg']:g} kimg"
        + (" (resuming from the newest training state)" if states else ""))
    t0 = time.perf_counter()
    train_small(run_dir, D, config["duration_kimg"], seed=config["seed"], device=device, progress=progress,
                resume=True, backend=backend)
    stats = read_stats(run_dir)
    done = {"D": D_label(D), "kimg": stats[-1]["Progress/kimg"] if stats else config["duration_kimg"],
            "snapshot": os.path.relpath(latest_snapshot(run_dir), outdir),
            "final_loss": stats[-1]["Loss/loss"] if stats else None,
            "train_seconds_this_process": round(time.perf_counter() - t0, 2),
            "train_seconds_total": stats[-1]["Timing/total_sec"] if stats else None,
            "loss_curve": [[s["Progress/kimg"], s["Loss/loss"]] for s in stats]}
    atomic_save_json(done_path, done)
    return done


class _DigitsMetrics:
    """The digits detectors of the robustness sweeps (FDD, KID, precision/recall) and the
    training split's reference (moments and feature rows)."""

    METRICS = "fid,kid,prc"

    def __init__(self, scorer):
        self.detectors = Detectors(scorer.extractor, self.METRICS)
        stats = reference_stats(digits_uint8_split()[0], self.detectors, batch_size=1024, device=scorer.device)
        mu, sigma = stats["features"].mean_cov()
        self.reference = {"mu": mu, "sigma": sigma, "features": stats["features"].rows.numpy()}


def _engine_point(p: dict):
    """The sweep engine's Point for one experiment point (the weights depend on `bits` only)."""
    kind = "bits" if p["bits"] < 32 else ("alpha" if p["alpha"] else "steps")
    value = {"bits": p["bits"], "alpha": p["alpha"], "steps": p["steps"]}[kind]
    return Point(kind, value, gen={"num_steps": p["steps"], "alpha": p["alpha"]})


def _score_points(config: dict, D: float, done: dict, outdir: str, space: _DigitsMetrics, device, log: _Log,
                  progress: bool, backend: str = "auto", set_index: int = 0, compute: bool = True,
                  results: Optional[Dict[str, List[dict]]] = None) -> Dict[str, List[dict]]:
    """FDD, KID and precision/recall of every point on seed set `set_index` for one D, through
    the sweep engine (evaluation.sweep: PointNetwork + score_point), appended to `results`;
    finished ones are read back from disk (compute=False: only those)."""
    points = _points(config)
    results = {name: [] for name in points} if results is None else results
    shared, fast, bits = None, None, None
    k = set_index
    for name, p in points.items():
        path = os.path.join(outdir, "points", f"D{D_label(D)}", name, f"set{k}.json")
        record = _read_json(path)
        if record is not None:
            results[name].append(record)
            log(f"D={D_label(D)} {name} set {k}: FDD {record['fdd']:.3f} (finished earlier -> skipped)")
            continue
        if not compute:
            continue
        if shared is None:
            shared = PointNetwork(load_snapshot(os.path.join(outdir, done["snapshot"]), device), None, device)
        point = _engine_point(p)
        if p["bits"] != bits:            # fp32 everywhere: the bit width is the only quantisation
            shared.apply(point)
            fast, bits = sampling_network(shared.net, device, net_dtype="fp32"), p["bits"]
        seeds = list(range(k * config["set_size"], (k + 1) * config["set_size"]))
        row = score_point(fast, shared.net, point, seeds, space.detectors, space.reference, None,
                          batch_size=config["set_size"] if device.type == "cuda" else 120, device=device,
                          backend=backend)
        record = {"D": D_label(D), "point": name, **p, "nfe": 2 * p["steps"] - 1, "set": k,
                  "seeds": f"{seeds[0]}-{seeds[-1]}", "images": row["images"], "fdd": row["FDD"],
                  "kid": row["KID"], "kid_std": row["KID_std"], "precision": row["precision"],
                  "recall": row["recall"], "seconds": row["seconds"]}
        atomic_save_json(path, record)
        results[name].append(record)
        log(f"D={D_label(D)} {name} set {k}: FDD {record['fdd']:.3f}, KID {record['kid']:.4f}, precision "
            f"{record['precision']:.2f}, recall {record['recall']:.2f} ({record['seconds']:.1f} s)")
    return results


SWEEP_LABELS = {"alpha": ("alpha", "α (noise injected at every step: x ← x + α·t·ε)"),
                "bits": ("bits", "weight bits (post-training quantisation)"),
                "nfe": ("nfe", "NFE (Heun, 2·steps − 1)")}
# The other digits-space metrics beside FDD: record key, title, lower is better.
EXTRA_METRICS = (("kid", "KID", True), ("precision", "precision", False), ("recall", "recall", False))


def _sweep_rows(config: dict, all_results, sweep: str):
    """Long-format rows of one sweep (one per D and value) and the FDD curves per D."""
    column = SWEEP_LABELS[sweep][0]
    base_name = _point_name(0.0, 32, config["base_steps"])
    rows, curves = [], {}
    for D, results in all_results.items():
        xs, means, spreads = [], [], []
        base_by_set = {r["set"]: r["fdd"] for r in results[base_name]}
        for x, name in _sweep_points(config, sweep):
            records = sorted(results[name], key=lambda r: r["set"])
            fdds = [r["fdd"] for r in records]
            if not fdds:        # report_only on a partial run
                continue
            mean, spread = mean_spread(fdds)
            # Paired by seed set (common seeds): how much worse than the same D's base point.
            diffs = [r["fdd"] - base_by_set[r["set"]] for r in records if r["set"] in base_by_set]
            d_mean, d_spread = mean_spread(diffs) if diffs else (float("nan"), float("nan"))
            row = {"D": D_label(D), column: x, "fdd_mean": mean, "fdd_spread": spread,
                   "degradation_mean": d_mean, "degradation_spread": d_spread, "sets": len(fdds),
                   "images_per_set": config["set_size"], "fdd_sets": ";".join(f"{v:.6f}" for v in fdds)}
            for key, _, _ in EXTRA_METRICS:   # records of older runs may lack them: NaN
                row[f"{key}_mean"], row[f"{key}_spread"] = mean_spread([r.get(key, float("nan")) for r in records])
            rows.append(row)
            xs.append(x), means.append(mean), spreads.append(spread)
        curves[f"D={D_label(D)}"] = (xs, means, spreads)
    return rows, curves


def _table(config: dict, all_results, rows: List[dict], sweep: str, key: str, fmt: str) -> List[str]:
    """Markdown table: rows D, columns the sweep values, cells `fmt` of mean and spread of `key`."""
    column = SWEEP_LABELS[sweep][0]
    sp = _sweep_points(config, sweep)
    head = [f"{x:g}" for x, _ in sp]
    lines = [f"| D \\ {column} | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for D in all_results:
        by_x = {r[column]: r for r in rows if r["D"] == D_label(D)}
        cells = [(fmt.format(by_x[x][f"{key}_mean"], by_x[x][f"{key}_spread"])
                  + ("" if key != "fdd" or by_x[x]["sets"] == config["sets"] else f" ({by_x[x]['sets']} sets)"))
                 if x in by_x else "—" for x, _ in sp]
        lines.append(f"| {D_label(D)} | " + " | ".join(cells) + " |")
    return lines


def _sweep_report(config: dict, all_results, rows: List[dict], sweep: str, floor: float) -> str:
    xlabel = SWEEP_LABELS[sweep][1]
    lines = [f"FDD (mean ± spread over {config['sets']} sets of {config['set_size']} samples; lower is better) "
             f"vs {xlabel}", ""] + _table(config, all_results, rows, sweep, "fdd", "{:.2f} ± {:.2f}")
    lines += ["", f"Reference: {config['set_size']} held-out real digits score {floor:.2f}.", "",
              f"Degradation: FDD minus the FDD of the same D's base point (α = 0, 32 bits, "
              f"{2 * config['base_steps'] - 1} NFE) on the same seed set (paired), mean ± spread over the sets", ""]
    lines += _table(config, all_results, rows, sweep, "degradation", "{:+.2f} ± {:.2f}")
    for key, title, lower in EXTRA_METRICS:
        lines += ["", f"{title} in the digits feature space (mean ± spread; {'lower' if lower else 'higher'} "
                  "is better)", ""] + _table(config, all_results, rows, sweep, key, "{:.4f} ± {:.4f}")
    return "\n".join(lines + [""])


def _sweep_figures(config: dict, rows: List[dict], curves, sweep: str, floor: float, base: str) -> Dict[str, str]:
    """One figure per metric: FDD (robustness-<sweep>.png) and robustness-<sweep>-<metric>.png."""
    column, xlabel = SWEEP_LABELS[sweep]
    xticks = [x for x, _ in _sweep_points(config, sweep)]
    paths = {f"{sweep}_png": save_sweep_figure(
        curves, base + ".png", xlabel=xlabel, ylabel="FDD to the training split (lower is better)",
        title=f"PFGM++ on digits: robustness to {sweep}", floor=floor, xticks=xticks, categorical=sweep == "bits")}
    for key, title, lower in EXTRA_METRICS:
        per_D = {}
        for r in rows:
            xs, means, spreads = per_D.setdefault(f"D={r['D']}", ([], [], []))
            xs.append(r[column]), means.append(r[f"{key}_mean"]), spreads.append(r[f"{key}_spread"])
        paths[f"{sweep}_{key}_png"] = save_sweep_figure(
            per_D, f"{base}-{key}.png", xlabel=xlabel, ylabel=f"{title} ({'lower' if lower else 'higher'} is better)",
            title=f"PFGM++ on digits: {title} vs {sweep}", xticks=xticks, categorical=sweep == "bits", logy=False)
    return paths


def _summary(config: dict, trainings, tables, meta: dict, loss_png: bool) -> str:
    summary = ["# Robustness experiment (PFGM++ on digits)", "",
               f"Command: `{meta['command']}`", f"Device: {meta['device']}", "",
               "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), "",
               "Configuration: " + json.dumps(_config_json(config)), "",
               "## Training", "", "| D | kimg | final loss | train seconds |", "|---|---|---|---|"]
    for D, t in trainings.items():
        loss = f"{t['final_loss']:.4f}" if t.get("final_loss") is not None else "n/a"
        secs = t.get("train_seconds_total")
        summary.append(f"| {D_label(D)} | {t['kimg']:g} | {loss} | {secs:.0f} |" if secs is not None
                       else f"| {D_label(D)} | {t['kimg']:g} | {loss} | n/a |")
    if loss_png:
        summary += ["", "![training loss](training-loss.png)"]
    for sweep, table in tables:
        summary += ["", f"## Sweep: {sweep}", "", table, f"![FDD vs {sweep}](robustness-{sweep}.png)"]
    return "\n".join(summary) + "\n"


def _write_outputs(config: dict, all_results: Dict[float, Dict[str, List[dict]]], trainings: Dict[float, dict],
                   floor: float, outdir: str, meta: dict) -> Dict[str, str]:
    paths, tables = {}, []
    for sweep in SWEEPS:
        rows, curves = _sweep_rows(config, all_results, sweep)
        base = os.path.join(outdir, f"robustness-{sweep}")
        paths[f"{sweep}_csv"] = atomic_save_csv(base + ".csv", rows)
        table = _sweep_report(config, all_results, rows, sweep, floor)
        tables.append((sweep, table))
        paths[f"{sweep}_md"] = atomic_write_text(base + ".md", table)
        paths.update(_sweep_figures(config, rows, curves, sweep, floor, base))
    curves = {f"D={D_label(D)}": ([k for k, _ in t["loss_curve"]], [v for _, v in t["loss_curve"]],
                                   [0.0] * len(t["loss_curve"]))
              for D, t in trainings.items() if t.get("loss_curve")}
    if curves:
        paths["loss_png"] = save_sweep_figure(curves, os.path.join(outdir, "training-loss.png"), xlabel="kimg",
                                              ylabel="training loss per pixel", title="training loss per D")
    paths["summary"] = atomic_write_text(os.path.join(outdir, "summary.md"),
                                         _summary(config, trainings, tables, meta, "loss_png" in paths))
    paths["results"] = atomic_save_json(os.path.join(outdir, "results.json"), {
        **meta, "config": _config_json(config), "floor_heldout": floor,
        "trainings": {D_label(D): {k: v for k, v in t.items() if k != "loss_curve"} for D, t in trainings.items()},
        "points": [r for results in all_results.values() for rs in results.values() for r in rs]})
    return paths


def run_robustness(outdir: str = "results/robustness", tiny: bool = False, device="auto", progress="auto",
                   command: Optional[str] = None, backend: str = "auto", report_only: bool = False,
                   **overrides) -> Dict[str, str]:
    """Run (or resume) the robustness experiment; returns {output: path}. report_only: compute
    nothing, write the outputs from what is on disk (points without a finished set are left
    out of the tables; the set counts say how many sets each number averages)."""
    config = make_config(tiny, **overrides)
    device = distributed.pick_device(device)
    outdir = os.path.abspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    config_path = os.path.join(outdir, "config.json")
    stored = _read_json(config_path)
    if stored is not None and stored != _config_json(config):
        raise ValueError(f"{outdir} holds a run of another configuration ({config_path}); use a fresh --outdir.\n"
                         f"  stored: {json.dumps(stored)}\n  now:    {json.dumps(_config_json(config))}")
    if stored is None:
        atomic_save_json(config_path, _config_json(config))
    log = _Log(os.path.join(outdir, "log.txt"))
    bars = sys.stderr.isatty() if progress == "auto" else bool(progress)
    t0 = time.perf_counter()
    log(f"robustness experiment -> {outdir} on {device}: D {[D_label(d) for d in config['D_values']]}, "
        f"{len(_points(config))} points x {config['sets']} sets of {config['set_size']} samples per D")
    scorer = DigitsScorer(device=device)
    floor = scorer.fdd(digits_uint8_split()[1][:config["set_size"]])
    space = _DigitsMetrics(scorer) if not report_only else None
    # Train every D first, then score seed set by seed set: a run stopped early has every
    # point on the first sets (and `report_only` turns that into tables).
    trainings, all_results = {}, {}
    for D in config["D_values"]:
        done = _train(config, D, outdir, device, log, bars, backend, compute=not report_only)
        if done is not None:
            trainings[D] = done
    for k in range(config["sets"]):
        for D, done in trainings.items():
            all_results[D] = _score_points(config, D, done, outdir, space, device, log, bars, backend,
                                           set_index=k, compute=not report_only, results=all_results.get(D))
    if not all_results:
        raise ValueError(f"{outdir}: no finished training yet, nothing to report")
    meta = {"command": command or "python -m pfgmpp_fast experiment robustness", "device": str(device),
            "report_only": bool(report_only),
            "versions": versions(), "features_sha256": scorer.sha256,
            "seconds_this_process": round(time.perf_counter() - t0, 1)}
    paths = _write_outputs(config, all_results, trainings, floor, outdir, meta)
    log(f"done in {time.perf_counter() - t0:.0f} s; results:")
    for key in sorted(paths):
        log(f"  {paths[key]}")
    return paths


# ----------------------------------------------------------------------------------------
# CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=EXPERIMENTS, help="which experiment (robustness: the paper's α / PTQ / NFE claim)")
    p.add_argument("--tiny", action="store_true", help="CI size: 2 D values, 2 points per sweep, 1 kimg (< 90 s)")
    p.add_argument("--outdir", default=None, help="results folder (default: results/robustness, --tiny: "
                                                  "results/robustness-tiny); a rerun resumes")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--duration", type=float, default=None, metavar="KIMG",
                   help=f"training length per D in kimg (default {FULL_CONFIG['duration_kimg']:g}; "
                        f"--tiny {TINY_CONFIG['duration_kimg']:g})")
    p.add_argument("--sets", type=int, default=None, help="seed sets per point (default 3; --tiny 2)")
    p.add_argument("--seed", type=int, default=None, help="training seed (default 0), e.g. for a replicate run")
    p.add_argument("--D-values", dest="D_values", default=None, help="comma-separated D values, e.g. 8,128,inf")
    p.add_argument("--backend", default="auto", help="kernel backend: auto, cpu, cuda, triton, reference")
    add_threads_argument(p)
    p.add_argument("--report-only", action="store_true",
                   help="compute nothing: write the tables and figures from the points finished so far")
    p.add_argument("--no-progress", dest="progress", action="store_false", default="auto")


def main(args) -> int:
    outdir = args.outdir or ("results/robustness-tiny" if args.tiny else "results/robustness")
    command = "python -m pfgmpp_fast experiment " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["experiment"]
                                                                else sys.argv[1:])
    try:
        distributed.set_cpu_threads(distributed.pick_device(args.device), args.threads)
        D_values = None if args.D_values is None else [d.strip() for d in args.D_values.split(",") if d.strip()]
        run_robustness(outdir, tiny=args.tiny, device=args.device, progress=args.progress, command=command,
                       backend=args.backend, report_only=args.report_only,
                       duration_kimg=args.duration, sets=args.sets, D_values=D_values, seed=args.seed)
    except (ValueError, TypeError, FileNotFoundError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
