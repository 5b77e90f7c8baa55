"""C++ ops (torch.ops.pfgmpp_fast.*) against the kernel-level reference (reference.ref_*).

CPU backend always; the same comparisons on CUDA tensors (and CUDA vs CPU) under the `gpu`
marker. Tolerances (DESIGN §6, KERNEL_OPS.md): Philox words bit-exact; normals within
1e-6 abs + 1e-6 rel (the C++ SIMD log/sin/cos and torch's are each within ~2 ulp of the
exact value, so z differs by a few ulp: |z| < 6 keeps that under 1e-6 + 6e-6); χ² within
1e-5 relative (V inherits the float32 rounding of z: |dV/V| ≈ 3c|dz|, measured < 1e-6);
fused ops: relative error
‖out − ref‖/‖ref‖ < 1e-5 for float32/float64 outputs, < 1e-2 for bf16/fp16 outputs.
"""
import itertools
import math

import pytest
import torch

from pfgmpp_fast import reference as R

ext = pytest.importorskip("pfgmpp_fast._ext", reason="pfgmpp_fast._C is not built")
from pfgmpp_fast import _C  # noqa: E402

OPS = torch.ops.pfgmpp_fast
HALF = (torch.bfloat16, torch.float16)
D_VALUES = (1.0, 2.0, 8.0, 128.0, 2048.0, 3072000.0)
GPU = pytest.mark.gpu


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ids(B, seed, device="cpu"):
    """Sample ids spanning both 32-bit halves of the counter."""
    return torch.randint(0, 2**62, (B,), generator=_gen(seed)).to(device)


def _poison_allocator(*shapes_dtypes):
    """Best effort: fill and free blocks of the outputs' sizes so a kernel that skips an
    element leaves NaN (or garbage) behind instead of a lucky value."""
    for shape, dtype in shapes_dtypes:
        t = torch.full(shape, float("nan"), dtype=dtype)
        del t


def _rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    den = ref.norm().item()
    return (out - ref).norm().item() / den if den > 0 else (out - ref).norm().item()


def _tol(dtype):
    return 1e-2 if dtype in HALF else 1e-5


def _assert_close(out, ref, name):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != {ref.dtype}"
    if out.numel() == 0:
        return
    assert torch.isfinite(out.double()).all(), f"{name}: non-finite values"
    err = _rel_err(out, ref)
    assert err < _tol(out.dtype), f"{name}: relative error {err:.3g}"


