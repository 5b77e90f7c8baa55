"""CPU C++ backend, CIFAR-sized batch (B=128, N=3x32x32): the fused perturb op against the
reference in eager and the fastest plain-PyTorch Student-t perturbation (torch.randn +
addcmul), timed interleaved in one run, for 1 and 2 threads (issue 4's CPU targets:
>= 5x the reference, >= 2x plain PyTorch).

    python benchmarks/bench_kernels_cpp.py [--reps 200] [--out results.json]

Reports the minimum and the median per call in ms and the ratios of the minima (the
machine may be shared: minima are the least disturbed samples).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from pfgmpp_fast import _ext  # noqa: F401  (loads torch.ops.pfgmpp_fast)
from pfgmpp_fast import reference as R


def timings(fns: dict, reps: int) -> dict:
    """Per-call seconds of each fn, interleaved so load changes hit all alike."""
    for fn in fns.values():
        fn(), fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: {"min_ms": 1e3 * min(v), "median_ms": 1e3 * statistics.median(v)} for name, v in samples.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--ref-reps", type=int, default=5, help="reps of the (slow) reference")
    ap.add_argument("--D", type=float, default=128.0)
    ap.add_argument("--out", default=None, help="write the JSON result here (atomically)")
    args = ap.parse_args()

    B = args.batch
    g = torch.Generator().manual_seed(0)
    y = torch.randn(B, 3, 32, 32, generator=g)
    ids = torch.arange(B, dtype=torch.int64)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(B, generator=g, dtype=torch.float64))
    s = R.noise_scale(sigma, args.D, 1, ids).float()
    c_in = R.precond(sigma)[2].float()
    s4 = s.view(-1, 1, 1, 1)
    ops = torch.ops.pfgmpp_fast

    fns = {
        "cpp_perturb": lambda: ops.perturb(y, s, c_in, ids, 1, 0, torch.float32, False, False),
        "cpp_perturb_bf16_cl": lambda: ops.perturb(y, s, c_in, ids, 1, 0, torch.bfloat16, True, False),
        "plain_randn_addcmul": lambda: torch.addcmul(y, s4, torch.randn_like(y)),
    }
    result = {
        "device": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "B": B,
        "N": 3 * 32 * 32,
        "D": args.D,
        "cpu_count": os.cpu_count(),
        "runs": {},
    }
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t = timings(fns, args.reps)
        t.update(
            timings(
                {"reference_eager": lambda: R.ref_perturb(y, s, c_in, ids, 1, 0, torch.float32, False, False)},
                args.ref_reps,
            )
        )
        cpp = t["cpp_perturb"]["min_ms"]
        ratios = {
            "vs_reference": t["reference_eager"]["min_ms"] / cpp,
            "vs_plain_pytorch": t["plain_randn_addcmul"]["min_ms"] / cpp,
        }
        result["runs"][str(threads)] = {"timings": t, "speedup": ratios}
        print(f"threads={threads}")
        for name, v in t.items():
            print(f"  {name:22s} min {v['min_ms']:8.3f} ms   median {v['median_ms']:8.3f} ms")
        print(
            f"  C++ perturb: {ratios['vs_reference']:.1f}x the reference, "
            f"{ratios['vs_plain_pytorch']:.2f}x plain PyTorch (randn + addcmul)"
        )
    if args.out:
        d = os.path.dirname(os.path.abspath(args.out))
        with tempfile.NamedTemporaryFile("w", dir=d, delete=False, suffix=".tmp") as f:
            json.dump(result, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, args.out)


if __name__ == "__main__":
    main()
