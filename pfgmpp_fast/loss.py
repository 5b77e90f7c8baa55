"""Training objective of EDM / PFGM++ on the fused kernels.

For an EDMPrecond-like network (has `.raw` and `.sigma_data`) the step is
    perturb (one pass: y -> c_in·x in the net dtype) -> net.raw -> fused loss fwd+bwd
where the loss kernel regenerates the noise g, fuses c_skip, c_out and λ, and writes dL/dF
in the forward pass; backward only scales it.  Any other denoiser callable
`net(x, sigma[B], class_labels)` gets the fast perturbation and the plain torch loss.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pfgmpp_fast import ops
from pfgmpp_fast import checks
from pfgmpp_fast import reference as R


def _is_precond_net(net) -> bool:
    return hasattr(net, "raw") and hasattr(net, "sigma_data")


class FusedLoss(torch.autograd.Function):
    """mean_b Σ_e (F − T)²; dL/dF comes from the same kernel launch as the loss."""

    @staticmethod
    def forward(ctx, F, y, scale, c_skip, c_out, sample_ids, key: int, stream: int, backend: str):
        B = y.shape[0]
        per_sample, grad = ops.loss_fwd_bwd(F, y, scale, c_skip, c_out, sample_ids, key, stream,
                                            1.0 / max(B, 1), backend=backend)
        ctx.save_for_backward(grad)
        return per_sample.sum() / max(B, 1)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype),) + (None,) * 8


def training_loss(net, y: torch.Tensor, D, key, sample_ids, P_mean: float = -1.2,
                  P_std: float = 1.2, sigma_data: float = 0.5, labels=None, augment_labels=None,
                  backend: str = "auto", net_dtype=None, channels_last=None) -> torch.Tensor:
    """Σ_pixels λ(σ)(D_θ(x, σ) − y)², averaged over the batch (reference.training_loss).

    net_dtype: dtype of the network input on the fused path (default float32);
    channels_last: write the network input channels-last (default: the net's
    `channels_last` attribute, else y's layout).  sigma_data is taken from the network
    when it has one.
    """
    checks.check_images("y", y)
    sample_ids = checks.check_sample_ids(sample_ids, device=y.device)
    checks.check_images("y", y, batch=sample_ids.shape[0])
    key, D = checks.check_key(key), checks.check_D(D)
    if net_dtype is not None and net_dtype not in ops.NET_DTYPES:
        raise TypeError(f"net_dtype must be one of {ops.NET_DTYPES} or None, got {net_dtype}")
    sigma, s = ops.training_scalars(key, sample_ids, D, P_mean, P_std, backend=backend)
    cd = torch.float64 if y.dtype == torch.float64 else torch.float32
    kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}

    if not _is_precond_net(net):
        checks.check_positive("sigma_data", sigma_data)
        ones = torch.ones_like(s, dtype=cd)
        x, _ = ops.perturb_op(y, s.to(cd), ones, sample_ids, key, R.STREAM_NOISE, y.dtype,
                              ops._is_channels_last(y), False, backend=backend)
        sigma_net = sigma.to(y.dtype)
        denoised = net(x, sigma_net, labels, **kwargs)
        weight = (sigma_net ** 2 + sigma_data ** 2) / (sigma_net * sigma_data) ** 2
        shape = (-1, *[1] * (y.dim() - 1))
        return (weight.view(shape) * (denoised.to(y.dtype) - y) ** 2).sum() / max(y.shape[0], 1)

    c_skip, c_out, c_in, c_noise = R.precond(sigma, float(net.sigma_data))
    if channels_last is None:
        channels_last = bool(getattr(net, "channels_last", False)) or ops._is_channels_last(y)
    net_in, _ = ops.perturb_op(y, s.to(cd), c_in.to(cd), sample_ids, key, R.STREAM_NOISE,
                               net_dtype or torch.float32, channels_last, False, backend=backend)
    F = net.raw(net_in, c_noise.to(torch.float32), labels, **kwargs)
    if F.shape != y.shape:
        raise ValueError(f"net.raw returned shape {tuple(F.shape)}, expected {tuple(y.shape)}")
    return FusedLoss.apply(F, y, s.to(cd), c_skip.to(cd), c_out.to(cd), sample_ids, key,
                           R.STREAM_NOISE, backend)


class PFGMPPLoss(nn.Module):
    """The PFGM++ objective as a module: loss = PFGMPPLoss(D)(net, y, key, sample_ids)."""

    def __init__(self, D=128, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5,
                 backend: str = "auto"):
        super().__init__()
        self.D = checks.check_D(D)
        if not math.isfinite(P_mean):
            raise ValueError(f"P_mean must be finite, got {P_mean}")
        self.P_mean, self.P_std = float(P_mean), checks.check_positive("P_std", P_std)
        self.sigma_data = checks.check_positive("sigma_data", sigma_data)
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.backend = backend

    def forward(self, net, y, key, sample_ids, labels=None, augment_labels=None, net_dtype=None):
        return training_loss(net, y, self.D, key, sample_ids, self.P_mean, self.P_std,
                             self.sigma_data, labels, augment_labels, self.backend, net_dtype)

    def extra_repr(self):
        return f"D={self.D}, P_mean={self.P_mean}, P_std={self.P_std}, sigma_data={self.sigma_data}, backend={self.backend!r}"
