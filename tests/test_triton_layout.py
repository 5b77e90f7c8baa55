"""What kernels/layout.py gives every Triton launcher, checked on the CPU: the launch runs on
the tensors' GPU, and the logical element indices of a sample stay exact up to the per-sample
limit N < 2^31 (the Triton kernels run under the interpreter here, as in the op tests)."""

import math

import pytest
import torch
from op_helpers import seeded

from pfgmpp_fast import reference as R
from pfgmpp_fast.kernels import aot_check, chi2, loss, perturb, philox, sampler_step
from pfgmpp_fast.kernels.layout import MAX_TILED_CHANNELS

pytestmark = pytest.mark.triton


def _launches(dev):
    """launcher name -> (module, kernel attribute, call on tensors of device dev)."""
    ids = lambda: torch.arange(2, device=dev)  # noqa: E731
    img = lambda dtype=torch.float32: torch.randn(2, 3, 4, 4, device=dev, dtype=dtype)  # noqa: E731
    ones = lambda: torch.ones(2, device=dev)  # noqa: E731
    return {
        "perturb": (
            perturb,
            "_perturb_kernel",
            lambda: perturb.perturb(img(), ones(), ones(), ids(), 7, 0, torch.bfloat16, True, False),
        ),
        "loss_fwd_bwd": (
            loss,
            "_loss_kernel",
            lambda: loss.loss_fwd_bwd(img(torch.bfloat16), img(), ones(), ones(), ones(), ids(), 7, 0, 1.0),
        ),
        "sampler_update": (
            sampler_step,
            "_sampler_kernel",
            lambda: sampler_step.sampler_update(
                img(), img(), None, 0.1, 0.2, 0.3, 0.4, ids(), 7, 0.5, 1, 0.0, 2, 0.5, torch.bfloat16, True
            ),
        ),
        "chi2": (chi2, "_chi2_kernel", lambda: chi2.chi2(ids(), 7, 3.0, 2)),
        "philox_normal": (philox, "_philox_normal_kernel", lambda: philox.philox_normal(ids(), 7, 16, 0)),
        "philox4x32": (
            philox,
            "_philox_raw_kernel",
            lambda: philox.philox4x32(torch.zeros(8, 4, dtype=torch.int64, device=dev), 7),
        ),
    }


