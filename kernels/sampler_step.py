"""Fused sampler update (both Heun stages and the Euler step, with the step's noise).

d = A·x + Bf·F;  y1 = base + h1·d + alpha_scale·ε_α + churn_scale·ε_c;  y2 = base + h2·d;
net_in = c_in_next·y1 in the network dtype / memory format.  State (x, base, y1, y2) is fp32
or fp64 contiguous; F any dtype and layout.  Scalars travel as hi + lo float32 pairs so the
fp64 state keeps ~48-bit coefficients (Triton passes Python floats as float32).
"""

import math
from typing import Optional, Tuple

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
    check_out_dtype,
    check_per_sample,
    check_sample_size,
    element_offsets,
    empty_image,
    grid,
    launch,
    register,
    split_f64,
    split_key,
    tile_elements,
    wants_tiling,
)
from .philox import key_words, sample_counter, tile_normals


@triton.jit
def _scalar(hi, lo, COMPUTE: tl.constexpr):
    if COMPUTE == tl.float64:
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return tl.cast(hi, tl.float32)


@triton.jit(
    do_not_specialize=[
        "nblk",
        "k0",
        "k1",
        "alpha_stream",
        "churn_stream",
        "A_hi",
        "A_lo",
        "B_hi",
        "B_lo",
        "h1_hi",
        "h1_lo",
        "h2_hi",
        "h2_lo",
        "as_hi",
        "as_lo",
        "cs_hi",
        "cs_lo",
        "ci_hi",
        "ci_lo",
    ]
)
def _sampler_kernel(
    x_ptr,
    F_ptr,
    base_ptr,
    sid_ptr,
    y1_ptr,
    y2_ptr,
    net_ptr,
    N,
    nblk,
    k0,
    k1,
    alpha_stream,
    churn_stream,
    A_hi,
    A_lo,
    B_hi,
    B_lo,
    h1_hi,
    h1_lo,
    h2_hi,
    h2_lo,
    as_hi,
    as_lo,
    cs_hi,
    cs_lo,
    ci_hi,
    ci_lo,
    fC,
    fHW,
    fW,
    f_sb,
    f_sc,
    f_sh,
    f_sw,
    nC,
    nHW,
    nW,
    n_sb,
    n_sc,
    n_sh,
    n_sw,
    HAS_F: tl.constexpr,
    HAS_BASE: tl.constexpr,
    HAS_Y2: tl.constexpr,
    HAS_NET: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    HAS_CHURN: tl.constexpr,
    F_MODE: tl.constexpr,
    NET_MODE: tl.constexpr,
    COMPUTE: tl.constexpr,
    TILED: tl.constexpr,
    BLOCK: tl.constexpr,
    C_PAD: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // nblk
    blk = pid - b * nblk
    e, c, hw, mask = tile_elements(blk, N, nHW, TILED, BLOCK, C_PAD, BLOCK_HW)
    state_off = b.to(tl.int64) * N + e
    x = tl.load(x_ptr + state_off, mask=mask, other=0.0).to(COMPUTE)
    if HAS_BASE:
        b0 = tl.load(base_ptr + state_off, mask=mask, other=0.0).to(COMPUTE)
    else:
        b0 = x
    if HAS_F:
        F = tl.load(
            F_ptr + element_offsets(b, e, c, hw, N, fC, fHW, fW, f_sb, f_sc, f_sh, f_sw, F_MODE, TILED),
            mask=mask,
            other=0.0,
        ).to(COMPUTE)
        d = _scalar(A_hi, A_lo, COMPUTE) * x + _scalar(B_hi, B_lo, COMPUTE) * F
        y1 = b0 + _scalar(h1_hi, h1_lo, COMPUTE) * d
    else:
        y1 = b0
    if HAS_ALPHA or HAS_CHURN:
        sid_lo, sid_hi = sample_counter(tl.load(sid_ptr + b))
        kk0, kk1 = key_words(k0, k1)
        if HAS_ALPHA:
            eps = tile_normals(
                blk, nHW, sid_lo, sid_hi, alpha_stream.to(tl.uint32), kk0, kk1, TILED, BLOCK, C_PAD, BLOCK_HW
            )
            y1 = y1 + _scalar(as_hi, as_lo, COMPUTE) * eps.to(COMPUTE)
        if HAS_CHURN:
            eps = tile_normals(
                blk, nHW, sid_lo, sid_hi, churn_stream.to(tl.uint32), kk0, kk1, TILED, BLOCK, C_PAD, BLOCK_HW
            )
            y1 = y1 + _scalar(cs_hi, cs_lo, COMPUTE) * eps.to(COMPUTE)
    tl.store(y1_ptr + state_off, y1, mask=mask)
    if HAS_Y2:
        if HAS_F:
            y2 = b0 + _scalar(h2_hi, h2_lo, COMPUTE) * d
        else:
            y2 = b0
        tl.store(y2_ptr + state_off, y2, mask=mask)
    if HAS_NET:
        n_off = element_offsets(b, e, c, hw, N, nC, nHW, nW, n_sb, n_sc, n_sh, n_sw, NET_MODE, TILED)
        net = _scalar(ci_hi, ci_lo, COMPUTE) * y1
        tl.store(net_ptr + n_off, cast_for_store(net, net_ptr), mask=mask)


def sampler_update(
    x: Tensor,
    F: Optional[Tensor],
    base: Optional[Tensor],
    A: float,
    Bf: float,
    h1: float,
    h2: Optional[float],
    sample_ids: Tensor,
    key: int,
    alpha_scale: float,
    alpha_stream: int,
    churn_scale: float,
    churn_stream: int,
    c_in_next: Optional[float],
    net_dtype: torch.dtype,
    channels_last: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    sd = x.dtype
    if sd not in (torch.float32, torch.float64):
        raise TypeError(f"x (sampler state) must be float32 or float64, got {sd}")
    has_f, has_base = F is not None, base is not None
    has_y2, has_net = h2 is not None, c_in_next is not None
    for name, v in (("h2", h2), ("c_in_next", c_in_next)):
        if v is not None and not math.isfinite(v):
            raise ValueError(f"sampler_update: {name} must be finite or None, got {v}")
    x = x.contiguous()
    if has_base:
        if base.shape != x.shape or base.dtype != sd:
            raise ValueError(f"base must match x ({tuple(x.shape)}, {sd}), got {tuple(base.shape)}, {base.dtype}")
        base = base.contiguous()
    if has_f:
        check_image("F", F)
        if F.shape != x.shape or F.device != x.device:
            raise ValueError(
                f"F must have x's shape {tuple(x.shape)} and device {x.device}, got {tuple(F.shape)} on {F.device}"
            )
    check_out_dtype("net_dtype", net_dtype)
    check_per_sample("sample_ids", sample_ids, x.shape[0], x.device, int_ids=True)
    y1 = torch.empty_like(x)
    y2 = torch.empty_like(x) if has_y2 else torch.empty(0, dtype=sd, device=x.device)
    net_in = empty_image(x, net_dtype, channels_last) if has_net else torch.empty(0, dtype=net_dtype, device=x.device)
    B = x.shape[0]
    if B == 0 or x.numel() == 0:
        return y1, y2, net_in
    N = x.numel() // B
    check_sample_size(N)
    lx = Layout(x)
    lf = Layout(F) if has_f else lx
    ln = Layout(net_in) if has_net else lx
    # geometry (C, HW, W) always from x so the tiling and the noise index agree
    ln_args = (lx.C, lx.HW, lx.W) + ln.strides
    plan = BlockPlan(N, lx.C, lx.HW, wants_tiling(lf if has_f else None, ln if has_net else None))
    nblk = plan.nblk
    k0, k1 = split_key(key)
    scalars = [
        split_f64(0.0 if v is None else v)  # None: the kernel does not read it
        for v in (A, Bf, h1, h2, alpha_scale, churn_scale, c_in_next)
    ]
    flat = [p for pair in scalars for p in pair]
    launch(_sampler_kernel)[grid(B, nblk)](
        x,
        lf.tensor,
        base if has_base else x,
        sample_ids.contiguous(),
        y1,
        y2 if has_y2 else y1,
        ln.tensor if has_net else y1,
        N,
        nblk,
        k0,
        k1,
        int(alpha_stream),
        int(churn_stream),
        *flat,
        *lf.args(),
        *ln_args,
        HAS_F=has_f,
        HAS_BASE=has_base,
        HAS_Y2=has_y2,
        HAS_NET=has_net,
        HAS_ALPHA=alpha_scale != 0,
        HAS_CHURN=churn_scale != 0,
        F_MODE=lf.mode,
        NET_MODE=ln.mode,
        COMPUTE=TL_DTYPE[sd],
        **plan.meta(),
    )
    return y1, y2, net_in


register(sampler_update)
