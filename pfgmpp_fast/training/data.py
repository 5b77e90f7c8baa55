"""Datasets for training: the published formats, numpy arrays and the embedded digits.

``load_dataset(spec)`` accepts

* ``"digits"`` — the embedded default: scikit-learn's bundled ``load_digits`` (1797 grey
  8×8 images, labels 0..9; no download), pixel values 0..16 mapped linearly to [-1, 1].
* a directory or ``.zip`` of images in the published layout (EDM's dataset_tool: PNG/JPEG
  files in any sub-folders, optional ``dataset.json`` = ``{"labels": [[fname, label], ...]}``
  with integer class labels), all square and of one size;
* ``.npy`` / ``.npz`` arrays (``.npz``: key ``images``, else the first array; optional key
  ``labels`` of integer classes). Layout: ``[N, H, W]`` (grey), ``[N, H, W, C]`` or
  ``[N, C, H, W]`` with C in {1, 3} (NHWC when the last axis is 1 or 3, otherwise NCHW).
  ``uint8`` arrays are pixel values 0..255 (mapped to [-1, 1] as x / 127.5 − 1);
  floating-point arrays must already lie in [-1, 1].

The whole data set is one tensor (uint8 when the source is 8-bit, float32 otherwise) and
batches are gathered by index — fast for the small data sets we train on CPUs and cheap to
keep on the GPU for CIFAR-sized ones. A data set on disk is decoded once per node into a
cache file that every rank memory-maps (data_cache.py), so another rank or a restart costs
neither a decode nor a copy. Everything is validated when decoding, so a missing, corrupt
or wrong-size data set stops before any training step.

Batches come from :class:`GlobalBatchSampler`: the order of samples is a function of the
seed and the global position only (one permutation per epoch), so rank ``r`` of ``W`` takes
its slice of the same global batch, whatever ``W`` is.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from pfgmpp_fast.training.data_cache import Decoder, decode_to_array, load_cached
from pfgmpp_fast.utils.distributed import needs_pinning, to_device

__all__ = [
    "ImageDataset",
    "load_dataset",
    "load_array",
    "dataset_to_uint8",
    "GlobalBatchSampler",
    "IMAGE_EXTENSIONS",
    "decode_image",
    "default_cache_dir",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_CACHE: dict = {}


@dataclass
class ImageDataset:
    """An in-memory image data set: ``images`` [N, C, H, W] uint8 (0..255) or float32
    ([-1, 1]); ``labels`` one-hot float32 [N, label_dim] or None. With ``xflip`` the data
    set has 2N items, item i ≥ N being item i − N mirrored left-right (as in EDM)."""

    images: torch.Tensor
    labels: Optional[torch.Tensor] = None
    name: str = "dataset"
    xflip: bool = False
    source: str = ""
    _float_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(self.images.shape)}")
        if self.images.dtype not in (torch.uint8, torch.float32):
            raise TypeError(f"images must be uint8 or float32, got {self.images.dtype}")
        if self.labels is not None and self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"{self.labels.shape[0]} labels for {self.images.shape[0]} images")

    # --- shape facts -------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def label_dim(self) -> int:
        return 0 if self.labels is None else int(self.labels.shape[1])

    def __len__(self) -> int:
        return self.num_images * (2 if self.xflip else 1)

    def __getitem__(self, index: int):
        image, label = self.get_batch(torch.tensor([int(index)]))
        return image[0], (None if label is None else label[0])

    # --- batches -------------------------------------------------------------------------
    def to(self, device) -> "ImageDataset":
        """The same data set with its tensors on ``device`` (indexing then stays there)."""
        return ImageDataset(
            self.images.to(device),
            None if self.labels is None else self.labels.to(device),
            self.name,
            self.xflip,
            self.source,
        )

    def get_batch(self, indices: torch.Tensor, device=None):
        """Images float32 in [-1, 1], [B, C, H, W], and labels (or None) for item indices.

        ``indices`` index the (possibly x-flipped, 2N-long) data set and should live on its
        device (GlobalBatchSampler keeps its permutation there). Nothing here waits for the
        host: a CPU tensor bound for an accelerator goes through pinned memory (a pageable
        ``non_blocking`` copy blocks the host every step), and a CPU data set feeding an
        accelerator is gathered as stored (uint8: a quarter of the bytes) and converted there.
        """
        device = self.images.device if device is None else torch.device(device)
        indices = to_device(torch.as_tensor(indices, dtype=torch.int64), self.images.device)
        n = self.num_images
        flip = indices >= n if self.xflip else None
        base = indices - flip.to(torch.int64) * n if self.xflip else indices
        images = gather(self.images, base, device)
        images = images.to(torch.float32) / 127.5 - 1 if images.dtype == torch.uint8 else images
        if flip is not None:
            flip = to_device(flip, device).view(-1, 1, 1, 1)
            images = torch.where(flip, images.flip(3), images)
        labels = None if self.labels is None else gather(self.labels, base, device)
        return images, labels


def pinned_empty(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def gather(source: torch.Tensor, index: torch.Tensor, device) -> torch.Tensor:
    """source[index] on ``device``: gathered where ``source`` lives, straight into pinned
    memory when that is the host and ``device`` an accelerator."""
    device = torch.device(device)
    if needs_pinning(source, device):
        out = pinned_empty((index.numel(), *source.shape[1:]), source.dtype)
        return torch.index_select(source, 0, index, out=out).to(device, non_blocking=True)
    return source.index_select(0, index).to(device, non_blocking=device.type != "cpu")


# ----------------------------------------------------------------------------------------
# Loading


def _one_hot(labels: np.ndarray, source: str) -> torch.Tensor:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.size == 0 or labels.min() < 0:
        raise ValueError(f"labels in {source} must be non-negative integer classes, one per image")
    dim = int(labels.max()) + 1
    out = torch.zeros(labels.shape[0], dim, dtype=torch.float32)
    out[torch.arange(labels.shape[0]), torch.from_numpy(labels.astype(np.int64))] = 1
    return out


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the embedded 'digits' data set needs scikit-learn (pip install scikit-learn)") from exc
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)  # 0..16 -> [-1, 1]
    return images.contiguous(), np.asarray(bunch.target, dtype=np.int64)


def _array_to_nchw(array: np.ndarray, source: str) -> torch.Tensor:
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise ValueError(f"{source}: image array must be [N,H,W], [N,H,W,C] or [N,C,H,W], got shape {array.shape}")
    if array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    if array.shape[1] not in (1, 3):
        raise ValueError(f"{source}: images must have 1 or 3 channels, got shape {array.shape}")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{source}: image array must be uint8 (0..255) or float in [-1, 1], got {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{source}: image array contains NaN or Inf")
    lo, hi = float(array.min(initial=0)), float(array.max(initial=0))
    if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
        raise ValueError(f"{source}: float images must lie in [-1, 1], got values in [{lo}, {hi}]")
    return torch.from_numpy(array)


def load_array(path: str):
    """A ``.npy``/``.npz`` file -> (images uint8 or float32 [N, C, H, W] tensor, labels or None)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"cannot read array file {path}: {exc}") from exc
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if not keys:
                raise ValueError(f"{path}: the .npz file holds no arrays")
            key = "images" if "images" in keys else keys[0]
            try:
                images = loaded[key]
                labels = loaded["labels"] if "labels" in keys else None
            except Exception as exc:
                raise ValueError(f"{path}: corrupt .npz member: {exc}") from exc
    else:
        images = loaded
    return _array_to_nchw(images, path), labels


