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
    TL_DTYPE,
    BlockPlan,
    Layout,
    cast_for_store,
    check_image,
    check_per_sample,
    check_sample_size,
    element_offsets,
    grid,
    launch,
    register,
    split_key,
    tile_sum,
    wants_tiling,
)
from .philox import sample_tile_noise


@triton.jit(do_not_specialize=["nblk", "k0", "k1", "stream", "grad_scale"])
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
    COMPUTE: tl.constexpr,
    TILED: tl.constexpr,
    BLOCK: tl.constexpr,
    C_PAD: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0)
    b, e, c, hw, mask, g = sample_tile_noise(pid, nblk, sid_ptr, N, yHW, k0, k1, stream, TILED, BLOCK, C_PAD, BLOCK_HW)
    y = tl.load(
        y_ptr + element_offsets(b, e, c, hw, N, yC, yHW, yW, y_sb, y_sc, y_sh, y_sw, Y_MODE, TILED),
        mask=mask,
        other=0.0,
    ).to(COMPUTE)
    F = tl.load(
        F_ptr + element_offsets(b, e, c, hw, N, fC, fHW, fW, f_sb, f_sc, f_sh, f_sw, F_MODE, TILED),
        mask=mask,
        other=0.0,
    ).to(COMPUTE)
    c_skip = tl.load(cskip_ptr + b).to(COMPUTE)
    c_out = tl.load(cout_ptr + b).to(COMPUTE)
    s = tl.load(scale_ptr + b).to(COMPUTE)
    target = ((1.0 - c_skip) * y - c_skip * s * g.to(COMPUTE)) / c_out
    diff = tl.where(mask, F - target, 0.0)
    tl.store(part_ptr + pid.to(tl.int64), tile_sum(diff * diff, TILED).to(tl.float32))
    grad = (tl.cast(grad_scale, COMPUTE) * 2.0) * diff
    tl.store(
        grad_ptr + element_offsets(b, e, c, hw, N, gC, gHW, gW, g_sb, g_sc, g_sh, g_sw, G_MODE, TILED),
        cast_for_store(grad, grad_ptr),
        mask=mask,
    )


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
        COMPUTE=TL_DTYPE[cd],
        **plan.meta(),
    )
    return partial.view(B, nblk).sum(dim=1), grad


register(loss_fwd_bwd)
