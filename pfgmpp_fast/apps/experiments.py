"""`python -m pfgmpp_fast experiment robustness`: the paper's robustness claim, on digits.

PFGM++ (Xu et al., 2023, §5 / Fig. 4–5) reports that finite D trades rigidity for
robustness: under noise injected during sampling (x ← x + α·t·ε at every step), under
post-training weight quantisation and with few sampling steps, small D degrades gracefully
while D → ∞ (diffusion) breaks down, with a middle D as the sweet spot. This experiment lets
a user check that with the package's own tools on data that ships with it:

1. train the demo's small network (digits.SMALL_NETWORK, digits.RECIPE: same recipe, same
   budget, same seed) on the digits' training split for every D in `D_values`, also tracking
   the power-function EMAs digits.PHEMA_TRACKED (snapshots every 1/20 of the run);
2. sweep each trained (EMA) network over α (robustness noise), weight bit widths
   (quantize.py, per-channel symmetric fake quantisation) and NFE (Heun: NFE = 2·steps − 1;
   the same NFE values for each solver of `nfe_solvers`, whose steps are their NFE; on the
   command line `--nfe-values 3,5,7`: odd values only, the NFE Heun can reach);
   the base point of every sweep is α = 0, 32 bits, 18 steps (35 NFE), computed once; and
   sweep the EMA length (`ema`): the network reconstructed post hoc for each length
   (pfgmpp_fast/phema.py, EDM2) at the base point's sampler settings;
3. score every point through the sweep engine (evaluation.sweep: the same PointNetwork and
   score_point as `fid sweep`) with every metric of the digits feature space — the Fréchet
   Digit Distance, KID and precision/recall (torch-fidelity's code) — to the training split,
   on `sets` disjoint seed sets of `set_size` images (set k = seeds k·set_size ...) →
   mean ± spread (sample standard deviation over the sets). The same seeds are used for
   every D and every point (common random numbers), and the held-out real digits give the
   floor.

Resumable: each finished training leaves `train/D<D>/done.json`, each finished point a
`points/D<D>/<point>/set<k>.json` (EMA lengths: `ema/D<D>/ema<std>/set<k>.json`; all written
atomically); a rerun skips them and an unfinished training continues from its newest
training state. The run's configuration is kept in `config.json`; a rerun with another
configuration in the same folder is refused.

Outputs (results folder, default `results/robustness`; apps/robustness_report.py writes
them): per sweep (alpha, bits, nfe, nfe-<solver>, ema) `robustness-<sweep>.csv` (long format: one row per
D and value), `robustness-<sweep>.md` (tables: rows D, columns the sweep values, cells
mean ± spread of the FDD, and of the degradation = FDD minus the same D's base-point FDD on
the same seed set) and `robustness-<sweep>.png` (FDD vs the swept value, one line per D; the
same tables and `robustness-<sweep>-{kid,precision,recall}.png` for the other metrics); plus
`summary.md` (all tables and figures, training facts, floor), `training-loss.png` (loss per
D), `results.json` (every point; the EMA lengths' under `ema_points`) and `log.txt`.
`--report-only` writes these from the points finished so far without computing anything
(for a run stopped early). A preemption signal (SIGTERM, SIGUSR1: `--preempt-signals`) stops
the run after the current training step (with a training state) or the current point, with
exit code 75; the rerun continues with the same bits.
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
from pfgmpp_fast.apps.digits import (
    PHEMA_TRACKED,
    D_label,
    DigitsScorer,
    digits_uint8_split,
    latest_snapshot,
    load_snapshot,
    read_stats,
    sampling_network,
    train_small,
    versions,
)
from pfgmpp_fast.apps.robustness_report import config_json, ema_name, nfe_steps, point_name, write_outputs
from pfgmpp_fast.evaluation.sweep import Point, PointNetwork, score_point
from pfgmpp_fast.phema import STD_MAX
from pfgmpp_fast.training.report import stat_value
from pfgmpp_fast.utils import distributed
from pfgmpp_fast.utils.cli_errors import InvalidValue, add_threads_argument, checked
from pfgmpp_fast.utils.io_utils import append_line, atomic_save_json
from pfgmpp_fast.utils.preemption import DEFAULT_SIGNALS, Preempted, Preemption, add_preempt_argument, stop_if_requested

__all__ = [
    "FULL_CONFIG",
    "TINY_CONFIG",
    "EXPERIMENTS",
    "run_robustness",
    "make_config",
    "distinct_points",
    "steps_for_nfe",
    "parse_nfe_values",
    "add_arguments",
    "main",
]

FULL_CONFIG = dict(
    D_values=[8.0, 64.0, 128.0, 2048.0, float("inf")],
    alpha=[0.0, 0.05, 0.1, 0.2, 0.3],
    bits=[32, 8, 6, 5, 4],
    steps=[3, 5, 7, 11, 18],  # NFE 5, 9, 13, 21, 35 (Heun)
    nfe_solvers=["euler", "dpmpp2m", "ipndm", "ipndm_v"],  # swept at the same NFE as Heun
    ema=[0.05, 0.1, 0.15],  # post-hoc EMA lengths (relative std), from the tracked PHEMA_TRACKED
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
    steps=[3, 5],  # NFE 5, 9
    nfe_solvers=["dpmpp2m"],
    ema=[0.05, 0.1],
    base_steps=5,
    duration_kimg=1.0,
    sets=2,
    set_size=100,
    seed=0,
)
EXPERIMENTS = ("robustness",)


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
    for e in config["ema"]:
        if isinstance(e, bool) or not (isinstance(e, (int, float)) and 0 < e < STD_MAX):
            raise ValueError(f"ema values must be EMA lengths (relative std) in (0, {STD_MAX:.4f}), got {e!r}")
    if len(set(config["ema"])) != len(config["ema"]):
        raise ValueError(f"ema values must be distinct, got {config['ema']}")
    for s in config["steps"] + [config["base_steps"]]:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"steps values must be ints >= 1, got {s!r}")
    solvers = config["nfe_solvers"]
    if any(s not in checks.SOLVERS or s == "heun" for s in solvers) or len(set(solvers)) != len(solvers):
        raise ValueError(f"nfe_solvers must be distinct solvers other than 'heun' of {checks.SOLVERS}, got {solvers!r}")
    if not (isinstance(config["sets"], int) and config["sets"] >= 1):
        raise ValueError(f"sets must be an int >= 1, got {config['sets']!r}")
    if not (isinstance(config["set_size"], int) and 2 <= config["set_size"]):
        raise ValueError(f"set_size must be an int >= 2, got {config['set_size']!r}")
    if not (isinstance(config["duration_kimg"], (int, float)) and 0 < config["duration_kimg"] < math.inf):
        raise ValueError(f"duration_kimg must be a positive number, got {config['duration_kimg']!r}")
    if isinstance(config["seed"], bool) or not isinstance(config["seed"], int) or not 0 <= config["seed"] < 2**63:
        raise ValueError(f"seed must be an int in [0, 2^63), got {config['seed']!r}")
    config["alpha"] = [float(a) for a in config["alpha"]]
    config["ema"] = [float(e) for e in config["ema"]]
    config["duration_kimg"] = float(config["duration_kimg"])
    return config


def steps_for_nfe(nfe_values) -> List[int]:
    """The config's `steps` (Heun's) for the NFE values of the NFE sweeps. Heun costs 2·steps − 1
    network evaluations and every other solver one per step (steps = NFE), so each NFE must be
    odd for Heun to reach it; the values must be distinct ints >= 1."""
    values = list(nfe_values)
    bad = [n for n in values if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n % 2 == 0]
    if bad or not values or len(set(values)) != len(values):
        raise InvalidValue(
            "nfe_values",
            "must be distinct odd integers >= 1 (Heun's NFE is 2·steps − 1; the other solvers take "
            f"NFE steps), got {', '.join(map(str, values)) or 'none'}"
            + (f" ({', '.join(map(str, bad))}: not an odd integer >= 1)" if bad else ""),
            sep=": ",
        )
    return [(n + 1) // 2 for n in values]


def parse_nfe_values(text: str) -> List[int]:
    """`--nfe-values 3,5,7`: the NFE values (checked by steps_for_nfe)."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InvalidValue("nfe_values", f"must be comma-separated odd integers >= 1, got {text!r}", sep=": ") from None
    steps_for_nfe(values)
    return values


