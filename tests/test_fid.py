"""FID (pfgmpp_fast/fid.py): statistics, Fréchet distance, resume, sweeps, Inception loading, errors."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import BatchSensitiveFeatures, digits_net, run_ranks, stand_in, tiny_net

from pfgmpp_fast import checkpoint, checks
from pfgmpp_fast.evaluation import calc, features, metrics
from pfgmpp_fast.evaluation import sweep as sweep_engine
from pfgmpp_fast.utils import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------
# Fréchet distance and statistics


def test_frechet_matches_independent_float64():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12))
    b = rng.standard_normal((250, 12)) * 1.5 + 0.3
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert abs(got - expected) <= 1e-6 * abs(expected)
    # analytic: diagonal covariances give Σ (√a − √b)²
    d1, d2 = rng.uniform(0.5, 2, 12), rng.uniform(0.5, 2, 12)
    analytic = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert abs(metrics.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) - analytic) <= 1e-9 * analytic
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-6
    with pytest.raises(ValueError, match="sigma2 has shape"):
        metrics.frechet_distance(mu1, s1, mu2, s2[:5, :5])


def test_streaming_statistics_equal_whole_batch():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(301, 9, generator=g, dtype=torch.float64) * 3 + 1
    whole = feats.numpy()
    shard_a, shard_b = metrics.FeatureStats(9), metrics.FeatureStats(9)
    for start in range(0, 150, 7):
        shard_a.update(feats[start : min(start + 7, 150)])
    for start in range(150, 301, 11):
        shard_b.update(feats[start : start + 11])
    # round trip of one shard through its arrays (as in shard files)
    shard_b = metrics.FeatureStats.from_arrays(
        **{"n": shard_b.to_arrays()["n"], "s": shard_b.to_arrays()["sum"], "so": shard_b.to_arrays()["sum_outer"]}
    )
    total = metrics.FeatureStats(9).merge(shard_a).merge(shard_b)
    assert total.count == 301
    mu, sigma = total.mean_cov()
    np.testing.assert_allclose(mu, whole.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(whole, rowvar=False), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="NaN"):
        metrics.FeatureStats(9).update(torch.full((2, 9), float("nan")))
    with pytest.raises(ValueError, match=r"features must be \[B, 9\]"):
        metrics.FeatureStats(9).update(torch.zeros(2, 8))


@pytest.mark.bitidentity
def test_sharded_stats_equal_unsharded_and_resume_skips(tmp_path, digits):
    from pfgmpp_fast.evaluation.digits_features import digits_uint8

    images = digits_uint8()[0][:97]
    src = calc.ImagesSource(images)
    whole = calc.calc_stats(src, digits, batch_size=97)
    sharded = calc.calc_stats(src, digits, batch_size=8, outdir=str(tmp_path), shard_size=30)
    assert sorted(os.listdir(tmp_path)) == ["stats-0-29.npz", "stats-30-59.npz", "stats-60-89.npz", "stats-90-96.npz"]
    # another batch size: float32 features whose GEMM may sum another batch shape in another order
    for a, b in zip(whole.mean_cov(), sharded.mean_cov()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # the same batches and shards without files: the same bits (grid batches, sums in grid order)
    one_pass = calc.calc_stats(src, digits, batch_size=8, shard_size=30)
    assert torch.equal(one_pass.sum, sharded.sum) and torch.equal(one_pass.sum_outer, sharded.sum_outer)
    log = []
    again = calc.calc_stats(src, digits, batch_size=8, outdir=str(tmp_path), shard_size=30, log=log.append)
    assert all("resumed" in line for line in log) and len(log) == 4
    assert torch.equal(again.sum_outer, sharded.sum_outer)
    with pytest.raises(ValueError, match="another run"):  # other shard boundaries
        calc.calc_stats(src, digits, batch_size=8, outdir=str(tmp_path), shard_size=20)
    with pytest.raises(ValueError, match="another configuration"):
        calc.calc_stats(calc.ImagesSource(images.flip(0)), digits, outdir=str(tmp_path), shard_size=30)


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from test_fid import digits_net
    from pfgmpp_fast.evaluation import calc, features
    ex = features.get_feature_extractor("digits", digits_cache={cache!r})
    src = calc.GeneratorSource(digits_net(), "0-39", num_steps=4, backend="reference")
    calc.calc_stats(src, ex, batch_size=6, outdir={outdir!r}, shard_size=10)
    print("done")
""")


