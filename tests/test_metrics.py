"""The metric set (fid --metrics): KID, IS, precision/recall and FD-DINOv2 beside FID, one
streaming pass, against torch-fidelity's own computation; resume, two ranks, EMA sweeps, grids."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import digits_net, run_ranks, tiny_net

from pfgmpp_fast.evaluation import calc, features, metrics
from pfgmpp_fast.evaluation import sweep as sweep_engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DIGITS_METRICS = "fid,kid,prc"


@pytest.fixture(scope="module")
def digits_images():
    from pfgmpp_fast.evaluation.digits_features import digits_uint8

    return digits_uint8()[0]


def _tf_kid_prc(gen, real, subset, space="digits"):
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    kid = kid_features_to_metric(gen, real, kid_subset_size=subset, verbose=False)
    prc = prc_features_to_metric(gen, real, verbose=False)
    return {
        "KID": kid["kernel_inception_distance_mean"],
        "KID_std": kid["kernel_inception_distance_std"],
        f"precision_{space}": prc["precision"],
        f"recall_{space}": prc["recall"],
    }


# ----------------------------------------------------------------------------------------
# Digits space: the streamed, sharded features give torch-fidelity's numbers


def test_digits_metrics_match_torch_fidelity_on_the_same_features(tmp_path, digits, digits_images):
    real, gen = digits_images[:300], digits_images[300:420].flip(-1)  # mirrored digits: far from real
    det = features.Detectors(digits, DIGITS_METRICS)
    ref_stats = calc.reference_stats(real, det, batch_size=64)
    metrics.save_reference(str(tmp_path / "ref.npz"), ref_stats)
    ref = metrics.load_reference(str(tmp_path / "ref.npz"), dim=64, metrics=DIGITS_METRICS)
    stats = calc.calc_stats(calc.ImagesSource(gen), det, batch_size=7, outdir=str(tmp_path / "o"), shard_size=50)
    got = metrics.compute_metrics(stats, ref, DIGITS_METRICS, "digits")
    # the kept rows are the features (one batch straight through the extractor; float32
    # batching moves the last bits), in id order; torch-fidelity's numbers on those rows
    f_gen, f_real = stats["features"].rows, torch.from_numpy(ref["features"])
    torch.testing.assert_close(f_gen, digits(gen).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f_real, digits(real).float(), rtol=1e-5, atol=1e-6)
    want = _tf_kid_prc(f_gen, f_real, subset=120)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    g, r = f_gen.double().numpy(), f_real.double().numpy()
    fdd = metrics.frechet_distance(g.mean(0), np.cov(g, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
    assert got["FDD"] == pytest.approx(fdd, rel=1e-5)
    # independent KID (unbiased MMD², cubic polynomial kernel, γ = 1/d, c = 1) on one full "subset"
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3
    n = g.shape[0]
    sub = np.random.RandomState(2020)
    gi, ri = sub.choice(120, 120, replace=False), sub.choice(300, 120, replace=False)
    x, y = g[gi], r[ri]
    mmd = (
        (k(x, x).sum() - np.trace(k(x, x))) / (n * (n - 1))
        + (k(y, y).sum() - np.trace(k(y, y))) / (n * (n - 1))
        - 2 * k(x, y).mean()
    )
    assert abs(mmd) > 0
    from torch_fidelity.metric_kid import kid_features_to_metric

    one = kid_features_to_metric(f_gen, f_real, kid_subsets=1, kid_subset_size=120, verbose=False)
    assert one["kernel_inception_distance_mean"] == pytest.approx(mmd, rel=1e-4)
    # real vs real is close to zero / precision high; generated (mirrored) is worse on every metric
    same = metrics.compute_metrics(
        calc.calc_stats(calc.ImagesSource(digits_images[300:420]), det), ref, DIGITS_METRICS, "digits"
    )
    assert same["FDD"] < got["FDD"] and same["KID"] < got["KID"] and same["precision_digits"] > got["precision_digits"]


def test_metric_names_and_reference_errors(tmp_path, digits, digits_images):
    assert metrics.parse_metrics("prc,fid") == ("fid", "prc")
    # precision/recall always name their feature space (torch-fidelity's default for prc is VGG-16)
    assert metrics.metric_columns("fid,kid,prc", "inception") == [
        "FID",
        "KID",
        "KID_std",
        "precision_inception",
        "recall_inception",
    ]
    assert metrics.metric_columns("prc,fid", "digits") == ["FDD", "precision_digits", "recall_digits"]
    assert [metrics.lower_is_better(c) for c in ("FDD", "KID", "precision_inception", "recall_digits", "IS")] == [
        True,
        True,
        False,
        False,
        False,
    ]
    for bad in ("", "fid,bogus", "FID"):
        with pytest.raises(ValueError, match="--metrics must be"):
            metrics.parse_metrics(bad)
    with pytest.raises(ValueError, match="needs --features inception"):
        features.Detectors(digits, "fid,isc")
    with pytest.raises(ValueError, match="DINOv2"):
        features.Detectors(digits, "fd_dinov2")
    mu, sigma = calc.reference_stats(digits_images[:50], digits)
    metrics.save_stats(str(tmp_path / "plain.npz"), mu, sigma)  # a published-format file: mu, sigma only
    assert set(metrics.load_reference(str(tmp_path / "plain.npz"), dim=64)) == {"mu", "sigma"}
    with pytest.raises(ValueError, match=r"no \['features'\] for --metrics fid,kid.*fid ref --metrics fid,kid"):
        metrics.load_reference(str(tmp_path / "plain.npz"), dim=64, metrics="fid,kid")
    with pytest.raises(ValueError, match="dinov2_mu"):
        metrics.load_reference(str(tmp_path / "plain.npz"), dim=64, metrics="fd_dinov2")


def test_cli_ref_and_calc_report_every_digits_metric(tmp_path, digits_cache, capsys):
    import json

    from pfgmpp_fast import cli
    from pfgmpp_fast.checkpoint import save_network

    ref = str(tmp_path / "ref.npz")
    common = ["--features", "digits", "--digits-cache", digits_cache, "--metrics", DIGITS_METRICS]
    assert cli.main(["fid", "ref", "--data", "digits", "--dest", ref, *common]) == 0
    with np.load(ref) as f:
        assert sorted(f.files) == ["features", "mu", "sigma"] and f["features"].shape == (1797, 64)
    net_path = str(tmp_path / "net.safetensors")
    save_network(net_path, tiny_net())
    calc_net = ["fid", "calc", "--network", net_path, "--steps", "2", "--batch", "8", "--num", "16", "--ref", ref]
    calc_net += ["--outdir", str(tmp_path / "calc"), "--shard-size", "8"]
    assert cli.main([*calc_net, *common]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"FDD", "KID", "KID_std", "precision_digits", "recall_digits"} <= set(result) and result["images"] == 16
    assert "precision" not in result and result["features"] == "digits"
    assert json.loads((tmp_path / "calc" / "result.json").read_text())["KID"] == result["KID"]
    # a shard directory of FID alone is not resumed into KID (it lacks the features)
    assert cli.main([*calc_net, *common[:4]]) == 2
    assert "another configuration" in capsys.readouterr().err
    assert (
        cli.main(
            ["fid", "calc", "--network", net_path, "--num", "16", "--ref", ref, "--metrics", "fid,nope", *common[:4]]
        )
        == 2
    )
    assert "--metrics must be" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# Kill and resume; two ranks

KILL_SCRIPT = textwrap.dedent("""
    import sys, json
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from test_fid import digits_net
    from pfgmpp_fast.evaluation import calc, features, metrics
    ex = features.Detectors(features.get_feature_extractor("digits", digits_cache={cache!r}), {metrics!r})
    ref = metrics.load_reference({ref!r}, dim=64, metrics={metrics!r})
    src = calc.GeneratorSource(digits_net(), "0-39", num_steps=4, backend="reference")
    stats = calc.calc_stats(src, ex, batch_size=6, outdir={outdir!r}, shard_size=10)
    print(json.dumps(metrics.compute_metrics(stats, ref, {metrics!r}, "digits")))
