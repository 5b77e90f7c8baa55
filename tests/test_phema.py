"""Post-hoc EMA (phema.py, training/phema.py): the power-function EMA maths, tracking during training,
reconstruction (tracked lengths exactly, an untracked length from the others), snapshot-order
independence, bad input, exact resume, and the `phema` command."""

import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch

from pfgmpp_fast import phema as P
from pfgmpp_fast.checkpoint import load_network, read_metadata, save_network
from pfgmpp_fast.cli import main as cli_main
from pfgmpp_fast.training.ema import PowerFunctionEMA
from pfgmpp_fast.training.options import resolve_options
from pfgmpp_fast.training.train import run_training
from pfgmpp_fast.utils.io_utils import load_torch_state

TRACKED = (0.05, 0.1, 0.07)  # the third is tracked only to check its reconstruction from the other two
# Measured on this run (4 kimg, a snapshot every 0.256 kimg): parameter error 0.016 of the
# distance between the 0.05 and 0.10 EMAs, FDD 42.61 vs 42.62 (0.02 %).
PARAM_TOL = 0.05  # ‖θ_rec − θ_0.07‖ / ‖θ_0.05 − θ_0.10‖
FDD_TOL = 0.01  # |FDD_rec − FDD_0.07| / FDD_0.07


def vec(net):
    return torch.cat([p.detach().double().flatten() for p in net.parameters()])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A few kimg of the digits recipe, tracking three profiles, one snapshot every other step."""
    from pfgmpp_fast.apps.digits import train_small

    run_dir = str(tmp_path_factory.mktemp("phema") / "run")
    train_small(
        run_dir,
        128.0,
        4.0,
        device="cpu",
        progress=False,
        backend="auto",
        tick_kimg=0.128,
        phema=TRACKED,
        phema_snap_kimg=0.256,
        dump_ticks=None,
    )
    return run_dir


@pytest.fixture(scope="module")
def scorer():
    from pfgmpp_fast.apps.digits import DigitsScorer

    return DigitsScorer()


def newest(run_dir):
    snaps = P.list_snapshots(run_dir)
    return {s.std: s for s in snaps if s.nimg == snaps[-1].nimg}, snaps


# ----------------------------------------------------------------------------------------
# Maths


def test_std_exp_roundtrip_and_range():
    for std in (0.001, 0.01, 0.05, 0.1, 0.2, 0.29, 0.3):
        assert P.exp_to_std(P.std_to_exp(std)) == pytest.approx(std, rel=1e-9)
    assert P.std_to_exp(0.05) == pytest.approx(16.97, abs=0.01) and P.std_to_exp(0.1) == pytest.approx(6.94, abs=0.01)
    assert P.exp_to_std((math.sqrt(5) - 3) / 2) == pytest.approx(P.STD_MAX)
    for bad in (0.0, -0.1, P.STD_MAX, 0.5, float("nan")):
        with pytest.raises(ValueError, match=r"std must be in \(0, 0.3003\)"):
            P.std_to_exp(bad)


def test_profile_inner_products_match_numerical_integration():
    tau = np.linspace(0, 5, 2_000_001)[1:]
    for t_a, g_a, t_b, g_b in [(3.0, 2.0, 5.0, 7.0), (5.0, 0.5, 2.0, 16.9), (4.0, 3.0, 4.0, 3.0)]:
        p_a = np.where(tau <= t_a, (g_a + 1) * tau**g_a / t_a ** (g_a + 1), 0)
        p_b = np.where(tau <= t_b, (g_b + 1) * tau**g_b / t_b ** (g_b + 1), 0)
        assert P.profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(np.trapezoid(p_a * p_b, tau), rel=1e-4)


def test_tracked_ema_weighs_each_step_by_its_profile_mass():
    """θ_τ = e_τ (one basis vector per step) makes the EMA's weights visible: after T steps of
    `batch` images they are the profile's mass on each step, (τ^(γ+1) − (τ−1)^(γ+1)) / T^(γ+1)."""
    T, batch = 40, 3
    theta = torch.zeros(T, dtype=torch.float64)
    tracker = PowerFunctionEMA((0.05, 0.2), [theta], template=None, snap_kimg=1.0)
    for step in range(1, T + 1):
        theta.zero_()[step - 1] = 1
        tracker.update([theta], step * batch, batch)
    tau = np.arange(1, T + 1, dtype=np.float64)
    for gamma, (ema,) in zip(tracker.gammas, tracker.emas):
        expected = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / T ** (gamma + 1)
        np.testing.assert_allclose(ema.numpy(), expected, rtol=1e-9, atol=1e-15)


