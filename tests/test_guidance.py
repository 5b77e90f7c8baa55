"""Guidance (pfgmpp_fast/guidance.py, sampler.sample(guidance=, gnet=)): D_G + W·(D − D_G) with
another network (autoguidance) or the same network without labels (classifier-free guidance,
one batched call), against the combined denoiser sampled as a plain callable and against
reference.sample."""

import math

import numpy as np
import pytest
import torch
from op_helpers import rel_err

import pfgmpp_fast as pf
from pfgmpp_fast import reference as R
from pfgmpp_fast.networks import build_network
from pfgmpp_fast.sampler import UNCOND, SamplerOptions

D = 8.0
SEEDS = torch.tensor([0, 1, 5, 2**40])
KEY = 3


def _net(seed, label_dim=0, sigma_data=0.5, D=D):
    """A 1x8x8 DDPM++ with random (not zero-initialised) weights, so every input matters."""
    torch.manual_seed(seed)
    net = build_network(
        "ddpmpp",
        resolution=8,
        channels=1,
        label_dim=label_dim,
        D=D,
        model_channels=8,
        channel_mult=[1],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
        sigma_data=sigma_data,
    ).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.requires_grad_(False)


def _labels(label_dim=4):
    return torch.nn.functional.one_hot(SEEDS % label_dim, label_dim).float()


def _latents():
    return R.prior((len(SEEDS), 1, 8, 8), D, 80.0, KEY, SEEDS, dtype=torch.float32)


def _sample(net, **kw):
    kw.setdefault("num_steps", 4)
    return pf.sample(net, _latents(), D, KEY, SEEDS, **kw)


def _combined(net, gnet, W, uncond=False):
    """The guided denoiser as a plain callable (D = EDMPrecond.forward)."""

    def denoiser(x, sigma, labels):
        guide_labels = torch.zeros_like(labels) if uncond else labels
        return torch.lerp(gnet(x, sigma, guide_labels).float(), net(x, sigma, labels).float(), W)

    return denoiser


class Bomb(torch.nn.Module):
    """A guide that must never be called."""

    D = D

    def forward(self, *args):
        raise AssertionError("the guide was called")


