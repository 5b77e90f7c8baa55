"""SamplerOptions (pfgmpp_fast/sampler.py): one frozen, checked set of sampler settings shared by
sample, Sampler, generate_images, the command line, FID sources and sweeps."""

import argparse
import dataclasses
import json
import math

import pytest
import torch
from helpers import stand_in

import pfgmpp_fast as pf
from pfgmpp_fast import checks
from pfgmpp_fast import reference as R
from pfgmpp_fast.evaluation import calc
from pfgmpp_fast.evaluation import generate as G
from pfgmpp_fast.sampler import SamplerOptions, sampler_options

INF = float("inf")


def test_defaults_are_edms_and_the_options_are_frozen():
    o = pf.SamplerOptions()
    assert (o.num_steps, o.sigma_min, o.sigma_max, o.rho, o.solver) == (18, 0.002, 80.0, 7.0, "heun")
    assert (o.S_churn, o.S_min, o.S_max, o.S_noise, o.alpha) == (0.0, 0.0, INF, 1.0, 0.0)
    assert (o.dtype, o.net_dtype, o.channels_last, o.backend, o.progress) == (torch.float32, None, None, "auto", False)
    assert (o.nfe, o.replace(solver="euler").nfe, SamplerOptions(num_steps=1).nfe) == (35, 18, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.num_steps = 3


@pytest.mark.parametrize(
    "change,exc,message",
    [
        (dict(num_steps=0), ValueError, r"num_steps must be in \(0, inf\), got 0"),
        (dict(num_steps=2.5), TypeError, r"num_steps must be an integer, got 2.5"),
        (dict(sigma_min=-1.0), ValueError, r"sigma_min must be in \(0, inf\), got -1"),
        (dict(sigma_max=1e31), ValueError, r"sigma_max must be in \(0, 1e\+30\], got 1e\+31"),
        (dict(sigma_min=100.0), ValueError, r"sigma_min must be in \(0, sigma_max = 80\], got 100"),
        (dict(rho=0.0), ValueError, r"rho must be in \(0, inf\), got 0"),
        (
            dict(solver="rk4"),
            ValueError,
            r"solver must be one of \('heun', 'euler', 'dpmpp2m', 'ipndm', 'ipndm_v'\), got 'rk4'",
        ),
        (dict(S_churn=-1.0), ValueError, r"S_churn must be a finite number >= 0, got -1"),
        (dict(S_noise=math.nan), ValueError, r"S_noise must be a finite number >= 0, got nan"),
        (dict(alpha=INF), ValueError, r"alpha must be a finite number >= 0, got inf"),
        (dict(S_min=5.0, S_max=1.0), ValueError, r"S_max must be >= S_min, got S_max=1.0, S_min=5.0"),
        (dict(dtype=torch.float16), TypeError, r"dtype must be torch.float32 or torch.float64, got torch.float16"),
        (dict(net_dtype=torch.int32), TypeError, r"net_dtype must be None or one of .*, got torch.int32"),
        (dict(channels_last="maybe"), ValueError, r"channels_last must be a boolean, got 'maybe'"),
        (dict(backend="fastest"), ValueError, r"backend must be one of .*, got 'fastest'"),
        (dict(progress="sometimes"), ValueError, r"progress must be a boolean, got 'sometimes'"),
    ],
)
def test_each_bad_field_is_named_with_its_range(change, exc, message):
    with pytest.raises(exc, match=message):
        SamplerOptions(**change)
    with pytest.raises(exc, match=message):  # replace checks again
        SamplerOptions().replace(**change)


def test_values_are_normalised_once():
    o = SamplerOptions(num_steps=4.0, S_churn=1, S_max=10, channels_last="yes", progress="off")
    assert type(o.num_steps) is int and o.num_steps == 4
    assert type(o.S_churn) is float and type(o.S_max) is float
    assert o.channels_last is True and o.progress is False


def test_unknown_settings_and_a_positional_setting_are_errors():
    with pytest.raises(TypeError, match=r"unknown sampler option\(s\): num_step; known: num_steps, "):
        sampler_options(num_step=3)
    with pytest.raises(TypeError, match="options must be a SamplerOptions, got int"):
        pf.Sampler(8, 0, 18)  # the old positional num_steps
    den = R.optimal_denoiser(torch.randn(4, 1, 3, 3), 8.0)
    with pytest.raises(TypeError, match="unknown sampler option"):
        pf.sample(den, torch.randn(2, 1, 3, 3), 8.0, 0, torch.arange(2), steps=3)


def test_options_and_keywords_give_the_same_images():
    """options=, keyword settings and both (keywords replace fields) are one way to say the same."""
    data = torch.randn(5, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    den = R.optimal_denoiser(data, 8.0)
    seeds = torch.arange(3)
    latents = pf.prior((3, 1, 3, 3), D=8.0, sigma_max=80.0, key=1, seeds=seeds)
    kw = dict(num_steps=5, S_churn=3.0, alpha=0.05, backend="reference")
    by_keywords = pf.sample(den, latents, D=8.0, key=1, seeds=seeds, **kw)  # the README's form
    by_options = pf.sample(den, latents, D=8.0, key=1, seeds=seeds, options=SamplerOptions(**kw))
    mixed = pf.sample(
        den,
        latents,
        8.0,
        1,
        seeds,
        SamplerOptions(num_steps=9, S_churn=3.0, backend="reference"),
        num_steps=5,
        alpha=0.05,
    )
    sampler = pf.Sampler(8.0, 1, SamplerOptions(**kw))
    assert torch.equal(by_keywords, by_options) and torch.equal(by_keywords, mixed)
    assert torch.equal(by_keywords, sampler(den, latents, seeds))
    assert sampler.options == SamplerOptions(**kw) and sampler.sigma_max == 80.0


def test_generate_images_checks_the_options_once(monkeypatch):
    calls = []
    original = checks.check_sampler_options
    monkeypatch.setattr(checks, "check_sampler_options", lambda *a: (calls.append(a), original(*a)))
    out = list(G.generate_images(stand_in(), list(range(7)), 2, num_steps=2))
    assert len(out) == 4 and len(calls) == 1
    options = SamplerOptions(num_steps=2)
    calls.clear()
    a = list(G.generate_images(stand_in(), [3, 4], 2, options=options))
    b = list(G.generate_images(stand_in(), [3, 4], 2, num_steps=2))
    assert torch.equal(a[0][1], b[0][1]) and len(calls) == 1  # only b built new options


def _cli_args(*argv):
    p = argparse.ArgumentParser()
    G.add_arguments(p)
    return p.parse_args(["--network", "net.safetensors", *argv])


def test_command_line_builds_the_options():
    args = _cli_args(
        "--steps",
        "4",
        "--solver",
        "euler",
        "--S-churn",
        "2",
        "--S-max",
        "9",
        "--alpha",
        "0.1",
        "--dtype",
        "fp64",
        "--backend",
        "reference",
        "--class",
        "3",
        "--D",
        "inf",
    )
    assert G.sampler_options_from_args(args) == SamplerOptions(
        num_steps=4, solver="euler", S_churn=2.0, S_max=9.0, alpha=0.1, dtype=torch.float64, backend="reference"
    )
    kw = G.sampler_kwargs_from_args(args)
    assert set(kw) == {"options", "class_idx", "D"} and kw["class_idx"] == 3 and kw["D"] == INF


def test_fid_shard_configuration_of_the_command_line_is_unchanged():
    """The shards' configuration (calc_stats refuses to resume under another one) of a
    command-line source is the one written before SamplerOptions, so those shards still resume."""
    source = calc.GeneratorSource(stand_in(), "0-3", **G.sampler_kwargs_from_args(_cli_args("--steps", "4")))
    assert json.dumps(source.describe(), sort_keys=True) == (
        '{"D": null, "S_churn": 0.0, "S_max": "inf", "S_min": 0.0, "S_noise": 1.0, "alpha": 0.0, '
        '"backend": "auto", "class_idx": null, "dtype": "torch.float32", "num_steps": 4, "rho": 7.0, '
        '"sigma_max": 80.0, "sigma_min": 0.002, "solver": "heun", "source": "generator"}'
    )
    # keywords and options= describe the same source; progress changes no image and is left out
    by_keywords = calc.GeneratorSource(stand_in(), "0-3", num_steps=4, progress=True, class_idx=None)
    assert (
        by_keywords.describe()
        == calc.GeneratorSource(stand_in(), "0-3", options=SamplerOptions(num_steps=4), class_idx=None).describe()
    )
    assert "progress" not in by_keywords.describe()
    with pytest.raises(ValueError, match="num_steps"):  # checked when the source is built
        calc.GeneratorSource(stand_in(), "0-3", num_steps=0)
