"""The pieces of a training step around the network (training/loop.py runs them): the loss as a
module (so DDP sees one forward per chunk), the augmentation backend of a loss backend, and
the gradients' NaN/Inf check."""

from __future__ import annotations

import torch

from pfgmpp_fast import reference as R

__all__ = ["LossModule", "augment_backend", "flag_nonfinite_grads"]


class LossModule(torch.nn.Module):
    """The loss as a module around the network, so DDP sees one forward per chunk."""

    def __init__(self, net, o, net_dtype, channels_last):
        super().__init__()
        self.net = net
        self.o, self.net_dtype, self.channels_last = o, net_dtype, channels_last

    def forward(self, y, sample_ids, labels, augment_labels):
        o = self.o
        args = (self.net, y, o["D"], o["seed"], sample_ids, o["P_mean"], o["P_std"], o["sigma_data"])
        if o["backend"] == "reference":
            return R.training_loss(*args, labels=labels, augment_labels=augment_labels)
        from pfgmpp_fast.loss import training_loss

        return training_loss(
            *args,
            labels=labels,
            augment_labels=augment_labels,
            backend=o["backend"],
            net_dtype=self.net_dtype,
            channels_last=self.channels_last,
            check_finite=False,  # non-finite steps are counted on the device (TrainingRun.step)
        )


def augment_backend(backend):
    return "reference" if backend == "reference" else "auto"


def flag_nonfinite_grads(grads, found_inf: torch.Tensor) -> None:
    """Sets found_inf (float32 0-d, on the device) to 1 when any gradient holds NaN/Inf, so
    that Adam skips the step and it is counted, as a step with a non-finite loss is. No host
    sync and no copy: GradScaler's foreach check, one multi-tensor pass per gradient dtype
    (it multiplies by 1, which leaves every value as it was)."""
    one = torch.ones((), dtype=torch.float32, device=found_inf.device)
    by_dtype = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for group in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, one)
