"""The cost of one sampling step per solver, relative to Heun's, in one run (CPU, one thread by default).

Two measurements, each for every solver of checks.SOLVERS on the same latents and batch:

1. `update`: the sampler alone — an EDMPrecond-like network whose .raw returns a fixed
   tensor (no network cost), so the time is the fused update kernels, the preconditioning
   scalars and the step loop. Heun's step is two updates (2 NFE), Euler's one, the multistep
   solvers' two (DPM-Solver++(2M)) or three (iPNDM: the slope, the history sum, the update).
2. `network`: the same with the digits demo's small DDPM++ (apps.digits.SMALL_NETWORK, 1×8×8,
   untrained weights — the time does not depend on them), where the network dominates.

Per solver: ms per step (total / num_steps), ms per NFE, and the ratio of a step to Heun's; the
solvers take turns, round after round, and each number is the median over the rounds.

    python benchmarks/bench_solver_step.py [--threads 1] [--steps 18] [--batch 64] [--out r.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfgmpp_fast import checks  # noqa: E402
from pfgmpp_fast.sampler import Sampler, SamplerOptions  # noqa: E402
from pfgmpp_fast.utils import benchmarking as B  # noqa: E402


class FixedOutput(torch.nn.Module):
    """EDMPrecond-like (.raw, .sigma_data) with a fixed raw output: the sampler's own cost only."""

    sigma_data = 0.5

    def __init__(self, shape):
        super().__init__()
        self.F = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.1

    def raw(self, x_in, c_noise, class_labels=None, augment_labels=None):
        return self.F


def small_network(D):
    from pfgmpp_fast.apps.digits import untrained_network

    return untrained_network(D)


def measure(net, shape, steps: int, backend: str, reps: int):
    """{solver: (ms per step, ms per NFE)} on the same latents: the solvers take turns (one run
    each per round, `reps` rounds after one warm-up round) so a busy machine slows them alike;
    the median over the rounds."""
    seeds = torch.arange(shape[0])
    runs = {}
    for solver in checks.SOLVERS:
        sampler = Sampler(128.0, 0, SamplerOptions(num_steps=steps, solver=solver, backend=backend))
        latents = sampler.prior(shape, seeds)
        runs[solver] = (lambda s=sampler, z=latents: s(net, z, seeds), sampler.options.nfe)
    times = {solver: [] for solver in runs}
    for round_ in range(reps + 1):
        for solver, (run, _) in runs.items():
            ms = B.time_ms(run, "cpu", warmup=0, reps=1)
            if round_:
                times[solver].append(ms)
    return {
        solver: (statistics.median(times[solver]) / steps, statistics.median(times[solver]) / nfe)
        for solver, (_, nfe) in runs.items()
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--reps", type=int, default=9, help="rounds (each solver once per round)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    cases = (
        ("update (3x32x32, no network)", FixedOutput((args.batch, 3, 32, 32)), (args.batch, 3, 32, 32)),
        ("network (digits small DDPM++, 1x8x8)", small_network(128.0), (args.batch, 1, 8, 8)),
    )
    for name, net, shape in cases:
        with torch.no_grad():
            times = measure(net, shape, args.steps, args.backend, args.reps)
        heun = times["heun"][0]
        for solver, (per_step, per_nfe) in times.items():
            rows.append(
                {
                    "case": name,
                    "solver": solver,
                    "ms_per_step": round(per_step, 3),
                    "ms_per_nfe": round(per_nfe, 3),
                    "step_vs_heun": round(per_step / heun, 3),
                }
            )
    print(f"CPU, {args.threads} thread(s), batch {args.batch}, {args.steps} steps, backend {args.backend}\n")
    print(B.markdown_table(rows))
    if args.out:
        B.write_json(args.out, {"environment": B.environment("cpu"), "rows": rows})


if __name__ == "__main__":
    main()