@pytest.mark.bitidentity
def test_kill_and_rerun_gives_the_same_statistics(tmp_path, digits, digits_cache):
    outdir = str(tmp_path / "resume")
    script = tmp_path / "child.py"
    script.write_text(
        KILL_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), cache=digits_cache, outdir=outdir)
    )
    env = dict(os.environ, PFGMPP_FAST_KILL_DURING_WRITE="stats-20-29")  # SIGKILL mid-write of shard 3
    first = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stderr
    done = sorted(f for f in os.listdir(outdir) if f.startswith("stats-"))
    assert done == ["stats-0-9.npz", "stats-10-19.npz"]
    assert [f for f in os.listdir(outdir) if f.startswith(".stats-20-29")]  # the half-written temp file
    mtimes = {f: os.stat(os.path.join(outdir, f)).st_mtime_ns for f in done}
    env.pop("PFGMPP_FAST_KILL_DURING_WRITE")
    second = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "done" in second.stdout, second.stderr
    assert {f: os.stat(os.path.join(outdir, f)).st_mtime_ns for f in done} == mtimes  # not recomputed
    assert sorted(os.listdir(outdir)) == ["stats-0-9.npz", "stats-10-19.npz", "stats-20-29.npz", "stats-30-39.npz"]
    resumed = calc.calc_stats(
        calc.GeneratorSource(digits_net(), "0-39", num_steps=4, backend="reference"),
        digits,
        batch_size=6,
        outdir=outdir,
        shard_size=10,
    )
    fresh = calc.calc_stats(
        calc.GeneratorSource(digits_net(), "0-39", num_steps=4, backend="reference"),
        digits,
        batch_size=6,
        shard_size=10,
    )  # uninterrupted, no files
    assert resumed.count == 40
    assert torch.equal(resumed.sum, fresh.sum) and torch.equal(resumed.sum_outer, fresh.sum_outer)


# ----------------------------------------------------------------------------------------
# Reference files and clear errors


def test_reference_stats_roundtrip_and_wrong_files(tmp_path, digits):
    mu, sigma = calc.reference_stats("digits", digits, batch_size=500)
    path = str(tmp_path / "ref.npz")
    metrics.save_stats(path, mu, sigma)
    with np.load(path) as f:
        assert sorted(f.files) == ["mu", "sigma"] and f["mu"].shape == (64,)
    mu2, sigma2 = metrics.load_stats(path, dim=64)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    with pytest.raises(ValueError, match="2048-d features"):
        metrics.load_stats(path, dim=2048)
    np.savez(tmp_path / "keys.npz", mean=mu, cov=sigma)
    with pytest.raises(ValueError, match="expected arrays 'mu' and 'sigma'"):
        metrics.load_stats(str(tmp_path / "keys.npz"))
    np.save(tmp_path / "plain.npy", mu)
    with pytest.raises(ValueError, match="plain array"):
        metrics.load_stats(str(tmp_path / "plain.npy"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a reference-statistics"):
        metrics.load_stats(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=sigma[:3])
    with pytest.raises(ValueError, match=r"sigma \[d, d\]"):
        metrics.load_stats(str(tmp_path / "shape.npz"))
    with pytest.raises(FileNotFoundError):
        metrics.load_stats(str(tmp_path / "missing.npz"))


def test_fewer_images_than_requested(tmp_path, digits, digits_cache, capsys):
    from pfgmpp_fast import cli
    from pfgmpp_fast.evaluation.digits_features import digits_uint8

    with pytest.raises(ValueError, match="fewer images than requested: 20 .* only 10"):
        calc.calc_stats(calc.ImagesSource(digits_uint8()[0][:10]), digits, num=20)
    np.savez(tmp_path / "imgs.npz", images=digits_uint8()[0][:10].permute(0, 2, 3, 1).numpy())
    calc_images = ["fid", "calc", "--images", str(tmp_path / "imgs.npz"), "--features", "digits"]
    calc_images += ["--digits-cache", digits_cache]
    rc = cli.main([*calc_images, "--num", "20", "--dest", str(tmp_path / "s.npz")])
    assert rc == 2 and "fewer images than requested" in capsys.readouterr().err
    rc = cli.main([*calc_images, "--num", "10", "--outdir", str(tmp_path / "o")])
    assert rc == 0 and (tmp_path / "o" / "stats.npz").exists()


def test_cli_ref_and_calc_with_reference(tmp_path, digits_cache, capsys):
    from pfgmpp_fast import cli

    ref = str(tmp_path / "digits-ref.npz")
    assert (
        cli.main(
            ["fid", "ref", "--data", "digits", "--dest", ref, "--features", "digits", "--digits-cache", digits_cache]
        )
        == 0
    )
    np.savez(
        tmp_path / "imgs.npz", images=(np.arange(5).reshape(5, 1, 1, 1) * 40 + np.zeros((5, 8, 8, 1))).astype(np.uint8)
    )
    calc_images = ["fid", "calc", "--images", str(tmp_path / "imgs.npz"), "--num", "5", "--features", "digits"]
    calc_images += ["--digits-cache", digits_cache]
    assert cli.main([*calc_images, "--ref", ref]) == 0
    assert '"FDD"' in capsys.readouterr().out
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32)[:2048])
    assert cli.main([*calc_images, "--ref", str(bad)]) == 2
    assert "2048-d statistics" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# Inception weights: local file through torch-fidelity's loader, SHA-256 check both ways


