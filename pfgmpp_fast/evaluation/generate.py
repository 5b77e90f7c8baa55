"""`python -m pfgmpp_fast generate`: images from a network, one image per seed.

Each image depends only on its seed, the sampler settings and its batch: latents come from
the counter-based RNG keyed by (SAMPLING_KEY, seed), and the sorted seeds are cut into batches
of `batch_size` on one grid in every mode, so the rank count, padding, FID shards and resumes
never change an image (by construction, whatever the machine's BLAS). Another batch size or
backend gives the same images up to float rounding: batched network kernels (GEMMs,
convolutions) may sum in another order for another batch shape, which can move a pixel by one
uint8 level. `--rng published` draws the latents (and random classes) per seed as the
published PFGM++ generate.py does instead (published_rng.py), so the same network and seeds
give the published sampler's images. Pipeline per batch, all on the device:
prior latents → fused sampler steps (network made fast: bf16 + channels-last + compile +
CUDA graphs on a GPU) → uint8 exactly as the published pipeline, (x·127.5 + 128).clip(0, 255).

Outputs: PNGs in the published layout (`outdir/000000/000123.png`, folders of 1000 seeds)
or one `.npz` (`images` uint8 NHWC, `seeds` int64, sorted by seed, and the same images again
as `arr_0`, the key ADM's evaluation suite and EDM-era scripts read), written atomically.
Under torchrun rank r generates every world-th batch of that grid (`rank_seeds`).

Python entry points: `rank_seeds`, `generate_images`
(iterator of (seeds, uint8 NCHW images)), `write_images`, `load_generator_network`.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from pfgmpp_fast import checks
from pfgmpp_fast import reference as R
from pfgmpp_fast.checks import check_seeds
from pfgmpp_fast.evaluation.guide_cli import guide_from_args
from pfgmpp_fast.evaluation.published import generation_jobs
from pfgmpp_fast.published_rng import PublishedRNG, check_published_sampling
from pfgmpp_fast.utils import distributed
from pfgmpp_fast.utils.cli_errors import (
    BoolOption,
    D_from_published,
    InvalidArgument,
    InvalidValue,
    Unsupported,
    UsageError,
    add_threads_argument,
    blame,
    check_output_path,
    checked,
    command,
    int_at_least,
    number,
    supported_choice,
)
from pfgmpp_fast.utils.io_utils import atomic_save_npz, atomic_write_bytes

__all__ = [
    "SAMPLING_KEY",
    "rank_seeds",
    "to_uint8",
    "class_labels_for",
    "generate_images",
    "write_images",
    "load_generator_network",
    "make_generator_fast",
    "generator_numerics",
    "add_sampler_arguments",
    "sampler_options_from_args",
    "sampler_kwargs_from_args",
    "resolved_sampler_kwargs",
    "DEFAULT_STEPS",
    "device_from_args",
    "network_from_args",
    "add_arguments",
    "main",
]

D_TYPE = checked(checks.parse_D, "D")
DEFAULT_STEPS = 18  # sampling steps (EDM's CIFAR-10 setting: 35 NFE)
SAMPLING_KEY = 0x5EED_0F_1A6E  # the fixed Philox key of sampling: image = f(seed)
RNGS = ("philox", "published")  # where latents come from: our Philox streams, or as published


# ----------------------------------------------------------------------------------------
# Seeds


def rank_seeds(seeds: np.ndarray, rank: int, world: int, batch_size: int) -> np.ndarray:
    """The seeds rank `rank` of `world` generates: the sorted seeds cut into batches of
    `batch_size`, every world-th batch from batch `rank` on. generate_images cuts them into
    the same batches again, so each image is computed in the batch it has in one process."""
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"rank must be in [0, world) with world >= 1, got rank={rank}, world={world}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    ordered = np.sort(np.asarray(seeds, dtype=np.int64))
    mine = [ordered[b : b + batch_size] for b in range(rank * batch_size, len(ordered), world * batch_size)]
    return np.concatenate(mine) if mine else ordered[:0]


# ----------------------------------------------------------------------------------------
# Generation


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """The published quantisation: (x·127.5 + 128).clip(0, 255) → uint8 (truncation)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def class_labels_for(seeds: torch.Tensor, label_dim: int, class_idx: Optional[int], key: int = SAMPLING_KEY):
    """One-hot labels [B, label_dim]: `class_idx` for all, else a class drawn from the seed
    (Philox stream reference.STREAM_CLASS, block 0, lane 0, modulo label_dim), or None if unconditional."""
    if label_dim == 0:
        if class_idx is not None:
            raise ValueError(f"class {class_idx} was requested but the network is unconditional (label_dim=0)")
        return None
    if class_idx is not None:
        if not 0 <= int(class_idx) < label_dim:
            raise ValueError(f"class must be in [0, {label_dim}), got {class_idx}")
        idx = torch.full_like(seeds, int(class_idx))
    else:
        counters = torch.stack(
            [
                torch.zeros_like(seeds),
                seeds & R.MASK32,
                (seeds >> 32) & R.MASK32,
                torch.full_like(seeds, R.STREAM_CLASS),
            ],
            dim=-1,
        )
        idx = R.philox4x32(counters, key)[:, 0] % label_dim
    return torch.nn.functional.one_hot(idx, label_dim).to(torch.float32)


