"""Nothing wrong goes unreported (issue 14): digests of snapshots and states, byte-identical
snapshot files (issue 16.3), non-finite training stops without a bad snapshot, resume cleans
temp files and duplicate stats rows, FID shards record every setting that changes the images."""

import json
import os
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
import torch
from helpers import tiny_run_options

from pfgmpp_fast import checkpoint as ck
from pfgmpp_fast import cli
from pfgmpp_fast.training.options import TrainingError
from pfgmpp_fast.training.run_files import find_latest_state
from pfgmpp_fast.training.train import run_training
from pfgmpp_fast.utils import io_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_NET = dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])


def _net(seed=0):
    from pfgmpp_fast.networks import build_network

    torch.manual_seed(seed)
    return build_network("ddpmpp", resolution=8, channels=1, D=8, dropout=0.0, **TINY_NET)


def tiny(run_dir, steps, batch=8, **extra):
    return tiny_run_options(run_dir, steps, batch, extra.pop("network", TINY_NET), **extra)


def _flip(path, offset, count):
    data = bytearray(open(path, "rb").read())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


# ----------------------------------------------------------------------------------------
# Digests and byte-identical files


def test_snapshot_digest_detects_flipped_weights(tmp_path):
    path = tmp_path / "net.safetensors"
    ck.save_network(path, _net())
    bad = tmp_path / "bad.safetensors"
    shutil.copy(path, bad)
    _flip(bad, os.path.getsize(bad) - 1200, 1000)  # inside the tensor data
    with pytest.raises(ValueError, match="SHA-256") as err:
        ck.load_network(bad)
    assert str(bad) in str(err.value)
    # a file without a digest (written before digests existed) still loads
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert len(meta.pop("sha256")) == 64
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata=meta)
    for k, v in ck.load_network(old).state_dict().items():
        assert torch.equal(v, _net().state_dict()[k])


