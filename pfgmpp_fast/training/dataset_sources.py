"""What the `dataset` command reads: images, one by one, with their class labels.

Each reader returns a :class:`Source`: the number of images and an iterator of
``(name, image, label)`` — ``image`` uint8 ``[H, W]`` (grey) or ``[H, W, 3]``, ``name`` the
file (or array element) it came from, ``label`` an int or None. The readers follow the
published dataset_tool (EDM / PFGM++) where it defines a behaviour:

* a folder: every file with an extension Pillow knows, in the order of ``sorted`` paths
  (component by component); labels from ``dataset.json`` at the top, otherwise from the
  top-level folder names (sorted, numbered 0, 1, ...) when there are at least two;
* a zip: the members with an image extension in sorted order; labels from ``dataset.json``;
* ``cifar-10-python.tar.gz`` (any ``.tar.gz``/``.tgz`` holding ``cifar-10-batches-py``): the
  50 000 training images of ``data_batch_1`` … ``_5`` with their labels, read without
  running code from the archive (safe_pickle.load_array_pickle);
* ``.npy``/``.npz`` arrays (training/data.py's layouts; float arrays in [-1, 1] become
  round((x + 1) · 127.5)) and ``digits`` (the embedded data set, values 0..16 → 0..255).

Images are decoded as the training loader decodes them (data.decode_image): grey and RGB as
stored, other modes (palette, RGBA, …) converted to RGB — where the published tool keeps a
palette image's indices and stops at an alpha channel.
"""

from __future__ import annotations

import json
import os
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from pfgmpp_fast.safe_pickle import load_array_pickle
from pfgmpp_fast.training.data import ImageDataset, dataset_to_uint8, decode_image, load_array, load_dataset

__all__ = ["Source", "open_source", "SOURCE_KINDS"]

SOURCE_KINDS = "a folder of images, a .zip, a .npy/.npz array, cifar-10-python.tar.gz or 'digits'"
_CIFAR_DIR = "cifar-10-batches-py"


@dataclass
class Source:
    count: int
    items: Iterator[tuple]


def _image_extensions() -> set:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def _has_image_extension(name: str, extensions: set) -> bool:
    return "." + name.rsplit(".", 1)[-1].lower() in extensions