class Counting(torch.nn.Module):
    """An EDMPrecond-like wrapper that records the batch size and labels of every raw call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []
        self.D, self.sigma_data, self.label_dim = net.D, net.sigma_data, net.label_dim

    def raw(self, x_in, c_noise, class_labels=None):
        self.calls.append((x_in.shape[0], None if class_labels is None else class_labels.clone()))
        return self.net.raw(x_in, c_noise, class_labels)


def test_guidance_is_a_checked_sampler_option():
    assert SamplerOptions().guidance == 1.0 and SamplerOptions(guidance=2).guidance == 2.0
    assert "guidance" not in SamplerOptions().describe()  # old shard configurations stay valid
    assert SamplerOptions(guidance=1.5).describe()["guidance"] == 1.5
    for bad in (-0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"guidance must be in \[0, inf\), got"):
            SamplerOptions(guidance=bad)
    with pytest.raises(TypeError, match="guidance must be a number, got 'x'"):
        SamplerOptions().replace(guidance="x")


@pytest.mark.parametrize("label_dim", [0, 4])
def test_guidance_one_is_bit_identical_and_never_calls_the_guide(label_dim):
    net = _net(0, label_dim)
    labels = _labels() if label_dim else None
    plain = _sample(net, class_labels=labels)
    for gnet in (Bomb(), _net(1, label_dim), UNCOND if label_dim else None):
        assert torch.equal(_sample(net, class_labels=labels, guidance=1.0, gnet=gnet), plain)


@pytest.mark.parametrize("W", [0.0, 0.5, 2.0, 4.0])
def test_the_network_as_its_own_guide_gives_the_unguided_images(W):
    net = _net(0, 4)
    plain = _sample(net, class_labels=_labels())
    guided = _sample(net, class_labels=_labels(), guidance=W, gnet=net)
    assert rel_err(guided, plain) < 1e-5


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("W", [0.0, 1.7, 3.0])
def test_autoguidance_equals_the_combined_denoiser(W, backend):
    net, gnet = _net(0), _net(1)
    guided = _sample(net, guidance=W, gnet=gnet, backend=backend)
    as_callable = _sample(_combined(net, gnet, W), backend=backend)
    ref = R.sample(_combined(net, gnet, W), _latents(), D, KEY, SEEDS, num_steps=4, dtype=torch.float32)
    assert rel_err(guided, as_callable) < 1e-5 and rel_err(guided, ref) < 1e-5
    assert rel_err(guided, _sample(net)) > 1e-3 or W == 1.0  # guidance changed the images


@pytest.mark.parametrize("solver", ["dpmpp2m", "ipndm", "euler"])
def test_every_solver_samples_the_guided_denoiser(solver):
    net, gnet = _net(0, 4), _net(1, 4)
    for guide, uncond in ((gnet, False), (UNCOND, True)):
        guided = _sample(net, class_labels=_labels(), guidance=2.0, gnet=guide, solver=solver, num_steps=5)
        combined = _combined(net, net if uncond else gnet, 2.0, uncond=uncond)
        as_callable = _sample(combined, class_labels=_labels(), solver=solver, num_steps=5)
        assert rel_err(guided, as_callable) < 1e-5


@pytest.mark.parametrize("W", [0.0, 2.5])
def test_classifier_free_guidance_equals_the_combined_denoiser(W):
    net = _net(0, 4)
    guided = _sample(net, class_labels=_labels(), guidance=W, gnet=UNCOND, S_churn=2.0)
    ref = R.sample(
        _combined(net, net, W, uncond=True),
        _latents(),
        D,
        KEY,
        SEEDS,
        num_steps=4,
        S_churn=2.0,
        class_labels=_labels(),
        dtype=torch.float32,
    )
    assert rel_err(guided, ref) < 1e-5
    assert rel_err(guided, _sample(net, class_labels=_labels(), S_churn=2.0)) > 1e-3
    if W == 0.0:  # W = 0 is the guide alone: the network without labels
        assert rel_err(guided, _sample(net, class_labels=torch.zeros(4, 4), S_churn=2.0)) < 1e-5


def test_classifier_free_guidance_is_one_network_call_on_the_doubled_batch():
    counting = Counting(_net(0, 4))
    _sample(counting, class_labels=_labels(), guidance=2.0, gnet=UNCOND, num_steps=3)  # Heun: 5 evaluations
    assert [b for b, _ in counting.calls] == [8] * 5
    labels = counting.calls[0][1]
    assert torch.equal(labels[:4], _labels()) and torch.equal(labels[4:], torch.zeros(4, 4))
    counting.calls.clear()
    _sample(counting, class_labels=_labels(), num_steps=3)  # unguided: B per call
    assert [b for b, _ in counting.calls] == [4] * 5


def test_autoguidance_calls_each_network_once_per_evaluation():
    net, gnet = Counting(_net(0, 4)), Counting(_net(1))
    _sample(net, class_labels=_labels(), guidance=2.0, gnet=gnet, num_steps=3, solver="euler")
    assert [b for b, _ in net.calls] == [4] * 3 and [b for b, _ in gnet.calls] == [4] * 3


def test_a_guide_with_other_preconditioning_guides_through_the_denoisers():
    net, gnet = _net(0), _net(1, sigma_data=0.7)  # c_skip/c_out differ: the combination is of D, not F
    guided = _sample(net, guidance=2.0, gnet=gnet)
    assert rel_err(guided, _sample(_combined(net, gnet, 2.0))) < 1e-5


@pytest.mark.parametrize(
    "net_kw,gnet,message",
    [
        ({}, None, r"gnet: is needed with guidance=2"),
        ({}, UNCOND, r"gnet: 'uncond' \(classifier-free guidance\) needs a class-conditional network"),
        (
            {"label_dim": 4},
            "unconditional",
            r"gnet must be a network, a denoiser callable or 'uncond', got 'unconditional'",
        ),
        ({}, "other-D", r"gnet: D=8 was given but the network was trained with D=128"),
    ],
)
def test_bad_guides_are_named(net_kw, gnet, message):
    gnet = _net(1, D=128.0) if gnet == "other-D" else gnet
    with pytest.raises(ValueError, match=message):
        _sample(_net(0, **net_kw), guidance=2.0, gnet=gnet)
    with pytest.raises(TypeError, match="gnet must be a network, a denoiser callable or 'uncond', got int"):
        _sample(_net(0), guidance=2.0, gnet=3)


# ----------------------------------------------------------------------------------------
# Label dropout in training (train --label-dropout P): Philox stream STREAM_LABEL_DROPOUT


def test_label_dropout_mask_is_a_function_of_key_and_sample_id():
    from pfgmpp_fast.training.augment import drop_labels, label_dropout_mask

    ids = torch.arange(200_000, dtype=torch.int64) * 7 + 2**33
    mask = label_dropout_mask(11, ids, 0.2)
    assert abs(mask.float().mean().item() - 0.2) < 0.005  # rate ≈ P (σ ≈ 0.0009)
    assert torch.equal(label_dropout_mask(11, ids[5::13].flip(0), 0.2), mask[5::13].flip(0))  # any batch, order
    assert not torch.equal(label_dropout_mask(12, ids, 0.2), mask)  # the key matters
    assert torch.equal(label_dropout_mask(11, ids, 0.1) & mask, label_dropout_mask(11, ids, 0.1))  # nested in P
    assert not label_dropout_mask(11, ids, 0.0).any() and label_dropout_mask(11, ids, 1.0).all()
    # the spec: u0 of block 0 of the stream, counter (0, id low, id high, STREAM_LABEL_DROPOUT)
    u = R.uniform(R.philox4x32(torch.tensor([[0, 5, 1, R.STREAM_LABEL_DROPOUT]]), 11))[0, 0]
    assert bool(label_dropout_mask(11, torch.tensor([5 + 2**32]), 0.5)[0]) == bool(u <= 0.5)
    labels = torch.nn.functional.one_hot(torch.arange(8) % 3, 3).float()
    dropped = drop_labels(labels, 11, ids[:8], 0.5)
    keep = ~label_dropout_mask(11, ids[:8], 0.5)
    assert torch.equal(dropped[keep], labels[keep]) and not dropped[~keep].any() and (~keep).any()


def test_training_drops_the_labels_of_the_masked_samples(tmp_path, monkeypatch):
    from pfgmpp_fast.training import loss_module
    from pfgmpp_fast.training.augment import label_dropout_mask
    from pfgmpp_fast.training.train import run_training

    seen = []
    forward = loss_module.LossModule.forward

    def spy(self, y, sample_ids, labels, augment_labels):
        seen.append((sample_ids.clone(), labels.clone()))
        return forward(self, y, sample_ids, labels, augment_labels)

    monkeypatch.setattr(loss_module.LossModule, "forward", spy)
    o = dict(
        data="digits",
        cond=True,
        arch="ddpmpp",
        D=128,
        batch=32,
        duration_kimg=0.064,
        tick_kimg=0.032,
        network=dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[]),
        snap_ticks=None,
        dump_ticks=None,
        dropout=0.0,
        augment=0.0,
        precision="fp32",
        compile=False,
        channels_last=False,
        progress=False,
        seed=3,
        device="cpu",
    )
    run_training(run_dir=str(tmp_path / "p"), label_dropout=0.5, **o)
    ids = torch.cat([i for i, _ in seen])
    labels = torch.cat([lab for _, lab in seen])
    dropped = label_dropout_mask(3, ids, 0.5)
    assert len(ids) == 64 and 10 < int(dropped.sum()) < 54
    assert not labels[dropped].any() and torch.equal(labels[~dropped].sum(1), torch.ones(int((~dropped).sum())))
    seen.clear()
    run_training(run_dir=str(tmp_path / "none"), **o)  # default 0: every label kept
    assert all(torch.equal(lab.sum(1), torch.ones(len(lab))) for _, lab in seen)


def test_label_dropout_option_errors(capsys):
    from pfgmpp_fast import cli
    from pfgmpp_fast.training.options import resolve_options

    with pytest.raises(ValueError, match=r"label_dropout must be in \[0, 1\], got 1.5"):
        resolve_options(cond=True, label_dropout=1.5)
    with pytest.raises(ValueError, match=r"label_dropout = 0.2 needs cond"):
        resolve_options(label_dropout=0.2)
    assert resolve_options(cond=True, label_dropout=0.1).label_dropout == 0.1
    assert cli.main(["train", "--label-dropout", "0.2", "--dry-run"]) == 2
    assert "--label-dropout" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# Command line (generate / fid --guidance W --gnet PATH|uncond) and the guidance sweep


@pytest.fixture()
def saved(tmp_path):
    from pfgmpp_fast.checkpoint import save_network

    paths = {}
    for name, net in (("cond", _net(0, 4)), ("small", _net(1)), ("plain", _net(0)), ("d128", _net(2, D=128.0))):
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_network(paths[name], net)
    return paths


def test_cli_generate_with_guidance_equals_the_api(tmp_path, saved):
    from pfgmpp_fast import cli
    from pfgmpp_fast.checkpoint import load_network
    from pfgmpp_fast.evaluation.generate import generate_images

    common = ["generate", "--seeds", "0-5", "--steps", "3", "--batch", "6", "--no-progress"]
    for gnet, path in (("uncond", saved["cond"]), (saved["small"], saved["plain"])):
        npz = str(tmp_path / "g.npz")
        assert cli.main([*common, "--network", path, "--guidance", "2.5", "--gnet", gnet, "--npz", npz]) == 0
        net = load_network(path)
        guide = UNCOND if gnet == "uncond" else load_network(gnet)
        api = torch.cat(
            [im for _, im in generate_images(net, list(range(6)), 6, num_steps=3, guidance=2.5, gnet=guide)]
        )
        assert np.array_equal(np.load(npz)["images"], api.permute(0, 2, 3, 1).numpy())
        unguided = torch.cat([im for _, im in generate_images(net, list(range(6)), 6, num_steps=3)])
        assert not torch.equal(api, unguided)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--guidance", "-1"], "--guidance"),
        (["--guidance", "nan"], "--guidance"),
        (["--guidance", "2"], "--gnet: is required with --guidance 2"),
        (["--guidance", "2", "--gnet", "missing.safetensors"], "--gnet"),
        (
            ["--guidance", "2", "--gnet", "uncond", "--network", "plain"],
            "--gnet: 'uncond' (classifier-free guidance) needs a class-conditional network",
        ),
        (["--guidance", "2", "--gnet", "d128"], "--gnet"),
    ],
)
def test_cli_guidance_errors_name_the_option(tmp_path, saved, capsys, args, message):
    from pfgmpp_fast import cli

    args = [saved.get(a, a) for a in args]
    network = [] if "--network" in args else ["--network", saved["cond"]]
    rc = cli.main(["generate", *network, *args, "--seeds", "0-1", "--steps", "2", "--npz", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "x.npz").exists()


def test_guidance_sweep_on_a_tiny_network(tmp_path, saved, digits, digits_cache, capsys):
    from pfgmpp_fast import cli
    from pfgmpp_fast.evaluation import calc, metrics
    from pfgmpp_fast.evaluation import sweep as sweep_engine

    ref = calc.reference_stats("digits", digits, batch_size=500)
    net = _net(0, 4)
    rows = sweep_engine.sweep(
        "guidance",
        [1.0, 3.0],
        net=net,
        gnet=UNCOND,
        ref=ref,
        extractor=digits,
        seeds="0-15",
        outdir=str(tmp_path / "api"),
        batch_size=16,
        num_steps=2,
        log=lambda s: None,
    )
    assert [r["value"] for r in rows] == [1.0, 3.0] and rows[0]["FDD"] != rows[1]["FDD"]
    # W = 1 is the unguided point
    plain = calc.calc_stats(calc.GeneratorSource(net, "0-15", num_steps=2), digits, batch_size=16)
    assert abs(metrics.frechet_distance(*plain.mean_cov(), *ref) - rows[0]["FDD"]) < 1e-9
    with pytest.raises(ValueError, match="kind='guidance' needs gnet"):
        sweep_engine.sweep("guidance", [2.0], net=net, ref=ref, extractor=digits, seeds="0-3", log=lambda s: None)
    ref_path = str(tmp_path / "ref.npz")
    metrics.save_stats(ref_path, *ref)
    common = [
        "fid",
        "sweep",
        "--kind",
        "guidance",
        "--network",
        saved["cond"],
        "--steps",
        "2",
        "--batch",
        "16",
        "--features",
        "digits",
        "--digits-cache",
        digits_cache,
        "--ref",
        ref_path,
        "--seeds",
        "0-15",
    ]
    assert cli.main([*common, "--values", "1,3", "--gnet", "uncond", "--outdir", str(tmp_path / "cli")]) == 0
    csv = open(tmp_path / "cli" / "sweep-guidance.csv").read().splitlines()
    assert len(csv) == 3 and csv[1].startswith("guidance,1.0,") and csv[2].startswith("guidance,3.0,")
    assert (tmp_path / "cli" / "sweep-guidance.png").stat().st_size > 0
    assert cli.main([*common, "--values", "1,3", "--outdir", str(tmp_path / "cli2")]) == 2
    assert "--gnet: is required for --kind guidance" in capsys.readouterr().err


def test_fid_shards_record_the_guide():
    from pfgmpp_fast.evaluation import calc

    net = _net(0, 4)
    describe = lambda **kw: calc.GeneratorSource(net, "0-3", num_steps=2, **kw).describe()  # noqa: E731
    assert "gnet" not in describe() and describe(guidance=1.0, gnet=_net(1)) == describe()  # W = 1: no guide
    cfg, auto = describe(guidance=2.0, gnet=UNCOND), describe(guidance=2.0, gnet=_net(1))
    assert cfg["gnet"] == "uncond" and cfg["guidance"] == 2.0
    assert auto["gnet"] == calc.weights_fingerprint(_net(1)) != describe(guidance=2.0, gnet=_net(2))["gnet"]
