"""Philox4x32-10, normals and chi2_D of every backend (Triton, C++ CPU, CUDA) against
reference.py, through ops.* and through torch.ops.pfgmpp_fast directly
(the sm_90 compile of the Triton kernels is in test_triton_aot.py, of the CUDA kernels in
test_cuda_compile.py)."""

import math

import torch

import pytest

from pfgmpp_fast import ops
from pfgmpp_fast import reference as R
from op_helpers import BACKENDS, CPP_D_VALUES, cpp_ops, device_for, needs_ext, random_ids, seeded

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")


# Random123 known answers for philox4x32_10 (counter, key=(k0, k1), output)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_philox_known_answers(backend):
    dev = device_for(backend)
    for ctr, (k0, k1), expected in KAT:
        key = (k1 << 32) | k0
        if key >= 2**63:  # the ops take keys in [0, 2^63); the all-ones key is checked via the reference
            assert tuple(R.philox4x32(torch.tensor([ctr]), key)[0].tolist()) == expected
            continue
        out = ops.philox4x32(torch.tensor([ctr], dtype=torch.int64, device=dev), key, backend=backend)
        assert tuple(out[0].tolist()) == expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", [0, 1, 33])
def test_philox_bit_exact_random_counters(backend, M):
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(1000 + M)
    counter = torch.randint(0, 2**32, (M, 4), generator=gen, dtype=torch.int64)
    key = int(torch.randint(0, 2**62, (1,), generator=gen)) * 2 + 1
    out = ops.philox4x32(counter.to(dev), key, backend=backend).cpu()
    assert out.dtype == torch.int64 and out.shape == (M, 4)
    assert torch.equal(out, R.philox4x32(counter, key))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 3, 37, 260])
def test_philox_normal_matches_reference(backend, n):
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(n)
    ids = torch.cat([torch.tensor([0, 2**32 - 1, 2**32, 2**62 + 7]),
                     torch.randint(0, 2**62, (3,), generator=gen)])
    for key, stream in [(0, R.STREAM_NOISE), (2**40 + 3, R.stream_churn(5)), (12345, R.stream_alpha(17))]:
        out = ops.philox_normal(key, ids.to(dev), n, stream, backend=backend).cpu()
        ref = R.normal(key, ids, n, stream)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_philox_normal_empty_batch(backend):
    out = ops.philox_normal(1, torch.zeros(0, dtype=torch.int64, device=device_for(backend)), 5, 0,
                            backend=backend)
    assert out.shape == (0, 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [0.3, 1.0, 2.0, 8.0, 128.0, 2048.0, 3072000.0])
def test_chi2_matches_reference(backend, D):
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(int(D * 10))
    ids = torch.cat([torch.tensor([0, 1, 2**33 + 5]), torch.randint(0, 2**62, (61,), generator=gen)])
    out = ops.chi2(2**35 + 11, ids.to(dev), D, R.STREAM_CHI2, backend=backend).cpu()
    ref = R.chi2(2**35 + 11, ids, D)
    assert out.dtype == torch.float64 and out.shape == (64,)
    assert torch.isfinite(out).all() and (out > 0).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chi2_moments(backend):
    """Mean D, variance 2D: the kernel draws the right law, not only the reference's values."""
    n = 1000
    ids = torch.arange(n, device=device_for(backend))
    for D in (2.0, 128.0):
        v = ops.chi2(3, ids, D, backend=backend).cpu()
        assert abs(v.mean().item() - D) < 4 * (2 * D / n) ** 0.5  # 4 standard errors
        assert abs(v.var().item() / (2 * D) - 1) < 4 * (8 / n) ** 0.5  # sd of the ratio <= sqrt(8/n)


def test_bad_inputs_fail_clearly():
    ids = torch.arange(3)
    with pytest.raises(ValueError, match="backend"):
        ops.philox_normal(1, ids, 4, 0, backend="gpu")
    with pytest.raises(ValueError, match="key"):
        ops.philox_normal(-1, ids, 4, 0, backend="triton")
    with pytest.raises(ValueError, match="D"):
        ops.chi2(1, ids, float("inf"), backend="triton")
    with pytest.raises(ValueError, match="D"):
        ops.chi2(1, ids, -2.0, backend="triton")
    if not ops.has_extension():
        with pytest.raises(RuntimeError, match="not built"):
            ops.philox_normal(1, ids, 4, 0, backend="cpu")
    if not ops.has_cuda_kernels():
        with pytest.raises(RuntimeError, match="CUDA"):
            ops.philox_normal(1, ids, 4, 0, backend="cuda")



