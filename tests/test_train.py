"""The training loop: convergence, fast vs reference path, ranks, kill/resume, bad inputs."""

import argparse
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import tiny_run_options

from pfgmpp_fast import ops
from pfgmpp_fast.apps.train_command import add_arguments, main
from pfgmpp_fast.checkpoint import find_latest_snapshot
from pfgmpp_fast.training.options import TrainingError
from pfgmpp_fast.training.run_files import drop_stats_after, find_latest_state
from pfgmpp_fast.training.train import run_training
from pfgmpp_fast.utils import io_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_NET = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
FUSED_BACKEND = "cpu" if ops.has_extension() else "triton"


def tiny(run_dir, steps, batch=16, **extra):
    """Options of a tiny CPU run: one tick per step, `steps` steps."""
    options = dict(arch="ddpmpp", D=128, ema_halflife_kimg=0.1, augment=0.12, seed=3)
    options.update(extra)
    return tiny_run_options(run_dir, steps, batch, options.pop("network", TINY_NET), **options)


def read_stats(run_dir):
    with open(os.path.join(run_dir, "stats.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_state(run_dir):
    return io_utils.load_torch_state(os.path.join(run_dir, "training-state-000000.pt"))


def assert_states_equal(a, b, exact=True, atol=0.0):
    for part in ("net", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            if exact:
                assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
            else:
                torch.testing.assert_close(a[part][k], b[part][k], atol=atol, rtol=1e-4, msg=f"{part}.{k}")
    for idx, s in a["optimizer"]["state"].items():
        for k, v in s.items():
            if exact:
                assert torch.equal(v, b["optimizer"]["state"][idx][k]), f"optimizer {idx}.{k} differs"
    assert a["cur_nimg"] == b["cur_nimg"]


def run_subprocess(options, env_extra=None, rank=None, world=None, port=None):
    code = (
        "import json, sys; from pfgmpp_fast.training.train import run_training; run_training(**json.loads(sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    if rank is not None:
        env.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    env.update(env_extra or {})
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(options)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc, expect=0):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == expect, out
    return out


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks: one thread avoids oversubscribing the 2 CI cores (and is deterministic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------


def test_loss_falls_on_digits(tmp_path):
    run = run_training(**tiny(tmp_path, steps=60, batch=32, snap_ticks=60, dump_ticks=60, backend="auto"))
    stats = read_stats(run)
    assert len(stats) == 60
    losses = torch.tensor([s["Loss/loss"]["mean"] for s in stats])
    assert torch.isfinite(losses).all()
    first, last = losses[:8].mean(), losses[-12:].mean()
    assert last < 0.75 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert stats[-1]["Progress/kimg"]["mean"] == pytest.approx(60 * 32 / 1000)
    for key in (
        "Timing/sec_per_kimg",
        "Timing/sec_per_tick",
        "Timing/total_sec",
        "Resources/peak_gpu_mem_gb",
        "Perf/img_per_sec",
        "Progress/tick",
    ):
        assert set(stats[-1][key]) == {"num", "mean", "std"}
    files = os.listdir(run)
    assert {
        "training_options.json",
        "log.txt",
        "stats.jsonl",
        "training-state-000001.pt",
        "network-snapshot-000001.safetensors",
    } <= set(files), files
    options = json.load(open(os.path.join(run, "training_options.json")))
    assert options["batch"] == 32 and options["network_config"]["augment_dim"] == 9
    # The snapshot holds the EMA weights in the safe format.
    from safetensors.torch import load_file

    assert find_latest_snapshot(run) == os.path.join(run, "network-snapshot-000001.safetensors")
    snap = load_file(os.path.join(run, "network-snapshot-000001.safetensors"))
    state = io_utils.load_torch_state(os.path.join(run, "training-state-000001.pt"))
    assert snap.keys() == state["ema"].keys()
    for k in snap:
        assert torch.equal(snap[k], state["ema"][k])


EDM_STATS = (
    "Loss/loss",
    "Progress/tick",
    "Progress/kimg",
    "Timing/total_sec",
    "Timing/sec_per_tick",
    "Timing/sec_per_kimg",
    "Timing/maintenance_sec",
    "Resources/cpu_mem_gb",
    "Resources/peak_gpu_mem_gb",
    "Resources/peak_gpu_mem_reserved_gb",
)


def test_stats_rows_have_edms_form_and_summarise_the_step_losses(tmp_path):
    """Each stats.jsonl row is EDM's training_stats row ({name: {num, mean, std}} + timestamp, read
    with EDM's key path row["Loss/loss"]["mean"]); a tick's Loss/loss is num/mean/std of the
    per-element losses of its steps, as the same run with one step per tick reports them."""
    per_step = read_stats(run_training(**tiny(tmp_path / "steps", steps=7, batch=8)))
    ticks = read_stats(run_training(**tiny(tmp_path / "ticks", steps=7, batch=8, tick_kimg=3 * 8 / 1000)))
    for row in per_step + ticks:
        assert set(row) >= set(EDM_STATS) | {"timestamp"} and isinstance(row["timestamp"], float)
        for name, stat in row.items():
            if name != "timestamp":
                assert set(stat) == {"num", "mean", "std"}, name
                assert isinstance(stat["num"], int) and isinstance(stat["mean"], float), name
        assert row["Progress/tick"]["num"] == 1 and row["Progress/tick"]["std"] == 0.0
        assert row["Loss/loss_per_image"]["mean"] == pytest.approx(row["Loss/loss"]["mean"] * 64, rel=1e-12)
    step_losses = [row["Loss/loss"]["mean"] for row in per_step]
    assert [row["Loss/loss"]["num"] for row in per_step] == [1] * 7
    assert all(row["Loss/loss"]["std"] == 0.0 for row in per_step) and len(set(step_losses)) == 7
    # tick 0 is the first step, then ticks of 3 steps
    assert [row["Progress/tick"]["mean"] for row in ticks] == [0, 1, 2]
    for row, part in zip(ticks, (step_losses[:1], step_losses[1:4], step_losses[4:])):
        part = np.array(part)
        assert row["Loss/loss"]["num"] == len(part)
        assert row["Loss/loss"]["mean"] == pytest.approx(part.mean(), rel=1e-12)
        assert row["Loss/loss"]["std"] == pytest.approx(part.std(), rel=1e-6, abs=1e-12)  # EDM: population std
    assert ticks[1]["Loss/loss"]["std"] > 0


def test_resume_reads_stats_rows_of_both_forms(tmp_path):
    """drop_stats_after keeps rows of ticks before the resumed one, in EDM's form and in the
    plain form of older versions alike, and drops torn lines."""
    path = tmp_path / "stats.jsonl"
    rows = [
        {"Progress/tick": 0},
        {"Progress/tick": {"num": 1, "mean": 1, "std": 0.0}},
        {"Progress/tick": {"num": 1, "mean": 2, "std": 0.0}},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"Progress/tick": {"nu')
    drop_stats_after(str(path), 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]


def test_fast_path_matches_reference_path(tmp_path):
    """Fused loss (C++ or Triton kernels) on the fast network (make_fast: channels-last, SDPA
    attention; fp32 so that one seed gives comparable curves) vs reference.training_loss on
    the eager fp32 NCHW network."""
    runs = {}
    for backend in (FUSED_BACKEND, "reference"):
        fast = backend != "reference"
        runs[backend] = run_training(
            **tiny(tmp_path / backend, steps=6, backend=backend, dump_ticks=6, channels_last=fast)
        )
    options = json.load(open(os.path.join(runs[FUSED_BACKEND], "training_options.json")))
    assert options["resolved_channels_last"] is True
    fast = [s["Loss/loss"]["mean"] for s in read_stats(runs[FUSED_BACKEND])]
    ref = [s["Loss/loss"]["mean"] for s in read_stats(runs["reference"])]
    assert len(fast) == len(ref) == 6
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(ref), rtol=1e-4, atol=0)
    a = io_utils.load_torch_state(os.path.join(runs[FUSED_BACKEND], "training-state-000000.pt"))
    b = io_utils.load_torch_state(os.path.join(runs["reference"], "training-state-000000.pt"))
    assert_states_equal(a, b, exact=False, atol=1e-5)


def test_two_gloo_ranks_equal_one_process(tmp_path):
    steps, batch = 3, 16
    single = tiny(tmp_path / "single", steps, batch=batch, batch_gpu=batch // 2, dump_ticks=steps, augment=0.5)
    proc = run_subprocess(single)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    multi = {**single, "run_dir": str(tmp_path / "multi"), "batch_gpu": None}
    ranks = [run_subprocess(multi, rank=r, world=2, port=port) for r in range(2)]
    finish(proc)
    for p in ranks:
        finish(p)
    options = json.load(open(tmp_path / "multi" / "training_options.json"))
    assert options["world_size"] == 2 and options["batch_gpu_resolved"] == batch // 2
    a, b = read_state(tmp_path / "single"), read_state(tmp_path / "multi")
    assert a["cur_nimg"] == b["cur_nimg"] == steps * batch
    # up to rounding, not bit for bit: one process accumulates the two half-batches' gradients,
    # DDP all-reduces the ranks' gradients (another summation order, ~1e-7 relative)
    assert_states_equal(a, b, exact=False, atol=1e-6)
    la = [s["Loss/loss"]["mean"] for s in read_stats(tmp_path / "single")]
    lb = [s["Loss/loss"]["mean"] for s in read_stats(tmp_path / "multi")]
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    finish(run_subprocess(tiny(run_dir, steps=8, dump_ticks=2, dropout=0.1, deterministic=True)))
    return run_dir


@pytest.mark.parametrize("where", ["step", "checkpoint_write"])
def test_kill_and_resume_is_exact(tmp_path, uninterrupted, where):
    options = tiny(tmp_path, steps=8, dump_ticks=2, dropout=0.1, deterministic=True)
    if where == "step":
        env = {"PFGMPP_FAST_KILL_AT_STEP": "5"}  # newest state: after tick 4
    else:  # the 3rd state write (tick 6) is killed
        env = {"PFGMPP_FAST_KILL_DURING_WRITE": "training-state-", "PFGMPP_FAST_KILL_DURING_WRITE_SKIP": "2"}
    finish(run_subprocess(options, env), expect=-9)
    state = io_utils.load_torch_state(os.path.join(tmp_path, "training-state-000000.pt"))
    assert state["cur_nimg"] == 5 * 16  # the old state survived
    if where == "checkpoint_write":
        temps = [f for f in os.listdir(tmp_path) if io_utils.is_temp_file(f)]
        assert len(temps) == 1 and temps[0].startswith(".training-state-")
    assert find_latest_state(str(tmp_path)) == os.path.join(tmp_path, "training-state-000000.pt")
    out = finish(run_subprocess({**options, "resume": "auto"}))
    assert "continuing from" in out and "kimg 0.080" in out
    assert_states_equal(read_state(tmp_path), read_state(uninterrupted), exact=True)
    assert read_stats(tmp_path)[-1]["Progress/kimg"]["mean"] == pytest.approx(0.128)


# ----------------------------------------------------------------------------------------
# Bad inputs: each a clear error, before any step


def test_bad_inputs(tmp_path, uninterrupted):
    base = tiny(tmp_path / "run", steps=2)
    with pytest.raises(FileNotFoundError, match="data set not found"):
        run_training(**{**base, "data": str(tmp_path / "nope.zip")})
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(ValueError, match="zip"):
        run_training(**{**base, "data": str(corrupt)})
    with pytest.raises(ValueError, match="resolution 8, but resolution=32"):
        run_training(**{**base, "resolution": 32})
    for D in (0, -3, float("nan")):
        with pytest.raises(ValueError, match=r"D must be in \(0, inf\]"):
            run_training(**{**base, "D": D})
    with pytest.raises(ValueError, match="batch_gpu"):
        run_training(**{**base, "batch_gpu": 5})
    with pytest.raises(TypeError, match="unknown training option"):
        run_training(**{**base, "learning_rate": 1})
    assert not os.path.exists(tmp_path / "run" / "stats.jsonl")
    # Resume with an incompatible configuration.
    state = os.path.join(uninterrupted, "training-state-000000.pt")
    with pytest.raises(ValueError, match=r"incompatible configuration:\n  D: state has 128.0, this run has 64.0"):
        run_training(**{**tiny(tmp_path / "r2", steps=8, dump_ticks=2, dropout=0.1), "D": 64, "resume": state})
    # A corrupt training state named explicitly.
    bad_state = tmp_path / "training-state-000001.pt"
    bad_state.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt"):
        run_training(**{**base, "resume": str(bad_state)})
    assert not os.path.exists(tmp_path / "run" / "stats.jsonl")
    # --resume auto skips a corrupt newest state and temp files, and takes the newest intact one.
    auto_dir = tmp_path / "auto"
    auto_dir.mkdir()
    (auto_dir / "training-state-000000.pt").write_bytes(open(state, "rb").read())
    (auto_dir / "training-state-000007.pt").write_bytes(b"truncated")
    (auto_dir / ".training-state-000009.pt.abc.tmp").write_bytes(open(state, "rb").read())
    assert find_latest_state(str(auto_dir), log=lambda m: None) == str(auto_dir / "training-state-000000.pt")


def test_nonfinite_losses_are_skipped_then_stop(tmp_path):
    # P_mean = 1000: σ = e^1000 = inf, every loss is non-finite.
    with pytest.raises(TrainingError, match="non-finite loss"):
        run_training(**tiny(tmp_path, steps=6, P_mean=1000.0, max_nonfinite=2, dump_ticks=1))
    stats = read_stats(tmp_path)
    assert [s["Loss/nonfinite_steps"]["mean"] for s in stats] == [1, 2, 3]
    # EDM's empty statistic: no finite step, so num 0 and NaN mean/std
    assert all(s["Loss/loss"]["num"] == 0 and math.isnan(s["Loss/loss"]["mean"]) for s in stats)
    # No update was applied: the network still equals its initialisation... and is finite.
    state = io_utils.load_torch_state(os.path.join(tmp_path, "training-state-000000.pt"))
    assert all(torch.isfinite(v).all() for v in state["net"].values())
    assert all(int(s["step"]) == 0 for s in state["optimizer"]["state"].values())


def test_a_step_with_a_nonfinite_gradient_is_skipped_and_counted(tmp_path, monkeypatch):
    """A NaN in one parameter's gradient under a finite loss: the update is skipped on the
    device (Adam's found_inf) and counted with the non-finite steps; training goes on."""
    from pfgmpp_fast.training.loop import TrainingRun

    accumulate = TrainingRun._accumulate_gradients

    def poisoned(self, step_index):
        step_loss = accumulate(self, step_index)
        if step_index == 1:
            self.params[len(self.params) // 2].grad.view(-1)[-1] = float("nan")
        return step_loss

    monkeypatch.setattr(TrainingRun, "_accumulate_gradients", poisoned)
    run_training(**tiny(tmp_path, steps=3, dump_ticks=3))
    stats = read_stats(tmp_path)
    assert [s["Loss/nonfinite_steps"]["mean"] for s in stats] == [0, 1, 1]
    assert [s["Loss/loss"]["num"] for s in stats] == [1, 0, 1]
    state = read_state(tmp_path)
    assert all(torch.isfinite(v).all() for v in state["net"].values())
    assert all(int(s["step"]) == 2 for s in state["optimizer"]["state"].values())  # 3 steps, 1 skipped


def test_cli_dry_run_defaults_are_the_published_recipe(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert main(parser.parse_args(["--dry-run"])) == 0
    o = json.loads(capsys.readouterr().out)
    # D: the published train.py's default (--pfgmpp off) is EDM diffusion, D = inf
    expected = dict(
        batch=512,
        lr=1e-3,
        ema_halflife_kimg=500.0,
        lr_rampup_kimg=10000.0,
        ema_rampup_ratio=0.05,
        dropout=0.13,
        augment=0.12,
        duration_mimg=200.0,
        D=float("inf"),
        arch="ddpmpp",
        tick_kimg=50.0,
        snap_ticks=50,
        dump_ticks=500,
        P_mean=-1.2,
        P_std=1.2,
        sigma_data=0.5,
    )
    assert {k: o[k] for k in expected} == expected
    assert main(parser.parse_args(["--dry-run", "--aug_dim", "128", "--cres", "1,2"])) == 0
    o = json.loads(capsys.readouterr().out)
    assert o["D"] == 128.0 and o["network"] == {"channel_mult": [1, 2]}
    from pfgmpp_fast import cli

    assert cli.main(["train", "--dry-run", "--D", "0"]) == 2  # refused while parsing, naming the option
    assert "argument --D: D must be in (0, inf]" in capsys.readouterr().err


def test_transfer_from_a_snapshot(tmp_path):
    run_training(**tiny(tmp_path / "a", steps=2, snap_ticks=1))
    snap = tmp_path / "a" / "network-snapshot-000000.safetensors"
    from pfgmpp_fast.checkpoint import load_network

    source = load_network(str(snap))  # our format loads without code execution
    # Step 0 has lr = 0 (ramp-up from 0), so after one step the weights are the transferred ones.
    run_training(**tiny(tmp_path / "b", steps=1, transfer=str(snap), dump_ticks=1))
    state = read_state(tmp_path / "b")
    for k, v in source.state_dict().items():
        assert torch.equal(state["net"][k], v), k
    with pytest.raises(ValueError, match="does not match the network"):
        run_training(**tiny(tmp_path / "c", steps=1, transfer=str(snap), network={**TINY_NET, "model_channels": 16}))
    pickled = tmp_path / "published.pkl"
    import pickle

    pickled.write_bytes(pickle.dumps({"ema": None}))
    with pytest.raises(ValueError, match="pickle"):
        run_training(**tiny(tmp_path / "d", steps=1, transfer=str(pickled)))