def _array_decoder(path: str) -> Decoder:
    images, labels = load_array(path)
    array = images.numpy()
    chunk = 4096
    return Decoder(
        array.shape[0],
        lambda: ((f"{path}[{i}]", array[i : i + chunk]) for i in range(0, array.shape[0], chunk)),
        _checked_labels(labels, array.shape[0], path),
    )


def decode_image(data: bytes, name: str) -> np.ndarray:
    """PNG/JPEG/... bytes -> uint8 [H, W] (grey) or [H, W, 3]; other modes are converted to
    RGB. ValueError naming ``name`` if the bytes are not a readable image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.uint8)
    except Exception as exc:
        raise ValueError(f"corrupt or unreadable image {name}: {exc}") from exc


def _checked_labels(labels, count: int, source: str) -> Optional[np.ndarray]:
    """int64 class labels, one per image. Labels of another kind (vectors, floats, negative)
    become -1, which _one_hot refuses: a data set with them loads, but not with use_labels."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape[:1] != (count,):
        raise ValueError(f"{source}: {labels.shape[0] if labels.ndim else 1} labels for {count} images")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0:
        return np.full(count, -1, dtype=np.int64)
    return labels.astype(np.int64)


def _image_names_and_reader(path: str):
    """(sorted member names, read(name) -> bytes, close()) of a folder or zip."""
    if os.path.isdir(path):
        names = sorted(
            os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
            for root, _, files in os.walk(path)
            for f in files
        )

        def read(name):
            with open(os.path.join(path, name), "rb") as f:
                return f.read()

        return names, read, lambda: None
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path} is not a readable zip file: {exc}") from exc
    return sorted(zf.namelist()), zf.read, zf.close


