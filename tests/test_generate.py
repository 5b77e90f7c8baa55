"""Generation (pfgmpp_fast/generate.py): seeds, determinism per seed, ranks, outputs, errors."""

import os
import time
import zipfile

import numpy as np
import pytest
import torch
from helpers import DenoiserNet, load_npz_images, run_ranks, stand_in, tiny_net

from pfgmpp_fast import checks
from pfgmpp_fast.evaluation import generate as G
from pfgmpp_fast.utils import distributed


def run(net, seeds, batch, **kw):
    kw.setdefault("num_steps", 4)
    out = list(G.generate_images(net, seeds, batch, **kw))
    return np.concatenate([s for s, _ in out]), torch.cat([im for _, im in out])


def test_parse_int_list_and_check_seeds():
    assert checks.parse_int_list("1,5,7-9") == [1, 5, 7, 8, 9]
    assert checks.parse_int_list("0-3") == [0, 1, 2, 3]
    assert list(checks.check_seeds("9,2-3")) == [2, 3, 9]
    assert checks.check_seeds(str(2**63 - 1))[0] == 2**63 - 1
    with pytest.raises(ValueError, match=r"out of range.*\[0, 2\^63\)"):
        checks.check_seeds(str(2**63))
    with pytest.raises(ValueError, match=r"out of range"):
        checks.check_seeds([-1])
    with pytest.raises(ValueError, match="cannot parse"):
        checks.parse_int_list("-5")
    with pytest.raises(ValueError, match="cannot parse"):
        checks.parse_int_list("1,a")
    with pytest.raises(ValueError, match="empty"):
        checks.parse_int_list("5-2")
    with pytest.raises(ValueError, match="more than once"):
        checks.check_seeds("1-3,2")
    assert list(G.rank_seeds(np.array([5, 1, 3, 2]), 1, 2, 1)) == [2, 5]


@pytest.mark.bitidentity
def test_rank_seeds_keep_the_one_process_batches():
    """Each rank gets whole batches of the one-process grid, so generate_images cuts them
    into the same batches: every seed is computed in the same batch on any number of ranks."""
    seeds = np.array([10, 0, 9, 1, 8, 2, 7, 3, 6, 4, 5])
    grid = [list(range(b, min(b + 3, 11))) for b in range(0, 11, 3)]  # [0,1,2] [3,4,5] [6,7,8] [9,10]
    for world in (1, 2, 3, 5):
        batches = []
        for rank in range(world):
            mine = G.rank_seeds(seeds, rank, world, 3)
            batches += [list(s) for s, _ in G.generate_images(stand_in(), mine, 3, num_steps=1)]
        assert sorted(batches) == grid, world
    assert len(G.rank_seeds(seeds, 4, 5, 3)) == 0
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        G.rank_seeds(seeds, 0, 2, 0)


def test_to_uint8_is_the_published_quantisation():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0, float("nan")])[:-1]
    ref = np.clip(x.numpy() * 127.5 + 128, 0, 255).astype(np.uint8)
    assert np.array_equal(G.to_uint8(x).numpy(), ref)
    assert G.to_uint8(torch.tensor([1.0])).item() == 255 and G.to_uint8(torch.tensor([-1.0])).item() == 0


@pytest.mark.bitidentity
def test_batch_1_vs_13_identical_stand_in():
    """The pipeline (latents, sampler steps, padding, sorting) treats each seed on its own: with
    a network that does too (the stand-in denoises sample by sample), any batch size, order
    and padding gives the same bits."""
    net = stand_in()
    seeds = np.array([0, 3, 7, 11, 12, 40, 41, 99, 1000, 2**40, 5, 6, 2**63 - 1])
    s1, a = run(net, seeds, 1)
    s13, b = run(net, seeds, 13)
    s4, c = run(net, seeds[::-1].copy(), 4, fixed_shape=True)  # padded last batch, other order
    assert np.array_equal(s1, np.sort(seeds)) and np.array_equal(s1, s13) and np.array_equal(s1, s4)
    assert a.dtype == torch.uint8 and a.shape == (13, 1, 8, 8)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.float().std() > 10  # real images, not a constant


