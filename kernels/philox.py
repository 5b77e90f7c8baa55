"""Philox4x32-10 and Box-Muller as Triton device functions, plus the two raw ops
philox4x32 and philox_normal (kernels, launchers, registrations).

Counter layout (docs/KERNEL_OPS.md): (block j, sample_id low 32, sample_id high 32, stream),
key (k0, k1) = (key low 32, key high 32).  Element e of a sample uses block e // 4, lane e % 4,
so one Philox call feeds four consecutive elements: `normal_block` interleaves them.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .layout import grid, launch, register, split_key, warps_for

MAX_NORMALS_PER_SAMPLE = 2**34  # block index e // 4 is a 32-bit counter word (the C++ op's bound)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Random123 rounds on uint32 tensors (c0..c3 same shape; k0, k1 uint32 scalars).
    Multipliers M0, M1 and key bumps W0, W1 as in docs/KERNEL_OPS.md."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def uint_to_unit(x):
    """(x >> 8) + 0.5, times 2^-24, in float32: a uniform in (0, 1] (1.0 after rounding)."""
    return ((x >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08


@triton.jit
def box_muller(u0, u1):
    r = tl.sqrt_rn(-2.0 * tl.log(u0))
    theta = 6.2831855 * u1
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def sample_counter(sid):
    """int64 sample id -> (low 32, high 32) as uint32."""
    return sid.to(tl.uint32), (sid >> 32).to(tl.uint32)


@triton.jit
def normal4(j, sid_lo, sid_hi, stream, k0, k1):
    """The four normals of Philox block(s) j (uint32 tensor) of one sample and stream."""
    zero = j * 0
    c0, c1, c2, c3 = philox4x32_10(j, zero + sid_lo, zero + sid_hi, zero + stream, k0, k1)
    z0, z1 = box_muller(uint_to_unit(c0), uint_to_unit(c1))
    z2, z3 = box_muller(uint_to_unit(c2), uint_to_unit(c3))
    return z0, z1, z2, z3


@triton.jit
def normal_block(j_start, sid_lo, sid_hi, stream, k0, k1, BLOCK: tl.constexpr):
    """float32 normals for elements 4*j_start .. 4*j_start + BLOCK - 1 (BLOCK % 4 == 0;
    j_start int32 or int64, the block index itself < 2^32)."""
    j = (j_start + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    z0, z1, z2, z3 = normal4(j, sid_lo, sid_hi, stream, k0, k1)
    # join puts the new axis last: [j, a, b] = (z0, z1 | z2, z3)[a][b] -> element order z0 z1 z2 z3
    z = tl.join(tl.join(z0, z2), tl.join(z1, z3))
    return tl.reshape(z, [BLOCK])


@triton.jit
def program_normals(
    blk,
    c: tl.constexpr,
    HW,
    sid_lo,
    sid_hi,
    stream,
    k0,
    k1,
    TILED: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """The normals of program block blk: tiled, channel c at its BLOCK_HW pixels (logical
    elements c·HW + hw, HW % 4 == 0, so four pixels share a Philox call); flat, BLOCK
    consecutive elements."""
    if TILED:
        return normal_block(c * (HW // 4) + blk * (BLOCK_HW // 4), sid_lo, sid_hi, stream, k0, k1, BLOCK_HW)
    else:
        return normal_block(blk * (BLOCK // 4), sid_lo, sid_hi, stream, k0, k1, BLOCK)


@triton.jit
def key_words(k0, k1):
    return k0.to(tl.uint32), k1.to(tl.uint32)


# do_not_specialize (layout.py, "Specialisation and tracing"): the counter count and key words.
@triton.jit(do_not_specialize=["M", "k0", "k1"])
def _philox_raw_kernel(ctr_ptr, out_ptr, M, k0, k1, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < M
    c0 = tl.load(ctr_ptr + 4 * i + 0, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(ctr_ptr + 4 * i + 1, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(ctr_ptr + 4 * i + 2, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(ctr_ptr + 4 * i + 3, mask=mask, other=0).to(tl.uint32)
    kk0, kk1 = key_words(k0, k1)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, c2, c3, kk0, kk1)
    tl.store(out_ptr + 4 * i + 0, x0.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * i + 1, x1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * i + 2, x2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * i + 3, x3.to(tl.int64), mask=mask)


# do_not_specialize (layout.py, "Specialisation and tracing"): the blocks per sample, key words and stream.
@triton.jit(do_not_specialize=["nblk", "k0", "k1", "stream"])
def _philox_normal_kernel(sid_ptr, out_ptr, n, nblk, k0, k1, stream, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // nblk
    blk = (pid - b * nblk).to(tl.int64)  # n may reach 2^34: element indices are int64
    sid_lo, sid_hi = sample_counter(tl.load(sid_ptr + b))
    kk0, kk1 = key_words(k0, k1)
    z = normal_block(blk * (BLOCK // 4), sid_lo, sid_hi, stream.to(tl.uint32), kk0, kk1, BLOCK)
    e = blk * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + b.to(tl.int64) * n + e, z, mask=e < n)


def block_for(n, cap=1024):
    """Power-of-two block >= 4 covering n up to cap (small blocks keep the interpreter fast)."""
    return max(4, min(cap, triton.next_power_of_2(max(int(n), 1))))


def philox4x32(counter: Tensor, key: int) -> Tensor:
    out = torch.empty_like(counter, dtype=torch.int64)
    M = counter.shape[0]
    if M == 0:
        return out
    ctr = counter.to(torch.int64).contiguous()
    k0, k1 = split_key(key)
    BLOCK = block_for(M, 256)
    launch(_philox_raw_kernel)[grid(1, triton.cdiv(M, BLOCK))](
        ctr, out, M, k0, k1, BLOCK=BLOCK, num_warps=warps_for(BLOCK)
    )
    return out


def philox_normal(sample_ids: Tensor, key: int, n: int, stream: int) -> Tensor:
    if not 0 <= n <= MAX_NORMALS_PER_SAMPLE:
        raise ValueError(f"philox_normal: n must be in [0, 2^34], got {n}")
    B = sample_ids.shape[0]
    out = torch.empty((B, n), dtype=torch.float32, device=sample_ids.device)
    if B == 0 or n == 0:
        return out
    k0, k1 = split_key(key)
    BLOCK = block_for(n)
    nblk = triton.cdiv(n, BLOCK)
    launch(_philox_normal_kernel)[grid(B, nblk)](
        sample_ids.contiguous(), out, n, nblk, k0, k1, stream, BLOCK=BLOCK, num_warps=warps_for(BLOCK)
    )
    return out


register(philox4x32, _philox_raw_kernel)
register(philox_normal, _philox_normal_kernel)
