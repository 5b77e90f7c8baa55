"""Fused perturbation (op level and public perturb / perturb_net_input / prior) vs reference."""

import math
import zlib

import pytest
import torch
from op_helpers import (
    BACKENDS,
    D_VALUES,
    FP32_REL_TOL,
    HALF_REL_TOL,
    LAYOUTS,
    assert_close_rel,
    case_id,
    cpp_ops,
    device_for,
    in_layout,
    memcheck_marked,
    needs_ext,
    random_ids,
    rel_err,
    same_format,
    seeded,
    tol_for,
)

from pfgmpp_fast import ops
from pfgmpp_fast import reference as R

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")


DTYPE_PAIRS = [  # (y dtype, net-input dtype)
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float64, torch.float64),
    (torch.float64, torch.bfloat16),
]

# shape, y dtype, y layout, out dtype, channels_last, write_x, D (None: scale uniform in [0.01, 3.01))
PERTURB_CASES = [
    # every batch size (B = 0 included), layout and dtype pair on [B, 3, 5, 7] (odd N = 105)
    *[
        ((B, 3, 5, 7), y_dtype, layout, out_dtype, layout != "contiguous", layout != "transposed", None)
        for B in (0, 1, 7)
        for layout in ("contiguous", "channels_last", "transposed")
        for y_dtype, out_dtype in DTYPE_PAIRS
    ],
    # per-sample scales σ·√(D/V) of every D, half-precision inputs, other ranks and strides
    ((0, 3, 4, 4), torch.float32, "contiguous", torch.bfloat16, True, True, 8.0),
    ((1, 3, 5, 7), torch.float32, "contiguous", torch.float32, False, True, 1.0),
    ((7, 3, 5, 7), torch.float32, "channels_last", torch.bfloat16, True, True, 2.0),
    ((7, 3, 5, 7), torch.float32, "strided", torch.float16, False, False, 128.0),
    ((7, 3, 8, 8), torch.float64, "contiguous", torch.float64, False, True, 2048.0),
    ((7, 3, 8, 8), torch.float64, "channels_last", torch.float32, True, True, 3072000.0),
    ((7, 3, 6, 6), torch.bfloat16, "contiguous", torch.bfloat16, False, True, 128.0),
    ((7, 3, 6, 6), torch.float16, "channels_last", torch.float16, True, False, math.inf),
    ((5, 37), torch.float32, "contiguous", torch.bfloat16, True, True, 8.0),
    ((7, 10), torch.float32, "contiguous", torch.float32, False, True, None),
    ((3, 2, 3, 5, 3), torch.float32, "strided", torch.float32, False, True, 1.0),
    ((3, 2, 3, 5, 2), torch.float32, "transposed", torch.float32, False, True, None),  # 5-D, copied once
    ((2, 3, 5), torch.float32, "strided", torch.float32, False, True, None),
    ((5, 1, 4, 6), torch.float32, "channels_last", torch.bfloat16, True, True, 8.0),  # C = 1 pixel units
    # H·W % 4 == 0 with a channels-last operand: the [channels, pixels] tiled path
    *[
        ((7, C, H, W), torch.float32, "channels_last" if in_cl else "contiguous", out_dtype, out_cl, True, None)
        for C, H, W, in_cl, out_cl in (
            (3, 4, 6, False, True),
            (5, 2, 2, True, True),
            (3, 8, 4, True, False),
            (1, 4, 4, False, True),
        )
        for out_dtype in (torch.float32, torch.bfloat16)
    ],
    # channels-last whole pixels (C = 1, 3: the CUDA pixel units), aligned and at storage offset 1
    *[
        ((5, C, 16, 16), torch.float32, layout, out_dtype, out_cl, True, None)
        for C in (1, 3)
        for layout in ("channels_last", "channels_last_offset")
        for out_dtype, out_cl in ((torch.bfloat16, True), (torch.float32, True), (torch.float16, False))
    ],
    ((5, 3, 33, 33), torch.float32, "offset", torch.bfloat16, False, True, None),  # misaligned: scalar path
]
PERTURB_MEMCHECK = [  # contiguous with odd N, storage offset, channels-last C = 1, 3 (at an offset), 5
    ((7, 3, 5, 7), torch.float32, "contiguous", torch.float32, False, True, None),
    ((5, 3, 33, 33), torch.float32, "offset", torch.bfloat16, False, True, None),
    ((5, 1, 16, 16), torch.float32, "channels_last", torch.bfloat16, True, True, None),
    ((5, 3, 16, 16), torch.float32, "channels_last_offset", torch.bfloat16, True, True, None),
    ((7, 5, 2, 2), torch.float32, "channels_last", torch.bfloat16, True, True, None),
]


