"""Per-sample chi-square_D draw on the device: V = 2 Gamma(D/2) by Marsaglia-Tsang in float64.

Attempt a (0..15) uses Philox block a of the sample's counter on the given stream: z = z0 of
the block, acceptance uniform u2; u3 of block 0 boosts shape k < 1 (docs/KERNEL_OPS.md).
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from pfgmpp_fast.reference import CHI2_MAX_ATTEMPTS

from .layout import grid, launch, register, split_f64, split_key, warps_for
from .philox import box_muller, key_words, philox4x32_10, sample_counter, uint_to_unit


# do_not_specialize (layout.py, "Specialisation and tracing"): the batch size, key words and stream.
@triton.jit(do_not_specialize=["B", "k0", "k1", "stream"])
def _chi2_kernel(sid_ptr, out_ptr, B, k0, k1, stream, D_hi, D_lo, BLOCK: tl.constexpr, ATTEMPTS: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < B
    sid_lo, sid_hi = sample_counter(tl.load(sid_ptr + i, mask=mask, other=0))
    kk0, kk1 = key_words(k0, k1)
    st = (sid_lo * 0) + stream.to(tl.uint32)
    k = (tl.cast(D_hi, tl.float64) + tl.cast(D_lo, tl.float64)) * 0.5
    kk = tl.where(k < 1.0, k + 1.0, k)
    d = kk - 1.0 / 3.0
    c = 1.0 / tl.sqrt(9.0 * d)  # float64 sqrt is correctly rounded
    gamma = d
    accepted = sid_lo != sid_lo  # all False
    u3_first = tl.zeros([BLOCK], dtype=tl.float64)
    for a in tl.static_range(ATTEMPTS):
        j = (sid_lo * 0) + a
        x0, x1, x2, x3 = philox4x32_10(j, sid_lo, sid_hi, st, kk0, kk1)
        z, _ = box_muller(uint_to_unit(x0), uint_to_unit(x1))
        z = z.to(tl.float64)
        u2 = uint_to_unit(x2).to(tl.float64)
        if a == 0:
            u3_first = uint_to_unit(x3).to(tl.float64)
        t = 1.0 + c * z
        v = t * t * t
        log_v = tl.log(tl.where(v > 0.0, v, 1.0))
        ok = (v > 0.0) & (tl.log(u2) < 0.5 * z * z + d - d * v + d * log_v) & (~accepted)
        gamma = tl.where(ok, d * v, gamma)
        accepted = accepted | ok
    log_gamma = tl.log(gamma)
    log_gamma = tl.where(k < 1.0, log_gamma + tl.log(u3_first) / k, log_gamma)
    tl.store(out_ptr + i, 2.0 * tl.exp(log_gamma), mask=mask)


def chi2(sample_ids: Tensor, key: int, D: float, stream: int) -> Tensor:
    D = float(D)
    if not (D > 0 and math.isfinite(D)):
        raise ValueError(f"D must be a finite float > 0 for chi2, got {D}")
    B = sample_ids.shape[0]
    out = torch.empty(B, dtype=torch.float64, device=sample_ids.device)
    if B == 0:
        return out
    k0, k1 = split_key(key)
    D_hi, D_lo = split_f64(D)
    BLOCK = max(16, min(256, triton.next_power_of_2(B)))  # one sample per thread (two: over twice the registers)
    launch(_chi2_kernel)[grid(1, triton.cdiv(B, BLOCK))](
        sample_ids.contiguous(),
        out,
        B,
        k0,
        k1,
        stream,
        D_hi,
        D_lo,
        BLOCK=BLOCK,
        ATTEMPTS=CHI2_MAX_ATTEMPTS,
        num_warps=warps_for(BLOCK, 1),
    )
    return out


register(chi2, _chi2_kernel)
