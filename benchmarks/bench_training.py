"""Training throughput and memory: published style vs hand-compiled vs ours (docs/DESIGN.md §5).

One training step of the CIFAR-10 DDPM++ configuration (32×32×3, D=128, dropout 0.13,
Adam lr 1e-3, EMA) on synthetic data of that shape, timed three ways in one process:

1. published     — the published PFGM++/EDM step's style (our rewrite, same work): strict
   fp32 (TF32 off), NCHW, eager network with its einsum attention; σ from torch.randn,
   β ~ Beta(N/2, D/2) drawn on the host with numpy, the Gaussian direction drawn on the
   host and copied to the device, sphere normalisation; loss λ(D_θ − y)² summed;
   a Python loop of nan_to_num over parameters; torch.optim.Adam with its defaults;
   a Python loop of lerp/copy per parameter for the EMA.
2. hand-compiled — the same published step with the network made fast by hand the way a
   user would: bf16 autocast + channels-last + torch.compile (default mode), TF32 on.
3. ours          — pfgmpp_fast.training.loop's step: fused perturbation and loss kernels, make_fast
   (bf16, channels-last, compiled), fused Adam with on-device skip of non-finite steps,
   foreach EMA and gradient check, no host syncs.

No augmentation in any variant (the same network, augment_dim = 0). Reported: img/s,
peak memory per image (peak allocated during the step minus what was allocated before it,
divided by the batch), ratios ours/published and ours/hand-compiled. Ours is measured first
and the JSON is rewritten after each variant, so a run killed part-way keeps what it finished.

    python benchmarks/bench_training.py --device cuda --out results.json
    python benchmarks/bench_training.py --smoke --out /tmp/t.json      # CPU, seconds

--smoke: a tiny 8×8 one-channel DDPM++, batch 8, fp32, no compile — checks the script end
to end; the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfgmpp_fast.networks import build_network  # noqa: E402
from pfgmpp_fast.utils import benchmarking as B  # noqa: E402

P_MEAN, P_STD, SIGMA_DATA = -1.2, 1.2, 0.5


# ----------------------------------------------------------------------------------------
# The published step's style (our rewrite for timing; the same work per image)


class PublishedStep:
    """EDM training_loop + PFGM++ loss, as published: one step per call."""

    def __init__(
        self,
        net,
        images,
        batch,
        lr=1e-3,
        ema_halflife_kimg=500,
        ema_rampup_ratio=0.05,
        D=128.0,
        autocast_dtype=None,
        compile=False,
        channels_last=False,
    ):
        self.net = net.train().requires_grad_(True)
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        self.images, self.batch, self.lr, self.D = images, batch, lr, D
        self.ema_halflife_kimg, self.ema_rampup_ratio = ema_halflife_kimg, ema_rampup_ratio
        self.optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
        self.rng = np.random.default_rng(0)
        self.cur_nimg = 0
        self.autocast_dtype, self.channels_last = autocast_dtype, channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self._forward) if compile else self._forward
        self.N = images[0].numel()

    def _forward(self, x, sigma):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            x.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        ):
            return self.net(x, sigma, None)

    def loss(self, images):
        B_, device = images.shape[0], images.device
        rnd_normal = torch.randn([B_, 1, 1, 1], device=device)
        sigma = (rnd_normal * P_STD + P_MEAN).exp()
        weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
        r = sigma.double() * np.sqrt(self.D).astype(np.float64)
        beta = np.clip(self.rng.beta(self.N / 2.0, self.D / 2.0, size=B_).astype(np.double), 1e-3, 1 - 1e-3)
        inverse_beta = torch.from_numpy(beta / (1 - beta + 1e-8)).to(device).double()
        radius = (r.view(-1) * torch.sqrt(inverse_beta + 1e-8)).view(B_, -1)
        gaussian = torch.randn(B_, self.N).to(device)  # drawn on the host, copied
        unit = gaussian / torch.norm(gaussian, p=2, dim=1, keepdim=True)
        n = (unit * radius).float().view_as(images)
        denoised = self.forward(images + n, sigma.view(-1)).float()
        return weight * (denoised - images) ** 2

    def __call__(self):
        idx = torch.randint(len(self.images), (self.batch,), device=self.images.device)
        images = self.images[idx].to(torch.float32) / 127.5 - 1
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(images).sum().mul(1.0 / self.batch).backward()
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr * min(self.cur_nimg / max(10_000 * 1000, 1e-8), 1)
        for param in self.net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        self.optimizer.step()
        halflife = min(self.ema_halflife_kimg * 1000, self.cur_nimg * self.ema_rampup_ratio)
        beta = 0.5 ** (self.batch / max(halflife, 1e-8))
        for p_ema, p_net in zip(self.ema.parameters(), self.net.parameters()):
            p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        self.cur_nimg += self.batch


# ----------------------------------------------------------------------------------------


def set_tf32(on: bool):
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def measure(name, step, device, batch, warmup, reps, rows):
    """img/s and peak memory per image of `step()`; the row is appended to `rows`."""
    for _ in range(warmup):
        step()
    B.sync(device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        gc.collect()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    ms = B.time_ms(step, device, warmup=0, reps=reps)
    row = {"method": name, "batch": batch, "ms_per_step": ms, "img_per_s": batch / (ms * 1e-3)}
    if on_gpu:
        peak = torch.cuda.max_memory_allocated(device)
        row["peak_mem_per_img_MB"] = (peak - base) / batch / 2**20
        row["peak_mem_total_GB"] = peak / 2**30
    rows.append(row)
    mem = f", {row['peak_mem_per_img_MB']:.2f} MB/img" if on_gpu else ""
    print(f"{name:>14}: {row['img_per_s']:.1f} img/s ({ms:.2f} ms per step of {batch}{mem})", flush=True)
    return row


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_ours(template, data, net_kw, D, batch, device, compile_ok, warmup, reps, rows):
    """The real training step of pfgmpp_fast.training.loop on the same synthetic data."""
    on_gpu = device.type == "cuda"
    set_tf32(True)
    from pfgmpp_fast import ops
    from pfgmpp_fast.training.loop import TrainingRun
    from pfgmpp_fast.training.options import resolve_options
    from pfgmpp_fast.utils import distributed

    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "synthetic.npy")
        np.save(data_path, data.numpy())
        o = resolve_options(
            run_dir=tmp,
            data=data_path,
            arch="ddpmpp",
            D=D,
            batch=batch,
            dropout=0.13,
            augment=0.0,
            network=dict(net_kw),
            precision="bf16" if on_gpu else "fp32",
            compile=compile_ok,
            channels_last=on_gpu,
            backend="auto",
            device=str(device),
            seed=0,
            progress=False,
        )
        run = TrainingRun(o, distributed.init(o["device"]))
        run.rank0 = False  # no log file chatter from the benchmark
        run.setup()
        run.net.load_state_dict(template.state_dict())
        measure("ours", run.step, device, batch, warmup + (2 if compile_ok else 0), reps, rows)
        del run
        free(device)
    return ops.resolve_backend("auto", device)


def speedup_summary(rows, on_gpu: bool) -> list:
    """Ours against each baseline that ran (ratios from the same run), and ours in img/s."""
    by = {r["method"]: r for r in rows}
    summary = []
    if "published" in by:
        summary.append(
            {
                "metric": "training speed-up vs published style",
                "value": by["ours"]["img_per_s"] / by["published"]["img_per_s"],
                "target": ">= 5 (H100/H200)",
            }
        )
    if "hand-compiled" in by:
        summary.append(
            {
                "metric": "training speed-up vs hand-compiled published step",
                "value": by["ours"]["img_per_s"] / by["hand-compiled"]["img_per_s"],
                "target": ">= 1.2 (H100/H200)",
            }
        )
    if on_gpu and "published" in by:
        summary.append(
            {
                "metric": "peak memory per image, ours / published",
                "value": by["ours"]["peak_mem_per_img_MB"] / by["published"]["peak_mem_per_img_MB"],
                "target": "< 1",
            }
        )
    summary.append({"metric": "ours training img/s", "value": by["ours"]["img_per_s"], "target": ""})
    return summary


BASELINES = {"published", "hand-compiled"}  # the variants --skip may leave out (ours always runs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None, help="JSON results (and a .md next to it)")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="images per step (default 128 on GPU: one rank's share of the published batch 512 over 4 GPUs)",
    )
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--skip", default="", help="comma-separated methods to skip (published,hand-compiled)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    smoke = args.smoke
    skip = set(filter(None, args.skip.split(",")))
    if skip - BASELINES:
        p.error(f"--skip: unknown method(s) {sorted(skip - BASELINES)}; choose from {sorted(BASELINES)}")

    if smoke:
        res, ch, net_kw = 8, 1, dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
        batch, reps, warmup = args.batch or 8, args.reps or 2, 1
    else:
        res, ch, net_kw = 32, 3, {}
        batch, reps, warmup = args.batch or (128 if on_gpu else 4), args.reps or (20 if on_gpu else 2), 3
    fast_dtype = torch.bfloat16 if on_gpu else None
    compile_ok = on_gpu and not smoke
    D = 128.0

    torch.manual_seed(0)
    template = build_network("ddpmpp", resolution=res, channels=ch, D=D, dropout=0.13, **net_kw)
    num_params = sum(p.numel() for p in template.parameters())
    data = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(1024, ch, res, res), dtype=np.uint8))
    images = data.to(device)
    rows, notes = [], []
    ceil = B.ceilings(device, smoke=smoke or not on_gpu)

    def checkpoint():  # after each variant: a run killed later keeps its rows and their ratios
        if args.out:
            B.write_json(
                args.out,
                {
                    "suite": "training",
                    "smoke": smoke,
                    "ceilings": ceil,
                    "rows": rows,
                    "summary": speedup_summary(rows, on_gpu),
                    "complete": False,
                },
            )

    # Ours first (the number a short GPU session is for), then the baselines.
    backend = measure_ours(template, data, net_kw, D, batch, device, compile_ok, warmup, reps, rows)
    checkpoint()
    if "published" not in skip:
        set_tf32(False)
        step = PublishedStep(copy.deepcopy(template).to(device), images, batch, D=D)
        measure("published", step, device, batch, warmup, reps, rows)
        checkpoint()
        del step
        free(device)
    if "hand-compiled" not in skip:
        set_tf32(True)
        step = PublishedStep(
            copy.deepcopy(template).to(device),
            images,
            batch,
            D=D,
            autocast_dtype=fast_dtype,
            compile=compile_ok,
            channels_last=on_gpu,
        )
        measure("hand-compiled", step, device, batch, warmup + (2 if compile_ok else 0), reps, rows)
        checkpoint()
        del step
        free(device)

    notes.append(
        f"ours: loss kernel backend '{backend}', fused Adam, make_fast("
        f"{'bf16' if on_gpu else 'fp32'}, channels_last={on_gpu}, compile={compile_ok})"
    )
    notes.append("published: torch.optim.Adam defaults of this torch version (foreach on CUDA)")

    summary = speedup_summary(rows, on_gpu)

    payload = {
        "suite": "training",
        "smoke": smoke,
        "environment": B.environment(device),
        "ceilings": ceil,
        "config": {
            "network": "DDPM++ CIFAR-10 (synthetic data)" if not smoke else "tiny DDPM++ 8x8 (smoke)",
            "params": num_params,
            "D": D,
            "batch": batch,
            "dropout": 0.13,
            "augment": 0.0,
            "compile": compile_ok,
            "reps": reps,
        },
        "rows": rows,
        "summary": summary,
        "notes": notes,
    }
    if args.out:
        B.write_json(args.out, payload)
        md = os.path.splitext(args.out)[0] + ".md"
        text = (
            f"# Training step — {payload['environment']['device']}\n\n"
            + B.markdown_table(summary)
            + "\n"
            + B.markdown_table(rows)
            + "\n"
            + "\n".join(f"- {n}" for n in notes)
            + "\n"
        )
        B.write_text(md, text)
    print(B.markdown_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
