"""Small plotting helpers for the demo and the experiments (PNG files, written atomically).

matplotlib is imported lazily with the non-interactive Agg backend, so importing this
module is cheap and works on machines without a display.
"""

from __future__ import annotations

import io
import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = ["new_figure", "save_figure", "image_grid", "save_image_grid", "save_loss_curve", "save_sweep_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def new_figure(figsize=(6, 4)):
    """(figure, axes) of a one-plot figure on the Agg backend."""
    return _pyplot().subplots(figsize=figsize)


def save_figure(fig, path: str) -> str:
    """The figure as a PNG (120 dpi, tight bounding box), written atomically; the figure is closed."""
    from pfgmpp_fast.utils.io_utils import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def image_grid(
    images: np.ndarray,
    cols: Optional[int] = None,
    scale: int = 4,
    gap: int = 1,
    gap_value: int = 128,
    pad: int = 0,
    pad_value: int = 0,
    border: int = 0,
) -> np.ndarray:
    """uint8 images [B, H, W] (grey) or [B, C, H, W] -> one uint8 grid.

    Each image is upscaled by `scale` (nearest neighbour, crisp pixels), framed by `pad`
    pixels of `pad_value` (so strokes never touch the cell edge), and separated from its
    neighbours by `gap` pixels of `gap_value`; `border` pixels of `gap_value` surround the
    grid. Cell size H·scale + 2·pad; grid height 2·border + rows·(cell + gap) − gap.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 4:
        if images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [B, H, W] or [B, C, H, W] with C in (1, 3), got {images.shape}")
        images = images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1)
    if images.ndim not in (3, 4) or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [B, H, W] or [B, C, H, W] array, got shape {images.shape}")
    if not (isinstance(scale, int) and scale >= 1):
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    for name, value in (("gap", gap), ("pad", pad), ("border", border)):
        if not (isinstance(value, int) and value >= 0):
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    n, h, w = images.shape[:3]
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    big = images.repeat(scale, axis=1).repeat(scale, axis=2)
    H, W = h * scale + 2 * pad, w * scale + 2 * pad
    shape = (2 * border + rows * (H + gap) - gap, 2 * border + cols * (W + gap) - gap) + big.shape[3:]
    grid = np.full(shape, gap_value, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = border + r * (H + gap), border + c * (W + gap)
        grid[top : top + H, left : left + W] = pad_value
        grid[top + pad : top + H - pad, left + pad : left + W - pad] = big[i]
    return grid


def save_image_grid(
    images: np.ndarray,
    path: str,
    cols: Optional[int] = None,
    scale: int = 4,
    gap: int = 6,
    pad: int = 2,
    gap_value: int = 210,
    border: Optional[int] = None,
) -> str:
    """Write `image_grid(images)` as a PNG (atomically). The defaults are made to be read at
    1:1: each image framed by `pad` (upscaled) pixels of black, cells apart by `gap` pixels
    of a light grey that contrasts with dark backgrounds, the same grey around the grid."""
    from PIL import Image

    from pfgmpp_fast.utils.io_utils import atomic_write_bytes

    buffer = io.BytesIO()
    grid = image_grid(
        images,
        cols=cols,
        scale=scale,
        gap=gap,
        gap_value=gap_value,
        pad=pad * scale,
        pad_value=0,
        border=gap if border is None else border,
    )
    Image.fromarray(grid).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def save_loss_curve(
    kimg: Sequence[float],
    loss: Sequence[float],
    path: str,
    title: str = "training loss",
    evaluation: Optional[Tuple[Sequence[float], Sequence[float], str]] = None,
    floor: Optional[Tuple[float, str]] = None,
) -> str:
    """Loss vs kimg (raw points and a moving average), log-scaled y. With ``evaluation`` =
    (kimg, values, name) a second panel below: the in-training evaluation vs kimg, with
    ``floor`` = (value, label) as a dashed reference level."""
    plt = _pyplot()
    kimg, loss = np.asarray(kimg, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    fig, axes = plt.subplots(2 if evaluation else 1, 1, figsize=(6, 6.4 if evaluation else 3.6), squeeze=False)
    ax = axes[0][0]
    smooth = loss.size >= 40
    ax.plot(
        kimg,
        loss,
        color="tab:blue",
        alpha=0.35 if smooth else 1.0,
        lw=0.8 if smooth else 1.5,
        marker=None if smooth else "o",
        ms=3,
        label="mean over each tick",
    )
    if smooth:
        k = loss.size // 20
        ax.plot(
            kimg[k - 1 :],
            np.convolve(loss, np.ones(k) / k, mode="valid"),
            color="tab:blue",
            lw=1.8,
            label=f"moving average of {k} ticks",
        )
    if loss.size and np.all(loss > 0):
        ax.set_yscale("log")
    ax.set_xlabel("training images seen (kimg)")
    ax.set_ylabel("loss per pixel (λ(σ)-weighted)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if evaluation:
        _evaluation_panel(axes[1][0], *evaluation, floor=floor, xlim=ax.get_xlim())
        fig.tight_layout()
    return save_figure(fig, path)


def _evaluation_panel(ax, kimg, values, name: str, floor=None, xlim=None) -> None:
    values = np.asarray(values, dtype=np.float64)
    ax.plot(
        np.asarray(kimg, dtype=np.float64),
        values,
        color="tab:red",
        marker="o",
        ms=4,
        label=f"{name} of the EMA network",
    )
    if floor is not None:
        ax.axhline(floor[0], color="grey", ls="--", lw=1, label=floor[1])
    if values.size and np.all(values > 0):
        ax.set_yscale("log")
    if xlim is not None:
        ax.set_xlim(xlim)
    ax.set_xlabel("training images seen (kimg)")
    ax.set_ylabel(f"{name} (lower is better)")
    ax.set_title(f"in-training evaluation: {name} at each network snapshot")
    ax.grid(alpha=0.3)
    ax.legend()


def save_sweep_figure(
    curves: Dict[str, Tuple[Sequence[float], Sequence[float], Sequence[float]]],
    path: str,
    xlabel: str,
    ylabel: str,
    title: str,
    floor: Optional[float] = None,
    xticks: Optional[Sequence[float]] = None,
    categorical: bool = False,
    logy: bool = True,
) -> str:
    """One line per label: curves[label] = (x, mean, spread); spread drawn as error bars.
    `floor` (e.g. held-out real data) is drawn as a dashed horizontal line. categorical:
    the values of `xticks` are placed at equal spacing, in the given order (e.g. bit widths)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    position = {v: i for i, v in enumerate(xticks)} if categorical and xticks is not None else None
    for label, (x, mean, spread) in curves.items():
        xs = [position[v] for v in x] if position is not None else x
        ax.errorbar(
            np.asarray(xs, dtype=np.float64),
            np.asarray(mean, dtype=np.float64),
            yerr=np.asarray(spread, dtype=np.float64),
            marker="o",
            ms=4,
            capsize=3,
            label=label,
        )
    if floor is not None and math.isfinite(floor):
        ax.axhline(floor, color="gray", ls="--", lw=1, label="held-out real digits (reference)")
    if xticks is not None:
        ax.set_xticks(list(range(len(xticks))) if position is not None else list(xticks))
        ax.set_xticklabels([f"{v:g}" for v in xticks])
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