def test_batch_1_vs_3_same_images_up_to_rounding_network():
    """A real network across batch sizes: equal up to float rounding, not bit for bit, because
    the CPU's GEMM/convolution kernels may block (and so sum) another batch shape in another
    order (~1e-7 relative); that can move a pixel across a uint8 boundary, by one level.
    Bit-identity is promised, and tested, for the same batch size (ranks, shards, resume)."""
    net = tiny_net()
    _, a = run(net, [4, 8, 15], 1, num_steps=3)
    _, b = run(net, [4, 8, 15], 3, num_steps=3)
    diff = (a.int() - b.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
    assert a.float().std() > 10


@pytest.mark.bitidentity
def test_image_depends_only_on_seed_and_settings():
    net = stand_in()
    _, a = run(net, [1, 2], 2)
    _, b = run(net, [2, 3], 2)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    _, c = run(net, [1, 2], 2, alpha=0.3)
    assert not torch.equal(a, c)


def test_class_labels_depend_on_seed_only():
    seeds = torch.arange(50, dtype=torch.int64)
    lab = G.class_labels_for(seeds, 10, None)
    assert lab.shape == (50, 10) and torch.equal(lab.sum(1), torch.ones(50))
    assert torch.equal(G.class_labels_for(seeds[7:9], 10, None), lab[7:9])
    assert lab.argmax(1).unique().numel() > 3
    assert torch.equal(G.class_labels_for(seeds[:3], 10, 4).argmax(1), torch.full((3,), 4))
    with pytest.raises(ValueError, match="class must be in"):
        G.class_labels_for(seeds, 10, 10)
    with pytest.raises(ValueError, match="unconditional"):
        G.class_labels_for(seeds, 0, 1)
    net = stand_in(label_dim=10)
    run(net, [3, 4], 2, num_steps=2)
    assert net.seen_labels and net.seen_labels[0].shape == (2, 10)


def test_network_D_mismatch_is_an_error():
    net = stand_in(D=8.0)
    with pytest.raises(ValueError, match=r"D=16 was given but the network was trained with D=8"):
        run(net, [0], 1, D=16)
    run(net, [0], 1, D=8)  # equal D is fine
    with pytest.raises(ValueError, match="mismatch"):
        G.resolve_D(tiny_net(D=128), float("inf"))


def test_write_png_layout_and_npz(tmp_path):
    from PIL import Image

    net = stand_in()
    seeds = [5, 1234, 999]
    _, images = run(net, seeds, 2)
    G.write_images(
        G.generate_images(net, np.array(seeds), 2, num_steps=4),
        outdir=str(tmp_path / "png"),
        npz=str(tmp_path / "out.npz"),
    )
    for seed, img in zip(sorted(seeds), images):
        path = tmp_path / "png" / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"
        assert path.exists(), path
        assert np.array_equal(np.asarray(Image.open(path)), img[0].numpy())
    assert not [f for f in os.listdir(tmp_path / "png" / "000000") if f.startswith(".")]  # no temp files
    arr, s = load_npz_images(str(tmp_path / "out.npz"))
    assert arr.dtype == np.uint8 and arr.shape == (3, 8, 8, 1)
    assert list(s) == sorted(seeds) and np.array_equal(arr, images.permute(0, 2, 3, 1).numpy())
    # ADM's evaluator opens the zip member arr_0.npy itself (evaluations/evaluator.py: open_npz_array)
    with zipfile.ZipFile(tmp_path / "out.npz") as z, z.open("arr_0.npy") as member:
        adm = np.lib.format.read_array(member, allow_pickle=False)
    assert adm.dtype == np.uint8 and adm.shape == (3, 8, 8, 1) and np.array_equal(adm, arr)


COUPLING = 0.05  # the batch-coupled stand-in: a seed's image depends on its whole batch


def _rank_worker(rank, out):
    seeds = checks.check_seeds("0-10")
    mine = G.rank_seeds(seeds, distributed.get_rank(), distributed.get_world_size(), 3)
    G.write_images(G.generate_images(stand_in(batch_coupling=COUPLING), mine, 3, num_steps=4), npz=out)


@pytest.mark.bitidentity
def test_one_vs_two_gloo_ranks_identical(tmp_path):
    """Two ranks give the one-process images bit for bit, even with a network whose samples
    depend on their batch (the worst a BLAS could do): each rank computes whole batches of
    the one-process grid."""
    one, other = str(tmp_path / "one.npz"), str(tmp_path / "other.npz")
    G.write_images(
        G.generate_images(stand_in(batch_coupling=COUPLING), checks.check_seeds("0-10"), 3, num_steps=4), npz=one
    )
    G.write_images(
        G.generate_images(stand_in(batch_coupling=COUPLING), checks.check_seeds("0-10"), 5, num_steps=4), npz=other
    )
    two = str(tmp_path / "two.npz")
    run_ranks(_rank_worker, 2, tmp_path / "ranks", two)
    a, sa = load_npz_images(one)
    b, sb = load_npz_images(two)
    assert list(sa) == list(range(11)) and np.array_equal(sa, sb)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, load_npz_images(other)[0])  # the coupling is felt: other batches differ