def test_inception_weights_local_file_and_sha256_refusal(tmp_path, monkeypatch):
    path = str(tmp_path / "inception-test.pth")
    digest = features.make_random_inception_weights(path, seed=0)
    assert len(digest) == 64 and digest != features.INCEPTION_SHA256
    real_load = torch.load
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    with pytest.raises(ValueError, match="refusing to load Inception weights"):
        features.get_feature_extractor("inception", inception_weights=path)
    assert loads == []  # refused before anything was unpickled
    with pytest.raises(ValueError, match="refusing"):
        features.InceptionFeatures(path, sha256="0" * 64)
    ex = features.get_feature_extractor("inception", inception_weights=path, inception_sha256=digest)
    assert len(loads) == 1 and ex.dim == 2048 and ex.sha256 == digest
    sd = real_load(path, weights_only=True)
    assert torch.equal(ex.net.Conv2d_1a_3x3.conv.weight, sd["Conv2d_1a_3x3.conv.weight"])
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (1, 1, 16, 16), generator=g, dtype=torch.uint8)
    rgb = torch.cat([torch.randint(0, 256, (1, 3, 16, 16), generator=g, dtype=torch.uint8), grey.repeat(1, 3, 1, 1)])
    feats = ex(rgb)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64 and torch.isfinite(feats).all()
    assert not torch.allclose(feats[0], feats[1])
    assert torch.allclose(ex(grey)[0], feats[1], rtol=1e-5, atol=1e-6)  # grey images are repeated to RGB
    with pytest.raises(ValueError, match="64 hex digits"):
        features.InceptionFeatures(path, sha256="abc")
    with pytest.raises(FileNotFoundError):
        features.InceptionFeatures(str(tmp_path / "nope.pth"))


# ----------------------------------------------------------------------------------------
# Sweeps: each kind writes the documented files


