"""Preemptible clusters: torchrun restarts after killed workers, one writer per run directory.

The kill tests run `torchrun --standalone --nproc_per_node=2 --max-restarts=3 ... --resume auto`
on the CPU (gloo), SIGKILL one worker of each rank at moments drawn with a fixed seed, and
compare the result bit for bit with an uninterrupted 2-process run.
"""

import datetime
import fcntl
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings

import numpy as np
import pytest
import torch
from helpers import run_ranks

from pfgmpp_fast.utils import distributed, io_utils
from pfgmpp_fast.utils.run_lock import LOCK_NAME, RunDirectoryBusy, acquire_run_dir, read_holder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_NET = '{"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []}'
STEPS, BATCH = 12, 16
# seeds of the kill moments (PFGMPP_FAST_TEST_SEEDS=1,2,3 repeats the kill tests with other moments)
SEEDS = [int(x) for x in os.environ.get("PFGMPP_FAST_TEST_SEEDS", "16").split(",")]


def train_args(run_dir, steps=STEPS):
    return [
        "train",
        "--data",
        "digits",
        "--outdir",
        str(run_dir),
        "--batch",
        str(BATCH),
        "--duration",
        f"{steps * BATCH / 1e6:g}",
        "--tick",
        f"{BATCH / 1000:g}",
        "--dump",
        "2",
        "--snap",
        "1000",
        "--lr-rampup",
        "0.032",
        "--ema",
        "0.0001",
        "--dropout",
        "0",
        "--augment",
        "0.12",
        "--precision",
        "fp32",
        "--no-compile",
        "--seed",
        "3",
        "--deterministic",
        "--no-progress",
        "--device",
        "cpu",
        "--network",
        TINY_NET,
        "--resume",
        "auto",
    ]


def launch(args, marker, torchrun=True):
    """A job in the background; `marker` tags its processes (and the workers torchrun starts)."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "PFGMPP_FAST_TEST_JOB": marker}
    head = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=3"]
        if torchrun
        else [sys.executable]
    )
    return subprocess.Popen(
        [*head, "-m", "pfgmpp_fast", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc, expect=0):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == expect, out[-6000:]
    return out


def workers(marker):
    """{(restart, local_rank): pid} of the live torchrun workers tagged with `marker`."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if env.get(b"PFGMPP_FAST_TEST_JOB") == marker.encode() and b"LOCAL_RANK" in env:
            found[(int(env[b"TORCHELASTIC_RESTART_COUNT"]), int(env[b"LOCAL_RANK"]))] = int(pid)
    return found