def _layout(t, layout):
    """The same values in another memory layout: contiguous, channels-last, or strided."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
    # Non-contiguous: a strided view into a larger buffer (every second element of the last dim).
    big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    big.fill_(float("nan"))
    view = big[..., ::2]
    view.copy_(t)
    return view


def _is_cl(t):
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------- Philox / RNG

KNOWN_ANSWERS = [  # Random123 philox4x32-10 known-answer vectors: (counter, (k0, k1), output)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KNOWN_ANSWERS)
def test_philox_known_answers_raw(ctr, key, expected):
    """The shared header (csrc/philox.h) through the raw 32-bit entry point: full key range."""
    assert tuple(_C.philox4x32_raw(*ctr, *key)) == expected


@pytest.mark.parametrize("ctr,key,expected", KNOWN_ANSWERS)
def test_philox_known_answers_op(ctr, key, expected):
    k0, k1 = key
    if k1 >= 2**31:
        pytest.skip("the op's key is an int < 2^63 (k1 < 2^31); covered by the raw test")
    out = OPS.philox4x32(torch.tensor([ctr], dtype=torch.int64), (k1 << 32) | k0)
    assert tuple(out[0].tolist()) == expected


def _philox_case(device):
    g = _gen(1)
    ctr = torch.randint(0, 2**32, (1001, 4), generator=g)
    for key in (0, 1, 2**63 - 1, int(torch.randint(0, 2**62, (1,), generator=g))):
        out = OPS.philox4x32(ctr.to(device), key)
        assert torch.equal(out.cpu(), R.philox4x32(ctr, key)), f"key={key}"
    assert OPS.philox4x32(torch.empty(0, 4, dtype=torch.int64, device=device), 5).shape == (0, 4)


def test_philox_bit_exact_cpu():
    _philox_case("cpu")


def _normal_case(device):
    for B, n, stream in ((0, 5, 0), (1, 1, 0), (7, 1027, R.stream_churn(3)), (33, 6, R.STREAM_SIGMA)):
        ids = _ids(B, n, device)
        out = OPS.philox_normal(ids, 987654321, n, stream)
        ref = R.normal(987654321, ids.cpu(), n, stream)
        assert out.dtype == torch.float32 and out.shape == (B, n)
        torch.testing.assert_close(out.cpu(), ref, atol=1e-6, rtol=1e-6)


def test_philox_normal_cpu():
    _normal_case("cpu")


def _chi2_case(device, D):
    ids = _ids(257, int(D) % 1000, device)
    out = OPS.chi2(ids, 2024, D, R.STREAM_CHI2)
    ref = R.chi2(2024, ids.cpu(), D, R.STREAM_CHI2)
    assert out.dtype == torch.float64 and out.shape == (257,)
    assert (out > 0).all()
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("D", D_VALUES + (0.5,))
def test_chi2_cpu(D):
    _chi2_case("cpu", D)


# ---------------------------------------------------------------------------- fused ops

PERTURB_CASES = [
    # shape, y dtype, y layout, out dtype, channels_last, write_x, D
    ((0, 3, 4, 4), torch.float32, "contiguous", torch.bfloat16, True, True, 8.0),
    ((1, 3, 5, 7), torch.float32, "contiguous", torch.float32, False, True, 1.0),
    ((7, 3, 5, 7), torch.float32, "channels_last", torch.bfloat16, True, True, 2.0),
    ((7, 3, 5, 7), torch.float32, "strided", torch.float16, False, False, 128.0),
    ((7, 3, 8, 8), torch.float64, "contiguous", torch.float64, False, True, 2048.0),
    ((7, 3, 8, 8), torch.float64, "channels_last", torch.float32, True, True, 3072000.0),
    ((7, 3, 6, 6), torch.bfloat16, "contiguous", torch.bfloat16, False, True, 128.0),
    ((7, 3, 6, 6), torch.float16, "channels_last", torch.float16, True, False, math.inf),
    ((5, 37), torch.float32, "contiguous", torch.bfloat16, True, True, 8.0),
    ((3, 2, 3, 5, 3), torch.float32, "strided", torch.float32, False, True, 1.0),
]


def _scales(B, D, seed, dtype, device):
    """Per-sample s = σ·√(D/V) and c_in from a log-normal σ, as the training step makes them."""
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(B, generator=_gen(seed), dtype=torch.float64))
    ids = _ids(B, seed)
    s = R.noise_scale(sigma, D, 99, ids)
    c_in = R.precond(sigma)[2]
    return s.to(dtype).to(device), c_in.to(dtype).to(device)


def _perturb_case(device, shape, y_dtype, layout, out_dtype, channels_last, write_x, D, seed=0):
    B = shape[0]
    cd = torch.float64 if y_dtype == torch.float64 else torch.float32
    y = _layout(torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(y_dtype).to(device), layout)
    scale, c_in = _scales(B, D, seed, cd, device)
    ids = _ids(B, seed + 1, device)
    key, stream = 31337 + seed, R.STREAM_NOISE
    _poison_allocator((shape, out_dtype), (shape, cd))
    net_in, x = OPS.perturb(y, scale, c_in, ids, key, stream, out_dtype, channels_last, write_x)
    ref_net, ref_x = R.ref_perturb(y.cpu(), scale.cpu(), c_in.cpu(), ids.cpu(), key, stream,
                                   out_dtype, channels_last, write_x)
    _assert_close(net_in.cpu(), ref_net, "net_in")
    _assert_close(x.cpu(), ref_x, "x")
    assert net_in.is_contiguous(memory_format=torch.channels_last if channels_last and len(shape) == 4
                                else torch.contiguous_format)
    assert x.is_contiguous()
    return net_in, x


@pytest.mark.parametrize("case", PERTURB_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-cl{c[4]}-x{c[5]}-D{c[6]}")
def test_perturb_cpu(case):
    _perturb_case("cpu", *case)


def test_perturb_noise_independent_of_layout():
    y = torch.randn(3, 5, 4, 6, generator=_gen(3))
    ones, ids = torch.ones(3), _ids(3, 4)
    outs = [OPS.perturb(_layout(y, lay), ones, ones, ids, 5, 0, torch.float32, False, True)[1]
            for lay in ("contiguous", "channels_last", "strided")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


LOSS_CASES = [
    # shape, F dtype, F layout, y dtype, y layout, D, grad_scale
    ((0, 3, 4, 4), torch.bfloat16, "contiguous", torch.float32, "contiguous", 8.0, 1.0),
    ((1, 3, 5, 7), torch.float32, "contiguous", torch.float32, "contiguous", 1.0, 0.5),
    ((7, 3, 5, 7), torch.bfloat16, "channels_last", torch.float32, "contiguous", 2.0, 1 / 7),
    ((7, 3, 5, 7), torch.float16, "channels_last", torch.float32, "channels_last", 128.0, 3.0),
    ((7, 3, 8, 8), torch.float32, "strided", torch.float32, "strided", 2048.0, 1.0),
    ((7, 3, 8, 8), torch.float64, "contiguous", torch.float64, "channels_last", 3072000.0, 1.0),
    ((7, 3, 6, 6), torch.bfloat16, "contiguous", torch.float64, "contiguous", math.inf, 2.0),
    ((5, 37), torch.float32, "contiguous", torch.float32, "contiguous", 8.0, 1.0),
    ((3, 7, 4100), torch.float32, "contiguous", torch.float32, "contiguous", 8.0, 1.0),  # > 1 chunk
]


def _loss_case(device, shape, F_dtype, F_layout, y_dtype, y_layout, D, grad_scale, seed=0):
    B = shape[0]
    g = _gen(seed)
    cd = torch.float64 if torch.float64 in (F_dtype, y_dtype) else torch.float32
    F = _layout(torch.randn(shape, generator=g, dtype=torch.float64).to(F_dtype).to(device), F_layout)
    y = _layout(torch.randn(shape, generator=g, dtype=torch.float64).to(y_dtype).to(device), y_layout)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(B, generator=g, dtype=torch.float64))
    s = R.noise_scale(sigma, D, 7, _ids(B, seed))
    c_skip, c_out, _, _ = R.precond(sigma)
    args = [t.to(cd).to(device) for t in (s, c_skip, c_out)]
    ids = _ids(B, seed + 5, device)
    _poison_allocator((shape, F_dtype), ((B,), torch.float32))
    loss, grad = OPS.loss_fwd_bwd(F, y, *args, ids, 4242, R.STREAM_NOISE, grad_scale)
    ref_loss, ref_grad = R.ref_loss_fwd_bwd(F.cpu(), y.cpu(), *(a.cpu() for a in args), ids.cpu(),
                                            4242, R.STREAM_NOISE, grad_scale)
    assert loss.dtype == torch.float32 and loss.shape == (B,)
    if B:
        torch.testing.assert_close(loss.cpu(), ref_loss, rtol=1e-5, atol=0)
    _assert_close(grad.cpu(), ref_grad, "grad_F")
    if F.is_contiguous() or _is_cl(F):  # grad_F keeps F's memory format
        assert grad.stride() == ref_grad.stride()
    return loss, grad


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: f"{c[0]}-F{c[1]}-{c[2]}-y{c[3]}-{c[4]}-D{c[5]}")
def test_loss_fwd_bwd_cpu(case):
    _loss_case("cpu", *case)


def test_loss_matches_autograd_of_reference_loss():
    """grad_F is d/dF of grad_scale·Σ(F − T)²: check against torch.autograd on the reference."""
    shape, B = (3, 2, 5, 5), 3
    F = torch.randn(shape, generator=_gen(8), dtype=torch.float64, requires_grad=True)
    y = torch.randn(shape, generator=_gen(9), dtype=torch.float64)
    s, cs, co = torch.rand(B, dtype=torch.float64) + 0.5, torch.rand(B, dtype=torch.float64), torch.rand(B, dtype=torch.float64) + 0.5
    ids = _ids(B, 10)
    g = R.normal(11, ids, 50, 0).double().view(shape)
    T = ((1 - cs.view(-1, 1, 1, 1)) * y - cs.view(-1, 1, 1, 1) * s.view(-1, 1, 1, 1) * g) / co.view(-1, 1, 1, 1)
    (0.25 * (F - T).square().sum()).backward()
    loss, grad = OPS.loss_fwd_bwd(F.detach(), y, s, cs, co, ids, 11, 0, 0.25)
    torch.testing.assert_close(grad, F.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), (F - T).detach().square().flatten(1).sum(1), rtol=1e-5, atol=0)


SAMPLER_DTYPES = [  # state dtype, F dtype or None, net dtype
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.float16, torch.float16),
    (torch.float64, torch.float32, torch.float32),
    (torch.float64, None, torch.float64),
    (torch.float32, None, torch.bfloat16),
]


def _sampler_cases():
    shapes = [(0, 3, 4, 4), (1, 3, 5, 7), (7, 3, 5, 7), (5, 37)]
    flags = list(itertools.product([False, True], repeat=5))  # base, y2, net, alpha, churn
    cases = []
    for i, (dt, fl) in enumerate(itertools.product(SAMPLER_DTYPES, flags[::3])):
        shape = shapes[i % len(shapes)]
        F_layout = ("contiguous", "channels_last", "strided")[i % 3]
        cases.append((shape, *dt, F_layout, bool(i % 2), *fl))
    return cases


def _sampler_case(device, shape, state, F_dtype, net_dtype, F_layout, channels_last,
                  has_base, has_y2, has_net, alpha, churn, seed=0):
    g = _gen(seed)
    B = shape[0]
    x = torch.randn(shape, generator=g, dtype=torch.float64).mul(10).to(state).to(device)
    F = (_layout(torch.randn(shape, generator=g, dtype=torch.float64).to(F_dtype).to(device), F_layout)
         if F_dtype is not None else None)
    base = torch.randn(shape, generator=g, dtype=torch.float64).to(state).to(device) if has_base else None
    t_hat, t_next, c_skip, c_out = 2.5, 1.7, 0.04, 0.48
    A, Bf, h1 = (1 - c_skip) / t_hat, -c_out / t_hat, t_next - t_hat
    h2 = 0.5 * h1 if has_y2 else math.nan
    c_in_next = 1 / math.sqrt(t_next**2 + 0.25) if has_net else math.nan
    alpha_scale = 0.1 * t_hat if alpha else 0.0
    churn_scale = 0.7 if churn else 0.0
    ids = _ids(B, seed + 2, device)
    args = (A, Bf, h1, h2)
    tail = (4321, alpha_scale, R.stream_alpha(3), churn_scale, R.stream_churn(3), c_in_next, net_dtype,
            channels_last)
    _poison_allocator((shape, state), (shape, net_dtype))
    y1, y2, net_in = OPS.sampler_update(x, F, base, *args, ids, *tail)
    cpu = lambda t: t.cpu() if t is not None else None  # noqa: E731
    r1, r2, rn = R.ref_sampler_update(x.cpu(), cpu(F), cpu(base), *args, ids.cpu(), *tail)
    _assert_close(y1.cpu(), r1, "y1")
    _assert_close(y2.cpu(), r2, "y2")
    _assert_close(net_in.cpu(), rn, "net_in")
    assert y1.is_contiguous() and y2.is_contiguous()
    if has_net and B:
        fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
        assert net_in.is_contiguous(memory_format=fmt)
    return y1, y2, net_in


@pytest.mark.parametrize("case", _sampler_cases(), ids=str)
def test_sampler_update_cpu(case):
    _sampler_case("cpu", *case)


def test_sampler_empty_F_means_no_drift():
    x = torch.randn(2, 3, 4, 4, generator=_gen(12))
    ids = _ids(2, 13)
    none = OPS.sampler_update(x, None, None, 1.0, 1.0, 1.0, math.nan, ids, 1, 0.0, 0, 0.0, 0,
                              math.nan, torch.float32, False)
    empty = OPS.sampler_update(x, torch.empty(0), torch.empty(0), 1.0, 1.0, 1.0, math.nan, ids, 1,
                               0.0, 0, 0.0, 0, math.nan, torch.float32, False)
    assert torch.equal(none[0], x) and torch.equal(empty[0], x)
    assert none[1].numel() == 0 and none[2].numel() == 0


# ---------------------------------------------------------------------------- bad input


def _good_perturb_args():
    y = torch.randn(2, 3, 4, 4)
    return dict(y=y, scale=torch.ones(2), c_in=torch.ones(2), sample_ids=torch.arange(2), key=1,
                stream=0, out_dtype=torch.bfloat16, channels_last=True, write_x=False)


@pytest.mark.parametrize("change,exc,needle", [
    (dict(sample_ids=torch.arange(2, dtype=torch.int32)), TypeError, "sample_ids"),
    (dict(sample_ids=torch.arange(3)), ValueError, "sample_ids"),
    (dict(y=torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "y"),
    (dict(y=torch.tensor(1.0)), ValueError, "y"),
    (dict(scale=torch.ones(3)), ValueError, "scale"),
    (dict(c_in=torch.ones(2, dtype=torch.int32)), TypeError, "c_in"),
    (dict(key=-1), ValueError, "key"),
    (dict(stream=2**32), ValueError, "stream"),
    (dict(out_dtype=torch.int8), TypeError, "out_dtype"),
])
def test_perturb_bad_input(change, exc, needle):
    kw = {**_good_perturb_args(), **change}
    with pytest.raises(exc, match=needle):
        OPS.perturb(*kw.values())


@pytest.mark.parametrize("change,exc,needle", [
    (dict(y=torch.randn(2, 3, 4, 5)), ValueError, "y"),
    (dict(c_out=torch.ones(2, 1)), ValueError, "c_out"),
    (dict(grad_scale=math.inf), ValueError, "grad_scale"),
    (dict(F=torch.ones(2, 3, 4, 4, dtype=torch.int32)), TypeError, "F"),
])
def test_loss_bad_input(change, exc, needle):
    kw = dict(F=torch.randn(2, 3, 4, 4), y=torch.randn(2, 3, 4, 4), scale=torch.ones(2),
              c_skip=torch.ones(2), c_out=torch.ones(2), sample_ids=torch.arange(2), key=1,
              stream=0, grad_scale=1.0)
    kw.update(change)
    with pytest.raises(exc, match=needle):
        OPS.loss_fwd_bwd(*kw.values())


@pytest.mark.parametrize("change,exc,needle", [
    (dict(x=torch.randn(2, 3, 4, 4).half()), TypeError, "x"),
    (dict(F=torch.randn(2, 3, 4, 5)), ValueError, "F"),
    (dict(base=torch.randn(2, 3, 4, 4).double()), TypeError, "base"),
    (dict(h1=math.nan), ValueError, "h1"),
    (dict(churn_stream=-1), ValueError, "churn_stream"),
    (dict(net_dtype=torch.int32), TypeError, "net_dtype"),
])
def test_sampler_bad_input(change, exc, needle):
    kw = dict(x=torch.randn(2, 3, 4, 4), F=torch.randn(2, 3, 4, 4), base=None, A=1.0, Bf=1.0, h1=1.0,
              h2=math.nan, sample_ids=torch.arange(2), key=1, alpha_scale=0.0, alpha_stream=0,
              churn_scale=0.0, churn_stream=0, c_in_next=1.0, net_dtype=torch.bfloat16, channels_last=False)
    kw.update(change)
    with pytest.raises(exc, match=needle):
        OPS.sampler_update(*kw.values())


def test_rng_bad_input():
    with pytest.raises(ValueError, match="D"):
        OPS.chi2(torch.arange(3), 1, math.inf, 2)
    with pytest.raises(ValueError, match="n"):
        OPS.philox_normal(torch.arange(3), 1, -1, 0)
    with pytest.raises(ValueError, match="counter"):
        OPS.philox4x32(torch.zeros(3, 3, dtype=torch.int64), 1)


# ---------------------------------------------------------------------------- fake impls / compile


def test_fake_impls_match_real_kernels():
    """opcheck: schema, and fake (meta) outputs agree with the kernels in shape/dtype/strides."""
    y = torch.randn(3, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    s, ids = torch.rand(3) + 0.5, _ids(3, 1)
    F = torch.randn(3, 3, 4, 5, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 4, 5)
    cases = [
        (OPS.philox4x32, (torch.randint(0, 2**32, (5, 4)), 3)),
        (OPS.philox_normal, (ids, 3, 13, 0)),
        (OPS.chi2, (ids, 3, 8.0, 2)),
        (OPS.perturb, (y, s, s, ids, 3, 0, torch.bfloat16, True, True)),
        (OPS.perturb, (y, s, s, ids, 3, 0, torch.float32, False, False)),
        (OPS.loss_fwd_bwd, (F, x, s, s, s, ids, 3, 0, 1.0)),
        (OPS.sampler_update, (x, F, None, 1.0, 2.0, 0.5, 0.25, ids, 3, 0.1, 5, 0.2, 6, 0.3,
                              torch.bfloat16, True)),
        (OPS.sampler_update, (x, None, x, 1.0, 2.0, 0.5, math.nan, ids, 3, 0.0, 5, 0.0, 6, math.nan,
                              torch.float16, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_through_cpp_op():
    """torch.compile(fullgraph=True) traces the C++ op through its fake impl and matches eager."""
    def step(y, sigma, ids):
        c_in = 1 / torch.sqrt(sigma * sigma + 0.25)
        net_in, x = torch.ops.pfgmpp_fast.perturb(y * 2 - 1, sigma, c_in, ids, 77, 0, torch.float32,
                                                  True, True)
        return net_in * 3 + 1, x.sum()

    y = torch.rand(4, 3, 8, 8)
    sigma, ids = torch.rand(4) + 0.1, _ids(4, 2)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for out, ref in zip(compiled(y, sigma, ids), step(y, sigma, ids)):
        torch.testing.assert_close(out, ref)


# ---------------------------------------------------------------------------- CUDA


def _cuda_ready():
    return torch.cuda.is_available() and ext.HAS_CUDA_KERNELS


@GPU
def test_cuda_rng_matches_reference():
    assert _cuda_ready(), "CUDA device present but the extension has no CUDA kernels"
    _philox_case("cuda")
    _normal_case("cuda")
    for D in D_VALUES + (0.5,):
        _chi2_case("cuda", D)


@GPU
@pytest.mark.parametrize("case", PERTURB_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}")
def test_perturb_cuda(case):
    net_in, x = _perturb_case("cuda", *case)
    cpu_net, cpu_x = _perturb_case("cpu", *case)
    assert _rel_err(net_in, cpu_net) < _tol(net_in.dtype)


@GPU
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: f"{c[0]}-F{c[1]}-{c[2]}")
def test_loss_fwd_bwd_cuda(case):
    loss, grad = _loss_case("cuda", *case)
    cpu_loss, cpu_grad = _loss_case("cpu", *case)
    assert _rel_err(grad, cpu_grad) < _tol(grad.dtype)


@GPU
@pytest.mark.parametrize("case", _sampler_cases()[::2], ids=str)
def test_sampler_update_cuda(case):
    _sampler_case("cuda", *case)


@GPU
def test_cuda_large_and_misaligned():
    """A misaligned (storage offset 1) input takes the scalar path; odd N exercises the tail."""
    y = torch.randn(5 * 3 * 33 * 33 + 1, device="cuda")[1:].view(5, 3, 33, 33)
    ones, ids = torch.ones(5, device="cuda"), _ids(5, 3, "cuda")
    net_in, x = OPS.perturb(y, ones, ones, ids, 9, 0, torch.bfloat16, False, True)
    ref_net, ref_x = R.ref_perturb(y.cpu(), ones.cpu(), ones.cpu(), ids.cpu(), 9, 0, torch.bfloat16, False, True)
    _assert_close(x.cpu(), ref_x, "x")
    _assert_close(net_in.cpu(), ref_net, "net_in")


@GPU
def test_cuda_device_mismatch_is_reported():
    y = torch.randn(2, 3, 4, 4, device="cuda")
    with pytest.raises(ValueError, match="scale"):
        OPS.perturb(y, torch.ones(2), torch.ones(2, device="cuda"), torch.arange(2, device="cuda"), 1, 0,
                    torch.float32, False, False)
