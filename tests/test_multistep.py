"""The multistep solvers (DPM-Solver++(2M), iPNDM, iPNDM-v): their spec (reference_multistep),
the fused step loop (sampler._MultistepStepper) on every backend, and k-diffusion's sampler."""

import math

import numpy as np
import pytest
import torch
from helpers import load_npz_images
from op_helpers import BACKENDS, device_for, rel_err

from pfgmpp_fast import checks
from pfgmpp_fast import reference as R
from pfgmpp_fast import reference_multistep as RM
from pfgmpp_fast.sampler import SamplerOptions, sample

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")

MULTISTEP = checks.MULTISTEP_SOLVERS
ALL_BACKENDS = BACKENDS + ["reference"]
# Steps at which each solver lands on the 24-point data set below for every D (iPNDM's fixed
# weights assume equal steps, which EDM's ρ-schedule is far from: it needs many more).
LANDING_STEPS = {"heun": 18, "euler": 64, "dpmpp2m": 18, "ipndm": 64, "ipndm_v": 32}


def _points(M=24, C=1, H=4, W=4):
    return torch.rand(M, C, H, W, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize("D", [1, 128, math.inf])
@pytest.mark.parametrize("solver", checks.SOLVERS)
def test_every_solver_lands_on_the_data_with_the_exact_denoiser(D, solver):
    data, B = _points(), 96
    seeds = torch.arange(B)
    latents = R.prior((B, *data.shape[1:]), D, 80.0, 3, seeds)
    out = R.sample(R.optimal_denoiser(data, D), latents, D, 3, seeds, num_steps=LANDING_STEPS[solver], solver=solver)
    dist = torch.cdist(out.flatten(1), data.flatten(1))
    assert (dist.min(dim=1).values < 0.02).float().mean() >= 0.98
    assert dist.argmin(dim=1).unique().numel() > 12  # and it visits many data points


def _gaussian_error(solver, n, sigma_max=80.0, s=0.5):
    """Final error on Gaussian data N(0, s²) (exact D(x; σ) = x·s²/(s² + σ²), for D = ∞): the ODE's
    solution is x(σ) = x_0·√((s² + σ²)/(s² + σ_max²))."""
    x0 = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigma_max
    den = lambda x, sig, labels=None: x * (s**2 / (s**2 + sig.view(-1, 1, 1, 1) ** 2))  # noqa: E731
    out = R.sample(den, x0, math.inf, 0, torch.arange(4), num_steps=n, solver=solver, sigma_max=sigma_max)
    return (out - x0 * s / math.sqrt(s**2 + sigma_max**2)).abs().max().item()


@pytest.mark.parametrize(
    "solver,low,high",
    [("euler", 1.8, 2.2), ("heun", 3.5, 5.0), ("dpmpp2m", 3.5, 5.0), ("ipndm", 3.5, 5.0), ("ipndm_v", 8.0, 20.0)],
)
def test_convergence_order_on_gaussian_data(solver, low, high):
    """Error ratio when the steps double: 2 for first order, 4 for second; iPNDM-v is higher order
    (fixed-weight iPNDM is second order on the uneven grid)."""
    ratio = _gaussian_error(solver, 64) / _gaussian_error(solver, 128)
    assert low < ratio < high


def test_adams_bashforth_weights():
    # equal steps give iPNDM's fixed weights
    for order in range(1, 5):
        nodes = [10.0 - 0.5 * k for k in range(order)]
        np.testing.assert_allclose(
            RM.adams_bashforth_coefficients(nodes, 10.0, 10.5), RM.IPNDM_COEFFICIENTS[order - 1], rtol=1e-12, atol=1e-12
        )
    # uneven nodes: a cubic's mean over the step is exact
    nodes, a, b = [3.0, 7.0, 15.0, 40.0], 3.0, 1.2
    cubic = lambda s: 0.3 * s**3 - 2 * s**2 + s - 5  # noqa: E731
    mean = sum(c * cubic(n) for c, n in zip(RM.adams_bashforth_coefficients(nodes, a, b), nodes))
    exact = (0.075 * b**4 - 2 / 3 * b**3 + b**2 / 2 - 5 * b) - (0.075 * a**4 - 2 / 3 * a**3 + a**2 / 2 - 5 * a)
    assert mean == pytest.approx(exact / (b - a), rel=1e-12)
    t = R.time_steps(6).tolist()
    assert RM.ipndm_coefficients("ipndm", t, 5) == RM.IPNDM_COEFFICIENTS[3]
    assert len(RM.ipndm_coefficients("ipndm_v", t, 1)) == 2 and sum(
        RM.ipndm_coefficients("ipndm_v", t, 4)
    ) == pytest.approx(1.0, abs=1e-12)


def test_dpmpp2m_step_by_hand():
    """Step 1 of DPM-Solver++(2M) from the paper's λ-form, written out: x_2 = (t_2/t_1)·x_1 −
    (e^{−h} − 1)·((1 + 1/2r)·D_1 − (1/2r)·D_0)."""
    t = [80.0, 20.0, 4.0, 0.0]
    x0, x1 = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    D0, D1 = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lam = [-math.log(s) for s in t[:3]]
    h, r = lam[2] - lam[1], (lam[1] - lam[0]) / (lam[2] - lam[1])
    expected = (t[2] / t[1]) * x1 - (math.exp(-h) - 1) * ((1 + 1 / (2 * r)) * D1 - (1 / (2 * r)) * D0)
    history = [D0]
    torch.testing.assert_close(RM.dpmpp2m_step(x1, D1, t, 1, history), expected, rtol=1e-14, atol=1e-14)
    assert history[0] is D1
    first = []
    torch.testing.assert_close(RM.dpmpp2m_step(x0, D0, t, 0, first), (t[1] / t[0]) * x0 + (1 - t[1] / t[0]) * D0)
    assert RM.dpmpp2m_step(x1, D1, t, 2, [D0]) is D1  # the last step (t = 0) returns D


@pytest.mark.parametrize("solver", MULTISTEP)
def test_nfe_and_no_churn(solver):
    o = SamplerOptions(num_steps=7, solver=solver)
    assert o.nfe == 7
    with pytest.raises(ValueError, match=f"S_churn must be 0 with solver='{solver}'"):
        SamplerOptions(solver=solver, S_churn=1.0)
    with pytest.raises(ValueError, match="S_churn must be 0"):
        R.sample(
            R.optimal_denoiser(_points(), 8), torch.zeros(1, 1, 4, 4), 8, 0, torch.arange(1), solver=solver, S_churn=0.5
        )


def _count_calls(den):
    calls = []

    def counted(x, sigma, labels=None):
        calls.append(float(sigma[0]))
        return den(x, sigma, labels)

    return counted, calls


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("solver,steps", [("dpmpp2m", 10), ("ipndm", 24), ("ipndm_v", 10)])
@pytest.mark.parametrize("D", [1.0, 128.0, math.inf])
def test_fused_matches_reference(backend, solver, steps, D):
    if backend == "triton" and not torch.cuda.is_available():
        steps = 6  # under the CPU interpreter a step costs ~0.2 s; 6 steps reach iPNDM's 4th order
    dev = device_for(backend)
    data = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    seeds = torch.tensor([0, 1, 2, 2**40])
    latents = R.prior((4, 2, 3, 3), D, 80.0, 5, seeds, dtype=torch.float32)
    den, calls = _count_calls(R.optimal_denoiser(data.to(dev), D))
    x = sample(den, latents.to(dev), D, 5, seeds.to(dev), num_steps=steps, solver=solver, alpha=0.01, backend=backend)
    ref = R.sample(
        R.optimal_denoiser(data, D),
        latents,
        D,
        5,
        seeds,
        num_steps=steps,
        solver=solver,
        alpha=0.01,
        dtype=torch.float32,
    )
    assert calls == pytest.approx(R.time_steps(steps).tolist()[:-1], rel=1e-6)  # one evaluation per step, at t_i
    assert x.dtype == torch.float32 and rel_err(x, ref) < 1e-4
    ref64 = R.sample(R.optimal_denoiser(data, D), latents, D, 5, seeds, num_steps=steps, solver=solver, alpha=0.01)
    x64 = sample(
        R.optimal_denoiser(data.to(dev), D),
        latents.to(dev),
        D,
        5,
        seeds.to(dev),
        num_steps=steps,
        solver=solver,
        alpha=0.01,
        dtype=torch.float64,
        backend=backend,
    )
    # fixed-weight iPNDM amplifies rounding on this sharp toy posterior (Triton's fp64 scalars carry 48 bits)
    assert x64.dtype == torch.float64 and rel_err(x64, ref64) < (1e-7 if solver == "ipndm" else 1e-9)


class SmoothPrecond(torch.nn.Module):
    """EDMPrecond-like (.raw, .sigma_data) exact denoiser of Gaussian data N(μ, s²): D(x; σ) =
    μ + (x − μ)·s²/(s² + σ²), smooth, so rounding is not amplified as near a few data points."""

    sigma_data, s = 0.5, 0.7

    def __init__(self, mu):
        super().__init__()
        self.mu = mu

    def forward(self, x, sigma, class_labels=None):
        sigma = sigma.to(x.dtype).view(-1, 1, 1, 1)
        return self.mu.to(x.dtype) + (x - self.mu.to(x.dtype)) * (self.s**2 / (self.s**2 + sigma**2))

    def raw(self, x_in, c_noise, class_labels=None, augment_labels=None):
        sigma = torch.exp(4 * c_noise.to(torch.float64)).view(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = R.precond(sigma, self.sigma_data)
        x = x_in.to(torch.float64) / c_in
        return ((self.forward(x, sigma.view(-1)) - c_skip * x) / c_out).to(torch.float32)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("solver", MULTISTEP)
def test_fused_precond_net(backend, solver):
    """An EDMPrecond-like net (.raw, preconditioning in the update kernels), bf16 channels-last input too."""
    dev = device_for(backend)
    net = SmoothPrecond(torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(3)).to(dev))
    seeds = torch.arange(3)
    latents = R.prior((3, 2, 3, 3), 2048.0, 80.0, 2, seeds, dtype=torch.float32)
    ref = R.sample(SmoothPrecond(net.mu.cpu()), latents, 2048.0, 2, seeds, num_steps=8, solver=solver)
    x = sample(net, latents.to(dev), 2048.0, 2, seeds.to(dev), num_steps=8, solver=solver, backend=backend)
    assert rel_err(x, ref) < 1e-5
    x16 = sample(
        net,
        latents.to(dev),
        2048.0,
        2,
        seeds.to(dev),
        num_steps=8,
        solver=solver,
        net_dtype=torch.bfloat16,
        channels_last=True,
        backend=backend,
    )
    assert torch.isfinite(x16).all() and rel_err(x16, ref) < 2e-2


def test_dpmpp2m_equals_k_diffusion():
    """k-diffusion's sample_dpmpp_2m on get_sigmas_karras: same denoiser, same latents, same images (fp32).
    (k-diffusion is not a dependency: its package pulls in wandb, accelerate, kornia, clip, ...)"""
    K = pytest.importorskip("k_diffusion.sampling")
    den = SmoothPrecond(torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(3)))
    for D, n, sigma_min in [(128.0, 6, 0.002), (math.inf, 10, 0.3), (8.0, 18, 0.05)]:
        seeds = torch.arange(6)
        latents = R.prior((6, 2, 3, 3), D, 80.0, 5, seeds, dtype=torch.float32)
        theirs = K.sample_dpmpp_2m(den, latents.clone(), K.get_sigmas_karras(n, sigma_min, 80.0, 7.0), disable=True)
        ours = sample(den, latents, D, 5, seeds, num_steps=n, sigma_min=sigma_min, solver="dpmpp2m")
        assert rel_err(ours, theirs) < 1e-5
        euler = sample(den, latents, D, 5, seeds, num_steps=n, sigma_min=sigma_min, solver="euler")
        assert rel_err(euler, theirs) > 1e-3  # the comparison can tell solvers apart