def distinct_points(config: dict) -> Dict[str, dict]:
    """{name: {alpha, bits, steps[, solver]}} of every distinct point (the base point once; no
    solver: Heun)."""
    base = dict(alpha=0.0, bits=32, steps=config["base_steps"])
    points = {}
    for a in config["alpha"]:
        points.setdefault(point_name(a, 32, base["steps"]), dict(base, alpha=a))
    for b in config["bits"]:
        points.setdefault(point_name(0.0, b, base["steps"]), dict(base, bits=b))
    for s in config["steps"]:
        points.setdefault(point_name(0.0, 32, s), dict(base, steps=s))
    for solver in config["nfe_solvers"]:
        for n in nfe_steps(config):
            points.setdefault(point_name(0.0, 32, n, solver), dict(base, steps=n, solver=solver))
    return points


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


def _train(
    config: dict,
    D: float,
    outdir: str,
    device,
    log: _Log,
    progress,
    backend: str = "auto",
    compute: bool = True,
    preempt_signals=DEFAULT_SIGNALS,
) -> Optional[dict]:
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
    if not states and os.path.isdir(run_dir):  # a start that left no state: begin afresh
        for f in glob.glob(os.path.join(run_dir, "*")):
            if os.path.isfile(f):
                os.unlink(f)
    log(
        f"D={D_label(D)}: training {config['duration_kimg']:g} kimg"
        + (" (resuming from the newest training state)" if states else "")
    )
    t0 = time.perf_counter()
    try:
        train_small(
            run_dir,
            D,
            config["duration_kimg"],
            seed=config["seed"],
            device=device,
            progress=progress,
            resume=True,
            backend=backend,
            phema=PHEMA_TRACKED,
            phema_snap_kimg=config["duration_kimg"] / 20,
            preempt_signals=preempt_signals,
        )
    except Preempted as exc:  # the training state is written: the rerun continues it
        raise Preempted(
            f"preempted by {exc.signal} while training D={D_label(D)}: its training state is in {run_dir}; "
            "rerun the same command to continue",
            exc.signal,
        ) from None
    stats = read_stats(run_dir)
    done = {
        "D": D_label(D),
        "kimg": stat_value(stats[-1], "Progress/kimg") if stats else config["duration_kimg"],
        "snapshot": os.path.relpath(latest_snapshot(run_dir), outdir),
        "final_loss": stat_value(stats[-1], "Loss/loss") if stats else None,
        "train_seconds_this_process": round(time.perf_counter() - t0, 2),
        "train_seconds_total": stat_value(stats[-1], "Timing/total_sec") if stats else None,
        "loss_curve": [[stat_value(s, "Progress/kimg"), stat_value(s, "Loss/loss")] for s in stats],
    }
    atomic_save_json(done_path, done)
    return done


