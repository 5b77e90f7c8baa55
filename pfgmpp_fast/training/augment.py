"""Non-leaking geometric augmentation with augmentation labels (our implementation of the
technique of Karras et al. 2020 / EDM §5): each image is transformed with probability
``p`` per transform, and a vector describing the transforms is fed to the network
(``augment_labels``), which learns to undo them; sampling uses zero labels (no
augmentation), so the augmentations do not leak into the generated distribution.

Transforms, in order, and the label entries each contributes (the EDM convention, so
networks with ``augment_dim=9`` trained by either code understand the labels):

    xflip           w ∈ {0, 1}                              1 entry
    yflip           w ∈ {0, 1}                              1
    rotate_int      quarter turns q: [q∈{1,2}, q∈{2,3}]      2
    translate_int   [tx / (W·max), ty / (H·max)]              2
    scale           log2-scale / scale_std (a N(0,1) draw)  1
    rotate_frac     [cos θ − 1, sin θ]                       2
    aniso           [w·cos φ, w·sin φ]                       2
    translate_frac  [tx, ty] in units of translate_frac_std  2

The published CIFAR-10 recipe (``AugmentPipe.edm_default(p)``) enables xflip (always
eligible, probability 1/2 of a flip), yflip, scale, rotate_frac, aniso and translate_frac:
1+1+1+2+2+2 = 9 label entries. A transform whose gate is closed contributes zeros.

Randomness is counter-based: draw k of sample i comes from the Philox stream
``reference.STREAM_AUGMENT`` keyed by (key, sample id), so the augmentation of a training sample
depends only on the run seed and its global index — never on batch size or rank count.
Geometric transforms resample with bicubic interpolation and reflection at the borders
(our choice; EDM uses a wavelet-filtered 2× upsampling). Untouched images are passed
through bit-exactly.

Label dropout (`drop_labels`, for classifier-free guidance) replaces a sample's one-hot label
by the "no label" input, a zero vector (what an EDM network is given for class_labels=None),
when u0 of block 0 of the Philox stream ``STREAM_LABEL_DROPOUT`` keyed by (key, sample id) is
<= p: the same samples of a run drop their labels at any batch size or rank count.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as Fn

from pfgmpp_fast import checks, ops, reference

__all__ = ["AugmentPipe", "augment_dim", "label_dropout_mask", "drop_labels"]


def label_dropout_mask(key: int, sample_ids: torch.Tensor, p: float) -> torch.Tensor:
    """bool [B]: which samples drop their label (u0 of block 0 of STREAM_LABEL_DROPOUT <= p)."""
    zero = torch.zeros_like(sample_ids)
    counters = torch.stack(
        [
            zero,
            sample_ids & reference.MASK32,
            (sample_ids >> 32) & reference.MASK32,
            torch.full_like(sample_ids, reference.STREAM_LABEL_DROPOUT),
        ],
        dim=-1,
    )
    return reference.uniform(reference.philox4x32(counters, key)[:, 0]) <= p


def drop_labels(labels: torch.Tensor, key: int, sample_ids: torch.Tensor, p: float) -> torch.Tensor:
    """labels [B, label_dim] with the dropped samples' rows set to zero (the "no label" input)."""
    keep = ~label_dropout_mask(key, sample_ids, p)
    return labels * keep.to(labels.dtype).unsqueeze(1)


_NUM_DRAWS = 24  # fixed draw slots per sample (6 Philox blocks)

# Slot of each draw (normals; uniforms are Φ(normal)).
_S = dict(
    xflip_w=0,
    xflip_g=1,
    yflip_w=2,
    yflip_g=3,
    rint_w=4,
    rint_g=5,
    tint_x=6,
    tint_y=7,
    tint_g=8,
    scale_w=9,
    scale_g=10,
    rot_w=11,
    rot_g=12,
    aniso_w=13,
    aniso_r=14,
    aniso_g=15,
    aniso_rg=16,
    tfrac_x=17,
    tfrac_y=18,
    tfrac_g=19,
)

_LABEL_SIZES = dict(xflip=1, yflip=1, rotate_int=2, translate_int=2, scale=1, rotate_frac=2, aniso=2, translate_frac=2)


def augment_dim(**enabled) -> int:
    """Number of label entries for the transforms with a positive multiplier."""
    return sum(size for name, size in _LABEL_SIZES.items() if float(enabled.get(name, 0)) > 0)


def _uniform(z: torch.Tensor) -> torch.Tensor:
    """N(0,1) draw -> uniform in (0, 1) via the normal CDF."""
    return 0.5 * torch.erfc(-z * (1.0 / math.sqrt(2.0)))


def _rot(theta):
    c, s = torch.cos(theta), torch.sin(theta)
    z, o = torch.zeros_like(theta), torch.ones_like(theta)
    return torch.stack([c, -s, z, s, c, z, z, z, o], -1).view(-1, 3, 3)


def _scale(sx, sy):
    z, o = torch.zeros_like(sx), torch.ones_like(sx)
    return torch.stack([sx, z, z, z, sy, z, z, z, o], -1).view(-1, 3, 3)


