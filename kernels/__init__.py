"""Triton kernels of pfgmpp_fast (imported as pfgmpp_fast.kernels).

One file per fused op (philox, chi2, perturb, loss, sampler_step): the Triton kernel(s) and a
Python launcher taking the argument list of the matching op in docs/KERNEL_OPS.md.  This module
holds the small helpers they share: key splitting, float64-as-two-float32 scalars and the
description of an image tensor's memory layout.
"""
import numpy as np
import torch

MODE_CONTIGUOUS, MODE_CHANNELS_LAST, MODE_STRIDED = 0, 1, 2
MAX_ELEMENTS_PER_SAMPLE = 2**31 - 1


def split_key(key: int):
    """64-bit Philox key -> (k0, k1) as Python ints (the kernels truncate them to uint32)."""
    key = int(key)
    if not 0 <= key < 2**63:
        raise ValueError(f"key must be an int in [0, 2**63), got {key}")
    return key & 0xFFFFFFFF, key >> 32


def split_f64(value: float):
    """A Python float as hi + lo float32 pair, so float64-state kernels get ~48-bit scalars
    without a host-to-device copy (Triton passes float arguments as float32)."""
    with np.errstate(over="ignore"):
        hi = float(np.float32(value))
        lo = float(np.float32(value - hi)) if abs(hi) != float("inf") else 0.0
    return hi, lo


def launch(kernel):
    """The kernel wrapped for torch.library.triton_op tracing (plain kernel in eager)."""
    try:
        from torch.library import wrap_triton
        return wrap_triton(kernel)
    except (ImportError, RuntimeError, TypeError):
        return kernel


def launch_grid_1d(n_programs: int):
    return (int(n_programs),)


class Layout:
    """How to address element (b, e) of an image tensor, e the logical NCHW flat index.

    The tensor is seen as [B, C, H, W] (fewer dims padded with 1s; more than four dims are
    flattened, copying once if they are not contiguous).  mode is contiguous, dense
    channels-last, or general strides (then the kernel computes c, h, w and uses the strides).
    """

    def __init__(self, t: torch.Tensor):
        B = t.shape[0]
        if t.dim() > 4:
            t = t.reshape(B, -1, 1, 1)  # a view when possible, else one visible copy
        while t.dim() < 4:
            t = t.unsqueeze(-1)
        self.tensor = t
        _, C, H, W = t.shape
        self.C, self.HW, self.W = C, H * W, W
        self.N = C * H * W
        if t.is_contiguous():
            self.mode = MODE_CONTIGUOUS
        elif t.is_contiguous(memory_format=torch.channels_last):
            self.mode = MODE_CHANNELS_LAST
        else:
            self.mode = MODE_STRIDED
        self.strides = tuple(t.stride())

    def args(self):
        return (self.C, self.HW, self.W) + self.strides


def check_sample_size(N: int):
    if N > MAX_ELEMENTS_PER_SAMPLE:
        raise ValueError(f"elements per sample must be < 2**31, got {N}")


class BlockPlan:
    """How a kernel walks one sample.  Flat: BLOCK consecutive logical elements.  Tiled (used
    when a 4-D operand is channels-last and H·W % 4 == 0): a [C_PAD, BLOCK_HW] tile of all
    channels at BLOCK_HW pixels, so channels-last loads and stores are contiguous runs while
    the noise still comes four logical elements per Philox call."""

    def __init__(self, N: int, C: int, HW: int, tiled: bool, cap: int = 1024):
        import triton
        self.tiled = bool(tiled) and HW % 4 == 0 and triton.next_power_of_2(C) <= 64
        if self.tiled:
            self.C_PAD = triton.next_power_of_2(C)
            self.BLOCK_HW = max(4, min(triton.next_power_of_2(HW), max(4, cap // self.C_PAD)))
            self.BLOCK = self.C_PAD * self.BLOCK_HW
            self.nblk = triton.cdiv(HW, self.BLOCK_HW)
        else:
            self.BLOCK = max(4, min(cap, triton.next_power_of_2(max(int(N), 1))))
            self.C_PAD, self.BLOCK_HW = 1, 4
            self.nblk = triton.cdiv(N, self.BLOCK)

    def meta(self):
        return dict(TILED=self.tiled, BLOCK=self.BLOCK, C_PAD=self.C_PAD, BLOCK_HW=self.BLOCK_HW)


def wants_tiling(*layouts) -> bool:
    return any(l is not None and l.mode == MODE_CHANNELS_LAST and l.tensor.dim() == 4 for l in layouts)


FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_per_sample(name: str, t, B: int, device, int_ids: bool = False):
    """A per-sample vector [B] on the images' device (kernels index it by sample)."""
    if t is None or not torch.is_tensor(t):
        raise TypeError(f"{name} must be a tensor of shape [{B}], got {type(t).__name__}")
    if tuple(t.shape) != (B,):
        raise ValueError(f"{name} must have shape [{B}] (one value per sample), got {tuple(t.shape)}")
    if t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device} but the images are on {device}")
    if int_ids and t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 sample ids, got {t.dtype}")
    if not int_ids and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_image(name: str, t):
    if not torch.is_tensor(t) or t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32/float64/bfloat16/float16 tensor, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension, got shape {tuple(t.shape)}")


def check_out_dtype(name: str, dtype):
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of {FLOAT_DTYPES}, got {dtype}")
