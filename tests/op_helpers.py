"""Shared pieces of the fused-op tests: backends, inputs in every layout, comparisons.

Each op has one harness, parametrised over BACKENDS and a table of cases: it calls the op
through `pfgmpp_fast.ops` (for 'cpu' / 'cuda' that is the C++ op torch.ops.pfgmpp_fast.<op>
itself, for 'triton' the Triton op) and compares it with the op's reference in reference.py.
"""

import math

import pytest
import torch

from pfgmpp_fast import ops

BACKENDS = [
    # `triton` mark: the device script selects `-m "gpu or triton"` so the Triton params run on the GPU
    # too (on the CPU they run under the interpreter, never skipped).
    pytest.param("triton", id="triton", marks=pytest.mark.triton),
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(not ops.has_extension(), reason="pfgmpp_fast._C not built")),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not ops.has_cuda_kernels(), reason="no CUDA kernels")],
    ),
]
D_VALUES = [1.0, 2.0, 8.0, 128.0, 2048.0, 3072000.0, math.inf]
FINITE_D_VALUES = [D for D in D_VALUES if math.isfinite(D)]
LAYOUTS = ("contiguous", "channels_last", "strided", "transposed", "offset", "channels_last_offset")

# Random123's published known-answer vectors for philox4x32_10 (counter, key=(k0, k1), output)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

# Tolerances against reference.py, the same for every backend: each backend's deviation is derived
# in docs/KERNEL_OPS.md, "Rounding per backend" (docs/DESIGN.md §6), and the largest, the Triton GPU
# kernels' (libdevice normals, div.full.f32 <= 2 ulp, FMA contraction <= 1 ulp per op), stays
# ~10x below them (test_ops_loss.py::test_fp32_tolerance_covers_the_gpu_kernels_rounding
# emulates it on the CPU).  Philox words are bit-exact.
NORMAL_TOL = 1e-6  # normals, rtol and atol: log/sin/cos of every backend within ~2 ulp, |z| < 6
CHI2_REL_TOL = 1e-5  # V inherits the float32 rounding of z: |dV/V| ≈ 3c|dz|, measured < 1e-6
FP32_REL_TOL = 1e-5  # fused ops' float32/float64 outputs: ‖out − ref‖/‖ref‖ (loss sums: rtol)
HALF_REL_TOL = 1e-2  # bf16/fp16 outputs: their own rounding (<= 2^-8 relative) dominates
HALF = (torch.bfloat16, torch.float16)
# The device script's memcheck phase runs the `cuda` parametrisations of the tests and cases marked
# memcheck under compute-sanitizer (`-m "memcheck and gpu and not triton"`): each op once per layout
# (contiguous, storage offset, channels-last C = 1/3/5, odd N, a large batch), ~20 tests.
MEMCHECK = pytest.mark.memcheck


def memcheck_marked(cases, chosen, marks=()):
    """`cases` as parametrize values with `marks`, the `chosen` ones also marked memcheck; every
    chosen case must be in `cases`, so editing a table cannot drop one from the selection unseen."""
    missing = [c for c in chosen if c not in cases]
    assert not missing, f"memcheck cases missing from their table: {missing}"
    return [pytest.param(c, marks=[*marks, MEMCHECK] if c in chosen else list(marks)) for c in cases]


needs_ext = pytest.mark.skipif(not ops.has_extension(), reason="pfgmpp_fast._C is not built")
needs_cuda_kernels = [pytest.mark.gpu, pytest.mark.skipif(not ops.has_cuda_kernels(), reason="no CUDA kernels")]


def device_for(backend):
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def cpp_ops():
    """torch.ops.pfgmpp_fast (the ops are registered when pfgmpp_fast._C loads)."""
    from pfgmpp_fast import _ext  # noqa: F401

    return torch.ops.pfgmpp_fast


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def random_ids(B, seed, device="cpu"):
    """Sample ids spanning both 32-bit halves of the counter."""
    return torch.randint(0, 2**62, (B,), generator=seeded(seed)).to(device)


def in_layout(t, layout):
    """The same values in another memory layout (one of LAYOUTS): contiguous; channels-last;
    strided (every second element of the last dim of a NaN-filled buffer); transposed (the
    same with the last two dims swapped: column-major with gaps); offset / channels_last_offset
    (at storage offset 1, so not 16-byte aligned)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
    if layout == "transposed":
        return in_layout(t.transpose(-1, -2), "strided").transpose(-1, -2)
    if layout in ("offset", "channels_last_offset"):
        flat = torch.full((1 + t.numel(),), float("nan"), dtype=t.dtype, device=t.device)
        if layout == "offset" or t.dim() != 4:
            view = flat[1:].view(t.shape)
        else:
            B, C, H, W = t.shape
            view = flat[1:].view(B, H, W, C).permute(0, 3, 1, 2)
        view.copy_(t)
        return view
    # Non-contiguous: a strided view into a larger buffer (every second element of the last dim).
    big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    big.fill_(float("nan"))
    view = big[..., ::2]
    view.copy_(t)
    return view


def same_format(out, ref):
    """Same memory format (exact strides may differ where both formats coincide, e.g. C == 1)."""
    if out.dim() != 4:
        return out.is_contiguous() == ref.is_contiguous()
    return all(
        out.is_contiguous(memory_format=f) == ref.is_contiguous(memory_format=f)
        for f in (torch.contiguous_format, torch.channels_last)
    )


def rel_err(out, ref):
    """‖out − ref‖/‖ref‖ (0 for empty tensors; an all-zero ref must be matched exactly)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if ref.numel() == 0:
        return 0.0
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def tol_for(dtype):
    return HALF_REL_TOL if dtype in HALF else FP32_REL_TOL


def assert_close_rel(out, ref, name):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != {ref.dtype}"
    if out.numel() == 0:
        return
    assert torch.isfinite(out.double()).all(), f"{name}: non-finite values"
    err = rel_err(out, ref)
    assert err < tol_for(out.dtype), f"{name}: relative error {err:.3g}"


def case_id(case):
    """A short test id for a case tuple."""
    return "-".join(str(v).replace("torch.", "").replace(" ", "") for v in case)
