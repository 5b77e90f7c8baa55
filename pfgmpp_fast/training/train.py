"""Training: `run_training(**options) -> run_dir` and `python -m pfgmpp_fast train`.

A drop-in for the published PFGM++ / EDM train.py: the defaults are the published
CIFAR-10 recipe (batch 512, lr 1e-3 with a 10 Mimg ramp-up, EMA half-life 0.5 Mimg with
ramp-up ratio 0.05, dropout 0.13, augmentation probability 0.12, 200 Mimg, DDPM++) and D = inf
(EDM diffusion) unless ``--D N`` or ``--pfgmpp=1 --aug_dim N``, as the published train.py; its
other options are accepted with their published meaning, or refused naming what to use instead.
The run directory holds the published files (training_options.json, log.txt, stats.jsonl,
network snapshots, training states) and several GPUs/nodes work through ``torchrun``.
One run per directory: a fresh run refuses a directory that holds another run's files
(``--name`` / ``--desc`` make a new folder inside ``--outdir``, ``--desc`` as EDM's numbered
``NNNNN-<desc>``), one job at a time (a lock); ``--resume auto`` continues from the newest intact
training state; bad data / checkpoints / options fail before any step (the command: one
message naming the option, utils/cli_errors.py). SIGTERM / SIGUSR1 (``--preempt-signals``) stop
the run after the current step with a training state and exit code 75, and ``--resume auto``
continues it bit for bit (utils/preemption.py). The step and the ticks are loop.py.

Precision: ``auto`` = bf16 autocast on CUDA, fp32 on the CPU (the published code trains in
fp32; ``--precision fp32`` reproduces that exactly).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil

from pfgmpp_fast import checks
from pfgmpp_fast.checks import parse_D, parse_int_list
from pfgmpp_fast.training.data import default_cache_dir
from pfgmpp_fast.training.loop import TrainingRun
from pfgmpp_fast.training.options import (
    ARCHES,
    DEFAULTS,
    TrainingOptions,
    jsonable,
    option_diffs,
    parse_network_overrides,
    resolve_options,
)
from pfgmpp_fast.training.run_files import (
    check_fresh_run_dir,
    drop_stats_after,
    find_latest_state,
    latest_numbered_run_dir,
    next_numbered_run_dir,
    remove_temp_files,
    run_files_in,
)
from pfgmpp_fast.utils import distributed
from pfgmpp_fast.utils.cli_errors import (
    BoolOption,
    D_from_published,
    InvalidArgument,
    InvalidValue,
    UsageError,
    add_threads_argument,
    blame,
    check_output_path,
    checked,
    int_at_least,
    supported_choice,
)
from pfgmpp_fast.utils.io_utils import atomic_save_json
from pfgmpp_fast.utils.preemption import Preempted, Preemption, add_preempt_argument
from pfgmpp_fast.utils.run_lock import acquire_run_dir

__all__ = ["run_training", "check_run_dir_use", "add_arguments", "options_from_args", "run_from_args"]

D_TYPE = checked(parse_D, "D")


def run_training(run_dir=None, evaluator=None, **options) -> str:
    """Train with ``options`` (see DEFAULTS; ``duration_kimg``, ``aug_dim`` and
    ``network_overrides`` are accepted aliases). Returns the run directory, which holds
    ``network-snapshot-*.safetensors`` (see :func:`find_latest_snapshot`). Works as one
    process or under torchrun.

    ``evaluator`` (e.g. evaluation.in_training.SnapshotEvaluator) scores the EMA network at every
    network snapshot, on every rank: ``evaluator(net) -> {metric: value}`` (the same on every
    rank), recorded as an ``Eval/<metric>`` row in stats.jsonl and TensorBoard;
    ``evaluator.describe()`` goes into training_options.json.

    Example (a small CPU run)::

        run_training("runs/digits", data="digits", batch=64, duration_kimg=50, precision="fp32",
                     compile=False, network=dict(model_channels=16, channel_mult=[1, 2],
                     num_blocks=1, attn_resolutions=[]), tick_kimg=5, snap_ticks=2)
    """
    if run_dir is not None:
        options["run_dir"] = run_dir
    o = resolve_options(**options)
    if evaluator is not None and o["snap_ticks"] is None:
        raise InvalidValue(
            "snap_ticks", "is None (no network snapshots), but the in-training evaluation runs at every snapshot"
        )
    check_run_dir_use(o)  # every rank, before any joins the group (so before any writes)
    device = distributed.init(o["device"])
    created = not os.path.exists(o["run_dir"])
    lock, finished = None, False
    try:
        os.makedirs(o["run_dir"], exist_ok=True)
        lock = acquire_run_dir(o["run_dir"], "training run")  # one job per run directory
        run = TrainingRun(o, device, evaluator)
        resume_path = None
        if o["resume"] and run.rank0:
            remove_temp_files(o["run_dir"], run.log)
        if o["resume"] == "auto":
            resume_path = find_latest_state(o["run_dir"], log=run.log)
            if resume_path is None:
                _restart_without_state(o, run)
        elif o["resume"]:
            resume_path = o["resume"]
        try:
            with default_cache_dir(o["cache_dir"]):  # where loop.py's load_dataset caches the data
                run.setup()
        except BaseException:  # bad data/options: leave no empty run directory behind
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
            resolved = {
                **jsonable(o.as_dict()),
                "world_size": run.world_size,
                "device": str(device),
                "resolved_precision": run.precision,
                "resolved_compile": run.compile,
                "resolved_channels_last": run.channels_last,
                "batch_gpu_resolved": run.geometry.batch_gpu,
                "fused_adam": run.fused,
                "network_config": jsonable(run.net.config()),
                "augment_pipe": None if run.augment_pipe is None else run.augment_pipe.options(),
                "eval": None if evaluator is None else evaluator.describe(),
            }
            atomic_save_json(os.path.join(o["run_dir"], "training_options.json"), resolved)
        run.log(
            f"training {o['arch']} D={o['D']} on {device} x{run.world_size}: batch {o['batch']} "
            f"(batch_gpu {run.geometry.batch_gpu}, {run.geometry.rounds} rounds), precision {run.precision}, "
            f"compile {run.compile}, backend {o['backend']}, {o['duration_mimg'] * 1000:g} kimg"
        )
        # the loop alone decides where the run stops (after a step, with a state: inner_stops=False);
        # the previous signal handlers come back after it
        with Preemption(o["preempt_signals"], inner_stops=False) as preemption:
            try:
                run.train(preemption)
            except Preempted:
                finished = True  # every rank stopped after the same step: leave the process group in order
                raise
        run.log("done.")
        finished = True
        return o["run_dir"]
    finally:
        if lock is not None:
            lock.release()
        distributed.close(failed=not finished)


def check_run_dir_use(o: TrainingOptions) -> None:
    """Never two runs in one directory: a fresh run needs a directory without a run's files; an
    explicit --resume state from another directory may not continue into one that holds a run."""
    if not o["resume"]:
        check_fresh_run_dir(o["run_dir"])
    elif o["resume"] != "auto" and run_files_in(o["run_dir"]):
        state_dir = os.path.dirname(os.path.abspath(o["resume"]))
        if not os.path.samefile(state_dir, o["run_dir"]):
            raise InvalidValue(
                "resume",
                f"{o['resume']} is a state of the run in {state_dir}, but {o['run_dir']} "
                "holds another run's files; resume into the state's own directory, or into a new one",
                sep=": ",
            )


def _restart_without_state(o: TrainingOptions, run: TrainingRun) -> None:
    """--resume auto without an intact state: the run starts again from tick 0 in its directory
    (an attempt killed before its first state); it must be this run's, whose stats rows are redone."""
    saved = os.path.join(o["run_dir"], "training_options.json")
    if os.path.exists(saved):
        with open(saved, encoding="utf-8") as f:
            diffs = option_diffs(json.load(f), o)
        if diffs:
            raise ValueError(
                f"resume: {o['run_dir']} holds a run with other options and no training state to "
                "resume from:\n  " + "\n  ".join(diffs) + "\nuse a new run directory"
            )
    if run.rank0:
        drop_stats_after(os.path.join(o["run_dir"], "stats.jsonl"), 0)


