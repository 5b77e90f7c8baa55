"""What the Triton op files share: argument splitting, memory layouts, tiling, launch and
registration.

Host side: 64-bit keys and float64 scalars as 32-bit kernel arguments, the description of an
image tensor's memory layout (Layout), how a program walks one sample (BlockPlan), the launch
(on the tensors' device) and the tensor checks of the launchers.  Device side: the compute
dtype, the memory offsets of logical NCHW elements (flat) or of one channel (tiled) in each
layout, channels-last pixel quads moved as chunks, and casts for stores.
"""

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl

MODE_CONTIGUOUS, MODE_CHANNELS_LAST, MODE_STRIDED = 0, 1, 2
MAX_ELEMENTS_PER_SAMPLE = 2**31 - 1
MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on grid dimension x
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The tiled path keeps a pixel quad's channels-last run (4·C elements) in registers: C <= 4
# (RGB, RGBA, latents) covers the images these ops see; more channels take the flat path.
MAX_TILED_CHANNELS = 4


# Specialisation and tracing, the same in every kernel file:
# - do_not_specialize lists the integer arguments whose values change between calls without
#   changing the work: blocks per sample (a divisor), key words, streams (one per sampler
#   step), batch sizes of the per-sample kernels.  Specialised, each new value == 1 or % 16
#   would compile another variant for nothing.  Sizes such as N stay specialised (N % 16 == 0
#   proves 16-byte alignment: vector loads and stores).  Floats are never specialised.
#   do_not_specialize only removes assumptions, so it is safe wherever the kernel is
#   compiled: Inductor reads the same list when it compiles a triton_op's kernels.
# - Pointers that are only read (sample ids) are loaded in the kernel body: torch's mutation
#   analysis of a traced kernel walks back from each store's address through every argument
#   of a helper call, so a helper taking sid_ptr and returning the sample index would make
#   torch treat the ids as written (and clone them).


def register(fn, *kernels):
    """Register a launcher as the op pfgmpp_fast_triton::<its name> (schema from its
    annotations), so torch.compile sees through it to its Triton `kernels`."""
    name = f"pfgmpp_fast_triton::{fn.__name__}"
    torch.library.triton_op(name, fn, mutates_args=())
    # torch finds a triton_op's kernels by reading its source for `wrap_triton(<kernel>)` and
    # hashes their source into the AOTAutograd cache key; ours launch through launch(), so
    # they are named here (else a kernel edit could reuse a stale compiled graph).
    table = getattr(getattr(torch._library, "triton", None), "triton_ops_to_kernels", None)
    if table is not None:
        table[name] = list(kernels)
    return fn


def _launch_guard(args):
    """torch.cuda.device of the launch's first tensor argument when that is a CUDA tensor
    with memory: Triton launches on the current device, so tensors on another GPU would
    fault (the C++ ops hold an OptionalCUDAGuard).  Fake tensors being traced on a machine
    without a CUDA context launch nothing and need no guard."""
    t = next((a for a in args if torch.is_tensor(a)), None)
    if t is not None and t.device.type == "cuda" and torch.cuda.is_initialized():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


