"""Fused perturbation (op level and public perturb / perturb_net_input / prior) vs reference."""
import math

import pytest
import torch

from pfgmpp_fast import ops
from pfgmpp_fast import reference as R
from op_helpers import (BACKENDS, D_VALUES, assert_close_rel, cpp_ops, device_for, in_layout, make_images,
                        needs_cuda_kernels, needs_ext, random_ids, rel_err, rel_err_or_abs, same_format, seeded,
                        tol_for)

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")


DTYPE_PAIRS = [  # (y dtype, net-input dtype)
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64), (torch.float64, torch.bfloat16),
]


def tol(dtype):
    return 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [0, 1, 7])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("y_dtype,out_dtype", DTYPE_PAIRS)
def test_perturb_op_matches_reference(backend, B, layout, y_dtype, out_dtype):
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(hash((B, layout, str(y_dtype), str(out_dtype))) % 2**31)
    y = make_images(B, layout, y_dtype, dev, gen)
    cd = torch.float64 if y_dtype == torch.float64 else torch.float32
    scale = (torch.rand(B, generator=gen, dtype=torch.float64) * 3 + 0.01).to(dev, cd)
    c_in = (torch.rand(B, generator=gen, dtype=torch.float64) + 0.1).to(dev, cd)
    ids = torch.randint(0, 2**62, (B,), generator=gen).to(dev)
    key = int(torch.randint(0, 2**62, (1,), generator=gen))
    channels_last = layout != "contiguous"
    write_x = layout != "strided"
    net_in, x = ops.perturb_op(y, scale, c_in, ids, key, R.STREAM_NOISE, out_dtype, channels_last,
                               write_x, backend=backend)
    ref_net, ref_x = R.ref_perturb(y.cpu(), scale.cpu(), c_in.cpu(), ids.cpu(), key, R.STREAM_NOISE,
                                   out_dtype, channels_last, write_x)
    assert net_in.dtype == out_dtype and net_in.shape == y.shape and net_in.device == dev
    assert same_format(net_in, ref_net)
    assert torch.isfinite(net_in).all()
    assert rel_err(net_in, ref_net) < tol(out_dtype)
    assert x.dtype == cd and x.shape == ref_x.shape
    if write_x:
        assert x.is_contiguous() and torch.isfinite(x).all()
        assert rel_err(x, ref_x) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", D_VALUES)
def test_public_perturb_matches_reference(backend, D):
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(int(min(D, 1e7)))
    y = torch.randn(7, 2, 3, 5, generator=gen)
    ids = torch.randint(0, 2**62, (7,), generator=gen)
    sigma = torch.rand(7, generator=gen, dtype=torch.float64) * 10 + 0.002
    x = ops.perturb(y.to(dev), sigma.to(dev), D, 99, ids.to(dev), backend=backend)
    ref = R.perturb(y, sigma, D, 99, ids)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert torch.isfinite(x).all()
    assert rel_err(x - y.to(dev), ref - y) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturb_keeps_channels_last_and_scalar_sigma(backend):
    dev = device_for(backend)
    y = torch.randn(3, 4, 3, 3).contiguous(memory_format=torch.channels_last).to(dev)
    x = ops.perturb(y, 0.5, 128, 5, torch.arange(3, device=dev), backend=backend)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(x, R.perturb(y.cpu(), 0.5, 128, 5, torch.arange(3))) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [2.0, math.inf])
def test_perturb_net_input(backend, D):
    dev = device_for(backend)
    y = torch.randn(5, 3, 4, 4)
    ids = torch.arange(10, 15)
    sigma = torch.linspace(0.01, 50, 5, dtype=torch.float64)
    net_in, x = ops.perturb_net_input(y.to(dev), sigma.to(dev), D, 7, ids.to(dev), sigma_data=0.5,
                                      out_dtype=torch.bfloat16, channels_last=True, write_x=True,
                                      backend=backend)
    ref_x = R.perturb(y, sigma, D, 7, ids)
    c_in = R.precond(sigma, 0.5)[2].view(-1, 1, 1, 1)
    assert net_in.dtype == torch.bfloat16 and net_in.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(x, ref_x) < 1e-5
    assert rel_err(net_in, c_in * ref_x) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", D_VALUES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prior_matches_reference(backend, D, dtype):
    dev = device_for(backend)
    seeds = torch.tensor([0, 3, 2**40 + 1])
    x = ops.prior((3, 2, 5, 3), D, 80.0, 11, seeds.to(dev), dtype=dtype, backend=backend)
    ref = R.prior((3, 2, 5, 3), D, 80.0, 11, seeds, dtype=dtype)
    assert x.dtype == dtype and x.shape == (3, 2, 5, 3)
    assert torch.isfinite(x).all()
    assert rel_err(x, ref) < 1e-5
    assert ops.prior((0, 2, 5, 3), D, 80.0, 11, seeds[:0].to(dev), backend=backend).shape == (0, 2, 5, 3)