# ----------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    a = parser.add_argument
    a(
        "--outdir",
        "--run-dir",
        dest="run_dir",
        default=d["run_dir"],
        help="the run directory (as EDM's --outdir with --nosubdir); a fresh run needs one without another run's "
        "files, --resume auto continues the run in it; --name / --desc make a new folder inside it",
    )
    a("--data", default=d["data"], help="'digits' (embedded), a folder/.zip of PNGs, or .npy/.npz (default: digits)")
    a("--cond", action=BoolOption, default=False, help="class-conditional training (needs labels); --cond=0/1 too")
    a("--arch", choices=ARCHES, default=d["arch"])
    a(
        "--D",
        type=D_TYPE,
        default=None,
        help="augmented dimension D (default inf = EDM diffusion, as the published train.py without --pfgmpp=1)",
    )
    a("--resolution", type=int, default=None, help="expected data resolution (checked)")
    a("--batch", type=int, default=d["batch"], help="global batch size")
    a(
        "--batch-gpu",
        "--batch_gpu",
        dest="batch_gpu",
        type=int,
        default=None,
        help="per-rank chunk (gradient accumulation)",
    )
    a("--lr", type=float, default=d["lr"])
    a("--lr-rampup", dest="lr_rampup_kimg", type=float, default=d["lr_rampup_kimg"], help="lr ramp-up (kimg)")
    a("--ema", dest="ema_halflife_mimg", type=float, default=d["ema_halflife_kimg"] / 1000, help="EMA half-life (Mimg)")
    a(
        "--ema-rampup",
        dest="ema_rampup_ratio",
        type=float,
        default=None,
        help=f"EMA half-life ramp-up ratio (default {d['ema_rampup_ratio']:g}; none with --transfer, as published)",
    )
    a(
        "--phema",
        nargs="?",
        const="0.05,0.1",
        default=None,
        metavar="STD,...",
        help="also track power-function EMAs of these lengths for post-hoc EMA (default pair: 0.05,0.1)",
    )
    a(
        "--phema-snap",
        dest="phema_snap_kimg",
        type=float,
        default=d["phema_snap_kimg"],
        help="kimg between power-function EMA snapshots (written at the first tick end after each multiple)",
    )
    a("--dropout", type=float, default=d["dropout"])
    a("--augment", type=float, default=d["augment"], help="augmentation probability (0 = off)")
    a(
        "--label-dropout",
        dest="label_dropout",
        type=float,
        default=d["label_dropout"],
        metavar="P",
        help="with --cond: replace a sample's label by 'no label' with probability P, for classifier-free guidance "
        "(generate --guidance W --gnet uncond)",
    )
    a("--xflip", action=BoolOption, default=False, help="dataset x-flips; --xflip=0/1 too")
    a("--duration", dest="duration_mimg", type=float, default=d["duration_mimg"], help="training duration (Mimg)")
    a("--tick", dest="tick_kimg", type=float, default=d["tick_kimg"], help="kimg per tick")
    a("--snap", dest="snap_ticks", type=int, default=d["snap_ticks"], help="ticks between network snapshots")
    a("--dump", dest="dump_ticks", type=int, default=d["dump_ticks"], help="ticks between training states")
    a("--seed", type=int, default=d["seed"])
    a("--ls", dest="loss_scaling", type=float, default=d["loss_scaling"], help="loss scaling")
    a("--network", default=None, help='JSON network overrides, e.g. \'{"model_channels": 64}\'')
    a("--cres", default=None, help="channel multipliers per resolution, e.g. 1,2,2,2 (network channel_mult)")
    a("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=d["precision"])
    a("--compile", dest="compile", action="store_true", default=None)
    a("--no-compile", dest="compile", action="store_false")
    a("--channels-last", dest="channels_last", action="store_true", default=None)
    a("--no-channels-last", dest="channels_last", action="store_false")
    a("--backend", choices=checks.BACKENDS, default=d["backend"], help="kernel backend of the fused loss")
    a("--device", default=d["device"])
    a("--resume", default=None, help="'auto' (newest intact state in the run dir) or a training-state file")
    a("--transfer", default=None, help="initialise the network from this file")
    a(
        "--trust-pickle",
        action="store_true",
        help="allow importing a published pickle for --transfer (read without running its code; TorchScript is refused)",
    )
    a("--max-nonfinite", type=int, default=d["max_nonfinite"], help="stop after this many non-finite losses")
    a("--deterministic", action="store_true")
    a("--no-progress", dest="progress", action="store_false", default="auto")
    a("--max-size", type=int, default=None, help="use only the first N images")
    a(
        "--no-tensorboard",
        dest="tensorboard",
        action="store_false",
        default=True,
        help="no TensorBoard event files (written into the run directory when tensorboard is installed)",
    )
    a(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="folder of the decoded data set, decoded once per node and memory-mapped by every rank "
        "(default: next to --data, or ~/.cache/pfgmpp_fast/data where that is read-only)",
    )
    a("-n", "--dry-run", action="store_true", help="print the resolved options (JSON) and exit")
    add_preempt_argument(parser)
    add_threads_argument(parser)
    _add_published_arguments(
        parser.add_argument_group("the published PFGM++ / EDM train.py's own options (mapped onto the options above)")
    )


def _add_published_arguments(g) -> None:
    a = g.add_argument
    a(
        "--pfgmpp",
        action=BoolOption,
        default=None,
        help="1: PFGM++ with D = --aug_dim; 0: EDM diffusion, D = inf (the published default)",
    )
    a(
        "--aug_dim",
        "--aug-dim",
        dest="aug_dim",
        type=D_TYPE,
        default=None,
        help="D with --pfgmpp=1 (default 128); unused with --pfgmpp=0; without --pfgmpp the same as --D",
    )
    a(
        "--precond",
        type=supported_choice(
            ("edm",),
            ("vp", "ve"),
            "only the EDM preconditioning and loss exist (PFGM++ for finite D); omit --precond or give --precond=edm",
        ),
        default="edm",
        metavar="edm",
    )
    a(
        "--stf",
        action=BoolOption,
        default=False,
        refuse="stable target field (STF) training is not supported here; omit --stf (or give --stf=0)",
    )
    a("--rbatch", type=int_at_least(1), default=4096, help="the reference batch of --stf (no effect without it)")
    a("--cbase", type=int_at_least(1), default=None, help="channel multiplier (network model_channels)")
    a("--nblock", type=int_at_least(1), default=None, help="residual blocks per resolution (network num_blocks)")
    a("--fp16", action=BoolOption, default=None, help="1: --precision fp16; 0: --precision fp32 (as published)")
    a(
        "--bench",
        action=BoolOption,
        default=True,
        help="cuDNN benchmarking on CUDA (default on; off when --deterministic)",
    )
    a("--cache", action=BoolOption, default=True, help="no effect: the data set is always held in memory here")
    a("--workers", type=int_at_least(1), default=1, help="no effect: batches are gathered from memory, no DataLoader")
    a(
        "--lsun",
        action=BoolOption,
        default=False,
        help="the published LSUN noise levels: sigma x 380/80 in training (P_mean + ln 4.75)",
    )
    a("--name", default=None, help="run directory --outdir/NAME")
    a(
        "--desc",
        default=None,
        help="EDM's numbered run folder --outdir/NNNNN-<data>-<cond|uncond>-<arch>-edm-"
        "gpus<N>-batch<B>-<precision>-DESC (--resume auto: the newest such folder)",
    )
    a("--nosubdir", action="store_true", help="the run directory is --outdir itself (already the default here)")


def _network_overrides(args) -> dict:
    """--network (JSON), then --cres, --cbase, --nblock (UsageError when one contradicts --network)."""
    with blame("--network"):
        network = parse_network_overrides(args.network) if args.network else {}
    cres = None
    if args.cres:
        with blame("--cres"):
            cres = parse_int_list(args.cres, name="cres")
        if not cres or any(c < 1 for c in cres):
            raise UsageError("--cres", f"must be comma-separated integers >= 1, e.g. 1,2,2,2, got {args.cres!r}")
    for option, key, value in (
        ("--cres", "channel_mult", cres),
        ("--cbase", "model_channels", args.cbase),
        ("--nblock", "num_blocks", args.nblock),
    ):
        if value is None:
            continue
        if key in network and network[key] != value:
            raise UsageError(option, f"gives {key} {value}, but --network gives {network[key]}; give one of them")
        network[key] = value
    return network


def _precision(args) -> str:
    if args.fp16 is None:
        return args.precision
    wanted = "fp16" if args.fp16 else "fp32"
    if args.precision not in ("auto", wanted):
        raise UsageError(
            "--fp16",
            f"--fp16={int(args.fp16)} means --precision {wanted}, but --precision "
            f"{args.precision} was given; give one of them",
            worded=True,
        )
    return wanted


def options_from_args(args) -> dict:
    o = {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}
    o["D"] = D_from_published(args.D, args.aug_dim, args.pfgmpp, DEFAULTS["D"])
    o["ema_halflife_kimg"] = args.ema_halflife_mimg * 1000
    if args.ema_rampup_ratio is None:  # the published --transfer starts without EMA ramp-up
        o["ema_rampup_ratio"] = None if args.transfer else DEFAULTS["ema_rampup_ratio"]
    if args.transfer and args.resume not in (None, "auto"):
        raise UsageError(
            "--transfer", "cannot be given with --resume STATE (the state holds the network); --resume auto is fine"
        )
    if o.get("compile") is None:
        o["compile"] = "auto"
    if o.get("channels_last") is None:
        o["channels_last"] = "auto"
    o["network"] = _network_overrides(args)
    o["precision"] = _precision(args)
    o["cudnn_benchmark"] = args.bench
    if args.lsun:  # published: sigma *= 380/80, i.e. ln sigma shifted by ln 4.75
        o["P_mean"] = DEFAULTS["P_mean"] + math.log(380 / 80)
    return o


def _run_dir_of(args, o: TrainingOptions, device) -> str:
    """--outdir itself; --outdir/NAME with --name; with --desc EDM's numbered folder (a new one, or
    with --resume auto the newest of the same description)."""
    if args.name:
        return os.path.join(args.run_dir, args.name)
    if args.desc is None or args.nosubdir:
        return args.run_dir
    precision = o["precision"] if o["precision"] != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    data = os.path.splitext(os.path.basename(os.path.normpath(o["data"])))[0]
    desc = (
        f"{data}-{'cond' if o['cond'] else 'uncond'}-{o['arch']}-edm-gpus{int(os.environ.get('WORLD_SIZE', '1'))}"
        f"-batch{o['batch']}-{precision}-{args.desc}"
    )
    found = latest_numbered_run_dir(args.run_dir, desc) if o["resume"] == "auto" else None
    return found or next_numbered_run_dir(args.run_dir, desc)


# CLI option of each TrainingOptions field (resolve_options names the field; the CLI names the option).
_OPTION_OF = {
    "run_dir": "--outdir",
    "D": "--D",
    "batch_gpu": "--batch-gpu",
    "lr_rampup_kimg": "--lr-rampup",
    "ema_halflife_kimg": "--ema",
    "ema_rampup_ratio": "--ema-rampup",
    "duration_mimg": "--duration",
    "tick_kimg": "--tick",
    "snap_ticks": "--snap",
    "dump_ticks": "--dump",
    "loss_scaling": "--ls",
    "max_nonfinite": "--max-nonfinite",
    "max_size": "--max-size",
    "trust_pickle": "--trust-pickle",
    "phema_snap_kimg": "--phema-snap",
    "cudnn_benchmark": "--bench",
}


def _resolve_from_args(args) -> TrainingOptions:
    """The options of the command line, validated; a bad one names its option (from the field
    the error carries, never from its text)."""
    try:
        return resolve_options(**options_from_args(args))
    except InvalidArgument as exc:
        raise UsageError.about(_OPTION_OF.get(exc.name, "--" + exc.name.replace("_", "-")), exc) from None


def run_from_args(args, evaluator=None) -> int:
    """The `train` command's work, with ``evaluator`` passed to run_training (the command with
    in-training evaluation, apps/train_command.py, builds it from its --eval-* options)."""
    o = _resolve_from_args(args)
    if o["data"] != "digits" and not os.path.exists(o["data"]):
        raise UsageError(
            "--data", f"no such data set {o['data']!r}: give 'digits', a folder or .zip of images, or a .npy/.npz file"
        )
    with blame("--device"):
        device = distributed.pick_device(o["device"])
    o = dataclasses.replace(o, run_dir=_run_dir_of(args, o, device))
    check_output_path("--outdir", o["run_dir"], is_dir=True)
    check_output_path("--cache-dir", o["cache_dir"], is_dir=True)
    with blame("--resume" if o["resume"] else "--outdir"):
        check_run_dir_use(o)
    if args.dry_run:
        resolved = {**o.as_dict(), **({"eval": evaluator.describe()} if evaluator is not None else {})}
        print(json.dumps(jsonable(resolved), indent=2, sort_keys=True))
        return 0
    distributed.set_cpu_threads(device, args.threads)
    run_training(**o.as_dict(), evaluator=evaluator)
    return 0