def _translate(tx, ty):
    z, o = torch.zeros_like(tx), torch.ones_like(tx)
    return torch.stack([o, z, tx, z, o, ty, z, z, o], -1).view(-1, 3, 3)


class AugmentPipe:
    """Augmentation pipeline; ``pipe(images, key, sample_ids) -> (images, labels)``.

    images: float [B, C, H, W] in [-1, 1]; labels: float32 [B, dim] (dim = ``self.dim``).
    Multipliers (xflip, yflip, ...) scale the overall probability ``p`` per transform.
    """

    def __init__(
        self,
        p: float = 0.12,
        xflip: float = 0,
        yflip: float = 0,
        rotate_int: float = 0,
        translate_int: float = 0,
        translate_int_max: float = 0.125,
        scale: float = 0,
        rotate_frac: float = 0,
        aniso: float = 0,
        translate_frac: float = 0,
        scale_std: float = 0.2,
        rotate_frac_max: float = 1,
        aniso_std: float = 0.2,
        aniso_rotate_prob: float = 0.5,
        translate_frac_std: float = 0.125,
    ):
        values = dict(
            p=p,
            xflip=xflip,
            yflip=yflip,
            rotate_int=rotate_int,
            translate_int=translate_int,
            translate_int_max=translate_int_max,
            scale=scale,
            rotate_frac=rotate_frac,
            aniso=aniso,
            translate_frac=translate_frac,
            scale_std=scale_std,
            rotate_frac_max=rotate_frac_max,
            aniso_std=aniso_std,
            aniso_rotate_prob=aniso_rotate_prob,
            translate_frac_std=translate_frac_std,
        )
        for name, value in values.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"{name} must be a number, got {value!r}") from None
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
            setattr(self, name, value)
        if self.p > 1:
            raise ValueError(f"p (augment probability) must be in [0, 1], got {self.p}")

    @classmethod
    def edm_default(cls, p: float = 0.12) -> "AugmentPipe":
        """The published CIFAR-10 / FFHQ configuration (9 label entries)."""
        return cls(p=p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

    @property
    def dim(self) -> int:
        return augment_dim(**{k: getattr(self, k) for k in _LABEL_SIZES})

    def options(self) -> dict:
        return {
            k: getattr(self, k)
            for k in (
                "p",
                "xflip",
                "yflip",
                "rotate_int",
                "translate_int",
                "translate_int_max",
                "scale",
                "rotate_frac",
                "aniso",
                "translate_frac",
                "scale_std",
                "rotate_frac_max",
                "aniso_std",
                "aniso_rotate_prob",
                "translate_frac_std",
            )
        }

    def _gate(self, u, mult):
        return u < min(mult * self.p, 1.0)

    def __call__(
        self, images: torch.Tensor, key: int, sample_ids: torch.Tensor, backend: str = "auto"
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if not torch.is_tensor(images) or images.dim() != 4 or not images.is_floating_point():
            raise TypeError(
                f"images must be a float tensor [B, C, H, W], got {getattr(images, 'shape', type(images).__name__)}"
            )
        B, C, H, W = images.shape
        device = images.device
        sample_ids = checks.check_sample_ids(sample_ids, device=device)
        if sample_ids.shape[0] != B:
            raise ValueError(f"{sample_ids.shape[0]} sample ids for {B} images")
        key = checks.check_key(key)
        z = ops.philox_normal(key, sample_ids, _NUM_DRAWS, reference.STREAM_AUGMENT, backend=backend)
        z = z.to(device=device, dtype=torch.float32)  # [B, 24]
        u = _uniform(z)
        col = lambda name: z[:, _S[name]]  # noqa: E731
        ucol = lambda name: u[:, _S[name]]  # noqa: E731
        labels = []
        zero = torch.zeros(B, device=device)

        images = self._blit(images, ucol, labels, zero)
        images = self._geometric(images, col, ucol, labels, zero)

        out_labels = torch.cat(labels, 1).to(torch.float32) if labels else torch.zeros(B, 0, device=device)
        return images, out_labels

    def _blit(self, images, ucol, labels, zero):
        """Flips, quarter turns and integer translations (exact); appends their labels."""
        B, C, H, W = images.shape
        if self.xflip > 0:
            w = torch.where(self._gate(ucol("xflip_g"), self.xflip), (ucol("xflip_w") < 0.5).float(), zero)
            images = torch.where(w.view(B, 1, 1, 1) > 0, images.flip(3), images)
            labels.append(w[:, None])
        if self.yflip > 0:
            w = torch.where(self._gate(ucol("yflip_g"), self.yflip), (ucol("yflip_w") < 0.5).float(), zero)
            images = torch.where(w.view(B, 1, 1, 1) > 0, images.flip(2), images)
            labels.append(w[:, None])
        if self.rotate_int > 0:
            q = torch.where(
                self._gate(ucol("rint_g"), self.rotate_int), (ucol("rint_w") * 4).floor().clamp(max=3), zero
            ).view(B, 1, 1, 1)
            images = torch.where((q == 1) | (q == 2), images.flip(3), images)
            images = torch.where((q == 2) | (q == 3), images.flip(2), images)
            if H == W:
                images = torch.where((q == 1) | (q == 3), images.transpose(2, 3), images)
            q = q.view(B)
            labels.append(torch.stack([((q == 1) | (q == 2)).float(), ((q == 2) | (q == 3)).float()], 1))
        if self.translate_int > 0:
            gate = self._gate(ucol("tint_g"), self.translate_int)
            wx = torch.where(gate, ucol("tint_x") * 2 - 1, zero)
            wy = torch.where(gate, ucol("tint_y") * 2 - 1, zero)
            tx = (wx * (W * self.translate_int_max)).round().to(torch.int64)
            ty = (wy * (H * self.translate_int_max)).round().to(torch.int64)
            images = self._translate_int(images, tx, ty)
            labels.append(
                torch.stack([tx / (W * self.translate_int_max), ty / (H * self.translate_int_max)], 1).float()
            )
        return images

    def _geometric(self, images, col, ucol, labels, zero):
        """Scale, rotation, anisotropy, fractional translation: one resampling; appends labels."""
        B, C, H, W = images.shape
        device = images.device
        G_inv = torch.eye(3, device=device).expand(B, 3, 3)
        geometric = False
        if self.scale > 0:
            w = torch.where(self._gate(ucol("scale_g"), self.scale), col("scale_w"), zero)
            s = torch.exp2(w * self.scale_std)
            G_inv = G_inv @ _scale(1 / s, 1 / s)
            labels.append(w[:, None])
            geometric = True
        if self.rotate_frac > 0:
            w = torch.where(
                self._gate(ucol("rot_g"), self.rotate_frac),
                (ucol("rot_w") * 2 - 1) * (math.pi * self.rotate_frac_max),
                zero,
            )
            G_inv = G_inv @ _rot(w)  # inverse of a rotation by -w
            labels.append(torch.stack([torch.cos(w) - 1, torch.sin(w)], 1))
            geometric = True
        if self.aniso > 0:
            w = torch.where(self._gate(ucol("aniso_g"), self.aniso), col("aniso_w"), zero)
            r = torch.where(ucol("aniso_rg") < self.aniso_rotate_prob, (ucol("aniso_r") * 2 - 1) * math.pi, zero)
            s = torch.exp2(w * self.aniso_std)
            G_inv = G_inv @ _rot(-r) @ _scale(1 / s, s) @ _rot(r)
            labels.append(torch.stack([w * torch.cos(r), w * torch.sin(r)], 1))
            geometric = True
        if self.translate_frac > 0:
            gate = self._gate(ucol("tfrac_g"), self.translate_frac)
            wx, wy = torch.where(gate, col("tfrac_x"), zero), torch.where(gate, col("tfrac_y"), zero)
            G_inv = G_inv @ _translate(-wx * (W * self.translate_frac_std), -wy * (H * self.translate_frac_std))
            labels.append(torch.stack([wx, wy], 1))
            geometric = True
        if geometric:
            images = self._warp(images, G_inv)
        return images

    @staticmethod
    def _translate_int(images, tx, ty):
        """Integer shift with mirror reflection at the borders (exact gather)."""
        B, C, H, W = images.shape
        x = torch.arange(W, device=images.device).view(1, W) - tx.view(B, 1)
        y = torch.arange(H, device=images.device).view(1, H) - ty.view(B, 1)
        x = (W - 1) - ((W - 1) - x % max(2 * W - 2, 1)).abs()
        y = (H - 1) - ((H - 1) - y % max(2 * H - 2, 1)).abs()
        images = images.gather(3, x.view(B, 1, 1, W).expand(B, C, H, W))
        return images.gather(2, y.view(B, 1, H, 1).expand(B, C, H, W))

    @staticmethod
    def _warp(images, G_inv):
        """out(p) = in(G_inv · p) with p in pixel units about the image centre; identity
        transforms keep the input exactly."""
        B, C, H, W = images.shape
        cx, cy = (W - 1) / 2, (H - 1) / 2
        ys, xs = torch.meshgrid(
            torch.arange(H, device=images.device, dtype=torch.float32) - cy,
            torch.arange(W, device=images.device, dtype=torch.float32) - cx,
            indexing="ij",
        )
        points = torch.stack([xs, ys, torch.ones_like(xs)], 0).view(1, 3, H * W)
        src = (G_inv.to(torch.float32) @ points)[:, :2]  # [B, 2, HW] pixel offsets
        grid = torch.stack([(src[:, 0] + cx) / max(cx, 0.5) - 1, (src[:, 1] + cy) / max(cy, 0.5) - 1], -1)
        grid = grid.view(B, H, W, 2)
        warped = Fn.grid_sample(
            images.to(torch.float32), grid, mode="bicubic", padding_mode="reflection", align_corners=True
        ).to(images.dtype)
        identity = (G_inv - torch.eye(3, device=images.device)).abs().amax(dim=(1, 2)) < 1e-7
        return torch.where(identity.view(B, 1, 1, 1), images, warped)