def _dataset_json_labels(read, path: str, image_names: list) -> Optional[np.ndarray]:
    try:
        meta = json.loads(read("dataset.json"))
        table = meta.get("labels") if isinstance(meta, dict) else None
        lookup = None if table is None else {str(k).replace("\\", "/"): v for k, v in table}
    except Exception as exc:
        raise ValueError(f"corrupt dataset.json in {path}: {exc}") from exc
    if lookup is None:
        return None
    missing = [n for n in image_names if n not in lookup]
    if missing:
        raise ValueError(f"dataset.json in {path} has no label for {missing[0]} (and {len(missing) - 1} more)")
    return _checked_labels(np.asarray([lookup[n] for n in image_names]), len(image_names), f"{path}/dataset.json")


def _image_decoder(path: str) -> Decoder:
    """A folder or zip of images (published layout): names, labels, and the decode of each image."""
    names, read, close = _image_names_and_reader(path)
    try:
        image_names = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not image_names:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {path}")
        labels = _dataset_json_labels(read, path, image_names) if "dataset.json" in names else None
    except BaseException:
        close()
        raise

    def chunks():
        try:
            for name in image_names:
                try:
                    data = read(name)
                except Exception as exc:
                    raise ValueError(f"cannot read {name} in {path}: {exc}") from exc
                image = decode_image(data, f"{path}:{name}")
                image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
                yield f"{path}:{name}", image[None]
        finally:
            close()

    return Decoder(len(image_names), chunks, labels)


def _decoder(spec: str) -> Decoder:
    if os.path.isdir(spec) or spec.lower().endswith(".zip"):
        return _image_decoder(spec)
    if spec.lower().endswith((".npy", ".npz")):
        return _array_decoder(spec)
    raise ValueError(f"unsupported data set {spec}: expected 'digits', a folder, .zip, .npy or .npz")


def _decode(spec: str, cache: bool, cache_dir: Optional[str]):
    """(images uint8/float32 [N, C, H, W], labels or None) of ``spec``: decoded here, or
    (``cache``) through the per-node cache file (data_cache.py)."""
    if spec == "digits":
        return _load_digits()
    if not os.path.isdir(spec) and not spec.lower().endswith((".zip", ".npy", ".npz")):
        raise ValueError(f"unsupported data set {spec}: expected 'digits', a folder, .zip, .npy or .npz")
    if cache:
        cached = load_cached(spec, lambda: _decoder(spec), cache_dir)
        return cached.images, cached.labels
    decoder = _decoder(spec)
    return torch.from_numpy(decode_to_array(decoder, spec)), decoder.labels