# ------------------------------------------------------------ C++ ops called directly (CPU, CUDA)


@needs_ext
@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers_raw(ctr, key, expected):
    """The shared header (csrc/philox.h) through the raw 32-bit entry point: full key range."""
    from pfgmpp_fast import _C

    assert tuple(_C.philox4x32_raw(*ctr, *key)) == expected


@needs_ext
@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers_op(ctr, key, expected):
    k0, k1 = key
    if k1 >= 2**31:
        pytest.skip("the op's key is an int < 2^63 (k1 < 2^31); covered by the raw test")
    out = cpp_ops().philox4x32(torch.tensor([ctr], dtype=torch.int64), (k1 << 32) | k0)
    assert tuple(out[0].tolist()) == expected


def _philox_case(device):
    g = seeded(1)
    ctr = torch.randint(0, 2**32, (1001, 4), generator=g)
    for key in (0, 1, 2**63 - 1, int(torch.randint(0, 2**62, (1,), generator=g))):
        out = cpp_ops().philox4x32(ctr.to(device), key)
        assert torch.equal(out.cpu(), R.philox4x32(ctr, key)), f"key={key}"
    assert cpp_ops().philox4x32(torch.empty(0, 4, dtype=torch.int64, device=device), 5).shape == (0, 4)


@needs_ext
def test_philox_bit_exact_cpu():
    _philox_case("cpu")


def _normal_case(device):
    for B, n, stream in ((0, 5, 0), (1, 1, 0), (7, 1027, R.stream_churn(3)), (33, 6, R.STREAM_SIGMA)):
        ids = random_ids(B, n, device)
        out = cpp_ops().philox_normal(ids, 987654321, n, stream)
        ref = R.normal(987654321, ids.cpu(), n, stream)
        assert out.dtype == torch.float32 and out.shape == (B, n)
        torch.testing.assert_close(out.cpu(), ref, atol=1e-6, rtol=1e-6)


@needs_ext
def test_philox_normal_cpu():
    _normal_case("cpu")


def _chi2_case(device, D):
    ids = random_ids(257, int(D) % 1000, device)
    out = cpp_ops().chi2(ids, 2024, D, R.STREAM_CHI2)
    ref = R.chi2(2024, ids.cpu(), D, R.STREAM_CHI2)
    assert out.dtype == torch.float64 and out.shape == (257,)
    assert (out > 0).all()
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=0)


@needs_ext
@pytest.mark.parametrize("D", CPP_D_VALUES + (0.5,))
def test_chi2_cpu(D):
    _chi2_case("cpu", D)


@needs_ext
def test_rng_bad_input():
    OPS = cpp_ops()
    with pytest.raises(ValueError, match="D"):
        OPS.chi2(torch.arange(3), 1, math.inf, 2)
    with pytest.raises(ValueError, match="n"):
        OPS.philox_normal(torch.arange(3), 1, -1, 0)
    with pytest.raises(ValueError, match="counter"):
        OPS.philox4x32(torch.zeros(3, 3, dtype=torch.int64), 1)


@needs_ext
def test_fake_impls_match_real_kernels_rng():
    """opcheck: schema, and fake (meta) outputs agree with the kernels in shape/dtype/strides."""
    OPS = cpp_ops()
    ids = random_ids(3, 1)
    cases = [
        (OPS.philox4x32, (torch.randint(0, 2**32, (5, 4)), 3)),
        (OPS.philox_normal, (ids, 3, 13, 0)),
        (OPS.chi2, (ids, 3, 8.0, 2)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_uninitialized_memory_is_poisoned(backend):
    """The fixture's poisoning reaches the device of each backend (at::empty of the C++ ops
    goes through the same empty_cpu / empty_cuda), so an output element a kernel skips is NaN."""
    assert torch.isnan(torch.empty(1000, device=device_for(backend))).all()


@needs_ext
@pytest.mark.gpu
def test_cuda_rng_matches_reference():
    assert ops.has_cuda_kernels(), "CUDA device present but the extension has no CUDA kernels"
    _philox_case("cuda")
    _normal_case("cuda")
    for D in CPP_D_VALUES + (0.5,):
        _chi2_case("cuda", D)