def test_coefficients_do_not_depend_on_the_order_of_the_snapshots():
    t = np.tile(np.arange(1, 9) * 512.0, 2)
    g = np.repeat([P.std_to_exp(0.05), P.std_to_exp(0.1)], 8)
    X, err, raw = P.solve_coefficients(t, g, [4096.0], [P.std_to_exp(0.07)])
    perm = np.random.default_rng(0).permutation(len(t))
    Xp, errp, rawp = P.solve_coefficients(t[perm], g[perm], [4096.0], [P.std_to_exp(0.07)])
    np.testing.assert_allclose(Xp, X[perm], rtol=1e-7, atol=1e-9)
    assert errp == pytest.approx(err) and rawp == pytest.approx(raw) and err[0] < 0.02
    assert X.sum() == pytest.approx(1, abs=1e-12) and raw[0] == pytest.approx(1, abs=1e-2)


def edm2_coefficients(t_in, std_in, t_out, std_out):
    """The EDM2 paper's post-hoc EMA solve (Karras et al. 2024, appendix: Algorithm 3), written
    here from the paper's equations: γ from std (the real root of its cubic), the inner product
    of two power-function profiles ∫ p_a p_b = (γa+1)(γb+1) min(ta,tb)^(γa+γb+1) /
    ((γa+γb+1) ta^(γa+1) tb^(γb+1)), the normal equations, the columns scaled to sum to 1."""

    def gamma(std):
        s2 = float(std) ** -2
        return max(r.real for r in np.roots([1, 7, 16 - s2, 12 - s2]) if abs(r.imag) < 1e-9)

    def inner(ta, ga, tb, gb):
        lo = min(ta, tb)
        return (ga + 1) * (gb + 1) / (ga + gb + 1) * lo ** (ga + gb + 1) / (ta ** (ga + 1) * tb ** (gb + 1))

    g_in, g_out = [gamma(s) for s in std_in], [gamma(s) for s in std_out]
    A = np.array([[inner(ta, ga, tb, gb) for tb, gb in zip(t_in, g_in)] for ta, ga in zip(t_in, g_in)])
    B = np.array([[inner(ta, ga, tb, gb) for tb, gb in zip(t_out, g_out)] for ta, ga in zip(t_in, g_in)])
    X = np.linalg.solve(A, B)
    return X / X.sum(axis=0, keepdims=True)


def test_constant_weights_are_reconstructed_exactly(tmp_path):
    """Snapshots of weights that never change (as after training at lr 1e-30) give those weights
    back bit for bit at every length, although the raw least-squares sums are not 1."""
    from helpers import tiny_net

    net = tiny_net(D=128)
    params = [p.detach() for p in net.parameters()]
    tracker = PowerFunctionEMA((0.05, 0.1), params, template=net, snap_kimg=0.256)
    batch = 128
    for step in range(1, 33):  # 16 snapshots per length, as the digits run
        tracker.update(params, step * batch, batch)
        if step % 2 == 0:
            tracker.save(str(tmp_path), step * batch, batch, extra=dict(run={"lr": 1e-30}))
    snaps = P.list_snapshots(str(tmp_path))
    assert len(snaps) == 32
    results = P.reconstruct(snaps, [0.03, 0.07, 0.08, 0.13])
    for (rec, info), std in zip(results, (0.03, 0.07, 0.08, 0.13)):
        error = (vec(rec) - vec(net)).abs().max().item()
        assert error == 0, (std, error)
        print(f"std {std}: raw coefficient sum {info['phema_raw_coefficient_sum']:.6f}, max |error| {error:.2e}")
        assert info["phema_error"] <= P.MAX_ERROR
    raw = [info["phema_raw_coefficient_sum"] for _, info in results]
    assert max(abs(r - 1) for r in raw) > 5e-4  # the scaling mattered (0.9992 for 0.03)


