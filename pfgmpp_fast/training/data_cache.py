"""Decode a data set once per node; every rank memory-maps the result.

A data set on disk (a folder or zip of images, ``.npy``/``.npz``) is decoded once into a cache
file of raw arrays — images ``[N, C, H, W]`` as stored (uint8, or float32 for float arrays) and
int64 labels — that every rank then memory-maps read-only: the pages live once in the page
cache of the node, so an extra rank costs neither a decode nor a copy, and a restart (an
elastic job, ``--resume``) reads the cache instead of decoding again.

The cache file is named after the source and its key, ``<source name>.<key>.pfgmpp-cache``,
in ``cache_dir`` (default: the source's folder, or ``$PFGMPP_FAST_CACHE/data`` —
``~/.cache/pfgmpp_fast/data`` — where that folder is not writable). The key is a digest of
the cache format, the source's size, modification time and a content digest: a zip's central
directory (every member's name, CRC-32 and sizes), the SHA-256 of a ``.npy`` file, for a folder the
list of its files with their sizes and modification times (a folder's files are not read to
check a cache: that is the decode the cache saves). A changed source has a new key: the cache
is rebuilt and the caches of the source's older versions are deleted.

Concurrency: the cache is written to a temporary file and renamed into place (utils/io_utils),
so a reader never sees half of one, and the builder holds a lock file (``flock``): of the
ranks that start together (on one node, or on several nodes sharing the file system) one
decodes and the others wait for it and then map its file; if the builder fails, the ranks
that waited raise its error (recorded next to the cache) instead of decoding again. No
collective is involved, so it works the same for one process, a process group, or any subset
of its ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from pfgmpp_fast.utils.io_utils import atomic_write, atomic_write_text

__all__ = [
    "Decoder",
    "CachedData",
    "CACHE_VERSION",
    "CACHE_SUFFIX",
    "CACHE_ENV",
    "source_fingerprint",
    "default_cache_dir",
    "cache_file",
    "decode_to_array",
    "load_cached",
]

CACHE_VERSION = 1  # bump when the decoded arrays of a source change
CACHE_SUFFIX = ".pfgmpp-cache"
CACHE_ENV = "PFGMPP_FAST_CACHE"
_MAGIC = b"PFGMPPDC"
_HEADER_BYTES = 4096  # the JSON header is padded to this; the images start page-aligned
_DTYPES = {"uint8": np.uint8, "float32": np.float32}


@dataclass
class Decoder:
    """A source ready to decode: ``count`` images, delivered by ``chunks()`` as
    ``(name, array [n, C, H, W])`` with n >= 1 (name: the file of the chunk's first image);
    ``labels`` int64 [count] or None."""

    count: int
    chunks: Callable[[], Iterator[tuple]]
    labels: Optional[np.ndarray]


@dataclass
class CachedData:
    """Images [N, C, H, W] memory-mapped from ``path`` (copy-on-write, so never written back),
    labels (int64 numpy) or None, and whether this process built the cache."""

    images: torch.Tensor
    labels: Optional[np.ndarray]
    path: str
    built: bool


# ----------------------------------------------------------------------------------------
# Decoding: one pass over the chunks, checked, into any writer


def _checked_chunks(decoder: Decoder, spec: str, progress: bool = False):
    """The decoder's chunks, all of one shape and dtype (ValueError naming the first file that differs)."""
    first, seen = None, 0
    chunks = decoder.chunks()
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=decoder.count, desc=f"decoding {os.path.basename(spec)}", unit="img", file=sys.stderr)
    try:
        for name, chunk in chunks:
            if chunk.dtype not in (np.uint8, np.float32):
                raise TypeError(f"{name}: decoded to {chunk.dtype}, expected uint8 or float32")
            if first is None:
                first = (name, chunk.shape[1:], chunk.dtype)
            elif (chunk.shape[1:], chunk.dtype) != first[1:]:
                raise ValueError(
                    f"images in {spec} differ: {name} is {_describe(chunk.shape[1:], chunk.dtype)}, "
                    f"{first[0]} is {_describe(*first[1:])} (give images of one size and mode, "
                    "or build the data set with `python -m pfgmpp_fast dataset --resolution WxH`)"
                )
            seen += chunk.shape[0]
            if seen > decoder.count:
                break
            if progress:
                bar.update(chunk.shape[0])
            yield chunk
    finally:
        if progress:
            bar.close()
    if seen != decoder.count:
        raise ValueError(f"{spec}: decoded {seen} images, expected {decoder.count}")


def _describe(shape, dtype) -> str:
    c, h, w = shape
    return f"{w}x{h} with {c} channel{'s' if c > 1 else ''} ({np.dtype(dtype).name})"