def load_dataset(
    spec: str,
    resolution: Optional[int] = None,
    use_labels: bool = False,
    xflip: bool = False,
    cache: bool = True,
    max_size: Optional[int] = None,
    cache_dir: Optional[str] = None,
) -> ImageDataset:
    """Load a data set (see the module docstring for the formats).

    resolution: expected image size (ValueError if the data differ); use_labels: return
    one-hot class labels (ValueError if the data set has none); xflip: double the data set
    with mirrored copies; cache: decode a data set on disk once per node into a cache file
    that every rank memory-maps (data_cache.py) and keep the data for later calls in this
    process — False decodes it here, keeping nothing; cache_dir: where the cache file lives (default: next to the
    data); max_size: use only the first ``max_size`` images.
    """
    if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec):
        raise TypeError(f"data must be 'digits' or a path to a folder/.zip/.npy/.npz, got {spec!r}")
    spec = os.fspath(spec)
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise ValueError(f"resolution must be a positive int or None, got {resolution!r}")
    if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
        raise ValueError(f"max_size must be a positive int or None, got {max_size!r}")
    cache_dir = _default_cache_dir if cache_dir is None else os.fspath(cache_dir)

    if spec == "digits":
        key = ("digits",)
    else:
        if not os.path.exists(spec):
            raise FileNotFoundError(f"data set not found: {spec} (expected 'digits', a folder, .zip, .npy or .npz)")
        st = os.stat(spec)
        key = (os.path.abspath(spec), st.st_mtime_ns, st.st_size, cache_dir)
    if cache and key in _CACHE:
        images, labels = _CACHE[key]
    else:
        images, labels = _decode(spec, cache, cache_dir)
        if images.shape[0] == 0:
            raise ValueError(f"data set {spec} holds no images")
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images in {spec} must be square, got {images.shape[-2]}x{images.shape[-1]}")
        if labels is not None and len(labels) != images.shape[0]:
            raise ValueError(f"{spec}: {len(labels)} labels for {images.shape[0]} images")
        if cache:
            _CACHE[key] = (images, labels)

    if resolution is not None and images.shape[-1] != resolution:
        raise ValueError(
            f"data set {spec} has resolution {images.shape[-1]}, but resolution={resolution} was requested"
        )
    if max_size is not None:
        images = images[:max_size]
        labels = None if labels is None else labels[:max_size]
    label_tensor = None
    if use_labels:
        if labels is None:
            raise ValueError(
                f"use_labels (--cond) was requested but data set {spec} has no labels (dataset.json / 'labels' array)"
            )
        label_tensor = _one_hot(np.asarray(labels), spec)
    name = "digits" if spec == "digits" else os.path.splitext(os.path.basename(spec.rstrip("/\\")))[0]
    return ImageDataset(images, label_tensor, name=name, xflip=bool(xflip), source=spec)


_default_cache_dir: Optional[str] = None


@contextlib.contextmanager
def default_cache_dir(cache_dir: Optional[str]):
    """Within the block, load_dataset's cache files go to ``cache_dir`` unless a call names
    one (the train command's --cache-dir; None: next to the data)."""
    global _default_cache_dir
    previous, _default_cache_dir = _default_cache_dir, (None if cache_dir is None else os.fspath(cache_dir))
    try:
        yield
    finally:
        _default_cache_dir = previous


def dataset_to_uint8(dataset: ImageDataset, max_images: Optional[int] = None) -> torch.Tensor:
    """The data set's images as uint8 [N, C, H, W] (no x-flip copies), e.g. for FID reference
    statistics. Float data in [-1, 1] is mapped to round((x + 1) · 127.5)."""
    images = dataset.images if max_images is None else dataset.images[:max_images]
    if images.dtype == torch.uint8:
        return images.cpu().contiguous()
    return ((images.cpu().to(torch.float32) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------
# Order of samples


class GlobalBatchSampler:
    """Infinite, distributed-aware order of data-set items.

    Global position p (p = step · global_batch + j) maps to item perm_e[p mod n] of epoch
    e = p // n, with perm_e a permutation drawn from (seed, e). Rank ``r`` of ``W`` takes
    items [r·B/W, (r+1)·B/W) of each global batch, so the union over ranks — and the
    training run — does not depend on W. Each epoch's permutation is drawn on the CPU (the
    same order on every device) and moved once to ``device`` (the data set's), so a step
    only slices it there: no host-to-device copy and no host sync per step.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, device=None):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size, self.seed, self.shuffle = size, int(seed), bool(shuffle)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._perms: dict = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(min(self._perms))
            if self.shuffle:  # drawn on the CPU (same order on every device), then moved once
                gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
                perm = torch.randperm(self.size, generator=gen)
            else:
                perm = torch.arange(self.size)
            self._perms[epoch] = to_device(perm, self.device)
        return self._perms[epoch]

    def positions(self, start: int, count: int) -> torch.Tensor:
        """Item indices for global positions [start, start + count), on ``self.device``.

        Epoch boundaries are found with Python integers, so this never waits for the device.
        """
        start, count = int(start), int(count)
        pieces, pos, end = [], start, start + count
        while pos < end:
            epoch, offset = divmod(pos, self.size)
            take = min(end - pos, self.size - offset)
            pieces.append(self._perm(epoch)[offset : offset + take])
            pos += take
        if not pieces:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def batch(self, step: int, global_batch: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Item indices of rank ``rank``'s share of global batch number ``step``."""
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        per_rank = global_batch // world_size
        return self.positions(step * global_batch + rank * per_rank, per_rank)
