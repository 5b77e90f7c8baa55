"""pytest-benchmark suite of the fused ops on the CPU (small, CIFAR-shaped sizes).

    python -m pytest benchmarks/test_bench_cpu.py --benchmark-enable      # timings
    python -m pytest benchmarks/test_bench_cpu.py                         # CI: each runs once

Every backend that runs on this machine (the C++ CPU kernels, the pure-PyTorch reference,
and the plain-PyTorch Student-t a user would write by hand) on the same inputs; the
comparison table pytest-benchmark prints is the ratio measurement. Each case also checks
its result against the reference, so the suite cannot rot silently.
"""

import math

import pytest
import torch

from pfgmpp_fast import ops
from pfgmpp_fast import reference as R

B, C, H, W = 128, 3, 32, 32
D = 128.0


def _inputs():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(B, C, H, W, generator=g) * 2 - 1
    ids = torch.arange(B, dtype=torch.int64)
    sigma = torch.exp(torch.randn(B, generator=g, dtype=torch.float64) * 1.2 - 1.2)
    return y, ids, sigma


def _backends():
    return ["cpu", "reference"] if ops.has_extension() else ["reference"]


@pytest.mark.parametrize("backend", _backends())
def test_perturb(benchmark, backend):
    y, ids, sigma = _inputs()
    if backend == "reference":  # the reference philox is slow: a smaller batch, same per-image work
        y, ids, sigma = y[:16], ids[:16], sigma[:16]
    x = benchmark(ops.perturb, y, sigma, D, 7, ids, backend=backend)
    torch.testing.assert_close(x, R.perturb(y, sigma, D, 7, ids), rtol=1e-5, atol=1e-5)


def test_perturb_plain_pytorch_student_t(benchmark):
    """The fastest plain-PyTorch way: torch.randn + a per-sample χ² + addcmul."""
    y, ids, sigma = _inputs()
    chi2 = torch.distributions.Chi2(torch.tensor(D))

    def student_t():
        s = (sigma * torch.sqrt(D / chi2.sample((B,)).double())).float().view(B, 1, 1, 1)
        return torch.addcmul(y, s, torch.randn_like(y))

    x = benchmark(student_t)
    assert x.shape == y.shape and torch.isfinite(x).all()


@pytest.mark.parametrize("backend", _backends())
def test_loss_fwd_bwd(benchmark, backend):
    y, ids, sigma = _inputs()
    F = torch.randn_like(y)
    s = R.noise_scale(sigma, D, 7, ids).float()
    c_skip, c_out, _, _ = (c.float() for c in R.precond(sigma))
    args = (F, y, s, c_skip, c_out, ids, 7, R.STREAM_NOISE, 1.0 / B)
    per_sample, grad = benchmark(ops.loss_fwd_bwd, *args, backend=backend)
    ref_per_sample, ref_grad = R.ref_loss_fwd_bwd(*args)
    torch.testing.assert_close(per_sample, ref_per_sample, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", _backends())
def test_sampler_update_heun_stage1(benchmark, backend):
    y, ids, _ = _inputs()
    x, F = y.clone(), torch.randn_like(y)
    args = (
        x,
        F,
        None,
        0.3,
        -0.2,
        -0.1,
        -0.05,
        ids,
        7,
        0.0,
        R.stream_alpha(1),
        0.0,
        R.stream_churn(1),
        0.7,
        torch.bfloat16,
        True,
    )
    y1, y2, net_in = benchmark(ops.sampler_update, *args, backend=backend)
    r1, r2, rn = R.ref_sampler_update(*args)
    torch.testing.assert_close(y1, r1)
    torch.testing.assert_close(y2, r2)
    torch.testing.assert_close(net_in.float(), rn.float(), rtol=1e-2, atol=1e-2)
    assert not math.isnan(float(y1.sum()))
