"""`python -m pfgmpp_fast bench`: every benchmark in one call on one device.

Runs the ceilings (copy bandwidth, bf16 matmul) and then each suite of benchmarks/ —
kernels, networks, training step, sampling at 35 NFE with the FID-50k estimate — each in
its own process (so peak-memory numbers are per suite), each measuring its own ceilings
in the same run. Writes benchmarks/results/<device>-<date>.json and .md (versions and the
exact command included) and prints a short table last.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Full-size CPU runs: the kernels at the CIFAR-sized batch of the CPU targets (B = 128,
# N = 3·32·32); network, training and sampling suites at CIFAR size take hours on a
# laptop-class CPU, so a CPU run without --only measures the kernels alone.
CPU_ARGS = {"kernels": ["--batch", "128", "--resolution", "32"]}

SUITES = [
    ("kernels", "bench_kernels.py"),
    ("networks", "bench_networks.py"),
    ("training", "bench_training.py"),
    ("sampling", "bench_sampling.py"),
]


def benchmarks_dir() -> Path:
    here = Path(__file__).resolve().parents[2] / "benchmarks"
    if not here.is_dir():
        raise FileNotFoundError(
            f"benchmarks/ not found next to the package ({here}); run from a source checkout")
    return here


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds per suite (CI)")
    p.add_argument("--only", default=None,
                   help="comma-separated subset of suites: " + ",".join(n for n, _ in SUITES))
    p.add_argument("--outdir", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed per suite")


def _summary_rows(name: str, result: dict) -> list:
    """The rows a suite marks as its headline (key 'summary'), else its first rows."""
    rows = result.get("summary") or result.get("rows") or []
    return [dict(suite=name, **r) for r in rows[:12]]


def run_suite(name: str, script: Path, device: str, smoke: bool, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"{name}.json")
        cmd = [sys.executable, str(script), "--device", device, "--out", out]
        if smoke:
            cmd.append("--smoke")
        elif device.startswith("cpu"):
            cmd += CPU_ARGS.get(name, [])
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        elapsed = time.time() - t0
        if proc.returncode != 0 or not os.path.exists(out):
            return {"error": f"exit {proc.returncode}", "command": " ".join(cmd),
                    "stderr_tail": proc.stderr[-4000:], "wall_s": elapsed}
        with open(out) as f:
            result = json.load(f)
        result.setdefault("command", " ".join(cmd))
        result["wall_s"] = elapsed
        return result


def main(args) -> int:
    import torch

    from pfgmpp_fast.utils import benchmarking as bm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    only = args.only.split(",") if args.only else None
    if only is None and device.startswith("cpu") and not args.smoke:
        only = list(CPU_ARGS)
        print("CPU run: measuring the kernels only (pass --only to choose suites)", flush=True)
    unknown = set(only or []) - {n for n, _ in SUITES}
    if unknown:
        raise SystemExit(f"--only: unknown suite(s) {sorted(unknown)}; choose from {[n for n, _ in SUITES]}")
    selected = [s for s in SUITES if only is None or s[0] in only]
    env = bm.environment(device)
    print(f"benchmarking on {env['device']} (torch {env['torch']}, triton {env['triton']})", flush=True)
    ceil = bm.ceilings(device, smoke=args.smoke)
    print(f"ceilings: copy {ceil['copy_GBps']:.1f} GB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.2f} TFLOP/s", flush=True)

    suites = {}
    for name, script in selected:
        print(f"[{name}] running {script} ...", flush=True)
        suites[name] = run_suite(name, benchmarks_dir() / script, device, args.smoke, args.timeout)
        status = "failed: " + suites[name]["error"] if "error" in suites[name] else "done"
        print(f"[{name}] {status} in {suites[name]['wall_s']:.0f}s", flush=True)

    payload = {"environment": env, "smoke": args.smoke, "ceilings": ceil, "suites": suites}
    outdir = Path(args.outdir) if args.outdir else benchmarks_dir() / "results"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    stem = f"{bm.slug(env['device'])}-{date}" + ("-smoke" if args.smoke else "")
    bm.write_json(str(outdir / f"{stem}.json"), payload)
    bm.write_text(str(outdir / f"{stem}.md"), render_markdown(payload))

    print()
    for name, res in suites.items():  # the short table last: one block per suite
        rows = _summary_rows(name, res)
        print(f"{name}: " + (f"FAILED ({res['error']})" if "error" in res else ""))
        if rows:
            print(bm.markdown_table([{k: v for k, v in r.items() if k != "suite"} for r in rows]))
    print(f"results: {outdir / (stem + '.json')} and .md")
    return 1 if any("error" in r for r in suites.values()) else 0


def render_markdown(payload: dict) -> str:
    from pfgmpp_fast.utils.benchmarking import markdown_table

    env, ceil = payload["environment"], payload["ceilings"]
    lines = [f"# Benchmarks on {env['device']}", "",
             f"- date: {env['date']}", f"- torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
             f"python {env['python']}", f"- command: `{env['command']}`",
             f"- smoke mode: {payload['smoke']}", "",
             f"Ceilings measured in this run: device copy {ceil['copy_GBps']:.1f} GB/s (read + write), "
             f"bf16 matmul {ceil['bf16_matmul_TFLOPs']:.2f} TFLOP/s.", ""]
    for name, res in payload["suites"].items():
        lines += [f"## {name}", ""]
        if "error" in res:
            lines += [f"Failed ({res['error']}): `{res['command']}`", "", "```", res.get("stderr_tail", ""), "```", ""]
            continue
        lines += [f"Command: `{res.get('command', '')}`", ""]
        if res.get("rows"):
            lines.append(markdown_table(res["rows"]))
        for note in res.get("notes", []):
            lines.append(f"- {note}")
        lines.append("")
    return "\n".join(lines)
