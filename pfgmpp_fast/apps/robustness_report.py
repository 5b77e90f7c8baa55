"""The robustness experiment's point names and its reports: per sweep a long-format CSV, a
Markdown table per metric (FDD and its paired degradation, KID, precision, recall) and one
figure per metric; `summary.md`, `training-loss.png` and `results.json` (apps/experiments.py
runs the experiment and calls `write_outputs`).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

from pfgmpp_fast.apps.digits import D_label, mean_spread
from pfgmpp_fast.utils.io_utils import atomic_save_csv, atomic_save_json, atomic_write_text
from pfgmpp_fast.utils.plots import save_sweep_figure

__all__ = [
    "SWEEPS",
    "SWEEP_LABELS",
    "EXTRA_METRICS",
    "point_name",
    "ema_name",
    "config_json",
    "sweeps",
    "sweep_label",
    "nfe_steps",
    "sweep_points",
    "write_outputs",
]

SWEEPS = ("alpha", "bits", "nfe", "ema")  # plus "nfe-<solver>" for each of config["nfe_solvers"]


def point_name(alpha: float, bits: int, steps: int, solver: str = "heun") -> str:
    return f"alpha{alpha:g}-bits{bits}-steps{steps}" + ("" if solver == "heun" else f"-{solver}")


def sweeps(config: dict) -> List[str]:
    """The sweeps of a configuration: SWEEPS, with one NFE sweep per extra solver after Heun's."""
    return ["alpha", "bits", "nfe", *[f"nfe-{s}" for s in config["nfe_solvers"]], "ema"]


def sweep_label(sweep: str):
    """(CSV column, axis label) of a sweep."""
    if sweep.startswith("nfe-"):
        return "nfe", f"NFE ({sweep[4:]}, = steps)"
    return SWEEP_LABELS[sweep]


def nfe_steps(config: dict) -> List[int]:
    """The NFE values of every NFE sweep: Heun's, 2·steps − 1 (a multistep solver's steps = NFE)."""
    return [2 * s - 1 for s in config["steps"]]


def ema_name(std: float) -> str:
    """The point of a network reconstructed for EMA length `std` (post-hoc EMA), at the base point."""
    return f"ema{std:g}"


def config_json(config: dict) -> dict:
    return {k: ([D_label(d) for d in v] if k == "D_values" else v) for k, v in config.items()}


def sweep_points(config: dict, sweep: str) -> List[tuple]:
    """[(x value, point name)] of one sweep, in the configured order."""
    base_steps = config["base_steps"]
    if sweep == "alpha":
        return [(a, point_name(a, 32, base_steps)) for a in config["alpha"]]
    if sweep == "bits":
        return [(b, point_name(0.0, b, base_steps)) for b in config["bits"]]
    if sweep == "ema":
        return [(e, ema_name(e)) for e in config["ema"]]
    if sweep.startswith("nfe-"):
        return [(n, point_name(0.0, 32, n, sweep[4:])) for n in nfe_steps(config)]
    return [(2 * s - 1, point_name(0.0, 32, s)) for s in config["steps"]]


SWEEP_LABELS = {
    "alpha": ("alpha", "α (noise injected at every step: x ← x + α·t·ε)"),
    "bits": ("bits", "weight bits (post-training quantisation)"),
    "nfe": ("nfe", "NFE (Heun, 2·steps − 1)"),
    "ema": ("ema", "EMA length (relative std; post-hoc EMA reconstruction)"),
}
# The other digits-space metrics beside FDD: record key, title, lower is better.
EXTRA_METRICS = (("kid", "KID", True), ("precision", "precision", False), ("recall", "recall", False))


