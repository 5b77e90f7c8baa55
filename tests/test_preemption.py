"""Graceful preemption (utils/preemption.py): SIGTERM / SIGUSR1 stop `train` after the current
step with a training state and exit code 75 (2 gloo ranks under torchrun: after the same step,
one state), `fid calc` after the current shard, `experiment` after the current step or point; a
second signal while the state is written is ignored; the rerun (`--resume auto`) continues with
the same bits as an uninterrupted run."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from helpers import run_ranks
from safetensors.torch import load_file

from pfgmpp_fast import cli
from pfgmpp_fast.training.train import options_from_args, run_training
from pfgmpp_fast.utils import distributed, io_utils
from pfgmpp_fast.utils.cli_errors import report
from pfgmpp_fast.utils.preemption import PREEMPTED_EXIT_CODE, Preempted, Preemption, parse_signals, stop_if_requested

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH = 10, 16  # ticks of 3 steps (the first: 1), so most signals land inside a tick
TRAIN_ARGS = [
    *("--batch", str(BATCH), "--duration", f"{STEPS * BATCH / 1e6:g}", "--tick", "0.048", "--dump", "1000"),
    *("--device", "cpu", "--precision", "fp32", "--no-compile", "--no-channels-last", "--no-progress"),
    *("--network", json.dumps(dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]))),
    *("--D", "128", "--lr", "0.002", "--lr-rampup", "0.032", "--dropout", "0.1", "--augment", "0.12"),
    *("--seed", "3", "--ema", "0.0001", "--deterministic", "--phema", "0.05,0.1", "--phema-snap", "0.08"),
]
STATE = "training-state-000000.pt"  # the one state name of these tiny runs (kimg 0): final or preempted
# the stats.jsonl columns that do not depend on timing
DETERMINISTIC_STATS = ("Loss/loss", "Loss/loss_per_image", "Loss/nonfinite_steps", "Progress/tick", "Progress/kimg")


@pytest.fixture(autouse=True)
def main_thread_and_one_thread():
    """Handlers are installed by the main thread only: elsewhere a test's signal would end pytest."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """64 random 1x8x8 images (an .npz: no decoding library to import in every process)."""
    path = str(tmp_path_factory.mktemp("data") / "images.npz")
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (64, 1, 8, 8), dtype=np.uint8))
    return path


def train_command(data, run_dir, *extra) -> list:
    return ["train", "--data", data, *TRAIN_ARGS, "--outdir", str(run_dir), *extra]


def train_options(data, run_dir, *extra) -> dict:
    """run_training options of `train_command(...)`, parsed by the command's own parser."""
    return options_from_args(cli.build_parser("train").parse_args(train_command(data, run_dir, *extra)))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_training(**train_options(data, run_dir))
    return run_dir


def stats_rows(run_dir):
    with open(os.path.join(run_dir, "stats.jsonl")) as f:
        return [{k: row[k] for k in DETERMINISTIC_STATS} for row in map(json.loads, f)]


def assert_same_run(run_dir, reference_dir):
    """Equal bits: network, EMA, power-function EMAs, optimizer, RNG states, counters; the same
    stats rows (but their timings) and the same post-hoc EMA snapshots."""
    a, b = (io_utils.load_torch_state(os.path.join(d, STATE)) for d in (run_dir, reference_dir))
    assert sorted(a) == sorted(b)
    for key in a:
        if key not in ("total_time", io_utils.DIGEST_KEY):
            assert io_utils.content_digest(a[key]) == io_utils.content_digest(b[key]), f"{key} differs"
    assert stats_rows(run_dir) == stats_rows(reference_dir)
    snapshots = sorted(os.listdir(os.path.join(reference_dir, "phema")))
    assert sorted(os.listdir(os.path.join(run_dir, "phema"))) == snapshots and snapshots
    for name in snapshots:
        tensors = [load_file(os.path.join(d, "phema", name)) for d in (run_dir, reference_dir)]
        assert io_utils.content_digest(tensors[0]) == io_utils.content_digest(tensors[1]), name


def preempt_at_step(monkeypatch, step, sig="TERM"):
    """The fault hook of utils/faults.py: `sig` arrives in step `step` (after its backward pass)."""
    monkeypatch.setenv("PFGMPP_FAST_KILL_AT_STEP", str(step))
    monkeypatch.setenv("PFGMPP_FAST_KILL_AT_STEP_SIGNAL", sig)


def kimg_in(message):
    return float(re.search(r"at kimg ([0-9.]+)", message).group(1))


