"""`python -m pfgmpp_fast fid {calc,ref,sweep}`: streaming, distributed, resumable FID and
the metric set (`--metrics fid,kid,isc,prc,fd_dinov2`, one pass over the images).

seeds → generate_images (fused sampler, uint8 exactly as the published pipeline) → feature
extractor (features.py) → float64 running sums reduced across ranks (calc.py) → μ, Σ
(unbiased, as the published fid.py) → Fréchet distance with scipy's sqrtm (metrics.py).
Reference statistics are `.npz` files with `mu` [d] and `sigma` [d, d] (the published
format; `--metrics` adds the feature rows and DINOv2 moments other metrics need). Sweeps
(sweep.py) over checkpoints, steps/NFE, alpha, weight bit widths or post-hoc EMA lengths.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

from pfgmpp_fast.evaluation.calc import calc_stats, generator_source, images_source, reference_stats, weights_fingerprint
from pfgmpp_fast.evaluation.features import FEATURES, Detectors, get_feature_extractor
from pfgmpp_fast.evaluation.metrics import (METRICS, compute_metrics, load_reference, parse_metrics,
                                            save_reference)
from pfgmpp_fast.evaluation.sweep import SWEEP_KINDS, sweep
from pfgmpp_fast.utils import distributed
from pfgmpp_fast.utils.io_utils import atomic_write_bytes

__all__ = ["add_arguments", "main"]


# ----------------------------------------------------------------------------------------
# CLI

def _add_feature_arguments(p):
    p.add_argument("--features", choices=FEATURES, default="inception",
                   help="feature space: inception (FID) or digits (Fréchet Digit Distance)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="local torch-fidelity Inception weights (default: download into torch hub's cache)")
    p.add_argument("--inception-sha256", default=None, metavar="HEX",
                   help="trust a weights file with this SHA-256 instead of the published file's")
    p.add_argument("--digits-cache", default=None, metavar="PATH", help="digits feature network cache file")
    p.add_argument("--metrics", default="fid", metavar="LIST",
                   help=f"comma-separated subset of {','.join(METRICS)} (default fid), all from one pass; kid and "
                        "prc work in any --features space, isc needs inception")
    p.add_argument("--dinov2-weights", default=None, metavar="PATH",
                   help="local DINOv2 ViT-L/14 weights for fd_dinov2 (timm's model.safetensors; default: download)")
    p.add_argument("--dinov2-sha256", default=None, metavar="HEX",
                   help="expected SHA-256 of --dinov2-weights (required for a pickled .pth)")
    p.add_argument("--dinov2-size", type=int, default=224, help=argparse.SUPPRESS)   # tests only


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pfgmpp_fast.evaluation.generate import add_sampler_arguments
    sub = parser.add_subparsers(dest="fid_command", metavar="{calc,ref,sweep}")
    calc = sub.add_parser("calc", help="statistics (and FID) of generated images or an image folder")
    add_sampler_arguments(calc)
    calc.add_argument("--images", default=None, help="an image folder/zip/npz instead of --network")
    calc.add_argument("--seeds", default=None, help="seeds (default 0-(num-1))")
    calc.add_argument("--num-images", "--num", dest="num", type=int, default=50000,
                      help="number of images (default 50000; under torchrun write --num-images)")
    calc.add_argument("--ref", default=None, help="reference statistics .npz (fid ref): print the --metrics")
    calc.add_argument("--outdir", default=None, help="keep resumable shards here (and stats.npz, result.json)")
    calc.add_argument("--shard-size", type=int, default=5000)
    calc.add_argument("--dest", default=None, help="also write the statistics (as fid ref does) here")
    _add_feature_arguments(calc)
    ref = sub.add_parser("ref", help="reference statistics (published .npz format) of a data set")
    ref.add_argument("--data", required=True, help="'digits', an image folder/zip, or .npy/.npz")
    ref.add_argument("--dest", required=True, help="output .npz (mu, sigma; extra arrays for --metrics)")
    ref.add_argument("--num-images", "--num", dest="num", type=int, default=None,
                     help="use the first N images (default all)")
    ref.add_argument("--batch", type=int, default=256)
    ref.add_argument("--device", default=None)
    _add_feature_arguments(ref)
    sw = sub.add_parser("sweep", help="metrics over checkpoints, steps/NFE, alpha, weight bits or EMA length")
    add_sampler_arguments(sw)
    sw.add_argument("--kind", choices=SWEEP_KINDS, required=True)
    sw.add_argument("--values", default=None, help="comma-separated values (steps, alphas, bits, kimgs, EMA stds)")
    sw.add_argument("--run-dir", default=None,
                    help="run directory with network snapshots (kind=checkpoints) or phema snapshots (kind=ema)")
    sw.add_argument("--at-kimg", type=float, default=None, help="kind=ema: reconstruct at this training point")
    sw.add_argument("--ref", required=True, help="reference statistics .npz")
    sw.add_argument("--seeds", default="0-49999")
    sw.add_argument("--outdir", default="fid-sweep")
    sw.add_argument("--shard-size", type=int, default=5000)
    _add_feature_arguments(sw)


def _extractor(args, device) -> Detectors:
    """The detectors `--metrics` needs (the main --features space, Inception logits, DINOv2)."""
    metrics = parse_metrics(args.metrics)
    main = get_feature_extractor(args.features, device, args.inception_weights, args.inception_sha256,
                                 args.digits_cache)
    dinov2 = None
    if "fd_dinov2" in metrics:
        from pfgmpp_fast.evaluation.features import DINOv2Features
        dinov2 = DINOv2Features(args.dinov2_weights, args.dinov2_sha256, device=device, image_size=args.dinov2_size)
    return Detectors(main, metrics, dinov2)


def _values(text: Optional[str], kind: str):
    if text is None:
        return None
    parts = [t.strip() for t in text.split(",") if t.strip()]
    conv = float if kind in ("alpha", "ema") else int
    try:
        return [conv(t) for t in parts]
    except ValueError:
        raise ValueError(f"--values must be comma-separated {conv.__name__}s for kind={kind}, got {text!r}") from None


def main(args) -> int:
    from pfgmpp_fast.evaluation.generate import (load_generator_network, make_generator_fast, resolve_D,
                                                 sampler_kwargs_from_args)
    cmd = getattr(args, "fid_command", None)
    if cmd is None:
        print("usage: python -m pfgmpp_fast fid {calc,ref,sweep} ... (see --help)", file=sys.stderr)
        return 2
    try:
        device = distributed.init(args.device)
        rank = distributed.get_rank()
        say = (lambda s: print(s, flush=True)) if rank == 0 else (lambda s: None)
        if cmd == "ref":
            extractor = _extractor(args, device)
            stats = reference_stats(args.data, extractor, batch_size=args.batch, num=args.num, device=device)
            if rank == 0:
                save_reference(args.dest, stats)
            say(f"wrote {extractor.dim}-d reference statistics of {args.data} to {args.dest}"
                + (f" (for {','.join(extractor.metrics)})" if extractor.metrics != ("fid",) else ""))
            return 0
        extractor = _extractor(args, device)
        ref = load_reference(args.ref, dim=int(extractor.dim), metrics=extractor.metrics) if args.ref else None
        if cmd == "calc":
            if (args.network is None) == (args.images is None):
                raise ValueError("give exactly one of --network (generate) or --images (folder/zip/npz)")
            if args.images is not None:
                source = images_source(args.images, device=device)
            else:
                seeds = args.seeds if args.seeds is not None else f"0-{args.num - 1}"
                kw = sampler_kwargs_from_args(args)
                net = load_generator_network(args.network, device, trust_pickle=args.trust_pickle, D=kw["D"])
                resolve_D(net, kw["D"])
                fast = make_generator_fast(net, device, args.net_dtype, args.compile, args.cuda_graphs)
                source = generator_source(fast, seeds, device=device,
                                          describe={"network": os.path.abspath(args.network),
                                                    "weights": weights_fingerprint(net)}, **kw)
            t0 = time.perf_counter()
            stats = calc_stats(source, extractor, num=args.num, batch_size=getattr(args, "batch", 64),
                               outdir=args.outdir, shard_size=args.shard_size, device=device,
                               progress=rank == 0, log=say)
            result = {"images": stats["features"].count, "features": extractor.name}
            # without --ref only the Inception Score (it needs no reference)
            wanted = extractor.metrics if ref is not None else tuple(m for m in extractor.metrics if m == "isc")
            if wanted:
                result.update(compute_metrics(stats, ref, wanted, extractor.name))
            result["seconds"] = time.perf_counter() - t0
            if rank == 0:
                if args.dest:
                    save_reference(args.dest, stats)
                if args.outdir:
                    save_reference(os.path.join(args.outdir, "stats.npz"), stats)
                    atomic_write_bytes(os.path.join(args.outdir, "result.json"),
                                        (json.dumps(result, indent=2) + "\n").encode())
            say(json.dumps(result))
            return 0
        # sweep
        kw = sampler_kwargs_from_args(args)
        values = _values(args.values, args.kind)
        net = None
        if args.kind not in ("checkpoints", "ema"):
            if not args.network:
                raise ValueError(f"--network is required for --kind {args.kind}")
            net = load_generator_network(args.network, device, trust_pickle=args.trust_pickle, D=kw["D"])
        fast = lambda n: make_generator_fast(n, device, args.net_dtype, args.compile, args.cuda_graphs)
        load = lambda p: load_generator_network(p, device, trust_pickle=args.trust_pickle, D=kw["D"])
        sweep(args.kind, values, net=net, run_dir=args.run_dir, ref=ref, extractor=extractor, seeds=args.seeds,
              outdir=args.outdir, batch_size=args.batch, shard_size=args.shard_size, device=device,
              make_fast=fast, load_network=load, log=say, at_kimg=args.at_kimg, **kw)
        say(f"wrote {args.outdir}/sweep-{args.kind}.csv, .md and one sweep-{args.kind}-<metric>.png per metric")
        return 0
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