def wait_for(condition, proc, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended while waiting for {what}:\n{proc.stdout.read()[-6000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def kill_workers_during(proc, marker, progress, rng, ranks, first=2, last=STEPS - 3):
    """SIGKILL worker `ranks[i]` of restart attempt i once progress() reaches a random mark."""
    span = (last - first + 1) // len(ranks)
    for attempt, rank in enumerate(ranks):
        mark = rng.randint(first + attempt * span, first + (attempt + 1) * span - 1)
        wait_for(lambda: (attempt, rank) in workers(marker), proc, f"worker {rank} of attempt {attempt}")
        wait_for(lambda: progress() >= mark, proc, f"progress {mark}")
        time.sleep(rng.uniform(0, 0.05))
        os.kill(workers(marker)[(attempt, rank)], signal.SIGKILL)


def lines(path):
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    out = finish(launch(train_args(run_dir), uuid.uuid4().hex))
    assert "broadcast_buffers" not in out  # the deprecated DDP argument is gone
    return run_dir


def read_final(run_dir):
    return io_utils.load_torch_state(os.path.join(run_dir, "training-state-000000.pt"))


# ----------------------------------------------------------------------------------------
# Killed workers: torchrun restarts, --resume auto continues, the result is bit-identical


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_killed_workers_restart_and_finish_bit_identical(tmp_path, uninterrupted, seed):
    marker, rng = uuid.uuid4().hex, random.Random(seed)
    ranks = rng.sample([0, 1], 2)  # one worker of each rank, in attempts 0 and 1
    proc = launch(train_args(tmp_path), marker)
    kill_workers_during(proc, marker, lambda: lines(tmp_path / "stats.jsonl"), rng, ranks)
    out = finish(proc)
    assert out.count("exitcode: -9") == 2 and "connectFullMesh" not in out and "failed (try" not in out
    assert out.count("resume: continuing from") >= 1
    a, b = read_final(tmp_path), read_final(uninterrupted)
    assert a["cur_nimg"] == b["cur_nimg"] == STEPS * BATCH
    for part in ("net", "ema"):
        for k in b[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    for idx, s in b["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(a["optimizer"]["state"][idx][k], v), f"optimizer {idx}.{k} differs"


def fid_args(outdir, network, cache):
    return [
        "fid",
        "calc",
        "--network",
        str(network),
        "--features",
        "digits",
        "--digits-cache",
        cache,
        "--num-images",
        "48",
        "--seeds",
        "0-47",
        "--shard-size",
        "4",
        "--batch",
        "2",
        "--steps",
        "3",
        "--device",
        "cpu",
        "--outdir",
        str(outdir),
    ]


@pytest.fixture(scope="module")
def fid_uninterrupted(tmp_path_factory, uninterrupted, digits_cache):
    outdir = tmp_path_factory.mktemp("fid-uninterrupted")
    network = os.path.join(uninterrupted, "network-snapshot-000000.safetensors")
    finish(launch(fid_args(outdir, network, digits_cache), uuid.uuid4().hex))
    return outdir, network


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_killed_fid_workers_restart_and_finish_bit_identical(tmp_path, fid_uninterrupted, digits_cache, seed):
    whole, network = fid_uninterrupted
    marker, rng = uuid.uuid4().hex, random.Random(seed + 1)
    outdir = tmp_path / "killed"
    proc = launch(fid_args(outdir, network, digits_cache), marker)
    shards = lambda: sum(f.startswith("stats-") for f in os.listdir(outdir)) if outdir.exists() else 0
    kill_workers_during(proc, marker, shards, rng, rng.sample([0, 1], 2), first=1, last=9)
    out = finish(proc)
    assert out.count("exitcode: -9") == 2 and "connectFullMesh" not in out
    names = sorted(f for f in os.listdir(whole) if f.endswith(".npz"))
    assert len(names) == 12 + 1 and names == sorted(f for f in os.listdir(outdir) if f.endswith(".npz"))
    for name in names:
        with np.load(whole / name) as x, np.load(outdir / name) as y:
            for k in x.files:
                assert np.array_equal(x[k], y[k]), f"{name}:{k} differs"


# ----------------------------------------------------------------------------------------
# One writer per run directory


@pytest.mark.slow
def test_second_job_is_refused_until_the_holder_is_gone(tmp_path):
    """The torchrun agent is killed, its workers keep training: a new job is refused (naming
    the holder); once the workers are killed too, the rerun proceeds (resumes)."""
    marker = uuid.uuid4().hex
    proc = launch(train_args(tmp_path, steps=100000), marker)
    wait_for(
        lambda: lines(tmp_path / "stats.jsonl") >= 3 and (read_holder(str(tmp_path)) or {}).get("pid"),
        proc,
        "the first job to train",
    )
    os.kill(proc.pid, signal.SIGKILL)  # the agent; the workers live on
    proc.wait()
    holder = read_holder(str(tmp_path))
    assert holder["pid"] == workers(marker)[(0, 0)] and "train" in holder["command"]
    second = finish(launch(train_args(tmp_path, steps=1), uuid.uuid4().hex, torchrun=False), expect=1)
    assert "in use by another job" in second and f"pid {holder['pid']}" in second and "--outdir" in second
    assert second.count("\n") <= 2, second  # one message, no traceback
    for pid in workers(marker).values():
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not workers(marker), None, "the workers to die")
    third = finish(launch(train_args(tmp_path, steps=1), uuid.uuid4().hex, torchrun=False))
    assert "resume: continuing from" in third and "done." in third
    assert not os.path.exists(tmp_path / LOCK_NAME)  # a finished job leaves only its results


def test_lock_refuses_a_live_holder_and_recovers_from_a_dead_one(tmp_path):
    run_dir = str(tmp_path)
    fake = {
        "host": "node7",
        "pid": 424242,
        "started": "2026-01-01T00:00:00+00:00",
        "command": "python -m pfgmpp_fast train --outdir x",
        "torchelastic": None,
    }
    fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file: another job, as far as flock knows
    os.write(fd, json.dumps(fake).encode())
    with pytest.raises(
        RunDirectoryBusy,
        match=r"in use by another job \(pid 424242 on host node7, started "
        r"2026-01-01T00:00:00\+00:00, command: python -m pfgmpp_fast train",
    ):
        acquire_run_dir(run_dir, "training run")
    os.close(fd)  # the holder is gone (its info stays in the file)
    with acquire_run_dir(run_dir, "training run"):
        assert read_holder(run_dir)["pid"] == os.getpid()
        with acquire_run_dir(run_dir):  # re-entrant within one process
            pass
        fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR)
        with pytest.raises(BlockingIOError):  # still held after the inner release
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at the end of the job
    os.close(fd)
    assert not os.path.exists(os.path.join(run_dir, LOCK_NAME))


def test_fid_calc_refuses_a_busy_shard_directory(tmp_path):
    from pfgmpp_fast.evaluation import calc

    fd = os.open(os.path.join(tmp_path, LOCK_NAME), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    source = calc.ImagesSource(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
    extractor = type("Ex", (), {"dim": 1, "name": "mean", "__call__": lambda self, x: x.float().mean((2, 3))})()
    with pytest.raises(RunDirectoryBusy, match="in use by another job"):
        calc.calc_stats(source, extractor, outdir=str(tmp_path), shard_size=2)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("stats-")]
    os.close(fd)
    assert calc.calc_stats(source, extractor, outdir=str(tmp_path), shard_size=2).count == 4


# ----------------------------------------------------------------------------------------
# Process-group setup


def test_namespace_ignores_the_keys_of_a_killed_attempt():
    store = torch.distributed.HashStore()
    store.set("pfgmpp_fast/leader", "old")  # what a killed attempt left behind
    store.set("pfgmpp_fast/go", "old x y")
    store.set("pfgmpp_fast/ack/1", "old y")
    store.set("pfgmpp_fast/pg/old/rank_1", "127.0.0.1:9")
    got = {}
    threads = [
        threading.Thread(
            target=lambda r=r: got.__setitem__(
                r, distributed._fresh_namespace(store, r, 3, datetime.timedelta(seconds=30))
            )
        )
        for r in (2, 1, 0)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == [0, 1, 2]
    got[0].set("rank_0", "fresh")
    assert got[1].get("rank_0") == got[2].get("rank_0") == b"fresh"
    assert not got[1].check(["rank_1"])  # the stale address is not visible


def test_setup_retries_with_backoff_until_every_rank_is_there(monkeypatch):
    code = (
        "import os, sys, time, torch; from pfgmpp_fast.utils import distributed\n"
        "time.sleep(4 if os.environ['RANK'] == '1' else 0); distributed.init('cpu')\n"
        "x = torch.ones(1); torch.distributed.all_reduce(x); print('sum', x.item()); distributed.close()"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PFGMPP_FAST_DIST_INIT_TIMEOUT": "2",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = [finish(p) for p in procs]
    assert all("sum 2.0" in o for o in outs)
    assert "rank 0: process-group setup failed (try 1/3)" in outs[0] and "retrying in 2 s" in outs[0]
    assert "rank 0: joined the process group on try 2/3" in outs[0]

    monkeypatch.setenv("PFGMPP_FAST_DIST_INIT_TRIES", "0")
    with pytest.raises(ValueError, match="PFGMPP_FAST_DIST_INIT_TRIES must be an int >= 1, got '0'"):
        distributed._env_int(distributed.INIT_TRIES_ENV, 3)


def test_ddp_uses_the_current_buffer_sync_api():
    distributed.join_group(torch.distributed.HashStore(), 0, 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            model = distributed.ddp(torch.nn.BatchNorm1d(3), torch.device("cpu"))
        assert model.module.weight.shape == (3,)
        assert not getattr(model, "forward_sync_buffers", getattr(model, "broadcast_buffers", True))
    finally:
        distributed.close()
    assert not torch.distributed.is_initialized()


def _record_leaving(rank, log_dir):
    """Worker: note, in a file per rank, when this rank starts and ends destroying its group
    (which takes at least 0.2 s, so that ranks leaving together would overlap)."""
    destroy = torch.distributed.destroy_process_group

    def noted(*args, **kwargs):
        start = time.monotonic()
        time.sleep(0.2)
        destroy(*args, **kwargs)
        with open(os.path.join(log_dir, f"left-{rank}"), "w") as f:
            f.write(f"{start} {time.monotonic()}")

    torch.distributed.destroy_process_group = noted


def test_gloo_ranks_leave_one_after_another_rank_0_last(tmp_path):
    run_ranks(_record_leaving, 3, tmp_path / "ranks", str(tmp_path))
    start, end = zip(*[map(float, (tmp_path / f"left-{r}").read_text().split()) for r in range(3)])
    assert end[2] <= start[1] and end[1] <= start[0], (start, end)


def _slow_final_barrier_on_rank_0(rank, log_dir):
    """Worker: rank 0 returns from close's barrier 0.5 s after its peers (as a loaded rank
    may); every rank notes when its barrier returned and when it began to leave."""
    barrier, destroy = torch.distributed.barrier, torch.distributed.destroy_process_group

    def slow_barrier(*args, **kwargs):
        barrier(*args, **kwargs)
        if rank == 0:
            time.sleep(0.5)
        with open(os.path.join(log_dir, f"passed-{rank}"), "w") as f:
            f.write(str(time.monotonic()))

    def noted_destroy(*args, **kwargs):
        with open(os.path.join(log_dir, f"leaving-{rank}"), "w") as f:
            f.write(str(time.monotonic()))
        destroy(*args, **kwargs)

    torch.distributed.barrier, torch.distributed.destroy_process_group = slow_barrier, noted_destroy


def test_no_rank_leaves_before_every_rank_has_passed_the_final_barrier(tmp_path):
    # a rank that closed its connections while a peer was still inside the barrier failed
    # that peer's barrier in CI ('Connection closed by peer')
    run_ranks(_slow_final_barrier_on_rank_0, 2, tmp_path / "ranks", str(tmp_path))
    passed = [float((tmp_path / f"passed-{r}").read_text()) for r in range(2)]
    leaving = [float((tmp_path / f"leaving-{r}").read_text()) for r in range(2)]
    assert min(leaving) >= max(passed), (passed, leaving)


def _rank_0_value_worker(rank):
    """rank_0_value: rank 0's value on both ranks (as JSON), rank 0's exception on both, and
    the ranks' collectives still matched afterwards."""
    got = distributed.rank_0_value(lambda: {"rank": rank, "found": [(100, "net-100.safetensors")], "ok": True})
    assert got == {"rank": 0, "found": [[100, "net-100.safetensors"]], "ok": True}

    def fails_on_rank_0():
        raise ValueError("cannot list the run directory")

    raised = ValueError if rank == 0 else RuntimeError
    with pytest.raises(raised, match="cannot list the run directory"):
        distributed.rank_0_value(fails_on_rank_0)
    assert [int(t) for t in distributed.all_gather(torch.tensor([rank]))] == [0, 1]


def test_rank_0_value_gives_every_rank_the_value_or_the_error_of_rank_0(tmp_path):
    run_ranks(_rank_0_value_worker, 2, tmp_path / "ranks")
    assert distributed.rank_0_value(lambda: (1, "a")) == [1, "a"]  # no process group: JSON all the same


def _leave_after_failure(rank, flag):
    """Worker: rank 0 fails and leaves at once while rank 1 is busy (is not at any barrier)."""
    if rank == 0:
        distributed.close(failed=True)
        open(flag, "w").close()
    else:
        deadline = time.monotonic() + 120
        while not os.path.exists(flag):  # would wait forever if rank 0 waited for this rank
            assert time.monotonic() < deadline, "rank 0 did not leave: close(failed=True) waited for its peer"
            time.sleep(0.05)
        distributed.close(failed=True)
    assert not torch.distributed.is_initialized()


def test_a_failed_rank_leaves_the_group_without_waiting_for_its_peers(tmp_path):
    run_ranks(_leave_after_failure, 2, tmp_path / "ranks", str(tmp_path / "rank0-left"))


def _rank_1_raises(rank):
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")


def test_run_ranks_fails_when_a_rank_fails_its_work(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"rank 1 failed during its work \(exit code 1\)"):
        run_ranks(_rank_1_raises, 2, tmp_path / "ranks")


def test_join_group_rejects_bad_rank_world_and_a_second_group():
    store = torch.distributed.HashStore()
    for rank, world, match in (
        (0, 0, "world must be an int >= 1"),
        (2, 2, r"rank must be an int in \[0, 2\)"),
        (-1, 2, "rank must be"),
        (True, 2, "rank must be"),
        (0, 1.0, "world must be"),
    ):
        with pytest.raises(ValueError, match=match):
            distributed.join_group(store, rank, world)
    assert not torch.distributed.is_initialized()
    distributed.join_group(store, 0, 1)
    try:
        with pytest.raises(RuntimeError, match="already in a process group"):
            distributed.join_group(torch.distributed.HashStore(), 0, 1)
    finally:
        distributed.close()
    assert not torch.distributed.is_initialized()
