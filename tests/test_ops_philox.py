"""Philox4x32-10, normals and chi2_D of every backend (Triton, C++ CPU, CUDA) against
reference.py, through ops.* (for cpu / cuda the C++ ops themselves); the C++ ops' own checks
and fake impls through torch.ops.pfgmpp_fast directly (the sm_90 compile of the Triton kernels
is in test_triton_aot.py, of the CUDA kernels in test_cuda_compile.py)."""

import math

import pytest
import torch
from op_helpers import (
    BACKENDS,
    CHI2_REL_TOL,
    FINITE_D_VALUES,
    KAT,
    NORMAL_TOL,
    cpp_ops,
    device_for,
    memcheck_marked,
    needs_ext,
    random_ids,
    seeded,
)

from pfgmpp_fast import ops
from pfgmpp_fast import reference as R

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")


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
@pytest.mark.parametrize("M", memcheck_marked([0, 1, 33, 1001], [1001]))
def test_philox4x32_matches_reference(backend, M):
    """Bit-exact Philox words of random counters under keys at both ends of [0, 2^63)."""
    dev = device_for(backend)
    gen = seeded(1000 + M)
    counter = torch.randint(0, 2**32, (M, 4), generator=gen, dtype=torch.int64)
    for key in (0, 1, 2**63 - 1, int(torch.randint(0, 2**62, (1,), generator=gen)) * 2 + 1):
        out = ops.philox4x32(counter.to(dev), key, backend=backend)
        assert out.dtype == torch.int64 and out.shape == (M, 4) and out.device.type == dev.type
        assert torch.equal(out.cpu(), R.philox4x32(counter, key)), f"key={key}"


