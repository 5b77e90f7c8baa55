"""Network throughput: CIFAR-10 DDPM++ and NCSN++, three ways, ratios in one run.

    python benchmarks/bench_networks.py --out benchmarks/results/networks_h100.json   # GPU
    python benchmarks/bench_networks.py --smoke                                          # CPU, seconds

Variants (same architecture, same weights):
  published  strict fp32 (TF32 off), NCHW, eager, the published attention (einsum + fp32
             softmax with its hand-written backward) and depthwise-conv resampling;
             our module set to published behaviour, checked equal to the published code.
  hand       the published-style model with what a user adds by hand: bf16 autocast,
             channels_last, TF32 on, torch.compile (default mode).
  fast       pfgmpp_fast.networks.make_fast (bf16, channels_last, SDPA attention, box
             resampling as avg-pool / nearest, other FIR resampling as fused shifted
             slices, torch.compile).
Forward = inference (eval, no_grad); fwd+bwd = training mode (dropout on), backward of a
weighted sum of the output. Also measured in the same run: the device-copy and bf16 matmul
ceilings (timing and ceilings: pfgmpp_fast/utils/benchmarking.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from pfgmpp_fast.networks import Conv2d, build_network, make_fast, set_attention  # noqa: E402
from pfgmpp_fast.utils import benchmarking as bm  # noqa: E402


def _set_tf32(on: bool):
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def _published_style(net):
    """Published behaviour: einsum attention, depthwise-conv resampling even for [1,1]."""
    set_attention(net, 'einsum')
    for m in net.modules():
        if isinstance(m, Conv2d):
            m.box_filter = False
    return net


class _HandCompiled(torch.nn.Module):
    """What a user does by hand to the published model: autocast + channels_last + compile."""

    def __init__(self, net, dtype, backend):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)
        self.dtype = dtype
        self.compiled = net if backend == 'none' else torch.compile(net, backend=backend)

    def forward(self, x, sigma, labels=None, augment_labels=None):
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            return self.compiled(x, sigma, labels, augment_labels=augment_labels)


def _make_inputs(net, batch, device, gen):
    x = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, device=device, generator=gen)
    sigma = (torch.randn(batch, device=device, generator=gen) * 1.2 - 1.2).exp()
    aug = torch.zeros(batch, 9, device=device) if net.model.map_augment is not None else None
    return x, sigma, aug


def _measure(result, what, fn, args, device):
    """result[first_<what>_s] (compile + first call), <what>_img_per_s (median of args.iters
    calls after args.warmup) and, on a GPU, <what>_peak_bytes_per_img."""
    t0 = time.perf_counter()
    fn()
    bm.sync(device)
    result[f'first_{what}_s'] = time.perf_counter() - t0
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    ms = bm.time_ms(fn, device, warmup=args.warmup, reps=args.iters)
    result[f'{what}_img_per_s'] = args.batch / (ms * 1e-3)
    if device.type == 'cuda':
        result[f'{what}_peak_bytes_per_img'] = torch.cuda.max_memory_allocated() / args.batch


def bench_variant(variant, arch, cfg, args, device):
    torch.manual_seed(0)
    net = build_network(arch, **cfg).to(device)
    dtype = torch.bfloat16
    if variant == 'published':
        _set_tf32(False)
        model = _published_style(net)
    elif variant == 'hand':
        _set_tf32(True)
        model = _HandCompiled(_published_style(net), dtype, args.compile_backend)
    else:
        _set_tf32(True)
        compiled = args.compile_backend != 'none'
        model = make_fast(
            net,
            dtype=dtype,
            compile=compiled,
            compile_backend=args.compile_backend if compiled else None,
            compile_mode=args.compile_mode,
        )
    gen = torch.Generator(device=device).manual_seed(1)
    x, sigma, aug = _make_inputs(net, args.batch, device, gen)
    weight = torch.randn(x.shape, device=device, generator=gen)
    result = {}

    model.eval()

    def fwd():
        with torch.no_grad():
            model(x, sigma, None, augment_labels=aug)

    _measure(result, 'forward', fwd, args, device)

    model.train()
    params = list(net.parameters())

    def fwd_bwd():
        for p in params:
            p.grad = None
        (model(x, sigma, None, augment_labels=aug) * weight).sum().backward()

    _measure(result, 'fwd_bwd', fwd_bwd, args, device)
    _set_tf32(False)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--smoke', action='store_true', help='tiny nets on the CPU, no torch.compile: seconds')
    p.add_argument('--batch', type=int, default=None, help='default 512 (smoke: 2)')
    p.add_argument('--iters', type=int, default=None, help='timed iterations (default 20, smoke 2)')
    p.add_argument('--warmup', type=int, default=None, help='untimed iterations after the first (default 5, smoke 1)')
    p.add_argument('--archs', default='ddpmpp,ncsnpp')
    p.add_argument('--variants', default='published,hand,fast')
    p.add_argument(
        '--compile-backend',
        default=None,
        help='torch.compile backend (default inductor; "none" = no compile, the smoke default)',
    )
    p.add_argument(
        '--compile-mode', default=None, help='compile mode for the fast variant (e.g. max-autotune-no-cudagraphs)'
    )
    p.add_argument('--device', default=None)
    p.add_argument('--out', default=None, help='write results as JSON here (and a .md table next to it)')
    args = p.parse_args(argv)

    device = torch.device(args.device or ('cpu' if args.smoke or not torch.cuda.is_available() else 'cuda'))
    args.batch = args.batch or (2 if args.smoke else 512)
    args.iters = args.iters or (2 if args.smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    if args.compile_backend is None:
        args.compile_backend = 'none' if args.smoke else 'inductor'
    if args.smoke:
        torch.set_num_threads(1)  # tiny nets: thread hand-offs cost more than they save
    # CIFAR-10 configs as published (augment_dim=9, dropout 0.13); smoke: the same shape, tiny.
    cfg = dict(resolution=32, channels=3, augment_dim=9)
    if args.smoke:
        cfg = dict(
            resolution=8,
            channels=3,
            augment_dim=9,
            model_channels=16,
            channel_mult=[1, 2],
            num_blocks=1,
            attn_resolutions=[4],
        )

    # The ceilings of this run (device copy, bf16 matmul) and its environment, as every suite has them.
    results = dict(
        suite='networks',
        environment=bm.environment(device),
        ceilings=bm.ceilings(device, smoke=args.smoke),
        batch=args.batch,
        iters=args.iters,
        smoke=args.smoke,
        compile_backend=args.compile_backend,
        compile_mode=args.compile_mode,
        config=cfg,
        archs={},
    )
    for arch in args.archs.split(','):
        row = {}
        for variant in args.variants.split(','):
            row[variant] = bench_variant(variant, arch, cfg, args, device)
            if device.type == 'cuda':
                torch.cuda.empty_cache()  # the variant's network and buffers are gone with its frame
            print(
                f'{arch:7s} {variant:9s} fwd {row[variant]["forward_img_per_s"]:10.1f} img/s   '
                f'fwd+bwd {row[variant]["fwd_bwd_img_per_s"]:10.1f} img/s',
                flush=True,
            )
        ratios = {}
        for base in ('published', 'hand'):
            if base in row and 'fast' in row:
                for k in ('forward', 'fwd_bwd'):
                    ratios[f'fast_over_{base}_{k}'] = row['fast'][f'{k}_img_per_s'] / row[base][f'{k}_img_per_s']
        row['ratios'] = ratios
        print(f'{arch:7s} ratios ' + ', '.join(f'{k}={v:.2f}' for k, v in ratios.items()), flush=True)
        results['archs'][arch] = row

    # Rows for the suite driver (pfgmpp_fast.apps.bench) and the README table.
    results['rows'] = [
        dict(arch=arch, variant=v, forward_img_per_s=r['forward_img_per_s'], fwd_bwd_img_per_s=r['fwd_bwd_img_per_s'])
        for arch, row in results['archs'].items()
        for v, r in row.items()
        if v != 'ratios'
    ]
    targets = {'published_fwd_bwd': '>= 5 (H100/H200)', 'hand_fwd_bwd': '>= 1.15 (H100/H200)'}
    results['summary'] = [
        dict(
            metric=f'{arch} fast / {k.replace("fast_over_", "")}',
            value=val,
            target=targets.get(k.replace('fast_over_', ''), ''),
        )
        for arch, row in results['archs'].items()
        for k, val in row['ratios'].items()
        if k.endswith('fwd_bwd')
    ]
    if args.out:
        bm.write_json(args.out, results)
        env = results['environment']
        ratios = [
            dict(arch=arch, ratio=k, value=val)
            for arch, row in results['archs'].items()
            for k, val in row['ratios'].items()
        ]
        text = (
            f'# Network throughput ({env["device"]}, torch {env["torch"]}, batch {args.batch})\n\n'
            + bm.markdown_table(results['rows'])
            + '\n'
            + bm.markdown_table(ratios)
        )
        bm.write_text(os.path.splitext(args.out)[0] + '.md', text)
    return results


if __name__ == '__main__':
    main()
