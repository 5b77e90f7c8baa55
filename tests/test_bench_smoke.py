"""The benchmark suites must not rot: run each in its CPU smoke mode, end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_suite_smoke_writes_json_and_markdown(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pfgmpp_fast", "bench", "--smoke", "--device", "cpu", "--outdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_path,) = tmp_path.glob("*-smoke.json")
    payload = json.loads(json_path.read_text())
    assert payload["smoke"] is True
    assert payload["ceilings"]["copy_GBps"] > 0 and payload["ceilings"]["bf16_matmul_TFLOPs"] > 0
    assert set(payload["suites"]) == {"kernels", "networks", "training", "sampling"}
    for name, result in payload["suites"].items():
        assert "error" not in result, (name, result.get("stderr_tail"))
        assert result.get("rows"), f"suite {name} produced no rows"
    md = json_path.with_suffix(".md").read_text()
    assert "Ceilings measured in this run" in md and "## kernels" in md
    # the short table comes last on stdout
    assert "kernels:" in proc.stdout and "sampling:" in proc.stdout


def test_solver_step_benchmark_runs(tmp_path):
    """benchmarks/bench_solver_step.py: a row per case and solver, Heun's ratio 1."""
    from pfgmpp_fast import checks, ops

    out = tmp_path / "steps.json"
    backend = "cpu" if ops.has_extension() else "reference"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_solver_step.py"),
            "--steps",
            "3",
            "--batch",
            "2",
            "--reps",
            "1",
            "--backend",
            backend,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert sorted({r["solver"] for r in rows}) == sorted(checks.SOLVERS) and len(rows) == 2 * len(checks.SOLVERS)
    assert all(r["ms_per_step"] > 0 for r in rows) and {r["step_vs_heun"] for r in rows if r["solver"] == "heun"} == {1}


def test_cpp_kernel_benchmark_runs(tmp_path):
    out = tmp_path / "cpp.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_kernels_cpp.py"),
            "--batch",
            "4",
            "--reps",
            "2",
            "--ref-reps",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    if proc.returncode != 0 and "extension" in proc.stderr:
        pytest.skip("C++ extension not built")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())