def _popen(command, **kwargs):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, **kwargs)


def _wait_for_first_tick(proc, run_dir, timeout=240):
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(run_dir, "stats.jsonl")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no tick within the time limit"
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()


# ----------------------------------------------------------------------------------------
# One process


@pytest.mark.bitidentity
def test_signals_at_random_steps_lose_no_step_and_resume_bit_identically(tmp_path, data, uninterrupted, monkeypatch):
    rng, handlers = random.Random(21), {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    trials = [(rng.randrange(STEPS - 1), rng.choice(["TERM", "USR1"])) for _ in range(5)]
    for trial, (step, sig) in enumerate(trials):
        run_dir = tmp_path / f"trial{trial}"
        with monkeypatch.context() as m:
            preempt_at_step(m, step, sig)
            with pytest.raises(Preempted) as stopped:
                run_training(**train_options(data, run_dir))
        assert {s: signal.getsignal(s) for s in handlers} == handlers  # given back
        state = io_utils.load_torch_state(run_dir / STATE)
        # the step the signal arrived in is finished and kept: no step is lost
        assert state["cur_nimg"] == (step + 1) * BATCH, (trial, step, sig)
        assert stopped.value.signal == "SIG" + sig and kimg_in(str(stopped.value)) == (step + 1) * BATCH / 1000
        assert ("tick" in state) == (step not in (0, 3, 6))  # inside a tick: its sums are kept
        assert str(stopped.value) in (run_dir / "log.txt").read_text()
        run_training(**train_options(data, run_dir, "--resume", "auto"))
        assert_same_run(run_dir, uninterrupted)


def test_a_second_signal_during_the_state_write_is_ignored(tmp_path, data, uninterrupted, monkeypatch):
    """Without --dump the preemption's state is the only one; SIGTERM again when half of it is written."""
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        preempt_at_step(m, 7)
        m.setenv("PFGMPP_FAST_KILL_DURING_WRITE", "training-state-")
        m.setenv("PFGMPP_FAST_KILL_DURING_WRITE_SIGNAL", "TERM")
        with pytest.raises(Preempted, match=r"at kimg 0\.128: .* \(1 further signal\(s\) ignored while stopping\)"):
            run_training(**{**train_options(data, run_dir), "dump_ticks": None})
    assert os.listdir(run_dir).count(STATE) == 1 and not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]
    assert io_utils.load_torch_state(run_dir / STATE)["cur_nimg"] == 8 * BATCH  # whole (its digest is checked)
    run_training(**train_options(data, run_dir, "--resume", "auto"))
    assert_same_run(run_dir, uninterrupted)


@pytest.mark.bitidentity
def test_the_train_command_stops_on_a_signal_from_outside_with_exit_75(tmp_path, data, uninterrupted):
    """SIGTERM from another process at a random moment (after the first tick: the handlers are in place)."""
    run_dir = tmp_path / "run"
    proc = _popen([sys.executable, "-m", "pfgmpp_fast", *train_command(data, run_dir)], stderr=subprocess.PIPE)
    _wait_for_first_tick(proc, run_dir)
    time.sleep(random.Random(1).uniform(0, 0.1))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out + err
    line = err.strip().splitlines()[-1]
    assert line.startswith("preempted by SIGTERM at kimg ") and line.endswith("resume with --resume auto"), err
    state = io_utils.load_torch_state(run_dir / STATE)
    assert state["cur_nimg"] == round(kimg_in(line) * 1000) >= stats_rows(run_dir)[-1]["Progress/kimg"]["mean"] * 1000
    assert cli.main(train_command(data, run_dir, "--resume", "auto")) == 0
    assert_same_run(run_dir, uninterrupted)


# ----------------------------------------------------------------------------------------
# Two gloo ranks: torchrun forwards a signal to every worker; a signal to one rank only