def _engine_point(p: dict):
    """The sweep engine's Point for one experiment point (the weights depend on `bits` only)."""
    kind = "bits" if p["bits"] < 32 else ("alpha" if p["alpha"] else "steps")
    value = {"bits": p["bits"], "alpha": p["alpha"], "steps": p["steps"]}[kind]
    solver = {"solver": p["solver"]} if "solver" in p else {}
    return Point(kind, value, gen={"num_steps": p["steps"], "alpha": p["alpha"], **solver})


def _jobs(config: dict, D: float, outdir: str, run_dir: str) -> List[tuple]:
    """[(name, record fields, engine Point, weights key, folder)] of one D: every point, then
    the network reconstructed for each EMA length (post-hoc EMA) at the base point."""
    jobs = [
        (name, p, _engine_point(p), p["bits"], os.path.join(outdir, "points", f"D{D_label(D)}", name))
        for name, p in distinct_points(config).items()
    ]
    base = dict(alpha=0.0, bits=32, steps=config["base_steps"])
    for std in config["ema"]:
        point = Point("ema", std, gen={"num_steps": base["steps"], "alpha": 0.0}, path=run_dir)
        jobs.append(
            (
                ema_name(std),
                dict(base, ema=std),
                point,
                ("ema", std),
                os.path.join(outdir, "ema", f"D{D_label(D)}", ema_name(std)),
            )
        )
    return jobs


