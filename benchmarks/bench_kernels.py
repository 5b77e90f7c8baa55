"""Fused-kernel benchmark: GB/s of each op against the copy ceiling and speed-ups over the
published code path, the reference in eager and torch.compile(reference), in one run.

    python benchmarks/bench_kernels.py --device cuda --out results.json
    python benchmarks/bench_kernels.py --smoke          # CPU, tiny sizes, seconds

Bytes per element are the floor each op must move (docs/DESIGN.md §4): perturb reads y (fp32) and
writes the bf16 network input (6 B); loss reads F (bf16) and y (fp32) and writes dL/dF (bf16)
(8 B); sampler stage 1 reads x (fp32) and F (bf16) and writes x', the Heun base and the bf16
next input (16 B); stage 2 reads x', base and F' and writes x_{i+1} and the next input (16 B). philox_normal alone (writes fp32 normals, 4 B) is the arithmetic
ceiling: perturb draws one normal per element, so its floor is max(copy time, RNG time) and
each perturb row reports `x_floor` = its time over that floor (docs/DESIGN.md §5; target <= 1.1).

Timing (utils/benchmarking.time_stats): `--inner` back-to-back calls between the CUDA events
per sample, so one call's Python dispatch overlaps the previous kernel instead of being
counted; on the GPU the fast backends are also timed as a CUDA-graph replay (`graph_ms`).
`iqr_pct` is the spread of the samples. The JSON is rewritten after every op, so a run
killed part-way keeps the ops it finished.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, finishes in seconds")
parser.add_argument("--out", default=None, help="write the JSON result here (atomically)")
parser.add_argument("--batch", type=int, default=None, help="batch size (default 5632 x 3x64x64 = 69M elements)")
parser.add_argument("--resolution", type=int, default=64)
parser.add_argument("--D", type=float, default=128.0)
parser.add_argument("--reps", type=int, default=None)
parser.add_argument("--inner", type=int, default=None, help="back-to-back calls per timed sample (default 10; smoke 1)")
parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
args = parser.parse_args()

import torch  # noqa: E402

device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
if device.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton's CPU interpreter (slow; smoke sizes)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import baselines  # noqa: E402
import numpy as np  # noqa: E402

from pfgmpp_fast import ops  # noqa: E402
from pfgmpp_fast import reference as R  # noqa: E402
from pfgmpp_fast.utils import benchmarking as bm  # noqa: E402


def fast_backends():
    out = []
    # On the CPU, Triton runs in its interpreter (numpy, per-block Python): a correctness
    # tool, not a backend to time. Only smoke runs exercise it there, so the suite stays alive.
    if ops.triton_available(device) and (device.type == "cuda" or args.smoke):
        out.append("triton")
    if device.type == "cuda" and ops.has_cuda_kernels():
        out.append("cuda")
    if device.type == "cpu" and ops.has_extension():
        out.append("cpu")
    return out


def make_cases(shape, D, key, stream):
    """Inputs and the five measured ops: call(backend kwargs, implementation), bytes/element."""
    B = shape[0]
    N = math.prod(shape[1:])
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.arange(B, device=device, dtype=torch.int64)
    y = torch.randn(shape, device=device, generator=gen)
    sigma = torch.exp(torch.randn(B, device=device, generator=gen, dtype=torch.float64) * 1.2 - 1.2)
    c_skip, c_out, c_in, _ = (t.to(torch.float32) for t in R.precond(sigma))
    scale = R.noise_scale(sigma, D, key, ids).to(torch.float32)
    F = (
        torch.randn(shape, device=device, generator=gen)
        .to(torch.bfloat16)
        .contiguous(memory_format=torch.channels_last)
    )
    x = torch.randn(shape, device=device, generator=gen) * 5
    base = torch.randn(shape, device=device, generator=gen) * 5
    x_perturbed = y + scale.view(-1, 1, 1, 1) * torch.randn_like(y)
    rng = np.random.default_rng(0)
    t_hat, t_next = 2.5, 1.9
    sd2 = 0.25
    cs1, co1, ci2 = sd2 / (t_hat**2 + sd2), t_hat * 0.5 / math.sqrt(t_hat**2 + sd2), 1 / math.sqrt(t_next**2 + sd2)
    cs2, co2 = sd2 / (t_next**2 + sd2), t_next * 0.5 / math.sqrt(t_next**2 + sd2)
    A1, B1, h = (1 - cs1) / t_hat, -co1 / t_hat, t_next - t_hat
    A2, B2 = (1 - cs2) / t_next, -co2 / t_next
    x64, base64 = x.double(), base.double()
    d64 = torch.randn(shape, device=device, dtype=torch.float64, generator=gen)
    return {
        "philox_normal": dict(  # the RNG alone: perturb's arithmetic ceiling
            bytes=4,
            call=lambda be, impl: impl(key, ids, N, stream, **be),
            op=ops.philox_normal,
            ref=R.normal,
            published=lambda: torch.randn_like(y),
        ),
        "perturb": dict(
            bytes=6,
            call=lambda be, impl: impl(y, scale, c_in, ids, key, stream, torch.bfloat16, True, False, **be),
            op=ops.perturb_op,
            ref=R.ref_perturb,
            published=lambda: baselines.published_perturb_net_input(y, sigma.float(), D, c_in, rng, torch.bfloat16),
        ),
        "loss_fwd_bwd": dict(
            bytes=8,
            call=lambda be, impl: impl(F, y, scale, c_skip, c_out, ids, key, stream, 1.0 / B, **be),
            op=ops.loss_fwd_bwd,
            ref=R.ref_loss_fwd_bwd,
            published=lambda: baselines.published_loss_fwd_bwd(F, x_perturbed, y, sigma.float(), c_skip, c_out),
        ),
        "sampler_stage1": dict(
            bytes=16,
            call=lambda be, impl: impl(
                x,
                F,
                None,
                A1,
                B1,
                h,
                0.5 * h,
                ids,
                key,
                0.0,
                R.stream_alpha(3),
                0.0,
                R.stream_churn(3),
                ci2,
                torch.bfloat16,
                True,
                **be,
            ),
            op=ops.sampler_update,
            ref=R.ref_sampler_update,
            published=lambda: baselines.published_sampler_stage1(x64, F, t_hat, t_next, cs1, co1, ci2),
        ),
        "sampler_stage2_churn": dict(
            bytes=16,
            call=lambda be, impl: impl(
                x,
                F,
                base,
                A2,
                B2,
                0.5 * h,
                None,
                ids,
                key,
                0.0,
                R.stream_alpha(4),
                0.3,
                R.stream_churn(4),
                ci2,
                torch.bfloat16,
                True,
                **be,
            ),
            op=ops.sampler_update,
            ref=R.ref_sampler_update,
            published=lambda: baselines.published_sampler_stage2(base64, x64, d64, F, t_hat, t_next, cs2, co2, ci2),
        ),
    }


class Timer:
    """time_stats with this run's settings; a baseline that cannot run here is reported, not fatal."""

    def __init__(self, smoke):
        self.reps = args.reps or (2 if smoke else 20)
        self.warmup = 1 if smoke else 3
        self.inner = args.inner or (1 if smoke else 10)

    def __call__(self, fn, graph=False, max_time_s=None):
        try:
            return bm.time_stats(
                fn, device, warmup=self.warmup, reps=self.reps, inner=self.inner, graph=graph, max_time_s=max_time_s
            )
        except Exception as exc:
            print(f"    failed{' (CUDA graph)' if graph else ''}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            return None


def measure_op(name, spec, n_el, copy, timer, compile_ok, rng_ms):
    """Rows of one op: the three baselines, then each fast backend (with its CUDA-graph time)."""
    nbytes = spec["bytes"] * n_el
    print(f"  {name}: published / reference / compiled reference ...", flush=True)
    slow = None if args.smoke else 3.0  # seconds of samples per baseline (>= 2 samples): the phase is short
    base = {
        "published": timer(spec["published"], max_time_s=slow),
        "reference": timer(lambda: spec["call"]({}, spec["ref"]), max_time_s=slow),
        "compiled_reference": None,
    }
    if compile_ok:
        compiled = torch.compile(spec["ref"], dynamic=False)
        base["compiled_reference"] = timer(lambda: spec["call"]({}, compiled), max_time_s=slow)
        torch._dynamo.reset()
    rows, summary = [], []
    for label, st in base.items():
        rows.append(_row(name, label, st, nbytes, copy))
    for be in fast_backends():
        st = timer(lambda: spec["call"]({"backend": be}, spec["op"]))
        if st is None:
            continue
        row = _row(name, be, st, nbytes, copy)
        if device.type == "cuda":
            g = timer(lambda: spec["call"]({"backend": be}, spec["op"]), graph=True)
            row["graph_ms"] = None if g is None else g["ms"]
        for label, ref in base.items():
            row[f"speedup_vs_{label}"] = None if ref is None else ref["ms"] / st["ms"]
        if name == "philox_normal":
            rng_ms[be] = st["ms"]
        elif name == "perturb" and be in rng_ms:  # floor: max(moving the bytes, drawing the normals)
            row["floor_ms"] = max(nbytes / copy / 1e6, rng_ms[be])
            row["x_floor"] = st["ms"] / row["floor_ms"]
        rows.append(row)
        summary.append(row)
        print(
            f"    {be}: {st['ms']:.4f} ms (IQR {st['iqr_pct']:.0f}%), {row['GBps']:.1f} GB/s "
            f"({row['pct_copy']:.0f}% of copy)" + (f", {row['x_floor']:.2f}x floor" if "x_floor" in row else ""),
            flush=True,
        )
    return rows, summary


def _row(op, backend, st, nbytes, copy):
    if st is None:
        return dict(op=op, backend=backend, ms=None, GBps=None, pct_copy=None)
    gbps = nbytes / st["ms"] / 1e6
    return dict(
        op=op,
        backend=backend,
        ms=st["ms"],
        min_ms=st["min_ms"],
        iqr_pct=st["iqr_pct"],
        inner=st["inner"],
        GBps=gbps,
        pct_copy=100 * gbps / copy,
    )


def main():
    smoke = args.smoke
    env = bm.environment(device)
    ceil = bm.ceilings(device, smoke=smoke)
    copy = ceil["copy_GBps"]
    res = 16 if smoke else args.resolution
    B = args.batch or (8 if smoke else 5632)
    shape = (B, 3, res, res)
    n_el = B * math.prod(shape[1:])
    print(f"[kernels] {env['device']}: copy {copy:.1f} GB/s; shape {shape} ({n_el / 1e6:.1f}M elements)", flush=True)
    cases = make_cases(shape, args.D, 2**33 + 7, R.STREAM_NOISE)
    timer = Timer(smoke)
    compile_ok = not args.no_compile and not (smoke and device.type == "cpu")
    payload = dict(
        suite="kernels",
        environment=env,
        smoke=smoke,
        ceilings=ceil,
        shape=list(shape),
        elements=n_el,
        D=args.D,
        bytes_per_element={k: v["bytes"] for k, v in cases.items()},
        timing=dict(inner=timer.inner, reps=timer.reps, graph=device.type == "cuda"),
        rows=[],
        summary=[],
        complete=False,
    )
    rng_ms = {}
    for name, spec in cases.items():
        rows, summary = measure_op(name, spec, n_el, copy, timer, compile_ok, rng_ms)
        payload["rows"] += rows
        payload["summary"] += summary
        if args.out:  # after every op: a kill keeps what finished
            bm.write_json(args.out, payload)
    payload["complete"] = True
    print(bm.markdown_table(payload["summary"] or payload["rows"]))
    if args.out:
        bm.write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
