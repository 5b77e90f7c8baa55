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
- `dinov2` (FD-DINOv2, EDM2): timm's DINOv2 ViT-L/14, 1024-d normalised class token of
  images resized to 224 px (bicubic, antialiased) and normalised with ImageNet's mean/std, as
  EDM2's calculate_metrics.py computes them (with the published model's positional-embedding
  resampling). Weights: timm's safetensors file, downloaded
  through huggingface_hub, or `--dinov2-weights PATH` offline (safetensors, or a pickle
  only with `--dinov2-sha256`: its digest is checked before anything unpickles it).

`Detectors` runs the networks that the requested metrics need over one batch, once.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from typing import Optional

import torch

from pfgmpp_fast.utils.cli_errors import InvalidValue
from pfgmpp_fast.utils.io_utils import atomic_write_bytes

__all__ = [
    "INCEPTION_SHA256",
    "INCEPTION_URL",
    "FEATURES",
    "DINOV2_ARCH",
    "sha256_of_file",
    "InceptionFeatures",
    "DINOv2Features",
    "Detectors",
    "make_random_inception_weights",
    "get_feature_extractor",
]

FEATURES = ("inception", "digits")
# torch-fidelity's Inception-v3 weights (feature_extractor_inceptionv3.URL_INCEPTION_V3). The
# file name carries the first 8 hex digits of its SHA-256 (torch.hub's convention); the full
# digest below starts with them.
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
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
    import tempfile

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

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
        raise InvalidValue("inception_sha256", f"must be 64 hex digits, got {sha256!r}")
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
        message = (
            f"refusing to load Inception weights {weights}: SHA-256 {actual} does not match the expected "
            f"{expected} ({'torch-fidelity pt_inception-2015-12-05' if sha256 is None else 'given'}). "
            "torch-fidelity unpickles this file (it could run code); pass --inception-sha256 with the "
            "file's digest only if you trust it."
        )
        # the given digest is what is wrong, or else the file
        raise InvalidValue("inception_weights" if sha256 is None else "inception_sha256", message, message=message)
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
        # the logits ride along for the Inception Score (one fc layer, no extra pass)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=path
        ).to(device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor):
        """(2048-d pool features, 1008 unbiased logits), float64."""
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError("images must be a uint8 tensor [B, C, H, W]")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        if images.shape[1] != 3:
            raise ValueError(f"Inception features need 1 or 3 channels, got {images.shape[1]}")
        dev = next(self.net.parameters()).device
        feats, logits = self.net(images.to(dev))
        return feats.to(torch.float64), logits.to(torch.float64)


# ----------------------------------------------------------------------------------------
# DINOv2 ViT-L/14 (FD-DINOv2) through timm

DINOV2_ARCH = "vit_large_patch14_dinov2.lvd142m"  # timm's name; its weights live on the HF hub as
DINOV2_HUB_FILE = "model.safetensors"  # timm/<arch>/model.safetensors


def _verified_dinov2_path(weights: Optional[str], sha256: Optional[str]):
    """(path, SHA-256) of the DINOv2 weights: downloaded through huggingface_hub when no path
    is given; a pickle (.pth) is only accepted with the expected digest, checked first."""
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"dinov2_sha256 must be 64 hex digits, got {sha256!r}")
    if weights is None:
        from huggingface_hub import hf_hub_download

        weights = hf_hub_download("timm/" + DINOV2_ARCH, DINOV2_HUB_FILE)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"DINOv2 weights not found: {weights}")
    actual = sha256_of_file(weights)
    if sha256 is not None and actual != sha256.lower():
        raise ValueError(
            f"refusing to load DINOv2 weights {weights}: SHA-256 {actual} does not match the given {sha256.lower()}"
        )
    if not weights.endswith(".safetensors") and sha256 is None:
        raise ValueError(
            f"refusing to unpickle DINOv2 weights {weights} without --dinov2-sha256 (a pickle could run "
            "code); prefer the .safetensors file, or pass the digest of a file you trust"
        )
    return weights, actual


