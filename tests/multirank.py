"""Run a test's worker on several ranks: spawned processes joined in one gloo group.

``run_ranks(worker, world, workdir, *args)`` calls ``worker(rank, *args)`` in ``world``
fresh processes (``spawn``, as torchrun starts them) that share a process group over a
file store in ``workdir``, then leaves the group through ``distributed.close`` as every
command does. A rank that raises, dies or hangs fails the test, naming the rank and the
phase it was in, with one exception: a rank killed by SIGABRT/SIGSEGV inside torch while
leaving the group, after its work is done, is a warning (torch 2.14's gloo teardown aborted
so once in CI; `distributed.close` orders the teardown to avoid it), and the test goes on
to check the results. The worker must be a module-level function (it is pickled).
"""
import multiprocessing
import os
import signal
import time
import warnings

import pytest
import torch

from pfgmpp_fast.utils import distributed

TIMEOUT_S = 300
GRACE_S = 30         # how long the other ranks may go on once one has failed


def _rank_main(rank, world, workdir, worker, args):
    store = torch.distributed.FileStore(os.path.join(workdir, "store"), world)
    distributed.join_group(store, rank, world)
    worker(rank, *args)
    open(os.path.join(workdir, f"worked-{rank}"), "w").close()
    distributed.close()
    open(os.path.join(workdir, f"closed-{rank}"), "w").close()


def run_ranks(worker, world, workdir, *args, timeout=TIMEOUT_S):
    """worker(rank, *args) on `world` gloo ranks; every rank must work and leave the group."""
    workdir = str(workdir)
    os.makedirs(workdir, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, world, workdir, worker, args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):     # its peers may wait for it forever
            deadline = min(deadline, time.monotonic() + GRACE_S)
        time.sleep(0.05)
    hung = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    problems = []
    for rank, p in enumerate(procs):
        worked = os.path.exists(os.path.join(workdir, f"worked-{rank}"))
        closed = os.path.exists(os.path.join(workdir, f"closed-{rank}"))
        if p.exitcode == 0 and closed:
            continue
        phase = "leaving the process group" if worked else "its work"
        how = "still running when stopped" if hung[rank] else f"exit code {p.exitcode}"
        if worked and not hung[rank] and -p.exitcode in (signal.SIGABRT, signal.SIGSEGV):
            # torch's own gloo teardown, after this rank's work was done and checked below
            warnings.warn(f"rank {rank} was killed by signal {-p.exitcode} while leaving the process group")
            continue
        problems.append(f"rank {rank} failed during {phase} ({how})")
    if problems:
        pytest.fail("; ".join(problems) + " (the ranks' output is in the captured stderr)")
