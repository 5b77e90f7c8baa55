"""Networks: DDPM++ / NCSN++ (SongUNet), ADM (DhariwalUNet) and the EDM preconditioning.

Our own implementation of the architectures used by EDM and PFGM++. For the same constructor
arguments the ``state_dict`` keys and shapes equal those of the published networks
(NVlabs/edm ``training/networks.py``, identical in Newbeeer/pfgmpp), and the eager fp32
outputs agree to fp32 rounding, so published weights load unchanged (see
``pfgmpp_fast.checkpoint``). Deliberate differences, all numerically equivalent:

* box-filter ([1,1]) resampling is ``avg_pool2d`` / nearest upsampling instead of a
  depthwise convolution with a constant 2x2 filter (same values, far cheaper);
* attention has two implementations: ``'einsum'`` (the published fp32 softmax, default in
  eager) and ``'sdpa'`` (``scaled_dot_product_attention``, switched on by :func:`make_fast`);
* conv / linear biases go into the conv / linear call.

``make_fast`` turns a network into a drop-in that runs channels-last under bf16 autocast,
compiled; see its docstring.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch.nn.functional import silu

from pfgmpp_fast import checks
from pfgmpp_fast.reference import coefficients

__all__ = [
    'Linear',
    'Conv2d',
    'GroupNorm',
    'UNetBlock',
    'PositionalEmbedding',
    'FourierEmbedding',
    'SongUNet',
    'DhariwalUNet',
    'EDMPrecond',
    'is_precond_net',
    'build_network',
    'make_fast',
    'FastNetwork',
    'ARCH_DEFAULTS',
    'set_attention',
    'set_resample',
]

ATTENTION_IMPLS = ('einsum', 'sdpa')


# ----------------------------------------------------------------------------------------
# Argument checks (fail early, name the argument, the value and what is allowed).


def _check_int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})')
    if value < minimum:
        raise ValueError(f'{name} must be an int >= {minimum}, got {value}')
    return value


def _check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f'{name} must be one of {choices}, got {value!r}')
    return value


def _check_prob(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f'{name} must be a probability in [0, 1], got {value!r}')
    return float(value)


def _check_D(D: Any):
    """D as given (an int stays an int in the config), a number that checks.check_D accepts."""
    if isinstance(D, bool) or not isinstance(D, (int, float)):
        raise ValueError(f'D must be a number in (0, inf] (float("inf") for EDM), got {D!r}')
    checks.check_D(D)
    return D


def _check_int_list(name: str, value: Any, minimum: int = 1, allow_empty: bool = False) -> list:
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty):
        raise ValueError(
            f'{name} must be a {"" if allow_empty else "non-empty "}list of ints >= {minimum}, got {value!r}'
        )
    return [_check_int(f'{name}[{i}]', v, minimum) for i, v in enumerate(value)]


# ----------------------------------------------------------------------------------------
# Weight initialisation (same distributions as the published code, so training from
# scratch starts from the same statistics). Works on the meta device.


def _init_tensor(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    if mode == 'xavier_uniform':
        return torch.empty(shape).uniform_(-1, 1) * math.sqrt(6 / (fan_in + fan_out))
    if mode == 'xavier_normal':
        return torch.empty(shape).normal_() * math.sqrt(2 / (fan_in + fan_out))
    if mode == 'kaiming_uniform':
        return torch.empty(shape).uniform_(-1, 1) * math.sqrt(3 / fan_in)
    if mode == 'kaiming_normal':
        return torch.empty(shape).normal_() * math.sqrt(1 / fan_in)
    raise ValueError(
        f'init_mode must be one of xavier_uniform, xavier_normal, kaiming_uniform, kaiming_normal; got {mode!r}'
    )


# ----------------------------------------------------------------------------------------
# Layers.


class Linear(torch.nn.Module):
    """Fully connected layer; parameters ``weight`` [out, in] and optional ``bias``."""

    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(_init_tensor([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(_init_tensor([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), b)


class Conv2d(torch.nn.Module):
    """Convolution with optional 2x up/downsampling by a separable FIR filter.

    ``kernel=0`` means resampling only (no weight). The filter is stored as the published
    ``resample_filter`` buffer (only when resampling) so state dicts match.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel,
        bias=True,
        up=False,
        down=False,
        resample_filter=(1, 1),
        fused_resample=False,
        init_mode='kaiming_normal',
        init_weight=1,
        init_bias=0,
    ):
        if up and down:
            raise ValueError('Conv2d: up and down cannot both be True')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (
            torch.nn.Parameter(_init_tensor([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
            if kernel
            else None
        )
        self.bias = torch.nn.Parameter(_init_tensor([out_channels], **fans) * init_bias) if kernel and bias else None
        taps = [float(t) for t in resample_filter]
        # A [1,1] filter is exactly 2x2 average pooling / nearest upsampling.
        self.box_filter = taps == [taps[0]] * 2
        # 'polyphase' (set by make_fast): other filters as sums of shifted strided slices,
        # which torch.compile fuses into one pass instead of a depthwise convolution.
        self.resample_impl = 'conv'
        self.taps = [t / sum(taps) for t in taps]
        f = torch.as_tensor(taps, dtype=torch.float32)
        f = torch.outer(f, f).unsqueeze(0).unsqueeze(1) / f.sum().square()
        self.register_buffer('resample_filter', f if up or down else None)

    def _down(self, x, f, pad, channels):
        if self.box_filter and pad == 0:
            return F.avg_pool2d(x, 2)
        if self.resample_impl == 'polyphase':
            return _fir_down_1d(_fir_down_1d(x, self.taps, pad, 2), self.taps, pad, 3)
        return F.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=pad)

    def _up(self, x, f, pad, channels):
        if self.box_filter and pad == 0:
            return F.interpolate(x, scale_factor=2, mode='nearest')
        if self.resample_impl == 'polyphase' and len(self.taps) == 2 * pad + 2:  # output exactly 2x
            return _fir_up_1d(_fir_up_1d(x, self.taps, pad, 2), self.taps, pad, 3)
        return F.conv_transpose2d(x, f.mul(4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=pad)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = self._up(x, f, w_pad + f_pad, self.in_channels)
            return F.conv2d(x, w, b)
        if self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = self._down(x, f, 0, self.out_channels)
            return x if b is None else x + b.reshape(1, -1, 1, 1)
        if self.up:
            x = self._up(x, f, f_pad, self.in_channels)
        if self.down:
            x = self._down(x, f, f_pad, self.in_channels)
        if w is not None:
            return F.conv2d(x, w, b, padding=w_pad)
        return x if b is None else x + b.reshape(1, -1, 1, 1)


def _shifted(x, shift: int, dim: int):
    """y[j] = x[j - shift] along ``dim``, zero outside."""
    n = x.shape[dim]
    if shift == 0:
        return x
    if abs(shift) >= n:
        return torch.zeros_like(x)
    if shift > 0:
        pad_shape = list(x.shape)
        pad_shape[dim] = shift
        return torch.cat([x.new_zeros(pad_shape), x.narrow(dim, 0, n - shift)], dim=dim)
    pad_shape = list(x.shape)
    pad_shape[dim] = -shift
    return torch.cat([x.narrow(dim, -shift, n + shift), x.new_zeros(pad_shape)], dim=dim)


def _fir_down_1d(x, taps, pad: int, dim: int):
    """y[i] = sum_k taps[k] x[2i + k - pad] (zero padding): depthwise stride-2 FIR along dim."""
    n = x.shape[dim]
    out = (n + 2 * pad - len(taps)) // 2 + 1
    padded = F.pad(x, (pad, pad) if dim == 3 else (0, 0, pad, pad))
    y = None
    for k, t in enumerate(taps):
        term = padded.narrow(dim, k, 2 * out - 1)
        term = term[:, :, ::2] if dim == 2 else term[..., ::2]
        y = term * t if y is None else y + term * t
    return y


def _fir_up_1d(x, taps, pad: int, dim: int):
    """Transposed stride-2 FIR (weights 2*taps, padding pad) along dim, as two phases:
    y[2j + r] = sum_m 2 taps[2m + r + pad] x[j - m]."""
    L = len(taps)
    phases = []
    for r in (0, 1):
        y = None
        for m in range(-L, L + 1):
            k = 2 * m + r + pad
            if 0 <= k < L:
                term = _shifted(x, m, dim) * (2 * taps[k])
                y = term if y is None else y + term
        phases.append(y)
    return torch.stack(phases, dim=dim + 1).flatten(dim, dim + 1)


class GroupNorm(torch.nn.Module):
    """Group norm with min(num_groups, C // min_channels_per_group) groups (published rule)."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1 or num_channels % self.num_groups:
            raise ValueError(
                f'GroupNorm: num_channels={num_channels} needs >= {min_channels_per_group} channels '
                f'and a multiple of the group count {self.num_groups}'
            )
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class _SoftmaxAttentionWeights(torch.autograd.Function):
    """softmax(q^T k / sqrt(c)) over keys, computed in fp32 whatever the input dtype, with a
    hand-written backward that keeps only q, k and the weights (the published memory trade)."""

    @staticmethod
    def forward(ctx, q, k):
        scale = 1 / math.sqrt(k.shape[1])
        w = torch.einsum('ncq,nck->nqk', q.float(), (k * scale).float()).softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx, dw):
        q, k, w = ctx.saved_tensors
        w32 = w.float()
        ds = w32 * (dw.float() - (dw.float() * w32).sum(dim=2, keepdim=True))  # softmax backward
        scale = 1 / math.sqrt(k.shape[1])
        dq = torch.einsum('nck,nqk->ncq', k.float(), ds).to(q.dtype) * scale
        dk = torch.einsum('ncq,nqk->nck', q.float(), ds).to(k.dtype) * scale
        return dq, dk


class UNetBlock(torch.nn.Module):
    """Residual block (GroupNorm-SiLU-conv, embedding injection, dropout) with optional
    resampling and single/multi-head self-attention: the union of DDPM++, NCSN++ and ADM."""

    def __init__(
        self,
        in_channels,
        out_channels,
        emb_channels,
        up=False,
        down=False,
        attention=False,
        num_heads=None,
        channels_per_head=64,
        dropout=0,
        skip_scale=1,
        eps=1e-5,
        resample_filter=(1, 1),
        resample_proj=False,
        adaptive_scale=True,
        init=None,
        init_zero=None,
        init_attn=None,
    ):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero if init_zero is not None else dict(init_weight=0))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = (
            0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        )
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        self.attention_impl = 'einsum'

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(
            in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init
        )
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(
                in_channels, out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init
            )
        if self.num_heads:
            if out_channels % self.num_heads:
                raise ValueError(f'UNetBlock: out_channels={out_channels} not divisible by num_heads={self.num_heads}')
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(
                out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init)
            )
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def _attend(self, x):
        B, C, H, W = x.shape
        heads, c = self.num_heads, C // self.num_heads
        qkv = self.qkv(self.norm2(x))  # channel layout: (head, c, {q,k,v})
        if self.attention_impl == 'sdpa':
            # (B, HW, heads, c, 3) is a view when qkv is channels-last; one copy then gives
            # q, k, v contiguous in the (B, heads, HW, c) layout the flash/efficient kernels want.
            qkv = qkv.permute(0, 2, 3, 1).reshape(B, H * W, heads, c, 3)
            q, k, v = qkv.permute(4, 0, 2, 1, 3).contiguous().unbind(0)
            a = F.scaled_dot_product_attention(q, k, v)
            return a.permute(0, 2, 1, 3).reshape(B, H, W, C).permute(0, 3, 1, 2)
        q, k, v = qkv.reshape(B * heads, c, 3, H * W).unbind(2)
        w = _SoftmaxAttentionWeights.apply(q, k)
        return torch.einsum('nqk,nck->ncq', w, v).reshape(B, C, H, W)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            a = self._attend(x)
            x = (self.proj(a.to(x.dtype)) + x) * self.skip_scale
        return x


class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding [cos(x f), sin(x f)], f = (1/max_positions)^(i/(C/2 - endpoint))."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features [cos(2 pi x f), sin(2 pi x f)] with the ``freqs`` buffer."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _check_resolution(img_resolution, channel_mult):
    levels = len(channel_mult)
    if (
        isinstance(img_resolution, bool)
        or not isinstance(img_resolution, int)
        or img_resolution < 1
        or img_resolution % (1 << (levels - 1))
    ):
        raise ValueError(
            f'resolution (img_resolution) must be a positive int divisible by 2^(len(channel_mult)-1) = '
            f'{1 << (levels - 1)}, got {img_resolution!r}'
        )


def _label_dropout_mask(tmp, x, p):
    return tmp * (torch.rand([x.shape[0], 1], device=x.device) >= p).to(tmp.dtype)


# ----------------------------------------------------------------------------------------
# DDPM++ / NCSN++.


class SongUNet(torch.nn.Module):
    """The DDPM++ / NCSN++ U-Net (Song et al. 2021) as configured by EDM; published argument names."""

    def __init__(
        self,
        img_resolution,
        in_channels,
        out_channels,
        label_dim=0,
        augment_dim=0,
        model_channels=128,
        channel_mult=(1, 2, 2, 2),
        channel_mult_emb=4,
        num_blocks=4,
        attn_resolutions=(16,),
        dropout=0.10,
        label_dropout=0,
        embedding_type='positional',
        channel_mult_noise=1,
        encoder_type='standard',
        decoder_type='standard',
        resample_filter=(1, 1),
    ):
        _check_choice('embedding_type', embedding_type, ['fourier', 'positional'])
        _check_choice('encoder_type', encoder_type, ['standard', 'skip', 'residual'])
        _check_choice('decoder_type', decoder_type, ['standard', 'skip'])
        channel_mult = _check_int_list('channel_mult', channel_mult)
        attn_resolutions = _check_int_list('attn_resolutions', attn_resolutions, allow_empty=True)
        _check_resolution(img_resolution, channel_mult)
        for name, v in [
            ('in_channels', in_channels),
            ('out_channels', out_channels),
            ('model_channels', model_channels),
            ('channel_mult_emb', channel_mult_emb),
            ('channel_mult_noise', channel_mult_noise),
        ]:
            _check_int(name, v, 1)
        _check_int('label_dim', label_dim, 0)
        _check_int('augment_dim', augment_dim, 0)
        _check_int('num_blocks', num_blocks, 0)
        _check_prob('dropout', dropout)
        _check_prob('label_dropout', label_dropout)
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
        )

        self.map_noise = (
            PositionalEmbedding(noise_channels, endpoint=True)
            if embedding_type == 'positional'
            else FourierEmbedding(noise_channels)
        )
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. Entry names are the published state-dict names.
        self.enc = torch.nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(
                        caux, caux, kernel=0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs
                )
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(
                        out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter
                    )
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, emb.shape[1] // 2).flip(1).reshape(*emb.shape)  # [sin, cos] order
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                tmp = _label_dropout_mask(tmp, x, self.label_dropout)
            emb = emb + self.map_label(tmp * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


# ----------------------------------------------------------------------------------------
# ADM.


class DhariwalUNet(torch.nn.Module):
    """The ADM U-Net (Dhariwal & Nichol 2021) as configured by EDM; published argument names."""

    def __init__(
        self,
        img_resolution,
        in_channels,
        out_channels,
        label_dim=0,
        augment_dim=0,
        model_channels=192,
        channel_mult=(1, 2, 3, 4),
        channel_mult_emb=4,
        num_blocks=3,
        attn_resolutions=(32, 16, 8),
        dropout=0.10,
        label_dropout=0,
    ):
        channel_mult = _check_int_list('channel_mult', channel_mult)
        attn_resolutions = _check_int_list('attn_resolutions', attn_resolutions, allow_empty=True)
        _check_resolution(img_resolution, channel_mult)
        for name, v in [
            ('in_channels', in_channels),
            ('out_channels', out_channels),
            ('model_channels', model_channels),
            ('channel_mult_emb', channel_mult_emb),
        ]:
            _check_int(name, v, 1)
        _check_int('label_dim', label_dim, 0)
        _check_int('augment_dim', augment_dim, 0)
        _check_int('num_blocks', num_blocks, 0)
        _check_prob('dropout', dropout)
        _check_prob('label_dropout', label_dropout)
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(
            emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero
        )

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (
            Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal', init_weight=math.sqrt(label_dim))
            if label_dim
            else None
        )

        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs
                )
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs
                )
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                tmp = _label_dropout_mask(tmp, x, self.label_dropout)
            emb = emb + self.map_label(tmp)
        emb = silu(emb)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))


MODEL_TYPES = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}


# ----------------------------------------------------------------------------------------
# Preconditioning.


def is_precond_net(net) -> bool:
    """EDMPrecond-like (`.raw` gives F from c_in·x, `.sigma_data`): the loss and the sampler
    take the fused preconditioning path for such a net, else call it as a plain denoiser."""
    return hasattr(net, 'raw') and hasattr(net, 'sigma_data')


class EDMPrecond(torch.nn.Module):
    """EDM preconditioning D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), carrying the
    PFGM++ augmented dimension ``D`` (float('inf') = EDM) and data dimension ``N``.

    The preconditioning does not depend on D (the PFGM++ alignment r = sigma sqrt(D) happens in
    the perturbation / prior); D and N travel with the network so checkpoints say how the
    network was trained. State-dict keys are the published ``model.*``.
    """

    def __init__(
        self,
        img_resolution,
        img_channels,
        label_dim=0,
        use_fp16=False,
        sigma_min=0,
        sigma_max=float('inf'),
        sigma_data=0.5,
        model_type='SongUNet',
        D=128,
        N=None,
        **model_kwargs,
    ):
        _check_choice('model_type', model_type, MODEL_TYPES)
        _check_int('img_channels', img_channels, 1)
        _check_int('label_dim', label_dim, 0)
        _check_D(D)
        if not isinstance(sigma_data, (int, float)) or not 0 < sigma_data < math.inf:
            raise ValueError(f'sigma_data must be a finite number > 0, got {sigma_data!r}')
        default_N = img_channels * img_resolution * img_resolution if isinstance(img_resolution, int) else None
        N = default_N if N is None else _check_int('N', N, 1)
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = bool(use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model_type = model_type
        self.D = float(D) if math.isinf(D) else D
        self.N = N
        self.model_kwargs = copy.deepcopy(model_kwargs)
        self.model = MODEL_TYPES[model_type](
            img_resolution=img_resolution,
            in_channels=img_channels,
            out_channels=img_channels,
            label_dim=label_dim,
            **model_kwargs,
        )

    def config(self) -> dict:
        """Constructor arguments (enough to rebuild the network)."""
        return dict(
            img_resolution=self.img_resolution,
            img_channels=self.img_channels,
            label_dim=self.label_dim,
            use_fp16=self.use_fp16,
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
            sigma_data=self.sigma_data,
            model_type=self.model_type,
            D=self.D,
            N=self.N,
            **copy.deepcopy(self.model_kwargs),
        )

    def _labels(self, class_labels, x):
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=x.device)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) for a sigma tensor of shape [B, 1, 1, 1] (reference.precond)."""
        return coefficients(sigma, self.sigma_data)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, augment_labels=None, **model_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = self._labels(class_labels, x)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model(
            (c_in * x).to(dtype),
            c_noise.flatten(),
            class_labels=class_labels,
            augment_labels=augment_labels,
            **model_kwargs,
        )
        return c_skip * x + c_out * F_x.to(torch.float32)

    def raw(self, x_in, c_noise, class_labels=None, augment_labels=None):
        """F = model(x_in, c_noise, labels) for an input already scaled by c_in."""
        return self.model(
            x_in, c_noise.reshape(-1), class_labels=self._labels(class_labels, x_in), augment_labels=augment_labels
        )

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


# ----------------------------------------------------------------------------------------
# Published configurations.

ARCH_DEFAULTS = {
    # NVlabs/edm train.py (--arch) plus its CLI default --dropout=0.13.
    'ddpmpp': dict(
        model_type='SongUNet',
        embedding_type='positional',
        encoder_type='standard',
        decoder_type='standard',
        channel_mult_noise=1,
        resample_filter=[1, 1],
        model_channels=128,
        channel_mult=[2, 2, 2],
        dropout=0.13,
    ),
    'ncsnpp': dict(
        model_type='SongUNet',
        embedding_type='fourier',
        encoder_type='residual',
        decoder_type='standard',
        channel_mult_noise=2,
        resample_filter=[1, 3, 3, 1],
        model_channels=128,
        channel_mult=[2, 2, 2],
        dropout=0.13,
    ),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.13),
}


def build_network(arch='ddpmpp', resolution=32, channels=3, label_dim=0, D=128, **overrides) -> EDMPrecond:
    """An :class:`EDMPrecond` with the published defaults of ``arch`` (EDM train.py).

    ``overrides`` are any EDMPrecond or model arguments (model_channels, channel_mult,
    num_blocks, attn_resolutions, dropout, augment_dim, sigma_data, N, ...). The published
    CIFAR-10 / FFHQ models were trained with augmentation: pass ``augment_dim=9`` to load them.
    """
    _check_choice('arch', arch, ARCH_DEFAULTS)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f'resolution must be a positive int, got {resolution!r}')
    _check_int('channels', channels, 1)
    _check_int('label_dim', label_dim, 0)
    _check_D(D)
    kwargs = {**ARCH_DEFAULTS[arch], **overrides}
    mult = kwargs.get('channel_mult')
    if isinstance(mult, (list, tuple)) and mult and resolution % (1 << (len(mult) - 1)):
        raise ValueError(
            f'resolution must be divisible by 2^(len(channel_mult)-1) = {1 << (len(mult) - 1)} '
            f'for channel_mult={list(mult)}, got {resolution}'
        )
    return EDMPrecond(img_resolution=resolution, img_channels=channels, label_dim=label_dim, D=D, **kwargs)


