"""Fused loss forward + backward on the raw network output F.

T = ((1 - c_skip)·y - c_skip·scale·g) / c_out with g regenerated from Philox (never stored),
per-sample Σ (F - T)² (float32 partial sums per block, summed per sample afterwards, so the
result is deterministic) and grad_F = grad_scale·2(F - T) in F's dtype and memory format.
"""

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .layout import (
    BlockPlan,
    Layout,
    cast_for_store,
    channel_offsets,
    check_image,
    check_per_sample,
    check_sample_size,
    cl_channel,
    cl_load,
    cl_put,
    cl_store,
    element_offsets,
    grid,
    launch,
    register,
    split_key,
    to_compute,
    wants_tiling,
)
from .philox import key_words, program_normals, sample_counter


@triton.jit
def _residual(F, y, g, c_skip, c_out, s, mask):
    """F - T with T = ((1 - c_skip)·y - c_skip·s·g) / c_out, 0 outside the mask."""
    target = ((1.0 - c_skip) * y - c_skip * s * g) / c_out
    return tl.where(mask, F - target, 0.0)


# do_not_specialize (layout.py, "Specialisation and tracing"): the blocks per sample, key words and stream.
@triton.jit(do_not_specialize=["nblk", "k0", "k1", "stream"])
def _loss_kernel(
    F_ptr,
    y_ptr,
    scale_ptr,
    cskip_ptr,
    cout_ptr,
    sid_ptr,
    grad_ptr,
    part_ptr,
    N,
    nblk,
    k0,
    k1,
    stream,
    grad_scale,
    fC,
    fHW,
    fW,
    f_sb,
    f_sc,
    f_sh,
    f_sw,
    yC,
    yHW,
    yW,
    y_sb,
    y_sc,
    y_sh,
    y_sw,
    gC,
    gHW,
    gW,
    g_sb,
    g_sc,
    g_sh,
    g_sw,
    F_MODE: tl.constexpr,
    Y_MODE: tl.constexpr,
    G_MODE: tl.constexpr,
    IS_F64: tl.constexpr,
    TILED: tl.constexpr,
    BLOCK: tl.constexpr,
    C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // nblk
    blk = pid - b * nblk
    sid_lo, sid_hi = sample_counter(tl.load(sid_ptr + b))  # loaded here: layout.py, "Specialisation and tracing"
    kk0, kk1 = key_words(k0, k1)
    st = stream.to(tl.uint32)
    c_skip = to_compute(tl.load(cskip_ptr + b), IS_F64)
    c_out = to_compute(tl.load(cout_ptr + b), IS_F64)
    s = to_compute(tl.load(scale_ptr + b), IS_F64)
    two_gs = to_compute(grad_scale, IS_F64) * 2.0
    if TILED:
        hw0 = blk * BLOCK_HW
        hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = hw < yHW
        if F_MODE == 1:
            f0, f1, f2, f3 = cl_load(F_ptr, b, N, hw0, yHW, C, BLOCK_HW)
        if Y_MODE == 1:
            y0, y1, y2, y3 = cl_load(y_ptr, b, N, hw0, yHW, C, BLOCK_HW)
        if G_MODE == 1:
            r0 = tl.zeros([BLOCK_HW // 4, 4], dtype=grad_ptr.dtype.element_ty)
            r1 = r0
            r2 = r0
            r3 = r0
        total = 0.0
        for c in tl.static_range(C):
            g = program_normals(blk, c, yHW, sid_lo, sid_hi, st, kk0, kk1, True, BLOCK, BLOCK_HW)
            if F_MODE == 1:
                F = cl_channel(f0, f1, f2, f3, c, C)
            else:
                F = tl.load(
                    F_ptr + channel_offsets(b, c, hw, N, yHW, fW, f_sb, f_sc, f_sh, f_sw, F_MODE), mask=mask, other=0.0
                )
            if Y_MODE == 1:
                y = cl_channel(y0, y1, y2, y3, c, C)
            else:
                y = tl.load(
                    y_ptr + channel_offsets(b, c, hw, N, yHW, yW, y_sb, y_sc, y_sh, y_sw, Y_MODE), mask=mask, other=0.0
                )
            y = to_compute(y, IS_F64)
            diff = _residual(to_compute(F, IS_F64), y, to_compute(g, IS_F64), c_skip, c_out, s, mask)
            total += tl.sum(diff * diff, axis=0).to(tl.float32)
            grad = cast_for_store(two_gs * diff, grad_ptr)
            if G_MODE == 1:
                r0, r1, r2, r3 = cl_put(r0, r1, r2, r3, grad, c, C)
            else:
                g_off = channel_offsets(b, c, hw, N, yHW, gW, g_sb, g_sc, g_sh, g_sw, G_MODE)
                tl.store(grad_ptr + g_off, grad, mask=mask)
        if G_MODE == 1:
            cl_store(grad_ptr, r0, r1, r2, r3, b, N, hw0, yHW, C, BLOCK_HW)
        tl.store(part_ptr + pid.to(tl.int64), total)
    else:
        e = blk * BLOCK + tl.arange(0, BLOCK)
        mask = e < N
        g = program_normals(blk, 0, yHW, sid_lo, sid_hi, st, kk0, kk1, False, BLOCK, BLOCK_HW)
        y = tl.load(y_ptr + element_offsets(b, e, N, yC, yHW, yW, y_sb, y_sc, y_sh, y_sw, Y_MODE), mask=mask, other=0.0)
        F = tl.load(F_ptr + element_offsets(b, e, N, fC, fHW, fW, f_sb, f_sc, f_sh, f_sw, F_MODE), mask=mask, other=0.0)
        diff = _residual(to_compute(F, IS_F64), to_compute(y, IS_F64), to_compute(g, IS_F64), c_skip, c_out, s, mask)
        tl.store(part_ptr + pid.to(tl.int64), tl.sum(diff * diff, axis=0).to(tl.float32))
        g_off = element_offsets(b, e, N, gC, gHW, gW, g_sb, g_sc, g_sh, g_sw, G_MODE)
        tl.store(grad_ptr + g_off, cast_for_store(two_gs * diff, grad_ptr), mask=mask)


def loss_fwd_bwd(
    F: Tensor,
    y: Tensor,
    scale: Tensor,
    c_skip: Tensor,
    c_out: Tensor,
    sample_ids: Tensor,
    key: int,
    stream: int,
    grad_scale: float,
) -> Tuple[Tensor, Tensor]:
    check_image("F", F)
    check_image("y", y)
    if F.shape != y.shape or F.device != y.device:
        raise ValueError(
            f"F must have y's shape {tuple(y.shape)} and device {y.device}, got {tuple(F.shape)} on {F.device}"
        )
    B = y.shape[0]
    for name, t in (("scale", scale), ("c_skip", c_skip), ("c_out", c_out)):
        check_per_sample(name, t, B, y.device)
    check_per_sample("sample_ids", sample_ids, B, y.device, int_ids=True)
    grad = torch.empty_like(F)  # keeps F's memory format when F is dense
    if B == 0 or y.numel() == 0:
        return torch.zeros(B, dtype=torch.float32, device=y.device), grad
    cd = torch.float64 if torch.float64 in (F.dtype, y.dtype) else torch.float32
    lf, ly, lg = Layout(F), Layout(y), Layout(grad)
    check_sample_size(ly.N)
    k0, k1 = split_key(key)
    plan = BlockPlan(ly.N, ly.C, ly.HW, wants_tiling(lf, ly, lg))
    nblk = plan.nblk
    partial = torch.empty(B * nblk, dtype=torch.float32, device=y.device)
    launch(_loss_kernel)[grid(B, nblk)](
        lf.tensor,
        ly.tensor,
        scale.contiguous(),
        c_skip.contiguous(),
        c_out.contiguous(),
        sample_ids.contiguous(),
        lg.tensor,
        partial,
        ly.N,
        nblk,
        k0,
        k1,
        stream,
        float(grad_scale),
        *lf.args(),
        *ly.args(),
        *lg.args(),
        F_MODE=lf.mode,
        Y_MODE=ly.mode,
        G_MODE=lg.mode,
        IS_F64=cd == torch.float64,
        **plan.meta(),
    )
    return partial.view(B, nblk).sum(dim=1), grad


register(loss_fwd_bwd, _loss_kernel)
