"""The `dataset` command: the published zip format, from every source kind, images equal to
what the published dataset_tool computes (stated below with Pillow operations of our own),
checked inputs and atomic output."""

import io
import json
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from pfgmpp_fast import cli
from pfgmpp_fast.training.data import dataset_to_uint8, load_dataset
from pfgmpp_fast.training.dataset_tool import build_dataset

LANCZOS = Image.Resampling.LANCZOS


def published_way(image: np.ndarray, transform, size):
    """What the published dataset_tool makes of one decoded source image, written as Pillow
    operations: resize to (W, H) if the size differs; center-crop = the centred square box,
    as RGB, resized; center-crop-wide = the centred rows of height round(W·h/w) (skipped when
    w < W or that is < H), as RGB, resized to (W, H), pasted at row (W − H) // 2 of a black
    W×W image."""
    pil = Image.fromarray(image)
    w, h = pil.size
    if transform is None:
        return image if size is None or size == (w, h) else np.array(pil.resize(size, LANCZOS))
    W, H = size
    if transform == "center-crop":
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        return np.array(pil.convert("RGB").crop(box).resize(size, LANCZOS))
    rows = int(round(W * h / w))
    if w < W or rows < H:
        return None
    strip = pil.convert("RGB").crop((0, (h - rows) // 2, w, (h - rows) // 2 + rows)).resize(size, LANCZOS)
    canvas = Image.new("RGB", (W, W))
    canvas.paste(strip, (0, (W - H) // 2))
    return np.array(canvas)


def read_zip(path):
    """{name: decoded array}, the labels table, and the zip's entries."""
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        images = {
            i.filename: np.array(Image.open(io.BytesIO(zf.read(i.filename))))
            for i in infos
            if i.filename.endswith(".png")
        }
        meta = json.loads(zf.read("dataset.json"))
    return images, meta["labels"], infos


def check_against_published(out, sources, labels, transform, size):
    """Every written image equals the published way of its source image (k/N = N/N)."""
    images, table, infos = read_zip(out)
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    assert infos[-1].filename == "dataset.json"
    expected = {}
    for index, image in enumerate(sources):
        want = published_way(image, transform, size)
        if want is not None:
            digits = f"{index:08d}"
            expected[f"{digits[:5]}/img{digits}.png"] = (want, None if labels is None else labels[index])
    assert sorted(images) == sorted(expected) and [i.filename for i in infos[:-1]] == list(expected)
    equal = sum(np.array_equal(images[name], want) for name, (want, _) in expected.items())
    assert equal == len(expected), f"{equal}/{len(expected)} images equal to the published way"
    if labels is None:
        assert table is None
    else:
        assert table == [[name, lab] for name, (_, lab) in expected.items()]
    return len(expected)


def rgb_images(n, h, w, seed=0):
    return [np.random.default_rng(seed + i).integers(0, 256, (h, w, 3), dtype=np.uint8) for i in range(n)]


# Source sizes below have odd margins and a width:height that rounds at .5, so each offset and
# rounding of the published transform matters.
TRANSFORMS = [
    (None, None),
    (None, (16, 16)),
    ("center-crop", (16, 16)),
    ("center-crop-wide", (16, 8)),
    ("center-crop-wide", (16, 9)),
]


@pytest.mark.parametrize("transform,size", TRANSFORMS)
def test_folder_with_class_folders(tmp_path, transform, size):
    src = tmp_path / "src"
    images = rgb_images(5, 32, 32) if size is None else rgb_images(5, 31, 40)
    # class folders (published: labels = index of the sorted top-level folder names)
    placement = [("cat", "b.png"), ("cat", "a.jpg"), ("dog", "x.png"), ("ant", "z.png"), ("dog", "sub/y.png")]
    order = sorted(range(5), key=lambda i: (placement[i][0], *placement[i][1].split("/")))
    for i, (folder, name) in enumerate(placement):
        path = src / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(path, **({"quality": 100} if name.endswith(".jpg") else {}))
    (src / "notes.txt").write_text("not an image")
    decoded = [np.array(Image.open(src / placement[i][0] / placement[i][1])) for i in order]  # JPEG: as decoded
    labels = [{"ant": 0, "cat": 1, "dog": 2}[placement[i][0]] for i in order]
    out = str(tmp_path / "out.zip")
    build_dataset(str(src), out, transform, size)
    check_against_published(out, decoded, labels, transform, size)


@pytest.mark.parametrize("transform,size", TRANSFORMS)
def test_zip_with_dataset_json_and_grey_images(tmp_path, transform, size):
    images = [
        np.random.default_rng(i).integers(0, 256, (32, 32) if size is None else (25, 20), dtype=np.uint8)
        for i in range(4)
    ]
    names = ["b/1.png", "a/2.png", "a/10.png", "c.png"]
    src = str(tmp_path / "in.zip")
    with zipfile.ZipFile(src, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, image in zip(names, images):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="png")
            zf.writestr(name, buf.getvalue())
        zf.writestr("dataset.json", json.dumps({"labels": [[n, i + 3] for i, n in enumerate(names)]}))
    order = sorted(range(4), key=lambda i: names[i])  # published: sorted member names
    out = str(tmp_path / "out.zip")
    build_dataset(src, out, transform, size)
    check_against_published(out, [images[i] for i in order], [i + 3 for i in order], transform, size)


@pytest.mark.parametrize("kind", ["npy-nhwc", "npy-nchw-float", "npz-labels"])
@pytest.mark.parametrize("transform,size", TRANSFORMS)
def test_arrays(tmp_path, kind, transform, size):
    shape = (6, 32, 32, 3) if size is None else (6, 25, 32, 3)
    images = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    labels = None
    path = str(tmp_path / ("a.npz" if kind.startswith("npz") else "a.npy"))
    if kind == "npy-nhwc":
        np.save(path, images)
    elif kind == "npy-nchw-float":
        np.save(path, images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)  # round trips to the bytes
    else:
        labels = [5, 0, 2, 2, 1, 9]
        np.savez(path, images=images, labels=np.array(labels))
    out = str(tmp_path / "out.zip")
    build_dataset(path, out, transform, size)
    check_against_published(out, list(images), labels, transform, size)


def _cifar_archive(path, per_batch=3, protocol=2, key=bytes):
    """A tiny archive shaped like cifar-10-python.tar.gz (five training batches, a test batch,
    the meta file): pickled dicts with bytes keys (the real Python 2 str keys, read as bytes;
    ``key=str``: as Python 3 str), data uint8 [n, 3072] of R, G, B planes."""
    k = (lambda text: text.encode()) if key is bytes else str
    rng = np.random.default_rng(7)
    images, labels = [], []
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
            if name == "batches.meta":
                obj = {k("label_names"): [b"airplane"] * 10, k("num_cases_per_batch"): per_batch}
            else:
                data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
                lab = rng.integers(0, 10, per_batch).tolist()
                obj = {
                    k("batch_label"): name.encode(),
                    k("labels"): lab,
                    k("data"): data,
                    k("filenames"): [b"x.png"] * per_batch,
                }
                if name != "test_batch":
                    images += list(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                    labels += lab
            payload = pickle.dumps(obj, protocol=protocol)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return images, labels


@pytest.mark.parametrize("protocol,key", [(2, bytes), (5, bytes), (2, str)])
@pytest.mark.parametrize("transform,size", [(None, None), (None, (16, 16)), ("center-crop", (8, 8))])
def test_cifar10_python_archive(tmp_path, protocol, key, transform, size):
    path = str(tmp_path / "cifar-10-python.tar.gz")
    images, labels = _cifar_archive(path, protocol=protocol, key=key)
    out = str(tmp_path / "out.zip")
    assert build_dataset(path, out, transform, size) == 15
    check_against_published(out, images, labels, transform, size)


def test_cifar10_archive_runs_no_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = str(tmp_path / "cifar-10-python.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        payload = pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match="data_batch_1.*not allowed"):
        build_dataset(path, str(tmp_path / "out.zip"))
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.zip").exists()


@pytest.mark.parametrize("transform,size", [(None, None), ("center-crop", (16, 16))])
def test_digits(tmp_path, transform, size):
    digits = load_dataset("digits", use_labels=True, cache=False)
    images = list(dataset_to_uint8(digits)[:, 0].numpy())
    out = str(tmp_path / "digits.zip")
    build_dataset("digits", out, transform, size, max_images=40)
    check_against_published(out, images[:40], digits.labels.argmax(1)[:40].tolist(), transform, size)


def test_written_zip_loads_for_training_with_its_labels(tmp_path, capsys):
    """The command's zip is read by the training loader (train --data out.zip) with the same
    images and labels; a folder destination holds the same files."""
    images = np.random.default_rng(3).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(10) % 4
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    out = str(tmp_path / "data" / "out.zip")
    assert cli.main(["dataset", "--source", str(tmp_path / "a.npz"), "--dest", out]) == 0
    assert "wrote 10 images" in capsys.readouterr().err
    ds = load_dataset(out, use_labels=True, cache=False)
    assert torch.equal(ds.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(ds.labels.argmax(1), torch.from_numpy(labels))
    folder = str(tmp_path / "folder")
    assert cli.main(["dataset", "--source", out, "--dest", folder]) == 0
    ds2 = load_dataset(folder, use_labels=True, cache=False)
    assert torch.equal(ds2.images, ds.images) and torch.equal(ds2.labels, ds.labels)
    assert sorted(os.listdir(folder)) == ["00000", "dataset.json"]


def _folder_of(tmp_path, sizes, corrupt=None):
    src = tmp_path / "src"
    src.mkdir()
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(src / f"{i}.png")
    if corrupt is not None:
        (src / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return src


def test_bad_inputs_name_the_file_and_leave_nothing(tmp_path, capsys):
    out = tmp_path / "out.zip"
    mixed = _folder_of(tmp_path, [(16, 16), (16, 16), (8, 8)])
    assert cli.main(["dataset", "--source", str(mixed), "--dest", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2.png is 8x8" in err and "0.png (the first image) is 16x16" in err
    assert "--resolution" in err and not out.exists() and os.listdir(tmp_path) == ["src"]
    # with --resolution the sizes may differ
    assert cli.main(["dataset", "--source", str(mixed), "--dest", str(out), "--resolution", "8x8"]) == 0
    out.unlink()
    (mixed / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert cli.main(["dataset", "--source", str(mixed), "--dest", str(out), "--resolution", "8x8"]) == 2
    err = capsys.readouterr().err
    assert "3.png" in err and "corrupt" in err and not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no temporary file left


@pytest.mark.parametrize(
    "argv,option",
    [
        (["--source", "nowhere.zip"], "--source"),
        (["--source", "digits", "--transform", "center-crop"], "--transform"),
        (["--source", "digits", "--resolution", "8y8"], "--resolution"),
        (["--source", "digits", "--resolution", "8x16", "--transform", "center-crop-wide"], "--resolution"),
        (["--source", "digits", "--max-images", "0"], "--max-images"),
        (["--source", "digits", "--resolution", "12x12"], "--source"),  # not a power of two
        (["--source", "digits", "--dest", "{tmp}/full"], "--dest"),
    ],
)
def test_bad_options(tmp_path, capsys, argv, option):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--dest" not in argv:
        argv += ["--dest", str(tmp_path / "out.zip")]
    assert cli.main(["dataset", *argv]) == 2
    err = capsys.readouterr().err
    assert option in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path / "out.zip").exists()