def set_resample(net: torch.nn.Module, impl: str) -> torch.nn.Module:
    """Select how non-box FIR resampling runs: 'conv' (depthwise conv, published) or
    'polyphase' (shifted strided slices; fused by torch.compile)."""
    _check_choice('impl', impl, ('conv', 'polyphase'))
    for m in net.modules():
        if isinstance(m, Conv2d):
            m.resample_impl = impl
    return net


def set_attention(net: torch.nn.Module, impl: str) -> torch.nn.Module:
    """Select the attention implementation ('einsum' = published fp32 softmax, 'sdpa')."""
    _check_choice('impl', impl, ATTENTION_IMPLS)
    for m in net.modules():
        if isinstance(m, UNetBlock):
            m.attention_impl = impl
    return net


# ----------------------------------------------------------------------------------------
# Fast path.


def _twin(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``net``."""
    memo = {id(t): t for t in itertools.chain(net.parameters(), net.buffers())}
    return copy.deepcopy(net, memo)


class FastNetwork(torch.nn.Module):
    """Drop-in for an :class:`EDMPrecond`: same ``forward`` / ``raw`` signatures, same
    parameters (shared, so optimisers and EMA see one set of weights), attributes forwarded.
    The UNet runs channels-last under autocast, attention through SDPA, torch.compile'd;
    the preconditioning around it stays in fp32.

    The module objects are a twin of the wrapped network's (sharing its tensors); train/eval
    mode follows the wrapped network (and ``.train()`` here sets both). Take EMA copies of
    the wrapped network, not of this object."""

    def __init__(self, net: EDMPrecond, dtype, channels_last, compile, cuda_graphs, compile_mode, compile_backend=None):
        super().__init__()
        if not isinstance(net, EDMPrecond):
            raise TypeError(f'net must be an EDMPrecond, got {type(net).__name__}')
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f'dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}')
        if cuda_graphs and not compile:
            raise ValueError(
                'cuda_graphs=True needs compile=True (CUDA graphs come from compile mode "reduce-overhead")'
            )
        self.net = set_resample(set_attention(_twin(net), 'sdpa'), 'polyphase')
        object.__setattr__(self, '_source', net)  # not a submodule: its tensors are already ours
        self.autocast_dtype = None if dtype in (None, torch.float32) else dtype
        self.channels_last = bool(channels_last)
        self.cuda_graphs = bool(cuda_graphs)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if compile:
            mode = compile_mode if compile_mode is not None else ('reduce-overhead' if cuda_graphs else None)
            backend = 'inductor' if compile_backend is None else compile_backend
            self._unet = torch.compile(self._unet_eager, mode=mode, dynamic=False, backend=backend)
        else:
            self._unet = self._unet_eager

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get('_modules')
            if modules is None or 'net' not in modules:
                raise
            return getattr(modules['net'], name)

    def _unet_eager(self, x_in, c_noise, class_labels, augment_labels):
        if self.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is None:
            return self.net.model(x_in, c_noise, class_labels=class_labels, augment_labels=augment_labels)
        with torch.autocast(device_type=x_in.device.type, dtype=self.autocast_dtype):
            return self.net.model(x_in, c_noise, class_labels=class_labels, augment_labels=augment_labels)

    def train(self, mode: bool = True):
        super().train(mode)
        self._source.train(mode)
        return self

    def _call_unet(self, x_in, c_noise, class_labels, augment_labels):
        if self.net.training != self._source.training:  # follow net.train() / net.eval()
            self.net.train(self._source.training)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return self._unet(x_in, c_noise, class_labels, augment_labels).clone()
        return self._unet(x_in, c_noise, class_labels, augment_labels)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, augment_labels=None, **model_kwargs):
        if model_kwargs:
            raise TypeError(f'FastNetwork.forward: unexpected model arguments {sorted(model_kwargs)}')
        if force_fp32:
            return self.net(x, sigma, class_labels, force_fp32=True, augment_labels=augment_labels)
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.net.coefficients(sigma)
        F_x = self._call_unet(c_in * x, c_noise.flatten(), self.net._labels(class_labels, x), augment_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def raw(self, x_in, c_noise, class_labels=None, augment_labels=None):
        return self._call_unet(x_in, c_noise.reshape(-1), self.net._labels(class_labels, x_in), augment_labels)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    # Checkpoints see the wrapped network's keys (model.*), not net.model.*.
    def state_dict(self, *args, **kwargs):
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)


def make_fast(
    net,
    dtype=torch.bfloat16,
    channels_last=True,
    compile=True,
    cuda_graphs=False,
    compile_mode=None,
    compile_backend=None,
):
    """Make ``net`` fast: channels-last, autocast in ``dtype`` (None / float32 = off), attention
    through ``scaled_dot_product_attention``, ``torch.compile`` (``cuda_graphs=True`` compiles
    with mode 'reduce-overhead' for fixed-shape inference; outputs are cloned out of the
    graph pool). Returns a :class:`FastNetwork` sharing ``net``'s parameters; ``net`` itself
    keeps its eager behaviour (its conv weights become channels-last, values unchanged).
    ``compile_backend`` (default inductor) exists for quick CPU checks ('aot_eager').
    """
    return FastNetwork(net, dtype, channels_last, compile, cuda_graphs, compile_mode, compile_backend)
