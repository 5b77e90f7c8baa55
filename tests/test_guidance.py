"""Guidance (pfgmpp_fast/guidance.py, sampler.sample(guidance=, gnet=)): D_G + W·(D − D_G) with
another network (autoguidance) or the same network without labels (classifier-free guidance,
one batched call), against the combined denoiser sampled as a plain callable and against
reference.sample."""
import math

import pytest
import torch

import pfgmpp_fast as pf
from pfgmpp_fast import reference as R
from pfgmpp_fast.networks import build_network
from pfgmpp_fast.sampler import UNCOND, SamplerOptions

from op_helpers import rel_err

D = 8.0
SEEDS = torch.tensor([0, 1, 5, 2**40])
KEY = 3


def _net(seed, label_dim=0, sigma_data=0.5, D=D):
    """A 1x8x8 DDPM++ with random (not zero-initialised) weights, so every input matters."""
    torch.manual_seed(seed)
    net = build_network("ddpmpp", resolution=8, channels=1, label_dim=label_dim, D=D, model_channels=8,
                        channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0,
                        sigma_data=sigma_data).eval()
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
    assert "guidance" not in SamplerOptions().describe()              # old shard configurations stay valid
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
    assert rel_err(guided, _sample(net)) > 1e-3 or W == 1.0          # guidance changed the images


@pytest.mark.parametrize("W", [0.0, 2.5])
def test_classifier_free_guidance_equals_the_combined_denoiser(W):
    net = _net(0, 4)
    guided = _sample(net, class_labels=_labels(), guidance=W, gnet=UNCOND, S_churn=2.0)
    ref = R.sample(_combined(net, net, W, uncond=True), _latents(), D, KEY, SEEDS, num_steps=4, S_churn=2.0,
                   class_labels=_labels(), dtype=torch.float32)
    assert rel_err(guided, ref) < 1e-5
    assert rel_err(guided, _sample(net, class_labels=_labels(), S_churn=2.0)) > 1e-3
    if W == 0.0:   # W = 0 is the guide alone: the network without labels
        assert rel_err(guided, _sample(net, class_labels=torch.zeros(4, 4), S_churn=2.0)) < 1e-5


def test_classifier_free_guidance_is_one_network_call_on_the_doubled_batch():
    counting = Counting(_net(0, 4))
    _sample(counting, class_labels=_labels(), guidance=2.0, gnet=UNCOND, num_steps=3)   # Heun: 5 evaluations
    assert [b for b, _ in counting.calls] == [8] * 5
    labels = counting.calls[0][1]
    assert torch.equal(labels[:4], _labels()) and torch.equal(labels[4:], torch.zeros(4, 4))
    counting.calls.clear()
    _sample(counting, class_labels=_labels(), num_steps=3)                               # unguided: B per call
    assert [b for b, _ in counting.calls] == [4] * 5


def test_autoguidance_calls_each_network_once_per_evaluation():
    net, gnet = Counting(_net(0, 4)), Counting(_net(1))
    _sample(net, class_labels=_labels(), guidance=2.0, gnet=gnet, num_steps=3, solver="euler")
    assert [b for b, _ in net.calls] == [4] * 3 and [b for b, _ in gnet.calls] == [4] * 3


def test_a_guide_with_other_preconditioning_guides_through_the_denoisers():
    net, gnet = _net(0), _net(1, sigma_data=0.7)      # c_skip/c_out differ: the combination is of D, not F
    guided = _sample(net, guidance=2.0, gnet=gnet)
    assert rel_err(guided, _sample(_combined(net, gnet, 2.0))) < 1e-5


@pytest.mark.parametrize("net_kw,gnet,message", [
    ({}, None, r"guidance=2 needs a guide network gnet"),
    ({}, UNCOND, r"gnet='uncond' \(classifier-free guidance\) needs a class-conditional network"),
    ({"label_dim": 4}, "unconditional", r"gnet must be a network, a denoiser callable or 'uncond', got 'unconditional'"),
    ({}, "other-D", r"gnet: D=8 was given but the network was trained with D=128"),
])
def test_bad_guides_are_named(net_kw, gnet, message):
    gnet = _net(1, D=128.0) if gnet == "other-D" else gnet
    with pytest.raises(ValueError, match=message):
        _sample(_net(0, **net_kw), guidance=2.0, gnet=gnet)
    with pytest.raises(TypeError, match="gnet must be a network, a denoiser callable or 'uncond', got int"):
        _sample(_net(0), guidance=2.0, gnet=3)