def test_heavy_tail_stays_finite():
    """D << 1: scale clamped at MAX_SCALE, no inf / NaN in the outputs."""
    y = torch.zeros(16, 1, 2, 2)
    x = ops.perturb(y, 1.0, 0.05, 1, torch.arange(16), backend="triton")
    assert torch.isfinite(x).all()


def test_perturb_validation():
    y = torch.randn(2, 3, 4, 4)
    ids = torch.arange(2)
    with pytest.raises(ValueError, match="batch size"):
        ops.perturb(y, 1.0, 2.0, 1, torch.arange(3), backend="triton")
    with pytest.raises(ValueError, match="D"):
        ops.perturb(y, 1.0, 0.0, 1, ids, backend="triton")
    with pytest.raises(ValueError, match="sigma"):
        ops.perturb(y, -1.0, 2.0, 1, ids, backend="triton")
    with pytest.raises(TypeError, match="key"):
        ops.perturb(y, 1.0, 2.0, 1.5, ids, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        ops.perturb(y, 1.0, 2.0, 1, ids, backend="fast")
    with pytest.raises(TypeError, match="out_dtype"):
        ops.perturb_net_input(y, 1.0, 2.0, 1, ids, out_dtype=torch.int8, backend="triton")
    with pytest.raises(TypeError, match="floating-point"):
        ops.perturb(y.to(torch.int32), 1.0, 2.0, 1, ids, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C,H,W,in_cl,out_cl", [(3, 4, 6, False, True), (5, 2, 2, True, True),
                                                 (3, 8, 4, True, False), (1, 4, 4, False, True)])
def test_perturb_op_tiled_channels_last(backend, C, H, W, in_cl, out_cl):
    """H·W % 4 == 0 with a channels-last operand takes the [channels, pixels] tiled path."""
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(C * 100 + H * 10 + W)
    y = torch.randn(7, C, H, W, generator=gen)
    if in_cl:
        y = y.contiguous(memory_format=torch.channels_last)
    scale, c_in = torch.rand(7, generator=gen) + 0.1, torch.rand(7, generator=gen) + 0.1
    ids = torch.randint(0, 2**62, (7,), generator=gen)
    for out_dtype in (torch.float32, torch.bfloat16):
        net_in, x = ops.perturb_op(y.to(dev), scale.to(dev), c_in.to(dev), ids.to(dev), 3, 0, out_dtype,
                                   out_cl, True, backend=backend)
        ref_net, ref_x = R.ref_perturb(y, scale, c_in, ids, 3, 0, out_dtype, out_cl, True)
        assert same_format(net_in, ref_net) and torch.isfinite(net_in).all()
        assert rel_err(net_in, ref_net) < tol(out_dtype) and rel_err(x, ref_x) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.skipif(
    not ops.has_cuda_kernels(), reason="no CUDA kernels"))])
def test_perturb_64bit_indexing(backend):
    """B·N > 2^31: the last samples (whose offsets overflow int32) still match the reference."""
    dev = torch.device("cuda")
    N = 3 * 64 * 64
    B = (2**31) // N + 3
    y_small = torch.randn(1, 3, 64, 64, device=dev)
    y = y_small.expand(B, 3, 64, 64)  # zero batch stride: no 8 GB input
    ids = torch.arange(B, device=dev)
    scale = torch.full((B,), 0.7, device=dev)
    c_in = torch.full((B,), 0.5, device=dev)
    net_in, _ = ops.perturb_op(y, scale, c_in, ids, 5, 0, torch.bfloat16, False, False, backend=backend)
    tail = slice(B - 3, B)
    ref, _ = R.ref_perturb(y[tail].cpu(), scale[tail].cpu(), c_in[tail].cpu(), ids[tail].cpu(), 5, 0,
                           torch.bfloat16, False, False)
    assert rel_err(net_in[tail], ref) < 1e-2
    del net_in
    torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturb_op_other_ranks(backend):
    """[B, N] and 5-D (non-contiguous: copied once) images use the same logical element order."""
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(12)
    for y in (torch.randn(7, 10, generator=gen), torch.randn(3, 2, 3, 2, 5, generator=gen).transpose(3, 4),
              torch.randn(2, 3, 9, generator=gen)[:, :, ::2]):
        B = y.shape[0]
        scale, c_in = torch.rand(B, generator=gen) + 0.1, torch.rand(B, generator=gen) + 0.1
        ids = torch.randint(0, 2**62, (B,), generator=gen)
        net_in, x = ops.perturb_op(y.to(dev), scale.to(dev), c_in.to(dev), ids.to(dev), 8, 0, torch.float32,
                                   False, True, backend=backend)
        ref_net, ref_x = R.ref_perturb(y, scale, c_in, ids, 8, 0, torch.float32, False, True)
        assert net_in.shape == y.shape and rel_err(net_in, ref_net) < 1e-5 and rel_err(x, ref_x) < 1e-5


