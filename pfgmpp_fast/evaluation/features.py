"""Feature networks, one interface: `extractor(uint8 [B, C, H, W]) -> float64 [B, dim]`, with
attributes `.name`, `.dim` and `.sha256` (the digest of the weights file it was built from).

- `inception`: torch-fidelity's FeatureExtractorInceptionV3, 2048-d pool features (grey
  images are repeated to 3 channels, as the published pipeline does). Weights: torch-fidelity's
  file `weights-inception-2015-12-05-6726825d.pth`, downloaded on a connected machine into
  torch hub's cache, or `--inception-weights PATH` offline. torch-fidelity loads the file
  with pickle, so a file is only handed on after its SHA-256 matched INCEPTION_SHA256
  (or a digest the user passes explicitly with `--inception-sha256`, e.g. for their own
  conversion — that is the user vouching for the file).
- `digits`: the 64-d digit features of digits_features.py ("Fréchet Digit Distance").
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from typing import Optional

import torch

from pfgmpp_fast.utils.io_utils import atomic_write_bytes

__all__ = ["INCEPTION_SHA256", "INCEPTION_URL", "FEATURES", "sha256_of_file", "InceptionFeatures",
           "make_random_inception_weights", "get_feature_extractor"]

FEATURES = ("inception", "digits")
# torch-fidelity's Inception-v3 weights (feature_extractor_inceptionv3.URL_INCEPTION_V3). The
# file name carries the first 8 hex digits of its SHA-256 (torch.hub's convention); the full
# digest below starts with them.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


# ----------------------------------------------------------------------------------------
# Feature extractors

def sha256_of_file(path: str) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unloaded_inception():
    """torch-fidelity's Inception-v3 architecture with its default (random) initialisation."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    import tempfile

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # keep the random init
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.pth")
        torch.save({}, empty)
        return _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)


def make_random_inception_weights(path: str, seed: int = 0) -> str:
    """A randomly initialised state dict of torch-fidelity's Inception-v3, saved the way
    torch-fidelity expects (for tests and throughput benchmarks — not for real FIDs).
    Returns its SHA-256."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        net = _unloaded_inception()
    sd = {k: v.clone() for k, v in torch.nn.Module.state_dict(net).items()}
    buf = io.BytesIO()
    torch.save(sd, buf)
    atomic_write_bytes(path, buf.getvalue())
    return sha256_of_file(path)


def _verified_inception_path(weights: Optional[str], sha256: Optional[str]) -> str:
    """A local weights file whose SHA-256 is the expected one (downloading the published
    file into torch hub's cache when no path is given)."""
    expected = (sha256 or INCEPTION_SHA256).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ValueError(f"inception_sha256 must be 64 hex digits, got {sha256!r}")
    if weights is None:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))
        if not os.path.exists(cached):
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, cached, hash_prefix=INCEPTION_SHA256[:8])
        weights = cached
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"Inception weights not found: {weights}")
    actual = sha256_of_file(weights)
    if actual != expected:
        raise ValueError(
            f"refusing to load Inception weights {weights}: SHA-256 {actual} does not match the expected "
            f"{expected} ({'torch-fidelity pt_inception-2015-12-05' if sha256 is None else 'given'}). "
            "torch-fidelity unpickles this file (it could run code); pass --inception-sha256 with the file's "
            "digest only if you trust it.")
    return weights


class InceptionFeatures(torch.nn.Module):
    """torch-fidelity's Inception-v3 2048-d pool features of uint8 images (C = 1 or 3)."""

    name = "inception"
    dim = 2048

    def __init__(self, weights: Optional[str] = None, sha256: Optional[str] = None, device="cpu"):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        path = _verified_inception_path(weights, sha256)
        self.sha256 = sha256_of_file(path)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=path).to(device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError("images must be a uint8 tensor [B, C, H, W]")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        if images.shape[1] != 3:
            raise ValueError(f"Inception features need 1 or 3 channels, got {images.shape[1]}")
        dev = next(self.net.parameters()).device
        return self.net(images.to(dev))[0].to(torch.float64)


def get_feature_extractor(name: str, device="cpu", inception_weights: Optional[str] = None,
                          inception_sha256: Optional[str] = None, digits_cache: Optional[str] = None):
    """'inception' or 'digits' (module docstring); the returned module has .name, .dim, .sha256."""
    if name == "inception":
        return InceptionFeatures(inception_weights, inception_sha256, device=device)
    if name == "digits":
        from pfgmpp_fast.evaluation.digits_features import DigitsFeatures
        return DigitsFeatures(digits_cache).to(device)
    raise ValueError(f"features must be 'inception' or 'digits', got {name!r}")