""")


@pytest.mark.slow
@pytest.mark.bitidentity
def test_kill_and_resume_gives_identical_metrics(tmp_path, digits, digits_cache, digits_images):
    import json

    ref = str(tmp_path / "ref.npz")
    metrics.save_reference(ref, calc.reference_stats(digits_images[:200], features.Detectors(digits, DIGITS_METRICS)))
    script = tmp_path / "child.py"
    outdir = str(tmp_path / "resume")
    script.write_text(
        KILL_SCRIPT.format(
            root=ROOT,
            tests=os.path.join(ROOT, "tests"),
            cache=digits_cache,
            outdir=outdir,
            ref=ref,
            metrics=DIGITS_METRICS,
        )
    )
    env = dict(os.environ, PFGMPP_FAST_KILL_DURING_WRITE="stats-20-29")
    first = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert sorted(f for f in os.listdir(outdir) if f.startswith("stats-")) == ["stats-0-9.npz", "stats-10-19.npz"]
    env.pop("PFGMPP_FAST_KILL_DURING_WRITE")
    second = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    resumed = json.loads(second.stdout.strip().splitlines()[-1])
    # uninterrupted, in this process, same batches and shards
    src = calc.GeneratorSource(digits_net(), "0-39", num_steps=4, backend="reference")
    stats = calc.calc_stats(
        src, features.Detectors(digits, DIGITS_METRICS), batch_size=6, outdir=str(tmp_path / "fresh"), shard_size=10
    )
    fresh = metrics.compute_metrics(stats, metrics.load_reference(ref, 64, DIGITS_METRICS), DIGITS_METRICS, "digits")
    assert set(resumed) == {"FDD", "KID", "KID_std", "precision_digits", "recall_digits"}
    assert resumed == fresh  # identical, every metric


def _rank_worker(rank, cache, outdir, result):
    from pfgmpp_fast.evaluation.digits_features import digits_uint8

    det = features.Detectors(features.get_feature_extractor("digits", digits_cache=cache), DIGITS_METRICS)
    stats = calc.calc_stats(calc.ImagesSource(digits_uint8()[0][:61]), det, batch_size=8, outdir=outdir, shard_size=25)
    if rank == 0:
        np.savez(result, **stats["features"].to_arrays())


@pytest.mark.bitidentity
def test_two_gloo_ranks_equal_one_process_for_every_metric(tmp_path, digits, digits_cache, digits_images):
    """Every id is computed in the same grid batch of 8 on one process and on two ranks (the
    shard boundary at 25 included) and the sums are added in the same order: the same bits,
    whatever the CPU's BLAS does with other batch shapes."""
    det = features.Detectors(digits, DIGITS_METRICS)
    ref_stats = calc.reference_stats(digits_images[100:400], det)
    ref = {
        "features": ref_stats["features"].rows.numpy(),
        **dict(zip(("mu", "sigma"), ref_stats["features"].mean_cov())),
    }
    single = calc.calc_stats(calc.ImagesSource(digits_images[:61]), det, batch_size=8, shard_size=25)
    outdir, result = str(tmp_path / "shards"), str(tmp_path / "two.npz")
    run_ranks(_rank_worker, 2, tmp_path / "ranks", digits_cache, outdir, result)
    with np.load(result) as f:
        two = metrics.FeatureStats.from_arrays(f["n"], f["sum"], f["sum_outer"], f["rows"])
    assert torch.equal(two.rows, single["features"].rows)  # id order restored across ranks
    assert torch.equal(two.sum, single["features"].sum) and torch.equal(two.sum_outer, single["features"].sum_outer)
    a = metrics.compute_metrics(single, ref, DIGITS_METRICS, "digits")
    b = metrics.compute_metrics({"features": two}, ref, DIGITS_METRICS, "digits")
    assert a == b


