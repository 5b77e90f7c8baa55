"""`--rng published`: latents (and random classes) drawn per seed exactly as the published PFGM++
generate.py draws them, and the images of the published sampler (EDM Algorithm 2 in float64)
from them. The published draw is re-stated plainly below (its global generator reseeded per
seed, torch.distributions.Beta, torch.norm) and compared bit for bit with published_rng.py."""

import math

import numpy as np
import pytest
import torch
from helpers import load_npz_images
from torch.distributions import Beta

from pfgmpp_fast import reference as R
from pfgmpp_fast.evaluation import generate as G
from pfgmpp_fast.networks import build_network
from pfgmpp_fast.published_rng import PublishedRNG, check_published_sampling, published_prior
from pfgmpp_fast.sampler import Sampler, SamplerOptions

SEEDS = [0, 1, 7, 4242, 2**32 + 5, 2**40 + 3]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def restated_latents(seeds, shape, D, device, sigma_max=80.0, label_dim=0):
    """The published draw of x_T (float64) and of the random classes, written out plainly."""
    N = math.prod(shape)
    per_seed = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]
    if D == float("inf"):
        x = torch.stack([torch.randn(shape, generator=g, device=device) for g in per_seed]).to(torch.float64)
        x = x * sigma_max
    else:
        rows = []
        with torch.random.fork_rng(devices=[]):  # the test leaves the global RNG as it was
            for s in seeds:
                torch.manual_seed(int(s))
                b = Beta(torch.FloatTensor([N / 2.0]), torch.FloatTensor([D / 2.0])).sample().to(device).double()
                r = torch.sqrt(b / (1 - b)) * (80 if N <= 256 * 256 * 3 else sigma_max) * np.sqrt(D)
                g = torch.randn(N).to(device)
                rows.append((g / torch.norm(g, p=2) * r).reshape(1, *shape))
        x = torch.cat(rows)
    labels = None
    if label_dim:
        labels = torch.stack([torch.randint(label_dim, size=[], generator=g, device=device) for g in per_seed])
    return x, labels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [128.0, 2048.0, float("inf")])
def test_latents_and_classes_are_the_published_draw_bit_for_bit(D, device):
    shape = (3, 8, 8)
    want_x, want_c = restated_latents(SEEDS, shape, D, device, label_dim=10)
    draw = PublishedRNG(SEEDS, device)
    x = draw.prior((len(SEEDS), *shape), D)
    c = draw.class_indices(10)
    assert x.dtype == torch.float64 and x.shape == (len(SEEDS), *shape) and x.device.type == device
    assert torch.equal(x, want_x) and torch.equal(c, want_c)
    # one seed alone gives its image's latent (no batch effect); the caller's RNG is untouched
    state = torch.get_rng_state()
    assert torch.equal(published_prior((1, *shape), D, SEEDS[3:4], device), want_x[3:4])
    assert torch.equal(torch.get_rng_state(), state)
    # a different seed, a different latent; and not our Philox prior
    assert not torch.equal(x[0], x[1])
    if D != float("inf"):  # the radius is the published √(β/(1−β))·80·√D: ‖x‖ ≈ 80·√(N·D/(D−2))
        ratio = x.flatten(1).norm(dim=1) / (80 * math.sqrt(3 * 64 * D / (D - 2)))
        assert ((ratio > 0.8) & (ratio < 1.25)).all()


def test_large_images_take_the_radius_from_sigma_max():
    """The published prior radius is 80 unless N > 256·256·3, then the sampler's σ_max."""
    small = published_prior((1, 3, 256, 256), 128, [5], sigma_max=40.0)
    big = published_prior((1, 3, 256, 257), 128, [5], sigma_max=40.0)
    assert torch.equal(small, restated_latents([5], (3, 256, 256), 128.0, "cpu", sigma_max=40.0)[0])
    assert torch.equal(big, restated_latents([5], (3, 256, 257), 128.0, "cpu", sigma_max=40.0)[0])
    assert big.norm() < 0.6 * small.norm()  # 40 instead of 80 (the same β draws almost)