def test_generate_command_with_a_multistep_solver(tmp_path, capsys):
    """`generate --solver dpmpp2m` end to end: the images of generate_images with that solver (not
    Heun's); --S-churn with a multistep solver is a usage error naming the option."""
    from helpers import tiny_net

    from pfgmpp_fast import checkpoint, cli
    from pfgmpp_fast.evaluation import generate as G

    path, out = str(tmp_path / "net.safetensors"), str(tmp_path / "g.npz")
    net = tiny_net(D=8)
    checkpoint.save_network(path, net)
    argv = ["generate", "--network", path, "--seeds", "0-2", "--steps", "4", "--no-progress", "--backend", "cpu"]
    assert cli.main(argv + ["--solver", "dpmpp2m", "--npz", out]) == 0
    images, seeds = load_npz_images(out)
    assert list(seeds) == [0, 1, 2]
    loaded = checkpoint.load_network(path)
    for solver, same in (("dpmpp2m", True), ("heun", False)):
        batches = G.generate_images(loaded, [0, 1, 2], 3, num_steps=4, solver=solver, backend="cpu")
        direct = torch.cat([im for _, im in batches]).permute(0, 2, 3, 1).numpy()  # NHWC, as in the .npz
        assert np.array_equal(direct, images) == same
    assert cli.main(argv + ["--solver", "ipndm", "--S-churn", "1", "--npz", out]) == 2
    err = capsys.readouterr().err
    assert "--S-churn" in err and "ipndm" in err and "Traceback" not in err


