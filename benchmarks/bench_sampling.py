"""Sampling throughput at 35 NFE and the wall time of a 50k-image FID (docs/DESIGN.md §5).

Three ways to sample the same network (CIFAR-10 DDPM++ config, random weights — throughput
does not depend on the weights), same batch, 18 Heun steps = 35 NFE, ending in uint8 images:

1. published  — the published pipeline's style: latents built per seed in a Python loop
   (a torch.Generator per seed for the Gaussian, numpy Beta(N/2, D/2) draw per seed, sphere
   normalisation, host→device copy), float64 sampler state, every step's state copied into
   a trajectory list, fp32 eager NCHW network.
2. hand-compiled — the same published sampler, with the network made fast by hand the way
   a user would: bf16 autocast + channels-last + torch.compile (mode max-autotune-no-cudagraphs
   is not used; default mode, as `torch.compile(net)` gives).
3. ours — pfgmpp_fast.evaluation.generate.generate_images: Philox prior, fused sampler steps (float32
   state), make_fast(bf16, channels-last, compile, CUDA graphs).

Plus the FID-50k wall time at 35 NFE on this device: generation + Inception-v3 pool
features (torch-fidelity architecture; random weights, since only the time matters) +
float64 statistics, measured on a slice and EXTRAPOLATED linearly to 50,000 images (plus
the one-off Fréchet distance of 2048-d statistics, measured). The result says so.

    python benchmarks/bench_sampling.py --device cuda --out results.json
    python benchmarks/bench_sampling.py --smoke --out /tmp/s.json     # CPU, seconds

--smoke: a tiny 8×8 one-channel DDPM++, 3 steps, tiny batch, no compile, digits features
instead of Inception — checks the script end to end, numbers mean nothing.

Order: ours and the FID-50k projection first, then the baselines; the JSON is rewritten
after each measurement, so a run killed part-way keeps what it finished.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfgmpp_fast.evaluation import generate as G  # noqa: E402
from pfgmpp_fast.networks import build_network, make_fast  # noqa: E402
from pfgmpp_fast.utils import benchmarking as B  # noqa: E402

# ----------------------------------------------------------------------------------------
# The published sampler's style (our own rewrite for timing; same work per image)


def published_latents(seeds, shape, D, sigma_max, device):
    """Per-seed Python loop: torch.Generator Gaussian + numpy Beta radius, float64."""
    N = math.prod(shape)
    out = []
    for seed in seeds:
        gen = torch.Generator(device).manual_seed(int(seed) % (1 << 32))
        gaussian = torch.randn(shape, generator=gen, device=device, dtype=torch.float64)
        if math.isinf(D):
            out.append(gaussian * sigma_max)
            continue
        beta = float(np.clip(np.random.RandomState(int(seed) % (1 << 32)).beta(N / 2.0, D / 2.0), 1e-3, 1 - 1e-3))
        radius = sigma_max * math.sqrt(D) * math.sqrt(beta / (1 - beta + 1e-8) + 1e-8)
        out.append(gaussian / gaussian.norm() * radius)
    return torch.stack(out)


def published_sample(net, seeds, shape, D, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """float64 Heun sampler with per-step trajectory copies; returns uint8 images."""
    device = next(net.parameters()).device
    latents = published_latents(seeds, shape, D, sigma_max, device)
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros_like(t[:1])])
    x_next = latents.to(torch.float64)
    trajectory = [x_next.clone()]
    for k in range(num_steps):
        t_cur, t_next = t[k], t[k + 1]
        x_hat, t_hat = x_next, t_cur
        denoised = net(x_hat, t_hat.expand(len(seeds)), None).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if k < num_steps - 1:
            denoised = net(x_next, t_next.expand(len(seeds)), None).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        trajectory.append(x_next.clone())
    return G.to_uint8(x_next)


class HandCompiled(torch.nn.Module):
    """What a user does by hand: channels-last weights and input, bf16 autocast, torch.compile."""

    def __init__(self, net, dtype=torch.bfloat16, compile=True):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)
        self.dtype = dtype
        self.fn = torch.compile(self._forward) if compile else self._forward

    def _forward(self, x, sigma, labels):
        x = x.to(torch.float32).contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.net(x, sigma.to(torch.float32), labels)

    def forward(self, x, sigma, labels=None):
        return self.fn(x, sigma, labels)


# ----------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None, help="JSON results (and a .md next to it)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 512 on GPU)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--fid-slice", type=int, default=None, help="images measured for the FID-50k estimate")
    p.add_argument(
        "--inception-weights",
        default=None,
        help="real torch-fidelity weights (default: random weights of the same architecture)",
    )
    p.add_argument("--skip-published", action="store_true")
    return p.parse_args(argv)


def fid_estimate(fast, device, smoke, steps, batch, fid_slice, inception_weights):
    """FID-50k wall time at this NFE: a measured slice (generation + features + statistics),
    extrapolated linearly, plus the measured Fréchet distance. (row, feature note) or (None, note)."""
    from pfgmpp_fast.evaluation import calc, features, metrics

    with tempfile.TemporaryDirectory() as tmp:
        if smoke:
            extractor = features.get_feature_extractor("digits", device)  # trained once, cached
            feature_note = "digits features (smoke)"
        else:
            try:
                if inception_weights:
                    extractor = features.InceptionFeatures(inception_weights, device=device)
                    feature_note = "Inception-v3 (torch-fidelity weights)"
                else:
                    path = os.path.join(tmp, "inception-random.pth")
                    digest = features.make_random_inception_weights(path)
                    extractor = features.InceptionFeatures(path, sha256=digest, device=device)
                    feature_note = "Inception-v3 architecture with random weights (timing only)"
            except ImportError as exc:
                return None, f"skipped: torch-fidelity not installed ({exc})"
        slice_seeds = np.arange(10_000, 10_000 + fid_slice, dtype=np.int64)
        warm = calc.GeneratorSource(fast, slice_seeds[:batch], device=device, num_steps=steps)
        calc.calc_stats(warm, extractor, batch_size=batch, device=device)  # warm-up (compile)
        B.sync(device)
        t0 = time.perf_counter()
        src = calc.GeneratorSource(fast, slice_seeds, device=device, num_steps=steps)
        stats = calc.calc_stats(src, extractor, batch_size=batch, device=device)
        mu, sigma = stats.mean_cov()
        B.sync(device)
        slice_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        metrics.frechet_distance(mu, sigma, mu, sigma + np.eye(len(mu)) * 1e-3)
        fd_s = time.perf_counter() - t1
    est = slice_s * 50_000 / fid_slice + fd_s
    print(
        f"FID-50k estimate: {est:.1f} s (extrapolated from {fid_slice} images in {slice_s:.2f} s; {feature_note})",
        flush=True,
    )
    return {
        "method": "FID-50k estimate",
        "batch": batch,
        "nfe": 2 * steps - 1,
        "measured_images": fid_slice,
        "measured_s": slice_s,
        "frechet_s": fd_s,
        "fid50k_s_EXTRAPOLATED": est,
        "features": feature_note,
    }, None


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    smoke = args.smoke
    torch.manual_seed(0)

    if smoke:
        net = build_network(
            "ddpmpp",
            resolution=8,
            channels=1,
            D=128,
            model_channels=16,
            channel_mult=[1, 2],
            num_blocks=1,
            attn_resolutions=[4],
            dropout=0.0,
        )
        steps, batch, reps, fid_slice = 3, args.batch or 4, args.reps or 1, args.fid_slice or 8
    else:
        net = build_network("ddpmpp", resolution=32, channels=3, D=128, dropout=0.0)  # CIFAR-10 DDPM++
        steps, batch = 18, args.batch or (512 if on_gpu else 8)
        reps, fid_slice = args.reps or 3, args.fid_slice or (8192 if on_gpu else 16)
    net = net.to(device).eval().requires_grad_(False)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    nfe = 2 * steps - 1
    compile_ok = on_gpu and not smoke
    seeds = np.arange(batch, dtype=np.int64)
    rows, notes = [], []
    config = {
        "network": "DDPM++ CIFAR-10 (random weights)" if not smoke else "tiny DDPM++ 8x8 (smoke)",
        "D": net.D,
        "steps": steps,
        "nfe": nfe,
        "batch": batch,
        "compile": compile_ok,
    }

    def checkpoint():  # after each measurement: a run killed later keeps the rows it finished
        if args.out:
            B.write_json(
                args.out, {"suite": "sampling", "smoke": smoke, "config": config, "rows": rows, "complete": False}
            )

    def measure(name, fn, warmup):
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        ms = B.time_ms(fn, device, warmup=warmup, reps=reps)
        row = {"method": name, "batch": batch, "nfe": nfe, "ms_per_batch": ms, "img_per_s": batch / (ms * 1e-3)}
        if on_gpu:
            row["peak_MiB_per_image"] = torch.cuda.max_memory_allocated(device) / batch / 2**20
        rows.append(row)
        print(f"{name:>16}: {row['img_per_s']:.1f} img/s ({ms:.1f} ms per batch of {batch})", flush=True)
        checkpoint()

    # Ours and the FID-50k projection first (the numbers a short GPU session is for), then the baselines.
    ceil = B.ceilings(device, smoke=smoke or not on_gpu)
    fast = make_fast(
        net, dtype=torch.bfloat16 if on_gpu else None, channels_last=on_gpu, compile=compile_ok, cuda_graphs=compile_ok
    )

    def ours():
        for _ in G.generate_images(fast, seeds, batch, num_steps=steps, device=device):
            pass

    measure("ours", ours, warmup=2)
    fid_row, fid_note = fid_estimate(fast, device, smoke, steps, batch, fid_slice, args.inception_weights)
    if fid_row is not None:
        rows.append(fid_row)
        checkpoint()
    else:
        notes.append(fid_note)
    if not args.skip_published:
        measure("published", lambda: published_sample(net, seeds, shape, net.D, steps), warmup=1)
        hand = HandCompiled(build_network_like(net, device), torch.bfloat16 if on_gpu else None, compile=compile_ok)
        measure("hand-compiled", lambda: published_sample(hand, seeds, shape, net.D, steps), warmup=2)
    return write_results(args, device, ceil, config, rows, notes)


def write_results(args, device, ceil, config, rows, notes) -> int:
    by = {r["method"]: r for r in rows}
    summary = []
    if "published" in by:
        summary.append(
            {
                "metric": "sampling speed-up vs published style",
                "value": by["ours"]["img_per_s"] / by["published"]["img_per_s"],
                "target": ">= 8 (H100/H200)",
            }
        )
        summary.append(
            {
                "metric": "sampling speed-up vs hand-compiled published sampler",
                "value": by["ours"]["img_per_s"] / by["hand-compiled"]["img_per_s"],
                "target": ">= 1.3 (H100/H200)",
            }
        )
    summary.append({"metric": f"ours img/s at {config['nfe']} NFE", "value": by["ours"]["img_per_s"], "target": ""})
    if "FID-50k estimate" in by:
        fid = by["FID-50k estimate"]
        summary.append(
            {
                "metric": f"FID-50k wall time at {config['nfe']} NFE (EXTRAPOLATED from "
                f"{fid['measured_images']} images)",
                "value": fid["fid50k_s_EXTRAPOLATED"],
                "target": "< 180 s (H100/H200)",
            }
        )
    payload = {
        "suite": "sampling",
        "smoke": args.smoke,
        "environment": B.environment(device),
        "ceilings": ceil,
        "config": config,
        "rows": rows,
        "summary": summary,
        "notes": notes,
    }
    if args.out:
        B.write_json(args.out, payload)
        md = os.path.splitext(args.out)[0] + ".md"
        text = (
            f"# Sampling at {config['nfe']} NFE — {payload['environment']['device']}\n\n"
            + B.markdown_table(summary)
            + "\n"
            + B.markdown_table(rows)
            + "\nFID-50k time is an extrapolation from the measured slice (linear in images).\n"
        )
        B.write_text(md, text)
    print(B.markdown_table(summary))
    return 0


def build_network_like(net, device):
    """An independent copy of `net` (same weights) for the hand-compiled variant."""
    import copy

    return copy.deepcopy(net).to(device)


if __name__ == "__main__":
    sys.exit(main())
