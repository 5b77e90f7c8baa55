"""Watching a run: TensorBoard event files (read back with TensorBoard's own reader) and the
in-training evaluation (Eval/<metric> rows equal to a separate `fid calc` of each snapshot,
exact across a kill and --resume auto, and across rank counts)."""

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import run_ranks, tiny_run_options

from pfgmpp_fast import cli
from pfgmpp_fast.checkpoint import load_network, save_network
from pfgmpp_fast.evaluation.in_training import SnapshotEvaluator
from pfgmpp_fast.training.report import is_eval_row
from pfgmpp_fast.training.run_files import run_files_in
from pfgmpp_fast.training.train import run_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_NET = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
EVAL = dict(metrics="fid", num_images=24, features="digits", num_steps=3, batch=8)  # 3 grid batches
STEPS, BATCH = 6, 16  # one tick per step; snapshots (and evaluations) at ticks 0, 3 and 5


def options(run_dir, **extra):
    return tiny_run_options(run_dir, STEPS, BATCH, TINY_NET, D=128, ema_halflife_kimg=0.05, seed=5, **extra)


def rows(run_dir):
    with open(os.path.join(run_dir, "stats.jsonl")) as f:
        return [json.loads(line) for line in f]


def eval_history(run_dir):
    """[(tick, kimg, {Eval/...: value})] of a run's evaluation rows."""
    return [
        (
            r["Progress/tick"]["mean"],
            r["Progress/kimg"]["mean"],
            {k: v["mean"] for k, v in r.items() if k.startswith("Eval/")},
        )
        for r in rows(run_dir)
        if is_eval_row(r)
    ]


def event_files(run_dir):
    return glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))