def decode_to_array(decoder: Decoder, spec: str) -> np.ndarray:
    """All images in one [N, C, H, W] array (allocated once, filled chunk by chunk)."""
    out, pos = None, 0
    for chunk in _checked_chunks(decoder, spec):
        if out is None:
            out = np.empty((decoder.count, *chunk.shape[1:]), dtype=chunk.dtype)
        out[pos : pos + chunk.shape[0]] = chunk
        pos += chunk.shape[0]
    return out


# ----------------------------------------------------------------------------------------
# Keys and file names


def source_fingerprint(spec: str) -> dict:
    """Size, modification time and content digest of a file or folder (the module docstring)."""
    h = hashlib.sha256()
    if os.path.isdir(spec):
        size, mtime = 0, os.stat(spec).st_mtime_ns
        for root, dirs, files in os.walk(spec):
            dirs.sort()
            for f in sorted(files):
                full = os.path.join(root, f)
                st = os.stat(full)
                size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
                h.update(f"{os.path.relpath(full, spec)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"size": size, "mtime_ns": mtime, "digest": h.hexdigest()}
    st = os.stat(spec)
    if zipfile.is_zipfile(spec):
        directory = _zip_central_directory(spec)
        if directory is not None:
            h.update(directory)
        else:
            with zipfile.ZipFile(spec) as zf:
                for info in zf.infolist():
                    h.update(f"{info.filename}\0{info.CRC:08x}\0{info.file_size}\n".encode())
    else:
        with open(spec, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": h.hexdigest()}


def _zip_central_directory(path: str) -> Optional[bytes]:
    """The raw central directory of a zip (every member's name, CRC-32 and sizes), read with
    two seeks instead of parsing an entry object per member; None where the layout is unusual
    (the caller then lists the members with zipfile)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - (22 + 65535 + 20)))  # end record, its comment, zip64 locator
        tail = f.read()
        end = tail.rfind(b"PK\x05\x06")
        if end < 0 or len(tail) < end + 22:
            return None
        entries, cd_size, cd_offset = struct.unpack("<HII", tail[end + 10 : end + 20])
        if 0xFFFFFFFF in (cd_size, cd_offset) or entries == 0xFFFF:  # zip64: the locator precedes the end record
            locator = tail.rfind(b"PK\x06\x07", 0, end)
            if locator < 0:
                return None
            f.seek(struct.unpack("<Q", tail[locator + 8 : locator + 16])[0])
            record = f.read(56)
            if record[:4] != b"PK\x06\x06":
                return None
            cd_size, cd_offset = struct.unpack("<QQ", record[40:56])
        f.seek(cd_offset)
        directory = f.read(cd_size)
    return directory if len(directory) == cd_size and directory[:4] == b"PK\x01\x02" else None


def _key(fingerprint: dict) -> str:
    text = json.dumps({"version": CACHE_VERSION, **fingerprint}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _writable_dir(path: str) -> bool:
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK)


def default_cache_dir(spec: str) -> str:
    """The source's folder if writable, else ``$PFGMPP_FAST_CACHE/data`` (~/.cache/pfgmpp_fast/data)."""
    here = os.path.dirname(os.path.abspath(spec.rstrip("/\\")))
    if _writable_dir(here):
        return here
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "pfgmpp_fast")
    return os.path.join(root, "data")


def _source_name(spec: str) -> str:
    return os.path.basename(os.path.abspath(spec.rstrip("/\\")))


def cache_file(spec: str, key: str, cache_dir: Optional[str] = None) -> str:
    """Where the cache of ``spec`` with key ``key`` lives."""
    directory = default_cache_dir(spec) if cache_dir is None else os.fspath(cache_dir)
    return os.path.join(os.path.abspath(directory), f"{_source_name(spec)}.{key}{CACHE_SUFFIX}")


# ----------------------------------------------------------------------------------------
# The cache file: header (magic, length, JSON; padded), images, labels


def _write_cache(path: str, spec: str, key: str, decoder: Decoder, progress: bool) -> None:
    def write(f):
        f.write(b"\0" * _HEADER_BYTES)
        shape, dtype = None, None
        for chunk in _checked_chunks(decoder, spec, progress):
            shape, dtype = chunk.shape[1:], chunk.dtype
            f.write(np.ascontiguousarray(chunk).tobytes())
        labels = None if decoder.labels is None else np.asarray(decoder.labels, dtype="<i8")
        if labels is not None:
            f.write(labels.tobytes())
        header = json.dumps(
            {
                "version": CACHE_VERSION,
                "key": key,
                "source": os.path.abspath(spec),
                "shape": [decoder.count, *shape],
                "dtype": np.dtype(dtype).name,
                "labels": labels is not None,
            }
        ).encode()
        if len(header) + 16 > _HEADER_BYTES:
            raise ValueError(f"data cache header too long for {spec}")
        f.seek(0)
        f.write(_MAGIC + struct.pack("<Q", len(header)) + header)

    atomic_write(path, write)


def _read_header(path: str) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER_BYTES)
        if len(head) < 16 or head[:8] != _MAGIC:
            return None
        (length,) = struct.unpack("<Q", head[8:16])
        return json.loads(head[16 : 16 + length])
    except (OSError, ValueError, struct.error):
        return None