class launch:
    """`launch(kernel)[grid](*args, **meta)`: every launcher's one way to start a kernel —
    wrapped for torch.library.triton_op tracing (the plain kernel in eager) and run on the
    device of its first tensor argument."""

    def __init__(self, kernel):
        try:
            from torch.library import wrap_triton

            self.kernel = wrap_triton(kernel)
        except (ImportError, RuntimeError, TypeError):
            self.kernel = kernel

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def guarded(*args, **meta):
            with _launch_guard(args):
                return run(*args, **meta)

        return guarded


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
    when a 4-D operand is channels-last, H·W % 4 == 0 and C <= MAX_TILED_CHANNELS): BLOCK_HW
    pixels, one channel after the other (C is a constexpr: no padded channel, so no random
    number is drawn for nothing), each channel a vector contiguous in the logical index, so
    the noise still comes four elements per Philox call; channels-last operands move as
    whole pixel quads (4·C contiguous elements), so their loads and stores vectorise."""

    def __init__(self, N: int, C: int, HW: int, tiled: bool, cap: int = 1024):
        self.tiled = bool(tiled) and HW % 4 == 0 and C <= MAX_TILED_CHANNELS
        if self.tiled:
            self.C = C
            self.BLOCK_HW = max(4, min(triton.next_power_of_2(HW), cap))
            self.BLOCK = self.BLOCK_HW
            self.nblk = triton.cdiv(HW, self.BLOCK_HW)
        else:
            self.BLOCK = max(4, min(cap, triton.next_power_of_2(max(int(N), 1))))
            self.C, self.BLOCK_HW = 1, 4
            self.nblk = triton.cdiv(N, self.BLOCK)
        self.num_warps = warps_for(self.BLOCK)

    def meta(self):
        return dict(TILED=self.tiled, BLOCK=self.BLOCK, C=self.C, BLOCK_HW=self.BLOCK_HW, num_warps=self.num_warps)


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
def to_compute(v, IS_F64: tl.constexpr):
    """v in the kernel's arithmetic dtype: float64 when IS_F64, else float32.  (A flag, not
    a tl.dtype constexpr: Inductor writes a user kernel's constexprs into generated code.)"""
    if IS_F64:
        return tl.cast(v, tl.float64)
    else:
        return tl.cast(v, tl.float32)


@triton.jit
def element_offsets(b, e, N, C, HW, W, sb, sc, sh, sw, MODE: tl.constexpr):
    """Memory offsets (int64) of logical elements e of sample b for a layout MODE (flat path)."""
    b64 = b.to(tl.int64)
    if MODE == 0:  # contiguous
        return b64 * N + e
    c = e // HW
    hw = e - c * HW
    if MODE == 1:  # dense channels-last
        return b64 * N + hw * C + c
    else:  # general strides
        h = hw // W
        w = hw - h * W
        return b64 * sb + c.to(tl.int64) * sc + h.to(tl.int64) * sh + w.to(tl.int64) * sw


@triton.jit
def channel_offsets(b, c: tl.constexpr, hw, N, HW, W, sb, sc, sh, sw, MODE: tl.constexpr):
    """Memory offsets (int64) of channel c at pixels hw of sample b, contiguous (MODE 0) or
    strided (MODE 2) layout (tiled path).  The channel's base is computed in int64 before
    its multiply: c·HW stays below N < 2^31 only while N is bounded."""
    b64 = b.to(tl.int64)
    if MODE == 0:
        return b64 * N + HW.to(tl.int64) * c + hw
    else:
        h = hw // W
        w = hw - h * W
        return b64 * sb + sc.to(tl.int64) * c + h.to(tl.int64) * sh + w.to(tl.int64) * sw


# Channels-last operands of the tiled path.  The BLOCK_HW pixels of a program are
# BLOCK_HW // 4 quads; a quad's channels-last memory is one run of 4·C elements (pixel p,
# channel c at position p·C + c), held as C chunks [quads, 4]: chunk j is positions
# 4j .. 4j + 3.  Loads and stores move whole chunks (16-byte aligned runs for aligned sizes),
# channels enter and leave them lane by lane, all inside each thread's registers.


@triton.jit
def _quad_lane(v, P: tl.constexpr):
    """Lane P [quads] of v [quads, 4] (split twice: no data leaves the thread)."""
    even, odd = tl.split(tl.reshape(v, [v.shape[0], 2, 2]))
    if P % 2 == 0:
        lo, hi = tl.split(even)
    else:
        lo, hi = tl.split(odd)
    if P // 2 == 0:
        return lo
    else:
        return hi


@triton.jit
def _chunk(ch0, ch1, ch2, ch3, J: tl.constexpr):
    if J == 0:
        return ch0
    elif J == 1:
        return ch1
    elif J == 2:
        return ch2
    else:
        return ch3


