"""Fused loss forward+backward (op level), the autograd path and training_loss vs reference."""

import math
import zlib

import pytest
import torch
from op_helpers import (
    BACKENDS,
    D_VALUES,
    FP32_REL_TOL,
    HALF_REL_TOL,
    assert_close_rel,
    case_id,
    cpp_ops,
    device_for,
    in_layout,
    memcheck_marked,
    needs_ext,
    random_ids,
    rel_err,
    seeded,
    tol_for,
)
from torch import nn

from pfgmpp_fast import ops
from pfgmpp_fast import reference as R
from pfgmpp_fast.loss import PFGMPPLoss, training_loss

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")


class TinyPrecond(nn.Module):
    """An EDMPrecond-like stand-in: raw() is a 1x1 conv plus a noise embedding."""

    def __init__(self, channels=3, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.conv = nn.Conv2d(channels, channels, 1)
        self.emb = nn.Linear(1, channels)

    def raw(self, x_in, c_noise, class_labels=None, augment_labels=None):
        h = self.conv(x_in.to(torch.float32))
        return h + self.emb(c_noise.to(torch.float32).view(-1, 1)).view(-1, h.shape[1], 1, 1)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, augment_labels=None):
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = R.precond(sigma, self.sigma_data)
        F = self.raw((c_in * x).to(torch.float32), c_noise.flatten(), class_labels, augment_labels)
        return c_skip * x.to(torch.float32) + c_out * F


# shape, F dtype, F layout, y dtype, y layout, D (None: scale = σ·(1 + uniform)), grad_scale
LOSS_CASES = [
    # every batch size (B = 0 included), F layout and dtype pair on [B, 3, 5, 7] (odd N = 105)
    *[
        ((B, 3, 5, 7), F_dtype, F_layout, y_dtype, y_layout, None, 0.3)
        for B in (0, 1, 7)
        for F_layout, y_layout in (
            ("contiguous", "transposed"),
            ("channels_last", "contiguous"),
            ("transposed", "channels_last"),
        )
        for F_dtype, y_dtype in (
            (torch.float32, torch.float32),
            (torch.bfloat16, torch.float32),
            (torch.float16, torch.float32),
            (torch.float64, torch.float64),
        )
    ],
    # per-sample scales σ·√(D/V) of every D, other ranks, several blocks / chunks per sample
    ((0, 3, 4, 4), torch.bfloat16, "contiguous", torch.float32, "contiguous", 8.0, 1.0),
    ((1, 3, 5, 7), torch.float32, "contiguous", torch.float32, "contiguous", 1.0, 0.5),
    ((7, 3, 5, 7), torch.bfloat16, "channels_last", torch.float32, "contiguous", 2.0, 1 / 7),
    ((7, 3, 5, 7), torch.float16, "channels_last", torch.float32, "channels_last", 128.0, 3.0),
    ((7, 3, 8, 8), torch.float32, "strided", torch.float32, "strided", 2048.0, 1.0),
    ((7, 3, 8, 8), torch.float64, "contiguous", torch.float64, "channels_last", 3072000.0, 1.0),
    ((7, 3, 6, 6), torch.bfloat16, "contiguous", torch.float64, "contiguous", math.inf, 2.0),
    ((5, 37), torch.float32, "contiguous", torch.float32, "contiguous", 8.0, 1.0),
    ((3, 7, 4100), torch.float32, "contiguous", torch.float32, "contiguous", 8.0, 1.0),  # > 1 chunk
    ((2, 3, 64, 64), torch.bfloat16, "channels_last", torch.float32, "contiguous", 8.0, 1.0),  # many chunks
    ((3, 1, 8, 12), torch.float32, "channels_last", torch.float32, "channels_last", 2.0, 1.0),  # C = 1
    ((3, 3, 0, 4), torch.float32, "contiguous", torch.float32, "contiguous", 2.0, 1.0),  # N = 0: loss 0
    ((5, 3, 8, 8), torch.bfloat16, "channels_last_offset", torch.float32, "offset", 8.0, 1.0),  # misaligned
    # H·W % 4 == 0 with a channels-last F: the [channels, pixels] tiled path
    *[
        ((7, C, H, W), F_dtype, "channels_last", torch.float32, "contiguous", None, 0.5)
        for C, H, W in ((3, 4, 6), (5, 2, 2))
        for F_dtype in (torch.float32, torch.bfloat16)
    ],
]