def _score_points(
    config: dict,
    D: float,
    done: dict,
    outdir: str,
    space,
    device,
    log: _Log,
    progress: bool,
    backend: str = "auto",
    set_index: int = 0,
    compute: bool = True,
    results: Optional[Dict[str, List[dict]]] = None,
) -> Dict[str, List[dict]]:
    """FDD, KID and precision/recall of every point and EMA length on seed set `set_index` for
    one D, through the sweep engine (evaluation.sweep: PointNetwork + score_point) in the space
    of `space` (apps.digits.DigitsScorer: detectors, reference), appended to `results`;
    finished ones are read back from disk (compute=False: only those)."""
    snapshot = os.path.join(outdir, done["snapshot"])
    jobs = _jobs(config, D, outdir, os.path.dirname(snapshot))
    results = {job[0]: [] for job in jobs} if results is None else results
    shared, fast, weights = None, None, None
    k = set_index
    for name, p, point, key, folder in jobs:
        path = os.path.join(folder, f"set{k}.json")
        record = _read_json(path)
        if record is not None:
            results[name].append(record)
            log(f"D={D_label(D)} {name} set {k}: FDD {record['fdd']:.3f} (finished earlier -> skipped)")
            continue
        if not compute:
            continue
        stop_if_requested(f"the finished points are kept in {outdir}: rerun the same command to continue")
        if shared is None:
            shared = PointNetwork(load_snapshot(snapshot, device), None, device)
        if key != weights:  # fp32 everywhere: the bit width is the only quantisation
            shared.restore()
            shared.apply(point)
            fast, weights = sampling_network(shared.net, device, net_dtype="fp32"), key
        seeds = list(range(k * config["set_size"], (k + 1) * config["set_size"]))
        row = score_point(
            fast,
            shared.net,
            point,
            seeds,
            space.detectors,
            space.reference,
            None,
            batch_size=config["set_size"] if device.type == "cuda" else 120,
            device=device,
            backend=backend,
        )
        record = {
            "D": D_label(D),
            "point": name,
            **p,
            "nfe": row["nfe"],
            "set": k,
            "seeds": f"{seeds[0]}-{seeds[-1]}",
            "images": row["images"],
            "fdd": row["FDD"],
            "kid": row["KID"],
            "kid_std": row["KID_std"],
            "precision": row["precision_digits"],
            "recall": row["recall_digits"],
            "seconds": row["seconds"],
        }  # a digits-only experiment
        atomic_save_json(path, record)
        results[name].append(record)
        log(
            f"D={D_label(D)} {name} set {k}: FDD {record['fdd']:.3f}, KID {record['kid']:.4f}, precision_digits "
            f"{record['precision']:.2f}, recall_digits {record['recall']:.2f} ({record['seconds']:.1f} s)"
        )
    return results


def run_robustness(
    outdir: str = "results/robustness",
    tiny: bool = False,
    device="auto",
    progress="auto",
    command: Optional[str] = None,
    backend: str = "auto",
    report_only: bool = False,
    preempt_signals=DEFAULT_SIGNALS,
    **overrides,
) -> Dict[str, str]:
    """Run (or resume) the robustness experiment; returns {output: path}. report_only: compute
    nothing, write the outputs from what is on disk (points without a finished set are left
    out of the tables; the set counts say how many sets each number averages). preempt_signals:
    the signals that stop it after the current training step or point (utils/preemption.py:
    Preempted; the finished work is kept and a rerun continues)."""
    config = make_config(tiny, **overrides)
    device = distributed.pick_device(device)
    outdir = os.path.abspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    config_path = os.path.join(outdir, "config.json")
    stored = _read_json(config_path)
    if stored is not None and stored != config_json(config):
        raise ValueError(
            f"{outdir} holds a run of another configuration ({config_path}); use a fresh --outdir.\n"
            f"  stored: {json.dumps(stored)}\n  now:    {json.dumps(config_json(config))}"
        )
    if stored is None:
        atomic_save_json(config_path, config_json(config))
    log = _Log(os.path.join(outdir, "log.txt"))
    bars = sys.stderr.isatty() if progress == "auto" else bool(progress)
    t0 = time.perf_counter()
    log(
        f"robustness experiment -> {outdir} on {device}: D {[D_label(d) for d in config['D_values']]}, "
        f"{len(distinct_points(config))} points x {config['sets']} sets of {config['set_size']} samples per D"
    )
    with Preemption(preempt_signals):  # the previous signal handlers come back after it
        scorer = DigitsScorer(device=device)
        floor = scorer.fdd(digits_uint8_split()[1][: config["set_size"]])
        # Train every D first, then score seed set by seed set: a run stopped early has every
        # point on the first sets (and `report_only` turns that into tables).
        trainings, all_results = {}, {}
        for D in config["D_values"]:
            done = _train(config, D, outdir, device, log, bars, backend, not report_only, preempt_signals)
            if done is not None:
                trainings[D] = done
        for k in range(config["sets"]):
            for D, done in trainings.items():
                all_results[D] = _score_points(
                    config,
                    D,
                    done,
                    outdir,
                    scorer,
                    device,
                    log,
                    bars,
                    backend,
                    set_index=k,
                    compute=not report_only,
                    results=all_results.get(D),
                )
    if not all_results:
        raise ValueError(f"{outdir}: no finished training yet, nothing to report")
    meta = {
        "command": command or "python -m pfgmpp_fast experiment robustness",
        "device": str(device),
        "report_only": bool(report_only),
        "versions": versions(),
        "features_sha256": scorer.sha256,
        "seconds_this_process": round(time.perf_counter() - t0, 1),
    }
    paths = write_outputs(config, all_results, trainings, floor, outdir, meta)
    log(f"done in {time.perf_counter() - t0:.0f} s; results:")
    for key in sorted(paths):
        log(f"  {paths[key]}")
    return paths