def _sweep_rows(config: dict, all_results, sweep: str):
    """Long-format rows of one sweep (one per D and value) and the FDD curves per D."""
    column = sweep_label(sweep)[0]
    base_name = point_name(0.0, 32, config["base_steps"])
    rows, curves = [], {}
    for D, results in all_results.items():
        xs, means, spreads = [], [], []
        base_by_set = {r["set"]: r["fdd"] for r in results.get(base_name, [])}
        for x, name in sweep_points(config, sweep):
            records = sorted(results.get(name, []), key=lambda r: r["set"])
            fdds = [r["fdd"] for r in records]
            if not fdds:  # report_only on a partial run
                continue
            mean, spread = mean_spread(fdds)
            # Paired by seed set (common seeds): how much worse than the same D's base point.
            diffs = [r["fdd"] - base_by_set[r["set"]] for r in records if r["set"] in base_by_set]
            d_mean, d_spread = mean_spread(diffs) if diffs else (float("nan"), float("nan"))
            row = {
                "D": D_label(D),
                column: x,
                "fdd_mean": mean,
                "fdd_spread": spread,
                "degradation_mean": d_mean,
                "degradation_spread": d_spread,
                "sets": len(fdds),
                "images_per_set": config["set_size"],
                "fdd_sets": ";".join(f"{v:.6f}" for v in fdds),
            }
            for key, _, _ in EXTRA_METRICS:  # records of older runs may lack them: NaN
                row[f"{key}_mean"], row[f"{key}_spread"] = mean_spread([r.get(key, float("nan")) for r in records])
            rows.append(row)
            xs.append(x), means.append(mean), spreads.append(spread)
        curves[f"D={D_label(D)}"] = (xs, means, spreads)
    return rows, curves


