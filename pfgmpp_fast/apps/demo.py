"""`python -m pfgmpp_fast demo`: train a small PFGM++ on the embedded digits and sample it.

The main job of the package on a fresh machine (no download, a few minutes on a 2-core CPU,
well under a minute of training on a GPU):

1. data: scikit-learn's bundled 8×8 digits (1797 images, pixel values 0..16 → [−1, 1]).
   The first 1437 are the training split; the last 360 are held out.
2. train: a small DDPM++ UNet (16 channels, multipliers 1,2, one block per resolution, no
   attention, ~180k parameters) as PFGM++ with D = 128, through `train.run_training`
   (fused perturbation + loss kernels, EMA, atomic snapshots), for `--duration` kimg.
3. sample: the EMA network with the fused Heun sampler (18 steps = 35 NFE), seeds 0..K−1.
4. score: the Fréchet Digit Distance (FDD) — the Fréchet distance between Gaussians
   fitted to the 64-d features of `digits_features.py` (a small classifier trained on the
   digits) — of the samples to the training split, in sets of 360 images (the held-out
   count, so every number below has the same small-sample bias), for the trained network,
   the same network before training (same seeds), and the 360 held-out real digits (the
   reference level of fresh real data; a generator that reproduces its training images
   can score below it, so it is a yardstick, not a hard floor). KID and precision/recall
   of the same sets in the same feature space (`fid calc --metrics fid,kid,prc`'s code) too.

While it trains, the run evaluates its EMA network's FDD (360 images, seeds 0..359, 35 NFE;
--short: 120 images) at every network snapshot, every EVAL_TICKS ticks, through `train`'s
in-training evaluation (`--eval-ref`, the streaming `fid calc` path): the Eval/FDD rows of
run/stats.jsonl, run/'s TensorBoard event files and the lower panel of loss.png.

Outputs in `--outdir` (default demo-out): samples.png (a 10×10 grid, 6× upscaled, 1-px grey gaps),
loss.png (training loss vs kimg, and the FDD vs kimg during training), metrics.json (throughputs,
FDDs, 'fdd_during_training', 'metric_set': FDD, KID and precision/recall, versions, command),
digits-train-ref.npz (the training split's statistics, as `fid ref` writes them) and
run/ (the training run: snapshots, stats.jsonl, log.txt, TensorBoard events). With --phema the run also tracks
power-function EMAs, and phema.png + metrics.json 'phema' hold the FDD of networks
reconstructed for a range of EMA lengths from them (post-hoc EMA, pfgmpp_fast/phema.py).

Shared pieces (the digits split, the scorer, generation, snapshot loading, the small-network
recipe) are reused by `pfgmpp_fast.apps.experiments`.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time

from pfgmpp_fast import checks
from pfgmpp_fast.apps.digits import (
    NUM_HELDOUT,
    NUM_STEPS,
    NUM_TRAIN,
    PHEMA_TRACKED,
    RECIPE,
    SMALL_NETWORK,
    D_label,
    DigitsScorer,
    generate_uint8,
    latest_snapshot,
    load_snapshot,
    mean_spread,
    read_eval_stats,
    read_stats,
    sampling_network,
    train_small,
    untrained_network,
    versions,
)
from pfgmpp_fast.training.report import stat_value
from pfgmpp_fast.utils import distributed
from pfgmpp_fast.utils.cli_errors import add_threads_argument

__all__ = ["DEFAULT_DURATION_KIMG", "SHORT_DURATION_KIMG", "add_arguments", "main"]

DEFAULT_DURATION_KIMG = 200.0
SHORT_DURATION_KIMG = 12.0
PHEMA_SWEEP = (0.03, 0.05, 0.07, 0.10, 0.15, 0.20)  # EMA lengths of the sweep (all within 5 % profile error)
# In-training FDD: every EVAL_TICKS of the run's 20 ticks (6 points), of EVAL_IMAGES images
# (--short: every 10 ticks, 120 images); about a tenth of the demo's time on the CPU.
EVAL_TICKS, EVAL_IMAGES = 4, NUM_HELDOUT
EVAL_TICKS_SHORT, EVAL_IMAGES_SHORT = 10, 120


# ----------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--outdir", default="demo-out", help="output directory (default: demo-out)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--D", default="128", help="augmented dimension D; 'inf' = EDM diffusion (default: 128)")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="KIMG",
        help=f"training length in thousands of training images (default: {DEFAULT_DURATION_KIMG:g}; "
        f"--short: {SHORT_DURATION_KIMG:g})",
    )
    p.add_argument(
        "--short",
        action="store_true",
        help="CI mode: short training, one FDD set of 360 samples (< 2 minutes on a 2-core CPU)",
    )
    p.add_argument("--seed", type=int, default=0, help="training seed (network init, data order, noise)")
    p.add_argument("--sets", type=int, default=None, help="number of FDD sets of 360 samples (default: 3; --short: 1)")
    p.add_argument("--backend", default="auto", help="kernel backend: auto, cpu, cuda, triton, reference")
    add_threads_argument(p)
    p.add_argument(
        "--phema",
        action="store_true",
        help=f"also track power-function EMAs {PHEMA_TRACKED} and write the FDD vs EMA length sweep "
        "of the run (post-hoc EMA: phema.png, metrics.json 'phema')",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=True,
        help="no progress bars (tick lines are still printed)",
    )


def _resolve(args):
    """(D, device, duration kimg, FDD sets) from the command line; ValueError/TypeError on bad input."""
    D = checks.parse_D(args.D)
    device = distributed.pick_device(args.device)
    duration = (
        args.duration if args.duration is not None else (SHORT_DURATION_KIMG if args.short else DEFAULT_DURATION_KIMG)
    )
    if not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"--duration must be a positive number of kimg, got {duration}")
    sets = args.sets if args.sets is not None else (1 if args.short else 3)
    if sets < 1:
        raise ValueError(f"--sets must be >= 1, got {sets}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2^63), got {args.seed}")
    distributed.set_cpu_threads(device, args.threads)
    return D, device, duration, sets


def main(args) -> int:
    try:
        D, device, duration, sets = _resolve(args)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    outdir = os.path.abspath(args.outdir)
    run_dir = os.path.join(outdir, "run")
    os.makedirs(outdir, exist_ok=True)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    progress = bool(args.progress) and sys.stderr.isatty()
    num_samples = sets * NUM_HELDOUT
    seeds = list(range(num_samples))
    batch = num_samples if device.type == "cuda" else 120
    print(
        f"pfgmpp_fast demo: PFGM++ D={D_label(D)} on the embedded digits, device {device}, "
        f"{duration:g} kimg of training, {num_samples} samples ({sets} FDD sets of {NUM_HELDOUT})",
        flush=True,
    )

    # 1. Scorer and the untrained baseline (same seeds as the trained samples).
    scorer = DigitsScorer(device=device)
    print(f"[1/4] FDD of the untrained network ({num_samples} samples)", flush=True)
    untrained = sampling_network(untrained_network(D, args.seed, device), device)
    untrained_images = generate_uint8(
        untrained,
        seeds,
        device=device,
        batch_size=batch,
        progress=progress,
        desc="sampling (untrained)",
        backend=args.backend,
    )
    fdd_untrained = scorer.fdd_sets(untrained_images)
    sets_untrained = scorer.metric_sets(untrained_images)
    del untrained

    # 2. Train (fresh run directory each time: the demo measures its own throughput), with the FDD
    # at every snapshot.
    print(f"[2/4] training ({duration:g} kimg, batch {RECIPE['batch']}) -> {run_dir}", flush=True)
    evaluator, eval_ticks = _evaluator(scorer, outdir, device, batch, args.short)
    train_seconds = _train(run_dir, D, duration, args, device, progress, evaluator, eval_ticks)
    stats, evaluations = read_stats(run_dir), read_eval_stats(run_dir)

    # 3. Sample the trained EMA network.
    print(f"[3/4] sampling {num_samples} images ({NUM_STEPS} Heun steps = {2 * NUM_STEPS - 1} NFE)", flush=True)
    snapshot = latest_snapshot(run_dir)
    net = sampling_network(load_snapshot(snapshot, device), device)
    images, sample_seconds = _timed_sampling(net, seeds, device, batch, progress, args.backend)

    # 4. Score and write the outputs.
    print("[4/4] scoring and writing outputs", flush=True)
    run = dict(
        D=D,
        device=device,
        duration=duration,
        args=args,
        net=net,
        stats=stats,
        evaluations=evaluations,
        evaluator=evaluator,
        scorer=scorer,
        num_samples=num_samples,
        train_seconds=train_seconds,
        sample_seconds=sample_seconds,
        seeds=seeds,
        batch=batch,
        outdir=outdir,
        run_dir=run_dir,
        progress=progress,
        fdd_trained=scorer.fdd_sets(images),
        fdd_untrained=fdd_untrained,
        metric_sets={"trained": scorer.metric_sets(images), "untrained": sets_untrained},
    )
    paths = {
        "samples": os.path.join(outdir, "samples.png"),
        "loss": os.path.join(outdir, "loss.png"),
        "metrics": os.path.join(outdir, "metrics.json"),
        "run": run_dir,
        "snapshot": snapshot,
    }
    metrics = _write_outputs(run, images, paths, t_start, cpu_start)
    _print_summary(run, metrics, paths)
    return 0


def _evaluator(scorer, outdir, device, batch, short):
    """(the in-training FDD evaluator against the training split, ticks between its snapshots)."""
    from pfgmpp_fast.evaluation.in_training import SnapshotEvaluator
    from pfgmpp_fast.evaluation.metrics import save_stats

    ref = os.path.join(outdir, "digits-train-ref.npz")
    save_stats(ref, scorer.mu, scorer.sigma)
    images = EVAL_IMAGES_SHORT if short else EVAL_IMAGES
    evaluator = SnapshotEvaluator(
        ref,
        "fid",
        num_images=images,
        features="digits",
        num_steps=NUM_STEPS,
        batch=min(batch, images),
        digits_cache=scorer.extractor.cache_path,
        compile=False,  # short jobs: as the demo's sampling (digits.sampling_network)
    )
    return evaluator, EVAL_TICKS_SHORT if short else EVAL_TICKS


def _train(run_dir, D, duration, args, device, progress, evaluator=None, eval_ticks=None) -> float:
    """Train in a clean run directory (evaluated at every snapshot, every eval_ticks ticks); returns the wall seconds."""
    for stale in glob.glob(os.path.join(run_dir, "*")) + glob.glob(os.path.join(run_dir, "phema", "*")):
        if os.path.isfile(stale):
            os.unlink(stale)
    t0 = time.perf_counter()
    train_small(
        run_dir,
        D,
        duration,
        seed=args.seed,
        device=device,
        progress=progress,
        backend=args.backend,
        **(dict(phema=PHEMA_TRACKED, phema_snap_kimg=duration / 20) if args.phema else {}),
        **(dict(evaluator=evaluator, snap_ticks=eval_ticks) if evaluator is not None else {}),
    )
    return time.perf_counter() - t0


def _timed_sampling(net, seeds, device, batch, progress, backend):
    """(uint8 images, seconds) after an 8-image warm-up; the timing excludes the warm-up."""
    import torch

    generate_uint8(net, seeds[: min(8, len(seeds))], device=device, batch_size=8, backend=backend)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    images = generate_uint8(net, seeds, device=device, batch_size=batch, progress=progress, backend=backend)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images, time.perf_counter() - t0


def _write_outputs(run, images, paths, t_start, cpu_start) -> dict:
    """samples.png, loss.png and metrics.json; returns the metrics."""
    from pfgmpp_fast.utils.io_utils import atomic_save_json
    from pfgmpp_fast.utils.plots import save_image_grid, save_loss_curve

    D, stats = run["D"], run["stats"]
    save_image_grid(images[:100].numpy(), paths["samples"], cols=10, scale=6)
    curve = _fdd_curve(run)
    save_loss_curve(
        [stat_value(s, "Progress/kimg") for s in stats],
        [stat_value(s, "Loss/loss") for s in stats],
        paths["loss"],
        title=f"PFGM++ D={D_label(D)} on digits: training loss",
        evaluation=(curve["kimg"], curve["fdd"], "FDD"),
        floor=(run["scorer"].floor, f"held-out real digits ({NUM_HELDOUT})"),
    )
    metrics = _metrics(run, paths)
    metrics["fdd_during_training"] = curve
    if run["args"].phema:
        metrics["phema"] = phema_sweep(
            run["run_dir"],
            run["outdir"],
            run["scorer"],
            run["seeds"],
            run["device"],
            run["batch"],
            run["args"].backend,
            run["progress"],
            D,
        )
        paths["phema"] = metrics["phema"]["plot"]
    metrics["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    metrics["cpu_seconds"] = round(time.process_time() - cpu_start, 2)  # this process, all threads
    atomic_save_json(paths["metrics"], metrics)
    return metrics


def _fdd_curve(run) -> dict:
    """The FDD of the EMA network at each snapshot during training (the run's Eval/FDD rows)."""
    rows, described = run["evaluations"], run["evaluator"].describe()
    return {
        "kimg": [stat_value(r, "Progress/kimg") for r in rows],
        "fdd": [stat_value(r, "Eval/FDD") for r in rows],
        "seconds": round(sum(stat_value(r, "Timing/eval_sec") for r in rows), 2),
        "images": described["images"],
        "seeds": described["seeds"],
        "num_steps": described["steps"],
        "reference": f"training split (first {NUM_TRAIN} digits): {os.path.basename(described['ref'])}",
    }


def _metrics(run, paths) -> dict:
    import numpy as np

    args, stats, scorer, duration = run["args"], run["stats"], run["scorer"], run["duration"]
    kimg = stat_value(stats[-1], "Progress/kimg") if stats else duration
    steady = [stat_value(s, "Perf/img_per_sec") for s in stats if stat_value(s, "Progress/tick", 0) > 0]
    trained_mean, trained_spread = mean_spread(run["fdd_trained"])
    untrained_mean, untrained_spread = mean_spread(run["fdd_untrained"])
    sample_seconds, num_samples = run["sample_seconds"], run["num_samples"]
    eval_seconds = sum(stat_value(r, "Timing/eval_sec") for r in run["evaluations"])
    train_seconds = run["train_seconds"] - eval_seconds  # the training itself
    return {
        "command": "python -m pfgmpp_fast demo "
        + " ".join(sys.argv[2:] if sys.argv[1:2] == ["demo"] else sys.argv[1:]),
        "device": str(run["device"]),
        "D": D_label(run["D"]),
        "seed": args.seed,
        "short": bool(args.short),
        "network": {
            "arch": "ddpmpp",
            **SMALL_NETWORK,
            "parameters": int(sum(p.numel() for p in run["net"].parameters())),
        },
        "recipe": dict(RECIPE, duration_kimg=duration, train_images=NUM_TRAIN),
        "train": {
            "kimg": kimg,
            "seconds": round(train_seconds, 2),
            "eval_seconds": round(eval_seconds, 2),
            "img_per_sec": round(kimg * 1000 / train_seconds, 1),
            "img_per_sec_steady": round(float(np.median(steady)), 1) if steady else None,
            "final_loss": stat_value(stats[-1], "Loss/loss") if stats else None,
        },
        "sample": {
            "images": num_samples,
            "num_steps": NUM_STEPS,
            "nfe": 2 * NUM_STEPS - 1,
            "solver": "heun",
            "seconds": round(sample_seconds, 2),
            "img_per_sec": round(num_samples / sample_seconds, 1),
        },
        "fdd": {
            "trained": trained_mean,
            "trained_spread": trained_spread,
            "trained_sets": run["fdd_trained"],
            "untrained": untrained_mean,
            "untrained_spread": untrained_spread,
            "untrained_sets": run["fdd_untrained"],
            "heldout_real": scorer.floor,
            "images_per_set": NUM_HELDOUT,
            "reference": f"training split (first {NUM_TRAIN} digits)",
            "heldout": f"last {NUM_HELDOUT} digits (never trained on)",
            "features": "digits_features.py (64-d)",
            "features_sha256": scorer.sha256,
        },
        "metric_set": _metric_set(run),
        "wall_seconds": None,
        "cpu_seconds": None,
        "versions": versions(),
        "files": paths,
    }


def _metric_set(run) -> dict:
    """FDD, KID and precision/recall per set and their mean ± spread over the sets, for the
    trained and untrained samples and the held-out real digits (`fid calc --metrics fid,kid,prc`'s
    code in the digits feature space)."""
    scorer, out = run["scorer"], {}
    for key, sets in run["metric_sets"].items():
        out[key] = {c: mean_spread([s[c] for s in sets])[0] for c in sets[0]}
        out[f"{key}_spread"] = {c: mean_spread([s[c] for s in sets])[1] for c in sets[0]}
        out[f"{key}_sets"] = sets
    out["heldout_real"] = scorer.metrics(scorer.heldout)
    out.update(
        images_per_set=NUM_HELDOUT,
        reference=f"training split (first {NUM_TRAIN} digits)",
        code="evaluation.metrics.compute_metrics: torch-fidelity's KID (100 subsets of min(1000, n) "
        "images) and precision/recall (k = 3) on digits_features.py features",
    )
    return out


def _print_summary(run, metrics, paths) -> None:
    fdd = metrics["fdd"]
    print(
        f"wrote {paths['samples']}\nwrote {paths['loss']}\nwrote {paths['metrics']}\n"
        f"training run (snapshots, stats.jsonl, log.txt): {paths['run']}"
    )
    curve = metrics["fdd_during_training"]
    print(
        f"train : {metrics['train']['kimg']:g} kimg in {metrics['train']['seconds']:.1f} s = "
        f"{metrics['train']['img_per_sec']:.0f} img/s on {run['device']} (+ {curve['seconds']:.1f} s of FDD "
        f"evaluations: " + ", ".join(f"{k:g} kimg {v:.2f}" for k, v in zip(curve["kimg"], curve["fdd"])) + ")"
    )
    print(
        f"sample: {run['num_samples']} images at {2 * NUM_STEPS - 1} NFE in {run['sample_seconds']:.1f} s "
        f"= {metrics['sample']['img_per_sec']:.0f} img/s"
    )
    print(
        f"FDD   : trained {fdd['trained']:.2f} ± {fdd['trained_spread']:.2f} | untrained {fdd['untrained']:.2f} | "
        f"held-out real digits {fdd['heldout_real']:.2f} (lower is better; {metrics['wall_seconds']:.0f} s in all)"
    )
    ms = metrics["metric_set"]
    print(
        "KID/PR: "
        + " | ".join(
            f"{label} KID {m['KID']:.3f}, precision_digits {m['precision_digits']:.2f}, "
            f"recall_digits {m['recall_digits']:.2f}"
            for label, m in (
                ("trained", ms["trained"]),
                ("untrained", ms["untrained"]),
                ("held-out real", ms["heldout_real"]),
            )
        )
        + " (digits features; KID lower, precision/recall higher is better)"
    )


def phema_sweep(
    run_dir, outdir, scorer, seeds, device, batch, backend, progress, D, stds=PHEMA_SWEEP, num_steps: int = NUM_STEPS
) -> dict:
    """FDD vs EMA length of the demo's own run, without retraining: a network per length of
    PHEMA_SWEEP reconstructed from the run's power-function EMA snapshots (pfgmpp_fast/phema.py),
    sampled with the same seeds. Writes phema.png; returns the table for metrics.json."""
    import torch

    from pfgmpp_fast.phema import list_snapshots, reconstruct
    from pfgmpp_fast.utils.plots import save_sweep_figure

    snapshots = list_snapshots(run_dir)
    print(
        f"[phema] FDD vs EMA length {tuple(stds)} (post-hoc EMA from {sorted({s.std for s in snapshots})}, "
        f"{len(snapshots)} snapshots)",
        flush=True,
    )
    rows = []
    for net, info in reconstruct(snapshots, stds, device=device):
        with torch.no_grad():
            images = generate_uint8(
                sampling_network(net, device),
                seeds,
                num_steps,
                device=device,
                batch_size=batch,
                progress=progress,
                desc=f"sampling (EMA {info['phema_std']:g})",
                backend=backend,
            )
        fdd = scorer.fdd_sets(images)
        mean, spread = mean_spread(fdd)
        rows.append(
            {
                "std": info["phema_std"],
                "fdd": mean,
                "fdd_spread": spread,
                "fdd_sets": fdd,
                "profile_error": info["phema_error"],
            }
        )
    plot = save_sweep_figure(
        {"post-hoc EMA": ([r["std"] for r in rows], [r["fdd"] for r in rows], [r["fdd_spread"] for r in rows])},
        os.path.join(outdir, "phema.png"),
        xlabel="EMA length (relative standard deviation)",
        ylabel="FDD (lower is better)",
        title=f"PFGM++ D={D_label(D)} on digits: FDD vs EMA length",
        floor=scorer.floor,
        xticks=list(stds),
    )
    best = min(rows, key=lambda r: r["fdd"])
    print(
        f"wrote {plot}\nphema : FDD by EMA length "
        + " | ".join(f"{r['std']:g}: {r['fdd']:.2f}" for r in rows)
        + f" (best {best['std']:g})",
        flush=True,
    )
    return {
        "tracked": sorted({s.std for s in snapshots}),
        "snapshots": len(snapshots),
        "table": rows,
        "best_std": best["std"],
        "plot": plot,
    }