def _network_D(net):
    D = getattr(net, "D", None)
    return None if D is None else float(D)


def resolve_D(net, D=None) -> float:
    """The network's D; a given D must equal it (network/D mismatch is an error)."""
    net_D = _network_D(net)
    if D is not None:
        D = checks.parse_D(D)
        checks.check_net_D(net, D)
        return D
    if net_D is None:
        raise ValueError("the network has no attribute D; pass D explicitly")
    return net_D


def generate_images(
    net,
    seeds,
    batch_size: int = 64,
    options=None,
    class_idx: Optional[int] = None,
    D=None,
    key: int = SAMPLING_KEY,
    device=None,
    image_shape: Optional[Sequence[int]] = None,
    fixed_shape: Optional[bool] = None,
    progress: bool = False,
    rng: str = "philox",
    gnet=None,
    **settings,
) -> Iterator[Tuple[np.ndarray, torch.Tensor]]:
    """Yield (seeds int64 [b], uint8 images [b, C, H, W] on `device`) batch by batch.

    `options`: a sampler.SamplerOptions; keyword `settings` (its fields: num_steps=, solver=,
    alpha=, backend=, ...) build one or replace its fields, as in `sample`. `progress`: a bar
    over the batches.

    `seeds` are generated in sorted order, `batch_size` at a time (this process only: split
    across ranks first with `rank_seeds`, which keeps these batches). `net` is an
    EDMPrecond-like network (attributes D, img_channels, img_resolution, label_dim) or a
    denoiser callable with `image_shape` and `D` given. fixed_shape (default: when the
    network is compiled / CUDA-graphed) pads the last batch with repeats of its last seed so
    every call has the same shape; padded images are dropped (only the grid's last batch is
    short, so it is padded the same way in every mode).
    rng: 'philox' (ours: latents and random classes from the Philox streams keyed by `key`) or
    'published' (latents and random classes drawn per seed as the published PFGM++
    generate.py draws them, published_rng.py; settings that add churn noise are refused).
    gnet: the guide of `guidance=W` (sampler.sample): another network, or 'uncond' (classifier-free).
    """
    from pfgmpp_fast.sampler import Sampler

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    seeds = np.sort(np.asarray(seeds, dtype=np.int64)) if len(seeds) else np.zeros(0, np.int64)
    if seeds.size and (seeds[0] < 0):
        raise InvalidValue("seeds", f"seed {int(seeds[0])} is out of range; seeds must be in [0, 2^63)", sep=": ")
    if D is None and _network_D(net) is None:
        raise ValueError("the network has no attribute D; pass D explicitly")
    sampler = Sampler(_network_D(net) if D is None else D, key, options, **settings)  # D, options: checked once
    checks.check_net_D(net, sampler.D)
    if rng not in RNGS:
        raise ValueError(f"rng must be one of {', '.join(RNGS)}, got {rng!r}")
    if rng == "published":
        check_published_sampling(sampler.options)
    if image_shape is None:
        if not all(hasattr(net, a) for a in ("img_channels", "img_resolution")):
            raise ValueError("image_shape is needed for a network without img_channels/img_resolution")
        image_shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
    image_shape = tuple(int(s) for s in image_shape)
    label_dim = int(getattr(net, "label_dim", 0) or 0)
    if device is None:
        p = next(iter(net.parameters()), None) if isinstance(net, torch.nn.Module) else None
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    if fixed_shape is None:
        from pfgmpp_fast.networks import FastNetwork

        fixed_shape = isinstance(net, FastNetwork)
    batches = range(0, len(seeds), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="generating", unit="batch", file=sys.stderr)
    for start in batches:
        chunk = seeds[start : start + batch_size]
        real = len(chunk)
        if fixed_shape and real < batch_size:
            chunk = np.concatenate([chunk, np.full(batch_size - real, chunk[-1], dtype=np.int64)])
        ids = torch.from_numpy(chunk).to(device)
        if rng == "published":
            latents, labels = _published_latents(
                chunk, image_shape, sampler.D, sampler.options.sigma_max, label_dim, class_idx, device
            )
        else:
            latents = sampler.prior((len(chunk), *image_shape), ids)
            labels = class_labels_for(ids, label_dim, class_idx, key)
        x = sampler(net, latents, ids, labels, gnet=gnet)  # NaN/Inf raises FloatingPointError naming the seeds
        yield chunk[:real], to_uint8(x[:real])