def _scales(B, D, gen, dtype, device):
    """Per-sample scale and c_in: from a log-normal σ as the training step makes them
    (s = σ·√(D/V), c_in(σ)), or, for D = None, uniform ones."""
    if D is None:
        scale = torch.rand(B, generator=gen, dtype=torch.float64) * 3 + 0.01
        c_in = torch.rand(B, generator=gen, dtype=torch.float64) + 0.1
    else:
        sigma = torch.exp(-1.2 + 1.2 * torch.randn(B, generator=gen, dtype=torch.float64))
        scale = R.noise_scale(sigma, D, 99, torch.randint(0, 2**62, (B,), generator=gen))
        c_in = R.precond(sigma)[2]
    return scale.to(device, dtype), c_in.to(device, dtype)


def _perturb(backend, shape, y_dtype, layout, out_dtype, channels_last, write_x, D):
    """(net_in, x) of the op and of reference.ref_perturb on one case's inputs."""
    dev = device_for(backend)
    gen = seeded(zlib.crc32(repr((shape, y_dtype, layout, out_dtype, channels_last, write_x, D)).encode()))
    y = in_layout(torch.randn(shape, generator=gen, dtype=torch.float64).to(y_dtype).to(dev), layout)
    scale, c_in = _scales(shape[0], D, gen, R.compute_dtype(y), dev)
    ids = torch.randint(0, 2**62, (shape[0],), generator=gen).to(dev)
    key = int(torch.randint(0, 2**62, (1,), generator=gen))
    out = ops.perturb_op(y, scale, c_in, ids, key, R.STREAM_NOISE, out_dtype, channels_last, write_x, backend=backend)
    ref = R.ref_perturb(
        y.cpu(), scale.cpu(), c_in.cpu(), ids.cpu(), key, R.STREAM_NOISE, out_dtype, channels_last, write_x
    )
    return out, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", memcheck_marked(PERTURB_CASES, PERTURB_MEMCHECK), ids=case_id)
def test_perturb_op_matches_reference(backend, case):
    """Every backend's perturb op (the C++ op itself for cpu / cuda) against the reference: values,
    dtypes, shapes, the network input's memory format, x contiguous in the compute dtype (empty
    unless write_x); outputs start NaN-poisoned, so an element a kernel skips fails."""
    shape, _, _, out_dtype, channels_last, _, _ = case
    (net_in, x), (ref_net, ref_x) = _perturb(backend, *case)
    assert net_in.device.type == device_for(backend).type
    assert_close_rel(net_in.cpu(), ref_net, "net_in")
    assert_close_rel(x.cpu(), ref_x, "x")
    assert same_format(net_in, ref_net)
    assert net_in.is_contiguous(
        memory_format=torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    )
    assert x.is_contiguous()
    if backend == "cuda" and ops.has_extension():  # and the C++ CPU op agrees with the CUDA one
        (cpu_net, _), _ = _perturb("cpu", *case)
        assert rel_err(net_in, cpu_net) < tol_for(out_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturb_noise_independent_of_layout(backend):
    """Bit-identical x for the same values in every input layout (noise follows the logical element)."""
    dev = device_for(backend)
    y = torch.randn(3, 5, 4, 6, generator=seeded(3)).to(dev)
    ones, ids = torch.ones(3, device=dev), random_ids(3, 4, dev)
    outs = [
        ops.perturb_op(in_layout(y, lay), ones, ones, ids, 5, 0, torch.float32, False, True, backend=backend)[1]
        for lay in LAYOUTS
    ]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


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
    assert rel_err(x - y.to(dev), ref - y) < FP32_REL_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturb_keeps_channels_last_and_scalar_sigma(backend):
    dev = device_for(backend)
    y = torch.randn(3, 4, 3, 3).contiguous(memory_format=torch.channels_last).to(dev)
    x = ops.perturb(y, 0.5, 128, 5, torch.arange(3, device=dev), backend=backend)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(x, R.perturb(y.cpu(), 0.5, 128, 5, torch.arange(3))) < FP32_REL_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [2.0, math.inf])
def test_perturb_net_input(backend, D):
    dev = device_for(backend)
    y = torch.randn(5, 3, 4, 4)
    ids = torch.arange(10, 15)
    sigma = torch.linspace(0.01, 50, 5, dtype=torch.float64)
    net_in, x = ops.perturb_net_input(
        y.to(dev),
        sigma.to(dev),
        D,
        7,
        ids.to(dev),
        sigma_data=0.5,
        out_dtype=torch.bfloat16,
        channels_last=True,
        write_x=True,
        backend=backend,
    )
    ref_x = R.perturb(y, sigma, D, 7, ids)
    c_in = R.precond(sigma, 0.5)[2].view(-1, 1, 1, 1)
    assert net_in.dtype == torch.bfloat16 and net_in.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(x, ref_x) < FP32_REL_TOL
    assert rel_err(net_in, c_in * ref_x) < HALF_REL_TOL


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
    assert rel_err(x, ref) < FP32_REL_TOL
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


