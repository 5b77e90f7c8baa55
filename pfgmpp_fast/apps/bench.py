"""`python -m pfgmpp_fast bench`: every benchmark in one call on one device.

Runs the ceilings (copy bandwidth, bf16 matmul) and then each suite of benchmarks/ —
kernels, networks, training step, sampling at 35 NFE with the FID-50k estimate — each in
its own process (so peak-memory numbers are per suite), each measuring its own ceilings
in the same run. Writes <outdir>/<device>-<date>.json and .md (versions and the exact
command included) again after every suite, so a run killed later keeps every finished
suite; a suite that outlives its timeout is killed and recorded (with the rows it had
written). --budget sizes the timeouts: each suite gets its share of the time left.
Prints a short table last.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
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
# Relative cost of the suites on a GPU: their shares of a --budget.
WEIGHTS = {"kernels": 1.0, "networks": 2.0, "training": 2.0, "sampling": 3.0}
# How each suite skips its torch.compile variants (--no-compile).
NO_COMPILE_ARGS = {"kernels": ["--no-compile"], "networks": ["--compile-backend", "none"]}
# The suites whose measured variants can be left out (--skip-variants), and their option.
SKIP_VARIANTS_OPTION = {"training": "--skip"}
MIN_SUITE_S = 5.0  # below this much time left a suite is recorded as skipped, not started


class Terminated(Exception):
    """SIGTERM (e.g. from `timeout`): stop the running suite, keep what finished."""


def benchmarks_dir() -> Path:
    here = Path(__file__).resolve().parents[2] / "benchmarks"
    if not here.is_dir():
        raise FileNotFoundError(f"benchmarks/ not found next to the package ({here}); run from a source checkout")
    return here


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds per suite (CI)")
    p.add_argument("--only", default=None, help="comma-separated subset of suites: " + ",".join(n for n, _ in SUITES))
    p.add_argument("--outdir", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--timeout", type=float, default=1800, help="most seconds allowed per suite")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole call: each suite's timeout is its share of the time left "
        f"(shares {', '.join(f'{k} {v:g}' for k, v in WEIGHTS.items())}), at most --timeout",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the other suites of today's results file for this device in --outdir (several calls build one file)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants where a suite can")
    p.add_argument(
        "--skip-variants",
        type=_variant_names,
        default=None,
        metavar="NAMES",
        help="comma-separated baselines to leave out where a suite has them (training: "
        "published,hand-compiled); ours is always measured",
    )
    p.add_argument(
        "--date",
        type=_iso_date,
        default=None,
        metavar="YYYY-MM-DD",
        help="the date in the results file name (default: today, UTC); several calls of one "
        "session that crosses midnight pass the same date to fill one file",
    )


def _iso_date(value: str) -> str:
    try:
        return _dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {value!r}") from None


def _variant_names(value: str) -> str:
    names = set(filter(None, value.split(",")))
    known = {"published", "hand-compiled"}
    if not names or names - known:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {sorted(known)}, got {value!r}")
    return ",".join(sorted(names))


def _summary_rows(name: str, result: dict) -> list:
    """The rows a suite marks as its headline (key 'summary'), else its first rows."""
    rows = result.get("summary") or result.get("rows") or []
    return [dict(suite=name, **r) for r in rows[:12]]


def suite_timeout(name: str, remaining: list, time_left: float, cap: float) -> float:
    """This suite's share (by WEIGHTS) of the time left for it and the suites after it."""
    share = WEIGHTS.get(name, 1.0) / sum(WEIGHTS.get(n, 1.0) for n in remaining)
    return min(cap, time_left * share)


def _stream(proc, tail: collections.deque) -> None:
    """Echo the suite's output as it comes (the caller's log stays live), keep its tail."""
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line)


def _kill_group(proc) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def suite_command(name: str, script: Path, device: str, args, out: str) -> list:
    cmd = [sys.executable, str(script), "--device", device, "--out", out]
    if args.smoke:
        cmd.append("--smoke")
    elif device.startswith("cpu"):
        cmd += CPU_ARGS.get(name, [])
    if args.no_compile:
        cmd += NO_COMPILE_ARGS.get(name, [])
    if args.skip_variants and name in SKIP_VARIANTS_OPTION:
        cmd += [SKIP_VARIANTS_OPTION[name], args.skip_variants]
    return cmd


def run_suite(cmd: list, out: str, timeout: float) -> dict:
    """Run one suite in its own process group; on timeout (or SIGTERM) kill the group and
    keep the rows it had written. A SIGTERM is marked `terminated` for the caller."""
    tail: collections.deque = collections.deque(maxlen=80)
    t0 = time.time()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    reader = threading.Thread(target=_stream, args=(proc, tail), daemon=True)
    reader.start()
    error = None
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        error = f"timeout after {timeout:.0f}s"
    except Terminated:
        error = "terminated (SIGTERM)"
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        reader.join(timeout=5)
    result = _suite_result(out, proc.returncode, error, tail, " ".join(cmd), time.time() - t0)
    if error and error.startswith("terminated"):
        result["terminated"] = True
    return result


def _suite_result(out, returncode, error, tail, command, elapsed) -> dict:
    result = {}
    if os.path.exists(out):
        try:
            with open(out) as f:
                result = json.load(f)
        except ValueError as exc:  # a suite killed while writing without the atomic writer
            error = error or f"unreadable results ({exc})"
    if error is None and returncode != 0:
        error = f"exit {returncode}"
    if error is None and not result:
        error = "no results written"
    if error is not None:
        result.update(error=error, partial=bool(result.get("rows")), stderr_tail="".join(tail)[-4000:])
    result.setdefault("command", command)
    result["wall_s"] = elapsed
    return result