def _published_latents(
    seeds: np.ndarray, image_shape, D: float, sigma_max: float, label_dim: int, class_idx: Optional[int], device
):
    """(latents, one-hot labels or None) of a batch as the published generate.py draws them."""
    draw = PublishedRNG(seeds.tolist(), device)
    latents = draw.prior((len(seeds), *image_shape), D, sigma_max)
    if label_dim == 0 or class_idx is not None:  # no labels, or the one class asked for (checked)
        return latents, class_labels_for(torch.from_numpy(seeds).to(device), label_dim, class_idx)
    return latents, torch.nn.functional.one_hot(draw.class_indices(label_dim), label_dim).to(torch.float32)


# ----------------------------------------------------------------------------------------
# Output


def png_bytes(image_hwc: np.ndarray) -> bytes:
    import PIL.Image

    img = (
        PIL.Image.fromarray(image_hwc[:, :, 0], "L")
        if image_hwc.shape[2] == 1
        else PIL.Image.fromarray(image_hwc, "RGB")
    )
    buf = io.BytesIO()
    img.save(buf, format="png")
    return buf.getvalue()


def png_path(outdir: str, seed: int) -> str:
    """The published layout: outdir/<seed − seed % 1000:06d>/<seed:06d>.png."""
    return os.path.join(outdir, f"{seed - seed % 1000:06d}", f"{seed:06d}.png")


def write_images(batches, outdir: Optional[str] = None, npz: Optional[str] = None) -> int:
    """Consume `generate_images` batches: PNGs under `outdir` and/or one `.npz` (gathered
    on rank 0 under torch.distributed). Returns the number of images written by this rank."""
    if outdir is None and npz is None:
        raise ValueError("give outdir (PNG folder) and/or npz (one .npz file)")
    rank, world = distributed.get_rank(), distributed.get_world_size()
    kept_images, kept_seeds, count = [], [], 0
    for seeds, images in batches:
        nhwc = images.permute(0, 2, 3, 1).cpu().numpy()
        count += len(seeds)
        if outdir is not None:
            for seed, img in zip(seeds.tolist(), nhwc):
                path = png_path(outdir, seed)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                atomic_write_bytes(path, png_bytes(img))
        if npz is not None:
            kept_images.append(nhwc)
            kept_seeds.append(seeds)
    if npz is not None:
        images = np.concatenate(kept_images) if kept_images else None
        seeds = np.concatenate(kept_seeds) if kept_seeds else np.zeros(0, np.int64)
        if world > 1:
            gathered = [None] * world if rank == 0 else None
            torch.distributed.gather_object((images, seeds), gathered, dst=0)
            if rank == 0:
                images = np.concatenate([g[0] for g in gathered if g[0] is not None])
                seeds = np.concatenate([g[1] for g in gathered])
        if rank == 0:
            order = np.argsort(seeds, kind="stable")
            images = images[order]
            # arr_0: ADM's evaluator reads that key (NHWC uint8); one copy more in the file
            atomic_save_npz(npz, arr_0=images, images=images, seeds=seeds[order])
    if world > 1:
        torch.distributed.barrier()
    return count


