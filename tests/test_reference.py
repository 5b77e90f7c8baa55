"""The reference is the spec: check it against the mathematics (docs/DESIGN.md §1, §2, §6)."""

import math

import numpy as np
import pytest
import scipy.stats as st
import torch
from op_helpers import KAT

from pfgmpp_fast import reference as R

INF = float("inf")


# --- Philox -------------------------------------------------------------------------------


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    out = R.philox4x32(torch.tensor([ctr], dtype=torch.int64), key)
    assert tuple(out[0].tolist()) == expected
    # the int form of the key is (k1 << 32) | k0
    out = R.philox4x32(torch.tensor([ctr], dtype=torch.int64), key[0] | (key[1] << 32))
    assert tuple(out[0].tolist()) == expected


def test_normal_layout_and_moments():
    ids = torch.tensor([5, 2**40 + 3, 0])
    z = R.normal(11, ids, 10)
    assert z.shape == (3, 10) and z.dtype == torch.float32
    # a prefix of the same sample is the same numbers: element e only depends on (e, id)
    assert torch.equal(R.normal(11, ids[1:2], 3)[0], z[1, :3])
    # different streams, keys, ids give different numbers
    assert not torch.equal(R.normal(11, ids, 10, stream=1), z)
    assert not torch.equal(R.normal(12, ids, 10), z)
    big = R.normal(3, torch.arange(4000), 25).double().flatten()
    assert st.kstest(big.numpy(), "norm").pvalue > 1e-3
    assert R.normal(3, torch.arange(0), 25).shape == (0, 25)


def test_uniform_is_in_the_open_interval_float32_rounding():
    u = R.uniform(torch.tensor([0, 0xFFFFFFFF, 0x80000000], dtype=torch.int64))
    assert u.dtype == torch.float32
    assert u[0].item() == 2.0**-25
    # float32 rounds ties to even above 2^23: 2^23 + 0.5 -> 2^23 and 2^24 - 0.5 -> 2^24,
    # so u can be exactly 1.0 (log u = 0, a zero radius): every backend rounds the same way.
    assert u[2].item() == 0.5
    assert u[1].item() == 1.0


# --- χ² and the perturbation kernel ----------------------------------------------------------


@pytest.mark.parametrize("D", [0.5, 1, 2, 8, 128, 2048, 3072000])
def test_chi2_matches_the_chi2_law(D):
    V = R.chi2(1234, torch.arange(6000), D).numpy()
    assert V.dtype == np.float64 and np.isfinite(V).all() and (V > 0).all()
    assert st.kstest(V, "chi2", args=(D,)).pvalue > 1e-3


@pytest.mark.parametrize("N,D", [(16, 1), (16, 2), (64, 128), (12, 2048), (48, 3072000)])
def test_radius_follows_the_betaprime_law(N, D):
    """‖x − y‖² / r² ~ BetaPrime(N/2, D/2) with r = σ√D (docs/DESIGN.md §1)."""
    B, sigma = 5000, 0.7
    y = torch.randn(B, N, dtype=torch.float64)
    x = R.perturb(y, sigma, D, 99, torch.arange(B))
    ratio = ((x - y).square().sum(1) / (sigma**2 * D)).numpy()
    assert st.kstest(ratio, "betaprime", args=(N / 2, D / 2)).pvalue > 1e-3
    # a wrong exponent or a swapped Beta parameter would not pass
    assert st.kstest(ratio, "betaprime", args=(D / 2, N / 2)).pvalue < 1e-6 or N == D


def test_infinite_D_is_gaussian():
    B, N, sigma = 3000, 8, 1.3
    y = torch.randn(B, N, dtype=torch.float64)
    x = R.perturb(y, sigma, INF, 5, torch.arange(B))
    z = ((x - y) / sigma).flatten().numpy()
    assert st.kstest(z, "norm").pvalue > 1e-3