def _table(config: dict, all_results, rows: List[dict], sweep: str, key: str, fmt: str) -> List[str]:
    """Markdown table: rows D, columns the sweep values, cells `fmt` of mean and spread of `key`."""
    column = sweep_label(sweep)[0]
    sp = sweep_points(config, sweep)
    head = [f"{x:g}" for x, _ in sp]
    lines = [f"| D \\ {column} | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for D in all_results:
        by_x = {r[column]: r for r in rows if r["D"] == D_label(D)}
        cells = [
            (
                fmt.format(by_x[x][f"{key}_mean"], by_x[x][f"{key}_spread"])
                + ("" if key != "fdd" or by_x[x]["sets"] == config["sets"] else f" ({by_x[x]['sets']} sets)")
            )
            if x in by_x
            else "—"
            for x, _ in sp
        ]
        lines.append(f"| {D_label(D)} | " + " | ".join(cells) + " |")
    return lines


def _sweep_report(config: dict, all_results, rows: List[dict], sweep: str, floor: float) -> str:
    xlabel = sweep_label(sweep)[1]
    lines = [
        f"FDD (mean ± spread over {config['sets']} sets of {config['set_size']} samples; lower is better) vs {xlabel}",
        "",
    ] + _table(config, all_results, rows, sweep, "fdd", "{:.2f} ± {:.2f}")
    lines += [
        "",
        f"Reference: {config['set_size']} held-out real digits score {floor:.2f}.",
        "",
        f"Degradation: FDD minus the FDD of the same D's base point (α = 0, 32 bits, "
        f"{2 * config['base_steps'] - 1} NFE{', the training EMA' if sweep == 'ema' else ''}) on the same "
        "seed set (paired), mean ± spread over the sets",
        "",
    ]
    lines += _table(config, all_results, rows, sweep, "degradation", "{:+.2f} ± {:.2f}")
    for key, title, lower in EXTRA_METRICS:
        lines += [
            "",
            f"{title} in the digits feature space (mean ± spread; {'lower' if lower else 'higher'} is better)",
            "",
        ] + _table(config, all_results, rows, sweep, key, "{:.4f} ± {:.4f}")
    return "\n".join(lines + [""])


def _sweep_figures(config: dict, rows: List[dict], curves, sweep: str, floor: float, base: str) -> Dict[str, str]:
    """One figure per metric: FDD (robustness-<sweep>.png) and robustness-<sweep>-<metric>.png."""
    column, xlabel = sweep_label(sweep)
    xticks = [x for x, _ in sweep_points(config, sweep)]
    title = "FDD vs EMA length" if sweep == "ema" else f"robustness to {sweep}"
    paths = {
        f"{sweep}_png": save_sweep_figure(
            curves,
            base + ".png",
            xlabel=xlabel,
            ylabel="FDD to the training split (lower is better)",
            title=f"PFGM++ on digits: {title}",
            floor=floor,
            xticks=xticks,
            categorical=sweep == "bits",
        )
    }
    for key, title, lower in EXTRA_METRICS:
        per_D = {}
        for r in rows:
            xs, means, spreads = per_D.setdefault(f"D={r['D']}", ([], [], []))
            xs.append(r[column]), means.append(r[f"{key}_mean"]), spreads.append(r[f"{key}_spread"])
        paths[f"{sweep}_{key}_png"] = save_sweep_figure(
            per_D,
            f"{base}-{key}.png",
            xlabel=xlabel,
            ylabel=f"{title} ({'lower' if lower else 'higher'} is better)",
            title=f"PFGM++ on digits: {title} vs {sweep}",
            xticks=xticks,
            categorical=sweep == "bits",
            logy=False,
        )
    return paths


def _summary(config: dict, trainings, tables, meta: dict, loss_png: bool) -> str:
    summary = [
        "# Robustness experiment (PFGM++ on digits)",
        "",
        f"Command: `{meta['command']}`",
        f"Device: {meta['device']}",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        "Configuration: " + json.dumps(config_json(config)),
        "",
        "## Training",
        "",
        "| D | kimg | final loss | train seconds |",
        "|---|---|---|---|",
    ]
    for D, t in trainings.items():
        loss = f"{t['final_loss']:.4f}" if t.get("final_loss") is not None else "n/a"
        secs = t.get("train_seconds_total")
        summary.append(
            f"| {D_label(D)} | {t['kimg']:g} | {loss} | {secs:.0f} |"
            if secs is not None
            else f"| {D_label(D)} | {t['kimg']:g} | {loss} | n/a |"
        )
    if loss_png:
        summary += ["", "![training loss](training-loss.png)"]
    for sweep, table in tables:
        summary += ["", f"## Sweep: {sweep}", "", table, f"![FDD vs {sweep}](robustness-{sweep}.png)"]
    return "\n".join(summary) + "\n"


def write_outputs(
    config: dict,
    all_results: Dict[float, Dict[str, List[dict]]],
    trainings: Dict[float, dict],
    floor: float,
    outdir: str,
    meta: dict,
) -> Dict[str, str]:
    paths, tables = {}, []
    for sweep in sweeps(config):
        rows, curves = _sweep_rows(config, all_results, sweep)
        if not rows:  # report_only before any point of this sweep finished
            continue
        base = os.path.join(outdir, f"robustness-{sweep}")
        paths[f"{sweep}_csv"] = atomic_save_csv(base + ".csv", rows)
        table = _sweep_report(config, all_results, rows, sweep, floor)
        tables.append((sweep, table))
        paths[f"{sweep}_md"] = atomic_write_text(base + ".md", table)
        paths.update(_sweep_figures(config, rows, curves, sweep, floor, base))
    curves = {
        f"D={D_label(D)}": (
            [k for k, _ in t["loss_curve"]],
            [v for _, v in t["loss_curve"]],
            [0.0] * len(t["loss_curve"]),
        )
        for D, t in trainings.items()
        if t.get("loss_curve")
    }
    if curves:
        paths["loss_png"] = save_sweep_figure(
            curves,
            os.path.join(outdir, "training-loss.png"),
            xlabel="kimg",
            ylabel="training loss per pixel",
            title="training loss per D",
        )
    paths["summary"] = atomic_write_text(
        os.path.join(outdir, "summary.md"), _summary(config, trainings, tables, meta, "loss_png" in paths)
    )
    records = [rs for results in all_results.values() for rs in results.values()]
    paths["results"] = atomic_save_json(
        os.path.join(outdir, "results.json"),
        {
            **meta,
            "config": config_json(config),
            "floor_heldout": floor,
            "trainings": {D_label(D): {k: v for k, v in t.items() if k != "loss_curve"} for D, t in trainings.items()},
            "points": [r for rs in records for r in rs if "ema" not in r],
            "ema_points": [r for rs in records for r in rs if "ema" in r],
        },
    )
    return paths