def published_heun(net, x, labels, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM Algorithm 2 (deterministic Heun) in float64 from x_T, as the published edm_sampler."""
    t = R.time_steps(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64).tolist()
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        sig = torch.full((x.shape[0],), t_cur, dtype=torch.float64)
        d_cur = (x - net(x, sig, labels).to(torch.float64)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            sig = torch.full((x.shape[0],), t_next, dtype=torch.float64)
            d_prime = (x_next - net(x_next, sig, labels).to(torch.float64)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


def small_net(D, label_dim=0):
    torch.manual_seed(1)
    return build_network(
        "ddpmpp",
        resolution=8,
        channels=3,
        D=D,
        label_dim=label_dim,
        model_channels=8,
        channel_mult=[1],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
    ).eval()


@pytest.mark.parametrize("D,label_dim", [(128.0, 0), (float("inf"), 10), (2048.0, 10)])
def test_sampler_from_published_latents_gives_the_published_images(D, label_dim):
    """Our fp32 sampler (fused steps) on the published draw = the float64 published loop, to fp32
    tolerance; through generate_images (rng='published') the uint8 images agree too."""
    net, seeds = small_net(D, label_dim), [3, 11, 2**33 + 1]
    x_T, classes = restated_latents(seeds, (3, 8, 8), D, "cpu", label_dim=label_dim)
    labels = None if classes is None else torch.nn.functional.one_hot(classes, label_dim).float()
    with torch.no_grad():
        want = published_heun(net, x_T, labels, num_steps=5)
    ours = Sampler(D, G.SAMPLING_KEY, num_steps=5)(
        net, PublishedRNG(seeds).prior(x_T.shape, D), torch.tensor(seeds), labels
    )
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    images = torch.cat([im for _, im in G.generate_images(net, seeds, 2, num_steps=5, rng="published")])
    diff = (images.int() - G.to_uint8(want).int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
    philox = torch.cat([im for _, im in G.generate_images(net, seeds, 2, num_steps=5)])
    assert (philox.int() - images.int()).abs().float().mean() > 5  # the option changes the draw


def test_cli_rng_published_and_churn_refusal(tmp_path, capsys):
    from pfgmpp_fast import cli
    from pfgmpp_fast.checkpoint import save_network

    net = small_net(128.0)
    path, out = str(tmp_path / "net.safetensors"), str(tmp_path / "g.npz")
    save_network(path, net)
    base = ["generate", "--network", path, "--seeds", "4-6", "--steps", "4", "--npz", out, "--no-progress"]
    assert cli.main(base + ["--rng", "published"]) == 0
    arr, seeds = load_npz_images(out)
    x_T, _ = restated_latents([4, 5, 6], (3, 8, 8), 128.0, "cpu")
    with torch.no_grad():
        want = G.to_uint8(published_heun(net, x_T, None, num_steps=4)).permute(0, 2, 3, 1).numpy()
    diff = np.abs(arr.astype(int) - want.astype(int))
    assert list(seeds) == [4, 5, 6] and diff.max() <= 1 and (diff > 0).mean() < 0.01
    # churn noise comes from the published per-seed generators: refused (S_noise 0, the published default, is fine)
    assert cli.main(base + ["--rng", "published", "--S-churn", "10"]) == 2
    err = capsys.readouterr().err
    assert "--rng" in err and "churn noise" in err and "S_noise 0" in err
    assert cli.main(base + ["--rng", "published", "--S-churn", "10", "--S-noise", "0"]) == 0
    assert cli.main(base + ["--rng", "published", "--S-churn", "10", "--S-max", "0.001"]) == 0  # no step in range


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"shape must be \[B, ...\] with B = 2"):
        PublishedRNG([1, 2]).prior((3, 3, 8, 8), 128)
    with pytest.raises(ValueError, match=r"seeds must be in \[0, 2\^63\)"):
        PublishedRNG([-1])
    with pytest.raises(ValueError, match="D must be"):
        PublishedRNG([1]).prior((1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="label_dim"):
        PublishedRNG([1]).class_indices(0)
    with pytest.raises(ValueError, match="rng must be one of philox, published"):
        next(G.generate_images(small_net(128.0), [1], 1, num_steps=2, rng="numpy"))
    with pytest.raises(ValueError, match="churn noise"):
        check_published_sampling(SamplerOptions(num_steps=18, S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003))
