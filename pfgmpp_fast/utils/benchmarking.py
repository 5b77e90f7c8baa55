"""Shared measurement tools for benchmarks/ (docs/DESIGN.md §5): timing, ceilings, result files.

Ratios in one run on one device, never a lone absolute time: every suite measures the
device-to-device copy ceiling (bytes read + written) and a large bf16 matmul in the same
process as the thing it measures.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object], device="cpu", warmup: int = 3, reps: int = 10, min_time_s: float = 0.0, inner: int = 1
) -> float:
    """Median milliseconds per call of fn() (see time_stats)."""
    return time_stats(fn, device, warmup=warmup, reps=reps, inner=inner, min_time_s=min_time_s)["ms"]


def _cuda_graph_of(fn: Callable[[], object], inner: int) -> Callable[[], object]:
    """`inner` calls of fn captured in one CUDA graph (warmed up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    return graph.replay


def time_stats(
    fn: Callable[[], object],
    device="cpu",
    warmup: int = 3,
    reps: int = 10,
    inner: int = 1,
    graph: bool = False,
    min_time_s: float = 0.0,
    max_time_s: Optional[float] = None,
) -> Dict:
    """Milliseconds per call of fn(): median, minimum and spread over `reps` samples.

    Each sample times `inner` back-to-back calls between two CUDA events (perf_counter on
    the CPU) and divides by `inner`: the host dispatch of one call then overlaps the kernel
    of the previous one instead of being counted. graph=True (CUDA only) captures the
    `inner` calls in a CUDA graph and times its replay, which also removes launch gaps.
    Warm-up calls come first so compilation and allocation stay out of the numbers.
    Sampling stops after `reps` samples and `min_time_s`, or early at `max_time_s` (slow
    baselines), keeping at least 2 samples. `iqr_pct`: interquartile range over median, %.
    """
    device = torch.device(device)
    inner = max(1, int(inner))
    on_cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    run = _cuda_graph_of(fn, inner) if graph and on_cuda else None
    if run is not None:
        run()
    sync(device)
    samples: List[float] = []
    start_all = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start_all
        if len(samples) >= 2 and max_time_s is not None and elapsed > max_time_s:
            break
        if (len(samples) >= reps and elapsed >= min_time_s) or len(samples) >= 10 * max(reps, 1):
            break
        samples.append(_one_sample(fn, run, inner, on_cuda) / inner)
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    median = statistics.median(samples)
    return {
        "ms": median,
        "min_ms": min(samples),
        "iqr_pct": 100 * (q[2] - q[0]) / median if median else 0.0,
        "samples": len(samples),
        "inner": inner,
        "method": "cuda_graph" if run is not None else "back_to_back",
    }


def _one_sample(fn, run, inner: int, on_cuda: bool) -> float:
    if on_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        t0 = time.perf_counter()
    if run is not None:
        run()
    else:
        for _ in range(inner):
            fn()
    if on_cuda:
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    return (time.perf_counter() - t0) * 1e3


def copy_ceiling_gbs(device="cpu", nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + bytes written."""
    device = torch.device(device)
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, reps=reps)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def matmul_ceiling_tflops(device="cpu", size: int = 8192, dtype=torch.bfloat16, reps: int = 10) -> float:
    """Dense matmul rate in TFLOP/s for a square product of `size` in `dtype`."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=2, reps=reps)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def ceilings(device="cpu", smoke: bool = False) -> Dict[str, float]:
    """Both ceilings, small sizes in smoke mode (CPU CI)."""
    if smoke:
        return {
            "copy_GBps": copy_ceiling_gbs(device, 1 << 24, reps=3),
            "bf16_matmul_TFLOPs": matmul_ceiling_tflops(device, 256, reps=3),
        }
    # 8192^3 in bf16 takes seconds per product on a CPU: 2048 reaches its rate already.
    size = 8192 if torch.device(device).type == "cuda" else 2048
    return {"copy_GBps": copy_ceiling_gbs(device), "bf16_matmul_TFLOPs": matmul_ceiling_tflops(device, size)}


def device_name(device="cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _command_line() -> str:
    """The command as the user typed it (`python -m pfgmpp_fast ...` for the CLI)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("pfgmpp_fast", "__main__.py")):
        argv[0] = "-m pfgmpp_fast"
    elif argv:
        argv[0] = os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0]
    return " ".join(["python"] + argv)


def environment(device="cpu") -> Dict[str, object]:
    """Device, versions and the exact command: everything a result needs to be read."""
    info = {
        "device": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": _command_line(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # pragma: no cover - triton is optional on some installs
        info["triton"] = None
    return info


def write_text(path: str, text: str) -> None:
    """Atomic text write (temp file, fsync, rename): results are never half written."""
    from pfgmpp_fast.utils.io_utils import atomic_write_text

    atomic_write_text(path, text)


def write_json(path: str, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2, default=str))


def markdown_table(rows: List[dict], columns: Optional[List[str]] = None) -> str:
    """Rows of dicts as a GitHub markdown table (floats with 3 significant digits)."""
    if not rows:
        return "_(no rows)_\n"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
