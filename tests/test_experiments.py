"""The robustness experiment in its tiny (CI) configuration: end to end, files, resume."""
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
SWEEPS = ("alpha", "bits", "nfe")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cmd(outdir):
    return [sys.executable, "-m", "pfgmpp_fast", "experiment", "robustness", "--tiny", "--outdir", str(outdir),
            "--no-progress"]


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
    for sweep, column, values in (("alpha", "alpha", ["0.0", "0.3"]), ("bits", "bits", ["32", "4"]),
                                  ("nfe", "nfe", ["5", "9"])):
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
    # 4 distinct points (base, alpha 0.3, 4 bits, 3 steps) x 2 sets x 2 D values.
    assert len(results["points"]) == 16 and results["floor_heldout"] > 0
    assert json.loads((outdir / "config.json").read_text())["D_values"] == ["128", "inf"]
    for D in ("128", "inf"):
        done = json.loads((outdir / "train" / f"D{D}" / "done.json").read_text())
        assert done["kimg"] >= 1 and (outdir / done["snapshot"]).is_file()
    # The base point is shared: the same numbers in the alpha=0, bits=32 and NFE=9 columns.
    base = lambda sweep, col, v: [r["fdd_sets"] for r in _read_csv(outdir / f"robustness-{sweep}.csv") if r[col] == v]
    assert base("alpha", "alpha", "0.0") == base("bits", "bits", "32") == base("nfe", "nfe", "9")


def test_resume_after_kill_skips_finished_points(tiny_run, tmp_path):
    reference_dir, _ = tiny_run
    outdir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(outdir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
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
    assert 1 <= len(finished) < 16 and not (outdir / "summary.md").exists()
    before = {p: p.read_text() for p in finished}

    rerun = subprocess.run(_cmd(outdir), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert rerun.stdout.count("(finished earlier -> skipped)") >= len(finished)
    assert "D=128: training finished earlier" in rerun.stdout
    assert all(p.read_text() == text for p, text in before.items())    # untouched
    assert len(_point_files(outdir)) == 16
    for sweep in SWEEPS:
        got, want = _read_csv(outdir / f"robustness-{sweep}.csv"), _read_csv(reference_dir / f"robustness-{sweep}.csv")
        assert [r["D"] for r in got] == [r["D"] for r in want]
        np.testing.assert_allclose([float(r["fdd_mean"]) for r in got], [float(r["fdd_mean"]) for r in want],
                                   rtol=1e-6)
    # Everything is on disk now: a report-only pass (in process) reads all 16 points back.
    from pfgmpp_fast.apps.experiments import run_robustness
    paths = run_robustness(str(outdir), tiny=True, report_only=True, progress=False)
    assert _read_csv(paths["alpha_csv"]) == _read_csv(outdir / "robustness-alpha.csv")


def test_other_configuration_in_same_folder_is_refused(tiny_run):
    from pfgmpp_fast.apps.experiments import run_robustness
    outdir, _ = tiny_run
    with pytest.raises(ValueError, match="another configuration"):
        run_robustness(str(outdir), tiny=True, duration_kimg=2.0)


def test_config_validation():
    from pfgmpp_fast.apps.experiments import FULL_CONFIG, make_config, _points
    from pfgmpp_fast.apps.robustness_report import sweep_points as _sweep_points
    full = make_config()
    assert [2 * s - 1 for s in full["steps"]] == [5, 9, 13, 21, 35]
    assert len(_points(full)) == 13                      # 5 + 5 + 5 sweep values, base point once
    assert [x for x, _ in _sweep_points(full, "nfe")] == [5, 9, 13, 21, 35]
    assert full["D_values"][-1] == float("inf") and FULL_CONFIG["sets"] >= 2
    for bad in (dict(D_values=["0"]), dict(D_values=[8, 8]), dict(alpha=[-0.1]), dict(bits=[1]),
                dict(steps=[0]), dict(sets=0), dict(set_size=1), dict(duration_kimg=0), dict(seed=-1)):
        with pytest.raises((ValueError, TypeError)):
            make_config(**bad)
    with pytest.raises(TypeError, match="unknown"):
        make_config(colour="red")
