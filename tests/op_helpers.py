"""Shared pieces of the fused-op tests: backends, inputs in every layout, comparisons."""
import math

import pytest
import torch

from pfgmpp_fast import ops

BACKENDS = [
    # `triton` mark: the device script selects `-m "gpu or triton"` so the Triton params run on the GPU
    # too (on the CPU they run under the interpreter, never skipped).
    pytest.param("triton", id="triton", marks=pytest.mark.triton),
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(not ops.has_extension(), reason="pfgmpp_fast._C not built")),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not ops.has_cuda_kernels(), reason="no CUDA kernels")]),
]
D_VALUES = [1.0, 2.0, 128.0, 2048.0, 3072000.0, math.inf]


def device_for(backend):
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def make_images(B, layout, dtype, device, gen, shape=(3, 5, 7)):
    """Random images [B, 3, 5, 7] (odd N = 105) that are contiguous, channels-last or strided."""
    if layout == "strided":  # every other column of a wider tensor, then H and W swapped
        big = torch.randn(B, shape[0], shape[2], 2 * shape[1] + 1, generator=gen)
        y = big[..., 1::2].transpose(2, 3)
        assert not y.is_contiguous() and not y.is_contiguous(memory_format=torch.channels_last) or B == 0
    else:
        y = torch.randn(B, *shape, generator=gen)
        if layout == "channels_last":
            y = y.contiguous(memory_format=torch.channels_last)
    return y.to(device=device, dtype=dtype)


def same_format(out, ref):
    """Same memory format (exact strides may differ where both formats coincide, e.g. C == 1)."""
    if out.dim() != 4:
        return out.is_contiguous() == ref.is_contiguous()
    return all(out.is_contiguous(memory_format=f) == ref.is_contiguous(memory_format=f)
               for f in (torch.contiguous_format, torch.channels_last))


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if ref.numel() == 0:
        return 0.0
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
