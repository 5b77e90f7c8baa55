"""Datasets, the global batch sampler, the augmentation pipe and the atomic writers."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from pfgmpp_fast.training.augment import AugmentPipe
from pfgmpp_fast.training.data import GlobalBatchSampler, dataset_to_uint8, load_dataset
from pfgmpp_fast.utils import io_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_images(n=7, res=8, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, res, res, c), dtype=np.uint8)


def _write_folder(root, images, labels=None):
    os.makedirs(os.path.join(root, "00000"), exist_ok=True)
    names = []
    for i, img in enumerate(images):
        name = f"00000/img{i:08d}.png"
        Image.fromarray(img if img.shape[-1] == 3 else img[..., 0]).save(os.path.join(root, name))
        names.append(name)
    if labels is not None:
        with open(os.path.join(root, "dataset.json"), "w") as f:
            json.dump({"labels": [[n, int(l)] for n, l in zip(names, labels)]}, f)
    return names


def _zip_folder(root, zip_path):
    with zipfile.ZipFile(zip_path, "w") as zf:
        for dirpath, _, files in os.walk(root):
            for f in files:
                full = os.path.join(dirpath, f)
                zf.write(full, os.path.relpath(full, root).replace(os.sep, "/"))


# ----------------------------------------------------------------------------------------
# Loading


def test_digits_embedded():
    ds = load_dataset("digits", use_labels=True)
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.float32
    assert ds.images.min() == -1 and ds.images.max() == 1
    assert ds.labels.shape == (1797, 10) and torch.all(ds.labels.sum(1) == 1)
    from sklearn.datasets import load_digits

    raw = load_digits()
    torch.testing.assert_close(ds.images[5, 0], torch.from_numpy(raw.images[5] / 8.0 - 1).float())
    assert int(ds.labels[5].argmax()) == raw.target[5]
    x, lab = ds.get_batch(torch.tensor([0, 5]))
    assert x.shape == (2, 1, 8, 8) and lab.shape == (2, 10)
    u8 = dataset_to_uint8(ds)
    assert u8.dtype == torch.uint8 and u8.shape == (1797, 1, 8, 8) and u8.max() == 255


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_png_folder_and_zip_with_labels(tmp_path, kind):
    images = _random_images(7)
    labels = np.array([0, 3, 1, 2, 3, 0, 1])
    root = tmp_path / "ds"
    _write_folder(str(root), images, labels)
    spec = str(root)
    if kind == "zip":
        spec = str(tmp_path / "ds.zip")
        _zip_folder(str(root), spec)
    ds = load_dataset(spec, use_labels=True, cache=False)
    assert ds.images.dtype == torch.uint8
    assert torch.equal(ds.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(ds.labels.argmax(1), torch.from_numpy(labels))
    assert ds.label_dim == 4
    x, _ = ds.get_batch(torch.arange(7))
    torch.testing.assert_close(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert torch.equal(dataset_to_uint8(ds), ds.images)


def test_grey_png_folder_without_labels(tmp_path):
    images = _random_images(3, c=1)
    _write_folder(str(tmp_path), images)
    ds = load_dataset(str(tmp_path), cache=False)
    assert ds.images.shape == (3, 1, 8, 8) and ds.labels is None
    with pytest.raises(ValueError, match="no labels"):
        load_dataset(str(tmp_path), use_labels=True, cache=False)


@pytest.mark.parametrize("layout", ["nhwc_u8", "nchw_u8", "nhw_u8", "nchw_f32_npz"])
def test_arrays(tmp_path, layout):
    u8 = _random_images(5, res=4, c=3 if layout != "nhw_u8" else 1)
    expected = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    if layout == "nhwc_u8":
        path = tmp_path / "a.npy"
        np.save(path, u8)
    elif layout == "nchw_u8":
        path = tmp_path / "a.npy"
        np.save(path, u8.transpose(0, 3, 1, 2))
    elif layout == "nhw_u8":
        path = tmp_path / "a.npy"
        np.save(path, u8[..., 0])
    else:
        path = tmp_path / "a.npz"
        np.savez(path, images=expected.numpy(), labels=np.array([1, 0, 2, 2, 1]))
    ds = load_dataset(str(path), use_labels=layout.endswith("npz"), cache=False)
    x, labels = ds.get_batch(torch.arange(5))
    torch.testing.assert_close(x, expected)
    if layout.endswith("npz"):
        assert torch.equal(labels.argmax(1), torch.tensor([1, 0, 2, 2, 1]))


def test_xflip_doubles_and_mirrors():
    ds = load_dataset("digits", xflip=True)
    assert len(ds) == 2 * 1797
    x, _ = ds.get_batch(torch.tensor([3, 1797 + 3]))
    assert torch.equal(x[1], x[0].flip(-1))


def test_bad_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset(str(tmp_path / "missing.zip"))
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"this is not a zip file")
    with pytest.raises(ValueError, match="not a readable zip"):
        load_dataset(str(bad_zip), cache=False)
    # A zip holding a truncated PNG.
    root = tmp_path / "ds"
    _write_folder(str(root), _random_images(2))
    png = root / "00000" / "img00000001.png"
    png.write_bytes(png.read_bytes()[:30])
    with pytest.raises(ValueError, match="corrupt or unreadable image"):
        load_dataset(str(root), cache=False)
    corrupt_npy = tmp_path / "c.npy"
    corrupt_npy.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="cannot read array"):
        load_dataset(str(corrupt_npy), cache=False)
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((2, 1, 4, 4), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        load_dataset(str(nan), cache=False)
    out_of_range = tmp_path / "range.npy"
    np.save(out_of_range, np.full((2, 1, 4, 4), 3.0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        load_dataset(str(out_of_range), cache=False)
    with pytest.raises(ValueError, match="resolution 8, but resolution=32"):
        load_dataset("digits", resolution=32)
    with pytest.raises(ValueError, match="unsupported"):
        load_dataset(__file__, cache=False)


# ----------------------------------------------------------------------------------------
# Order of samples


def test_global_batch_sampler_is_rank_independent():
    sampler = GlobalBatchSampler(37, seed=5)
    for step in (0, 1, 4):
        whole = sampler.batch(step, 12)
        parts = torch.cat([sampler.batch(step, 12, rank=r, world_size=3) for r in range(3)])
        assert torch.equal(whole, parts)
    # Each epoch is a permutation of the whole data set.
    first_epoch = sampler.positions(0, 37)
    assert torch.equal(first_epoch.sort().values, torch.arange(37))
    assert not torch.equal(first_epoch, sampler.positions(37, 37))
    assert not torch.equal(first_epoch, GlobalBatchSampler(37, seed=6).positions(0, 37))
    with pytest.raises(ValueError, match="divisible"):
        sampler.batch(0, 10, rank=0, world_size=3)


@pytest.fixture
def host_copies(monkeypatch):
    """Every host-to-device copy, with whether its source was pinned ('meta' stands in for
    the GPU; pinning is recorded instead of done, as this machine may have no accelerator)."""
    from pfgmpp_fast.training import data

    pinned, copies = [], []

    def fake_pinned_empty(shape, dtype):
        pinned.append(torch.empty(shape, dtype=dtype))
        return pinned[-1]

    def fake_pin_memory(self):
        pinned.append(self.clone())
        return pinned[-1]

    real_to = torch.Tensor.to

    def spy_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type != "cpu":
            copies.append(
                dict(
                    pinned=any(self.data_ptr() == p.data_ptr() for p in pinned),
                    non_blocking=kwargs.get("non_blocking", False),
                    dtype=self.dtype,
                )
            )
        return out

    monkeypatch.setattr(data, "pinned_empty", fake_pinned_empty)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    return copies


def test_sampler_indices_stay_on_the_data_set_device(host_copies, monkeypatch):
    """The permutation is drawn once per epoch and kept on the device: a step slices it
    there, with no host-to-device copy (and no host sync)."""
    draws = []
    real_randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: draws.append(1) or real_randperm(*a, **k))
    ds = load_dataset("digits", xflip=True, use_labels=True).to("meta")
    sampler = GlobalBatchSampler(len(ds), seed=3, device=ds.images.device)
    host_copies.clear()  # the data set's own move
    epoch_steps = len(ds) // 64
    for step in range(epoch_steps):
        indices = sampler.batch(step, 64)
        assert indices.device.type == "meta" and indices.dtype == torch.int64 and indices.shape == (64,)
        x, labels = ds.get_batch(indices)
        assert x.device.type == "meta" and x.shape == (64, 1, 8, 8) and labels.device.type == "meta"
    assert len(draws) == 1 and len(host_copies) == 1  # one permutation, moved once
    sampler.batch(epoch_steps + 1, 64)  # the next epoch: one more
    assert len(draws) == 2 and len(host_copies) == 2
    assert all(c["pinned"] and c["non_blocking"] for c in host_copies)


def test_cpu_data_set_feeds_an_accelerator_through_pinned_memory(host_copies):
    ds = load_dataset("digits", xflip=True, use_labels=True)
    sampler = GlobalBatchSampler(len(ds), seed=0)
    for step in range(3):
        x, labels = ds.get_batch(sampler.batch(step, 16), device="meta")
        assert x.device.type == "meta" and x.dtype == torch.float32 and labels.device.type == "meta"
    assert host_copies and all(c["pinned"] and c["non_blocking"] for c in host_copies), host_copies
    assert ds.images.dtype in {c["dtype"] for c in host_copies}  # images travel as stored (uint8: 1 B/pixel)
    # A CPU index tensor for a data set on the accelerator is staged through pinned memory too.
    on_device = ds.to("meta")
    host_copies.clear()
    on_device.get_batch(torch.tensor([0, 1800]))
    assert host_copies and all(c["pinned"] for c in host_copies)


def test_get_batch_same_values_on_host_and_device_paths():
    ds = load_dataset("digits", xflip=True, use_labels=True)
    idx = torch.tensor([0, 5, 1797, 1797 + 5, 3000])
    x, labels = ds.get_batch(idx)
    x2, labels2 = ds.get_batch(idx, device="cpu")
    assert torch.equal(x, x2) and torch.equal(labels, labels2)
    assert torch.equal(x[2], x[0].flip(-1)) and x.min() >= -1 and x.max() <= 1


# ----------------------------------------------------------------------------------------
# Augmentation


def test_augment_labels_and_determinism():
    images = torch.rand(16, 3, 8, 8) * 2 - 1
    pipe = AugmentPipe.edm_default(0.5)
    assert pipe.dim == 9
    ids = torch.arange(100, 116)
    out, labels = pipe(images, 7, ids)
    assert out.shape == images.shape and labels.shape == (16, 9) and labels.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Depends only on (key, sample id): a sub-batch in another order gives the same results.
    perm = torch.tensor([5, 2, 11])
    out2, labels2 = pipe(images[perm], 7, ids[perm])
    torch.testing.assert_close(out2, out[perm])
    torch.testing.assert_close(labels2, labels[perm])
    # Images whose labels are all zero are passed through bit-exactly.
    untouched = labels.abs().sum(1) == 0
    assert torch.equal(out[untouched], images[untouched])
    assert not torch.equal(out[~untouched], images[~untouched])
    # p = 0: no augmentation at all.
    out0, labels0 = AugmentPipe.edm_default(0.0)(images, 7, ids)
    assert torch.equal(out0, images) and torch.all(labels0 == 0)


def test_augment_pixel_transforms_are_exact():
    images = torch.rand(32, 1, 6, 6)
    out, labels = AugmentPipe(p=1, xflip=1)(images, 3, torch.arange(32))
    flipped = labels[:, 0] == 1
    assert 0 < flipped.sum() < 32
    assert torch.equal(out[flipped], images[flipped].flip(-1)) and torch.equal(out[~flipped], images[~flipped])
    out, labels = AugmentPipe(p=1, rotate_int=1)(images, 3, torch.arange(32))
    for i in range(32):
        a, b = int(labels[i, 0]), int(labels[i, 1])
        q = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}[(a, b)]
        ref = images[i]
        if q in (1, 2):
            ref = ref.flip(-1)
        if q in (2, 3):
            ref = ref.flip(-2)
        if q in (1, 3):
            ref = ref.transpose(-1, -2)
        assert torch.equal(out[i], ref)
    out, labels = AugmentPipe(p=1, translate_int=1, translate_int_max=0.34)(images, 3, torch.arange(32))
    tx = (labels[:, 0] * 6 * 0.34).round().long()
    ty = (labels[:, 1] * 6 * 0.34).round().long()
    for i in range(32):
        x = (torch.arange(6) - tx[i]).abs()
        x = torch.where(x > 5, 10 - x, x)
        y = (torch.arange(6) - ty[i]).abs()
        y = torch.where(y > 5, 10 - y, y)
        assert torch.equal(out[i], images[i][:, y][:, :, x])


def test_augment_geometric_transform_matches_its_label():
    """The warp of each image is the rotation its label names; a rotation by 180° is a double flip."""
    images = torch.rand(64, 1, 8, 8)
    pipe = AugmentPipe(p=1, rotate_frac=1)
    out, labels = pipe(images, 11, torch.arange(64))
    angle = torch.atan2(labels[:, 1], labels[:, 0] + 1)
    assert angle.abs().max() <= torch.pi + 1e-6 and angle.std() > 1
    # Recompute one sample's warp independently: the transform is a rotation of the grid.
    i = int(angle.abs().argmax())
    G = torch.tensor(
        [[torch.cos(angle[i]), -torch.sin(angle[i]), 0], [torch.sin(angle[i]), torch.cos(angle[i]), 0], [0, 0, 1]]
    ).view(1, 3, 3)
    torch.testing.assert_close(out[i : i + 1], AugmentPipe._warp(images[i : i + 1], G))
    G_pi = torch.tensor([[-1.0, 0, 0], [0, -1.0, 0], [0, 0, 1]]).view(1, 3, 3)
    torch.testing.assert_close(
        AugmentPipe._warp(images[:2], G_pi.expand(2, 3, 3)), images[:2].flip(-1).flip(-2), atol=1e-5, rtol=0
    )


def test_augment_bad_arguments():
    with pytest.raises(ValueError, match="p"):
        AugmentPipe(p=1.5)
    with pytest.raises(ValueError, match="scale"):
        AugmentPipe(scale=-1)
    with pytest.raises(TypeError, match="images"):
        AugmentPipe.edm_default()(torch.zeros(3, 8, 8), 0, torch.arange(3))


# ----------------------------------------------------------------------------------------
# Atomic writers


def test_atomic_writers_roundtrip(tmp_path):
    path = tmp_path / "sub" / "x.json"
    io_utils.atomic_save_json(path, {"a": 1, "b": [1.5, float("inf")]})
    assert json.loads(path.read_text())["a"] == 1
    state = {"w": torch.randn(3, 4).to(memory_format=torch.contiguous_format), "n": 3, "nested": {"t": [1, 2]}}
    io_utils.atomic_torch_save_state(tmp_path / "s.pt", state)
    loaded = io_utils.load_torch_state(tmp_path / "s.pt")
    assert torch.equal(loaded["w"], state["w"]) and loaded["nested"] == {"t": [1, 2]}
    assert not [p for p in os.listdir(tmp_path) if io_utils.is_temp_file(p)]
    with pytest.raises(TypeError, match="only tensors and plain types"):
        io_utils.atomic_torch_save_state(tmp_path / "bad.pt", {"obj": object()})
    (tmp_path / "corrupt.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        io_utils.load_torch_state(tmp_path / "corrupt.pt")


def test_kill_during_atomic_write_keeps_old_file(tmp_path):
    target = tmp_path / "state.bin"
    io_utils.atomic_write_bytes(target, b"old contents")
    code = (
        "import sys; from pfgmpp_fast.utils import io_utils; "
        "io_utils.atomic_write_bytes(sys.argv[1], b'new contents' * 1000)"
    )
    env = {**os.environ, "PFGMPP_FAST_KILL_DURING_WRITE": "state.bin", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", code, str(target)], env=env)
    assert proc.returncode == -9
    assert target.read_bytes() == b"old contents"
    leftovers = [p for p in os.listdir(tmp_path) if p != "state.bin"]
    assert len(leftovers) == 1 and io_utils.is_temp_file(leftovers[0])
    assert os.path.getsize(tmp_path / leftovers[0]) == len(b"new contents" * 1000) // 2