def _open_cache(path: str, key: str) -> Optional[tuple]:
    """(images memory-mapped, labels) of a complete cache with key ``key``; None otherwise."""
    header = _read_header(path)
    if (
        not header
        or header.get("version") != CACHE_VERSION
        or header.get("key") != key
        or header.get("dtype") not in _DTYPES
    ):
        return None
    shape, dtype = tuple(header["shape"]), _DTYPES[header["dtype"]]
    image_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    expected = _HEADER_BYTES + image_bytes + (shape[0] * 8 if header["labels"] else 0)
    if os.path.getsize(path) != expected:
        return None
    images = np.memmap(path, dtype=dtype, mode="c", offset=_HEADER_BYTES, shape=shape)
    labels = None
    if header["labels"]:
        with open(path, "rb") as f:
            f.seek(_HEADER_BYTES + image_bytes)
            labels = np.frombuffer(f.read(shape[0] * 8), dtype="<i8").astype(np.int64)
    return torch.from_numpy(images), labels


@contextlib.contextmanager
def _build_lock(path: str):
    """An exclusive flock on a hidden lock file next to ``path``; yields whether another
    process held it first (we waited). Where the file system has no flock (e.g. Lustre
    mounted without it) nothing is locked: the atomic rename still keeps readers safe."""
    import fcntl

    lock = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = True
        except OSError:
            waited = False
        yield waited
    finally:
        os.close(fd)


def _failure_file(path: str) -> str:
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".failed")


def _remove_stale(path: str, spec: str) -> None:
    """Delete the caches of older versions of ``spec`` in the same folder."""
    directory, prefix = os.path.dirname(path), _source_name(spec) + "."
    for name in os.listdir(directory):
        other = os.path.join(directory, name)
        if name.startswith(prefix) and name.endswith(CACHE_SUFFIX) and other != path:
            header = _read_header(other)
            if header and header.get("source") == os.path.abspath(spec):
                with contextlib.suppress(OSError):
                    os.unlink(other)


def _build(path: str, spec: str, key: str, decode: Callable[[], Decoder]) -> CachedData:
    """Decode ``spec`` into the cache file (the caller holds the lock); a failure is recorded
    next to it for the processes waiting on the lock, then raised."""
    start = time.monotonic()
    try:
        decoder = decode()
        _write_cache(path, spec, key, decoder, progress=sys.stderr.isatty() and decoder.count >= 10_000)
    except Exception as exc:
        with contextlib.suppress(OSError):
            atomic_write_text(_failure_file(path), json.dumps({"key": key, "error": f"{type(exc).__name__}: {exc}"}))
        raise
    with contextlib.suppress(OSError):
        os.unlink(_failure_file(path))
    _remove_stale(path, spec)
    opened = _open_cache(path, key)
    if opened is None:
        raise RuntimeError(f"the data cache {path} was written but cannot be read back")
    print(
        f"data cache: decoded {decoder.count} images of {spec} into {path} in {time.monotonic() - start:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return CachedData(*opened, path, built=True)


def load_cached(spec: str, decode: Callable[[], Decoder], cache_dir: Optional[str] = None) -> CachedData:
    """The decoded data of ``spec``, decoded at most once per cache file (module docstring).

    Opens the cache if it is complete; otherwise takes the lock and builds it with
    ``decode()`` (which opens the source), unless another process built it meanwhile. A
    process that waited on the lock for a builder that failed raises the builder's error
    instead of decoding again (so N ranks fail once, not one after the other).
    """
    key = _key(source_fingerprint(spec))
    path = cache_file(spec, key, cache_dir)
    opened = _open_cache(path, key)
    if opened is not None:
        return CachedData(*opened, path, built=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _build_lock(path) as waited:
        opened = _open_cache(path, key)  # another process built it while we waited
        if opened is not None:
            return CachedData(*opened, path, built=False)
        if waited:
            failure = _read_failure(path, key)
            if failure:
                raise RuntimeError(f"another process could not decode the data set {spec}: {failure}")
        return _build(path, spec, key, decode)


def _read_failure(path: str, key: str) -> Optional[str]:
    try:
        with open(_failure_file(path)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record.get("error") if isinstance(record, dict) and record.get("key") == key else None
