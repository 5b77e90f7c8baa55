"""The demo: PFGM++ on the embedded digits data set (interim version: exact denoiser).

Samples scikit-learn's bundled 8x8 digits with the exact (optimal) denoiser of the data
set under the PFGM++ perturbation kernel, through the reference sampler, and writes a
PNG grid. (The training demo replaces this once training lands.)
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch

from pfgmpp_fast import reference as R


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--outdir", default="demo-out", help="output directory (default: demo-out)")
    p.add_argument("--D", type=float, default=128.0, help="augmented dimension D (inf = EDM)")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--steps", type=int, default=18, help="sampler steps (NFE = 2*steps - 1)")


def _grid_png(images: np.ndarray, path: str) -> None:
    from PIL import Image
    n, h, w = images.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    Image.fromarray(grid).resize((cols * w * 8, rows * h * 8), Image.NEAREST).save(path)


def main(args) -> int:
    from sklearn.datasets import load_digits
    data = torch.from_numpy(load_digits().images).double().unsqueeze(1) / 8.0 - 1.0
    seeds = torch.arange(args.num)
    latents = R.prior((args.num, 1, 8, 8), args.D, 80.0, 0, seeds)
    x = R.sample(R.optimal_denoiser(data, args.D), latents, args.D, 0, seeds, num_steps=args.steps)
    images = ((x[:, 0] + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()
    os.makedirs(args.outdir, exist_ok=True)
    path = os.path.join(args.outdir, "samples.png")
    _grid_png(images, path)
    print(f"wrote {path}")
    return 0
