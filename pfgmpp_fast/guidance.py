"""Guidance of the sampler's denoiser: D_W(x) = D_G(x) + W·(D(x) − D_G(x)) (EDM2's `guidance`,
`gnet`), with the guide G either another network of the same task (autoguidance, Karras et al.
2024: a smaller or less-trained model) or, for a class-conditional network trained with label
dropout, the same network without labels (classifier-free guidance, `gnet=UNCOND`).

When both networks share the EDM preconditioning (same σ_data), D = c_skip·x + c_out·F is
affine in the raw output F with the same coefficients, so the guided denoiser is the
preconditioning of F_G + W·(F − F_G): the sampler combines the raw outputs (one fused
elementwise `lerp`) and keeps the preconditioning in its update kernels. Where the guide is
the network itself (`UNCOND`, or `gnet is net`) the two evaluations are one network call on
the doubled batch. W = 1 never reaches this module (the sampler skips the guide).
"""

from __future__ import annotations

from typing import Optional

import torch

from pfgmpp_fast import checks
from pfgmpp_fast.networks import is_precond_net
from pfgmpp_fast.utils.cli_errors import InvalidType, InvalidValue

__all__ = ["UNCOND", "check_guide", "check_guide_network", "Guide"]

UNCOND = "uncond"  # gnet: the network itself with the "no label" input (zero one-hot): classifier-free guidance


def _label_dim(net) -> int:
    return int(getattr(net, "label_dim", 0) or 0)


def check_guide(net, gnet, guidance: float, D: float):
    """The guide to use: None for guidance 1 (no guidance: `gnet` is not called), else `gnet`
    checked (ValueError/TypeError naming gnet)."""
    if guidance == 1.0:
        return None
    if gnet is None:
        raise InvalidValue(
            "gnet",
            f"is needed with guidance={guidance:g}: another network of the same task "
            f"(autoguidance) or {UNCOND!r} (the same class-conditional network without labels: "
            "classifier-free guidance); guidance=1 samples unguided",
            sep=": ",
        )
    return check_guide_network(net, gnet, D)


def check_guide_network(net, gnet, D: float):
    """`gnet` as a guide of `net`: UNCOND for a class-conditional net, or a network/denoiser of
    the same D and image shape (ValueError/TypeError naming gnet)."""
    if isinstance(gnet, str):
        if gnet != UNCOND:
            raise InvalidValue("gnet", f"must be a network, a denoiser callable or {UNCOND!r}, got {gnet!r}")
        if _label_dim(net) == 0:
            raise InvalidValue(
                "gnet",
                f"{UNCOND!r} (classifier-free guidance) needs a class-conditional network "
                "(label_dim > 0, trained with label dropout), but the network is unconditional",
                sep=": ",
            )
        return gnet
    if not callable(gnet):
        raise InvalidType("gnet", f"must be a network, a denoiser callable or {UNCOND!r}, got {type(gnet).__name__}")
    try:
        checks.check_net_D(gnet, D)
    except ValueError as exc:
        raise InvalidValue("gnet", str(exc), sep=": ") from None
    shape = lambda n: tuple(getattr(n, a, None) for a in ("img_channels", "img_resolution"))  # noqa: E731
    if None not in shape(gnet) + shape(net) and shape(gnet) != shape(net):
        raise InvalidValue(
            "gnet", f"makes {shape(gnet)} (channels, resolution) images but the network makes {shape(net)}", sep=": "
        )
    return gnet


def _zeros_if_none(labels, like, label_dim: int, batch: int, device):
    if labels is not None or like is None:
        return labels
    return torch.zeros(batch, label_dim, dtype=like.dtype, device=device)


class Guide:
    """F_G + W·(F − F_G) (raw outputs) or D_G + W·(D − D_G) (denoiser outputs) for one batch of
    B samples with `class_labels` (None: none); `gnet` as checked by check_guide (not None)."""

    def __init__(self, net, gnet, guidance: float, class_labels: Optional[torch.Tensor], B: int, device):
        self.net, self.gnet, self.W = net, gnet, float(guidance)
        self.batched = isinstance(gnet, str) or gnet is net  # one network call on the doubled batch
        self.labels = class_labels
        guide_labels = class_labels
        if isinstance(gnet, str):  # UNCOND: the "no label" input, zero one-hots
            guide_labels = torch.zeros(B, _label_dim(net), dtype=torch.float32, device=device)
        if self.batched:
            dim = _label_dim(net)
            cond = _zeros_if_none(class_labels, guide_labels, dim, B, device)
            guide_labels = _zeros_if_none(guide_labels, cond, dim, B, device)
            self.both_labels = None if cond is None else torch.cat([cond, guide_labels.to(cond.dtype)])
        self.guide_labels = guide_labels
        # Combine raw outputs only where both networks' D = c_skip·x + c_out·F share c_skip, c_out.
        self.raw_compatible = is_precond_net(net) and (
            self.batched or (is_precond_net(gnet) and float(gnet.sigma_data) == float(net.sigma_data))
        )

    def combine(self, F_guide: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
        """F_G + W·(F − F_G) in at least fp32: one fused elementwise op (EDM2's lerp)."""
        dtype = torch.promote_types(torch.promote_types(F.dtype, F_guide.dtype), torch.float32)
        return torch.lerp(F_guide.to(dtype), F.to(dtype), self.W)

    def _pair(self, net_fn, guide_fn, x, noise):
        if self.batched:
            both = net_fn(torch.cat([x, x]), torch.cat([noise, noise]), self.both_labels)
            F, F_guide = both.chunk(2)
        else:
            F, F_guide = net_fn(x, noise, self.labels), guide_fn(x, noise, self.guide_labels)
        return self.combine(F_guide, F)

    def raw(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """The guided raw output from the network input c_in·x (raw_compatible only)."""
        return self._pair(self.net.raw, None if self.batched else self.gnet.raw, x_in, c_noise)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The guided denoiser output D_W(x, σ)."""
        return self._pair(self.net, None if self.batched else self.gnet, x, sigma)