LOSS_MEMCHECK = [  # contiguous with odd N, storage offset, channels-last C = 1, 3 (many chunks), 5
    ((7, 3, 5, 7), torch.float32, "contiguous", torch.float32, "transposed", None, 0.3),
    ((5, 3, 8, 8), torch.bfloat16, "channels_last_offset", torch.float32, "offset", 8.0, 1.0),
    ((3, 1, 8, 12), torch.float32, "channels_last", torch.float32, "channels_last", 2.0, 1.0),
    ((2, 3, 64, 64), torch.bfloat16, "channels_last", torch.float32, "contiguous", 8.0, 1.0),
    ((7, 5, 2, 2), torch.bfloat16, "channels_last", torch.float32, "contiguous", None, 0.5),
]


def _loss(backend, shape, F_dtype, F_layout, y_dtype, y_layout, D, grad_scale):
    """(per-sample loss, grad_F) of the op and of reference.ref_loss_fwd_bwd on one case's inputs."""
    dev = device_for(backend)
    gen = seeded(zlib.crc32(repr((shape, F_dtype, F_layout, y_dtype, y_layout, D, grad_scale)).encode()))
    B = shape[0]
    cd = torch.float64 if torch.float64 in (F_dtype, y_dtype) else torch.float32
    F = in_layout(torch.randn(shape, generator=gen, dtype=torch.float64).to(F_dtype).to(dev), F_layout)
    y = in_layout(torch.randn(shape, generator=gen, dtype=torch.float64).to(y_dtype).to(dev), y_layout)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(B, generator=gen, dtype=torch.float64))
    if D is None:
        scale = sigma * (1 + torch.rand(B, generator=gen, dtype=torch.float64))
    else:
        scale = R.noise_scale(sigma, D, 7, torch.randint(0, 2**62, (B,), generator=gen))
    c_skip, c_out, _, _ = R.precond(sigma)
    args = [t.to(dev, cd) for t in (scale, c_skip, c_out)]
    ids = torch.randint(0, 2**62, (B,), generator=gen).to(dev)
    key = int(torch.randint(0, 2**62, (1,), generator=gen))
    out = ops.loss_fwd_bwd(F, y, *args, ids, key, R.STREAM_NOISE, grad_scale, backend=backend)
    ref = R.ref_loss_fwd_bwd(F.cpu(), y.cpu(), *[a.cpu() for a in args], ids.cpu(), key, R.STREAM_NOISE, grad_scale)
    return F, out, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", memcheck_marked(LOSS_CASES, LOSS_MEMCHECK), ids=case_id)
def test_loss_op_matches_reference(backend, case):
    """Every backend's loss op (the C++ op itself for cpu / cuda) against the reference: the
    per-sample losses elementwise, grad_F (dtype, shape and, for a dense non-empty F, F's exact strides);
    outputs start NaN-poisoned, so an element a kernel skips fails."""
    B = case[0][0]
    F, (loss, grad), (ref_loss, ref_grad) = _loss(backend, *case)
    assert loss.dtype == torch.float32 and loss.shape == (B,) and loss.device.type == device_for(backend).type
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=FP32_REL_TOL, atol=0)
    assert_close_rel(grad.cpu(), ref_grad, "grad_F")
    if B > 0 and (F.is_contiguous() or (F.dim() == 4 and F.is_contiguous(memory_format=torch.channels_last))):
        assert grad.stride() == ref_grad.stride()  # grad_F keeps F's memory format
    if backend == "cuda" and ops.has_extension():  # and the C++ CPU op agrees with the CUDA one
        _, (_, cpu_grad), _ = _loss("cpu", *case)
        assert rel_err(grad, cpu_grad) < tol_for(grad.dtype)


def _net_and_batch(seed, shape, device):
    """A seeded TinyPrecond, images y of `shape` and sample ids 0..B-1, on `device`."""
    torch.manual_seed(seed)
    net = TinyPrecond().to(device)
    return net, torch.randn(*shape, device=device), torch.arange(shape[0], device=device)


