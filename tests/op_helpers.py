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


# ------------------------------------------------------- direct C++ op calls (torch.ops.pfgmpp_fast)
# Tolerances (docs/DESIGN.md §6, KERNEL_OPS.md): Philox words bit-exact; normals within 1e-6 abs +
# 1e-6 rel (the C++ SIMD log/sin/cos, CUDA's sinf/cosf/sincosf and torch's are each within
# ~2 ulp of the exact value, so z differs by a few ulp: |z| < 6 keeps that under 1e-6 + 6e-6);
# χ² within 1e-5 relative (V inherits the float32 rounding of z: |dV/V| ≈ 3c|dz|, measured
# < 1e-6); fused ops: relative error ‖out − ref‖/‖ref‖ < 1e-5 for float32/float64 outputs,
# < 1e-2 for bf16/fp16 outputs.
HALF = (torch.bfloat16, torch.float16)
CPP_D_VALUES = (1.0, 2.0, 8.0, 128.0, 2048.0, 3072000.0)
needs_ext = pytest.mark.skipif(not ops.has_extension(), reason="pfgmpp_fast._C is not built")
needs_cuda_kernels = [pytest.mark.gpu, pytest.mark.skipif(not ops.has_cuda_kernels(), reason="no CUDA kernels")]


def cpp_ops():
    """torch.ops.pfgmpp_fast (the ops are registered when pfgmpp_fast._C loads)."""
    from pfgmpp_fast import _ext  # noqa: F401

    return torch.ops.pfgmpp_fast


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def random_ids(B, seed, device="cpu"):
    """Sample ids spanning both 32-bit halves of the counter."""
    return torch.randint(0, 2**62, (B,), generator=seeded(seed)).to(device)


def rel_err_or_abs(out, ref):
    """‖out − ref‖/‖ref‖, or ‖out − ref‖ when ref is all zeros."""
    out, ref = out.double().cpu(), ref.double().cpu()
    den = ref.norm().item()
    return (out - ref).norm().item() / den if den > 0 else (out - ref).norm().item()


def tol_for(dtype):
    return 1e-2 if dtype in HALF else 1e-5


def assert_close_rel(out, ref, name):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != {ref.dtype}"
    if out.numel() == 0:
        return
    assert torch.isfinite(out.double()).all(), f"{name}: non-finite values"
    err = rel_err_or_abs(out, ref)
    assert err < tol_for(out.dtype), f"{name}: relative error {err:.3g}"


def in_layout(t, layout):
    """The same values in another memory layout: contiguous, channels-last, or strided."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
    # Non-contiguous: a strided view into a larger buffer (every second element of the last dim).
    big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    big.fill_(float("nan"))
    view = big[..., ::2]
    view.copy_(t)
    return view


def is_channels_last(t):
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