def _check_sweep_files(outdir, kind, rows, metric="FDD"):
    for ext in ("csv", "md", "png"):
        assert os.path.getsize(os.path.join(outdir, f"sweep-{kind}.{ext}")) > 0
    csv = open(os.path.join(outdir, f"sweep-{kind}.csv")).read().splitlines()
    assert csv[0].split(",")[:2] == ["kind", "value"] and metric in csv[0] and len(csv) == len(rows) + 1
    md = open(os.path.join(outdir, f"sweep-{kind}.md")).read()
    best = min(rows, key=lambda r: r[metric])
    assert f"Best: {kind} = {best['value']}" in md
    with open(os.path.join(outdir, f"sweep-{kind}.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert all(np.isfinite(r[metric]) for r in rows)


@pytest.fixture(scope="module")
def digits_ref(digits):
    return calc.reference_stats("digits", digits, batch_size=500)


def test_sweep_steps_and_alpha(tmp_path, digits, digits_ref):
    net = digits_net()
    rows = sweep_engine.sweep(
        "steps",
        [2, 5],
        net=net,
        ref=digits_ref,
        extractor=digits,
        seeds="0-23",
        outdir=str(tmp_path),
        batch_size=24,
        shard_size=12,
        backend="reference",
        log=lambda s: None,
    )
    assert [r["nfe"] for r in rows] == [3, 9] and [r["images"] for r in rows] == [24, 24]
    _check_sweep_files(str(tmp_path), "steps", rows)
    assert sorted(os.listdir(tmp_path / "steps-2")) == ["stats-0-11.npz", "stats-12-23.npz"]
    rows = sweep_engine.sweep(
        "alpha",
        [0.0, 1.0],
        net=net,
        ref=digits_ref,
        extractor=digits,
        seeds="0-23",
        outdir=str(tmp_path),
        batch_size=24,
        num_steps=4,
        backend="reference",
        log=lambda s: None,
    )
    _check_sweep_files(str(tmp_path), "alpha", rows)
    assert rows[0]["FDD"] != rows[1]["FDD"]


def test_sweep_bits_restores_weights(tmp_path, digits, digits_ref):
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rows = sweep_engine.sweep(
        "bits",
        [2, 8, 32],
        net=net,
        ref=digits_ref,
        extractor=digits,
        seeds="0-15",
        outdir=str(tmp_path),
        batch_size=16,
        num_steps=2,
        log=lambda s: None,
    )
    _check_sweep_files(str(tmp_path), "bits", rows)
    assert rows[0]["FDD"] != rows[2]["FDD"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    # a rerun in the same outdir resumes; other weights never resume from these shards
    again = sweep_engine.sweep(
        "bits",
        [2, 8, 32],
        net=net,
        ref=digits_ref,
        extractor=digits,
        seeds="0-15",
        outdir=str(tmp_path),
        batch_size=16,
        num_steps=2,
        log=lambda s: None,
    )
    assert [r["FDD"] for r in again] == [r["FDD"] for r in rows]
    with pytest.raises(ValueError, match="another configuration"):
        sweep_engine.sweep(
            "bits",
            [2],
            net=tiny_net(seed=5),
            ref=digits_ref,
            extractor=digits,
            seeds="0-15",
            outdir=str(tmp_path),
            batch_size=16,
            num_steps=2,
            log=lambda s: None,
        )
    # 32 bits reproduces the unquantised network exactly
    plain = calc.calc_stats(calc.GeneratorSource(net, "0-15", num_steps=2), digits, batch_size=16)
    unq = metrics.frechet_distance(*plain.mean_cov(), *digits_ref)
    assert abs(unq - rows[2]["FDD"]) < 1e-9


def test_sweep_checkpoints(tmp_path, digits, digits_ref):
    from safetensors.torch import load_file, save_file

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for kimg, seed in ((0, 1), (200, 2), (100, 3)):
        sd = {k: v.contiguous() for k, v in tiny_net(seed=seed).state_dict().items()}
        save_file(sd, str(run_dir / f"network-snapshot-{kimg:06d}.safetensors"))
    (run_dir / "training-state-000100.pt").write_bytes(b"")  # not a network snapshot

    def load(path):
        net = tiny_net(seed=0)
        net.load_state_dict(load_file(path))
        return net

    assert [k for k, _ in checkpoint.find_checkpoints(str(run_dir))] == [0, 100, 200]
    rows = sweep_engine.sweep(
        "checkpoints",
        None,
        run_dir=str(run_dir),
        ref=digits_ref,
        extractor=digits,
        seeds="0-11",
        outdir=str(tmp_path / "out"),
        batch_size=12,
        num_steps=2,
        load_network=load,
        log=lambda s: None,
    )
    assert [r["value"] for r in rows] == [0, 100, 200]
    assert len({r["FDD"] for r in rows}) == 3
    _check_sweep_files(str(tmp_path / "out"), "checkpoints", rows)
    with pytest.raises(ValueError, match="no network snapshots"):
        checkpoint.find_checkpoints(str(tmp_path / "out"))


def test_cli_calc_and_sweep_from_checkpoint(tmp_path, digits_cache, digits, digits_ref, capsys):
    from pfgmpp_fast import cli
    from pfgmpp_fast.checkpoint import save_network

    net_path = str(tmp_path / "net.safetensors")
    save_network(net_path, tiny_net())
    ref = str(tmp_path / "ref.npz")
    metrics.save_stats(ref, *digits_ref)
    common = [
        "--network",
        net_path,
        "--steps",
        "2",
        "--batch",
        "8",
        "--features",
        "digits",
        "--digits-cache",
        digits_cache,
        "--ref",
        ref,
    ]
    assert (
        cli.main(["fid", "calc", *common, "--num", "16", "--outdir", str(tmp_path / "calc"), "--shard-size", "8"]) == 0
    )
    out = capsys.readouterr().out
    assert '"FDD"' in out and (tmp_path / "calc" / "stats-8-15.npz").exists()
    assert cli.main(["fid", "calc", *common, "--num", "16", "--D", "64"]) == 2
    assert "network/D mismatch" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "fid",
                "sweep",
                "--kind",
                "bits",
                "--values",
                "4,32",
                *common,
                "--seeds",
                "0-7",
                "--outdir",
                str(tmp_path / "sw"),
            ]
        )
        == 0
    )
    rows = open(tmp_path / "sw" / "sweep-bits.csv").read().splitlines()
    assert len(rows) == 3 and rows[1].startswith("bits,4,")