def test_t_form_equals_published_construction_in_law():
    B, D, sigma = 4000, 128, 2.0  # N = 64
    y = torch.zeros(B, 1, 8, 8, dtype=torch.float64)
    ours = (R.perturb(y, sigma, D, 21, torch.arange(B)) - y).flatten(1).norm(dim=1)
    published = R.perturb_published(y, sigma, D, generator=np.random.default_rng(0))
    published = (published - y).flatten(1).norm(dim=1)
    assert st.ks_2samp(ours.numpy(), published.numpy()).pvalue > 1e-3
    # and both directions are isotropic: mean direction ≈ 0
    assert published.shape == (B,)


def test_perturb_dtype_and_per_sample_sigma():
    y = torch.randn(3, 2, 5, 5, dtype=torch.float32)
    sig = torch.tensor([0.1, 1.0, 10.0])
    x = R.perturb(y, sig, 128, 0, torch.tensor([0, 1, 2]))
    assert x.dtype == torch.float32 and x.shape == y.shape
    x1 = R.perturb(y[1:2], 1.0, 128, 0, torch.tensor([1]))
    torch.testing.assert_close(x1[0], x[1], rtol=0, atol=0)
    assert R.perturb(y[:0], 1.0, 128, 0, torch.zeros(0, dtype=torch.int64)).shape == (0, 2, 5, 5)


def test_small_D_stays_finite():
    y = torch.zeros(2000, 16, dtype=torch.float64)
    for D in (1e-3, 0.1, 1):
        x = R.perturb(y, 1.0, D, 3, torch.arange(2000))
        assert torch.isfinite(x).all()


# --- Preconditioning, schedule, loss -----------------------------------------------------


