"""The pieces of a training step around the network (training/loop.py runs them): the loss as a
module (so DDP sees one forward per chunk), the augmentation backend of a loss backend, and
EDM's gradient clean-up."""

from __future__ import annotations

import torch

from pfgmpp_fast import reference as R

__all__ = ["LossModule", "augment_backend", "sanitize_grads_"]


class LossModule(torch.nn.Module):
    """The loss as a module around the network, so DDP sees one forward per chunk."""

    def __init__(self, net, o, net_dtype, channels_last):
        super().__init__()
        self.net = net
        self.o, self.net_dtype, self.channels_last = o, net_dtype, channels_last

    def forward(self, y, sample_ids, labels, augment_labels):
        o = self.o
        if o["backend"] == "reference":
            return R.training_loss(
                self.net,
                y,
                o["D"],
                o["seed"],
                sample_ids,
                o["P_mean"],
                o["P_std"],
                o["sigma_data"],
                labels=labels,
                augment_labels=augment_labels,
            )
        from pfgmpp_fast.loss import training_loss

        return training_loss(
            self.net,
            y,
            o["D"],
            o["seed"],
            sample_ids,
            o["P_mean"],
            o["P_std"],
            o["sigma_data"],
            labels=labels,
            augment_labels=augment_labels,
            backend=o["backend"],
            net_dtype=self.net_dtype,
            channels_last=self.channels_last,
            check_finite=False,
        )  # non-finite steps are counted on the device (step)


def augment_backend(backend):
    return "reference" if backend == "reference" else "auto"


def sanitize_grads_(grads):
    """EDM's nan_to_num(nan=0, posinf=1e5, neginf=-1e5) on every gradient, in a fixed number
    of kernels: flatten into one buffer, clean it, copy back with one foreach copy."""
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.nan_to_num_(flat, nan=0.0, posinf=1e5, neginf=-1e5)
    torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))