def _fid_rank_worker(rank, cache, outdir, result):
    from pfgmpp_fast.evaluation.digits_features import digits_uint8

    ex = features.get_feature_extractor("digits", digits_cache=cache)
    stats = calc.calc_stats(calc.ImagesSource(digits_uint8()[0][:61]), ex, batch_size=8, outdir=outdir, shard_size=25)
    if rank == 0:
        np.savez(result, **stats.to_arrays())


@pytest.mark.bitidentity
def test_two_gloo_ranks_reduce_to_single_process_statistics(tmp_path, digits, digits_cache):
    from pfgmpp_fast.evaluation.digits_features import digits_uint8

    single = calc.calc_stats(calc.ImagesSource(digits_uint8()[0][:61]), digits, batch_size=8, shard_size=25)
    outdir, result = str(tmp_path / "shards"), str(tmp_path / "two.npz")
    run_ranks(_fid_rank_worker, 2, tmp_path / "ranks", digits_cache, outdir, result)
    assert sorted(os.listdir(outdir)) == ["stats-0-24.npz", "stats-25-49.npz", "stats-50-60.npz"]
    with np.load(result) as f:
        two = metrics.FeatureStats.from_arrays(f["n"], f["sum"], f["sum_outer"])
    assert two.count == 61
    assert torch.equal(single.sum, two.sum) and torch.equal(single.sum_outer, two.sum_outer)


@pytest.mark.bitidentity
def test_streaming_equals_the_png_round_trip(tmp_path, digits):
    """Generation → uint8 → features in memory gives the statistics of the published
    PNG-folder pipeline on the same seeds (PNG is lossless)."""
    from pfgmpp_fast.evaluation import generate as G

    net = digits_net()
    seeds = checks.check_seeds("0-9,1000-1004")
    G.write_images(G.generate_images(net, seeds, 8, num_steps=3, backend="reference"), outdir=str(tmp_path / "png"))
    assert (tmp_path / "png" / "001000" / "001004.png").exists()
    png = calc.calc_stats(calc.ImagesSource(str(tmp_path / "png")), digits, batch_size=15)
    streamed = calc.calc_stats(
        calc.GeneratorSource(net, seeds, num_steps=3, backend="reference"), digits, batch_size=15
    )
    assert png.count == streamed.count == 15
    assert torch.equal(png.sum, streamed.sum) and torch.equal(png.sum_outer, streamed.sum_outer)