def test_coefficients_equal_the_edm2_algorithm(digits_run):
    """Our coefficients, and the network Σ x_i θ_i, equal those of an independent implementation
    of EDM2's algorithm on the same snapshot set (the 0.05 and 0.1 snapshots of the digits run)."""
    snaps = [s for s in P.list_snapshots(digits_run) if s.std != 0.07]
    t, stds = [s.nimg for s in snaps], [s.std for s in snaps]
    wanted = [0.03, 0.07, 0.08, 0.12]
    ours, error, raw = P.solve_coefficients(t, [s.gamma for s in snaps], [t[-1]] * 4, [P.std_to_exp(s) for s in wanted])
    expected = edm2_coefficients(t, stds, [t[-1]] * 4, wanted)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
    np.testing.assert_allclose(ours.sum(axis=0), 1, rtol=0, atol=1e-12)
    thetas = torch.stack([vec(load_network(s.path)) for s in snaps])
    for (rec, info), x, e, r in zip(P.reconstruct(snaps, wanted), expected.T, error, raw):
        direct = (torch.from_numpy(x)[:, None] * thetas).sum(0)
        assert (vec(rec) - direct).abs().max() <= 1e-6 * direct.abs().max()
        assert info["phema_error"] == pytest.approx(e) and info["phema_raw_coefficient_sum"] == pytest.approx(r)


# ----------------------------------------------------------------------------------------
# Training and reconstruction on a digits run


def test_snapshots_are_written_with_their_metadata(digits_run):
    assert P.available_stds(digits_run) == sorted(TRACKED)
    snaps = P.list_snapshots(digits_run)
    assert len(snaps) == 3 * 16 and snaps[-1].nimg == 4096  # every 0.256 kimg, and the end
    extra = read_metadata(snaps[-1].path)["extra"]
    assert extra["nimg"] == 4096 and extra["step"] == 32 and extra["batch"] == 128
    assert extra["run"]["lr"] == 2e-3 and extra["run"]["seed"] == 0 and extra["D"] == 128
    assert extra["phema_gamma"] == pytest.approx(P.std_to_exp(extra["phema_std"]))
    from pfgmpp_fast.checkpoint import find_checkpoints

    assert all(
        os.path.basename(path).startswith("network-snapshot-")  # not network snapshots
        for _, path in find_checkpoints(digits_run)
    )


