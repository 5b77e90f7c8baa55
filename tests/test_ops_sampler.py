"""Fused sampler update (op level) and the fused sample() vs reference.sample."""

import collections
import itertools
import math

import pytest
import torch
from op_helpers import (
    BACKENDS,
    FP32_REL_TOL,
    HALF_REL_TOL,
    assert_close_rel,
    cpp_ops,
    device_for,
    in_layout,
    memcheck_marked,
    needs_cuda_kernels,
    needs_ext,
    random_ids,
    rel_err,
    same_format,
    seeded,
    tol_for,
)
from torch import nn

from pfgmpp_fast import ops
from pfgmpp_fast import reference as R
from pfgmpp_fast.sampler import sample

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")

# (has F, F dtype, F layout, has base, h2, alpha, churn, c_in_next, net dtype, channels-last net input)
CASES = {
    "prepare_noise_only": (False, None, None, False, None, 0.3, 0.7, 0.2, torch.float32, False),
    "stage1_heun": (True, torch.bfloat16, "channels_last", False, 0.25, 0.0, 0.0, 0.9, torch.bfloat16, True),
    "stage2_heun_next_noise": (True, torch.float32, "strided", True, None, 0.1, 0.05, 0.4, torch.float16, False),
    "euler_last_step": (True, torch.float16, "contiguous", False, None, 0.0, 0.0, None, torch.float32, False),
    "euler_churn_only": (True, torch.float32, "channels_last", False, None, 0.0, 1.3, 0.6, torch.float32, True),
    "everything": (True, torch.float32, "contiguous", True, 0.3, 0.2, 0.4, 0.5, torch.bfloat16, True),
}


def make_F(B, layout, dtype, device, gen):
    if layout == "strided":
        F = torch.randn(B, 3, 7, 11, generator=gen)[..., 1::2].transpose(2, 3)
    else:
        F = torch.randn(B, 3, 5, 7, generator=gen)
        if layout == "channels_last":
            F = F.contiguous(memory_format=torch.channels_last)
    return F.to(device, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [0, 1, 7])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_sampler_update_matches_reference(backend, B, state_dtype, case):
    has_F, F_dtype, F_layout, has_base, h2, alpha, churn, c_in_next, net_dtype, cl = CASES[case]
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(hash((B, case, str(state_dtype))) % 2**31)
    x = torch.randn(B, 3, 5, 7, generator=gen, dtype=torch.float64).to(dev, state_dtype)
    F = make_F(B, F_layout, F_dtype, dev, gen) if has_F else None
    base = torch.randn(B, 3, 5, 7, generator=gen, dtype=torch.float64).to(dev, state_dtype) if has_base else None
    ids = torch.randint(0, 2**62, (B,), generator=gen).to(dev)
    A, Bf, h1 = 0.37, -1.9, -0.61
    args = (A, Bf, h1, h2, ids, 2**50 + 3, alpha, R.stream_alpha(4), churn, R.stream_churn(4), c_in_next, net_dtype, cl)
    y1, y2, net_in = ops.sampler_update(x, F, base, *args, backend=backend)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    r1, r2, rn = R.ref_sampler_update(x.cpu(), cpu(F), cpu(base), A, Bf, h1, h2, ids.cpu(), *args[5:])
    tol = FP32_REL_TOL
    assert y1.dtype == state_dtype and y1.shape == x.shape and y1.is_contiguous()
    assert torch.isfinite(y1).all() and rel_err(y1, r1) < tol
    assert y2.shape == r2.shape and y2.dtype == state_dtype
    if h2 is not None:
        assert torch.isfinite(y2).all() and rel_err(y2, r2) < tol
    assert net_in.shape == rn.shape and net_in.dtype == net_dtype
    if c_in_next is not None:
        assert same_format(net_in, rn)
        assert torch.isfinite(net_in).all()
        assert rel_err(net_in, rn) < tol_for(net_dtype)


class TinyPrecond(nn.Module):
    """EDMPrecond-like stand-in that is exactly the optimal denoiser: raw() returns
    F = (D*(x) − c_skip·x)/c_out, recovering x from x_in = c_in·x and σ from c_noise."""

    def __init__(self, data, D, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.denoiser = R.optimal_denoiser(data, D)

    def raw(self, x_in, c_noise, class_labels=None, augment_labels=None):
        sigma = torch.exp(4 * c_noise.to(torch.float64)).view(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = R.precond(sigma, self.sigma_data)
        x = x_in.to(torch.float64) / c_in
        return ((self.denoiser(x, sigma.view(-1)) - c_skip * x) / c_out).to(torch.float32)

    def forward(self, x, sigma, class_labels=None):
        return self.denoiser(x, sigma, class_labels)


def _data():
    return torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(3))


def _lands_on_data(x, data, tol):
    d = torch.cdist(x.double().reshape(x.shape[0], -1).cpu(), data.double().reshape(data.shape[0], -1))
    return d.min(dim=1).values.max().item() < tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [1.0, 2.0, 128.0, 2048.0, 3072000.0, math.inf])