def test_fid_sweep_over_steps_honours_the_solver(tmp_path, digits_cache, digits):
    """`fid sweep --kind steps --solver dpmpp2m`: NFE = steps, other images than Heun's."""
    import csv

    from helpers import tiny_net

    from pfgmpp_fast import checkpoint, cli
    from pfgmpp_fast.evaluation import calc, metrics

    net_path, ref = str(tmp_path / "net.safetensors"), str(tmp_path / "ref.npz")
    checkpoint.save_network(net_path, tiny_net())
    metrics.save_stats(ref, *calc.reference_stats("digits", digits, batch_size=500))
    rows = {}
    for solver in ("dpmpp2m", "heun"):
        assert (
            cli.main(
                [
                    "fid",
                    "sweep",
                    "--kind",
                    "steps",
                    "--values",
                    "2,3",
                    "--solver",
                    solver,
                    "--network",
                    net_path,
                    "--batch",
                    "8",
                    "--features",
                    "digits",
                    "--digits-cache",
                    digits_cache,
                    "--ref",
                    ref,
                    "--seeds",
                    "0-7",
                    "--backend",
                    "cpu",
                    "--outdir",
                    str(tmp_path / solver),
                ]
            )
            == 0
        )
        with open(tmp_path / solver / "sweep-steps.csv") as f:
            rows[solver] = list(csv.DictReader(f))
    assert [(r["steps"], r["nfe"]) for r in rows["dpmpp2m"]] == [("2", "2"), ("3", "3")]
    assert [r["nfe"] for r in rows["heun"]] == ["3", "5"]
    assert [r["FDD"] for r in rows["dpmpp2m"]] != [r["FDD"] for r in rows["heun"]]
