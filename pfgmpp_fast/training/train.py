"""Training: `run_training(**options) -> run_dir` and `python -m pfgmpp_fast train`.

A drop-in for the published PFGM++ / EDM train.py: the defaults are the published
CIFAR-10 recipe (batch 512, lr 1e-3 with a 10 Mimg ramp-up, EMA half-life 0.5 Mimg with
ramp-up ratio 0.05, dropout 0.13, augmentation probability 0.12, 200 Mimg, DDPM++, D=128),
the run directory holds the published files (training_options.json, log.txt, stats.jsonl,
network snapshots, training states) and several GPUs/nodes work through ``torchrun``.
One job per run directory (a lock); ``--resume auto`` continues from the newest intact
training state; bad data / checkpoints / options fail before any step (the command: one
message naming the option, utils/cli_errors.py). The step and the ticks are loop.py.

Precision: ``auto`` = bf16 autocast on CUDA, fp32 on the CPU (the published code trains in
fp32; ``--precision fp32`` reproduces that exactly).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

from pfgmpp_fast.training.loop import TrainingRun
from pfgmpp_fast.training.options import ARCHES, BACKENDS, DEFAULTS, TrainingOptions, jsonable, resolve_options
from pfgmpp_fast.training.run_files import drop_stats_after, find_latest_state, remove_temp_files
from pfgmpp_fast.utils import distributed
from pfgmpp_fast.utils.cli_errors import UsageError, add_threads_argument, blame, check_output_path, command
from pfgmpp_fast.utils.io_utils import atomic_save_json
from pfgmpp_fast.utils.run_lock import acquire_run_dir

__all__ = ["run_training", "add_arguments", "options_from_args", "main"]


def run_training(run_dir=None, **options) -> str:
    """Train with ``options`` (see DEFAULTS; ``duration_kimg``, ``aug_dim`` and
    ``network_overrides`` are accepted aliases). Returns the run directory, which holds
    ``network-snapshot-*.safetensors`` (see :func:`find_latest_snapshot`). Works as one
    process or under torchrun.

    Example (a small CPU run)::

        run_training("runs/digits", data="digits", batch=64, duration_kimg=50, precision="fp32",
                     compile=False, network=dict(model_channels=16, channel_mult=[1, 2],
                     num_blocks=1, attn_resolutions=[]), tick_kimg=5, snap_ticks=2)
    """
    if run_dir is not None:
        options["run_dir"] = run_dir
    o = resolve_options(**options)
    device = distributed.init(o["device"])
    created = not os.path.exists(o["run_dir"])
    lock, finished = None, False
    try:
        os.makedirs(o["run_dir"], exist_ok=True)
        lock = acquire_run_dir(o["run_dir"], "training run")      # one job per run directory
        run = TrainingRun(o, device)
        resume_path = None
        if o["resume"] and run.rank0:
            remove_temp_files(o["run_dir"], run.log)
        if o["resume"] == "auto":
            resume_path = find_latest_state(o["run_dir"], log=run.log)
        elif o["resume"]:
            resume_path = o["resume"]
        try:
            run.setup()
        except BaseException:      # bad data/options: leave no empty run directory behind
            if created and run.rank0:
                shutil.rmtree(o["run_dir"], ignore_errors=True)
            raise
        if resume_path:
            run.load_state(resume_path)
            if run.rank0:
                drop_stats_after(os.path.join(o["run_dir"], "stats.jsonl"), run.cur_tick)
            run.log(f"resume: continuing from {resume_path} at kimg {run.cur_nimg / 1000:.3f}")
        elif o["resume"] == "auto":
            run.log("resume: no training state found; starting a new run")
        if run.rank0:
            resolved = {**jsonable(o.as_dict()), "world_size": run.world_size, "device": str(device),
                        "resolved_precision": run.precision, "resolved_compile": run.compile,
                        "resolved_channels_last": run.channels_last, "batch_gpu_resolved": run.batch_gpu,
                        "fused_adam": run.fused, "network_config": jsonable(run.net.config()),
                        "augment_pipe": None if run.augment_pipe is None else run.augment_pipe.options()}
            atomic_save_json(os.path.join(o["run_dir"], "training_options.json"), resolved)
        run.log(f"training {o['arch']} D={o['D']} on {device} x{run.world_size}: batch {o['batch']} "
                f"(batch_gpu {run.batch_gpu}, {run.rounds} rounds), precision {run.precision}, "
                f"compile {run.compile}, backend {o['backend']}, {o['duration_mimg'] * 1000:g} kimg")
        run.train()
        run.log("done.")
        finished = True
        return o["run_dir"]
    finally:
        if lock is not None:
            lock.release()
        distributed.close(failed=not finished)


# ----------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    a = parser.add_argument
    a("--outdir", "--run-dir", dest="run_dir", default=d["run_dir"], help="run directory (created; resumable)")
    a("--data", default=d["data"], help="'digits' (embedded), a folder/.zip of PNGs, or .npy/.npz (default: digits)")
    a("--cond", action="store_true", help="class-conditional training (needs labels)")
    a("--arch", choices=ARCHES, default=d["arch"])
    a("--D", "--aug_dim", "--aug-dim", dest="D", default="128", help="augmented dimension D (inf = EDM)")
    a("--resolution", type=int, default=None, help="expected data resolution (checked)")
    a("--batch", type=int, default=d["batch"], help="global batch size")
    a("--batch-gpu", "--batch_gpu", dest="batch_gpu", type=int, default=None, help="per-rank chunk (gradient accumulation)")
    a("--lr", type=float, default=d["lr"])
    a("--lr-rampup", dest="lr_rampup_kimg", type=float, default=d["lr_rampup_kimg"], help="lr ramp-up (kimg)")
    a("--ema", dest="ema_halflife_mimg", type=float, default=d["ema_halflife_kimg"] / 1000, help="EMA half-life (Mimg)")
    a("--ema-rampup", dest="ema_rampup_ratio", type=float, default=d["ema_rampup_ratio"])
    a("--phema", nargs="?", const="0.05,0.1", default=None, metavar="STD,...",
      help="also track power-function EMAs of these lengths for post-hoc EMA (default pair: 0.05,0.1)")
    a("--phema-snap", dest="phema_snap_kimg", type=float, default=d["phema_snap_kimg"],
      help="kimg between power-function EMA snapshots (written at the first tick end after each multiple)")
    a("--dropout", type=float, default=d["dropout"])
    a("--augment", type=float, default=d["augment"], help="augmentation probability (0 = off)")
    a("--label-dropout", dest="label_dropout", type=float, default=d["label_dropout"], metavar="P",
      help="with --cond: replace a sample's label by 'no label' with probability P, for classifier-free guidance "
           "(generate --guidance W --gnet uncond)")
    a("--xflip", action="store_true", help="dataset x-flips")
    a("--duration", dest="duration_mimg", type=float, default=d["duration_mimg"], help="training duration (Mimg)")
    a("--tick", dest="tick_kimg", type=float, default=d["tick_kimg"], help="kimg per tick")
    a("--snap", dest="snap_ticks", type=int, default=d["snap_ticks"], help="ticks between network snapshots")
    a("--dump", dest="dump_ticks", type=int, default=d["dump_ticks"], help="ticks between training states")
    a("--seed", type=int, default=d["seed"])
    a("--ls", dest="loss_scaling", type=float, default=d["loss_scaling"], help="loss scaling")
    a("--network", default=None, help='JSON network overrides, e.g. \'{"model_channels": 64}\'')
    a("--cres", default=None, help="channel multipliers, e.g. 1,2,2,2")
    a("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=d["precision"])
    a("--compile", dest="compile", action="store_true", default=None)
    a("--no-compile", dest="compile", action="store_false")
    a("--channels-last", dest="channels_last", action="store_true", default=None)
    a("--no-channels-last", dest="channels_last", action="store_false")
    a("--backend", choices=BACKENDS, default=d["backend"], help="kernel backend of the fused loss")
    a("--device", default=d["device"])
    a("--resume", default=None, help="'auto' (newest intact state in the run dir) or a training-state file")
    a("--transfer", default=None, help="initialise the network from this file")
    a("--trust-pickle", action="store_true",
      help="allow importing a published pickle for --transfer (read without running its code; TorchScript is refused)")
    a("--max-nonfinite", type=int, default=d["max_nonfinite"], help="stop after this many non-finite losses")
    a("--deterministic", action="store_true")
    a("--no-progress", dest="progress", action="store_false", default="auto")
    a("--max-size", type=int, default=None, help="use only the first N images")
    a("--dry-run", action="store_true", help="print the resolved options and exit")
    add_threads_argument(parser)


def options_from_args(args) -> dict:
    o = {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}
    o["ema_halflife_kimg"] = args.ema_halflife_mimg * 1000
    if o.get("compile") is None:
        o["compile"] = "auto"
    if o.get("channels_last") is None:
        o["channels_last"] = "auto"
    try:
        network = json.loads(args.network) if args.network else {}
    except json.JSONDecodeError as exc:
        raise UsageError("--network", f"must be a JSON object of network overrides, e.g. "
                                      f"'{{\"model_channels\": 64}}', got {args.network!r} ({exc})") from None
    if not isinstance(network, dict):
        raise UsageError("--network", f"must be a JSON object of network overrides, got {args.network!r}")
    if args.cres:
        try:
            network["channel_mult"] = [int(x) for x in str(args.cres).split(",")]
        except ValueError:
            raise UsageError("--cres", f"must be comma-separated integers >= 1, e.g. 1,2,2,2, got {args.cres!r}") from None
        if any(c < 1 for c in network["channel_mult"]):
            raise UsageError("--cres", f"must be comma-separated integers >= 1, e.g. 1,2,2,2, got {args.cres!r}")
    o["network"] = network
    return o


# CLI option of each TrainingOptions field (resolve_options names the field; the CLI names the option).
_OPTION_OF = {"run_dir": "--outdir", "D": "--D", "batch_gpu": "--batch-gpu", "lr_rampup_kimg": "--lr-rampup",
              "ema_halflife_kimg": "--ema", "ema_rampup_ratio": "--ema-rampup", "duration_mimg": "--duration",
              "tick_kimg": "--tick", "snap_ticks": "--snap", "dump_ticks": "--dump", "loss_scaling": "--ls",
              "max_nonfinite": "--max-nonfinite", "max_size": "--max-size", "trust_pickle": "--trust-pickle"}


def _resolve_from_args(args) -> TrainingOptions:
    try:
        return resolve_options(**options_from_args(args))
    except UsageError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as exc:
        text = str(exc)
        field = next((f for f in sorted(DEFAULTS, key=len, reverse=True) if text.startswith(f)), None)
        option = _OPTION_OF.get(field, "--" + field.replace("_", "-")) if field else "train"
        raise UsageError(option, text) from None


@command
def main(args) -> int:
    o = _resolve_from_args(args)
    if o["data"] != "digits" and not os.path.exists(o["data"]):
        raise UsageError("--data", f"no such data set {o['data']!r}: give 'digits', a folder or .zip of images, "
                                   "or a .npy/.npz file")
    check_output_path("--outdir", o["run_dir"], is_dir=True)
    with blame("--device"):
        device = distributed.pick_device(o["device"])
    if args.dry_run:
        print(json.dumps(jsonable(o.as_dict()), indent=2, sort_keys=True))
        return 0
    distributed.set_cpu_threads(device, args.threads)
    run_training(**o.as_dict())
    return 0