def _param_grads(net):
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", D_VALUES)
@pytest.mark.parametrize("B", [1, 7])
def test_training_loss_and_grad_match_reference(backend, D, B):
    """Fused loss (perturb -> raw -> fused fwd+bwd) == autograd through reference.training_loss."""
    dev = device_for(backend)
    torch.manual_seed(B)
    net = TinyPrecond().to(dev)
    y = torch.randn(B, 3, 5, 3, device=dev)
    ids = torch.arange(100, 100 + B, device=dev) * 7919
    loss = training_loss(net, y, D, 2**33 + 1, ids, backend=backend)
    loss.backward()
    fast_grad = _param_grads(net).clone()
    net.zero_grad()
    ref = R.training_loss(net.cpu(), y.cpu(), D, 2**33 + 1, ids.cpu())
    ref.backward()
    ref_grad = _param_grads(net)
    assert loss.shape == () and torch.isfinite(loss)
    assert rel_err(loss, ref) < FP32_REL_TOL
    assert rel_err(fast_grad, ref_grad) < FP32_REL_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_loss_bf16_net_input_and_module(backend):
    dev = device_for(backend)
    net, y, ids = _net_and_batch(0, (4, 3, 4, 4), dev)
    y = y.contiguous(memory_format=torch.channels_last)
    module = PFGMPPLoss(D=128, backend=backend)
    loss = module(net, y, 5, ids, net_dtype=torch.bfloat16)
    loss.backward()
    ref = R.training_loss(net.cpu(), y.cpu(), 128, 5, ids.cpu())
    assert rel_err(loss, ref) < HALF_REL_TOL
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_loss_plain_denoiser_and_empty_batch(backend):
    dev = device_for(backend)
    net, y, ids = _net_and_batch(1, (3, 3, 4, 4), dev)
    plain = lambda x, sigma, labels=None: net(x, sigma, labels)  # noqa: E731  (no .raw: unfused path)
    loss = training_loss(plain, y, 2048, 9, ids, backend=backend)
    assert rel_err(loss, R.training_loss(net.cpu(), y.cpu(), 2048, 9, ids.cpu())) < FP32_REL_TOL
    net.to(dev)
    empty = training_loss(net, y[:0], 2048, 9, ids[:0], backend=backend)
    empty.backward()
    assert empty.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_grad_scales_with_upstream_gradient(backend):
    dev = device_for(backend)
    net, y, ids = _net_and_batch(2, (2, 3, 3, 3), dev)
    (3.0 * training_loss(net, y, 8, 4, ids, backend=backend)).backward()
    g3 = _param_grads(net).clone()
    net.zero_grad()
    training_loss(net, y, 8, 4, ids, backend=backend).backward()
    assert rel_err(g3, 3.0 * _param_grads(net)) < 1e-6


def test_training_loss_validation():
    net = TinyPrecond()
    y = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="batch size"):
        training_loss(net, y, 128, 1, torch.arange(3), backend="triton")
    with pytest.raises(ValueError, match="P_std"):
        training_loss(net, y, 128, 1, torch.arange(2), P_std=0.0, backend="triton")
    with pytest.raises(TypeError, match="net_dtype"):
        training_loss(net, y, 128, 1, torch.arange(2), net_dtype=torch.int8, backend="triton")
    with pytest.raises(ValueError, match="D"):
        PFGMPPLoss(D=-1)
    with pytest.raises(ValueError, match="backend"):
        PFGMPPLoss(D=2, backend="gpu")


def _check_compiled_loss(backend, device, compile_backend):
    net, y, ids = _net_and_batch(0, (8, 3, 8, 8), device)
    y = y.contiguous(memory_format=torch.channels_last)

    def objective(y, ids):
        return training_loss(net, y, 128, 3, ids, backend=backend, net_dtype=torch.bfloat16)

    compiled = torch.compile(objective, fullgraph=True, backend=compile_backend)
    loss_c = compiled(y, ids)
    loss_c.backward()
    grads_c = _param_grads(net).clone()
    net.zero_grad()
    loss_e = objective(y, ids)
    loss_e.backward()
    assert rel_err(loss_c, loss_e) < FP32_REL_TOL
    assert rel_err(grads_c, _param_grads(net)) < FP32_REL_TOL
    torch._dynamo.reset()