# ----------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=EXPERIMENTS, help="which experiment (robustness: the paper's α / PTQ / NFE claim)")
    p.add_argument("--tiny", action="store_true", help="CI size: 2 D values, 2 points per sweep, 1 kimg (< 90 s)")
    p.add_argument(
        "--outdir",
        default=None,
        help="results folder (default: results/robustness, --tiny: results/robustness-tiny); a rerun resumes",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="KIMG",
        help=f"training length per D in kimg (default {FULL_CONFIG['duration_kimg']:g}; "
        f"--tiny {TINY_CONFIG['duration_kimg']:g})",
    )
    p.add_argument("--sets", type=int, default=None, help="seed sets per point (default 3; --tiny 2)")
    p.add_argument("--seed", type=int, default=None, help="training seed (default 0), e.g. for a replicate run")
    p.add_argument("--D-values", dest="D_values", default=None, help="comma-separated D values, e.g. 8,128,inf")
    p.add_argument(
        "--nfe-values",
        dest="nfe_values",
        type=checked(parse_nfe_values, "NFE values"),
        default=None,
        help="comma-separated NFE of every NFE sweep, odd (Heun: 2·steps − 1; the other solvers: "
        f"steps = NFE), e.g. 3,5,7,9,13,21,35 (default {','.join(str(2 * s - 1) for s in FULL_CONFIG['steps'])}; "
        f"--tiny {','.join(str(2 * s - 1) for s in TINY_CONFIG['steps'])})",
    )
    p.add_argument("--backend", default="auto", help="kernel backend: auto, cpu, cuda, triton, reference")
    add_threads_argument(p)
    add_preempt_argument(p)
    p.add_argument(
        "--report-only",
        action="store_true",
        help="compute nothing: write the tables and figures from the points finished so far",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", default="auto")


def main(args) -> int:
    outdir = args.outdir or ("results/robustness-tiny" if args.tiny else "results/robustness")
    command = "python -m pfgmpp_fast experiment " + " ".join(
        sys.argv[2:] if sys.argv[1:2] == ["experiment"] else sys.argv[1:]
    )
    # Errors become one message in cli_errors.command: bad options exit 2, a failed training 1.
    distributed.set_cpu_threads(distributed.pick_device(args.device), args.threads)
    D_values = None if args.D_values is None else [d.strip() for d in args.D_values.split(",") if d.strip()]
    run_robustness(
        outdir,
        tiny=args.tiny,
        device=args.device,
        progress=args.progress,
        command=command,
        backend=args.backend,
        report_only=args.report_only,
        preempt_signals=args.preempt_signals,
        duration_kimg=args.duration,
        sets=args.sets,
        D_values=D_values,
        steps=None if args.nfe_values is None else steps_for_nfe(args.nfe_values),
        seed=args.seed,
    )
    return 0
