"""The device script's plumbing on every commit: `scripts/gpu_session.sh --dry-run` runs the
same phases on the CPU (tiny sizes) and must bring back the same files a GPU run does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_session.sh"
SET1_PHASES = ("probe", "build", "tests", "kernels", "memcheck", "training")


def _run(*argv, out, timeout=600):
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(
        ["bash", str(SCRIPT), *argv], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


@pytest.mark.slow
def test_dry_run_brings_back_every_phase(tmp_path):
    out = tmp_path / "out"
    proc = _run("--dry-run", out=out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # the device returns at most 8
    logs = {"session.txt", "build.log", "tests.log", "kernels.log", "memcheck.log", "training.log"}
    assert logs <= set(files), files
    (results,) = out.glob("*-smoke.json")
    assert results.with_suffix(".md").name in files

    session = (out / "session.txt").read_text()
    for phase in SET1_PHASES:
        assert f"phase {phase}: ok" in session, session
    assert "cmake" in session and "torch" in session  # the probe's versions
    assert "kernels registered for 6 ops" in (out / "build.log").read_text()
    tests_log = (out / "tests.log").read_text()
    counts = tests_log.split("op tests selected:")[1].split("\n")[0]
    n_triton, n_cuda = (int(counts.split(" triton")[0].split()[-1]), int(counts.split(" cuda")[0].split()[-1]))
    assert n_triton > 100 and n_cuda > 100, counts  # both backends are selected
    assert " passed" in tests_log

    payload = json.loads(results.read_text())
    assert set(payload["suites"]) == {"kernels", "training"}  # two bench calls, one file
    for name, suite in payload["suites"].items():
        assert "error" not in suite, (name, suite.get("stderr_tail"))
    rows = payload["suites"]["kernels"]["rows"]
    assert {"philox_normal", "perturb"} <= {r["op"] for r in rows}
    assert any(r["op"] == "perturb" and r.get("x_floor") for r in rows)  # perturb vs max(copy, RNG)
    assert "[training] done" in (out / "training.log").read_text()
    methods = [r["method"] for r in payload["suites"]["training"]["rows"]]
    assert methods == ["ours", "published"], methods  # hand-compiled is set 2's
    assert not [f for f in files if "tmp" in f], files  # no writer's temporary in $OUT


def test_phase_caps_leave_training_its_share():
    """Set 1's fixed caps, read from the script, leave the training phase >= 150 s of 540."""
    import re

    text = SCRIPT.read_text()
    set1 = text.split('if [[ $SET == 1 ]]; then')[-1].split("else")[0]
    fixed = [int(c) for c in re.findall(r"run_phase (?:probe|build) (\d+)", text)]
    fixed += [int(c) for c in re.findall(r"run_phase \w+ (\d+)", set1)]
    assert 540 - sum(fixed) >= 150, fixed


def test_training_bench_killed_after_a_variant_keeps_rows_and_ratios(tmp_path):
    """SIGTERM once the first variant is written: the JSON holds its rows and the summary."""
    import signal
    import time

    out = tmp_path / "training.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_training.py"),
            "--smoke",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not out.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
    finally:
        proc.wait(timeout=60)
    payload = json.loads(out.read_text())
    assert payload["rows"][0]["method"] == "ours"
    assert any(s["metric"] == "ours training img/s" for s in payload["summary"])
    assert payload["complete"] is False and proc.returncode != 0  # killed part-way, as meant


def test_bench_results_name_takes_the_session_date(tmp_path):
    from pfgmpp_fast.apps.bench import results_stem

    assert results_stem({"device": "NVIDIA H100"}, False, "2026-01-02").endswith("-2026-01-02")


@pytest.mark.parametrize("argv", [["--set", "3"], ["--bogus"]])
def test_bad_options_are_usage_errors(argv, tmp_path):
    proc = _run(*argv, out=tmp_path, timeout=60)
    assert proc.returncode == 2 and "usage:" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing ran


def test_old_cmake_stops_the_session_after_the_probe(tmp_path):
    env_min = "999.0"  # every cmake is older than this
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1", CMAKE_MIN=env_min)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 1
    session = (out / "session.txt").read_text()
    assert f"is older than {env_min}, which the build needs" in session
    assert "phase probe: FAILED" in session and "STOP: phase probe" in session
    assert sorted(p.name for p in out.iterdir()) == ["session.txt"]  # nothing after the probe ran


@pytest.mark.parametrize(
    "said, code, verdict",
    [
        (
            "========= Error: Device not supported",
            3,
            "memcheck NOT RUN: compute-sanitizer does not support this device",
        ),
        ("========= Invalid __global__ write of size 4 bytes", 9, "compute-sanitizer FOUND MEMORY ERRORS"),
    ],
)
def test_memcheck_phase_tells_an_unsupported_device_from_memory_errors(tmp_path, said, code, verdict):
    """A stand-in compute-sanitizer on PATH: the phase's exit code and last line say which it was."""
    fake = tmp_path / "bin" / "compute-sanitizer"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho '{said}'\nexit {9 if code == 9 else 1}\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", DRY="0", PY=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--phase-body", "memcheck"], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT
    )
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert said in proc.stdout and verdict in proc.stdout.strip().splitlines()[-1]


def test_memcheck_phase_runs_a_curated_selection(tmp_path):
    """The phase's own pytest command, listed by a stand-in compute-sanitizer (`--collect-only`):
    about 20 CUDA tests covering every op that launches a kernel, and not the 2^31-element test."""
    fake = tmp_path / "bin" / "compute-sanitizer"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nwhile [ "$1" != "$PY" ]; do shift; done\nexec "$@" --collect-only\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", DRY="0", PY=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--phase-body", "memcheck"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    selected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert 15 <= len(selected) <= 30, selected
    assert all("cuda" in test for test in selected), selected
    assert not [test for test in selected if "64bit" in test], selected
    for op in ("philox4x32", "philox_normal", "chi2", "perturb", "loss", "sampler"):
        assert any(op in test for test in selected), (op, selected)