# ----------------------------------------------------------------------------------------
# Networks and distributed setup


def load_generator_network(path: str, device, trust_pickle: bool = False, D=None):
    """Load a checkpoint (ours: safetensors; a published pickle only with trust_pickle), with
    the D it was trained with, which a given D must equal."""
    from pfgmpp_fast.checkpoint import load_network

    if not os.path.exists(path):
        raise FileNotFoundError(f"network checkpoint not found: {path}")
    net = load_network(path, device="cpu", trust_pickle=trust_pickle, D=D)
    return net.to(device).eval().requires_grad_(False)


def generator_numerics(
    device, net_dtype: str = "auto", compile: Optional[bool] = None, cuda_graphs: Optional[bool] = None
) -> dict:
    """The resolved settings that change a generated image's numerics (make_generator_fast's
    choices): device type, network dtype, channels-last, compile, CUDA graphs."""
    on_gpu = torch.device(device).type == "cuda"
    if net_dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"net_dtype must be auto, fp32, bf16 or fp16, got {net_dtype!r}")
    compile = on_gpu if compile is None else bool(compile)
    return {
        "device_type": torch.device(device).type,
        "net_dtype": ("bf16" if on_gpu else "fp32") if net_dtype == "auto" else net_dtype,
        "channels_last": on_gpu,
        "compile": compile,
        "cuda_graphs": (on_gpu and compile) if cuda_graphs is None else bool(cuda_graphs),
    }


def make_generator_fast(
    net, device, net_dtype: str = "auto", compile: Optional[bool] = None, cuda_graphs: Optional[bool] = None
):
    """The network as sampling uses it: on a GPU bf16 + channels-last + compile + CUDA graphs
    by default; on the CPU eager fp32 unless asked otherwise."""
    from pfgmpp_fast.networks import EDMPrecond, make_fast

    n = generator_numerics(device, net_dtype, compile, cuda_graphs)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[n["net_dtype"]]
    if not isinstance(net, EDMPrecond) or (dtype is None and not n["compile"] and not n["channels_last"]):
        return net
    return make_fast(
        net, dtype=dtype, channels_last=n["channels_last"], compile=n["compile"], cuda_graphs=n["cuda_graphs"]
    )