@pytest.mark.skipif(not ops.has_extension(), reason="pfgmpp_fast._C not built")
def test_compiled_objective_fullgraph_cpu_ops():
    """torch.compile(fullgraph=True) traces the C++ ops (fake impls) and the fused-loss autograd
    Function without a graph break; aot_eager keeps the CPU test fast."""
    _check_compiled_loss("cpu", torch.device("cpu"), "aot_eager")


@pytest.mark.gpu
def test_compiled_objective_fullgraph_gpu():
    """The same with inductor on the GPU, through the Triton ops (and the CUDA ops when built);
    compile over triton_op needs CUDA (docs/DESIGN.md §8)."""
    for backend in ["triton"] + (["cuda"] if ops.has_cuda_kernels() else []):
        _check_compiled_loss(backend, torch.device("cuda"), "inductor")


@pytest.mark.gpu
@pytest.mark.skipif(not ops.has_cuda_kernels(), reason="no CUDA kernels")
def test_triton_and_cuda_agree():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(5)
    y = torch.randn(16, 3, 32, 32, generator=gen).to(dev)
    F = torch.randn(16, 3, 32, 32, generator=gen).to(dev, torch.bfloat16)
    v = torch.rand(16, generator=gen).to(dev) + 0.1
    ids = torch.arange(16, device=dev)
    a = ops.loss_fwd_bwd(F, y, v, v / 2, v, ids, 3, 0, 0.5, backend="triton")
    b = ops.loss_fwd_bwd(F, y, v, v / 2, v, ids, 3, 0, 0.5, backend="cuda")
    assert rel_err(a[0], b[0]) < FP32_REL_TOL and rel_err(a[1], b[1]) < HALF_REL_TOL
    p = ops.perturb_op(y, v, v, ids, 3, 0, torch.bfloat16, True, True, backend="triton")
    q = ops.perturb_op(y, v, v, ids, 3, 0, torch.bfloat16, True, True, backend="cuda")
    assert rel_err(p[0], q[0]) < HALF_REL_TOL and rel_err(p[1], q[1]) < FP32_REL_TOL


def test_reference_backend_through_public_api():
    """backend='reference' runs the same fused autograd path on reference.ref_loss_fwd_bwd."""
    net, y, ids = _net_and_batch(3, (3, 3, 4, 4), "cpu")
    loss = training_loss(net, y, 2.0, 6, ids, backend="reference")
    loss.backward()
    g = _param_grads(net).clone()
    net.zero_grad()
    ref = R.training_loss(net, y, 2.0, 6, ids)
    ref.backward()
    assert rel_err(loss, ref) < FP32_REL_TOL and rel_err(g, _param_grads(net)) < FP32_REL_TOL


# ------------------------------------------- C++ op called directly: autograd check, its own checks, fake impl


@needs_ext
def test_loss_matches_autograd_of_reference_loss():
    """grad_F is d/dF of grad_scale·Σ(F − T)²: check against torch.autograd on the reference."""
    shape, B = (3, 2, 5, 5), 3
    F = torch.randn(shape, generator=seeded(8), dtype=torch.float64, requires_grad=True)
    y = torch.randn(shape, generator=seeded(9), dtype=torch.float64)
    s, cs, co = (
        torch.rand(B, dtype=torch.float64) + 0.5,
        torch.rand(B, dtype=torch.float64),
        torch.rand(B, dtype=torch.float64) + 0.5,
    )
    ids = random_ids(B, 10)
    g = R.normal(11, ids, 50, 0).double().view(shape)
    T = ((1 - cs.view(-1, 1, 1, 1)) * y - cs.view(-1, 1, 1, 1) * s.view(-1, 1, 1, 1) * g) / co.view(-1, 1, 1, 1)
    (0.25 * (F - T).square().sum()).backward()
    loss, grad = cpp_ops().loss_fwd_bwd(F.detach(), y, s, cs, co, ids, 11, 0, 0.25)
    torch.testing.assert_close(grad, F.grad, rtol=FP32_REL_TOL, atol=1e-6)
    torch.testing.assert_close(loss.double(), (F - T).detach().square().flatten(1).sum(1), rtol=FP32_REL_TOL, atol=0)


