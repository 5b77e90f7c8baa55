"""The 'digits' feature space: a small deterministic classifier for 8×8 digits.

The Inception network means nothing on 8×8 grey images, so the digits demo and the
robustness experiment measure a "Fréchet Digit Distance" (FDD) instead of FID: the same
Fréchet distance between Gaussians fitted to features, in the 64-d penultimate layer of
this network.

Exactly what it is
------------------
- Training data: scikit-learn's bundled digits (`sklearn.datasets.load_digits`, 1797
  images, 8×8, integer values v ∈ [0, 16], 10 classes), mapped to the generator's data
  range x = v/8 − 1 ∈ [−1, 1] and quantised to uint8 exactly as generated images are,
  u = floor(clip(x·127.5 + 128, 0, 255)). Input to the network: u / 255 (float32).
- Architecture: Linear(64 → 128) → ReLU → Linear(128 → 64) → Tanh = the features (64-d)
  → Linear(64 → 10) logits (used only for training).
- Training: torch.manual_seed(0) initialisation, full-batch Adam (lr 1e-2), 200 steps of
  cross-entropy on all 1797 images, float32 on the CPU with one thread (a few seconds). Training accuracy
  is ≈ 100 %; it is a feature extractor, not a benchmark classifier.
- Cache: the trained weights are written once (atomically, safetensors — no pickle) to
  `$PFGMPP_FAST_CACHE/digits-features-v1.safetensors` (default `~/.cache/pfgmpp_fast`) and
  re-used afterwards. Floating-point training can differ in the last bits between
  machines/BLAS builds, so the cached file *defines* the feature space: compare FDDs only
  when computed with the same file (`DigitsFeatures.sha256` names it; results record it).

Interface (shared with the Inception extractor in features.py): `extractor(images)` takes uint8
images [B, 1, 8, 8] (NCHW) on any device and returns float64 features [B, 64].
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import torch

__all__ = ["DigitsFeatures", "digits_uint8", "train_digits_features", "default_cache_path"]

VERSION = 1
FEATURE_DIM = 64
HIDDEN = 128
TRAIN_STEPS = 200
LEARNING_RATE = 1e-2
SEED = 0


def default_cache_path() -> str:
    root = os.environ.get("PFGMPP_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pfgmpp_fast")
    return os.path.join(root, f"digits-features-v{VERSION}.safetensors")


def digits_uint8() -> tuple:
    """(uint8 images [1797, 1, 8, 8], labels int64 [1797]) through the generator's quantisation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).to(torch.float32).unsqueeze(1) / 8.0 - 1.0
    u = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)
    return u, torch.from_numpy(d.target).to(torch.int64)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, FEATURE_DIM)
        self.head = torch.nn.Linear(FEATURE_DIM, 10)

    def features(self, x):
        return torch.tanh(self.fc2(torch.relu(self.fc1(x))))

    def forward(self, x):
        return self.head(self.features(x))


def train_digits_features() -> dict:
    """Train the feature network as documented above; returns its state dict (float32, CPU)."""
    images, labels = digits_uint8()
    x = images.reshape(images.shape[0], -1).to(torch.float32) / 255.0
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(SEED)
        net = _Net()
    opt = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster and reproducible
    try:
        for _ in range(TRAIN_STEPS):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), labels).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def _atomic_save_safetensors(tensors: dict, path: str) -> None:
    from safetensors.torch import save

    from pfgmpp_fast.utils.io_utils import atomic_write_bytes

    atomic_write_bytes(path, save(tensors))


class DigitsFeatures(torch.nn.Module):
    """64-d features of 8×8 uint8 digit images (module docstring). Trains and caches the
    network on first use; `cache_path=None` uses `default_cache_path()`."""

    name = "digits"
    dim = FEATURE_DIM
    image_shape = (1, 8, 8)

    def __init__(self, cache_path: Optional[str] = None):
        super().__init__()
        from safetensors.torch import load_file

        path = cache_path or default_cache_path()
        if not os.path.exists(path):
            _atomic_save_safetensors(train_digits_features(), path)
        with open(path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()
        self.net = _Net()
        self.net.load_state_dict(load_file(path))
        self.net.requires_grad_(False).eval()
        self.cache_path = path

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(images) or images.dtype != torch.uint8:
            raise TypeError(f"images must be a uint8 tensor, got {getattr(images, 'dtype', type(images).__name__)}")
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images must have shape [B, 1, 8, 8] for the digits features, got {tuple(images.shape)}")
        x = images.reshape(images.shape[0], -1).to(torch.float32) / 255.0
        self.net.to(images.device)
        return self.net.features(x).to(torch.float64)

    def accuracy(self) -> float:
        """Training-set accuracy (a sanity check of the cached file)."""
        images, labels = digits_uint8()
        with torch.no_grad():
            logits = self.net(images.reshape(images.shape[0], -1).to(torch.float32) / 255.0)
        return float((logits.argmax(1) == labels).to(torch.float64).mean())
