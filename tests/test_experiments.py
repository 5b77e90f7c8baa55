"""The robustness experiment in its tiny (CI) configuration: end to end, files, resume."""

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = ("alpha", "bits", "nfe", "nfe-dpmpp2m", "ema")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cmd(outdir):
    return [
        sys.executable,
        "-m",
        "pfgmpp_fast",
        "experiment",
        "robustness",
        "--tiny",
        "--outdir",
        str(outdir),
        "--no-progress",
    ]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _point_files(outdir):
    return sorted(p for p in (outdir / "points").rglob("set*.json")) if (outdir / "points").exists() else []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("robustness") / "uninterrupted"
    proc = subprocess.run(_cmd(outdir), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return outdir, proc.stdout


def test_tiny_writes_every_documented_file(tiny_run):
    from PIL import Image

    outdir, stdout = tiny_run
    for sweep, column, values in (
        ("alpha", "alpha", ["0.0", "0.3"]),
        ("bits", "bits", ["32", "4"]),
        ("nfe", "nfe", ["5", "9"]),
        ("nfe-dpmpp2m", "nfe", ["5", "9"]),
    ):
        rows = _read_csv(outdir / f"robustness-{sweep}.csv")
        assert [(r["D"], r[column]) for r in rows] == [(D, v) for D in ("128", "inf") for v in values]
        for r in rows:
            assert np.isfinite(float(r["fdd_mean"])) and float(r["fdd_mean"]) > 0
            assert float(r["fdd_spread"]) >= 0 and r["sets"] == "2" and r["images_per_set"] == "100"
            sets = [float(v) for v in r["fdd_sets"].split(";")]
            assert float(r["fdd_mean"]) == pytest.approx(np.mean(sets), rel=1e-5)
        table = (outdir / f"robustness-{sweep}.md").read_text()
        assert "| 128 |" in table and "| inf |" in table and "±" in table and "held-out real digits" in table
        image = Image.open(outdir / f"robustness-{sweep}.png")
        assert image.format == "PNG" and image.size[0] > 200
        assert str(outdir / f"robustness-{sweep}.png") in stdout
    summary = (outdir / "summary.md").read_text()
    assert "## Sweep: alpha" in summary and "## Training" in summary and "Versions:" in summary
    results = json.loads((outdir / "results.json").read_text())
    # 6 distinct points (base, alpha 0.3, 4 bits, 3 steps, DPM-Solver++ at 5 and 9 NFE) x 2 sets x 2 D values.
    assert len(results["points"]) == 24 and results["floor_heldout"] > 0
    assert json.loads((outdir / "config.json").read_text())["D_values"] == ["128", "inf"]
    for D in ("128", "inf"):
        done = json.loads((outdir / "train" / f"D{D}" / "done.json").read_text())
        assert done["kimg"] >= 1 and (outdir / done["snapshot"]).is_file()
    # The base point is shared: the same numbers in the alpha=0, bits=32 and NFE=9 columns.
    base = lambda sweep, col, v: [r["fdd_sets"] for r in _read_csv(outdir / f"robustness-{sweep}.csv") if r[col] == v]
    assert base("alpha", "alpha", "0.0") == base("bits", "bits", "32") == base("nfe", "nfe", "9")
    # the multistep solver's points: NFE = steps, sampled with it (other numbers than Heun's at the same NFE)
    solver_points = [r for r in results["points"] if r.get("solver") == "dpmpp2m"]
    assert sorted({(r["steps"], r["nfe"]) for r in solver_points}) == [(5, 5), (9, 9)]
    assert base("nfe-dpmpp2m", "nfe", "9") != base("nfe", "nfe", "9")
    assert "## Sweep: nfe-dpmpp2m" in summary


def test_tiny_ema_sweep(tiny_run):
    """Each D tracks power-function EMAs; the 'ema' sweep scores the network reconstructed for
    every configured EMA length (post-hoc EMA) by FDD, KID and precision/recall."""
    from PIL import Image

    from pfgmpp_fast.training.phema import available_stds

    outdir, stdout = tiny_run
    rows = _read_csv(outdir / "robustness-ema.csv")
    assert [(r["D"], r["ema"]) for r in rows] == [(D, v) for D in ("128", "inf") for v in ("0.05", "0.1")]
    for r in rows:
        for key in ("fdd", "kid", "precision", "recall"):
            assert np.isfinite(float(r[f"{key}_mean"])) and float(r[f"{key}_spread"]) >= 0, (key, r)
        assert float(r["fdd_mean"]) > 0 and 0 <= float(r["precision_mean"]) <= 1 and r["sets"] == "2"
        assert np.isfinite(float(r["degradation_mean"]))  # paired with the base point
    for D in ("128", "inf"):
        assert available_stds(str(outdir / "train" / f"D{D}")) == [0.05, 0.1]
    table = (outdir / "robustness-ema.md").read_text()
    assert "| D \\ ema | 0.05 | 0.1 |" in table and "| inf |" in table and "KID" in table and "recall" in table
    for name in (
        "robustness-ema.png",
        "robustness-ema-kid.png",
        "robustness-ema-precision.png",
        "robustness-ema-recall.png",
    ):
        assert Image.open(outdir / name).format == "PNG" and str(outdir / name) in stdout
    assert "## Sweep: ema" in (outdir / "summary.md").read_text()
    results = json.loads((outdir / "results.json").read_text())
    ema = results["ema_points"]
    assert sorted((r["D"], r["ema"], r["set"]) for r in ema) == [
        (D, e, k) for D in ("128", "inf") for e in (0.05, 0.1) for k in (0, 1)
    ]
    assert all(r["images"] == 100 and r["steps"] == 5 and np.isfinite(r["kid"]) for r in ema)
    # Other weights than the training EMA: the scores differ from the base point's.
    base = {(r["D"], r["set"]): r["fdd"] for r in results["points"] if r["point"] == "alpha0-bits32-steps5"}
    assert all(r["fdd"] != base[(r["D"], r["set"])] for r in ema)


@pytest.mark.slow
def test_resume_after_kill_skips_finished_points(tiny_run, tmp_path):
    reference_dir, _ = tiny_run
    outdir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(outdir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not _point_files(outdir) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = _point_files(outdir)
    assert 1 <= len(finished) < 24 and not (outdir / "summary.md").exists()
    before = {p: p.read_text() for p in finished}

    rerun = subprocess.run(_cmd(outdir), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert rerun.stdout.count("(finished earlier -> skipped)") >= len(finished)
    assert "D=128: training finished earlier" in rerun.stdout
    assert all(p.read_text() == text for p, text in before.items())  # untouched
    assert len(_point_files(outdir)) == 24
    for sweep in SWEEPS:
        got, want = _read_csv(outdir / f"robustness-{sweep}.csv"), _read_csv(reference_dir / f"robustness-{sweep}.csv")
        assert [r["D"] for r in got] == [r["D"] for r in want]
        np.testing.assert_allclose([float(r["fdd_mean"]) for r in got], [float(r["fdd_mean"]) for r in want], rtol=1e-6)
    # Everything is on disk now: a report-only pass (in process) reads all 24 points back.
    from pfgmpp_fast.apps.experiments import run_robustness

    paths = run_robustness(str(outdir), tiny=True, report_only=True, progress=False)
    assert _read_csv(paths["alpha_csv"]) == _read_csv(outdir / "robustness-alpha.csv")


def test_other_configuration_in_same_folder_is_refused(tiny_run):
    from pfgmpp_fast.apps.experiments import run_robustness

    outdir, _ = tiny_run
    with pytest.raises(ValueError, match="another configuration"):
        run_robustness(str(outdir), tiny=True, duration_kimg=2.0)


def test_config_validation():
    from pfgmpp_fast.apps.experiments import FULL_CONFIG, distinct_points, make_config
    from pfgmpp_fast.apps.robustness_report import sweep_points

    full = make_config()
    assert [2 * s - 1 for s in full["steps"]] == [5, 9, 13, 21, 35]
    assert len(distinct_points(full)) == 33  # 5 + 5 + 5 sweep values, base point once, 4 x 5 solvers
    assert [x for x, _ in sweep_points(full, "nfe")] == [5, 9, 13, 21, 35]
    assert full["D_values"][-1] == float("inf") and FULL_CONFIG["sets"] >= 2
    for bad in (
        dict(D_values=["0"]),
        dict(D_values=[8, 8]),
        dict(alpha=[-0.1]),
        dict(bits=[1]),
        dict(steps=[0]),
        dict(nfe_solvers=["heun"]),
        dict(nfe_solvers=["rk4"]),
        dict(nfe_solvers=["ipndm", "ipndm"]),
        dict(sets=0),
        dict(set_size=1),
        dict(duration_kimg=0),
        dict(seed=-1),
    ):
        with pytest.raises((ValueError, TypeError)):
            make_config(**bad)
    with pytest.raises(TypeError, match="unknown"):
        make_config(colour="red")


def test_config_ema_lengths():
    from pfgmpp_fast.apps.experiments import make_config
    from pfgmpp_fast.apps.robustness_report import sweep_points

    assert [x for x, _ in sweep_points(make_config(), "ema")] == [0.05, 0.1, 0.15]
    assert sweep_points(make_config(tiny=True), "ema") == [(0.05, "ema0.05"), (0.1, "ema0.1")]
    for bad in ([0.0], [-0.1], [0.5], [0.05, 0.05], ["0.1"], [True]):
        with pytest.raises(ValueError, match="ema values"):
            make_config(ema=bad)


def test_nfe_values_option_builds_the_grid_for_every_solver(capsys):
    """`--nfe-values`: odd NFE only (Heun: 2·steps − 1), and every NFE sweep samples at those NFE."""
    from pfgmpp_fast import cli
    from pfgmpp_fast.apps.experiments import add_arguments, distinct_points, make_config, steps_for_nfe
    from pfgmpp_fast.apps.robustness_report import sweep_points, sweeps
    from pfgmpp_fast.sampler import SamplerOptions

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    wanted = [3, 5, 7, 9, 13, 21, 35]
    args = parser.parse_args(["robustness", "--nfe-values", " 3,5,7, 9,13,21,35"])
    assert args.nfe_values == wanted and parser.parse_args(["robustness"]).nfe_values is None
    config = make_config(steps=steps_for_nfe(args.nfe_values))
    assert config["steps"] == [2, 3, 4, 5, 7, 11, 18]
    points = distinct_points(config)
    nfe_sweeps = [s for s in sweeps(config) if s.startswith("nfe")]
    assert nfe_sweeps == ["nfe", "nfe-euler", "nfe-dpmpp2m", "nfe-ipndm", "nfe-ipndm_v"]
    for sweep in nfe_sweeps:
        grid = sweep_points(config, sweep)
        assert [x for x, _ in grid] == wanted, sweep
        for x, name in grid:  # the NFE the sampler will actually spend on that point
            p = points[name]
            assert SamplerOptions(num_steps=p["steps"], solver=p.get("solver", "heun")).nfe == x, (sweep, name)
    for text, shown in (
        ("4,5", "4: not an odd"),
        ("0", "0: not an odd"),
        ("3,3", "got 3, 3"),
        ("a", "'a'"),
        ("", "none"),
    ):
        code = cli.main(["experiment", "robustness", "--nfe-values", text, "--outdir", "unused"])
        err = capsys.readouterr().err
        assert code == 2 and "--nfe-values" in err and shown in err and "Traceback" not in err, (text, err)
    with pytest.raises(ValueError, match="nfe_values: must be distinct odd integers"):
        steps_for_nfe([1, 2])
