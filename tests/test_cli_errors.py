"""Every bad command-line input gives one clear message naming the option, a non-zero exit code
(2 for usage errors, 1 for runtime failures) and never a traceback (issue 14, the command line)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pfgmpp_fast import cli
from pfgmpp_fast.checkpoint import save_network
from pfgmpp_fast.evaluation import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = '{"model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}'


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from pfgmpp_fast.networks import build_network

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    net = build_network(
        "ddpmpp",
        resolution=8,
        channels=1,
        D=8,
        model_channels=8,
        channel_mult=[1],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
    )
    save_network(root / "net.safetensors", net)
    (root / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "file").write_text("a file, not a folder")
    torch.save({"w": torch.ones(2)}, root / "weights.pt")
    np.savez(root / "imgs.npz", images=np.zeros((4, 8, 8, 1), np.uint8))
    (root / "bad-ref.npz").write_bytes(b"not an npz")
    ref = root / "ref.npz"
    metrics.save_stats(ref, np.zeros(64), np.eye(64))
    return root


def _cases(f):
    net, rnd, under_file = str(f / "net.safetensors"), str(f / "random.bin"), str(f / "file" / "sub")
    gen = ["generate", "--network", net, "--seeds", "0-1", "--steps", "2", "--npz", str(f / "o.npz"), "--device", "cpu"]
    calc = [
        "fid",
        "calc",
        "--network",
        net,
        "--num-images",
        "4",
        "--steps",
        "2",
        "--features",
        "digits",
        "--dest",
        str(f / "s.npz"),
        "--device",
        "cpu",
    ]
    train = [
        "train",
        "--outdir",
        str(f / "run"),
        "--data",
        "digits",
        "--batch",
        "8",
        "--duration",
        "0.00008",
        "--network",
        TINY,
        "--augment",
        "0",
        "--device",
        "cpu",
        "--dry-run",
    ]
    sweep = [
        "fid",
        "sweep",
        "--ref",
        str(f / "ref.npz"),
        "--features",
        "digits",
        "--outdir",
        str(f / "sw"),
        "--device",
        "cpu",
    ]
    return [  # (argv, text the message must contain (the option), exit code)
        (gen + ["--batch", "0"], "--batch", 2),
        (gen + ["--steps", "0"], "--steps", 2),
        (gen + ["--sigma-min", "-1"], "--sigma-min", 2),
        (gen + ["--sigma-max", "nan"], "--sigma-max", 2),
        (gen + ["--rho", "0"], "--rho", 2),
        (gen + ["--alpha", "nan"], "--alpha", 2),
        (gen + ["--class", "3"], "--class", 2),
        (gen + ["--backend", "bogus"], "--backend", 2),
        (gen + ["--device", "cuda:7"], "--device", 2),
        (gen + ["--seeds", "abc"], "--seeds", 2),
        (gen + ["--seeds", "5-1"], "--seeds", 2),
        (gen + ["--D", "0"], "--D", 2),
        (gen + ["--D", "64"], "--D", 2),
        (gen + ["--sigma-min", "100", "--sigma-max", "80"], "--sigma-min", 2),
        (gen + ["--S-churn", "-1"], "--S-churn", 2),
        (gen + ["--net-dtype", "int8"], "--net-dtype", 2),
        (gen + ["--solver", "rk4"], "--solver", 2),
        (gen + ["--threads", "-1"], "--threads", 2),
        (gen + ["--network", str(f / "missing.safetensors")], "--network", 2),
        (gen + ["--network", rnd], "--network", 2),
        (gen + ["--network", str(f / "weights.pt")], "--network", 2),  # a pickle without --trust-pickle
        (["generate", "--npz", str(f / "o.npz")], "--network", 2),
        (["generate", "--network", net], "--npz", 2),
        (gen + ["--outdir", under_file], "--outdir", 2),
        (gen + ["--npz", under_file + ".npz"], "--npz", 2),
        (["convert", str(f / "missing.pkl"), str(f / "c.safetensors"), "--trust-pickle"], "SRC", 2),
        (["convert", rnd, str(f / "c.safetensors"), "--trust-pickle"], "SRC", 2),
        (["convert", str(f / "weights.pt"), str(f / "c.safetensors")], "SRC", 2),
        (["convert", str(f / "weights.pt"), under_file, "--trust-pickle"], "DST", 2),
        (train + ["--network", "{bad json"], "--network", 2),
        (train + ["--network", "[1, 2]"], "--network", 2),
        (train + ["--cres", "a,b"], "--cres", 2),
        (train + ["--outdir", under_file], "--outdir", 2),
        (train + ["--data", str(f / "nonexistent")], "--data", 2),
        (train + ["--lr", "nan"], "--lr", 2),
        (train + ["--batch", "0"], "--batch", 2),
        (train + ["--D", "0"], "--D", 2),
        (train + ["--device", "cuda:7"], "--device", 2),
        (train + ["--dropout", "2"], "--dropout", 2),
        (train + ["--resume", str(f / "nonexistent.pt")], "--resume", 2),
        (train + ["--transfer", str(f / "nonexistent.safetensors")], "--transfer", 2),
        (train + ["--arch", "unet9"], "--arch", 2),
        (train + ["--threads", "x"], "--threads", 2),
        (["fid"], "calc", 2),
        (["fid", "calc"], "--network", 2),
        (["fid", "calc", "--images", str(f / "imgs.npz")], "--dest", 2),
        (calc + ["--num-images", "0"], "--num-images", 2),
        (calc + ["--shard-size", "0"], "--shard-size", 2),
        (calc + ["--dest", under_file + ".npz"], "--dest", 2),
        (calc + ["--outdir", under_file], "--outdir", 2),
        (calc + ["--network", rnd], "--network", 2),
        (calc + ["--seeds", "0-2"], "--num-images", 2),
        (calc + ["--features", "digits", "--digits-cache", rnd], "--digits-cache", 2),
        (
            [
                "fid",
                "ref",
                "--data",
                "digits",
                "--dest",
                str(f / "r.npz"),
                "--features",
                "digits",
                "--digits-cache",
                rnd,
            ],
            "--digits-cache",
            2,
        ),
        (["fid", "ref", "--data", "digits", "--dest", under_file + ".npz", "--features", "digits"], "--dest", 2),
        (
            [
                "fid",
                "ref",
                "--data",
                str(f / "nonexistent"),
                "--dest",
                str(f / "r.npz"),
                "--features",
                "digits",
                "--digits-cache",
                rnd,
            ],
            "--data",
            2,
        ),
        (sweep + ["--kind", "steps", "--values", "2,4"], "--network", 2),
        (sweep + ["--kind", "checkpoints"], "--run-dir", 2),
        (sweep + ["--kind", "steps", "--network", net, "--values", "a,b"], "--values", 2),
        (sweep + ["--kind", "warp"], "--kind", 2),
        (["bogus-command"], "bogus-command", 2),
    ]


def test_bad_inputs_give_one_clear_message(files, capsys, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("arguments must be checked before any download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    cases = _cases(files)
    assert len(cases) >= 40
    failures = []
    for argv, option, code in cases:
        rc = cli.main(argv)
        out = capsys.readouterr()
        text = out.out + out.err
        if os.environ.get("SHOW_CLI_ERRORS"):
            print(
                f"{rc} {' '.join(argv[:2])} ... {' '.join(argv[-2:])}\n    {out.err.strip()[-240:]}",
                file=sys.__stdout__,
            )
        if rc != code or "Traceback" in text or option not in out.err:
            failures.append(f"{argv[:2]}...{argv[-2:]}: rc={rc} (expected {code}), stderr={out.err.strip()[-300:]!r}")
    assert not failures, "\n".join(failures)


def test_offline_inception_names_the_option(files, capsys, monkeypatch, tmp_path):
    import urllib.error

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    rc = cli.main(
        [
            "fid",
            "calc",
            "--images",
            str(files / "imgs.npz"),
            "--num-images",
            "4",
            "--dest",
            str(tmp_path / "s.npz"),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "--inception-weights" in err and "Traceback" not in err


def test_runtime_failure_exit_1_and_debug_traceback(files, capsys, monkeypatch, tmp_path):
    """A failure while running (here a non-finite sampler output) is exit 1 with one line; an
    unexpected exception names the debug switch, which shows the traceback."""
    from pfgmpp_fast.evaluation import generate

    def broken(*a, **k):
        raise FloatingPointError("sampling produced NaN/Inf for seeds [0]")

    monkeypatch.setattr(generate, "generate_images", broken)
    argv = [
        "generate",
        "--network",
        str(files / "net.safetensors"),
        "--npz",
        str(tmp_path / "o.npz"),
        "--device",
        "cpu",
    ]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.strip() == "error: sampling produced NaN/Inf for seeds [0]"

    def bug(*a, **k):
        raise KeyError("oops")

    monkeypatch.setattr(generate, "generate_images", bug)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "unexpected KeyError" in err and "PFGMPP_FAST_DEBUG=1" in err and "Traceback" not in err
    monkeypatch.setenv("PFGMPP_FAST_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(argv)


def test_cli_imports_only_the_command_that_runs():
    code = (
        "import sys; from pfgmpp_fast import cli; cli.build_parser('convert').parse_args(['convert', 'a', 'b']); "
        "mods = [m for m in ('pfgmpp_fast.evaluation.fid', 'pfgmpp_fast.training.options', "
        "'pfgmpp_fast.apps.demo', 'pfgmpp_fast.apps.bench') if m in sys.modules]; print(mods)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# ----------------------------------------------------------------------------------------
# Named errors: a command names its option from the field an error carries, never from its text


def test_train_options_name_their_command_line_spelling(files, capsys):
    """The field is mapped to the option the user typed (--phema-snap, not the field
    phema_snap_kimg); a field name that only labels the message is replaced by the option."""
    train = ["train", "--outdir", str(files / "run"), "--batch", "8", "--device", "cpu", "--dry-run"]
    cases = [
        (["--phema-snap", "0"], "--phema-snap: phema_snap_kimg must be in (0, inf), got 0.0"),
        (["--ema", "0"], "--ema: ema_halflife_kimg must be in (0, inf), got 0.0"),
        (["--lr-rampup", "-1"], "--lr-rampup: lr_rampup_kimg must be in [0, inf), got -1.0"),
        (["--augment", "1.5"], "--augment: augment must be in [0, 1], got 1.5"),
        (["--seed", "-3"], "--seed: seed must be in [0, inf), got -3"),
        (["--D", "0"], "--D: D must be in (0, inf]"),
        (["--resume", str(files / "missing.pt")], f"--resume: no such training state {files / 'missing.pt'}"),
        (["--phema", "0.5"], "--phema: "),
    ]
    for extra, expected in cases:
        assert cli.main(train + extra) == 2, extra
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, (extra, err)  # argparse says "argument --D: ..."


def test_usage_error_never_rewrites_its_message():
    from pfgmpp_fast.utils.cli_errors import InvalidValue, UsageError, blame

    assert str(UsageError("--seeds", "seeds: 5-1")) == "--seeds: seeds: 5-1"
    named = InvalidValue("seeds", "range '5-1' is empty (end < start)", sep=": ")
    assert str(named) == "seeds: range '5-1' is empty (end < start)"
    assert str(UsageError.about("--seeds", named)) == "--seeds: range '5-1' is empty (end < start)"
    assert str(UsageError.about("--data", ValueError("data: as written"))) == "--data: data: as written"
    with pytest.raises(UsageError, match=r"^--D: D must be in \(0, inf\]") as info:
        with blame("--D"):
            from pfgmpp_fast.checks import parse_D

            parse_D("0")
    assert info.value.option == "--D"


def test_checkers_raise_errors_that_name_the_argument(files):
    from pfgmpp_fast import checks
    from pfgmpp_fast.checkpoint import load_network
    from pfgmpp_fast.training.options import resolve_options
    from pfgmpp_fast.utils.cli_errors import InvalidArgument, InvalidType, InvalidValue, MissingFile

    cases = [
        (lambda: checks.check_number("lr", float("nan")), InvalidValue, "lr", "must be in (0, inf), got nan"),
        (lambda: checks.check_number("batch", "x", integer=True), InvalidType, "batch", "must be an integer, got 'x'"),
        (lambda: checks.check_D(0), InvalidValue, "D", None),
        (lambda: checks.parse_D("many"), InvalidValue, "D", None),
        (lambda: checks.as_bool("cond", "maybe"), InvalidValue, "cond", "must be a boolean, got 'maybe'"),
        (lambda: checks.parse_int_list("5-1", "seeds"), InvalidValue, "seeds", "range '5-1' is empty (end < start)"),
        (lambda: checks.check_seeds([1, 1]), InvalidValue, "seeds", None),
        (lambda: checks.check_key(-1), InvalidValue, "key", None),
        (lambda: resolve_options(arch="unet9"), InvalidValue, "arch", None),
        (lambda: resolve_options(dropout=2), InvalidValue, "dropout", "must be in [0, 1], got 2.0"),
        (lambda: resolve_options(network="[1"), InvalidValue, "network", None),
        (lambda: resolve_options(phema="0.5"), InvalidValue, "phema", None),
        (lambda: resolve_options(resume=str(files / "missing.pt")), MissingFile, "resume", None),
        (lambda: load_network(files / "net.safetensors", D=64), InvalidValue, "D", None),
    ]
    for call, kind, name, detail in cases:
        with pytest.raises(kind) as info:
            call()
        exc = info.value
        assert isinstance(exc, InvalidArgument) and exc.name == name, (name, exc)
        assert exc.detail and exc.detail in str(exc) and (detail is None or exc.detail == detail), (name, exc)
    # they stay the built-in kinds the API documents
    assert issubclass(InvalidValue, ValueError) and issubclass(InvalidType, TypeError)
    assert issubclass(MissingFile, FileNotFoundError)


def test_device_report_hint_can_depend_on_the_bad_rows():
    from pfgmpp_fast.checks import DeviceReport

    report = DeviceReport()
    t = torch.zeros(4, 2)
    t[1, 0] = t[3, 1] = float("nan")
    report.nonfinite("x", t, torch.arange(10, 14), hint=lambda rows: f" (rows {rows})")
    with pytest.raises(FloatingPointError, match=r"^x contains NaN/Inf for sample_ids \[11, 13\] \(rows \[1, 3\]\)$"):
        report.raise_if_any()
