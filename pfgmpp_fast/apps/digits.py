"""The digits toolkit shared by the demo and the robustness experiment: the small-network
recipe, the train/held-out split of scikit-learn's 8×8 digits, the scorer (Fréchet Digit
Distance, KID and precision/recall: evaluation.metrics in the evaluation.digits_features
space), training, loading and sampling of the small network.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Dict, List, Optional, Sequence

__all__ = [
    "SMALL_NETWORK",
    "RECIPE",
    "NUM_DIGITS",
    "NUM_TRAIN",
    "NUM_HELDOUT",
    "NUM_STEPS",
    "PHEMA_TRACKED",
    "D_label",
    "mean_spread",
    "digits_uint8_split",
    "DigitsScorer",
    "train_small",
    "load_snapshot",
    "latest_snapshot",
    "untrained_network",
    "generate_uint8",
    "sampling_network",
    "read_stats",
    "read_eval_stats",
    "versions",
]

# The one small-network recipe of the demo and the robustness experiment.
SMALL_NETWORK = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
RECIPE = dict(
    batch=128, lr=2e-3, lr_rampup_kimg=10.0, ema_halflife_kimg=50.0, ema_rampup_ratio=0.05, dropout=0.0, augment=0.0
)
NUM_DIGITS = 1797
NUM_HELDOUT = 360  # = the size of one FDD set
NUM_TRAIN = NUM_DIGITS - NUM_HELDOUT  # the first 1437 digits
NUM_STEPS = 18  # Heun: 35 NFE
PHEMA_TRACKED = (0.05, 0.10)  # power-function EMAs tracked for post-hoc EMA (EDM2's pair)


def D_label(D: float) -> str:
    """'inf' or D formatted with %g (file and table labels)."""
    return "inf" if D == float("inf") else f"{D:g}"


def mean_spread(values: Sequence[float]):
    """(mean, spread) of per-set scores: the spread is the sample standard deviation (0 for one set)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


# ----------------------------------------------------------------------------------------
# Data and scoring


def digits_uint8_split():
    """(training split uint8 [1437, 1, 8, 8], held-out uint8 [360, 1, 8, 8]) of the digits,
    quantised exactly as generated images are (digits_features.digits_uint8)."""
    from pfgmpp_fast.evaluation.digits_features import digits_uint8

    images, _ = digits_uint8()
    if images.shape[0] != NUM_DIGITS:
        raise RuntimeError(f"expected {NUM_DIGITS} digits from scikit-learn, got {images.shape[0]}")
    return images[:NUM_TRAIN], images[NUM_TRAIN:]


class DigitsScorer:
    """Fréchet Digit Distance, KID and precision/recall to the training split in the
    digits_features.py space, with the code of `fid calc --metrics fid,kid,prc`
    (features.Detectors, calc.reference_stats, metrics.compute_metrics). `floor` = the FDD of
    the 360 held-out real digits; `detectors` and `reference` feed the sweep engine."""

    METRICS = "fid,kid,prc"

    def __init__(self, device="cpu"):
        from pfgmpp_fast.evaluation.calc import reference_stats
        from pfgmpp_fast.evaluation.features import Detectors, get_feature_extractor

        self.device = device
        self.extractor = get_feature_extractor("digits", device=device)
        self.sha256 = getattr(self.extractor, "sha256", None)
        self.detectors = Detectors(self.extractor, self.METRICS)
        train, self.heldout = digits_uint8_split()
        stats = reference_stats(train, self.detectors, batch_size=1024, device=device)["features"]
        self.mu, self.sigma = stats.mean_cov()
        self.reference = {"mu": self.mu, "sigma": self.sigma, "features": stats.rows.numpy()}
        self.floor = self.fdd(self.heldout)

    def _stats(self, images):
        from pfgmpp_fast.evaluation.metrics import FeatureStats

        stats = FeatureStats(int(self.extractor.dim), device="cpu")
        for start in range(0, images.shape[0], 1024):
            stats.update(self.extractor(images[start : start + 1024].to(self.device)).cpu())
        return stats

    def fdd(self, images) -> float:
        """FDD of uint8 images [B, 1, 8, 8] (B >= 2) to the training split."""
        from pfgmpp_fast.evaluation.metrics import frechet_distance

        mu, sigma = self._stats(images).mean_cov()
        return frechet_distance(mu, sigma, self.mu, self.sigma)

    def metrics(self, images) -> Dict[str, float]:
        """{FDD, KID, KID_std, precision_digits, recall_digits} of uint8 images [B, 1, 8, 8] to
        the training split (KID's subsets hold min(1000, B) images; precision/recall with k = 3)."""
        from pfgmpp_fast.evaluation.calc import reference_stats
        from pfgmpp_fast.evaluation.metrics import compute_metrics

        stats = reference_stats(images, self.detectors, batch_size=1024, device=self.device)
        return compute_metrics(stats, self.reference, self.detectors.metrics, self.detectors.name)

    def metric_sets(self, images, set_size: int = NUM_HELDOUT) -> List[Dict[str, float]]:
        """`metrics` of consecutive sets of `set_size` images (a trailing partial set is dropped)."""
        return [self.metrics(images[i * set_size : (i + 1) * set_size]) for i in range(self._count(images, set_size))]

    def fdd_sets(self, images, set_size: int = NUM_HELDOUT) -> List[float]:
        """FDD of consecutive sets of `set_size` images (a trailing partial set is dropped)."""
        return [self.fdd(images[i * set_size : (i + 1) * set_size]) for i in range(self._count(images, set_size))]

    @staticmethod
    def _count(images, set_size: int) -> int:
        count = images.shape[0] // set_size
        if count < 1:
            raise ValueError(f"need at least {set_size} images for one FDD set, got {images.shape[0]}")
        return count


