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
    split_key,
    wants_tiling,
)
from .philox import sample_tile_noise


# N is specialised (N % 16 == 0 proves 16-byte alignment, so loads and stores vectorise); keys,
# streams and blocks per sample are not: new values never recompile.  The same in every kernel.
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
    COMPUTE: tl.constexpr,
    TILED: tl.constexpr,
    BLOCK: tl.constexpr,
    C_PAD: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    b, e, c, hw, mask, g = sample_tile_noise(
        tl.program_id(0), nblk, sid_ptr, N, yHW, k0, k1, stream, TILED, BLOCK, C_PAD, BLOCK_HW
    )
    y_off = element_offsets(b, e, c, hw, N, yC, yHW, yW, y_sb, y_sc, y_sh, y_sw, Y_MODE, TILED)
    y = tl.load(y_ptr + y_off, mask=mask, other=0.0).to(COMPUTE)
    s = tl.load(scale_ptr + b).to(COMPUTE)
    c_in = tl.load(cin_ptr + b).to(COMPUTE)
    x = y + s * g.to(COMPUTE)
    n_off = element_offsets(b, e, c, hw, N, nC, nHW, nW, n_sb, n_sc, n_sh, n_sw, NET_MODE, TILED)
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
        COMPUTE=TL_DTYPE[cd],
        **plan.meta(),
    )
    return net_in, x


register(perturb)