# ----------------------------------------------------------------------------------------
# Inception: IS (logits), KID and precision/recall


@pytest.mark.slow
def test_inception_metrics_match_torch_fidelity_on_the_same_features(tmp_path):
    """IS from the Inception logits, KID and precision/recall from the pool features, all of
    one sharded pass, equal torch-fidelity's own functions on those features (random
    Inception weights the test makes; ~0.8 s per image on one CPU thread: 8 + 8 images)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    path = str(tmp_path / "inception.pth")
    digest = features.make_random_inception_weights(path, seed=0)
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (8, 3, 16, 16), generator=g, dtype=torch.uint8)
    gen = (real.float() * 0.5 + torch.randint(0, 128, (8, 3, 16, 16), generator=g)).to(torch.uint8)
    ex = features.get_feature_extractor("inception", inception_weights=path, inception_sha256=digest)
    det = features.Detectors(ex, "fid,kid,isc,prc")
    assert det.layout == {"features": (2048, True), "logits": (1008, True)}
    ref_stats = calc.reference_stats(real, det, batch_size=8)
    ref = {
        "features": ref_stats["features"].rows.numpy(),
        **dict(zip(("mu", "sigma"), ref_stats["features"].mean_cov())),
    }
    outdir = str(tmp_path / "shards")
    stats = calc.calc_stats(calc.ImagesSource(gen), det, batch_size=3, outdir=outdir, shard_size=4)
    ours = metrics.compute_metrics(stats, ref, det.metrics, "inception", kid_subset_size=8, isc_splits=2)
    assert stats["logits"].rows.shape == (8, 1008) and np.isfinite(ours["FID"])
    isc = isc_features_to_metric(stats["logits"].rows, splits=2, shuffle=True, rng_seed=2020)
    want = {
        "IS": isc["inception_score_mean"],
        "IS_std": isc["inception_score_std"],
        **_tf_kid_prc(stats["features"].rows, torch.from_numpy(ref["features"]), subset=8, space="inception"),
    }
    for k, v in want.items():
        assert ours[k] == pytest.approx(v, rel=1e-6, abs=1e-12), k
    assert not torch.equal(stats["logits"].rows[0], stats["logits"].rows[1])
    # resume: a lost shard is recomputed, the logits rows come back identical
    os.unlink(os.path.join(outdir, "stats-4-7.npz"))
    again = calc.calc_stats(calc.ImagesSource(gen), det, batch_size=3, outdir=outdir, shard_size=4)
    assert torch.equal(again["logits"].rows, stats["logits"].rows)
    assert metrics.compute_metrics(again, ref, det.metrics, "inception", kid_subset_size=8, isc_splits=2) == ours


# ----------------------------------------------------------------------------------------
# FD-DINOv2: timm's ViT-L/14 on random weights the test makes, through --dinov2-weights


@pytest.mark.slow
def test_fd_dinov2_through_dinov2_weights_with_sha256(tmp_path, digits_cache, digits_images, capsys, monkeypatch):
    import json

    import timm
    from safetensors.torch import save_file

    from pfgmpp_fast import cli
    from pfgmpp_fast.evaluation.features import DINOV2_ARCH, sha256_of_file

    with torch.device("meta"):
        shapes = timm.create_model(DINOV2_ARCH, pretrained=False, num_classes=0).state_dict()
    g = torch.Generator().manual_seed(0)
    state = {
        k: (
            torch.randn(v.shape, generator=g) * (0.02 if v.dim() > 1 else 0.1)
            + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
        ).contiguous()
        for k, v in shapes.items()
    }
    weights = str(tmp_path / "dinov2.safetensors")
    save_file(state, weights)
    digest = sha256_of_file(weights)
    np.savez(tmp_path / "real.npz", images=digits_images[:6].permute(0, 2, 3, 1).numpy())
    np.savez(tmp_path / "gen.npz", images=digits_images[6:12].flip(-1).permute(0, 2, 3, 1).numpy())
    common = [
        "--features",
        "digits",
        "--digits-cache",
        digits_cache,
        "--metrics",
        "fid,fd_dinov2",
        "--dinov2-weights",
        weights,
        "--dinov2-sha256",
        digest,
        "--dinov2-size",
        "28",
    ]
    ref = str(tmp_path / "ref.npz")
    assert cli.main(["fid", "ref", "--data", str(tmp_path / "real.npz"), "--dest", ref, *common]) == 0
    calc_images = ["fid", "calc", "--images", str(tmp_path / "gen.npz"), "--num", "6", "--ref", ref]
    calc_images += ["--outdir", str(tmp_path / "o"), "--shard-size", "3", *common]
    assert cli.main(calc_images) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # resume: a lost shard is recomputed, the DINOv2 moments come back identical
    os.unlink(tmp_path / "o" / "stats-3-5.npz")
    assert cli.main(calc_images) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (again["FD_DINOv2"], again["FDD"]) == (result["FD_DINOv2"], result["FDD"])
    # independent: timm's model for a 2x2 patch grid, the positional embedding resampled as the
    # published DINOv2 does at run time (bicubic, scale (2 + 0.1) / 37), EDM2's preprocessing by hand
    net = timm.create_model(DINOV2_ARCH, pretrained=False, num_classes=0, img_size=28).eval()
    pos = state["pos_embed"]
    grid = torch.nn.functional.interpolate(
        pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2),
        mode="bicubic",
        scale_factor=(2.1 / 37, 2.1 / 37),
        antialias=False,
    )
    net.load_state_dict({**state, "pos_embed": torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)})

    def feats(u):
        x = (
            torch.nn.functional.interpolate(u.float().repeat(1, 3, 1, 1), size=(28, 28), mode="bicubic", antialias=True)
            / 255
        )
        x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
            1, 3, 1, 1
        )
        with torch.no_grad():
            return net(x).double().numpy()

    a, b = feats(digits_images[6:12].flip(-1)), feats(digits_images[:6])
    want = metrics.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert result["FD_DINOv2"] == pytest.approx(want, rel=1e-3) and "FDD" in result
    # a wrong digest is refused before the file is read as weights; a pickle needs the digest
    loads = []
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: loads.append(a))
    with pytest.raises(ValueError, match="refusing to load DINOv2 weights"):
        features.DINOv2Features(weights, sha256="0" * 64)
    torch.save({"x": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        features.DINOv2Features(str(tmp_path / "w.pth"))
    assert loads == []


# ----------------------------------------------------------------------------------------
# Sweeps: every metric, one figure each; post-hoc EMA lengths


def _ema_net(std):
    """A tiny network whose weights depend on `std` (no zero-initialised output layer)."""
    net = tiny_net(seed=0)
    g = torch.Generator().manual_seed(int(std * 1000))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def _fake_phema(monkeypatch, calls):
    """phema.reconstruct_network replaced by tiny networks."""
    import pfgmpp_fast.phema as phema

    def reconstruct_network(run_dir, std, at_kimg=None, device="cpu"):
        calls.append((run_dir, std, at_kimg, str(device)))
        return _ema_net(std)

    monkeypatch.setattr(phema, "reconstruct_network", reconstruct_network, raising=False)


def test_sweep_ema_reports_every_metric_with_one_figure_each(tmp_path, digits, digits_images, monkeypatch):
    from PIL import Image

    calls = []
    _fake_phema(monkeypatch, calls)
    det = features.Detectors(digits, DIGITS_METRICS)
    ref_stats = calc.reference_stats(digits_images[:300], det)
    ref = {
        "features": ref_stats["features"].rows.numpy(),
        **dict(zip(("mu", "sigma"), ref_stats["features"].mean_cov())),
    }
    rows = sweep_engine.sweep(
        "ema",
        [0.05, 0.1],
        run_dir=str(tmp_path / "run"),
        ref=ref,
        extractor=det,
        seeds="0-15",
        outdir=str(tmp_path / "sw"),
        batch_size=16,
        num_steps=2,
        at_kimg=3.0,
        log=lambda s: None,
    )
    assert calls[0][:3] == (str(tmp_path / "run"), 0.05, 3.0) and [c[1] for c in calls][-2:] == [0.05, 0.1]
    assert [r["value"] for r in rows] == [0.05, 0.1] and rows[0]["FDD"] != rows[1]["FDD"]
    for r in rows:
        assert all(np.isfinite(r[c]) for c in ("FDD", "KID", "precision_digits", "recall_digits"))
    # the EMA points are the reconstructed networks: point 0.1 equals its network sampled directly
    direct = calc.calc_stats(calc.GeneratorSource(_ema_net(0.1), "0-15", num_steps=2), det, batch_size=16)
    assert metrics.compute_metrics(direct, ref, DIGITS_METRICS, "digits")["KID"] == pytest.approx(rows[1]["KID"])
    out = tmp_path / "sw"
    header = (out / "sweep-ema.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["kind", "value"] and {"FDD", "KID", "precision_digits", "recall_digits"} <= set(header)
    md = (out / "sweep-ema.md").read_text()
    assert "Best: ema = " in md and "with KID =" in md and "with precision_digits =" in md
    for png in ("sweep-ema.png", "sweep-ema-KID.png", "sweep-ema-precision_digits.png"):
        assert Image.open(out / png).format == "PNG"
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        sweep_engine.sweep("ema", [1.5], run_dir="x", ref=ref, extractor=det, log=lambda s: None)
    with pytest.raises(ValueError, match="needs run_dir"):
        sweep_engine.sweep("ema", [0.05], ref=ref, extractor=det, log=lambda s: None)


def test_cli_sweep_ema_with_metrics(tmp_path, digits_cache, monkeypatch, capsys):
    from pfgmpp_fast import cli

    calls = []
    _fake_phema(monkeypatch, calls)
    ref = str(tmp_path / "ref.npz")
    common = ["--features", "digits", "--digits-cache", digits_cache, "--metrics", "fid,kid"]
    assert cli.main(["fid", "ref", "--data", "digits", "--dest", ref, *common]) == 0
    assert (
        cli.main(
            [
                "fid",
                "sweep",
                "--kind",
                "ema",
                "--values",
                "0.05,0.1",
                "--run-dir",
                str(tmp_path),
                "--ref",
                ref,
                "--seeds",
                "0-7",
                "--steps",
                "2",
                "--batch",
                "8",
                "--outdir",
                str(tmp_path / "sw"),
                *common,
            ]
        )
        == 0
    )
    assert len(calls) >= 2 and (tmp_path / "sw" / "sweep-ema-KID.png").exists()
    rows = (tmp_path / "sw" / "sweep-ema.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("ema,0.05,")


# ----------------------------------------------------------------------------------------
# Grids people can read


def test_image_grid_padding_and_border():
    from pfgmpp_fast.utils.plots import image_grid

    images = np.full((5, 1, 8, 8), 255, np.uint8)
    grid = image_grid(images, cols=3, scale=2, gap=4, gap_value=200, pad=3, pad_value=0, border=4)
    cell = 8 * 2 + 2 * 3
    assert grid.shape == (2 * 4 + 2 * (cell + 4) - 4, 2 * 4 + 3 * (cell + 4) - 4)
    assert (grid[:4] == 200).all() and (grid[:, :4] == 200).all()  # border
    top = left = 4 + cell + 4  # image 4: row 1, column 1
    assert (grid[top : top + 3, left : left + cell] == 0).all()  # padding above the image
    assert (grid[top + 3 : top + 3 + 16, left + 3 : left + 3 + 16] == 255).all()  # the image itself
    assert (grid[top - 4 : top, left : left + cell] == 200).all()  # the gap between rows
    with pytest.raises(ValueError, match="pad must be"):
        image_grid(images, pad=-1)