def results_stem(env: dict, smoke: bool, date: str | None = None) -> str:
    from pfgmpp_fast.utils import benchmarking as bm

    date = date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return f"{bm.slug(env['device'])}-{date}" + ("-smoke" if smoke else "")


def write_results(outdir: Path, stem: str, payload: dict) -> None:
    from pfgmpp_fast.utils import benchmarking as bm

    bm.write_json(str(outdir / f"{stem}.json"), payload)
    bm.write_text(str(outdir / f"{stem}.md"), render_markdown(payload))


def _earlier_suites(outdir: Path, stem: str, device: str) -> dict:
    path = outdir / f"{stem}.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return data.get("suites", {}) if data.get("environment", {}).get("device") == device else {}


def _usage_error(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def select_suites(args, device: str) -> list:
    only = args.only.split(",") if args.only else None
    if only is None and device.startswith("cpu") and not args.smoke:
        only = list(CPU_ARGS)
        print("CPU run: measuring the kernels only (pass --only to choose suites)", flush=True)
    unknown = set(only or []) - {n for n, _ in SUITES}
    if unknown:
        _usage_error(f"--only: unknown suite(s) {sorted(unknown)}; choose from {[n for n, _ in SUITES]}")
    for option, value in (("--budget", args.budget), ("--timeout", args.timeout)):
        if value is not None and not value > 0:
            _usage_error(f"{option} must be > 0 seconds, got {value}")
    return [s for s in SUITES if only is None or s[0] in only]


def main(args) -> int:
    import torch

    t_start = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    selected = select_suites(args, device)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _run(args, device, selected, t_start)
    except Terminated:
        print("terminated: results of the finished suites are kept", flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args, device, selected, t_start) -> int:
    from pfgmpp_fast.utils import benchmarking as bm

    env = bm.environment(device)
    print(f"benchmarking on {env['device']} (torch {env['torch']}, triton {env['triton']})", flush=True)
    ceil = bm.ceilings(device, smoke=args.smoke)
    print(
        f"ceilings: copy {ceil['copy_GBps']:.1f} GB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.2f} TFLOP/s", flush=True
    )
    outdir = Path(args.outdir) if args.outdir else benchmarks_dir() / "results"
    stem = results_stem(env, args.smoke, args.date)
    suites = _earlier_suites(outdir, stem, env["device"]) if args.append else {}
    payload = {"environment": env, "smoke": args.smoke, "ceilings": ceil, "suites": suites}
    run_all(selected, args, device, suites, payload, outdir, stem, t_start)
    print_summary(selected, suites)
    print(f"results: {outdir / (stem + '.json')} and .md")
    return 1 if any("error" in suites[n] for n, _ in selected if n in suites) else 0


def _raise_terminated(signum, frame):
    raise Terminated()


def run_all(selected, args, device, suites, payload, outdir, stem, t_start) -> None:
    """Each suite in turn, results rewritten after each (and after a kill)."""
    names = [n for n, _ in selected]
    for i, (name, script) in enumerate(selected):
        timeout = args.timeout
        if args.budget is not None:
            timeout = suite_timeout(name, names[i:], args.budget - (time.time() - t_start), args.timeout)
        if args.budget is not None and timeout < MIN_SUITE_S:
            suites[name] = {"error": f"skipped: {timeout:.0f}s of --budget left", "wall_s": 0.0}
            print(f"[{name}] skipped: no time left in --budget", flush=True)
            write_results(outdir, stem, payload)
            continue
        print(f"[{name}] running {script} (timeout {timeout:.0f}s) ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, f"{name}.json")
            cmd = suite_command(name, benchmarks_dir() / script, device, args, out)
            suites[name] = run_suite(cmd, out, timeout)
        if suites[name].pop("terminated", False):
            write_results(outdir, stem, payload)
            raise Terminated()
        status = "failed: " + suites[name]["error"] if "error" in suites[name] else "done"
        print(f"[{name}] {status} in {suites[name]['wall_s']:.0f}s", flush=True)
        write_results(outdir, stem, payload)


def print_summary(selected, suites) -> None:
    from pfgmpp_fast.utils import benchmarking as bm

    print()
    for name, _ in selected:  # the short table last: one block per suite
        res = suites[name]
        rows = _summary_rows(name, res)
        print(f"{name}: " + (f"FAILED ({res['error']})" if "error" in res else ""))
        if rows:
            print(bm.markdown_table([{k: v for k, v in r.items() if k != "suite"} for r in rows]))


def render_markdown(payload: dict) -> str:
    from pfgmpp_fast.utils.benchmarking import markdown_table

    env, ceil = payload["environment"], payload["ceilings"]
    lines = [
        f"# Benchmarks on {env['device']}",
        "",
        f"- date: {env['date']}",
        f"- torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, python {env['python']}",
        f"- command: `{env['command']}`",
        f"- smoke mode: {payload['smoke']}",
        "",
        f"Ceilings measured in this run: device copy {ceil['copy_GBps']:.1f} GB/s (read + write), "
        f"bf16 matmul {ceil['bf16_matmul_TFLOPs']:.2f} TFLOP/s.",
        "",
    ]
    for name, res in payload["suites"].items():
        lines += [f"## {name}", ""]
        if "error" in res:
            lines += [
                f"Failed ({res['error']}): `{res.get('command', '')}`",
                "",
                "```",
                res.get("stderr_tail", ""),
                "```",
                "",
            ]
            if not res.get("rows"):
                continue
            lines += ["Rows written before it stopped:", ""]
        lines += [f"Command: `{res.get('command', '')}`", ""]
        if res.get("rows"):
            lines.append(markdown_table(res["rows"]))
        for note in res.get("notes", []):
            lines.append(f"- {note}")
        lines.append("")
    return "\n".join(lines)