def test_kernel_ops_reject_mismatched_per_sample_vectors():
    y = torch.randn(3, 2, 4, 4)
    ids = torch.arange(3)
    v = torch.ones(3)
    with pytest.raises(ValueError, match=r"scale must have shape \[3\]"):
        ops.perturb_op(y, torch.ones(2), v, ids, 1, 0, torch.float32, False, False, backend="triton")
    with pytest.raises(TypeError, match="sample_ids must be int64"):
        ops.perturb_op(y, v, v, ids.to(torch.int32), 1, 0, torch.float32, False, False, backend="triton")
    with pytest.raises(ValueError, match="F must have"):
        ops.loss_fwd_bwd(y[:, :1], y, v, v, v, ids, 1, 0, 1.0, backend="triton")
    with pytest.raises(ValueError, match=r"c_out must have shape \[3\]"):
        ops.loss_fwd_bwd(y, y, v, v, torch.ones(3, 1), ids, 1, 0, 1.0, backend="triton")
    with pytest.raises(TypeError, match="net_dtype"):
        ops.sampler_update(y, None, None, 0., 0., 0., 0., ids, 1, 0., 0, 0., 0, 1.0, torch.int32, False,
                           backend="triton")


# ------------------------------------------------------------ C++ op called directly (CPU, CUDA)

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
    ((5, 1, 4, 6), torch.float32, "channels_last", torch.bfloat16, True, True, 8.0),  # C = 1 pixel units
]


def _scales(B, D, seed, dtype, device):
    """Per-sample s = σ·√(D/V) and c_in from a log-normal σ, as the training step makes them."""
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(B, generator=seeded(seed), dtype=torch.float64))
    ids = random_ids(B, seed)
    s = R.noise_scale(sigma, D, 99, ids)
    c_in = R.precond(sigma)[2]
    return s.to(dtype).to(device), c_in.to(dtype).to(device)


def _perturb_case(device, shape, y_dtype, layout, out_dtype, channels_last, write_x, D, seed=0):
    B = shape[0]
    cd = torch.float64 if y_dtype == torch.float64 else torch.float32
    y = in_layout(torch.randn(shape, generator=seeded(seed), dtype=torch.float64).to(y_dtype).to(device), layout)
    scale, c_in = _scales(B, D, seed, cd, device)
    ids = random_ids(B, seed + 1, device)
    key, stream = 31337 + seed, R.STREAM_NOISE
    net_in, x = cpp_ops().perturb(y, scale, c_in, ids, key, stream, out_dtype, channels_last, write_x)
    ref_net, ref_x = R.ref_perturb(y.cpu(), scale.cpu(), c_in.cpu(), ids.cpu(), key, stream,
                                   out_dtype, channels_last, write_x)
    assert_close_rel(net_in.cpu(), ref_net, "net_in")
    assert_close_rel(x.cpu(), ref_x, "x")
    assert net_in.is_contiguous(memory_format=torch.channels_last if channels_last and len(shape) == 4
                                else torch.contiguous_format)
    assert x.is_contiguous()
    return net_in, x


def _case_id(c):
    return f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-cl{c[4]}-x{c[5]}-D{c[6]}"


@needs_ext
@pytest.mark.parametrize("case", PERTURB_CASES, ids=_case_id)
def test_perturb_cpu(case):
    _perturb_case("cpu", *case)


