"""`python -m pfgmpp_fast fid {calc,ref,sweep}`: streaming, distributed, resumable FID and
the metric set (`--metrics fid,kid,isc,prc,fd_dinov2`, one pass over the images).

seeds → generate_images (fused sampler, uint8 exactly as the published pipeline) → feature
extractor (features.py) → float64 running sums reduced across ranks (calc.py) → μ, Σ
(unbiased, as the published fid.py) → Fréchet distance with scipy's sqrtm (metrics.py).
Reference statistics are `.npz` files with `mu` [d] and `sigma` [d, d] (the published
format; `--metrics` adds the feature rows and DINOv2 moments other metrics need). Sweeps
(sweep.py) over checkpoints, steps/NFE, alpha, weight bit widths, post-hoc EMA lengths or guidance weights.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional

from pfgmpp_fast.evaluation.calc import GeneratorSource, ImagesSource, calc_stats, reference_stats, weights_fingerprint
from pfgmpp_fast.evaluation.features import FEATURES, Detectors, get_feature_extractor
from pfgmpp_fast.evaluation.guide_cli import guide_from_args
from pfgmpp_fast.evaluation.metrics import METRICS, compute_metrics, load_reference, parse_metrics, save_reference
from pfgmpp_fast.evaluation.sweep import SWEEP_KINDS, sweep
from pfgmpp_fast.utils import distributed
from pfgmpp_fast.utils.cli_errors import (
    BoolOption,
    InvalidArgument,
    UsageError,
    add_threads_argument,
    blame,
    check_output_path,
    command,
    int_at_least,
)
from pfgmpp_fast.utils.io_utils import atomic_write_bytes
from pfgmpp_fast.utils.preemption import Preemption, add_preempt_argument

__all__ = ["add_arguments", "main"]


# ----------------------------------------------------------------------------------------
# CLI


def _add_feature_arguments(p):
    p.add_argument(
        "--features",
        choices=FEATURES,
        default="inception",
        help="feature space: inception (FID) or digits (Fréchet Digit Distance)",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        metavar="PATH",
        help="local torch-fidelity Inception weights (default: download into torch hub's cache)",
    )
    p.add_argument(
        "--inception-sha256",
        default=None,
        metavar="HEX",
        help="trust a weights file with this SHA-256 instead of the published file's",
    )
    p.add_argument("--digits-cache", default=None, metavar="PATH", help="digits feature network cache file")
    p.add_argument(
        "--metrics",
        default="fid",
        metavar="LIST",
        help=f"comma-separated subset of {','.join(METRICS)} (default fid), all from one pass; kid and "
        "prc work in any --features space, isc needs inception",
    )
    p.add_argument(
        "--dinov2-weights",
        default=None,
        metavar="PATH",
        help="local DINOv2 ViT-L/14 weights for fd_dinov2 (timm's model.safetensors; default: download)",
    )
    p.add_argument(
        "--dinov2-sha256",
        default=None,
        metavar="HEX",
        help="expected SHA-256 of --dinov2-weights (required for a pickled .pth)",
    )
    p.add_argument("--dinov2-size", type=int, default=224, help=argparse.SUPPRESS)  # tests only


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pfgmpp_fast.evaluation.generate import add_sampler_arguments

    sub = parser.add_subparsers(dest="fid_command", metavar="{calc,ref,sweep}")
    calc = sub.add_parser("calc", help="statistics (and FID) of generated images or an image folder")
    add_sampler_arguments(calc)
    calc.add_argument("--images", default=None, help="an image folder/zip/npz instead of --network")
    calc.add_argument("--seeds", default=None, help="seeds (default 0-(num-1))")
    calc.add_argument(
        "--num-images",
        "--num",
        dest="num",
        type=int_at_least(2),
        default=50000,
        help="number of images (default 50000; under torchrun write --num-images)",
    )
    calc.add_argument(
        "--ref",
        default=None,
        help="reference statistics .npz (fid ref): print the --metrics (give --ref, --dest and/or --outdir)",
    )
    calc.add_argument("--outdir", default=None, help="keep resumable shards here (and stats.npz, result.json)")
    calc.add_argument("--shard-size", type=int_at_least(1), default=5000)
    calc.add_argument("--dest", default=None, help="also write the statistics (as fid ref does) here")
    calc.add_argument("--dry-run", action="store_true", help="print the resolved options (JSON) and exit")
    add_preempt_argument(calc)
    _add_feature_arguments(calc)
    _add_published_calc_arguments(calc)
    ref = sub.add_parser("ref", help="reference statistics (published .npz format) of a data set")
    ref.add_argument("--data", required=True, help="'digits', an image folder/zip, or .npy/.npz")
    ref.add_argument("--dest", required=True, help="output .npz (mu, sigma; extra arrays for --metrics)")
    ref.add_argument(
        "--num-images",
        "--num",
        dest="num",
        type=int_at_least(2),
        default=None,
        help="use the first N images (default all)",
    )
    ref.add_argument("--batch", type=int_at_least(1), default=256)
    ref.add_argument("--device", default=None)
    ref.add_argument("--dry-run", action="store_true", help="print the resolved options (JSON) and exit")
    add_threads_argument(ref)
    _add_feature_arguments(ref)
    sw = sub.add_parser(
        "sweep", help="metrics over checkpoints, steps/NFE, alpha, weight bits, EMA length or guidance weight"
    )
    add_sampler_arguments(sw)
    sw.add_argument("--kind", choices=SWEEP_KINDS, required=True)
    sw.add_argument(
        "--values", default=None, help="comma-separated values (steps, alphas, bits, kimgs, EMA stds, guidance weights)"
    )
    sw.add_argument(
        "--run-dir",
        default=None,
        help="run directory with network snapshots (kind=checkpoints) or phema snapshots (kind=ema)",
    )
    sw.add_argument("--at-kimg", type=float, default=None, help="kind=ema: reconstruct at this training point")
    sw.add_argument("--ref", required=True, help="reference statistics .npz")
    sw.add_argument("--seeds", default="0-49999")
    sw.add_argument("--outdir", default="fid-sweep")
    sw.add_argument("--shard-size", type=int_at_least(1), default=5000)
    add_preempt_argument(sw)
    _add_feature_arguments(sw)


def _add_published_calc_arguments(calc) -> None:
    g = calc.add_argument_group("the published PFGM++ fid.py calc's own options")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="--images with more than --num images: the random subset (as published; default 0)",
    )
    g.add_argument(
        "--gen_seed",
        "--gen-seed",
        dest="gen_seed",
        type=int,
        choices=(1, 2, 3),
        default=1,
        help="--images RUN: the FID of its ckpt_<kimg> (1), ckpt_2_<kimg> (2) or ckpt_3_<kimg> (3) folders",
    )
    g.add_argument("--ckpt", type=int, default=0, help="--images RUN: the first checkpoint folder (kimg)")
    g.add_argument(
        "--end_ckpt",
        "--end-ckpt",
        dest="end_ckpt",
        type=int,
        default=1000000,
        help="--images RUN: the last checkpoint folder (kimg)",
    )
    g.add_argument(
        "--prune",
        action=BoolOption,
        default=False,
        refuse="the folders of pruned networks are not supported here; omit --prune (or give --prune=0)",
    )
    g.add_argument(
        "--quant",
        action=BoolOption,
        default=False,
        refuse="the folders of generate_quant.py are not read here; use fid sweep --kind bits (or give --quant=0)",
    )
    # --steps / --alpha are sampler options here; with --images the published fid.py reads them as
    # BOOLs selecting generate_steps.py / generate_alpha.py folders, so there they are refused
    calc.set_defaults(steps=None, alpha=None)


def _extractor(args, device) -> Detectors:
    """The detectors `--metrics` needs (the main --features space, Inception logits, DINOv2)."""
    metrics = parse_metrics(args.metrics)  # its error names --metrics itself
    main = _main_extractor(args, device)
    dinov2 = None
    if "fd_dinov2" in metrics:
        from pfgmpp_fast.evaluation.features import DINOv2Features

        with blame("--dinov2-sha256" if args.dinov2_sha256 else "--dinov2-weights"):
            dinov2 = DINOv2Features(args.dinov2_weights, args.dinov2_sha256, device=device, image_size=args.dinov2_size)
    return Detectors(main, metrics, dinov2)  # its errors name --metrics themselves


def _main_extractor(args, device):
    """The feature extractor; its failures name --inception-weights / --digits-cache."""
    option = "--inception-weights" if args.features == "inception" else "--digits-cache"
    try:
        return get_feature_extractor(
            args.features, device, args.inception_weights, args.inception_sha256, args.digits_cache
        )
    except (ValueError, FileNotFoundError) as exc:
        named = isinstance(exc, InvalidArgument) and exc.name == "inception_sha256"  # the given digest is wrong
        raise UsageError("--inception-sha256" if named else option, str(exc)) from None
    except OSError as exc:  # e.g. URLError: no network
        if args.features == "inception" and args.inception_weights is None:
            raise RuntimeError(
                f"--inception-weights: cannot download the Inception weights ({exc}); offline, pass "
                "--inception-weights PATH (torch-fidelity's weights-inception-2015-12-05-6726825d.pth) "
                "or use --features digits"
            ) from None
        raise UsageError(option, f"cannot read {args.inception_weights or args.digits_cache}: {exc}") from None
    except Exception as exc:  # safetensors' own error type for a file that is not a cache
        if args.features != "digits":
            raise
        raise UsageError(
            option,
            f"{args.digits_cache} is not a digits feature cache (a safetensors file "
            f"written by this package): {type(exc).__name__}: {exc}",
        ) from None


def _reference(args, extractor):
    with blame("--ref"):
        return load_reference(args.ref, dim=int(extractor.dim), metrics=extractor.metrics) if args.ref else None


def _values(text: Optional[str], kind: str):
    if text is None:
        return None
    parts = [t.strip() for t in text.split(",") if t.strip()]
    conv = float if kind in ("alpha", "ema", "guidance") else int
    try:
        return [conv(t) for t in parts]
    except ValueError:
        raise UsageError(
            "--values", f"must be comma-separated {conv.__name__}s for kind={kind}, got {text!r}"
        ) from None


def _check_calc_args(args):
    if (args.network is None) == (args.images is None):
        raise UsageError("--network/--images", "give exactly one of --network (generate) or --images (folder/zip/npz)")
    if args.ref is None and args.dest is None and args.outdir is None:
        raise UsageError(
            "--ref/--dest/--outdir",
            "give at least one: --ref (print the FID), --dest (write the "
            "statistics) or --outdir (resumable shards + stats.npz + result.json)",
        )
    check_output_path("--dest", args.dest)
    check_output_path("--outdir", args.outdir, is_dir=True)
    from pfgmpp_fast.evaluation.generate import DEFAULT_STEPS
    from pfgmpp_fast.evaluation.published import ckpt_folders

    if args.dest and args.images and ckpt_folders(args.images, args.gen_seed, args.ckpt, args.end_ckpt):
        raise UsageError(
            "--dest",
            f"{args.images} holds ckpt_<kimg> image folders (the published layout), one set "
            "of statistics each: use --outdir (a sub-folder each) instead",
        )
    for name, default in (("steps", DEFAULT_STEPS), ("alpha", 0.0)):
        if args.images is not None and getattr(args, name) is not None:
            raise UsageError(
                f"--{name}",
                f"with --images no images are generated; the published fid.py's --{name}=1 "
                f"(the folders of its generate_{name}.py) is not supported here: use fid sweep --kind {name}",
            )
        if getattr(args, name) is None:
            setattr(args, name, default)


def _print_dry_run(args) -> None:
    """--dry-run of calc and ref: the resolved options as JSON."""
    from pfgmpp_fast.evaluation.generate import resolved_sampler_kwargs
    from pfgmpp_fast.evaluation.published import ckpt_folders

    names = (
        ("data", "dest", "num", "batch")
        if args.fid_command == "ref"
        else (
            "images",
            "network",
            "seeds",
            "num",
            "seed",
            "ref",
            "outdir",
            "dest",
            "batch",
            "shard_size",
            "trust_pickle",
        )
    )
    resolved = {k: getattr(args, k) for k in names + ("features", "metrics")}
    if args.fid_command == "calc":
        folders = ckpt_folders(args.images, args.gen_seed, args.ckpt, args.end_ckpt) if args.images else []
        resolved["ckpt_folders"] = [p for _, p in folders]
    if args.fid_command == "calc" and args.network:
        resolved.update(resolved_sampler_kwargs(args))
    print(json.dumps(resolved, indent=2, sort_keys=True))


def _calc(args, device, say) -> int:
    from pfgmpp_fast.evaluation.generate import (
        generator_numerics,
        make_generator_fast,
        network_from_args,
        sampler_kwargs_from_args,
    )
    from pfgmpp_fast.evaluation.published import ckpt_folders

    # every rank takes rank 0's list: `generate` may add a folder between two ranks' looks
    folders = distributed.rank_0_value(
        lambda: ckpt_folders(args.images, args.gen_seed, args.ckpt, args.end_ckpt) if args.images else []
    )
    if folders:  # the published fid.py: the FID of each RUN/ckpt_<kimg> folder
        extractor = _extractor(args, device)
        ref = _reference(args, extractor)
        for _, path in folders:
            source = _images(args, path, device)
            outdir = os.path.join(args.outdir, os.path.basename(path)) if args.outdir else None
            _score(args, source, extractor, ref, device, say, outdir, None, {"path": path})
        return 0
    if args.images is not None:
        source = _images(args, args.images, device)
    else:
        seeds = args.seeds if args.seeds is not None else f"0-{args.num - 1}"
        kw = sampler_kwargs_from_args(args)
        net = network_from_args(args, device, D=kw["D"])
        fast = make_generator_fast(net, device, args.net_dtype, args.compile, args.cuda_graphs)
        kw["gnet"] = _guide(args, device, net)
        with blame("--seeds"):
            source = GeneratorSource(
                fast,
                seeds,
                device=device,
                describe={
                    "network": os.path.abspath(args.network),
                    "weights": weights_fingerprint(net),
                    **generator_numerics(device, args.net_dtype, args.compile, args.cuda_graphs),
                },
                **kw,
            )
    extractor = _extractor(args, device)
    _score(args, source, extractor, _reference(args, extractor), device, say, args.outdir, args.dest, {})
    return 0


def _guide(args, device, net, required: bool = False):
    """--gnet: 'uncond', a network loaded and made fast as --network is, or None (guide_cli)."""
    from pfgmpp_fast.evaluation.generate import load_generator_network, make_generator_fast

    return guide_from_args(
        args,
        net,
        lambda p: make_generator_fast(
            load_generator_network(p, device, args.trust_pickle), device, args.net_dtype, args.compile, args.cuda_graphs
        ),
        required,
    )


def _images(args, path, device):
    """The images of a folder/zip/npz; more than --num: the published random subset chosen by --seed."""
    from pfgmpp_fast.evaluation.published import random_subset

    with blame("--images"):
        source = ImagesSource(path, device=device)
    source.ids = random_subset(len(source.ids), args.num, args.seed)
    return source


def _score(args, source, extractor, ref, device, say, outdir, dest, label: dict) -> dict:
    """Statistics of --num images of ``source`` and the --metrics; written to ``outdir`` / ``dest``, printed."""
    rank = distributed.get_rank()
    if len(source.ids) < args.num:
        raise UsageError(
            "--num-images",
            f"fewer images than requested: {args.num} images requested but only "
            f"{len(source.ids)} are available (--seeds / --images)",
        )
    t0 = time.perf_counter()
    stats = calc_stats(
        source,
        extractor,
        num=args.num,
        batch_size=getattr(args, "batch", 64),
        outdir=outdir,
        shard_size=args.shard_size,
        device=device,
        progress=rank == 0,
        log=say,
    )
    result = {**label, "images": stats["features"].count, "features": extractor.name}
    # without --ref only the Inception Score (it needs no reference)
    wanted = extractor.metrics if ref is not None else tuple(m for m in extractor.metrics if m == "isc")
    if wanted:
        result.update(compute_metrics(stats, ref, wanted, extractor.name))
    result["seconds"] = time.perf_counter() - t0
    if rank == 0:
        if dest:
            save_reference(dest, stats)
        if outdir:
            save_reference(os.path.join(outdir, "stats.npz"), stats)
            atomic_write_bytes(os.path.join(outdir, "result.json"), (json.dumps(result, indent=2) + "\n").encode())
    say(json.dumps(result))
    return result


def _sweep(args, device, say) -> int:
    from pfgmpp_fast.evaluation.generate import (
        generator_numerics,
        make_generator_fast,
        network_from_args,
        sampler_kwargs_from_args,
    )

    check_output_path("--outdir", args.outdir, is_dir=True)
    kw = sampler_kwargs_from_args(args)
    with blame("--values"):
        values = _values(args.values, args.kind)
    net = None
    if args.kind in ("checkpoints", "ema"):
        if args.run_dir is None:
            raise UsageError("--run-dir", f"is required for --kind {args.kind}")
    elif not args.network:
        raise UsageError("--network", f"is required for --kind {args.kind}")
    else:
        net = network_from_args(args, device, D=kw["D"])
    if args.gnet is not None or args.guidance != 1.0 or args.kind == "guidance":
        if net is None:
            raise UsageError("--gnet", f"guidance needs --network (not --kind {args.kind})")
        kw["gnet"] = _guide(args, device, net, required=args.kind == "guidance")
    extractor = _extractor(args, device)
    ref = _reference(args, extractor)
    fast = lambda n: make_generator_fast(n, device, args.net_dtype, args.compile, args.cuda_graphs)
    load = lambda p: network_from_args(args, device, path=p, D=kw["D"])
    with blame("--run-dir" if args.kind in ("checkpoints", "ema") and args.values is None else "--values"):
        sweep(
            args.kind,
            values,
            net=net,
            run_dir=args.run_dir,
            ref=ref,
            extractor=extractor,
            seeds=args.seeds,
            outdir=args.outdir,
            batch_size=args.batch,
            shard_size=args.shard_size,
            device=device,
            make_fast=fast,
            load_network=load,
            log=say,
            at_kimg=args.at_kimg,
            describe=generator_numerics(device, args.net_dtype, args.compile, args.cuda_graphs),
            **kw,
        )
    say(f"wrote {args.outdir}/sweep-{args.kind}.csv, .md and one sweep-{args.kind}[-<metric>].png per metric")
    return 0


@command
def main(args) -> int:
    cmd = getattr(args, "fid_command", None)
    if cmd is None:
        raise UsageError("fid", "give a subcommand: python -m pfgmpp_fast fid {calc,ref,sweep} ... (see --help)")
    parse_metrics(args.metrics)  # before any network is loaded; its error names --metrics
    if cmd == "calc":
        _check_calc_args(args)
    if cmd == "ref":
        check_output_path("--dest", args.dest)
        if args.data != "digits" and not os.path.exists(args.data):
            raise UsageError(
                "--data",
                f"no such data set {args.data!r}: give 'digits', a folder or .zip of images, or a .npy/.npz file",
            )
    if getattr(args, "dry_run", False):
        _print_dry_run(args)
        return 0
    from pfgmpp_fast.evaluation.generate import device_from_args

    device = device_from_args(args)
    rank = distributed.get_rank()
    say = (lambda s: print(s, flush=True)) if rank == 0 else (lambda s: None)
    if cmd in ("calc", "sweep"):  # a preemption signal stops them after the current shard (exit 75)
        with Preemption(args.preempt_signals):
            return (_calc if cmd == "calc" else _sweep)(args, device, say)
    extractor = _extractor(args, device)
    with blame("--data"):
        stats = reference_stats(args.data, extractor, batch_size=args.batch, num=args.num, device=device)
    if rank == 0:
        save_reference(args.dest, stats)
    say(
        f"wrote {extractor.dim}-d reference statistics of {args.data} to {args.dest}"
        + (f" (for {','.join(extractor.metrics)})" if extractor.metrics != ("fid",) else "")
    )
    return 0
