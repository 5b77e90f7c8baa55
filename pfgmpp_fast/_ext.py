"""Loads the C++/CUDA extension `pfgmpp_fast._C` and registers the fake (meta)
implementations of its ops, so torch.compile traces through `torch.ops.pfgmpp_fast.*`.

    HAS_EXTENSION     the extension imported (CPU kernels available)
    HAS_CUDA_KERNELS  the dispatcher has CUDA kernels for the ops (built with nvcc)

Importing this module raises ImportError (with build instructions) when `_C` is missing.
"""

from __future__ import annotations

from typing import Optional

import torch

from pfgmpp_fast.checks import check_elements_per_sample, per_sample_count
from pfgmpp_fast.reference import compute_dtype

_BUILD_HINT = (
    "pfgmpp_fast._C (the C++/CUDA kernels) is not built. Build it from the repository root "
    "with `pip install --no-build-isolation -e .` (needs cmake>=3.30, ninja, pybind11 and a "
    "C++20 compiler; nvcc adds the CUDA kernels, PFGMPP_FAST_NO_CUDA=1 skips them)."
)

try:
    from pfgmpp_fast import _C  # noqa: F401  (registers torch.ops.pfgmpp_fast.* as a side effect)
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(f"{_BUILD_HINT} (import error: {exc})") from exc

OP_NAMES = ("philox4x32", "philox_normal", "chi2", "perturb", "loss_fwd_bwd", "sampler_update")

HAS_EXTENSION = True
HAS_CUDA_KERNELS = bool(torch._C._dispatch_has_kernel_for_dispatch_key("pfgmpp_fast::philox_normal", "CUDA"))


def _format(channels_last: bool, like: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if channels_last and like.dim() == 4 else torch.contiguous_format


def _input_format(t: torch.Tensor) -> torch.memory_format:
    """Layout the C++ ops keep for an image input (and its gradient): see csrc/ops.cpp."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _register_fakes() -> None:
    lib = "pfgmpp_fast::"

    @torch.library.register_fake(lib + "philox4x32")
    def _(counter, key):
        return torch.empty(counter.shape, dtype=torch.int64, device=counter.device)

    @torch.library.register_fake(lib + "philox_normal")
    def _(sample_ids, key, n, stream):
        check_elements_per_sample("philox_normal", "n", n)
        return sample_ids.new_empty((sample_ids.shape[0], n), dtype=torch.float32)

    @torch.library.register_fake(lib + "chi2")
    def _(sample_ids, key, D, stream):
        return sample_ids.new_empty((sample_ids.shape[0],), dtype=torch.float64)

    @torch.library.register_fake(lib + "perturb")
    def _(y, scale, c_in, sample_ids, key, stream, out_dtype, channels_last, write_x):
        check_elements_per_sample("perturb", "the elements per sample of y", per_sample_count(y.shape), "y")
        cd = compute_dtype(y)
        net_in = torch.empty(y.shape, dtype=out_dtype, device=y.device, memory_format=_format(channels_last, y))
        x = torch.empty(y.shape, dtype=cd, device=y.device) if write_x else torch.empty(0, dtype=cd, device=y.device)
        return net_in, x

    @torch.library.register_fake(lib + "loss_fwd_bwd")
    def _(F, y, scale, c_skip, c_out, sample_ids, key, stream, grad_scale):
        check_elements_per_sample("loss_fwd_bwd", "the elements per sample of F", per_sample_count(F.shape), "F")
        loss = F.new_empty((F.shape[0],), dtype=torch.float32)
        grad = torch.empty(F.shape, dtype=F.dtype, device=F.device, memory_format=_input_format(F))
        return loss, grad

    @torch.library.register_fake(lib + "sampler_update")
    def _(
        x,
        F: Optional[torch.Tensor],
        base: Optional[torch.Tensor],
        A,
        Bf,
        h1,
        h2: Optional[float],
        sample_ids,
        key,
        alpha_scale,
        alpha_stream,
        churn_scale,
        churn_stream,
        c_in_next: Optional[float],
        net_dtype,
        channels_last,
    ):
        check_elements_per_sample("sampler_update", "the elements per sample of x", per_sample_count(x.shape), "x")
        y1 = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        y2 = (
            torch.empty(x.shape, dtype=x.dtype, device=x.device)
            if h2 is not None
            else torch.empty(0, dtype=x.dtype, device=x.device)
        )
        net_in = (
            torch.empty(x.shape, dtype=net_dtype, device=x.device, memory_format=_format(channels_last, x))
            if c_in_next is not None
            else torch.empty(0, dtype=net_dtype, device=x.device)
        )
        return y1, y2, net_in


_register_fakes()
