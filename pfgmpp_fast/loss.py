"""Training objective of EDM / PFGM++ on the fused kernels.

For an EDMPrecond-like network (has `.raw` and `.sigma_data`) the step is
    perturb (one pass: y -> c_in·x in the net dtype) -> net.raw -> fused loss fwd+bwd
where the loss kernel regenerates the noise g, fuses c_skip, c_out and λ, and writes dL/dF
in the forward pass; backward only scales it.  Any other denoiser callable
`net(x, sigma[B], class_labels)` gets the fast perturbation and the plain torch loss.
"""

from __future__ import annotations

import torch
from torch import nn

from pfgmpp_fast import checks, ops
from pfgmpp_fast import reference as R
from pfgmpp_fast.networks import is_precond_net


class FusedLoss(torch.autograd.Function):
    """mean_b Σ_e (F − T)²; dL/dF comes from the same kernel launch as the loss."""

    @staticmethod
    def forward(ctx, F, y, scale, c_skip, c_out, sample_ids, key: int, stream: int, backend: str):
        B = y.shape[0]
        per_sample, grad = ops.loss_fwd_bwd(
            F, y, scale, c_skip, c_out, sample_ids, key, stream, 1.0 / max(B, 1), backend=backend
        )
        ctx.save_for_backward(grad)
        return per_sample.sum() / max(B, 1)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype),) + (None,) * 8