def _ranks_worker(rank, workdir, data, phases):
    """Each phase one run_training on both ranks (a fresh process group each): (run folder, extra
    options, {rank: the step its signal arrives in}); how each phase ended goes to a file per rank."""
    with Preemption() as preemption:  # the NCCL path's lag, on gloo: both ranks stop one step later
        preemption.lagged = True
        for step in range(8):
            if rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            if preemption.poll_step():
                break
    with open(os.path.join(workdir, f"lagged-rank{rank}.json"), "w") as f:
        json.dump(step, f)
    for i, (name, extra, signal_steps) in enumerate(phases):
        if i:
            distributed.join_group(torch.distributed.FileStore(os.path.join(workdir, f"store-{i}"), 2), rank, 2)
        os.environ.pop("PFGMPP_FAST_KILL_AT_STEP", None)
        if rank in signal_steps:
            os.environ.update(PFGMPP_FAST_KILL_AT_STEP=str(signal_steps[rank]), PFGMPP_FAST_KILL_AT_STEP_SIGNAL="TERM")
        try:
            run_training(**train_options(data, os.path.join(workdir, name), *extra))
            outcome = "done"
        except Preempted as exc:
            outcome = kimg_in(str(exc))
        with open(os.path.join(workdir, f"{name}-{i}-rank{rank}.json"), "w") as f:
            json.dump(outcome, f)


@pytest.mark.slow
@pytest.mark.bitidentity
def test_two_gloo_ranks_stop_after_the_same_step_and_resume_bit_identically(tmp_path, data):
    forwarded = tmp_path / "ranks" / "forwarded"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = _popen([*torchrun, "-m", "pfgmpp_fast", *train_command(data, forwarded)], stderr=subprocess.STDOUT)
    _wait_for_first_tick(proc, forwarded)
    time.sleep(random.Random(2).uniform(0, 0.05))
    proc.send_signal(signal.SIGTERM)  # to the agent, which forwards it to both workers
    out, _ = proc.communicate(timeout=240)
    log = (forwarded / "log.txt").read_text()
    assert "preempted by SIGTERM at kimg" in log, out
    stopped = io_utils.load_torch_state(forwarded / STATE)["cur_nimg"] // BATCH
    assert stopped * BATCH == round(kimg_in(log.split("preempted")[-1]) * 1000) and stopped <= STEPS - 5, log

    one = stopped + random.Random(3).randrange(2)  # the global index of the step the signal arrives in
    phases = [
        ("full", [], {}),
        ("forwarded", ["--resume", "auto"], {1: one}),  # to rank 1 only
        ("forwarded", ["--resume", "auto"], {0: one + 2, 1: one + 2}),  # to both
        ("forwarded", ["--resume", "auto"], {}),
    ]
    run_ranks(_ranks_worker, 2, tmp_path / "ranks", str(tmp_path / "ranks"), data, phases)
    ended = {f: json.load(open(tmp_path / "ranks" / f)) for f in os.listdir(tmp_path / "ranks") if f.endswith(".json")}
    assert ended["forwarded-1-rank0.json"] == ended["forwarded-1-rank1.json"] == (one + 1) * BATCH / 1000
    assert ended["forwarded-2-rank0.json"] == ended["forwarded-2-rank1.json"] == (one + 3) * BATCH / 1000
    assert ended["forwarded-3-rank0.json"] == ended["forwarded-3-rank1.json"] == "done"
    assert ended["lagged-rank0.json"] == ended["lagged-rank1.json"] == 4
    assert_same_run(tmp_path / "ranks" / "forwarded", tmp_path / "ranks" / "full")


# ----------------------------------------------------------------------------------------
# fid calc and experiment


def test_fid_calc_stops_after_the_current_shard_and_the_rerun_gives_the_same_result(
    tmp_path, digits_cache, monkeypatch, capsys
):
    from helpers import tiny_net

    from pfgmpp_fast.checkpoint import save_network
    from pfgmpp_fast.evaluation import calc

    net = str(tmp_path / "net.safetensors")
    save_network(net, tiny_net())
    common = [
        "fid",
        "calc",
        "--network",
        net,
        "--steps",
        "2",
        "--batch",
        "8",
        "--features",
        "digits",
        "--device",
        "cpu",
    ]
    common += ["--digits-cache", digits_cache, "--num", "32", "--shard-size", "8", "--metrics", "fid,kid"]
    assert cli.main([*common, "--outdir", str(tmp_path / "whole")]) == 0
    cell_rows, calls = calc._cell_rows, []

    def signal_in_the_second_shard(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return cell_rows(*args)

    monkeypatch.setattr(calc, "_cell_rows", signal_in_the_second_shard)
    capsys.readouterr()
    assert cli.main([*common, "--outdir", str(tmp_path / "stopped")]) == PREEMPTED_EXIT_CODE
    err = capsys.readouterr().err
    assert "preempted by SIGTERM: 16 of 32 images done; the finished shards are in" in err, err
    assert sorted(os.listdir(tmp_path / "stopped")) == ["stats-0-7.npz", "stats-8-15.npz"]  # no result yet
    monkeypatch.undo()
    assert cli.main([*common, "--outdir", str(tmp_path / "stopped")]) == 0
    a, b = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("whole", "stopped"))
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    with np.load(tmp_path / "whole" / "stats.npz") as x, np.load(tmp_path / "stopped" / "stats.npz") as y:
        assert sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x)