@needs_ext
@pytest.mark.parametrize(
    "change,exc,needle",
    [
        (dict(y=torch.randn(2, 3, 4, 5)), ValueError, "y"),
        (dict(c_out=torch.ones(2, 1)), ValueError, "c_out"),
        (dict(grad_scale=math.inf), ValueError, "grad_scale"),
        (dict(F=torch.ones(2, 3, 4, 4, dtype=torch.int32)), TypeError, "F"),
    ],
)
def test_loss_bad_input(change, exc, needle):
    kw = dict(
        F=torch.randn(2, 3, 4, 4),
        y=torch.randn(2, 3, 4, 4),
        scale=torch.ones(2),
        c_skip=torch.ones(2),
        c_out=torch.ones(2),
        sample_ids=torch.arange(2),
        key=1,
        stream=0,
        grad_scale=1.0,
    )
    kw.update(change)
    with pytest.raises(exc, match=needle):
        cpp_ops().loss_fwd_bwd(*kw.values())


@needs_ext
def test_fake_impls_match_real_kernels_loss():
    """opcheck: schema, and fake (meta) outputs agree with the kernels in shape/dtype/strides."""
    s, ids = torch.rand(3) + 0.5, random_ids(3, 1)
    F = torch.randn(3, 3, 4, 5, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 4, 5)
    torch.library.opcheck(
        cpp_ops().loss_fwd_bwd, (F, x, s, s, s, ids, 3, 0, 1.0), test_utils=("test_schema", "test_faketensor")
    )


# The Triton GPU kernels' rounding of the fp32 loss target (docs/KERNEL_OPS.md, "Rounding per
# backend"): div.full.f32 within 2 ulp of the exact quotient (the PTX ISA's bound; test_triton_aot
# checks Triton emits it), the numerator contracted into one fma, libdevice normals within a few
# ulp of the exact ones.
GPU_DIV_ULPS, GPU_NORMAL_ULPS = 2, 4


def _away(t, direction, ulps):
    """t moved `ulps` float32 ulps towards direction (+inf / -inf per element)."""
    for _ in range(ulps):
        t = torch.nextafter(t, direction)
    return t


def test_fp32_tolerance_covers_the_gpu_kernels_rounding():
    """Every element of the target T = fma(1 − c_skip, y, −(c_skip·s)·g) / c_out pushed to the
    GPU bounds, each in the direction that grows |F − T|: the gradient and the per-sample losses
    still pass the op tests' fp32 tolerance with a 4x margin (a GPU run cannot fail on rounding
    the CPU interpreter, which divides exactly and never contracts, does not show)."""
    B, shape = 7, (7, 3, 32, 32)
    gen = seeded(23)
    F, y = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(B, generator=gen, dtype=torch.float64))
    c_skip, c_out = (v.float() for v in R.precond(sigma)[:2])
    scale, ids = (sigma * (1 + torch.rand(B, generator=gen, dtype=torch.float64))).float(), torch.arange(B)
    ref_loss, ref_grad = R.ref_loss_fwd_bwd(F, y, scale, c_skip, c_out, ids, 5, 0, 1.0)
    per_sample = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    a, bz, co = per_sample(1 - c_skip), per_sample(c_skip * scale), per_sample(c_out)
    g = R.normal(5, ids, 3 * 32 * 32, 0).view(shape)
    up = torch.where(F > (a * y - bz * g) / co, math.inf, -math.inf)  # T moves away from F ...
    g = _away(g, up, GPU_NORMAL_ULPS)  # ... when g grows where F > T (dT/dg = -bz/c_out < 0)
    numerator = (a.double() * y.double() - (bz * g).double()).float()  # a·y fused: one rounding
    T = _away(numerator / co, -up, GPU_DIV_ULPS)  # rounded quotient + 2 ulp: beyond div.full's bound
    diff = F - T
    assert rel_err(2 * diff, ref_grad) < FP32_REL_TOL / 4
    torch.testing.assert_close(diff.square().flatten(1).sum(1), ref_loss, rtol=FP32_REL_TOL / 4, atol=0)