def training_loss(
    net,
    y: torch.Tensor,
    D,
    key,
    sample_ids,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_data: float = 0.5,
    labels=None,
    augment_labels=None,
    backend: str = "auto",
    net_dtype=None,
    channels_last=None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Σ_pixels λ(σ)(D_θ(x, σ) − y)², averaged over the batch (reference.training_loss).

    net_dtype: dtype of the network input on the fused path (default float32);
    channels_last: write the network input channels-last (default: the net's
    `channels_last` attribute, else y's layout).  sigma_data is taken from the network
    when it has one; a D that disagrees with the network's own D is an error.
    check_finite: NaN/Inf in y, in the network output or in the loss raises FloatingPointError
    naming the sample ids (one host read per call, skipped under torch.compile; the training
    loop passes False and counts non-finite steps on the device instead).
    """
    key, D, sample_ids = checks.check_common("y", y, key, D, sample_ids)
    checks.check_training_options(P_mean, P_std)
    sigma_data = checks.check_positive("sigma_data", sigma_data)
    return _checked_call(
        net,
        y,
        D,
        key,
        sample_ids,
        P_mean,
        P_std,
        sigma_data,
        labels,
        augment_labels,
        backend,
        net_dtype,
        channels_last,
        check_finite,
    )


def _checked_call(
    net,
    y,
    D: float,
    key: int,
    sample_ids,
    P_mean,
    P_std,
    sigma_data,
    labels,
    augment_labels,
    backend,
    net_dtype,
    channels_last,
    check_finite,
):
    """The per-call checks that need the network, the loss, and its NaN/Inf report."""
    checks.check_net_D(net, D)
    if net_dtype is not None and net_dtype not in ops.NET_DTYPES:
        raise TypeError(f"net_dtype must be one of {ops.NET_DTYPES} or None, got {net_dtype}")
    loss, F, s = _training_loss(
        net, y, D, key, sample_ids, P_mean, P_std, sigma_data, labels, augment_labels, backend, net_dtype, channels_last
    )
    if check_finite and not torch.compiler.is_compiling():
        _report_nonfinite(y, F, loss, s, sample_ids, D)
    return loss


def _training_loss(
    net,
    y,
    D: float,
    key: int,
    sample_ids,
    P_mean,
    P_std,
    sigma_data,
    labels,
    augment_labels,
    backend,
    net_dtype,
    channels_last,
):
    """(loss, network output, noise scale s) on checked arguments."""
    sigma, s = ops.training_scalars_unchecked(key, sample_ids, D, P_mean, P_std, backend)
    cd = R.compute_dtype(y)
    kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}

    if not is_precond_net(net):
        ones = torch.ones_like(s, dtype=cd)
        x, _ = ops.perturb_op(
            y, s.to(cd), ones, sample_ids, key, R.STREAM_NOISE, y.dtype, ops.is_channels_last(y), False, backend=backend
        )
        sigma_net = sigma.to(y.dtype)
        denoised = net(x, sigma_net, labels, **kwargs)
        weight = (sigma_net**2 + sigma_data**2) / (sigma_net * sigma_data) ** 2
        shape = (-1, *[1] * (y.dim() - 1))
        loss = (weight.view(shape) * (denoised.to(y.dtype) - y) ** 2).sum() / max(y.shape[0], 1)
        return loss, denoised, s

    c_skip, c_out, c_in, c_noise = R.coefficients(sigma, float(net.sigma_data))
    if channels_last is None:
        channels_last = bool(getattr(net, "channels_last", False)) or ops.is_channels_last(y)
    net_in, _ = ops.perturb_op(
        y,
        s.to(cd),
        c_in.to(cd),
        sample_ids,
        key,
        R.STREAM_NOISE,
        net_dtype or torch.float32,
        channels_last,
        False,
        backend=backend,
    )
    F = net.raw(net_in, c_noise.to(torch.float32), labels, **kwargs)
    if F.shape != y.shape:
        raise ValueError(f"net.raw returned shape {tuple(F.shape)}, expected {tuple(y.shape)}")
    loss = FusedLoss.apply(F, y, s.to(cd), c_skip.to(cd), c_out.to(cd), sample_ids, key, R.STREAM_NOISE, backend)
    return loss, F, s


def _report_nonfinite(y, F, loss, s, sample_ids, D: float) -> None:
    """What is not finite and where, from one host read: y, the network output, the loss."""

    def scale_hint(rows=None):
        s_max = float((s if rows is None else s[rows]).max()) if s.numel() else 0.0
        if s_max < 1e6:
            return ""
        return (
            f"; with D={D:g} the noise scale σ·√(D/V), V ~ χ²_D, reaches {s_max:.3g} (small D puts V near 0: "
            "the noise has infinite variance for D ≤ 2 and the loss overflows; use a larger D)"
        )

    report = checks.DeviceReport()
    report.ids(sample_ids)
    report.nonfinite("y", y, sample_ids)
    report.nonfinite("the network output", F.detach(), sample_ids, hint=scale_hint)  # σ of the bad rows
    report.add(
        ~torch.isfinite(loss.detach()).reshape(1),
        lambda rows, _: f"the training loss is not finite ({float(loss):g}){scale_hint()}",
    )
    report.raise_if_any()


class PFGMPPLoss(nn.Module):
    """The PFGM++ objective as a module: loss = PFGMPPLoss(D)(net, y, key, sample_ids)."""

    def __init__(self, D=128, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, backend: str = "auto"):
        super().__init__()
        self.D = checks.check_D(D)
        checks.check_training_options(P_mean, P_std)
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.sigma_data = checks.check_positive("sigma_data", sigma_data)
        self.backend = checks.check_backend(backend)

    def forward(self, net, y, key, sample_ids, labels=None, augment_labels=None, net_dtype=None):
        """The loss of one batch; D and the options were checked once, at construction."""
        checks.check_images("y", y)
        sample_ids = checks.check_sample_ids(sample_ids, device=y.device)
        checks.check_images("y", y, batch=sample_ids.shape[0])
        return _checked_call(
            net,
            y,
            self.D,
            checks.check_key(key),
            sample_ids,
            self.P_mean,
            self.P_std,
            self.sigma_data,
            labels,
            augment_labels,
            self.backend,
            net_dtype,
            None,
            True,
        )

    def extra_repr(self):
        return f"D={self.D}, P_mean={self.P_mean}, P_std={self.P_std}, sigma_data={self.sigma_data}, backend={self.backend!r}"
