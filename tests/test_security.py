"""Nothing loaded from a file runs code: a TorchScript archive whose __setstate__ writes a file is
refused by every entry point that reads networks (issue 14, security 1), even with --trust-pickle."""

import shutil
import warnings
from typing import Tuple

import numpy as np
import pytest
import torch

import pfgmpp_fast as pf
from pfgmpp_fast import cli
from pfgmpp_fast.checkpoint import UnsupportedArchiveError
from pfgmpp_fast.evaluation import metrics


def _torchscript_archive(path, marker):
    """A TorchScript module whose __setstate__ (run by torch.jit.load) creates ``marker``."""

    class Payload(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))
            self.marker = str(marker)

        @torch.jit.export
        def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
            return (self.w, self.marker, self.training)

        @torch.jit.export
        def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
            self.w = state[0]
            self.marker = state[1]
            written = torch.from_file(state[1], shared=True, size=4, dtype=torch.uint8)
            written.fill_(65)
            self.training = state[2] and bool(written.sum() >= 0)

        def forward(self, x):
            return x * self.w

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Payload()), str(path))
    return str(path)


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    root = tmp_path_factory.mktemp("payload")
    marker = root / "EXECUTED"
    path = _torchscript_archive(root / "evil.pt", marker)
    with warnings.catch_warnings():  # the archive really runs code when torch loads it
        warnings.simplefilter("ignore")
        torch.jit.load(path)
    assert marker.exists()
    marker.unlink()
    return path, marker


def _refused(rc, capsys, marker):
    err = capsys.readouterr().err
    assert rc != 0 and "TorchScript" in err and "Traceback" not in err, err
    assert not marker.exists()


def test_api_load_network_refuses_torchscript(payload, tmp_path):
    path, marker = payload
    for name in ("net.pt", "network-snapshot-000100.pkl", "net.safetensors"):
        shutil.copy(path, tmp_path / name)
        for trust in (True, False):
            with pytest.raises(UnsupportedArchiveError, match="TorchScript"):
                pf.load_network(tmp_path / name, trust_pickle=trust)
    assert not marker.exists()


def test_convert_refuses_torchscript(payload, tmp_path, capsys):
    path, marker = payload
    _refused(cli.main(["convert", path, str(tmp_path / "out.safetensors"), "--trust-pickle"]), capsys, marker)
    assert not (tmp_path / "out.safetensors").exists()


def test_generate_refuses_torchscript(payload, tmp_path, capsys):
    path, marker = payload
    _refused(
        cli.main(
            [
                "generate",
                "--network",
                path,
                "--trust-pickle",
                "--seeds",
                "0-1",
                "--steps",
                "2",
                "--npz",
                str(tmp_path / "s.npz"),
                "--device",
                "cpu",
            ]
        ),
        capsys,
        marker,
    )


def test_fid_calc_refuses_torchscript(payload, tmp_path, capsys, digits_cache):
    path, marker = payload
    _refused(
        cli.main(
            [
                "fid",
                "calc",
                "--network",
                path,
                "--trust-pickle",
                "--num-images",
                "4",
                "--steps",
                "2",
                "--features",
                "digits",
                "--digits-cache",
                digits_cache,
                "--dest",
                str(tmp_path / "s.npz"),
                "--device",
                "cpu",
            ]
        ),
        capsys,
        marker,
    )


def test_fid_sweep_checkpoints_refuses_torchscript(payload, tmp_path, capsys, digits_cache):
    path, marker = payload
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(path, run_dir / "network-snapshot-000100.pkl")
    ref = str(tmp_path / "ref.npz")
    metrics.save_stats(ref, np.zeros(64), np.eye(64))
    _refused(
        cli.main(
            [
                "fid",
                "sweep",
                "--kind",
                "checkpoints",
                "--run-dir",
                str(run_dir),
                "--trust-pickle",
                "--ref",
                ref,
                "--seeds",
                "0-3",
                "--steps",
                "2",
                "--features",
                "digits",
                "--digits-cache",
                digits_cache,
                "--outdir",
                str(tmp_path / "sw"),
                "--device",
                "cpu",
            ]
        ),
        capsys,
        marker,
    )


def test_train_transfer_refuses_torchscript(payload, tmp_path, capsys):
    path, marker = payload
    run_dir = tmp_path / "run"
    _refused(
        cli.main(
            [
                "train",
                "--outdir",
                str(run_dir),
                "--data",
                "digits",
                "--transfer",
                path,
                "--trust-pickle",
                "--batch",
                "8",
                "--duration",
                "0.00008",
                "--network",
                '{"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}',
                "--augment",
                "0",
                "--device",
                "cpu",
                "--no-progress",
            ]
        ),
        capsys,
        marker,
    )
    assert not run_dir.exists()  # a run that could not start leaves no folder


def test_other_zip_archives_refused(tmp_path):
    import zipfile

    path = tmp_path / "net.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        zf.writestr("archive/extra.py", b"print('hi')")
    with pytest.raises(UnsupportedArchiveError, match="not a torch.save file"):
        pf.load_network(path, trust_pickle=True)
