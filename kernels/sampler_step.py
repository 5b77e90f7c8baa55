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
    BlockPlan,
    Layout,
    cast_for_store,
    channel_offsets,
    check_image,
    check_out_dtype,
    check_per_sample,
    check_sample_size,
    cl_channel,
    cl_load,
    cl_put,
    cl_store,
    element_offsets,
    empty_image,
    grid,
    launch,
    register,
    split_f64,
    split_key,
    to_compute,
    wants_tiling,
)
from .philox import key_words, program_normals, sample_counter


@triton.jit
def _scalar(hi, lo, IS_F64: tl.constexpr):
    if IS_F64:
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return tl.cast(hi, tl.float32)


@triton.jit
def _advance(
    x,
    b0,
    F,
    blk,
    c: tl.constexpr,
    HW,
    sid_lo,
    sid_hi,
    alpha_stream,
    churn_stream,
    k0,
    k1,
    A,
    Bf,
    h1,
    h2,
    a_s,
    c_s,
    HAS_F: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    HAS_CHURN: tl.constexpr,
    TILED: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """(y1, y2) of the elements a program block holds (channel c when tiled)."""
    if HAS_F:
        d = A * x + Bf * F
        y1 = b0 + h1 * d
        y2 = b0 + h2 * d
    else:
        y1 = b0
        y2 = b0
    if HAS_ALPHA:
        eps = program_normals(blk, c, HW, sid_lo, sid_hi, alpha_stream, k0, k1, TILED, BLOCK, BLOCK_HW)
        y1 = y1 + a_s * eps.to(y1.dtype)
    if HAS_CHURN:
        eps = program_normals(blk, c, HW, sid_lo, sid_hi, churn_stream, k0, k1, TILED, BLOCK, BLOCK_HW)
        y1 = y1 + c_s * eps.to(y1.dtype)
    return y1, y2


# do_not_specialize (layout.py, "Specialisation and tracing"): the blocks per sample, key words and streams.
@triton.jit(do_not_specialize=["nblk", "k0", "k1", "alpha_stream", "churn_stream"])
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
    a_st = alpha_stream.to(tl.uint32)
    c_st = churn_stream.to(tl.uint32)
    A = _scalar(A_hi, A_lo, IS_F64)
    Bf = _scalar(B_hi, B_lo, IS_F64)
    h1 = _scalar(h1_hi, h1_lo, IS_F64)
    h2 = _scalar(h2_hi, h2_lo, IS_F64)
    a_s = _scalar(as_hi, as_lo, IS_F64)
    c_s = _scalar(cs_hi, cs_lo, IS_F64)
    ci = _scalar(ci_hi, ci_lo, IS_F64)
    if TILED:  # geometry (C, HW, W) from x, so the tiling and the noise index agree
        hw0 = blk * BLOCK_HW
        hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = hw < nHW
        if HAS_F and F_MODE == 1:
            f0, f1, f2, f3 = cl_load(F_ptr, b, N, hw0, nHW, C, BLOCK_HW)
        if HAS_NET and NET_MODE == 1:
            n0 = tl.zeros([BLOCK_HW // 4, 4], dtype=net_ptr.dtype.element_ty)
            n1 = n0
            n2 = n0
            n3 = n0
        for c in tl.static_range(C):
            state_off = channel_offsets(b, c, hw, N, nHW, nW, 0, 0, 0, 0, 0)
            x = to_compute(tl.load(x_ptr + state_off, mask=mask, other=0.0), IS_F64)
            b0 = x
            if HAS_BASE:
                b0 = to_compute(tl.load(base_ptr + state_off, mask=mask, other=0.0), IS_F64)
            F = x
            if HAS_F:
                if F_MODE == 1:
                    F = cl_channel(f0, f1, f2, f3, c, C)
                else:
                    f_off = channel_offsets(b, c, hw, N, nHW, fW, f_sb, f_sc, f_sh, f_sw, F_MODE)
                    F = tl.load(F_ptr + f_off, mask=mask, other=0.0)
                F = to_compute(F, IS_F64)
            y1, y2 = _advance(
                x,
                b0,
                F,
                blk,
                c,
                nHW,
                sid_lo,
                sid_hi,
                a_st,
                c_st,
                kk0,
                kk1,
                A,
                Bf,
                h1,
                h2,
                a_s,
                c_s,
                HAS_F,
                HAS_ALPHA,
                HAS_CHURN,
                True,
                BLOCK,
                BLOCK_HW,
            )
            tl.store(y1_ptr + state_off, y1, mask=mask)
            if HAS_Y2:
                tl.store(y2_ptr + state_off, y2, mask=mask)
            if HAS_NET:
                net = cast_for_store(ci * y1, net_ptr)
                if NET_MODE == 1:
                    n0, n1, n2, n3 = cl_put(n0, n1, n2, n3, net, c, C)
                else:
                    n_off = channel_offsets(b, c, hw, N, nHW, nW, n_sb, n_sc, n_sh, n_sw, NET_MODE)
                    tl.store(net_ptr + n_off, net, mask=mask)
        if HAS_NET and NET_MODE == 1:
            cl_store(net_ptr, n0, n1, n2, n3, b, N, hw0, nHW, C, BLOCK_HW)
    else:
        e = blk * BLOCK + tl.arange(0, BLOCK)
        mask = e < N
        state_off = b.to(tl.int64) * N + e
        x = to_compute(tl.load(x_ptr + state_off, mask=mask, other=0.0), IS_F64)
        b0 = x
        if HAS_BASE:
            b0 = to_compute(tl.load(base_ptr + state_off, mask=mask, other=0.0), IS_F64)
        F = x
        if HAS_F:
            f_off = element_offsets(b, e, N, fC, fHW, fW, f_sb, f_sc, f_sh, f_sw, F_MODE)
            F = to_compute(tl.load(F_ptr + f_off, mask=mask, other=0.0), IS_F64)
        y1, y2 = _advance(
            x,
            b0,
            F,
            blk,
            0,
            nHW,
            sid_lo,
            sid_hi,
            a_st,
            c_st,
            kk0,
            kk1,
            A,
            Bf,
            h1,
            h2,
            a_s,
            c_s,
            HAS_F,
            HAS_ALPHA,
            HAS_CHURN,
            False,
            BLOCK,
            BLOCK_HW,
        )
        tl.store(y1_ptr + state_off, y1, mask=mask)
        if HAS_Y2:
            tl.store(y2_ptr + state_off, y2, mask=mask)
        if HAS_NET:
            n_off = element_offsets(b, e, N, nC, nHW, nW, n_sb, n_sc, n_sh, n_sw, NET_MODE)
            tl.store(net_ptr + n_off, cast_for_store(ci * y1, net_ptr), mask=mask)


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
        IS_F64=sd == torch.float64,
        **plan.meta(),
    )
    return y1, y2, net_in


register(sampler_update, _sampler_kernel)
