"""Fused perturbation: x = y + scale[b]·g (g regenerated from Philox), net_in = c_in[b]·x.

One pass over y: reads y once, writes the network input in its dtype and memory format
(and x in fp32/fp64 only when asked).  Noise is indexed by the logical NCHW element, so the
result does not depend on the memory format of y or of the output.
"""

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from pfgmpp_fast.reference import compute_dtype

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
    split_key,
    to_compute,
    wants_tiling,
)
from .philox import key_words, program_normals, sample_counter


# do_not_specialize (layout.py, "Specialisation and tracing"): the blocks per sample, key words and stream.
@triton.jit(do_not_specialize=["nblk", "k0", "k1", "stream"])
def _perturb_kernel(
    y_ptr,
    scale_ptr,
    cin_ptr,
    sid_ptr,
    net_ptr,
    x_ptr,
    N,
    nblk,
    k0,
    k1,
    stream,
    yC,
    yHW,
    yW,
    y_sb,
    y_sc,
    y_sh,
    y_sw,
    nC,
    nHW,
    nW,
    n_sb,
    n_sc,
    n_sh,
    n_sw,
    Y_MODE: tl.constexpr,
    NET_MODE: tl.constexpr,
    WRITE_X: tl.constexpr,
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
    s = to_compute(tl.load(scale_ptr + b), IS_F64)
    c_in = to_compute(tl.load(cin_ptr + b), IS_F64)
    if TILED:
        hw0 = blk * BLOCK_HW
        hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = hw < yHW
        if Y_MODE == 1:
            y0, y1, y2, y3 = cl_load(y_ptr, b, N, hw0, yHW, C, BLOCK_HW)
        if NET_MODE == 1:
            n0 = tl.zeros([BLOCK_HW // 4, 4], dtype=net_ptr.dtype.element_ty)
            n1 = n0
            n2 = n0
            n3 = n0
        for c in tl.static_range(C):
            g = program_normals(blk, c, yHW, sid_lo, sid_hi, stream.to(tl.uint32), kk0, kk1, True, BLOCK, BLOCK_HW)
            if Y_MODE == 1:
                y = cl_channel(y0, y1, y2, y3, c, C)
            else:
                y_off = channel_offsets(b, c, hw, N, yHW, yW, y_sb, y_sc, y_sh, y_sw, Y_MODE)
                y = tl.load(y_ptr + y_off, mask=mask, other=0.0)
            x = to_compute(y, IS_F64) + s * to_compute(g, IS_F64)
            net = cast_for_store(c_in * x, net_ptr)
            if NET_MODE == 1:
                n0, n1, n2, n3 = cl_put(n0, n1, n2, n3, net, c, C)
            else:
                n_off = channel_offsets(b, c, hw, N, yHW, nW, n_sb, n_sc, n_sh, n_sw, NET_MODE)
                tl.store(net_ptr + n_off, net, mask=mask)
            if WRITE_X:
                tl.store(x_ptr + channel_offsets(b, c, hw, N, yHW, yW, 0, 0, 0, 0, 0), x, mask=mask)
        if NET_MODE == 1:
            cl_store(net_ptr, n0, n1, n2, n3, b, N, hw0, yHW, C, BLOCK_HW)
    else:
        e = blk * BLOCK + tl.arange(0, BLOCK)
        mask = e < N
        g = program_normals(blk, 0, yHW, sid_lo, sid_hi, stream.to(tl.uint32), kk0, kk1, False, BLOCK, BLOCK_HW)
        y_off = element_offsets(b, e, N, yC, yHW, yW, y_sb, y_sc, y_sh, y_sw, Y_MODE)
        x = to_compute(tl.load(y_ptr + y_off, mask=mask, other=0.0), IS_F64) + s * to_compute(g, IS_F64)
        n_off = element_offsets(b, e, N, nC, nHW, nW, n_sb, n_sc, n_sh, n_sw, NET_MODE)
        tl.store(net_ptr + n_off, cast_for_store(c_in * x, net_ptr), mask=mask)
        if WRITE_X:
            tl.store(x_ptr + b.to(tl.int64) * N + e, x, mask=mask)


def perturb(
    y: Tensor,
    scale: Tensor,
    c_in: Tensor,
    sample_ids: Tensor,
    key: int,
    stream: int,
    out_dtype: torch.dtype,
    channels_last: bool,
    write_x: bool,
) -> Tuple[Tensor, Tensor]:
    check_image("y", y)
    check_out_dtype("out_dtype", out_dtype)
    for name, t in (("scale", scale), ("c_in", c_in)):
        check_per_sample(name, t, y.shape[0], y.device)
    check_per_sample("sample_ids", sample_ids, y.shape[0], y.device, int_ids=True)
    cd = compute_dtype(y)
    net_in = empty_image(y, out_dtype, channels_last)
    x = torch.empty(y.shape if write_x else (0,), dtype=cd, device=y.device)
    B = y.shape[0]
    if B == 0 or y.numel() == 0:
        return net_in, x
    ly, ln = Layout(y), Layout(net_in)
    check_sample_size(ly.N)
    k0, k1 = split_key(key)
    plan = BlockPlan(ly.N, ly.C, ly.HW, wants_tiling(ly, ln))
    launch(_perturb_kernel)[grid(B, plan.nblk)](
        ly.tensor,
        scale.contiguous(),
        c_in.contiguous(),
        sample_ids.contiguous(),
        ln.tensor,
        x if write_x else net_in,
        ly.N,
        plan.nblk,
        k0,
        k1,
        stream,
        *ly.args(),
        *ln.args(),
        Y_MODE=ly.mode,
        NET_MODE=ln.mode,
        WRITE_X=bool(write_x),
        IS_F64=cd == torch.float64,
        **plan.meta(),
    )
    return net_in, x


register(perturb, _perturb_kernel)