# ----------------------------------------------------------------------------------------
# CLI


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """Network + sampler options shared by `generate` and `fid` (with the published spellings:
    --sigma_min, --S_churn, ..., --pfgmpp/--aug_dim, and --disc/--schedule/--scaling as far as
    their EDM choice goes)."""
    g = p.add_argument_group("network and sampler")
    g.add_argument("--network", metavar="PATH", help="network checkpoint (ours: .safetensors)")
    g.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow importing a published pickle checkpoint (read without running its code; "
        "TorchScript is always refused)",
    )
    g.add_argument(
        "--D", type=D_TYPE, default=None, help="check that the network was trained with this D (default: the network's)"
    )
    g.add_argument(
        "--pfgmpp",
        action=BoolOption,
        default=None,
        help="published: 1 = the network's D is --aug_dim, 0 = D is inf (EDM); checked like --D",
    )
    g.add_argument(
        "--aug_dim",
        "--aug-dim",
        dest="aug_dim",
        type=D_TYPE,
        default=None,
        help="published: D with --pfgmpp=1 (default 128); without --pfgmpp the same as --D",
    )
    g.add_argument("--batch", type=int_at_least(1), default=64, help="images per batch and rank (default 64)")
    g.add_argument(
        "--steps",
        type=int_at_least(1),
        default=DEFAULT_STEPS,
        help=f"sampling steps n (Heun: 2n-1 NFE, the other solvers n; default {DEFAULT_STEPS})",
    )
    g.add_argument(
        "--solver",
        choices=checks.SOLVERS,
        default="heun",
        help="heun (EDM) | euler | dpmpp2m (DPM-Solver++(2M)) | ipndm | ipndm_v (variable-step iPNDM); "
        "the multistep solvers take no --S-churn",
    )
    g.add_argument("--sigma-min", "--sigma_min", dest="sigma_min", type=number(positive=True), default=0.002)
    g.add_argument("--sigma-max", "--sigma_max", dest="sigma_max", type=number(positive=True), default=80.0)
    g.add_argument("--rho", type=number(positive=True), default=7.0)
    g.add_argument("--S-churn", "--S_churn", dest="S_churn", type=number(), default=0.0)
    g.add_argument("--S-min", "--S_min", dest="S_min", type=number(), default=0.0)
    g.add_argument("--S-max", "--S_max", dest="S_max", type=number(allow_inf=True), default=float("inf"))
    g.add_argument("--S-noise", "--S_noise", dest="S_noise", type=number(), default=1.0)
    g.add_argument(
        "--disc",
        type=supported_choice(
            ("edm",),
            ("vp", "ve", "iddpm"),
            "the time steps are EDM's (--sigma-min, --sigma-max, --rho); omit --disc or give --disc=edm",
        ),
        default="edm",
        metavar="edm",
    )
    g.add_argument(
        "--schedule",
        type=supported_choice(
            ("linear",), ("vp", "ve"), "the noise schedule is sigma(t) = t; omit --schedule or give --schedule=linear"
        ),
        default="linear",
        metavar="linear",
    )
    g.add_argument(
        "--scaling",
        type=supported_choice(
            ("none",), ("vp",), "there is no signal scaling s(t); omit --scaling or give --scaling=none"
        ),
        default="none",
        metavar="none",
    )
    g.add_argument("--alpha", type=number(), default=0.0, help="robustness noise x += alpha*t_i*eps per step")
    g.add_argument(
        "--class", dest="class_idx", type=int_at_least(0), default=None, help="class label (default: random per seed)"
    )
    g.add_argument(
        "--guidance",
        type=number(),
        default=1.0,
        metavar="W",
        help="guidance weight: D_G + W*(D - D_G) with the guide --gnet (default 1: no guidance)",
    )
    g.add_argument(
        "--gnet",
        metavar="PATH|uncond",
        default=None,
        help="guide network (autoguidance: a smaller or less-trained network of the same task, loaded "
        "as --network) or 'uncond' (classifier-free guidance: --network without labels)",
    )
    g.add_argument("--dtype", choices=["fp32", "fp64"], default="fp32", help="sampler state precision")
    g.add_argument(
        "--net-dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="network precision (auto: bf16 on a GPU, fp32 on the CPU)",
    )
    g.add_argument("--compile", dest="compile", action="store_true", default=None, help="torch.compile the network")
    g.add_argument("--no-compile", dest="compile", action="store_false")
    g.add_argument("--cuda-graphs", dest="cuda_graphs", action="store_true", default=None)
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false")
    g.add_argument("--backend", choices=checks.BACKENDS, default="auto", help="fused-op backend (default auto)")
    g.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    add_threads_argument(g)


def _D_option(args) -> str:
    """The option that asked for D (errors about D name it)."""
    if args.D is not None:
        return "--D"
    if args.aug_dim is not None and args.pfgmpp is not False:
        return "--aug_dim"
    return "--pfgmpp" if args.pfgmpp is not None else "--D"