def test_a_tracked_length_reconstructs_to_its_snapshot(digits_run):
    last, snaps = newest(digits_run)
    for std in (0.05, 0.1):
        tracked = vec(load_network(last[std].path))
        rec = P.reconstruct_network(digits_run, std)
        assert isinstance(rec, torch.nn.Module) and not rec.training
        assert not any(p.requires_grad for p in rec.parameters())
        assert (vec(rec) - tracked).abs().max() <= 1e-6 * tracked.abs().max()
    middle = snaps[len(snaps) // 2]  # an earlier training point
    rec = P.reconstruct_network(digits_run, middle.std, at_kimg=middle.nimg / 1000)
    ref = vec(load_network(middle.path))
    assert (vec(rec) - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_an_untracked_length_reconstructs_from_the_other_two(digits_run, scorer):
    from pfgmpp_fast.apps.digits import generate_uint8

    last, snaps = newest(digits_run)
    ((rec, info),) = P.reconstruct([s for s in snaps if s.std != 0.07], [0.07])
    assert info["phema_sources"] == 32 and info["phema_error"] < 0.01
    t = {std: vec(load_network(s.path)) for std, s in last.items()}
    param_err = ((vec(rec) - t[0.07]).norm() / (t[0.05] - t[0.1]).norm()).item()
    assert param_err < PARAM_TOL, param_err
    seeds = list(range(200))
    with torch.no_grad():
        fdd_rec = scorer.fdd(generate_uint8(rec, seeds, num_steps=6, batch_size=200))
        fdd_tracked = scorer.fdd(
            generate_uint8(load_network(last[0.07].path).eval(), seeds, num_steps=6, batch_size=200)
        )
    print(f"third profile: parameter error {param_err:.4f}, FDD {fdd_rec:.3f} vs {fdd_tracked:.3f}")
    assert abs(fdd_rec - fdd_tracked) <= FDD_TOL * fdd_tracked, (fdd_rec, fdd_tracked)


def test_demo_phema_sweep(digits_run, scorer, tmp_path):
    """The demo's EMA sweep: a row per length, the plot, and the FDD of a tracked length equal to
    that of its own snapshot (same seeds)."""
    from pfgmpp_fast.apps.demo import phema_sweep
    from pfgmpp_fast.apps.digits import generate_uint8

    seeds = list(range(360))
    out = phema_sweep(
        digits_run,
        str(tmp_path),
        scorer,
        seeds,
        torch.device("cpu"),
        360,
        "auto",
        False,
        128.0,
        stds=(0.05, 0.08),
        num_steps=3,
    )
    assert os.path.isfile(out["plot"]) and out["plot"].endswith("phema.png")
    assert [r["std"] for r in out["table"]] == [0.05, 0.08] and out["tracked"] == sorted(TRACKED)
    assert all(math.isfinite(r["fdd"]) and r["profile_error"] < 0.05 for r in out["table"])
    last, _ = newest(digits_run)
    with torch.no_grad():
        images = generate_uint8(load_network(last[0.05].path).eval(), seeds, 3, batch_size=360)
    assert out["table"][0]["fdd"] == pytest.approx(scorer.fdd(images), rel=1e-4)


def test_reconstruction_does_not_depend_on_the_snapshot_order(digits_run, tmp_path):
    snaps = [s for s in P.list_snapshots(digits_run) if s.std != 0.07]
    shuffled = list(snaps)
    random.Random(1).shuffle(shuffled)
    a = P.reconstruct(snaps, [0.03, 0.08])
    b = P.reconstruct(shuffled[::-1], [0.08, 0.03])[::-1]
    for (net_a, _), (net_b, _) in zip(a, b):
        assert torch.equal(vec(net_a), vec(net_b))
    # and the files' names/listing order do not matter either
    copy_dir = tmp_path / "renamed"
    os.makedirs(copy_dir / "phema")
    for i, s in enumerate(shuffled):
        shutil.copy(s.path, copy_dir / "phema" / f"x{i:03d}.safetensors")
    assert torch.equal(vec(P.reconstruct_network(str(copy_dir), 0.08)), vec(a[1][0]))


def test_bad_input_gets_a_clear_error(digits_run, tmp_path):
    with pytest.raises(ValueError, match=r"0.01 cannot be expressed by the stored profiles"):
        P.reconstruct_network(digits_run, 0.01)
    with pytest.raises(ValueError, match=r"std.*\(0, 0.3003\).*0.4"):
        P.reconstruct_network(digits_run, 0.4)
    with pytest.raises(ValueError, match=r"at-kimg must be within .*\[0.256, 4.096\] kimg, got 9"):
        P.reconstruct_network(digits_run, 0.05, at_kimg=9)
    plain = tmp_path / "plain"
    os.makedirs(plain)
    shutil.copy(P.list_snapshots(digits_run)[0].path, plain / "network-snapshot-000004.safetensors")
    for fn in (P.available_stds, lambda d: P.reconstruct_network(d, 0.05)):
        with pytest.raises(ValueError, match="has no power-function EMA snapshots.*--phema"):
            fn(str(plain))
    mixed = tmp_path / "mixed"
    shutil.copytree(os.path.join(digits_run, "phema"), mixed / "phema")
    stale = P.list_snapshots(str(mixed))[-1].path  # as if another run had written it
    meta = read_metadata(stale)["extra"]
    save_network(stale, load_network(stale), extra_metadata={**meta, "run": {**meta["run"], "lr": 1e-3}})
    with pytest.raises(ValueError, match="come from different runs"):
        P.reconstruct_network(str(mixed), 0.05)
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        P.available_stds(str(tmp_path / "missing"))
    for bad in ("0.05,abc", "0.05,0.5", "0.05,0.05", ""):
        with pytest.raises(ValueError, match="phema"):
            resolve_options(phema=bad)
    with pytest.raises(ValueError, match="phema_snap_kimg"):
        resolve_options(phema="0.05", phema_snap_kimg=0)
    assert resolve_options().phema is None and resolve_options(phema="0.1,0.05").phema == (0.1, 0.05)


def test_phema_command(digits_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        cli_main(["phema", "--run-dir", digits_run, "--std", "0.05,0.08", "--at-kimg", "4.096", "--outdir", str(out)])
        == 0
    )
    files = sorted(os.listdir(out))
    assert files == ["phema-0.050-000004.096.safetensors", "phema-0.080-000004.096.safetensors"]
    last, _ = newest(digits_run)
    ref = vec(load_network(last[0.05].path))
    assert (vec(load_network(str(out / files[0]))) - ref).abs().max() <= 1e-6 * ref.abs().max()
    meta = read_metadata(str(out / files[1]))["extra"]
    assert meta["phema_std"] == 0.08 and meta["kimg"] == 4.096 and meta["phema_error"] < 0.01
    capsys.readouterr()
    assert cli_main(["phema", "--run-dir", digits_run, "--std", "0.05,x", "--outdir", str(out)]) == 2
    assert "error: --std" in capsys.readouterr().err
    assert cli_main(["phema", "--run-dir", str(tmp_path), "--std", "0.05", "--outdir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no power-function EMA snapshots" in err and "Traceback" not in err


def test_train_cli_flags(capsys):
    from pfgmpp_fast.cli import build_parser

    for argv, expected in (
        (["train", "--dry-run"], None),
        (["train", "--phema", "--dry-run"], [0.05, 0.1]),
        (["train", "--phema", "0.03,0.2", "--phema-snap", "100", "--dry-run"], [0.03, 0.2]),
    ):
        assert cli_main(argv) == 0
        resolved = json.loads(capsys.readouterr().out)
        assert resolved["phema"] == expected
    assert build_parser("train").parse_args(["train", "--phema-snap", "100"]).phema_snap_kimg == 100


# ----------------------------------------------------------------------------------------
# Resume


def tiny(run_dir, kimg, **extra):
    return dict(
        run_dir=str(run_dir),
        data="digits",
        arch="ddpmpp",
        D=128,
        batch=128,
        duration_kimg=kimg,
        network=dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]),
        tick_kimg=0.128,
        snap_ticks=None,
        dump_ticks=4,
        lr=2e-3,
        lr_rampup_kimg=1,
        ema_halflife_kimg=0.5,
        dropout=0.1,
        augment=0.0,
        precision="fp32",
        compile=False,
        channels_last=False,
        progress=False,
        seed=5,
        device="cpu",
        max_size=512,
        phema=(0.05, 0.1),
        phema_snap_kimg=0.3,
        **extra,
    )


def test_resume_continues_the_power_function_emas_exactly(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_training(**tiny(whole, 1.536))
    run_training(**tiny(split, 1.024))  # stops (and dumps) at 1.024 kimg
    run_training(**tiny(split, 1.536, resume="auto"))
    a = load_torch_state(str(whole / "training-state-000001.pt"))
    b = load_torch_state(str(split / "training-state-000001.pt"))
    assert a["cur_nimg"] == b["cur_nimg"] == 1536 and a["phema"]["stds"] == [0.05, 0.1]
    for ema_a, ema_b in zip(a["phema"]["emas"], b["phema"]["emas"]):
        assert all(torch.equal(x, y) for x, y in zip(ema_a, ema_b))
    names = sorted(os.listdir(whole / "phema"))
    assert names == sorted(os.listdir(split / "phema")) and len(names) == 2 * 5  # 384, 640, 1024, 1280, 1536
    for name in names:
        assert torch.equal(
            vec(load_network(str(whole / "phema" / name))), vec(load_network(str(split / "phema" / name)))
        )
    # tracking changes nothing else: the network and the half-life EMA are those of a run without it
    plain = tmp_path / "plain"
    run_training(**{**tiny(plain, 1.536), "phema": None})
    c = load_torch_state(str(plain / "training-state-000001.pt"))
    assert "phema" not in c and not os.path.exists(plain / "phema")
    for part in ("net", "ema"):
        assert all(torch.equal(a[part][k], c[part][k]) for k in a[part])
    # a state without these profiles cannot be continued with them
    with pytest.raises(ValueError, match=r"no power-function EMA for --phema \[0.2\]"):
        run_training(**{**tiny(split, 2.0, resume="auto"), "phema": (0.05, 0.2)})


@pytest.mark.gpu
def test_update_does_not_sync_the_host():
    params = [torch.randn(n, device="cuda") for n in (100, 7, 3000)]
    tracker = PowerFunctionEMA((0.05, 0.1), params, template=None, snap_kimg=1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 5):
            tracker.update(params, step * 8, 8)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(tracker.emas[0][0], params[0])  # β = 0 at the first step, θ constant