def _labels_table(text: bytes, where: str) -> dict:
    """{file name: label} of a dataset.json ({} when its labels are null)."""
    try:
        table = json.loads(text)["labels"]
        return {} if table is None else {str(name): label for name, label in table}
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{where} is not a dataset.json of the published format ({{\"labels\": [[file name, label], ...]}}): {exc}"
        ) from None


def _folder(path: str, limit: Optional[int]) -> Source:
    extensions = _image_extensions()
    files = [p for p in sorted(Path(path).rglob("*")) if _has_image_extension(p.name, extensions) and p.is_file()]
    names = [p.relative_to(path).as_posix() for p in files]
    meta = os.path.join(path, "dataset.json")
    labels = {}
    if os.path.isfile(meta):
        with open(meta, "rb") as f:
            labels = _labels_table(f.read(), meta)
    if not labels:  # class folders: the top-level folder of each file
        tops = [n.split("/", 1)[0] if "/" in n else "" for n in names]
        classes = {top: i for i, top in enumerate(sorted(set(tops)))}
        if len(classes) > 1:
            labels = {n: classes[top] for n, top in zip(names, tops)}
    count = len(names) if limit is None else min(len(names), limit)

    def items():
        for file, name in zip(files[:count], names):
            try:
                data = file.read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read {file}: {exc}") from None
            yield str(file), decode_image(data, str(file)), labels.get(name)

    return Source(count, items())


def _zip(path: str, limit: Optional[int]) -> Source:
    try:
        with zipfile.ZipFile(path) as zf:
            all_names = zf.namelist()
            labels = (
                _labels_table(zf.read("dataset.json"), f"{path}:dataset.json") if "dataset.json" in all_names else {}
            )
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path} is not a readable zip file: {exc}") from None
    extensions = _image_extensions()
    names = [n for n in sorted(all_names) if _has_image_extension(n, extensions)]
    count = len(names) if limit is None else min(len(names), limit)

    def items():
        with zipfile.ZipFile(path) as zf:
            for name in names[:count]:
                try:
                    data = zf.read(name)
                except (zipfile.BadZipFile, OSError, EOFError) as exc:  # e.g. a CRC error
                    raise ValueError(f"cannot read {path}:{name}: {exc}") from None
                yield f"{path}:{name}", decode_image(data, f"{path}:{name}"), labels.get(name)

    return Source(count, items())


def _cifar_batch(tar: tarfile.TarFile, path: str, member: str):
    name = f"{path}:{member}"
    try:
        with tar.extractfile(f"{_CIFAR_DIR}/{member}") as f:
            batch = load_array_pickle(f, name)
    except KeyError:
        raise ValueError(f"{path} is not the CIFAR-10 python archive: it has no {_CIFAR_DIR}/{member}") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"cannot read {name}: {exc}") from None
    batch = (
        {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in batch.items()}
        if isinstance(batch, dict)
        else {}
    )
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{name}: 'data' must be a uint8 array [N, 3072] (CIFAR-10's 32x32 RGB rows)")
    labels = np.asarray(labels if labels is not None else [])
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}: 'labels' must hold one integer class per image ({data.shape[0]})")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar10(path: str, limit: Optional[int]) -> Source:
    try:
        with tarfile.open(path, "r:gz") as tar:
            batches = [_cifar_batch(tar, path, f"data_batch_{i}") for i in range(1, 6)]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable .tar.gz archive: {exc}") from None
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return _array_source(images, labels, f"{path}:{_CIFAR_DIR}", limit)


def _array_source(images: np.ndarray, labels, name: str, limit: Optional[int]) -> Source:
    """images uint8 [N, H, W, C] (C in 1, 3) or [N, H, W]."""
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    count = len(images) if limit is None else min(len(images), limit)
    labels = None if labels is None else np.asarray(labels)
    return Source(
        count, ((f"{name}[{i}]", images[i], None if labels is None else int(labels[i])) for i in range(count))
    )


def _arrays(path: str, limit: Optional[int]) -> Source:
    images, labels = load_array(path)
    if labels is not None and len(labels) != images.shape[0]:
        raise ValueError(f"{path}: {len(labels)} labels for {images.shape[0]} images")
    if labels is not None and not np.issubdtype(np.asarray(labels).dtype, np.integer):
        raise ValueError(f"{path}: 'labels' must be integer classes, got {np.asarray(labels).dtype}")
    array = dataset_to_uint8(ImageDataset(images)).permute(0, 2, 3, 1).numpy()
    return _array_source(array, labels, path, limit)


def _digits(limit: Optional[int]) -> Source:
    dataset = load_dataset("digits", use_labels=True, cache=False)
    array = dataset_to_uint8(dataset).permute(0, 2, 3, 1).numpy()
    return _array_source(array, dataset.labels.argmax(1).numpy(), "digits", limit)


def _is_cifar_archive(path: str) -> bool:
    return os.path.basename(path) == "cifar-10-python.tar.gz" or path.lower().endswith((".tar.gz", ".tgz"))


def open_source(path: str, max_images: Optional[int] = None) -> Source:
    """The reader of ``path`` by its kind (the module docstring); ValueError for anything else."""
    if path == "digits":
        return _digits(max_images)
    if os.path.isdir(path):
        return _folder(path, max_images)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file or folder {path!r} (expected {SOURCE_KINDS})")
    if _is_cifar_archive(path):
        return _cifar10(path, max_images)
    if path.lower().endswith(".zip"):
        return _zip(path, max_images)
    if path.lower().endswith((".npy", ".npz")):
        return _arrays(path, max_images)
    raise ValueError(f"unsupported source {path!r}: expected {SOURCE_KINDS}")