def sampler_options_from_args(args):
    """The SamplerOptions of the command line (each option checked by its argparse type; the
    options that bound each other here, UsageError naming them)."""
    from pfgmpp_fast.sampler import SamplerOptions

    if args.sigma_min > args.sigma_max:
        raise UsageError("--sigma-min", f"must be <= --sigma-max ({args.sigma_max:g}), got {args.sigma_min:g}")
    if args.S_max < args.S_min:
        raise UsageError("--S-max", f"must be >= --S-min ({args.S_min:g}), got {args.S_max:g}")
    if args.solver in checks.MULTISTEP_SOLVERS and args.S_churn > 0:
        raise UsageError(
            "--S-churn", f"must be 0 with --solver {args.solver} (a multistep solver), got {args.S_churn:g}"
        )
    return SamplerOptions(
        num_steps=args.steps,
        sigma_min=args.sigma_min,
        sigma_max=args.sigma_max,
        rho=args.rho,
        solver=args.solver,
        S_churn=args.S_churn,
        S_min=args.S_min,
        S_max=args.S_max,
        S_noise=args.S_noise,
        alpha=args.alpha,
        guidance=args.guidance,
        dtype=torch.float64 if args.dtype == "fp64" else torch.float32,
        backend=args.backend,
    )


def sampler_kwargs_from_args(args) -> dict:
    """generate_images keyword arguments of the command line (options, class_idx, D), checked
    (UsageError naming the option; D from --D or the published --pfgmpp/--aug_dim)."""
    options = sampler_options_from_args(args)
    D = D_from_published(args.D, args.aug_dim, args.pfgmpp, None)
    return dict(options=options, class_idx=args.class_idx, D=D)


def resolved_sampler_kwargs(args) -> dict:
    """sampler_kwargs_from_args as plain JSON-able values (--dry-run): every SamplerOptions field,
    class_idx and D (None: the network's)."""
    import dataclasses

    kw = sampler_kwargs_from_args(args)
    out = {f.name: getattr(kw["options"], f.name) for f in dataclasses.fields(kw["options"])}
    out = {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v) for k, v in out.items()}
    return {**out, "class_idx": kw["class_idx"], "D": kw["D"]}


def device_from_args(args) -> torch.device:
    """This rank's device (--device, joining torchrun's process group) with --threads applied,
    and --backend checked against it."""
    from pfgmpp_fast import ops

    with blame("--device"):
        device = distributed.init(args.device)
    distributed.set_cpu_threads(device, args.threads)
    if getattr(args, "backend", "auto") != "auto":
        try:
            ops.resolve_backend(args.backend, device)
        except (ValueError, RuntimeError) as exc:
            raise UsageError("--backend", f"{args.backend!r} cannot run on {device}: {exc}") from None
    return device


def network_from_args(args, device, path: Optional[str] = None, D=None):
    """The network of --network (or ``path``), checked against --D and --class (UsageError naming them)."""
    try:
        net = load_generator_network(path or args.network, device, trust_pickle=args.trust_pickle, D=D)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        named_D = isinstance(exc, InvalidArgument) and exc.name == "D"  # a network/D mismatch
        raise UsageError(_D_option(args) if named_D else "--network", str(exc)) from None
    with blame(_D_option(args)):
        resolve_D(net, D)
    label_dim = int(getattr(net, "label_dim", 0) or 0)
    if args.class_idx is not None and not args.class_idx < label_dim:
        raise UsageError(
            "--class",
            f"must be in [0, {label_dim}) for this network, got {args.class_idx}"
            if label_dim
            else f"{args.class_idx} was given but the network is unconditional (label_dim=0): omit --class",
        )
    return net


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_sampler_arguments(p)
    p.add_argument("--seeds", default="0-63", help="seeds, e.g. '0-49999' or '1,5,7-9' (default 0-63)")
    p.add_argument(
        "--outdir",
        default=None,
        help="write PNGs here (outdir/000000/000123.png); without --network "
        "a run directory: the images of each of its checkpoints go to outdir/ckpt_<kimg>/ (published)",
    )
    p.add_argument("--npz", default=None, help="write one .npz (images uint8 NHWC, seeds; arr_0 = images, ADM's key)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument(
        "--rng",
        choices=RNGS,
        default="philox",
        help="latents and random classes: philox (default; an image depends only on its seed, on every "
        "backend) or published (drawn per seed as the published PFGM++ generate.py does, so the same "
        "network and seeds give its images; refused with churn noise)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved options (JSON) and exit")
    g = p.add_argument_group("the published PFGM++ generate.py's own options")
    g.add_argument("--subdirs", action="store_true", help="no effect: images always go to folders of 1000 seeds")
    g.add_argument(
        "--use_pickle",
        "--use-pickle",
        dest="use_pickle",
        action=BoolOption,
        default=False,
        help="without --network: the run directory's training-state-*.pkl (pickles need --trust-pickle)",
    )
    g.add_argument("--ckpt", type=int, default=0, help="without --network: the first checkpoint (kimg) to use")
    g.add_argument(
        "--end_ckpt",
        "--end-ckpt",
        dest="end_ckpt",
        type=int,
        default=100000000,
        help="without --network: the last checkpoint (kimg) to use",
    )
    g.add_argument(
        "--edm",
        action=BoolOption,
        default=False,
        help="without --network: every checkpoint (no --ckpt/--end_ckpt range)",
    )
    g.add_argument("--resume", type=int, default=None, help="no effect (unused in the published generate.py)")
    g.add_argument(
        "--save_images",
        "--save-images",
        action=Unsupported,
        refuse="the sampling-trajectory GIF is not supported here; omit it (--outdir writes the images)",
    )


