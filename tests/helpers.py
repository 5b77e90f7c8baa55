"""Shared pieces of the tests (the fused-op tests share op_helpers.py): small networks,
the exact-denoiser stand-in, ``load_npz_images`` and ``run_ranks`` for tests on several ranks.

``run_ranks(worker, world, workdir, *args)`` calls ``worker(rank, *args)`` in ``world``
fresh processes (``spawn``, as torchrun starts them) that share a process group over a
file store in ``workdir``, then leaves the group through ``distributed.close`` as every
command does. A rank that raises, dies or hangs fails the test, naming the rank and the
phase it was in, with one exception: a rank killed by SIGABRT/SIGSEGV inside torch while
leaving the group, after its work is done, is a warning (torch 2.14's gloo teardown aborted
so once in CI; `distributed.close` orders the teardown to avoid it), and the test goes on
to check the results. The worker must be a module-level function (it is pickled).
"""

import multiprocessing
import os
import signal
import time
import warnings

import numpy as np
import pytest
import torch

from pfgmpp_fast import reference as R
from pfgmpp_fast.networks import build_network
from pfgmpp_fast.utils import distributed

TIMEOUT_S = 300
GRACE_S = 30  # how long the other ranks may go on once one has failed


class DenoiserNet(torch.nn.Module):
    """The exact denoiser of a small data set, dressed as a network (a stand-in for tests).

    It denoises each sample on its own (a batch of one), so a sample's output does not depend
    on its batch by construction: tests of the pipeline's batch independence (generation,
    padding, ranks) then test the pipeline, not how a BLAS blocks a batch shape.
    `batch_coupling` > 0 instead adds that multiple of the batch mean to every output: a
    worst-case network whose samples depend on their batch (size, position, the other
    samples), for tests that every mode computes every seed in the same batch."""

    def __init__(self, data, D, label_dim=0, batch_coupling=0.0):
        super().__init__()
        self.den = R.optimal_denoiser(data, D)
        self.D, self.batch_coupling = D, batch_coupling
        self.img_channels, self.img_resolution, self.label_dim = data.shape[1], data.shape[2], label_dim
        self.seen_labels = []

    def forward(self, x, sigma, class_labels=None):
        if class_labels is not None:
            self.seen_labels.append(class_labels)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        out = torch.cat([self.den(x[i : i + 1].clone(), sigma[i : i + 1].clone()) for i in range(x.shape[0])])
        if self.batch_coupling:
            out = out + self.batch_coupling * x.mean(0, keepdim=True)
        return out


class BatchSensitiveFeatures(torch.nn.Module):
    """A worst-case feature extractor for 1x8x8 uint8 images: each 4-d row depends on its whole
    batch (the batch size, the row's position and the batch mean), as a BLAS whose blocking
    follows the batch shape would, only far more. Rows (and sums) agree across modes only if
    every row is computed in the same batch."""

    name, dim, image_shape, sha256 = "batch-sensitive", 4, (1, 8, 8), None

    @torch.no_grad()
    def forward(self, images):
        x = images.reshape(images.shape[0], -1).to(torch.float64) / 255
        rows = torch.stack([x[:, :32].mean(1), x[:, 32:].mean(1), x.std(1), x[:, ::7].mean(1)], dim=1)
        position = torch.arange(x.shape[0], dtype=torch.float64)[:, None]
        return rows + 1e-3 * (x.mean() + x.shape[0] + position)


def stand_in(D=8.0, label_dim=0, batch_coupling=0.0):
    """The exact denoiser of 16 random 1x8x8 images."""
    g = torch.Generator().manual_seed(0)
    return DenoiserNet(torch.rand(16, 1, 8, 8, generator=g) * 2 - 1, D, label_dim, batch_coupling)


def digits_net(D=8.0, n=64):
    """The exact denoiser of the first n digits."""
    from pfgmpp_fast.evaluation.digits_features import digits_uint8

    u, _ = digits_uint8()
    return DenoiserNet(u[:n].float() / 127.5 - 1, D)


def tiny_net(D=8, seed=0):
    """A 1x8x8 DDPM++ with 8 channels, in eval mode."""
    torch.manual_seed(seed)
    return build_network(
        "ddpmpp",
        resolution=8,
        channels=1,
        D=D,
        model_channels=8,
        channel_mult=[1],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
    ).eval()


def load_npz_images(path):
    """(images uint8 NHWC, seeds int64) of a `generate --npz` file."""
    with np.load(path, allow_pickle=False) as f:
        return f["images"], f["seeds"]


def _rank_main(rank, world, workdir, worker, args):
    store = torch.distributed.FileStore(os.path.join(workdir, "store"), world)
    distributed.join_group(store, rank, world)
    worker(rank, *args)
    open(os.path.join(workdir, f"worked-{rank}"), "w").close()
    distributed.close()
    open(os.path.join(workdir, f"closed-{rank}"), "w").close()


def run_ranks(worker, world, workdir, *args, timeout=TIMEOUT_S):
    """worker(rank, *args) on `world` gloo ranks; every rank must work and leave the group."""
    workdir = str(workdir)
    os.makedirs(workdir, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, world, workdir, worker, args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):  # its peers may wait for it forever
            deadline = min(deadline, time.monotonic() + GRACE_S)
        time.sleep(0.05)
    hung = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    problems = []
    for rank, p in enumerate(procs):
        worked = os.path.exists(os.path.join(workdir, f"worked-{rank}"))
        closed = os.path.exists(os.path.join(workdir, f"closed-{rank}"))
        if p.exitcode == 0 and closed:
            continue
        phase = "leaving the process group" if worked else "its work"
        how = "still running when stopped" if hung[rank] else f"exit code {p.exitcode}"
        if worked and not hung[rank] and -p.exitcode in (signal.SIGABRT, signal.SIGSEGV):
            # torch's own gloo teardown, after this rank's work was done and checked below
            warnings.warn(f"rank {rank} was killed by signal {-p.exitcode} while leaving the process group")
            continue
        problems.append(f"rank {rank} failed during {phase} ({how})")
    if problems:
        pytest.fail("; ".join(problems) + " (the ranks' output is in the captured stderr)")


def tiny_run_options(run_dir, steps, batch, network, **extra):
    """run_training options of a tiny CPU run on the digits: one tick per step, `steps` steps,
    no snapshots or states unless `extra` asks for them."""
    options = dict(
        run_dir=str(run_dir),
        data="digits",
        batch=batch,
        network=network,
        duration_kimg=steps * batch / 1000,
        tick_kimg=batch / 1000,
        snap_ticks=None,
        dump_ticks=None,
        lr=2e-3,
        lr_rampup_kimg=batch * 2 / 1000,
        dropout=0.0,
        augment=0.0,
        precision="fp32",
        compile=False,
        channels_last=False,
        progress=False,
        device="cpu",
    )
    options.update(extra)
    return options