def _rank_1_lags_after_each_checkpoint(rank, run_dir):
    """Both ranks generate every checkpoint of `run_dir`. Seeds 0-2 in batches of 4 all go to
    rank 0, and rank 1 returns 2 s late from each checkpoint's writing: by the time it gets
    to the next checkpoint, rank 0 has written all of that checkpoint's images."""
    from pfgmpp_fast import cli

    if rank == 1:
        write = G.write_images

        def late_write(*args, **kwargs):
            count = write(*args, **kwargs)
            time.sleep(2)
            return count

        G.write_images = late_write
    argv = ["generate", "--seeds=0-2", f"--outdir={run_dir}", "--batch", "4", "--steps", "2", "--device", "cpu"]
    assert cli.main([*argv, "--backend", "reference", "--no-progress"]) == 0


def test_a_lagging_rank_does_not_skip_a_checkpoint_written_in_this_run(tmp_path):
    # it once did (it saw all the images there), and its collectives no longer matched rank 0's
    from pfgmpp_fast.checkpoint import save_network

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for kimg in (100, 200):
        save_network(str(run_dir / f"network-snapshot-{kimg:06d}.safetensors"), tiny_net(D=128, seed=kimg))
    run_ranks(_rank_1_lags_after_each_checkpoint, 2, tmp_path / "ranks", str(run_dir), timeout=60)
    for kimg in (100, 200):
        assert sorted(os.listdir(run_dir / f"ckpt_{kimg:06d}" / "000000")) == [f"{s:06d}.png" for s in range(3)]


def test_cli_generate_and_D_mismatch(tmp_path, capsys):
    ckpt = pytest.importorskip("pfgmpp_fast.checkpoint")
    from pfgmpp_fast import cli

    path = str(tmp_path / "net.safetensors")
    ckpt.save_network(path, tiny_net(D=8))
    out = str(tmp_path / "g.npz")
    assert (
        cli.main(["generate", "--network", path, "--seeds", "0-2", "--steps", "2", "--npz", out, "--no-progress"]) == 0
    )
    arr, seeds = load_npz_images(out)
    assert arr.shape == (3, 8, 8, 1) and list(seeds) == [0, 1, 2]
    assert cli.main(["generate", "--network", path, "--D", "16", "--npz", out]) == 2
    assert "network was trained with D=8" in capsys.readouterr().err
    assert cli.main(["generate", "--network", path, "--seeds", "9223372036854775808", "--npz", out]) == 2
    assert "out of range" in capsys.readouterr().err


def test_nan_output_is_reported():
    class Broken(DenoiserNet):
        def forward(self, x, sigma, class_labels=None):
            out = super().forward(x, sigma)
            out[1] = float("nan")
            return out

    g = torch.Generator().manual_seed(0)
    net = Broken(torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, 8.0)
    with pytest.raises(FloatingPointError, match=r"NaN/Inf for seeds \[8\]"):
        run(net, [3, 8, 9], 3, num_steps=2)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backends_give_the_same_images(backend):
    """Same seeds, other backend: the same images up to float rounding (the RNG is bit-exact;
    transcendentals and fp32 arithmetic may move a pixel across a uint8 boundary)."""
    from pfgmpp_fast import ops

    try:
        ops.resolve_backend(backend, "cpu")
    except (RuntimeError, ValueError) as exc:
        pytest.skip(f"backend {backend} not available here: {exc}")
    net = stand_in()
    kw = dict(num_steps=3, alpha=0.1, S_churn=5.0)
    _, ref = run(net, [2, 7], 2, backend="reference", **kw)
    _, out = run(net, [2, 7], 2, backend=backend, **kw)
    diff = (out.int() - ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.05
    _, other = run(net, [2, 8], 2, backend=backend, **kw)  # a different seed differs
    assert torch.equal(other[0], out[0]) and (other[1].int() - out[1].int()).abs().sum() > 64