# ----------------------------------------------------------------------------------------
# Training and networks


def train_small(
    run_dir: str,
    D: float,
    duration_kimg: float,
    seed: int = 0,
    device="auto",
    progress="auto",
    backend: str = "auto",
    resume: bool = False,
    tick_kimg: Optional[float] = None,
    **overrides,
) -> str:
    """Train the small network of the recipe on the training split with `train.run_training`.

    Returns the run directory; the final EMA network is its newest network snapshot.
    `resume=True` continues from the newest training state in `run_dir` (if any).
    """
    from pfgmpp_fast.training.train import run_training

    options = dict(
        RECIPE,
        run_dir=run_dir,
        data="digits",
        arch="ddpmpp",
        D=D,
        duration_kimg=duration_kimg,
        seed=seed,
        max_size=NUM_TRAIN,
        network=dict(SMALL_NETWORK),
        device=str(device),
        backend=backend,
        progress=progress,
        precision="auto",
        compile=False,
        tick_kimg=tick_kimg or max(duration_kimg / 20, 0.1),
        snap_ticks=10**9,
        dump_ticks=5,
        resume="auto" if resume else None,
    )
    options.update(overrides)
    return run_training(**options)


def latest_snapshot(run_dir: str) -> str:
    """The network snapshot with the largest kimg in `run_dir`."""
    from pfgmpp_fast.checkpoint import find_checkpoints

    return find_checkpoints(run_dir)[-1][1]


def load_snapshot(path: str, device="cpu"):
    """An EDMPrecond from one of our snapshots (safetensors, never pickle), eval mode."""
    from pfgmpp_fast.checkpoint import load_network

    return load_network(path, device="cpu").to(device).eval().requires_grad_(False)


def untrained_network(D: float, seed: int = 0, device="cpu"):
    """The recipe's network at initialisation (the same weights training starts from)."""
    import torch

    from pfgmpp_fast.networks import build_network

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        net = build_network("ddpmpp", 8, 1, D=D, dropout=RECIPE["dropout"], **SMALL_NETWORK)
    finally:
        torch.random.set_rng_state(state)
    return net.to(device).eval().requires_grad_(False)


def sampling_network(net, device, net_dtype: str = "auto"):
    """What sampling runs: eager fp32 on the CPU; channels-last, bf16 by default (not
    compiled: the jobs are short) on a GPU."""
    from pfgmpp_fast.evaluation.generate import make_generator_fast

    return make_generator_fast(net, device, net_dtype=net_dtype, compile=False, cuda_graphs=False)


def generate_uint8(
    net,
    seeds: Sequence[int],
    num_steps: int = NUM_STEPS,
    alpha: float = 0.0,
    batch_size: int = 128,
    device="cpu",
    progress: bool = False,
    desc: str = "sampling",
    backend: str = "auto",
):
    """uint8 images [len(seeds), 1, 8, 8] (CPU) from the fused sampler, one image per seed."""
    import torch

    from pfgmpp_fast.evaluation.generate import generate_images

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(seeds), desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)
    out = []
    for chunk, images in generate_images(
        net, list(seeds), batch_size=batch_size, num_steps=num_steps, alpha=alpha, device=device, backend=backend
    ):
        out.append(images.cpu())
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return torch.cat(out)


def read_stats(run_dir: str) -> List[dict]:
    """The tick rows of a run's stats.jsonl (EDM's form)."""
    from pfgmpp_fast.training.report import is_eval_row

    return [row for row in _stats_rows(run_dir) if not is_eval_row(row)]


def read_eval_stats(run_dir: str) -> List[dict]:
    """The in-training evaluation rows of a run's stats.jsonl (Eval/<metric>, Progress/kimg, ...)."""
    from pfgmpp_fast.training.report import is_eval_row

    return [row for row in _stats_rows(run_dir) if is_eval_row(row)]


def _stats_rows(run_dir: str) -> List[dict]:
    path = os.path.join(run_dir, "stats.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:  # a torn last line after a kill
                        pass
    return rows


def versions() -> Dict[str, str]:
    """Versions and build facts recorded with every result of the demo and the experiments."""
    import numpy
    import torch

    import pfgmpp_fast

    out = {
        "pfgmpp_fast": pfgmpp_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
    }
    try:
        from pfgmpp_fast import ops

        out["extension"] = "built" if ops.has_extension() else "not built (reference kernels)"
    except Exception as exc:  # pragma: no cover - informational only
        out["extension"] = f"unavailable ({exc})"
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out