def test_identical_networks_give_identical_files(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for _ in range(3):
        ck.save_network(a, _net(), extra_metadata={"kimg": 1.5, "seed": 3, "D": 8})
        ck.save_network(b, _net(), extra_metadata={"seed": 3, "D": 8, "kimg": 1.5})
        assert a.read_bytes() == b.read_bytes()
    for k, v in ck.load_network(a).state_dict().items():
        assert torch.equal(v, _net().state_dict()[k])


def _state_data_offset(path):
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        n, m = np.frombuffer(f.read(4), dtype="<u2")
    return info.header_offset + 30 + int(n) + int(m)


def test_state_digest_detects_flipped_bytes_and_resume_skips_it(tmp_path):
    state = {"net": _net().state_dict(), "cur_nimg": 64, "options": {"lr": 1e-3}, "ids": {0: torch.arange(3)}}
    good = tmp_path / "training-state-000000.pt"
    io_utils.atomic_torch_save_state(good, state)
    loaded = io_utils.load_torch_state(good)
    assert io_utils.DIGEST_KEY not in loaded and loaded["cur_nimg"] == 64
    newer = tmp_path / "training-state-000001.pt"
    shutil.copy(good, newer)
    _flip(newer, _state_data_offset(newer) + 8, 16)
    with pytest.raises(ValueError, match="SHA-256") as err:
        io_utils.load_torch_state(newer)
    assert str(newer) in str(err.value)
    logs = []
    assert find_latest_state(str(tmp_path), log=logs.append) == str(good)
    assert any("skipping" in m and "000001" in m for m in logs)
    plain = tmp_path / "plain.pt"  # no digest: an older file, loads unchecked
    torch.save({"cur_nimg": 1, "net": {}}, plain)
    assert io_utils.load_torch_state(plain)["cur_nimg"] == 1


# ----------------------------------------------------------------------------------------
# Non-finite training


def test_huge_lr_stops_with_an_error_and_no_bad_snapshot(tmp_path):
    with pytest.raises(TrainingError, match="non-finite"):
        run_training(**tiny(tmp_path, steps=6, lr=1e30, snap_ticks=1, max_nonfinite=100))
    snaps = [f for f in os.listdir(tmp_path) if f.startswith("network-snapshot")]
    assert snaps  # tick 0 (lr 0 during the ramp-up) is fine
    for name in snaps:
        net = ck.load_network(tmp_path / name)
        assert max(float(v.abs().max()) for v in net.state_dict().values() if v.is_floating_point()) < 1e3
    log = open(tmp_path / "log.txt").read()
    assert "no network snapshot this tick" in log


def test_nonfinite_weights_stop_at_once_and_are_never_written(tmp_path):
    with pytest.raises(TrainingError, match="weights became non-finite"):
        run_training(**tiny(tmp_path, steps=4, lr=1e39, lr_rampup_kimg=0, snap_ticks=1))
    assert not [f for f in os.listdir(tmp_path) if f.startswith("network-snapshot")]
    net = _net()
    with torch.no_grad():
        next(net.parameters())[0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        ck.save_network(tmp_path / "inf.safetensors", net)
    assert not (tmp_path / "inf.safetensors").exists()


# ----------------------------------------------------------------------------------------
# Resume: temp files and duplicate stats rows; a failed start leaves no folder


def test_resume_removes_temp_files_and_duplicate_stats_rows(tmp_path):
    run_training(**tiny(tmp_path, steps=3, dump_ticks=1))
    state = tmp_path / "training-state-000000.pt"
    kept = tmp_path.parent / (tmp_path.name + "-tick2.pt")
    shutil.copy(state, kept)
    run_training(**tiny(tmp_path, steps=6, dump_ticks=1, resume="auto"))
    shutil.copy(kept, state)  # as if killed after tick 5's stats row
    (tmp_path / ".training-state-000000.pt.x1.tmp").write_bytes(b"half")
    (tmp_path / ".network-snapshot-000000.safetensors.x2.tmp").write_bytes(b"")
    with open(tmp_path / "stats.jsonl", "a") as f:
        f.write('{"Progress/tick": {"num": 1, "mean": 6, "torn')  # a torn last line
    run_training(**tiny(tmp_path, steps=6, dump_ticks=1, resume="auto"))
    assert not [f for f in os.listdir(tmp_path) if io_utils.is_temp_file(f)]
    ticks = [json.loads(line)["Progress/tick"]["mean"] for line in open(tmp_path / "stats.jsonl")]
    assert ticks == [0, 1, 2, 3, 4, 5]


def test_failed_start_leaves_no_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        run_training(**tiny(tmp_path / "run", steps=1, data=str(tmp_path / "nonexistent")))
    assert not (tmp_path / "run").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(FileNotFoundError):
        run_training(**tiny(existing, steps=1, data=str(tmp_path / "nonexistent")))
    assert existing.is_dir()  # a folder the user made stays


# ----------------------------------------------------------------------------------------
# FID shards: settings that change the images are part of the configuration


def test_fid_resume_under_another_net_dtype_is_refused(tmp_path, capsys):
    path = str(tmp_path / "net.safetensors")
    ck.save_network(path, _net())
    cache = str(tmp_path / "digits.safetensors")
    common = [
        "fid",
        "calc",
        "--network",
        path,
        "--num-images",
        "8",
        "--shard-size",
        "4",
        "--steps",
        "2",
        "--batch",
        "4",
        "--features",
        "digits",
        "--digits-cache",
        cache,
        "--outdir",
        str(tmp_path / "o"),
        "--device",
        "cpu",
    ]
    assert cli.main(common + ["--net-dtype", "fp32"]) == 0
    assert cli.main(common + ["--net-dtype", "fp32"]) == 0
    assert "resumed from disk" in capsys.readouterr().out
    (tmp_path / "o" / "stats-4-7.npz").unlink()  # killed before the last shard
    for name in (".stats-4-7.npz.a1.tmp", ".stats.npz.b2.tmp", ".result.json.c3.tmp"):
        (tmp_path / "o" / name).write_bytes(b"half a file")
    assert cli.main(common + ["--net-dtype", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and '"net_dtype": "bf16"' in err
    assert not [f for f in os.listdir(tmp_path / "o") if io_utils.is_temp_file(f)]


def test_threads_option(tmp_path):
    path = str(tmp_path / "net.safetensors")
    ck.save_network(path, _net())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert (
            cli.main(
                [
                    "generate",
                    "--network",
                    path,
                    "--seeds",
                    "0",
                    "--steps",
                    "1",
                    "--npz",
                    str(tmp_path / "o.npz"),
                    "--device",
                    "cpu",
                    "--threads",
                    "1",
                ]
            )
            == 0
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_readme_outputs_are_ignored_by_git():
    if not os.path.exists(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    names = ["samples.npz", "refs/digits.npz", "fid/stats.npz", "runs/x/log.txt"]
    out = subprocess.run(["git", "check-ignore", *names], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.split() == names