def _dinov2_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The positional embedding of a `grid`×`grid` patch input, resampled as DINOv2's own
    interpolate_pos_encoding does it (bicubic, scale factor (grid + 0.1) / M, no antialias),
    so the features equal those of the published model, which EDM2 runs."""
    cls, patch = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    M, dim = int(round(math.sqrt(patch.shape[1]))), patch.shape[-1]
    if M == grid:
        return pos_embed
    scale = (grid + 0.1) / M
    patch = torch.nn.functional.interpolate(
        patch.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=False, scale_factor=(scale, scale)
    )
    return torch.cat([cls, patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1).to(pos_embed.dtype)


class DINOv2Features(torch.nn.Module):
    """1024-d DINOv2 ViT-L/14 features of uint8 images (C = 1 or 3), as EDM2 computes them:
    bicubic antialiased resize to `image_size` (224; smaller only for tests), /255, ImageNet
    normalisation, the final-norm class token of timm's ViT-L/14 (the positional embedding
    resampled once to the input grid as DINOv2 does at run time)."""

    name = "dinov2"
    dim = 1024

    def __init__(
        self, weights: Optional[str] = None, sha256: Optional[str] = None, device="cpu", image_size: int = 224
    ):
        super().__init__()
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 14 or image_size % 14:
            raise ValueError(f"image_size must be a positive multiple of 14 (the patch size), got {image_size!r}")
        path, self.sha256 = _verified_dinov2_path(weights, sha256)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:  # digest checked above; weights_only never runs code either
            state = torch.load(path, map_location="cpu", weights_only=True)
        if "pos_embed" not in state:
            raise ValueError(f"{path} is not a DINOv2 ViT state dict (no 'pos_embed')")
        state["pos_embed"] = _dinov2_pos_embed(state["pos_embed"], image_size // 14)
        with torch.device("meta"):  # no 300M-parameter random init: the weights are assigned below
            net = timm.create_model(DINOV2_ARCH, pretrained=False, num_classes=0, img_size=image_size)
        net.load_state_dict(checkpoint_filter_fn(state, net), strict=True, assign=True)
        self.net = net.to(device).eval().requires_grad_(False)
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError("images must be a uint8 tensor [B, C, H, W]")
        if images.shape[1] not in (1, 3):
            raise ValueError(f"DINOv2 features need 1 or 3 channels, got {images.shape[1]}")
        x = images.to(self.mean.device, torch.float32).expand(-1, 3, -1, -1)
        x = torch.nn.functional.interpolate(x, size=(self.image_size,) * 2, mode="bicubic", antialias=True)
        return self.net((x - self.mean) / self.std).to(torch.float64)


# ----------------------------------------------------------------------------------------
# Several detectors, one pass


class Detectors:
    """The outputs the requested metrics need, from one call per image batch:
    'features' (the main space: Inception pool or digits; rows kept for KID / precision-recall),
    'logits' (Inception's, rows kept for IS) and 'dinov2' (moments for FD-DINOv2).
    `layout` = {output: (dim, keep rows)}."""

    def __init__(self, main, metrics=("fid",), dinov2=None):
        from pfgmpp_fast.evaluation.metrics import parse_metrics

        self.metrics = parse_metrics(metrics)
        if "isc" in self.metrics and not hasattr(main, "features_and_logits"):
            raise ValueError(f"--metrics isc (Inception Score) needs --features inception, not {main.name!r}")
        if "fd_dinov2" in self.metrics and dinov2 is None:
            raise ValueError("--metrics fd_dinov2 needs the DINOv2 detector")
        self.main, self.dinov2 = main, dinov2 if "fd_dinov2" in self.metrics else None
        self.name, self.dim, self.sha256 = main.name, int(main.dim), getattr(main, "sha256", None)
        self.layout = {"features": (self.dim, bool({"kid", "prc"} & set(self.metrics)))}
        if "isc" in self.metrics:
            self.layout["logits"] = (1008, True)
        if self.dinov2 is not None:
            self.layout["dinov2"] = (int(self.dinov2.dim), False)

    def extra_config(self) -> dict:
        """What the shards hold beyond the main moments (empty for FID alone: old shards resume)."""
        extra = {k: list(v) for k, v in self.layout.items() if k != "features" or v[1]}
        if self.dinov2 is not None:
            extra["dinov2_sha256"], extra["dinov2_size"] = self.dinov2.sha256, self.dinov2.image_size
        return extra

    def __call__(self, images: torch.Tensor) -> dict:
        if "logits" in self.layout:
            out = dict(zip(("features", "logits"), self.main.features_and_logits(images)))
        else:
            out = {"features": self.main(images)}
        if self.dinov2 is not None:
            out["dinov2"] = self.dinov2(images)
        return out


def get_feature_extractor(
    name: str,
    device="cpu",
    inception_weights: Optional[str] = None,
    inception_sha256: Optional[str] = None,
    digits_cache: Optional[str] = None,
):
    """'inception' or 'digits' (module docstring); the returned module has .name, .dim, .sha256."""
    if name == "inception":
        return InceptionFeatures(inception_weights, inception_sha256, device=device)
    if name == "digits":
        from pfgmpp_fast.evaluation.digits_features import DigitsFeatures

        return DigitsFeatures(digits_cache).to(device)
    raise ValueError(f"features must be 'inception' or 'digits', got {name!r}")