def test_sample_with_exact_denoiser_matches_reference(backend, D):
    dev = device_for(backend)
    data = _data()
    seeds = torch.tensor([0, 1, 2, 2**40])
    latents = R.prior((4, 2, 3, 3), D, 80.0, 5, seeds, dtype=torch.float32)
    den = R.optimal_denoiser(data.to(dev), D)
    x = sample(den, latents.to(dev), D, 5, seeds.to(dev), num_steps=10, backend=backend)
    ref = R.sample(R.optimal_denoiser(data, D), latents, D, 5, seeds, num_steps=10, dtype=torch.float32)
    assert x.dtype == torch.float32 and x.shape == latents.shape
    assert rel_err(x, ref) < 1e-4
    assert _lands_on_data(ref, data, 1e-3) and _lands_on_data(x, data, 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(S_churn=20.0, S_min=0.01, S_max=50.0, alpha=0.05),
        dict(solver="euler", num_steps=12),
        dict(dtype=torch.float64),
    ],
    ids=["churn_alpha", "euler", "float64"],
)
def test_sample_variants_match_reference(backend, kwargs):
    dev = device_for(backend)
    data, D = _data(), 128.0
    seeds = torch.arange(3)
    dtype = kwargs.get("dtype", torch.float32)
    latents = R.prior((3, 2, 3, 3), D, 80.0, 1, seeds, dtype=dtype)
    kw = dict(num_steps=8, **kwargs) if "num_steps" not in kwargs else kwargs
    x = sample(R.optimal_denoiser(data.to(dev), D), latents.to(dev), D, 1, seeds.to(dev), backend=backend, **kw)
    kw.setdefault("dtype", torch.float32)
    ref = R.sample(R.optimal_denoiser(data, D), latents, D, 1, seeds, **kw)
    assert x.dtype == dtype
    assert rel_err(x, ref) < (1e-10 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_precond_net_uses_fused_raw_path(backend):
    """An EDMPrecond-like net goes through .raw with fused c_skip / c_out / c_in."""
    dev = device_for(backend)
    data, D = _data(), 2048.0
    net = TinyPrecond(data.to(dev), D)
    seeds = torch.arange(3)
    latents = R.prior((3, 2, 3, 3), D, 80.0, 2, seeds, dtype=torch.float32)
    x = sample(net, latents.to(dev), D, 2, seeds.to(dev), num_steps=10, backend=backend)
    ref = R.sample(R.optimal_denoiser(data, D), latents, D, 2, seeds, num_steps=10, dtype=torch.float32)
    assert rel_err(x, ref) < 1e-4
    x16 = sample(
        net,
        latents.to(dev),
        D,
        2,
        seeds.to(dev),
        num_steps=10,
        net_dtype=torch.bfloat16,
        channels_last=True,
        backend=backend,
    )
    assert torch.isfinite(x16).all() and rel_err(x16, ref) < 5e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_empty_batch(backend):
    dev = device_for(backend)
    den = R.optimal_denoiser(_data().to(dev), 128.0)
    x = sample(
        den,
        torch.zeros(0, 2, 3, 3, device=dev),
        128.0,
        1,
        torch.zeros(0, dtype=torch.int64, device=dev),
        num_steps=3,
        backend=backend,
    )
    assert x.shape == (0, 2, 3, 3)


class _ProfiledNet(nn.Module):
    """x -> x/2 as an EDMPrecond-like raw network (precond) or a plain denoiser, its work
    inside one profiler range, so that what the sampler itself launches can be counted apart."""

    def __init__(self, precond):
        super().__init__()
        if precond:
            self.sigma_data = 0.5
            self.raw = lambda x_in, c_noise, labels=None: self.forward(x_in, c_noise)

    def forward(self, x, noise, labels=None):
        with torch.profiler.record_function("network"):
            return x * 0.5 + noise.view(-1, 1, 1, 1)


def _top_level_ops(net, num_steps, solver):
    """The sampler's outermost op calls (each an aten/fused op: a kernel launch on a GPU, or a
    view) in one call of `num_steps` steps, by name; the network counts as one call."""
    seeds = torch.arange(3)
    latents = R.prior((3, 1, 4, 4), 8.0, 80.0, 0, seeds)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        sample(net, latents, 8.0, 0, seeds, num_steps=num_steps, solver=solver, backend="cpu")
    return collections.Counter(e.name for e in prof.events() if e.cpu_parent is None)


@needs_ext
@pytest.mark.parametrize("precond", [True, False], ids=["precond", "plain"])
@pytest.mark.parametrize("solver", ["heun", "euler", "dpmpp2m"])
def test_ops_per_step(precond, solver):
    """One more step adds only its network evaluations, the fused updates and one NaN/Inf
    reduction per evaluation: c_noise / σ come from a table made once per call, and the NaN/Inf
    flags are reduced once at the end (before: 18 ops per Heun step — a torch.full and six flag
    ops per evaluation)."""
    net = _ProfiledNet(precond)
    per_step = _top_level_ops(net, 6, solver)
    per_step.subtract(_top_level_ops(net, 5, solver))
    evaluations = 2 if solver == "heun" else 1
    updates = {"heun": 2, "euler": 1, "dpmpp2m": 2}[solver]
    assert +per_step == collections.Counter(
        {"network": evaluations, "aten::linalg_vector_norm": evaluations, "pfgmpp_fast::sampler_update": updates}
    )


def test_a_net_dtype_that_cannot_hold_sigma_is_named():
    """A plain denoiser takes σ in net_dtype: float16 overflows above 65504 (torch.full refused it)."""
    den = R.optimal_denoiser(_data(), 128.0)
    with pytest.raises(ValueError, match=r"net_dtype torch.float16 cannot hold the denoiser's σ input up to 100000"):
        sample(den, torch.randn(2, 2, 3, 3), 128, 1, torch.arange(2), sigma_max=1e5, net_dtype=torch.float16)


def test_sample_validation():
    den = R.optimal_denoiser(_data(), 128.0)
    lat = torch.randn(2, 2, 3, 3)
    ids = torch.arange(2)
    with pytest.raises(ValueError, match="solver"):
        sample(den, lat, 128, 1, ids, solver="rk4", backend="triton")
    with pytest.raises(ValueError, match="S_churn"):
        sample(den, lat, 128, 1, ids, S_churn=-1, backend="triton")
    with pytest.raises(ValueError, match="num_steps"):
        sample(den, lat, 128, 1, ids, num_steps=0, backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        sample(den, lat, 128, 1, ids, dtype=torch.float16, backend="triton")
    with pytest.raises(ValueError, match="batch size"):
        sample(den, lat, 128, 1, torch.arange(3), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        sample(den, lat, 128, 1, ids, backend="fastest")


@pytest.mark.gpu
@pytest.mark.skipif(not ops.has_cuda_kernels(), reason="no CUDA kernels")
def test_sampler_triton_and_cuda_agree():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(16, 3, 32, 32, generator=gen).to(dev)
    base = torch.randn(16, 3, 32, 32, generator=gen).to(dev)
    F = torch.randn(16, 3, 32, 32, generator=gen).to(dev, torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ids = torch.arange(16, device=dev)
    args = (0.3, -0.2, 0.5, 0.25, ids, 7, 0.1, R.stream_alpha(1), 0.2, R.stream_churn(1), 0.7, torch.bfloat16, True)
    a = ops.sampler_update(x, F, base, *args, backend="triton")
    b = ops.sampler_update(x, F, base, *args, backend="cuda")
    assert (
        rel_err(a[0], b[0]) < FP32_REL_TOL and rel_err(a[1], b[1]) < FP32_REL_TOL and rel_err(a[2], b[2]) < HALF_REL_TOL
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C,H,W", [(3, 4, 6), pytest.param(5, 2, 2, marks=pytest.mark.memcheck)])  # C = 5: tiled
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
def test_sampler_update_tiled_channels_last(backend, C, H, W, state_dtype):
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(C * H * W)
    x = torch.randn(7, C, H, W, generator=gen, dtype=torch.float64).to(state_dtype)
    base = torch.randn(7, C, H, W, generator=gen, dtype=torch.float64).to(state_dtype)
    F = torch.randn(7, C, H, W, generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ids = torch.randint(0, 2**62, (7,), generator=gen)
    args = (0.4, -1.1, 0.3, 0.15, ids, 77, 0.2, R.stream_alpha(0), 0.5, R.stream_churn(0), 0.8)
    for net_dtype, cl in ((torch.bfloat16, True), (torch.float32, True), (torch.float32, False)):
        out = ops.sampler_update(
            x.to(dev), F.to(dev), base.to(dev), *args[:4], ids.to(dev), *args[5:], net_dtype, cl, backend=backend
        )
        ref = R.ref_sampler_update(x, F, base, *args, net_dtype, cl)
        assert same_format(out[2], ref[2])
        assert rel_err(out[0], ref[0]) < FP32_REL_TOL and rel_err(out[1], ref[1]) < FP32_REL_TOL
        assert rel_err(out[2], ref[2]) < tol_for(net_dtype)


def test_reference_backend_through_public_api():
    data, D = _data(), 8.0
    seeds = torch.arange(3)
    latents = R.prior((3, 2, 3, 3), D, 80.0, 4, seeds, dtype=torch.float32)
    kw = dict(num_steps=6, S_churn=5.0, alpha=0.02)
    x = sample(R.optimal_denoiser(data, D), latents, D, 4, seeds, backend="reference", **kw)
    ref = R.sample(R.optimal_denoiser(data, D), latents, D, 4, seeds, dtype=torch.float32, **kw)
    assert rel_err(x, ref) < FP32_REL_TOL


# ------------------------------------------------------------ C++ op called directly (CPU, CUDA)

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
    # C = 3 and C = 1 with H*W % 4 == 0 and channels-last operands: CUDA's whole-pixel units
    for shape, dt, fl in itertools.product(
        [(3, 3, 4, 8), (2, 1, 4, 4)], SAMPLER_DTYPES, [(True,) * 5, (False, False, True, False, True)]
    ):
        cases.append((shape, *dt, "channels_last", True, *fl))
    # F at storage offset 1 (not 16-byte aligned: no whole-pixel units, no vector accesses)
    cases.append(
        ((3, 3, 4, 8), torch.float32, torch.bfloat16, torch.bfloat16, "channels_last_offset", True, *(True,) * 5)
    )
    cases.append(((7, 3, 5, 7), torch.float32, torch.float32, torch.float32, "offset", False, *(True,) * 5))
    return cases


SAMPLER_MEMCHECK = [  # channels-last C = 3 and 1 (whole pixels), odd N, F at a storage offset
    ((3, 3, 4, 8), torch.float32, torch.bfloat16, torch.bfloat16, "channels_last", True, *(True,) * 5),
    ((2, 1, 4, 4), torch.float32, torch.bfloat16, torch.bfloat16, "channels_last", True, *(True,) * 5),
    (
        (7, 3, 5, 7),
        torch.float32,
        torch.bfloat16,
        torch.bfloat16,
        "channels_last",
        False,
        True,
        True,
        True,
        True,
        False,
    ),
    ((3, 3, 4, 8), torch.float32, torch.bfloat16, torch.bfloat16, "channels_last_offset", True, *(True,) * 5),
]


def _sampler_case(
    device, shape, state, F_dtype, net_dtype, F_layout, channels_last, has_base, has_y2, has_net, alpha, churn, seed=0
):
    g = seeded(seed)
    B = shape[0]
    x = torch.randn(shape, generator=g, dtype=torch.float64).mul(10).to(state).to(device)
    F = (
        in_layout(torch.randn(shape, generator=g, dtype=torch.float64).to(F_dtype).to(device), F_layout)
        if F_dtype is not None
        else None
    )
    base = torch.randn(shape, generator=g, dtype=torch.float64).to(state).to(device) if has_base else None
    t_hat, t_next, c_skip, c_out = 2.5, 1.7, 0.04, 0.48
    A, Bf, h1 = (1 - c_skip) / t_hat, -c_out / t_hat, t_next - t_hat
    h2 = 0.5 * h1 if has_y2 else None
    c_in_next = 1 / math.sqrt(t_next**2 + 0.25) if has_net else None
    alpha_scale = 0.1 * t_hat if alpha else 0.0
    churn_scale = 0.7 if churn else 0.0
    ids = random_ids(B, seed + 2, device)
    args = (A, Bf, h1, h2)
    tail = (4321, alpha_scale, R.stream_alpha(3), churn_scale, R.stream_churn(3), c_in_next, net_dtype, channels_last)
    y1, y2, net_in = cpp_ops().sampler_update(x, F, base, *args, ids, *tail)
    cpu = lambda t: t.cpu() if t is not None else None  # noqa: E731
    r1, r2, rn = R.ref_sampler_update(x.cpu(), cpu(F), cpu(base), *args, ids.cpu(), *tail)
    assert_close_rel(y1.cpu(), r1, "y1")
    assert_close_rel(y2.cpu(), r2, "y2")
    assert_close_rel(net_in.cpu(), rn, "net_in")
    assert y1.is_contiguous() and y2.is_contiguous()
    if has_net and B:
        fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
        assert net_in.is_contiguous(memory_format=fmt)
    return y1, y2, net_in


@needs_ext
@pytest.mark.parametrize("case", _sampler_cases(), ids=str)
def test_sampler_update_cpu(case):
    _sampler_case("cpu", *case)


@needs_ext
def test_sampler_absent_F_means_no_drift():
    OPS = cpp_ops()
    x = torch.randn(2, 3, 4, 4, generator=seeded(12))
    ids = random_ids(2, 13)
    none = OPS.sampler_update(x, None, None, 1.0, 1.0, 1.0, None, ids, 1, 0.0, 0, 0.0, 0, None, torch.float32, False)
    assert torch.equal(none[0], x)
    assert none[1].numel() == 0 and none[2].numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "change,exc,needle",
    [
        (dict(F=torch.empty(0)), ValueError, "F"),  # an empty tensor is not "no F"
        (dict(base=torch.empty(0)), ValueError, "base"),
        (dict(h2=math.nan), ValueError, "h2"),  # NaN is not "no y2"
        (dict(c_in_next=math.nan), ValueError, "c_in_next"),
        (dict(h2=math.inf), ValueError, "h2"),
    ],
    ids=["empty_F", "empty_base", "nan_h2", "nan_c_in_next", "inf_h2"],
)
def test_sampler_update_has_no_sentinels(backend, change, exc, needle):
    """Absent inputs are None (`Tensor?`, `float?`): the old sentinels are errors on every backend."""
    dev = device_for(backend)
    kw = dict(
        x=torch.randn(2, 3, 4, 4, device=dev),
        F=None,
        base=None,
        A=1.0,
        Bf=1.0,
        h1=1.0,
        h2=None,
        sample_ids=torch.arange(2, device=dev),
        key=1,
        alpha_scale=0.0,
        alpha_stream=0,
        churn_scale=0.0,
        churn_stream=0,
        c_in_next=None,
        net_dtype=torch.float32,
        channels_last=False,
    )
    kw.update({k: v.to(dev) if torch.is_tensor(v) else v for k, v in change.items()})
    with pytest.raises(exc, match=needle):
        ops.sampler_update(*kw.values(), backend=backend)


@needs_ext
@pytest.mark.parametrize(
    "change,exc,needle",
    [
        (dict(x=torch.randn(2, 3, 4, 4).half()), TypeError, "x"),
        (dict(F=torch.randn(2, 3, 4, 5)), ValueError, "F"),
        (dict(base=torch.randn(2, 3, 4, 4).double()), TypeError, "base"),
        (dict(h1=math.nan), ValueError, "h1"),
        (dict(churn_stream=-1), ValueError, "churn_stream"),
        (dict(net_dtype=torch.int32), TypeError, "net_dtype"),
    ],
)
def test_sampler_bad_input(change, exc, needle):
    kw = dict(
        x=torch.randn(2, 3, 4, 4),
        F=torch.randn(2, 3, 4, 4),
        base=None,
        A=1.0,
        Bf=1.0,
        h1=1.0,
        h2=None,
        sample_ids=torch.arange(2),
        key=1,
        alpha_scale=0.0,
        alpha_stream=0,
        churn_scale=0.0,
        churn_stream=0,
        c_in_next=1.0,
        net_dtype=torch.bfloat16,
        channels_last=False,
    )
    kw.update(change)
    with pytest.raises(exc, match=needle):
        cpp_ops().sampler_update(*kw.values())


@needs_ext
def test_fake_impls_match_real_kernels_sampler():
    """opcheck: schema, and fake (meta) outputs agree with the kernels in shape/dtype/strides."""
    OPS = cpp_ops()
    ids = random_ids(3, 1)
    F = torch.randn(3, 3, 4, 5, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 4, 5)
    for args in [
        (x, F, None, 1.0, 2.0, 0.5, 0.25, ids, 3, 0.1, 5, 0.2, 6, 0.3, torch.bfloat16, True),
        (x, None, x, 1.0, 2.0, 0.5, None, ids, 3, 0.0, 5, 0.0, 6, None, torch.float16, False),
    ]:
        torch.library.opcheck(OPS.sampler_update, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("case", memcheck_marked(_sampler_cases()[::2], SAMPLER_MEMCHECK, needs_cuda_kernels), ids=str)
def test_sampler_update_cuda(case):
    _sampler_case("cuda", *case)