# ids at the edges of the counter's two 32-bit words, then random ones
EDGE_IDS = torch.tensor([0, 2**32 - 1, 2**32, 2**62 + 7])
NORMAL_CASES = [(7, 0), (7, 1), (7, 3), (7, 37), (7, 260), (7, 1027), (0, 5), (1, 1), (33, 6)]  # (B, n)
NORMAL_KEYS = [
    (0, R.STREAM_NOISE),
    (2**40 + 3, R.stream_churn(5)),
    (12345, R.stream_alpha(17)),
    (987654321, R.STREAM_SIGMA),
    (987654321, R.stream_churn(3)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B,n", [pytest.param(*c.values[0], marks=c.marks) for c in memcheck_marked(NORMAL_CASES, [(7, 37)])]
)
def test_philox_normal_matches_reference(backend, B, n):
    dev = device_for(backend)
    ids = torch.cat([EDGE_IDS, random_ids(max(B - len(EDGE_IDS), 0), n)])[:B]
    for key, stream in NORMAL_KEYS:
        out = ops.philox_normal(key, ids.to(dev), n, stream, backend=backend)
        ref = R.normal(key, ids, n, stream)
        assert out.dtype == torch.float32 and out.shape == (B, n) and out.device.type == dev.type
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.cpu(), ref, rtol=NORMAL_TOL, atol=NORMAL_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", memcheck_marked([0.3, 0.5] + FINITE_D_VALUES, [0.3]))  # 0.3: the boost path
def test_chi2_matches_reference(backend, D):
    dev = device_for(backend)
    ids = torch.cat([torch.tensor([0, 1, 2**33 + 5]), random_ids(254, int(D * 10))])
    for key in (2**35 + 11, 2024):
        out = ops.chi2(key, ids.to(dev), D, R.STREAM_CHI2, backend=backend)
        ref = R.chi2(key, ids, D)
        assert out.dtype == torch.float64 and out.shape == (257,) and out.device.type == dev.type
        assert torch.isfinite(out).all() and (out > 0).all()
        torch.testing.assert_close(out.cpu(), ref, rtol=CHI2_REL_TOL, atol=0)


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


# ------------------------------------------------ C++ ops called directly: full-key KAT, checks, fake impls


@needs_ext
@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers_raw(ctr, key, expected):
    """The shared header (csrc/philox.h) through the raw 32-bit entry point: full key range."""
    from pfgmpp_fast import _C

    assert tuple(_C.philox4x32_raw(*ctr, *key)) == expected


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
def test_cuda_device_gets_the_cuda_kernels():
    """On a CUDA machine the extension is built with its CUDA kernels (else every `cuda` case above
    would be skipped rather than run)."""
    assert ops.has_cuda_kernels(), "CUDA device present but the extension has no CUDA kernels"


# ------------------------------------------ the Philox block counter: at most 2^34 elements per sample

TOO_MANY = 2**34 + 4  # one Philox block past what the 32-bit block counter word reaches


def _drawing_ops(B, N, device):
    """{op: (the count its message names, call)} for every C++ op that draws normals per element, on
    [B, N] inputs holding at most one element (stride 0): nothing of size N is allocated."""
    OPS = cpp_ops()
    big = torch.zeros(1, 1, device=device).expand(B, N) if B else torch.empty(0, N, device=device)
    ids, v = torch.arange(B, device=device), torch.ones(B, device=device)
    sampler_args = (1.0, 1.0, 1.0, None, ids, 1, 0.1, 0, 0.1, 1, None, torch.float32, False)
    return {
        "philox_normal": ("n", lambda: OPS.philox_normal(ids, 1, N, 0)),
        "perturb": ("the elements per sample of y", lambda: OPS.perturb(big, v, v, ids, 1, 0, big.dtype, False, True)),
        "loss_fwd_bwd": ("the elements per sample of F", lambda: OPS.loss_fwd_bwd(big, big, v, v, v, ids, 1, 0, 1.0)),
        "sampler_update": ("the elements per sample of x", lambda: OPS.sampler_update(big, big, None, *sampler_args)),
    }


@needs_ext
@pytest.mark.parametrize("op", ["philox_normal", "perturb", "loss_fwd_bwd", "sampler_update"])
@pytest.mark.parametrize("B", [0, 1])
def test_ops_that_draw_take_at_most_2_34_elements_per_sample(op, B):
    """Element e draws from Philox block e // 4, a 32-bit counter word: the C++ op (before it copies
    an input or allocates an output) and its fake implementation (meta tensors, what torch.compile
    traces) refuse more with one message naming the op, the count, its value and the limit."""
    messages = []
    for device in ("cpu", "meta"):
        what, call = _drawing_ops(B, TOO_MANY, device)[op]
        with pytest.raises(ValueError, match=rf"^{op}: {what} must be in \[0, 2\^34\], got {TOO_MANY} \(") as info:
            call()
        messages.append(str(info.value).splitlines()[0])
    assert messages[0] == messages[1]
    if B == 0:  # the bound itself is allowed
        for _, call in _drawing_ops(0, 2**34, "cpu").values():
            assert all(t.numel() == 0 for t in torch.utils._pytree.tree_leaves(call()))


def test_public_functions_take_at_most_2_34_elements_per_sample():
    """The public entry points check the same bound at the boundary, for every backend (the reference
    included, whose Philox would otherwise wrap the block counter)."""
    import pfgmpp_fast as pf

    bound = rf"must be in \[0, 2\^34\], got {TOO_MANY} \(element e draws from Philox block e // 4"
    y = torch.zeros(1, 1).expand(1, TOO_MANY)
    with pytest.raises(ValueError, match=rf"^the elements per sample of y {bound}") as info:
        pf.perturb(y, 1.0, 8.0, 1, torch.arange(1), backend="reference")
    assert info.value.name == "y"
    with pytest.raises(ValueError, match=rf"^the elements per sample of shape {bound}"):
        pf.prior((1, TOO_MANY), 8.0, 80.0, 1, [0], backend="reference")
    with pytest.raises(ValueError, match=rf"^n {bound}"):
        R.normal(1, torch.arange(1), TOO_MANY)
    with pytest.raises(ValueError, match=r"^n must be in \[0, 2\^34\], got -1"):
        R.normal(1, torch.arange(1), -1)
