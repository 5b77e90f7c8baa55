"""The demo: end to end in --short mode (the CI mode), and its pieces."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pfgmpp_fast", "demo", "--short", "--outdir", str(outdir)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return outdir, proc.stdout


def test_short_demo_writes_every_documented_file(short_demo):
    from PIL import Image

    outdir, stdout = short_demo
    for name in (
        "samples.png",
        "loss.png",
        "metrics.json",
        os.path.join("run", "stats.jsonl"),
        os.path.join("run", "log.txt"),
        os.path.join("run", "training_options.json"),
    ):
        assert (outdir / name).is_file(), name
    for name in ("samples.png", "loss.png", "metrics.json", "run"):
        assert str(outdir / name) in stdout, f"the demo does not say where {name} went"
    assert list((outdir / "run").glob("network-snapshot-*.safetensors"))
    grid = np.asarray(Image.open(outdir / "samples.png"))
    # 10x10 digits, 6x upscaled, each framed by 12 px of black in a 72-px cell; 6-px light gaps and border
    assert grid.shape == (2 * 6 + 10 * (72 + 6) - 6, 2 * 6 + 10 * (72 + 6) - 6)
    assert (grid[78:84, :] == 210).all() and (grid[:, 78:84] == 210).all() and (grid[:6] == 210).all()
    assert (grid[6:18, 6:78] == 0).all()  # the frame above the first digit
    assert grid.std() > 10  # not a blank image
    assert Image.open(outdir / "loss.png").size[0] > 100
    # Three summary lines.
    assert any(line.startswith("train :") for line in stdout.splitlines())
    assert any(line.startswith("sample:") for line in stdout.splitlines())
    assert any(line.startswith("FDD   :") for line in stdout.splitlines())


def test_short_demo_trained_beats_untrained(short_demo):
    outdir, _ = short_demo
    m = json.loads((outdir / "metrics.json").read_text())
    fdd = m["fdd"]
    for key in ("trained", "untrained", "heldout_real"):
        assert np.isfinite(fdd[key]) and fdd[key] >= 0, key
    # "Clearly better": at most a third of the untrained network's distance.
    assert fdd["trained"] < fdd["untrained"] / 3, fdd
    assert fdd["images_per_set"] == 360 and len(fdd["trained_sets"]) == 1
    assert m["train"]["img_per_sec"] > 0 and m["sample"]["img_per_sec"] > 0
    assert m["sample"]["nfe"] == 35 and m["D"] == "128" and m["short"] is True
    assert m["train"]["kimg"] >= 12
    assert m["network"]["parameters"] > 0 and "torch" in m["versions"]


def test_short_demo_evaluates_fdd_during_training(short_demo):
    """The run's in-training FDD at every snapshot: Eval/FDD rows of run/stats.jsonl, the same
    curve in metrics.json (and the lower panel of loss.png), from tick 0 to the end."""
    from PIL import Image

    outdir, stdout = short_demo
    m = json.loads((outdir / "metrics.json").read_text())
    curve = m["fdd_during_training"]
    rows = [json.loads(line) for line in (outdir / "run" / "stats.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "Eval/FDD" in r]
    assert curve["fdd"] == [r["Eval/FDD"]["mean"] for r in evals] and len(evals) >= 2
    assert curve["kimg"] == [r["Progress/kimg"]["mean"] for r in evals] and curve["kimg"][-1] == m["train"]["kimg"]
    assert curve["images"] == 120 and curve["seeds"] == "0-119" and curve["num_steps"] == 18
    assert all(np.isfinite(curve["fdd"])) and curve["fdd"][-1] < curve["fdd"][0] / 3
    assert m["train"]["eval_seconds"] == pytest.approx(curve["seconds"], abs=0.02)
    assert f"{curve['fdd'][-1]:.2f})" in [line for line in stdout.splitlines() if line.startswith("train :")][0]
    width, height = Image.open(outdir / "loss.png").size
    assert height > width  # two panels, one above the other
    assert list((outdir / "run").glob("events.out.tfevents.*"))


def test_short_demo_reports_kid_and_precision_recall(short_demo):
    """metrics.json and the summary hold KID and precision/recall (digits feature space) of the
    trained and untrained samples and the held-out digits, computed by compute_metrics."""
    outdir, stdout = short_demo
    m = json.loads((outdir / "metrics.json").read_text())
    ms = m["metric_set"]
    for key in ("trained", "untrained", "heldout_real"):
        assert set(ms[key]) == {"FDD", "KID", "KID_std", "precision_digits", "recall_digits"}, key
        assert all(np.isfinite(v) for v in ms[key].values()), ms[key]
        assert 0 <= ms[key]["precision_digits"] <= 1 and 0 <= ms[key]["recall_digits"] <= 1
    assert len(ms["trained_sets"]) == len(ms["untrained_sets"]) == 1 and ms["images_per_set"] == 360
    # The same FDD as the FDD section (one code path), and the metrics agree on the ordering.
    assert ms["trained"]["FDD"] == pytest.approx(m["fdd"]["trained"], rel=1e-9)
    assert ms["heldout_real"]["FDD"] == pytest.approx(m["fdd"]["heldout_real"], rel=1e-9)
    assert ms["trained"]["KID"] < ms["untrained"]["KID"] / 3
    assert ms["trained"]["precision_digits"] > ms["untrained"]["precision_digits"]
    assert ms["heldout_real"]["precision_digits"] > 0.5 and ms["heldout_real"]["recall_digits"] > 0.5
    line = [line for line in stdout.splitlines() if line.startswith("KID/PR:")]
    assert len(line) == 1 and f"trained KID {ms['trained']['KID']:.3f}" in line[0], stdout[-2000:]


def test_scorer_metrics_match_torch_fidelity():
    """DigitsScorer.metrics is torch-fidelity's KID and precision/recall on the digits features."""
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    from pfgmpp_fast.apps.digits import DigitsScorer, digits_uint8_split

    scorer = DigitsScorer()
    train, heldout = digits_uint8_split()
    images = heldout[:200]
    got = scorer.metrics(images)
    gen, real = scorer.extractor(images).float(), scorer.extractor(train).float()
    kid = kid_features_to_metric(gen, real, kid_subsets=100, kid_subset_size=200, rng_seed=2020, verbose=False)
    prc = prc_features_to_metric(gen, real, verbose=False)
    assert got["KID"] == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-4, abs=1e-6)
    assert got["precision_digits"] == pytest.approx(prc["precision"]) and got["recall_digits"] == pytest.approx(
        prc["recall"]
    )
    assert got["FDD"] == pytest.approx(scorer.fdd(images), rel=1e-9)
    assert [s["FDD"] for s in scorer.metric_sets(heldout)] == [pytest.approx(scorer.floor, rel=1e-9)]


