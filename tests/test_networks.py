"""Networks: published state-dict compatibility, eager semantics, fast path vs eager fp32."""

import glob
import json
import math
import os

import pytest
import torch

from pfgmpp_fast.networks import EDMPrecond, FastNetwork, UNetBlock, build_network, make_fast, set_attention

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), 'golden')
GOLDENS = sorted(glob.glob(os.path.join(GOLDEN_DIR, '*.json')))

# build_network calls that must reproduce each published configuration.
BUILD_CALLS = {
    'cifar10_ddpmpp': dict(arch='ddpmpp', resolution=32, channels=3, augment_dim=9),
    'cifar10_ddpmpp_cond': dict(arch='ddpmpp', resolution=32, channels=3, label_dim=10, augment_dim=9),
    'cifar10_ncsnpp': dict(arch='ncsnpp', resolution=32, channels=3, augment_dim=9),
    'ffhq64_ddpmpp': dict(
        arch='ddpmpp', resolution=64, channels=3, channel_mult=[1, 2, 2, 2], augment_dim=9, dropout=0.05
    ),
    'imagenet64_adm': dict(arch='adm', resolution=64, channels=3, label_dim=1000, dropout=0.10),
}


def _key_shapes(net):
    return [[k, list(v.shape)] for k, v in net.state_dict().items()]


def test_goldens_present():
    names = {os.path.basename(p)[:-5] for p in GOLDENS}
    assert names == set(BUILD_CALLS)


@pytest.mark.parametrize('path', GOLDENS, ids=lambda p: os.path.basename(p)[:-5])
def test_published_state_dict_golden(path):
    golden = json.load(open(path))
    with torch.device('meta'):
        net = EDMPrecond(**golden['published_kwargs'])
        built = build_network(**BUILD_CALLS[golden['name']])
    for candidate in (net, built):
        assert _key_shapes(candidate) == golden['state_dict']
        assert sum(p.numel() for p in candidate.parameters()) == golden['num_parameters']
        assert sum(b.numel() for b in candidate.buffers()) == golden['num_buffer_elements']
    assert built.D == 128 and built.N == 3 * golden['published_kwargs']['img_resolution'] ** 2


@pytest.mark.parametrize(
    'kwargs, word',
    [
        (dict(arch='unet'), 'arch'),
        (dict(arch='ddpmpp', resolution=12, channel_mult=[1, 2, 2, 2]), 'resolution'),
        (dict(arch='adm', resolution=0), 'resolution'),
        (dict(arch='ddpmpp', resolution=32.0), 'resolution'),
        (dict(arch='ddpmpp', D=0), 'D'),
        (dict(arch='ddpmpp', D=-3), 'D'),
        (dict(arch='ddpmpp', D=float('nan')), 'D'),
        (dict(arch='ddpmpp', channels=0), 'channels'),
        (dict(arch='ddpmpp', label_dim=-1), 'label_dim'),
        (dict(arch='ncsnpp', embedding_type='sinus'), 'embedding_type'),
        (dict(arch='ddpmpp', dropout=1.5), 'dropout'),
        (dict(arch='ddpmpp', channel_mult=[]), 'channel_mult'),
    ],
)
def test_build_network_bad_inputs(kwargs, word):
    with pytest.raises((ValueError, TypeError), match=word):
        with torch.device('meta'):
            build_network(**kwargs)