def test_readme_table_is_generated_from_committed_results(tmp_path):
    """README's table equals what make_table renders from benchmarks/results/."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "make_table.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, "README.md benchmark table is stale: run python benchmarks/make_table.py"


def test_unknown_suite_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "pfgmpp_fast", "bench", "--smoke", "--only", "nope"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=dict(os.environ),
    )
    assert proc.returncode != 0 and "unknown suite" in proc.stderr


# ----------------------------------------------------------------------------------------
# bench survives a suite that outlives its time: fake suites, so this takes seconds

FAST_SUITE = """import argparse, json
p = argparse.ArgumentParser(); p.add_argument('--device'); p.add_argument('--out'); p.add_argument('--smoke', action='store_true')
a = p.parse_args()
print('fast suite done', flush=True)
json.dump({'rows': [{'metric': 'fast', 'value': 1.0}], 'summary': [{'metric': 'fast', 'value': 1.0}]}, open(a.out, 'w'))
"""
SLOW_SUITE = """import argparse, json, os, time
p = argparse.ArgumentParser(); p.add_argument('--device'); p.add_argument('--out'); p.add_argument('--smoke', action='store_true')
a = p.parse_args()
json.dump({'rows': [{'metric': 'first half', 'value': 2.0}], 'complete': False}, open(a.out, 'w'))
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'slow.pid'), 'w').write(str(os.getpid()))
print('slow suite: first half written', flush=True)
time.sleep(120)
"""


@pytest.fixture
def fake_suites(tmp_path, monkeypatch):
    from pfgmpp_fast.apps import bench

    (tmp_path / "fast.py").write_text(FAST_SUITE)
    (tmp_path / "slow.py").write_text(SLOW_SUITE)
    monkeypatch.setattr(bench, "SUITES", [("fast", "fast.py"), ("slow", "slow.py")])
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: tmp_path)
    return tmp_path


def _bench_args(*argv):
    import argparse

    from pfgmpp_fast.apps import bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(["--smoke", "--device", "cpu", *argv])


def _pid_gone(pid_file):
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _results(outdir):
    (path,) = outdir.glob("*-smoke.json")
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


def test_bench_keeps_finished_suites_when_a_suite_times_out(fake_suites, tmp_path):
    import time

    from pfgmpp_fast.apps import bench

    outdir = tmp_path / "out"
    t0 = time.time()
    rc = bench.main(_bench_args("--outdir", str(outdir), "--timeout", "4"))
    assert rc == 1 and time.time() - t0 < 60
    payload, md = _results(outdir)
    assert "error" not in payload["suites"]["fast"] and payload["suites"]["fast"]["rows"]
    slow = payload["suites"]["slow"]
    assert slow["error"].startswith("timeout after 4s") and slow["partial"] is True
    assert slow["rows"] == [{"metric": "first half", "value": 2.0}]  # what it wrote before the kill
    assert "slow suite: first half written" in slow["stderr_tail"]
    assert "## fast" in md and "## slow" in md and "first half" in md
    assert _pid_gone(fake_suites / "slow.pid"), "the timed-out suite's process must be killed"


def test_bench_budget_shares_the_time_left():
    from pfgmpp_fast.apps import bench

    assert bench.suite_timeout("kernels", ["kernels", "training"], 300, 1800) == pytest.approx(100)
    assert bench.suite_timeout("training", ["training"], 120, 1800) == pytest.approx(120)
    assert bench.suite_timeout("training", ["training"], 120, 60) == 60  # --timeout caps it


def test_bench_budget_kills_the_slow_suite_and_appends(fake_suites, tmp_path):
    from pfgmpp_fast.apps import bench

    outdir = tmp_path / "out"
    assert bench.main(_bench_args("--outdir", str(outdir), "--only", "fast")) == 0
    rc = bench.main(_bench_args("--outdir", str(outdir), "--only", "slow", "--budget", "8", "--append"))
    assert rc == 1
    payload, _ = _results(outdir)
    assert set(payload["suites"]) == {"fast", "slow"}  # --append kept the first call's
    assert "timeout" in payload["suites"]["slow"]["error"]


def test_bench_sigterm_keeps_finished_suites(fake_suites, tmp_path):
    import signal
    import threading

    from pfgmpp_fast.apps import bench

    outdir = tmp_path / "out"
    pid_file = fake_suites / "slow.pid"

    def terminate_when_slow_runs():
        for _ in range(600):
            if pid_file.exists():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            threading.Event().wait(0.1)

    threading.Thread(target=terminate_when_slow_runs, daemon=True).start()
    before = signal.getsignal(signal.SIGTERM)
    assert bench.main(_bench_args("--outdir", str(outdir), "--timeout", "60")) == 1
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored
    payload, _ = _results(outdir)
    assert "error" not in payload["suites"]["fast"]
    assert payload["suites"]["slow"]["error"].startswith("terminated")
    assert payload["suites"]["slow"]["rows"]
    assert _pid_gone(pid_file)


@pytest.mark.parametrize("option", ["--budget", "--timeout"])
def test_bench_rejects_non_positive_times(option, capsys):
    from pfgmpp_fast.apps import bench

    with pytest.raises(SystemExit) as exc:
        bench.main(_bench_args(option, "0"))
    assert exc.value.code == 2 and f"{option} must be > 0 seconds, got 0" in capsys.readouterr().err


def test_time_stats_times_back_to_back_calls_and_reports_spread():
    import time

    from pfgmpp_fast.utils import benchmarking as bm

    calls = []
    st = bm.time_stats(lambda: calls.append(1), "cpu", warmup=2, reps=3, inner=5)
    assert len(calls) == 2 + 3 * 5  # k calls per sample
    assert st["inner"] == 5 and st["samples"] == 3 and st["method"] == "back_to_back"
    assert 0 < st["min_ms"] <= st["ms"] and st["iqr_pct"] >= 0
    st = bm.time_stats(lambda: time.sleep(0.02), "cpu", warmup=0, reps=1000, max_time_s=0.1)
    assert 2 <= st["samples"] < 20 and st["ms"] >= 20  # slow baselines stop early
    assert bm.time_ms(lambda: time.sleep(0.01), "cpu", warmup=0, reps=2) >= 10
