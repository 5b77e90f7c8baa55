"""The benchmark suites must not rot: run each in its CPU smoke mode, end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_suite_smoke_writes_json_and_markdown(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pfgmpp_fast", "bench", "--smoke", "--device", "cpu",
                           "--outdir", str(tmp_path)], capture_output=True, text=True, timeout=900,
                          cwd=ROOT)
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


def test_cpp_kernel_benchmark_runs(tmp_path):
    out = tmp_path / "cpp.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels_cpp.py"),
                           "--batch", "4", "--reps", "2", "--ref-reps", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    if proc.returncode != 0 and "extension" in proc.stderr:
        pytest.skip("C++ extension not built")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())


def test_readme_table_is_generated_from_committed_results(tmp_path):
    """README's table equals what make_table renders from benchmarks/results/."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_table.py"), "--check"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, "README.md benchmark table is stale: run python benchmarks/make_table.py"


def test_unknown_suite_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "pfgmpp_fast", "bench", "--smoke", "--only", "nope"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ))
    assert proc.returncode != 0 and "unknown suite" in proc.stderr