def _print_dry_run(args, seeds, jobs) -> None:
    import json

    resolved = {
        "jobs": [{"network": n, "outdir": o} for n, o in jobs],
        "npz": args.npz,
        "seeds": args.seeds,
        "num_seeds": len(seeds),
        "batch": args.batch,
        "trust_pickle": args.trust_pickle,
        "net_dtype": args.net_dtype,
        "device": args.device,
        "rng": args.rng,
        **resolved_sampler_kwargs(args),
    }
    print(json.dumps(resolved, indent=2, sort_keys=True))


def _all_written(outdir: str, seeds) -> bool:
    return all(os.path.exists(png_path(outdir, int(s))) for s in seeds)


@command
def main(args) -> int:
    if args.outdir is None and args.npz is None:
        raise UsageError("--outdir/--npz", "give --outdir (PNG folder) and/or --npz (one .npz file)")
    check_output_path("--outdir", args.outdir, is_dir=True)
    check_output_path("--npz", args.npz)
    with blame("--seeds"):
        seeds = check_seeds(args.seeds)
    kwargs = sampler_kwargs_from_args(args)
    if args.rng == "published":
        with blame("--rng"):
            check_published_sampling(kwargs["options"])
    jobs = generation_jobs(args, seeds)
    if args.dry_run:
        _print_dry_run(args, seeds, jobs)
        return 0
    device = device_from_args(args)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    mine = rank_seeds(seeds, rank, world, args.batch)
    # rank 0's list of the jobs, and of those done earlier, on every rank: between two ranks'
    # looks a run still training may add a snapshot, and a faster rank may write all of a
    # checkpoint's images (when the other has no seeds), and their collectives would differ
    plan = distributed.rank_0_value(lambda: [(p, o, not args.network and _all_written(o, seeds)) for p, o in jobs])
    for path, outdir, skip in plan:
        if skip:
            if rank == 0:  # a checkpoint done earlier (the published generate.py skips it too)
                print(f"{outdir}: all {len(seeds)} images are there; skipped")
            continue
        net = network_from_args(args, device, path=path, D=kwargs["D"])
        fast = make_generator_fast(net, device, args.net_dtype, args.compile, args.cuda_graphs)
        gnet = guide_from_args(
            args,
            net,
            lambda p: make_generator_fast(
                load_generator_network(p, device, args.trust_pickle),
                device,
                args.net_dtype,
                args.compile,
                args.cuda_graphs,
            ),
        )
        batches = generate_images(
            fast,
            mine,
            args.batch,
            device=device,
            progress=args.progress and rank == 0,
            rng=args.rng,
            gnet=gnet,
            **kwargs,
        )
        write_images(batches, outdir=outdir, npz=args.npz)
        if rank == 0:
            print(f"wrote {len(seeds)} images to {' and '.join(x for x in (outdir, args.npz) if x)}")
    return 0