@triton.jit
def _run_element(ch0, ch1, ch2, ch3, K: tl.constexpr):
    """Position K of every quad's run [quads]."""
    return _quad_lane(_chunk(ch0, ch1, ch2, ch3, K // 4), K % 4)


@triton.jit
def quad_offsets(b, N, hw0, HW, C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Offsets (int64) of chunk 0 of each quad of pixels hw0 + 4q and their mask, [quads, 4]."""
    q = tl.arange(0, BLOCK_HW // 4)[:, None]
    k = tl.arange(0, 4)[None, :]
    off = b.to(tl.int64) * N + (hw0 + 4 * q) * C + k
    return off, (hw0 + 4 * q < HW) & (k < 4)


@triton.jit
def cl_load(ptr, b, N, hw0, HW, C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """The C chunks of a channels-last operand (unused ones repeat chunk 0)."""
    off, mask = quad_offsets(b, N, hw0, HW, C, BLOCK_HW)
    ch0 = tl.load(ptr + off, mask=mask, other=0.0)
    ch1 = ch0
    ch2 = ch0
    ch3 = ch0
    if C > 1:
        ch1 = tl.load(ptr + off + 4, mask=mask, other=0.0)
    if C > 2:
        ch2 = tl.load(ptr + off + 8, mask=mask, other=0.0)
    if C > 3:
        ch3 = tl.load(ptr + off + 12, mask=mask, other=0.0)
    return ch0, ch1, ch2, ch3


@triton.jit
def cl_channel(ch0, ch1, ch2, ch3, c: tl.constexpr, C: tl.constexpr):
    """Channel c of the chunks as a vector [BLOCK_HW] in pixel order."""
    l0 = _run_element(ch0, ch1, ch2, ch3, c)
    l1 = _run_element(ch0, ch1, ch2, ch3, C + c)
    l2 = _run_element(ch0, ch1, ch2, ch3, 2 * C + c)
    l3 = _run_element(ch0, ch1, ch2, ch3, 3 * C + c)
    v = tl.join(tl.join(l0, l2), tl.join(l1, l3))  # [quads, a, b] = lane 2a + b
    return tl.reshape(v, [4 * l0.shape[0]])


@triton.jit
def cl_put(ch0, ch1, ch2, ch3, v, c: tl.constexpr, C: tl.constexpr):
    """The chunks with channel c set from v [BLOCK_HW] (pixel order)."""
    v4 = tl.reshape(v, [v.shape[0] // 4, 4])
    k = tl.arange(0, 4)[None, :]
    for p in tl.static_range(4):  # pixel p of each quad sits at run position p·C + c
        lane = _quad_lane(v4, p)[:, None]
        if (p * C + c) // 4 == 0:
            ch0 = tl.where(k == (p * C + c) % 4, lane, ch0)
        elif (p * C + c) // 4 == 1:
            ch1 = tl.where(k == (p * C + c) % 4, lane, ch1)
        elif (p * C + c) // 4 == 2:
            ch2 = tl.where(k == (p * C + c) % 4, lane, ch2)
        else:
            ch3 = tl.where(k == (p * C + c) % 4, lane, ch3)
    return ch0, ch1, ch2, ch3


@triton.jit
def cl_store(ptr, ch0, ch1, ch2, ch3, b, N, hw0, HW, C: tl.constexpr, BLOCK_HW: tl.constexpr):
    off, mask = quad_offsets(b, N, hw0, HW, C, BLOCK_HW)
    tl.store(ptr + off, ch0, mask=mask)
    if C > 1:
        tl.store(ptr + off + 4, ch1, mask=mask)
    if C > 2:
        tl.store(ptr + off + 8, ch2, mask=mask)
    if C > 3:
        tl.store(ptr + off + 12, ch3, mask=mask)


@triton.jit
def cast_for_store(v, ptr):
    """Cast v to ptr's element type; float64 -> 16-bit goes through float32 (one path that
    every backend, the interpreter included, supports)."""
    if v.dtype == tl.float64:
        if ptr.dtype.element_ty != tl.float64:
            v = v.to(tl.float32)
    return v.to(ptr.dtype.element_ty)