def test_experiment_stops_in_training_and_between_points_and_reruns_to_the_same_results(tmp_path, monkeypatch):
    from pfgmpp_fast.apps import experiments

    config = dict(D_values=[128.0], alpha=[0.0], bits=[32], steps=[2], nfe_solvers=[], ema=[0.05])
    config.update(base_steps=2, sets=1, set_size=24, duration_kimg=0.384)  # 3 steps of 128, 2 points
    monkeypatch.setattr(experiments, "write_outputs", lambda *args: {})  # tables and figures: from the points
    run = lambda outdir: experiments.run_robustness(str(outdir), tiny=True, device="cpu", progress=False, **config)  # noqa: E731
    run(tmp_path / "whole")

    with monkeypatch.context() as m:
        preempt_at_step(m, 1)
        with pytest.raises(Preempted, match="while training D=128: its training state is in .*rerun the same command"):
            run(tmp_path / "stopped")
    score_point = experiments.score_point

    def signal_while_scoring(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return score_point(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(experiments, "score_point", signal_while_scoring)
        with pytest.raises(Preempted, match="preempted by SIGUSR1: the finished points are kept"):
            run(tmp_path / "stopped")
    assert len(list((tmp_path / "stopped").rglob("set*.json"))) == 1  # the point it was scoring
    run(tmp_path / "stopped")
    records = {}
    for d in ("whole", "stopped"):
        files = sorted((tmp_path / d).rglob("set*.json")) + [tmp_path / d / "train" / "D128" / "done.json"]
        records[d] = {p.relative_to(tmp_path / d): json.loads(p.read_text()) for p in files}
        for record in records[d].values():
            for timing in ("seconds", "train_seconds_this_process", "train_seconds_total"):
                record.pop(timing, None)
    assert len(records["whole"]) == 3 and records["whole"] == records["stopped"]


# ----------------------------------------------------------------------------------------
# The pieces


def test_signal_names_are_checked_and_none_turns_preemption_off(tmp_path, data, capsys):
    assert parse_signals("TERM,usr1") == parse_signals("SIGTERM, SIGUSR1") == ("TERM", "USR1")
    assert parse_signals("none") == parse_signals("") == parse_signals(None) == ()
    assert train_options(data, tmp_path, "--preempt-signals", "none")["preempt_signals"] == ()
    for bad in (15, [signal.SIGTERM]):
        with pytest.raises(ValueError, match="preempt_signals: must be signal names such as 'TERM,USR1', got"):
            parse_signals(bad)
    for bad in ("KILL", "TERM,STOP", "15", "TERM,none"):
        with pytest.raises(ValueError, match=r"preempt_signals: must be comma-separated signal names of TERM"):
            parse_signals(bad)
        assert cli.main(train_command(data, tmp_path, "--preempt-signals", bad, "--dry-run")) == 2
        assert "--preempt-signals: must be comma-separated signal names" in capsys.readouterr().err
        with pytest.raises(ValueError, match="preempt_signals"):
            run_training(**{**train_options(data, tmp_path / "bad"), "preempt_signals": bad})
    before = signal.getsignal(signal.SIGTERM)
    with Preemption(()) as off:
        assert signal.getsignal(signal.SIGTERM) == before and off.requested is None
    with Preemption("USR2") as outer:
        with Preemption("TERM"):
            os.kill(os.getpid(), signal.SIGUSR2)
        assert outer.requested == "SIGUSR2"  # nested contexts share one request
    assert signal.getsignal(signal.SIGTERM) == before
    with Preemption() as fresh:
        assert fresh.requested is None  # cleared when the outermost context ends
    with Preemption(inner_stops=False):  # the training loop's: what it runs between steps never stops it
        os.kill(os.getpid(), signal.SIGTERM)
        stop_if_requested("kept")
        with Preemption(), pytest.raises(Preempted, match="^preempted by SIGTERM: kept$"):
            stop_if_requested("kept")
    stop_if_requested("outside every context: nothing")


def test_preempted_is_exit_code_75_with_its_one_line():
    assert PREEMPTED_EXIT_CODE == 75 and report(Preempted("preempted by SIGTERM: x", "SIGTERM")) == 75