# ----------------------------------------------------------------------------------------
# Every mode computes every row in the same batch (by construction, not by a BLAS property)


def _batch_sensitive_source():
    """Images whose every pixel depends on their whole generation batch (a worst-case network)."""
    return calc.GeneratorSource(stand_in(batch_coupling=0.05), "0-22", num_steps=2, backend="reference")


def _batch_sensitive_rank_worker(rank, outdir, result):
    det = features.Detectors(BatchSensitiveFeatures(), "fid,kid")
    stats = calc.calc_stats(_batch_sensitive_source(), det, batch_size=4, outdir=outdir, shard_size=7)
    if rank == 0:
        np.savez(result, **stats["features"].to_arrays())


def _rank_1_lags_after_each_shard_worker(rank, outdir, result):
    """Rank 1 returns from every shard's barrier 0.5 s late: rank 0 meanwhile computes the
    last shard (from carried rows alone, with no collective) and writes its file."""
    if rank == 1:
        barrier = distributed.barrier

        def late_barrier():
            barrier()
            time.sleep(0.5)

        distributed.barrier = late_barrier
    _batch_sensitive_rank_worker(rank, outdir, result)


def test_a_lagging_rank_does_not_take_a_shard_written_in_this_run_for_a_resumed_one(tmp_path):
    # it once did: it read the file, skipped the barrier after the write, and the ranks'
    # collectives no longer matched (rank 0 hung in the next barrier)
    det = features.Detectors(BatchSensitiveFeatures(), "fid,kid")
    one = calc.calc_stats(_batch_sensitive_source(), det, batch_size=4, shard_size=7)["features"]
    result = str(tmp_path / "two.npz")
    run_ranks(_rank_1_lags_after_each_shard_worker, 2, tmp_path / "ranks", str(tmp_path / "two"), result, timeout=40)
    with np.load(result) as f:
        two = metrics.FeatureStats.from_arrays(f["n"], f["sum"], f["sum_outer"], f["rows"])
    assert torch.equal(two.rows, one.rows) and torch.equal(two.sum_outer, one.sum_outer)


@pytest.mark.bitidentity
def test_one_pass_shards_resume_and_ranks_give_the_same_bits_with_batch_sensitive_networks(tmp_path):
    """A generator and a feature extractor whose outputs depend on their whole batch (size,
    position, the other rows: far beyond what a BLAS does): one pass, shards, a resume with
    a lost shard and two gloo ranks still give the same rows and sums, because each mode
    computes every id in its grid batch and adds the batches in grid order. 23 ids in
    batches of 4 and shards of 7: three grid batches straddle two shards."""
    det = features.Detectors(BatchSensitiveFeatures(), "fid,kid")
    one = calc.calc_stats(_batch_sensitive_source(), det, batch_size=4, shard_size=7)["features"]
    outdir = str(tmp_path / "shards")
    sharded = calc.calc_stats(_batch_sensitive_source(), det, batch_size=4, outdir=outdir, shard_size=7)["features"]
    os.unlink(os.path.join(outdir, "stats-7-13.npz"))  # lost: recomputed without the carry
    resumed = calc.calc_stats(_batch_sensitive_source(), det, batch_size=4, outdir=outdir, shard_size=7)["features"]
    result = str(tmp_path / "two.npz")
    run_ranks(_batch_sensitive_rank_worker, 2, tmp_path / "ranks", str(tmp_path / "two"), result)
    with np.load(result) as f:
        two = metrics.FeatureStats.from_arrays(f["n"], f["sum"], f["sum_outer"], f["rows"])
    for other in (sharded, resumed, two):
        assert other.count == 23
        assert torch.equal(other.rows, one.rows)
        assert torch.equal(other.sum, one.sum) and torch.equal(other.sum_outer, one.sum_outer)
    other_batches = calc.calc_stats(_batch_sensitive_source(), det, batch_size=5, shard_size=7)["features"]
    assert not torch.equal(other_batches.rows, one.rows)  # the batch is felt