def test_demo_rejects_bad_arguments(tmp_path):
    from pfgmpp_fast import cli

    for argv in (
        ["demo", "--D", "-1"],
        ["demo", "--D", "abc"],
        ["demo", "--duration", "0"],
        ["demo", "--sets", "0"],
        ["demo", "--threads", "-2"],
    ):
        assert cli.main(argv + ["--outdir", str(tmp_path / "x")]) == 2, argv
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_parse_D():
    from pfgmpp_fast.checks import parse_D

    assert parse_D("128") == 128.0 and parse_D("inf") == float("inf") and parse_D("EDM") == float("inf")
    for bad in ("0", "-3", "nan", "x"):
        with pytest.raises(ValueError, match="D must"):
            parse_D(bad)


def test_image_grid_layout():
    from pfgmpp_fast.utils.plots import image_grid

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 1, 8, 8), dtype=np.uint8)
    grid = image_grid(images, cols=3, scale=2, gap=1, gap_value=77)
    assert grid.shape == (3 * 17 - 1, 3 * 17 - 1)
    # Image 4 sits at row 1, column 1, each pixel a 2x2 block.
    np.testing.assert_array_equal(grid[17:33:2, 17:33:2], images[4, 0])
    np.testing.assert_array_equal(grid[18:34:2, 18:34:2], images[4, 0])
    assert (grid[16, :] == 77).all() and (grid[:, 16] == 77).all()  # gaps
    assert (grid[34:, 17:] == 77).all()  # the empty cells after image 6
    with pytest.raises(TypeError):
        image_grid(images.astype(np.float32))
    with pytest.raises(ValueError):
        image_grid(np.zeros((0, 8, 8), np.uint8))


def test_scorer_floor_and_separation():
    from pfgmpp_fast.apps.digits import DigitsScorer, digits_uint8_split

    scorer = DigitsScorer()
    train, heldout = digits_uint8_split()
    assert train.shape == (1437, 1, 8, 8) and heldout.shape == (360, 1, 8, 8)
    noise = torch.randint(0, 256, (360, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert 0 < scorer.floor < scorer.fdd(noise) / 10
    assert scorer.fdd_sets(torch.cat([heldout, heldout[:100]])) == [pytest.approx(scorer.floor)]
    with pytest.raises(ValueError, match="at least 360"):
        scorer.fdd_sets(heldout[:10])