def tensorboard_scalars(run_dir):
    """{tag: [(step, value)]} as TensorBoard's own reader sees the run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class RecordingEvaluator:
    """The SnapshotEvaluator, saving the network it scores each time (the snapshot files of a
    run shorter than 1 kimg share one name)."""

    def __init__(self, evaluator, outdir):
        self.evaluator, self.outdir, self.saved = evaluator, str(outdir), []

    def describe(self):
        return self.evaluator.describe()

    def __call__(self, net):
        path = os.path.join(self.outdir, f"scored-{len(self.saved)}.safetensors")
        save_network(path, net)
        self.saved.append(path)
        return self.evaluator(net)


@pytest.fixture(scope="module")
def ref(tmp_path_factory, digits_cache):
    """Reference statistics of the digits in the digits feature space, by `fid ref` itself."""
    path = str(tmp_path_factory.mktemp("ref") / "digits-ref.npz")
    argv = ["fid", "ref", "--data", "digits", "--dest", path, "--features", "digits", "--digits-cache", digits_cache]
    assert cli.main(argv) == 0
    return path


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, ref, digits_cache):
    """A tiny run with TensorBoard and the in-training FDD at every snapshot (ticks 0, 3, 5)."""
    run_dir = tmp_path_factory.mktemp("evaluated")
    recorder = RecordingEvaluator(SnapshotEvaluator(ref, digits_cache=digits_cache, **EVAL), run_dir)
    run_training(**options(run_dir / "run", snap_ticks=3, dump_ticks=3), evaluator=recorder)
    return run_dir / "run", recorder.saved


def test_tensorboard_reader_sees_the_stats_jsonl_scalars(evaluated_run):
    run_dir, _ = evaluated_run
    assert len(event_files(run_dir)) == 1
    expected, seen = {}, set()
    for row in rows(run_dir):
        step = round(row["Progress/kimg"]["mean"] * 1000)
        for name, stat in row.items():
            if isinstance(stat, dict) and (name, step) not in seen:  # one value per tag and step
                seen.add((name, step))
                expected.setdefault(name, []).append((step, float(np.float32(stat["mean"]))))
    got = tensorboard_scalars(run_dir)
    assert set(got) == set(expected) and {"Loss/loss", "Eval/FDD", "Progress/kimg", "Timing/eval_sec"} <= set(got)
    for tag in expected:
        assert got[tag] == expected[tag], tag  # float32 in the event file: equal to the float32 of the mean
    assert [step for step, _ in got["Eval/FDD"]] == [BATCH, 4 * BATCH, 6 * BATCH]
    assert run_files_in(run_dir)[-1] == os.path.basename(event_files(run_dir)[0])  # a run's file, named last


def test_no_tensorboard_writes_no_event_file(tmp_path, capsys):
    run_training(**options(tmp_path / "off", duration_kimg=2 * BATCH / 1000, tensorboard=False))
    assert not event_files(tmp_path / "off") and len(rows(tmp_path / "off")) == 2
    capsys.readouterr()
    argv = ["train", "--outdir", str(tmp_path / "cli"), "--device", "cpu", "--dry-run"]
    assert cli.main(argv + ["--no-tensorboard"]) == 0
    assert json.loads(capsys.readouterr().out)["tensorboard"] is False
    assert cli.main(argv) == 0 and json.loads(capsys.readouterr().out)["tensorboard"] is True


def test_without_the_tensorboard_package_the_log_says_so_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import fails
    run_training(**options(tmp_path, duration_kimg=3 * BATCH / 1000))
    log = (tmp_path / "log.txt").read_text()
    assert log.count("tensorboard: the package is not installed") == 1 and not event_files(tmp_path)
    assert len(rows(tmp_path)) == 3


def test_eval_rows_equal_a_separate_fid_calc_of_each_snapshot(evaluated_run, ref, digits_cache, capsys):
    run_dir, scored = evaluated_run
    history = eval_history(run_dir)
    assert [(tick, kimg) for tick, kimg, _ in history] == [(0, 0.016), (3, 0.064), (5, 0.096)]
    # the last network scored is the run's (final) snapshot file
    final = load_network(os.path.join(run_dir, "network-snapshot-000000.safetensors"))
    assert all(
        torch.equal(a, b) for a, b in zip(final.state_dict().values(), load_network(scored[-1]).state_dict().values())
    )
    for (_, _, scores), network in zip(history, scored):
        argv = [
            "fid",
            "calc",
            "--network",
            network,
            "--ref",
            ref,
            "--features",
            "digits",
            "--digits-cache",
            digits_cache,
        ]
        argv += ["--num-images", "24", "--steps", "3", "--batch", "8", "--device", "cpu"]
        assert cli.main(argv) == 0
        separate = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert scores == {"Eval/FDD": separate["FDD"]}  # the same bits
    assert history[-1][2]["Eval/FDD"] < history[0][2]["Eval/FDD"]  # it trains
    saved = json.loads((run_dir / "training_options.json").read_text())["eval"]
    assert saved["metrics"] == ["fid"] and saved["images"] == 24 and saved["seeds"] == "0-23"


KILLED_RUN = """
import json, sys
from pfgmpp_fast.evaluation.in_training import SnapshotEvaluator
from pfgmpp_fast.training.train import run_training
options, ref, evaluation = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
run_training(**options, evaluator=SnapshotEvaluator(ref, **evaluation))
"""


def test_kill_and_resume_keep_the_eval_history_exact(evaluated_run, tmp_path, ref, digits_cache):
    """Killed in tick 5's step (tick 4's rows written after the tick-3 state), then --resume auto:
    the stats.jsonl rows and TensorBoard's scalars (Eval and loss) are the uninterrupted run's."""
    uninterrupted, _ = evaluated_run
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PFGMPP_FAST_KILL_AT_STEP": "5"}
    argv = [sys.executable, "-c", KILLED_RUN, json.dumps(options(run_dir, snap_ticks=3, dump_ticks=3)), ref]
    argv.append(json.dumps({**EVAL, "digits_cache": digits_cache}))
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stdout + proc.stderr  # SIGKILL
    assert [r["Progress/tick"]["mean"] for r in rows(run_dir) if not is_eval_row(r)] == [0, 1, 2, 3, 4]
    evaluator = SnapshotEvaluator(ref, digits_cache=digits_cache, **EVAL)
    run_training(**options(run_dir, snap_ticks=3, dump_ticks=3, resume="auto"), evaluator=evaluator)
    assert eval_history(run_dir) == eval_history(uninterrupted)
    losses = [[r["Loss/loss"]["mean"] for r in rows(d) if not is_eval_row(r)] for d in (run_dir, uninterrupted)]
    assert losses[0] == losses[1] and len(losses[0]) == STEPS
    got, want = tensorboard_scalars(run_dir), tensorboard_scalars(uninterrupted)
    assert len(event_files(run_dir)) == 2 and set(got) == set(want)
    for tag in ("Eval/FDD", "Loss/loss", "Progress/kimg", "Progress/tick"):
        assert got[tag] == want[tag], tag  # the killed attempt's tick-4 events are purged


def _two_rank_worker(rank, run_dir, ref, digits_cache):
    evaluator = SnapshotEvaluator(ref, digits_cache=digits_cache, **EVAL)
    run_training(**options(run_dir, duration_kimg=2 * BATCH / 1000, snap_ticks=5), evaluator=evaluator)


def test_two_ranks_give_the_eval_of_one_rank(tmp_path, ref, digits_cache, capsys):
    """Every rank takes part (the grid batches are shared out); the numbers are those of a
    one-process `fid calc` of the snapshot (calc.py: identical by construction)."""
    run_dir = str(tmp_path / "run")
    run_ranks(_two_rank_worker, 2, tmp_path / "ranks", run_dir, ref, digits_cache)
    history = eval_history(run_dir)
    assert [tick for tick, _, _ in history] == [0, 1]
    snapshot = os.path.join(run_dir, "network-snapshot-000000.safetensors")
    argv = ["fid", "calc", "--network", snapshot, "--ref", ref, "--features", "digits", "--digits-cache", digits_cache]
    assert cli.main(argv + ["--num-images", "24", "--steps", "3", "--batch", "8", "--device", "cpu"]) == 0
    separate = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert history[-1][2] == {"Eval/FDD": separate["FDD"]}
    assert len(event_files(run_dir)) == 1  # rank 0 only


@pytest.mark.parametrize(
    "extra, option, message",
    [
        (["--eval-images", "50"], "--eval-ref", "is required with --eval-images"),
        (["--eval-ref", "{missing}"], "--eval-ref", "no such reference statistics file"),
        (["--eval-ref", "{ref}", "--eval-metrics", "fid,bogus"], "--eval-metrics", "subset of fid,kid,isc,prc"),
        (["--eval-ref", "{ref}", "--eval-metrics", "fd_dinov2"], "--eval-metrics", "subset of fid,kid,isc,prc"),
        (["--eval-ref", "{ref}", "--eval-images", "0"], "--eval-images", "must be an integer >= 2"),
        (["--eval-ref", "{ref}", "--eval-images", "x"], "--eval-images", "must be an integer >= 2"),
        (["--eval-ref", "{ref}"], "--eval-ref", "64-d statistics but the feature extractor gives 2048-d"),
        (
            ["--eval-ref", "{ref}", "--eval-features", "digits", "--eval-metrics", "kid"],
            "--eval-ref",
            "fid ref --metrics kid",
        ),
        (
            ["--eval-ref", "{ref}", "--eval-features", "digits", "--eval-metrics", "isc"],
            "--eval-metrics",
            "needs the inception",
        ),
        (["--eval-ref", "{ref}", "--eval-features", "vgg"], "--eval-features", "invalid choice"),
    ],
)
def test_eval_option_errors_exit_2_naming_the_option(tmp_path, ref, capsys, extra, option, message):
    argv = ["train", "--outdir", str(tmp_path / "run"), "--device", "cpu", "--dry-run"]
    extra = [e.format(ref=ref, missing=tmp_path / "missing.npz") for e in extra]
    assert cli.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert option in err and message in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "run")


def test_eval_options_reach_the_dry_run_and_need_snapshots(tmp_path, ref, digits_cache, capsys):
    argv = ["train", "--outdir", str(tmp_path / "run"), "--device", "cpu", "--dry-run", "--eval-ref", ref]
    argv += ["--eval-features", "digits", "--eval-images", "100", "--eval-digits-cache", digits_cache]
    assert cli.main(argv) == 0
    resolved = json.loads(capsys.readouterr().out)["eval"]
    assert resolved["images"] == 100 and resolved["features"] == "digits" and resolved["metrics"] == ["fid"]
    evaluator = SnapshotEvaluator(ref, features="digits", digits_cache=digits_cache)
    with pytest.raises(ValueError, match="snap_ticks") as info:
        run_training(**options(tmp_path / "nosnap"), evaluator=evaluator)  # tiny_run_options: snap_ticks=None
    assert info.value.name == "snap_ticks" and not os.path.exists(tmp_path / "nosnap")
    assert math.isfinite(evaluator.reference["mu"].sum())
