"""What the Triton op files share: argument splitting, memory layouts, tiling, launch and
registration.

Host side: 64-bit keys and float64 scalars as 32-bit kernel arguments, the description of an
image tensor's memory layout (Layout), how a program walks one sample (BlockPlan) and the
tensor checks of the launchers.  Device side: the memory offsets of logical NCHW elements in
each layout, the element indices of a flat or tiled block, and casts for stores.
"""

import numpy as np
import torch
import triton
import triton.language as tl

MODE_CONTIGUOUS, MODE_CHANNELS_LAST, MODE_STRIDED = 0, 1, 2
MAX_ELEMENTS_PER_SAMPLE = 2**31 - 1
MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on grid dimension x
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


def register(fn):
    """Register a launcher as the op pfgmpp_fast_triton::<its name> (schema from its
    annotations), so torch.compile sees through it to the Triton kernel."""
    torch.library.triton_op(f"pfgmpp_fast_triton::{fn.__name__}", fn, mutates_args=())
    return fn


def launch(kernel):
    """The kernel wrapped for torch.library.triton_op tracing (plain kernel in eager)."""
    try:
        from torch.library import wrap_triton

        return wrap_triton(kernel)
    except (ImportError, RuntimeError, TypeError):
        return kernel


# Warps per launch (docs/KERNEL_OPS.md, "Triton launch configuration"): four elements per
# thread keep one 128-bit access per fp32 operand and thread and far fewer registers than
# eight.  `python -m pfgmpp_fast.kernels.aot_check` prints each launch's registers;
# tests/test_triton_aot.py bounds them.
ELEMENTS_PER_THREAD = 4


def warps_for(block: int, per_thread: int = ELEMENTS_PER_THREAD) -> int:
    """num_warps giving each thread `per_thread` elements of a block (1 to 8 warps)."""
    return max(1, min(8, block // (32 * per_thread)))


def grid(B: int, nblk: int):
    """B · nblk programs (one per sample and block) in grid dimension x."""
    n = int(B) * int(nblk)
    if n > MAX_PROGRAMS:
        raise ValueError(
            f"B * blocks per sample = {B} * {nblk} = {n} programs exceeds the grid limit 2**31 - 1; split the batch"
        )
    return (n,)


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


class BlockPlan:
    """How a kernel walks one sample.  Flat: BLOCK consecutive logical elements.  Tiled (used
    when a 4-D operand is channels-last and H·W % 4 == 0): a [C_PAD, BLOCK_HW] tile of all
    channels at BLOCK_HW pixels, so channels-last loads and stores are contiguous runs while
    the noise still comes four logical elements per Philox call."""

    def __init__(self, N: int, C: int, HW: int, tiled: bool, cap: int = 1024):
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
        self.num_warps = warps_for(self.BLOCK)

    def meta(self):
        return dict(
            TILED=self.tiled, BLOCK=self.BLOCK, C_PAD=self.C_PAD, BLOCK_HW=self.BLOCK_HW, num_warps=self.num_warps
        )


def wants_tiling(*layouts) -> bool:
    return any(l is not None and l.mode == MODE_CHANNELS_LAST and l.tensor.dim() == 4 for l in layouts)


def empty_image(like: torch.Tensor, dtype, channels_last: bool):
    """Contiguous, or channels-last with the strides `.contiguous(memory_format=channels_last)`
    gives (which keeps NCHW strides when C == 1 or H == W == 1, where both formats agree)."""
    out = torch.empty(like.shape, dtype=dtype, device=like.device)
    if channels_last and like.dim() == 4 and not out.is_contiguous(memory_format=torch.channels_last):
        out = torch.empty(like.shape, dtype=dtype, device=like.device, memory_format=torch.channels_last)
    return out


# ---------------------------------------------------------------------------------------
# Launcher argument checks (the ops are public: torch.ops.pfgmpp_fast_triton.*)


def check_sample_size(N: int):
    if N > MAX_ELEMENTS_PER_SAMPLE:
        raise ValueError(f"elements per sample must be < 2**31, got {N}")


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
        raise TypeError(
            f"{name} must be a float32/float64/bfloat16/float16 tensor, got {getattr(t, 'dtype', type(t).__name__)}"
        )
    if t.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension, got shape {tuple(t.shape)}")


def check_out_dtype(name: str, dtype):
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of {FLOAT_DTYPES}, got {dtype}")


# ---------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def element_offsets(b, e, c, hw, N, C, HW, W, sb, sc, sh, sw, MODE: tl.constexpr, TILED: tl.constexpr):
    """Memory offsets (int64) of logical elements e of sample b for a layout MODE.  Tiled
    programs pass the channel c and pixel hw of e, which saves the integer divisions."""
    b64 = b.to(tl.int64)
    if MODE == 0:  # contiguous
        return b64 * N + e
    elif MODE == 1:  # dense channels-last
        if not TILED:
            c = e // HW
            hw = e - c * HW
        return b64 * N + hw * C + c
    else:  # general strides
        if not TILED:
            c = e // HW
            hw = e - c * HW
        h = hw // W
        w = hw - h * W
        return b64 * sb + c.to(tl.int64) * sc + h.to(tl.int64) * sh + w.to(tl.int64) * sw


@triton.jit
def tile_elements(blk, N, HW, TILED: tl.constexpr, BLOCK: tl.constexpr, C_PAD: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Logical element indices e, their channel c and pixel hw (tiled only; flat returns e for
    both, unused), and the mask, for program block blk of a sample."""
    if TILED:
        c = tl.arange(0, C_PAD)[:, None]
        hw = blk * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]
        e = c * HW + hw
        mask = (hw < HW) & (e < N)
        return e, c, hw, mask
    else:
        e = blk * BLOCK + tl.arange(0, BLOCK)
        mask = e < N
        return e, e, e, mask


@triton.jit
def tile_sum(v, TILED: tl.constexpr):
    if TILED:
        return tl.sum(tl.sum(v, axis=1), axis=0)
    else:
        return tl.sum(v, axis=0)


@triton.jit
def cast_for_store(v, ptr):
    """Cast v to ptr's element type; float64 -> 16-bit goes through float32 (one path that
    every backend, the interpreter included, supports)."""
    if v.dtype == tl.float64:
        if ptr.dtype.element_ty != tl.float64:
            v = v.to(tl.float32)
    return v.to(ptr.dtype.element_ty)