@pytest.mark.parametrize("name", list(_launches("cpu")))
def test_every_launcher_runs_its_kernel_on_the_tensors_gpu(name, monkeypatch):
    """Triton launches on the current device, so tensors on another GPU would fault: every
    launcher starts its kernel through layout.launch, which makes the tensors' device current
    (as the C++ ops' OptionalCUDAGuard does).  Fake cuda:1 tensors, torch.cuda.device recorded."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    current, launched = [], []

    class device:  # torch.cuda.device, recording instead of switching (no GPU here)
        def __init__(self, d):
            self.d = torch.device(d)

        def __enter__(self):
            current.append(self.d)

        def __exit__(self, *exc):
            current.pop()

    class Kernel:  # the Triton kernel's stand-in: records the device current at its launch
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append(list(current))

    module, attr, call = _launches(torch.device("cuda:1"))[name]
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # real CUDA tensors imply it
    monkeypatch.setattr(module, attr, Kernel())
    with FakeTensorMode():
        call()
    assert launched == [[torch.device("cuda:1")]]


def _normals_at(key, sid, stream, elements):
    """reference normals of the given logical elements of one sample (Philox block e // 4, lane e % 4)."""
    blocks = torch.tensor(sorted({e // 4 for e in elements}), dtype=torch.int64)
    z = R._box_muller(R.uniform(R.philox4x32(R._counters(torch.tensor([sid]), blocks, stream), key)))[0]
    row = {int(j): i for i, j in enumerate(blocks)}
    return torch.stack([z[row[e // 4], e % 4] for e in elements])


@pytest.mark.parametrize("C,HW", [(3, 715_827_880), (5, 335_544_320)])
def test_channels_last_indices_exact_near_the_int32_limit(C, HW):
    """A channels-last sample with N = C·H·W just below the 2^31 limit (C = 3) or with 7·H·W
    beyond it (C = 5): program 0 of the real perturb kernel draws the noise of logical elements
    c·H·W + hw and writes only its own pixels.  (The old tiles padded C to a power of two; the
    padded rows' indices c·H·W + hw overflowed int32, passed the `e < N` mask and wrote into
    the next pixel.)  The kernel sees the large geometry; the buffers hold its one block."""
    y = torch.randn(1, C, 32, 32, generator=seeded(C)).contiguous(memory_format=torch.channels_last)
    scale, c_in, sid, key = torch.tensor([0.7]), torch.tensor([1.3]), 2**40 + 5, 11
    calls = []
    with aot_check._recording([perturb], calls):
        perturb.perturb(y, scale, c_in, torch.tensor([sid]), key, 0, torch.float32, True, False)
    kernel, _, args, meta = calls[0]
    args = dict(zip(kernel.arg_names, args))
    W = 4096
    for p in ("y", "n"):  # the same dense channels-last layout, H·W pixels per channel
        args.update({f"{p}HW": HW, f"{p}W": W, f"{p}_sb": C * HW, f"{p}_sh": W * C})
    args.update(N=C * HW, nblk=2**20)
    net = torch.full_like(y, math.nan)
    args["net_ptr"] = net
    kernel[(1,)](*args.values(), **meta)
    # memory order of channels-last: position hw·C + c
    flat_y, flat_net = y.permute(0, 2, 3, 1).reshape(-1), net.permute(0, 2, 3, 1).reshape(-1)
    written = (~flat_net.isnan()).nonzero().flatten().tolist()
    assert written[0] == 0  # program 0 wrote its block, from element 0 on
    elements = [(pos % C) * HW + pos // C for pos in written]
    expected = c_in * (flat_y[written] + scale * _normals_at(key, sid, 0, elements))
    torch.testing.assert_close(flat_net[written], expected, rtol=1e-5, atol=1e-5)


def _op_outputs(op, C, S, channels_last):
    """The outputs of one op on [2, C, S, S] inputs (fixed values), channels-last or contiguous."""
    gen = seeded(C)
    y, F = torch.randn(2, C, S, S, generator=gen), torch.randn(2, C, S, S, generator=gen).to(torch.bfloat16)
    if channels_last:
        y, F = y.contiguous(memory_format=torch.channels_last), F.contiguous(memory_format=torch.channels_last)
    ids, v = torch.tensor([3, 2**40]), torch.tensor([0.7, 1.9])
    if op == "perturb":
        return perturb.perturb(y, v, v.flip(0), ids, 7, 0, torch.bfloat16, channels_last, True)
    if op == "loss":
        return loss.loss_fwd_bwd(F, y.contiguous(), v, v.flip(0), v + 1, ids, 7, 0, 0.5)
    return sampler_step.sampler_update(
        y.contiguous(),
        F,
        None,
        0.4,
        -1.1,
        0.3,
        0.15,
        ids,
        7,
        0.2,
        R.stream_alpha(3),
        0.5,
        R.stream_churn(3),
        0.8,
        torch.bfloat16,
        channels_last,
    )


@pytest.mark.parametrize("op,streams", [("perturb", 1), ("loss", 1), ("sampler", 2)])
@pytest.mark.parametrize("C", [1, 3, 4, 5])
def test_channels_last_tiles_draw_each_normal_once_at_its_logical_element(op, streams, C, monkeypatch):
    """Channels-last operands (the tiled path for C <= 4) give the bits of contiguous ones (the
    flat path): every element draws the normal of its logical NCHW index (docs/DESIGN.md §2).  And each
    Philox call of a launch feeds four elements that are written: the old tiles padded C = 3 to
    4 (and C = 5 to 8) channels and drew 4/3 (8/5) of the normals needed."""
    calls = []

    def counting_philox(c0, *args):  # the interpreter runs kernels as Python: count the lanes
        calls.append(int(c0.numel))
        return philox_rounds(c0, *args)

    philox_rounds = philox.philox4x32_10
    monkeypatch.setattr(philox, "philox4x32_10", counting_philox)
    S = 16 if C <= MAX_TILED_CHANNELS else 32  # C = 5 runs flat: its 1024-element blocks divide N = 5·32²
    flat = _op_outputs(op, C, S, channels_last=False)
    calls.clear()
    tiled = _op_outputs(op, C, S, channels_last=True)
    assert sum(calls) == streams * 2 * C * S * S // 4
    for a, b in zip(flat, tiled):
        if op == "loss" and a.dim() == 1:  # per-sample sums: the channels' partial sums added in another order
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        else:
            assert torch.equal(a.contiguous(), b.contiguous())