def test_precond_identities():
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = R.precond(sigma, 0.5)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(lam * c_out**2, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    torch.testing.assert_close(c_skip + (c_out / 0.5) ** 2, torch.ones(3, dtype=torch.float64))


def test_time_steps():
    t = R.time_steps(18)
    assert t.shape == (19,) and t[-1] == 0
    assert math.isclose(t[0].item(), 80.0) and math.isclose(t[17].item(), 0.002)
    assert (t[1:] < t[:-1]).all()
    assert R.time_steps(1).tolist() == [80.0, 0.0]


def test_training_loss_matches_hand_computation_and_the_F_form():
    B, D = 6, 128
    y = torch.randn(B, 1, 4, 4, dtype=torch.float64)
    ids = torch.arange(100, 100 + B)
    weight = torch.randn(1, dtype=torch.float64)

    def net(x, sigma, labels=None):
        return torch.tanh(weight * x)

    loss = R.training_loss(net, y, D, 7, ids)
    sigma, s = R.training_scalars(7, ids, D)
    x = R.perturb(y, sigma, D, 7, ids)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = (lam.view(-1, 1, 1, 1) * (net(x, sigma) - y) ** 2).sum() / B
    torch.testing.assert_close(loss, expected)
    # the fused-kernel form: λ(D − y)² = (F − T)² with T from y, s, g alone
    c_skip, c_out, c_in, _ = R.precond(sigma)
    F = (net(x, sigma) - c_skip.view(-1, 1, 1, 1) * x) / c_out.view(-1, 1, 1, 1)
    per_sample, grad = R.ref_loss_fwd_bwd(F, y, s, c_skip, c_out, ids, 7, R.STREAM_NOISE, 1.0 / B)
    torch.testing.assert_close(per_sample.double().sum() / B, loss, rtol=1e-6, atol=0)
    # σ draws follow the log-normal
    sig, _ = R.training_scalars(1, torch.arange(5000), 128)
    assert st.kstest(sig.log().numpy(), "norm", args=(-1.2, 1.2)).pvalue > 1e-3


# --- Sampling with the exact denoiser ------------------------------------------------------


def _data(M=24, C=1, H=4, W=4):
    g = torch.Generator().manual_seed(0)
    return torch.rand(M, C, H, W, generator=g, dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize("D", [4, 128, 2048, INF])
@pytest.mark.parametrize("solver,steps,churn", [("heun", 18, 0.0), ("heun", 18, 10.0), ("euler", 64, 0.0)])
def test_exact_denoiser_sampling_lands_on_the_data(D, solver, steps, churn):
    data, B = _data(), 96
    seeds = torch.arange(B)
    latents = R.prior((B, *data.shape[1:]), D, 80.0, 3, seeds)
    out = R.sample(R.optimal_denoiser(data, D), latents, D, 3, seeds, num_steps=steps, solver=solver, S_churn=churn)
    dist = torch.cdist(out.flatten(1), data.flatten(1)).min(dim=1).values
    assert (dist < 0.02).float().mean() >= 0.99
    # and it visits more than one data point
    assert torch.cdist(out.flatten(1), data.flatten(1)).argmin(dim=1).unique().numel() > 5


def test_D1_gives_finite_samples_and_alpha_noise_is_used():
    data, B = _data(), 32
    seeds = torch.arange(B)
    latents = R.prior((B, *data.shape[1:]), 1, 80.0, 3, seeds)
    out = R.sample(R.optimal_denoiser(data, 1), latents, 1, 3, seeds)
    assert torch.isfinite(latents).all() and torch.isfinite(out).all()
    noisy = R.sample(R.optimal_denoiser(data, 1), latents, 1, 3, seeds, alpha=0.3)
    assert torch.isfinite(noisy).all() and not torch.equal(noisy, out)


def test_each_image_depends_only_on_its_seed():
    data, D = _data(), 128
    seeds = torch.arange(1000, 1037)
    shape = (37, *data.shape[1:])
    latents = R.prior(shape, D, 80.0, 9, seeds)
    one = R.prior((1, *data.shape[1:]), D, 80.0, 9, seeds[17:18])
    assert torch.equal(one[0], latents[17])
    kw = dict(num_steps=6, S_churn=5.0, alpha=0.1)
    many = R.sample(R.optimal_denoiser(data, D), latents, D, 9, seeds, **kw)
    single = R.sample(R.optimal_denoiser(data, D), one, D, 9, seeds[17:18], **kw)
    torch.testing.assert_close(single[0], many[17], rtol=1e-12, atol=1e-12)


def test_fp32_state_close_to_fp64():
    data, D, B = _data(), 128, 16
    seeds = torch.arange(B)
    lat = R.prior((B, *data.shape[1:]), D, 80.0, 0, seeds)
    a = R.sample(R.optimal_denoiser(data, D), lat, D, 0, seeds, num_steps=10)
    b = R.sample(R.optimal_denoiser(data, D), lat, D, 0, seeds, num_steps=10, dtype=torch.float32)
    assert b.dtype == torch.float32
    torch.testing.assert_close(b.double(), a, rtol=0, atol=1e-3)


# --- Kernel-level references agree with the public reference -------------------------------


def test_ref_perturb_matches_perturb_in_any_layout():
    y = torch.randn(3, 3, 5, 7).to(memory_format=torch.channels_last)
    ids = torch.tensor([4, 8, 15])
    sigma = torch.tensor([0.3, 1.0, 7.0], dtype=torch.float64)
    s = R.noise_scale(sigma, 128, 2, ids)
    c_in = R.precond(sigma)[2]
    net_in, x = R.ref_perturb(y, s.float(), c_in.float(), ids, 2, R.STREAM_NOISE, torch.bfloat16, True, True)
    assert net_in.is_contiguous(memory_format=torch.channels_last) and net_in.dtype == torch.bfloat16
    expected = R.perturb(y.contiguous(), sigma, 128, 2, ids)
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-5)


def test_ref_sampler_update_reproduces_a_heun_step():
    data, D, B = _data(), 128, 5
    seeds = torch.arange(B)
    den = R.optimal_denoiser(data, D)
    x = R.prior((B, *data.shape[1:]), D, 2.0, 1, seeds)
    t, t_next = 2.0, 1.2
    sig = lambda v: torch.full((B,), v, dtype=torch.float64)
    F = den(x, sig(t))  # plain denoiser: c_skip = 0, c_out = c_in = 1
    h = t_next - t
    xp, stash, net_in = R.ref_sampler_update(
        x, F, None, 1 / t, -1 / t, h, h / 2, seeds, 1, 0.0, 0, 0.0, 0, 1.0, torch.float64, False
    )
    F2 = den(net_in, sig(t_next))
    x_next, _, _ = R.ref_sampler_update(
        xp, F2, stash, 1 / t_next, -1 / t_next, h / 2, None, seeds, 1, 0.0, 0, 0.0, 0, None, torch.float64, False
    )
    d = (x - den(x, sig(t))) / t
    x1 = x + h * d
    d2 = (x1 - den(x1, sig(t_next))) / t_next
    torch.testing.assert_close(x_next, x + h * (d + d2) / 2)


# --- Bad input -------------------------------------------------------------------------------


def test_bad_inputs_are_named():
    y = torch.randn(2, 4)
    ids = torch.arange(2)
    with pytest.raises(ValueError, match="D must be in"):
        R.perturb(y, 1.0, 0, 0, ids)
    with pytest.raises(ValueError, match="D must be in"):
        R.chi2(0, ids, -3)
    with pytest.raises(ValueError, match="sigma"):
        R.perturb(y, -1.0, 8, 0, ids)
    with pytest.raises(ValueError, match="sigma"):
        R.perturb(y, float("nan"), 8, 0, ids)
    with pytest.raises(ValueError, match="batch size"):
        R.perturb(y, 1.0, 8, 0, torch.arange(3))
    with pytest.raises(TypeError, match="floating-point"):
        R.perturb(torch.ones(2, 4, dtype=torch.int64), 1.0, 8, 0, ids)
    with pytest.raises(TypeError, match="sample_ids"):
        R.perturb(y, 1.0, 8, 0, torch.zeros(2))
    with pytest.raises(ValueError, match="key"):
        R.perturb(y, 1.0, 8, -1, ids)
    with pytest.raises(TypeError, match="key"):
        R.normal(1.5, ids, 3)
    with pytest.raises(ValueError, match="num_steps"):
        R.time_steps(0)
    with pytest.raises(ValueError, match="sigma_min"):
        R.time_steps(5, sigma_min=-1)
    with pytest.raises(ValueError, match="sigma_min"):
        R.time_steps(5, sigma_min=100, sigma_max=80)
    with pytest.raises(ValueError, match="shape"):
        R.prior((3, 4), 8, 80, 0, ids)
    with pytest.raises(ValueError, match="sigma_max"):
        R.prior((2, 4), 8, 0, 0, ids)
    with pytest.raises(ValueError, match="sigma_data"):
        R.precond(torch.ones(2), sigma_data=0)
    den = R.optimal_denoiser(torch.randn(3, 4), 8)
    lat = R.prior((2, 4), 8, 80, 0, ids)
    with pytest.raises(ValueError, match="solver"):
        R.sample(den, lat, 8, 0, ids, solver="rk4")
    with pytest.raises(ValueError, match="num_steps"):
        R.sample(den, lat, 8, 0, ids, num_steps=0)
    with pytest.raises(ValueError, match="alpha"):
        R.sample(den, lat, 8, 0, ids, alpha=-0.1)
    with pytest.raises(ValueError, match="S_churn"):
        R.sample(den, lat, 8, 0, ids, S_churn=float("nan"))
    with pytest.raises(TypeError, match="dtype"):
        R.sample(den, lat, 8, 0, ids, dtype=torch.float16)
    with pytest.raises(ValueError, match="batch size"):
        R.sample(den, lat, 8, 0, torch.arange(5))
    with pytest.raises(ValueError, match="P_std"):
        R.training_scalars(0, ids, 8, P_std=0)
    with pytest.raises(ValueError, match="n must be"):
        R.normal(0, ids, -1)
    with pytest.raises(TypeError, match="data"):
        R.optimal_denoiser([1, 2], 8)
    with pytest.raises(ValueError, match="D must be in"):
        R.training_loss(lambda x, s, l: x, y, float("nan"), 0, ids)