@needs_ext
def test_perturb_noise_independent_of_layout():
    y = torch.randn(3, 5, 4, 6, generator=seeded(3))
    ones, ids = torch.ones(3), random_ids(3, 4)
    outs = [cpp_ops().perturb(in_layout(y, lay), ones, ones, ids, 5, 0, torch.float32, False, True)[1]
            for lay in ("contiguous", "channels_last", "strided")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def _good_perturb_args():
    y = torch.randn(2, 3, 4, 4)
    return dict(y=y, scale=torch.ones(2), c_in=torch.ones(2), sample_ids=torch.arange(2), key=1,
                stream=0, out_dtype=torch.bfloat16, channels_last=True, write_x=False)


@needs_ext
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
        cpp_ops().perturb(*kw.values())


@needs_ext
def test_fake_impls_match_real_kernels_perturb():
    """opcheck: schema, and fake (meta) outputs agree with the kernels in shape/dtype/strides."""
    OPS = cpp_ops()
    y = torch.randn(3, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    s, ids = torch.rand(3) + 0.5, random_ids(3, 1)
    for args in [(y, s, s, ids, 3, 0, torch.bfloat16, True, True), (y, s, s, ids, 3, 0, torch.float32, False, False)]:
        torch.library.opcheck(OPS.perturb, args, test_utils=("test_schema", "test_faketensor"))


@needs_ext
def test_torch_compile_through_cpp_op():
    """torch.compile(fullgraph=True) traces the C++ op through its fake impl and matches eager."""
    cpp_ops()

    def step(y, sigma, ids):
        c_in = 1 / torch.sqrt(sigma * sigma + 0.25)
        net_in, x = torch.ops.pfgmpp_fast.perturb(y * 2 - 1, sigma, c_in, ids, 77, 0, torch.float32,
                                                  True, True)
        return net_in * 3 + 1, x.sum()

    y = torch.rand(4, 3, 8, 8)
    sigma, ids = torch.rand(4) + 0.1, random_ids(4, 2)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for out, ref in zip(compiled(y, sigma, ids), step(y, sigma, ids)):
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("case", [pytest.param(c, marks=needs_cuda_kernels) for c in PERTURB_CASES],
                         ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}")
def test_perturb_cuda(case):
    net_in, x = _perturb_case("cuda", *case)
    cpu_net, cpu_x = _perturb_case("cpu", *case)
    assert rel_err_or_abs(net_in, cpu_net) < tol_for(net_in.dtype)


@pytest.mark.gpu
@needs_ext
def test_cuda_large_and_misaligned():
    """A misaligned (storage offset 1) input takes the scalar path; odd N exercises the tail."""
    y = torch.randn(5 * 3 * 33 * 33 + 1, device="cuda")[1:].view(5, 3, 33, 33)
    ones, ids = torch.ones(5, device="cuda"), random_ids(5, 3, "cuda")
    net_in, x = cpp_ops().perturb(y, ones, ones, ids, 9, 0, torch.bfloat16, False, True)
    ref_net, ref_x = R.ref_perturb(y.cpu(), ones.cpu(), ones.cpu(), ids.cpu(), 9, 0, torch.bfloat16, False, True)
    assert_close_rel(x.cpu(), ref_x, "x")
    assert_close_rel(net_in.cpu(), ref_net, "net_in")


@pytest.mark.gpu
@needs_ext
def test_cuda_device_mismatch_is_reported():
    y = torch.randn(2, 3, 4, 4, device="cuda")
    with pytest.raises(ValueError, match="scale"):
        cpp_ops().perturb(y, torch.ones(2), torch.ones(2, device="cuda"), torch.arange(2, device="cuda"), 1, 0,
                          torch.float32, False, False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("C", [1, 3])
def test_perturb_op_channels_last_whole_pixels(backend, offset, C):
    """Channels-last images with H·W % 4 == 0 and C = 1 or 3 (the CUDA whole-pixel units), from
    an aligned buffer and from one at storage offset 1 (the scalar path), odd B."""
    dev = device_for(backend)
    gen = seeded(40 + 2 * C + offset)
    B, H, W = 5, 16, 16
    flat = torch.randn(offset + B * C * H * W, generator=gen).to(dev)  # the offset survives on dev
    y = flat[offset:].view(B, H, W, C).permute(0, 3, 1, 2)  # channels-last strides
    assert y.is_contiguous(memory_format=torch.channels_last) and y.storage_offset() == offset
    scale, c_in = torch.rand(B, generator=gen) + 0.1, torch.rand(B, generator=gen) + 0.1
    ids = torch.randint(0, 2**62, (B,), generator=gen)
    for out_dtype, out_cl in ((torch.bfloat16, True), (torch.float32, True), (torch.float16, False)):
        net_in, x = ops.perturb_op(y, scale.to(dev), c_in.to(dev), ids.to(dev), 3, 0, out_dtype,
                                   out_cl, True, backend=backend)
        ref_net, ref_x = R.ref_perturb(y.cpu(), scale, c_in, ids, 3, 0, out_dtype, out_cl, True)
        assert same_format(net_in, ref_net) and torch.isfinite(net_in).all() and torch.isfinite(x).all()
        assert rel_err(net_in, ref_net) < tol(out_dtype) and rel_err(x, ref_x) < 1e-5