@pytest.mark.gpu
@pytest.mark.parametrize(
    "backend",
    ["triton", pytest.param("cuda", marks=pytest.mark.skipif(not ops.has_cuda_kernels(), reason="no CUDA kernels"))],
)
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
    ref, _ = R.ref_perturb(
        y[tail].cpu(), scale[tail].cpu(), c_in[tail].cpu(), ids[tail].cpu(), 5, 0, torch.bfloat16, False, False
    )
    assert rel_err(net_in[tail], ref) < HALF_REL_TOL
    del net_in
    torch.cuda.empty_cache()


LARGE_B = 66_000  # more samples than a CUDA grid has rows (65535): the loss's blocks stride over samples


def _large_batch_call(op, ids, y, F, v):
    """(the op, its reference, their arguments) of `op` on a batch's ids, images y, F and scalars v."""
    if op == "philox_normal":
        return ops.philox_normal, R.normal_unchecked, (9, ids, 48, 0)
    if op == "perturb":
        return ops.perturb_op, R.ref_perturb, (y, v, v, ids, 9, 0, torch.bfloat16, True, True)
    if op == "loss_fwd_bwd":
        return ops.loss_fwd_bwd, R.ref_loss_fwd_bwd, (F, y, v, v / 2, v, ids, 9, 0, 0.5)
    step = (0.3, -0.2, 0.5, 0.25, ids, 9, 0.1, R.stream_alpha(1), 0.2, R.stream_churn(1), 0.7, torch.bfloat16, True)
    return ops.sampler_update, R.ref_sampler_update, (y, F, y, *step)


@pytest.mark.memcheck
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
@pytest.mark.parametrize("op", ["philox_normal", "perturb", "loss_fwd_bwd", "sampler_update"])
def test_every_op_at_a_large_batch(backend, op):
    """B = 66000 (more than a grid's 65535 rows) through every op that draws, on channels-last RGB
    images (the CUDA whole-pixel units): the first and last samples against the reference."""
    gen, dev = seeded(66), device_for(backend)
    shape = (LARGE_B, 3, 4, 4)
    y = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
    F = torch.randn(shape, generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    inputs = (random_ids(LARGE_B, 67), y, F, torch.rand(LARGE_B, generator=gen) + 0.5)
    fast, ref, args = _large_batch_call(op, *(t.to(dev) for t in inputs))
    out = fast(*args, backend=backend)
    ends = torch.tensor([0, 1, LARGE_B - 2, LARGE_B - 1])
    _, _, ref_args = _large_batch_call(op, *(t[ends] for t in inputs))
    expected = ref(*ref_args)
    out, expected = (out, expected) if isinstance(out, tuple) else ((out,), (expected,))
    for i, (o, r) in enumerate(zip(out, expected, strict=True)):
        assert o.shape[0] == LARGE_B
        assert_close_rel(o[ends.to(dev)].cpu(), r, f"{op} output {i}")


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
        ops.sampler_update(
            y, None, None, 0.0, 0.0, 0.0, 0.0, ids, 1, 0.0, 0, 0.0, 0, 1.0, torch.int32, False, backend="triton"
        )


# ------------------------------------------------------------ C++ op called directly: its own checks, fake impl


def _good_perturb_args():
    y = torch.randn(2, 3, 4, 4)
    return dict(
        y=y,
        scale=torch.ones(2),
        c_in=torch.ones(2),
        sample_ids=torch.arange(2),
        key=1,
        stream=0,
        out_dtype=torch.bfloat16,
        channels_last=True,
        write_x=False,
    )


@needs_ext
@pytest.mark.parametrize(
    "change,exc,needle",
    [
        (dict(sample_ids=torch.arange(2, dtype=torch.int32)), TypeError, "sample_ids"),
        (dict(sample_ids=torch.arange(3)), ValueError, "sample_ids"),
        (dict(y=torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "y"),
        (dict(y=torch.tensor(1.0)), ValueError, "y"),
        (dict(scale=torch.ones(3)), ValueError, "scale"),
        (dict(c_in=torch.ones(2, dtype=torch.int32)), TypeError, "c_in"),
        (dict(key=-1), ValueError, "key"),
        (dict(stream=2**32), ValueError, "stream"),
        (dict(out_dtype=torch.int8), TypeError, "out_dtype"),
    ],
)
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
        net_in, x = torch.ops.pfgmpp_fast.perturb(y * 2 - 1, sigma, c_in, ids, 77, 0, torch.float32, True, True)
        return net_in * 3 + 1, x.sum()

    y = torch.rand(4, 3, 8, 8)
    sigma, ids = torch.rand(4) + 0.1, random_ids(4, 2)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for out, ref in zip(compiled(y, sigma, ids), step(y, sigma, ids)):
        torch.testing.assert_close(out, ref)


@pytest.mark.gpu
@needs_ext
def test_cuda_device_mismatch_is_reported():
    y = torch.randn(2, 3, 4, 4, device="cuda")
    with pytest.raises(ValueError, match="scale"):
        cpp_ops().perturb(
            y,
            torch.ones(2),
            torch.ones(2, device="cuda"),
            torch.arange(2, device="cuda"),
            1,
            0,
            torch.float32,
            False,
            False,
        )