def _tiny(arch='ddpmpp', resolution=8, channels=1, label_dim=0, **kw):
    base = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[resolution // 2], dropout=0.0)
    if arch == 'adm':
        base.update(model_channels=64)  # ADM attention needs >= 64 channels per head
    return build_network(arch, resolution=resolution, channels=channels, label_dim=label_dim, **{**base, **kw})


def _randomise(net, seed=0):
    """Published init zeroes / shrinks the output layers; randomise so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            scale = 0.3 if p.dim() > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith('norm0.weight') else 0.0))
    return net


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    'arch, res, ch, labels, extra',
    [
        ('ddpmpp', 8, 1, 0, {}),
        ('ddpmpp', 12, 3, 4, dict(encoder_type='skip', decoder_type='skip')),
        ('ncsnpp', 16, 2, 0, dict(augment_dim=9)),
        ('adm', 8, 3, 5, dict(augment_dim=9)),
    ],
)
def test_eager_semantics(arch, res, ch, labels, extra):
    torch.manual_seed(1)
    net = _randomise(_tiny(arch, res, ch, labels, **extra)).eval()
    assert net.N == ch * res * res and net.D == 128
    for B in (0, 1, 3):
        x = torch.randn(B, ch, res, res)
        sigma = torch.exp(torch.randn(B))
        lab = torch.nn.functional.one_hot(torch.randint(0, labels, (B,)), labels).float() if labels else None
        aug = torch.randn(B, 9) if extra.get('augment_dim') else None
        with torch.no_grad():
            D_x = net(x, sigma, lab, augment_labels=aug)
            c_skip, c_out, c_in, c_noise = net.coefficients(sigma.reshape(-1, 1, 1, 1))
            F_x = net.raw(c_in * x, c_noise.flatten(), lab, augment_labels=aug)
        assert D_x.shape == x.shape and D_x.dtype == torch.float32 and torch.isfinite(D_x).all()
        torch.testing.assert_close(D_x, c_skip * x + c_out * F_x, rtol=0, atol=0)
        if B:
            # channels-last and non-contiguous inputs give the same result
            with torch.no_grad():
                cl = net(x.contiguous(memory_format=torch.channels_last), sigma, lab, augment_labels=aug)
                nc = net(torch.randn(B, ch, res, 2 * res)[..., ::2].copy_(x), sigma, lab, augment_labels=aug)
            assert _rel(cl, D_x) < 1e-5 and _rel(nc, D_x) < 1e-5


def test_unconditional_labels_and_scalar_sigma():
    torch.manual_seed(2)
    net = _randomise(_tiny('ddpmpp', label_dim=3)).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a = net(x, torch.tensor(0.7))  # scalar sigma, labels default to zeros
        b = net(x, torch.full([2], 0.7), torch.zeros(2, 3))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match='D'):
        EDMPrecond(8, 1, D=0, model_channels=16, channel_mult=[1])
    edm = EDMPrecond(8, 1, D=float('inf'), model_channels=16, channel_mult=[1], attn_resolutions=[])
    assert math.isinf(edm.D) and edm.round_sigma(0.5).item() == 0.5


def test_attention_impls_agree_fp32_with_gradients():
    """Published einsum attention (hand-written backward) vs SDPA, values and gradients."""
    torch.manual_seed(3)
    net = _randomise(_tiny('adm', resolution=8, channels=2, num_blocks=1, channel_mult=[1, 2])).eval()
    x = torch.randn(3, 2, 8, 8)
    sigma = torch.exp(torch.randn(3))
    results = []
    for impl in ('einsum', 'sdpa'):
        set_attention(net, impl)
        net.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        out = net(xg, sigma)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), xg.grad, {n: p.grad.clone() for n, p in net.named_parameters()}))
    (o1, gx1, gp1), (o2, gx2, gp2) = results
    assert _rel(o1, o2) < 1e-5 and _rel(gx1, gx2) < 1e-5
    attn_params = [n for n in gp1 if '.qkv.' in n]
    assert attn_params
    for n in gp1:
        assert _rel(gp1[n], gp2[n]) < 1e-4, n
    set_attention(net, 'einsum')


def test_dropout_and_label_dropout_in_training_mode():
    torch.manual_seed(4)
    net = _randomise(_tiny('ddpmpp', label_dim=3, dropout=0.5, label_dropout=0.5))
    x, sigma = torch.randn(4, 1, 8, 8), torch.ones(4)
    lab = torch.eye(3)[[0, 1, 2, 0]]
    net.train()
    assert not torch.equal(net(x, sigma, lab), net(x, sigma, lab))
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x, sigma, lab), net(x, sigma, lab))


def _fast_check(net, fast, B=3, tol=2e-2):
    x = torch.randn(B, net.img_channels, net.img_resolution, net.img_resolution).contiguous(
        memory_format=torch.channels_last
    )
    sigma = torch.exp(torch.randn(B) * 1.2 - 0.5)
    # forward, no grad: bf16 vs fp32
    with torch.no_grad():
        ref = net(x, sigma)
        out = fast(x, sigma)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert _rel(out, ref) < tol
    # the F part alone (where bf16 matters; D = c_skip x dominates at small sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = net.coefficients(s)
    with torch.no_grad():
        F_fast = fast.raw(c_in * x, c_noise.flatten())
        F_ref = net.raw(c_in * x, c_noise.flatten())
    assert F_fast.dtype == torch.bfloat16 and F_fast.is_contiguous(memory_format=torch.channels_last)
    assert _rel(F_fast, F_ref) < tol
    torch.testing.assert_close(out, c_skip * x + c_out * F_fast.float(), rtol=1e-5, atol=1e-5)
    # gradients flow to every parameter and to the input, close to fp32 ones
    grads = []
    for model in (net, fast):
        net.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        w = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
        (model(xg, sigma) * w).sum().backward()
        grads.append((xg.grad, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
    (gx_ref, gp_ref), (gx, gp) = grads
    assert set(gp) == {n for n, _ in net.named_parameters()}
    assert all(torch.isfinite(g).all() for g in gp.values())
    assert _rel(gx, gx_ref) < 5e-2
    big = sorted(gp_ref, key=lambda n: -gp_ref[n].norm().item())[:10]
    for n in big:
        assert _rel(gp[n], gp_ref[n]) < 1e-1, n


def test_make_fast_compiled_cpu_bf16_vs_eager_fp32():
    """The compiled fast path on the CPU (dynamo + AOT autograd; inductor codegen is slow on
    2 CPU cores, so it is covered separately on a minimal net and on the GPU)."""
    torch.manual_seed(5)
    net = _randomise(_tiny('ncsnpp', resolution=8, channels=2, attn_resolutions=[4, 8])).eval()
    fast = make_fast(net, dtype=torch.bfloat16, channels_last=True, compile=True, compile_backend='aot_eager')
    assert isinstance(fast, FastNetwork)
    assert fast.img_resolution == 8 and fast.img_channels == 2 and fast.D == 128 and fast.N == 128
    assert fast.label_dim == 0 and fast.sigma_data == 0.5
    assert list(fast.state_dict()) == list(net.state_dict())
    assert {id(p) for p in fast.parameters()} == {id(p) for p in net.parameters()}
    assert all(m.attention_impl == 'einsum' for m in net.modules() if isinstance(m, UNetBlock))
    _fast_check(net, fast)


def test_make_fast_follows_train_eval_mode():
    net = _tiny().eval()
    fast = make_fast(net, compile=False)
    net.train()
    fast.raw(torch.randn(1, 1, 8, 8), torch.zeros(1))
    assert fast.net.training and all(m.training for m in fast.net.modules())
    fast.eval()
    assert not net.training and not fast.net.training and not any(m.training for m in fast.net.modules())


def test_make_fast_eager_and_fp32_modes():
    torch.manual_seed(6)
    net = _randomise(_tiny('adm', resolution=8, channels=1, label_dim=3)).eval()
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 4.0])
    lab = torch.eye(3)[[0, 2]]
    with torch.no_grad():
        ref = net(x, sigma, lab)
        f32 = make_fast(net, dtype=None, compile=False)(x, sigma, lab)
        bf = make_fast(net, dtype=torch.bfloat16, compile=False)(x, sigma, lab)
        forced = make_fast(net, compile=False)(x, sigma, lab, force_fp32=True)
    assert _rel(f32, ref) < 1e-5 and _rel(bf, ref) < 2e-2 and _rel(forced, ref) < 1e-5


@pytest.mark.parametrize(
    'kwargs, word',
    [
        (dict(dtype=torch.int8), 'dtype'),
        (dict(compile=False, cuda_graphs=True), 'cuda_graphs'),
    ],
)
def test_make_fast_bad_arguments(kwargs, word):
    net = _tiny()
    with pytest.raises(ValueError, match=word):
        make_fast(net, **kwargs)
    with pytest.raises(TypeError, match='EDMPrecond'):
        make_fast(torch.nn.Linear(2, 2))


def test_make_fast_inductor_cpu_minimal():
    """Real inductor codegen on the CPU, minimal net, inference only (keeps CI time small)."""
    torch.manual_seed(7)
    net = _randomise(
        build_network(
            'ddpmpp',
            resolution=4,
            channels=1,
            model_channels=16,
            channel_mult=[1],
            num_blocks=0,
            attn_resolutions=[4],
            dropout=0.0,
        )
    ).eval()
    fast = make_fast(net)
    x = torch.randn(2, 1, 4, 4)
    sigma = torch.tensor([0.2, 2.0])
    with torch.no_grad():
        out, ref = fast(x, sigma), net(x, sigma)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert _rel(out, ref) < 2e-2


@pytest.mark.parametrize('taps', [[1, 3, 3, 1], [1, 2, 1], [1, 1]])
def test_polyphase_resampling_matches_depthwise_conv(taps):
    """make_fast's FIR resampling (shifted strided slices) == the published depthwise conv,
    values and input gradients, for every up/down/fused variant and odd sizes."""
    from pfgmpp_fast.networks import Conv2d

    torch.manual_seed(8)
    variants = [
        dict(kernel=3, down=True),
        dict(kernel=3, up=True),
        dict(kernel=1, down=True),
        dict(kernel=0, up=True),
        dict(kernel=0, down=True),
        dict(kernel=3, down=True, fused_resample=True),
        dict(kernel=3, up=True, fused_resample=True),
    ]
    for kw in variants:
        conv = Conv2d(3, 5 if kw['kernel'] else 3, resample_filter=taps, init_bias=1, **kw)
        for H in (8, 5):
            x = torch.randn(2, 3, H, H + 2, requires_grad=True)
            outs = []
            for impl in ('conv', 'polyphase'):
                conv.resample_impl = impl
                y = conv(x)
                (g,) = torch.autograd.grad((y * torch.cos(torch.arange(y.numel()).reshape(y.shape))).sum(), x)
                outs.append((y, g))
            (y1, g1), (y2, g2) = outs
            assert y1.shape == y2.shape, (kw, H)
            torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-5)
