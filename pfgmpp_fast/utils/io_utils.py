"""Atomic file writing: a kill leaves the old file or the new one, never half of one.

Every writer goes to a temporary file in the destination's directory (same file system,
so the rename is atomic), flushes and fsyncs it, then `os.replace`s it over the target
and fsyncs the directory. Temporary names start with ``.`` and end with ``.tmp`` so
readers that list a directory (e.g. ``--resume auto``) can ignore leftovers.

For tests of the kill-during-write path (utils/faults.py): with
``PFGMPP_FAST_KILL_DURING_WRITE`` set to a substring of a target's file name, the process
SIGKILLs itself after half of that file's bytes are on disk (before the rename);
``PFGMPP_FAST_KILL_DURING_WRITE_SKIP=n`` lets the first n matching writes complete.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from typing import Any, Callable

import torch

from pfgmpp_fast.utils import faults

__all__ = [
    "TMP_SUFFIX",
    "DIGEST_KEY",
    "is_temp_file",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_save_json",
    "atomic_save_csv",
    "atomic_save_npz",
    "content_digest",
    "atomic_torch_save_state",
    "load_torch_state",
    "append_line",
]

TMP_SUFFIX = ".tmp"
DIGEST_KEY = "__sha256__"  # a state file's digest of everything else in it


_UMASK = os.umask(0)
os.umask(_UMASK)


def is_temp_file(name: str) -> bool:
    """True for the temporary names our writers use (leftovers of a killed write)."""
    base = os.path.basename(name)
    return base.startswith(".") and base.endswith(TMP_SUFFIX)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> str:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync, rename over ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for sharing
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)
    return path


def _maybe_kill_midway(path: str, f, data: bytes) -> bytes:
    """Fault injection (utils/faults.py, point DURING_WRITE): half of the bytes, durable, then
    SIGKILL (or the signal of PFGMPP_FAST_KILL_SIGNAL, after which the rest is written)."""
    if faults.should_kill("DURING_WRITE", os.path.basename(path)):
        half = len(data) // 2
        f.write(data[:half])
        f.flush()
        os.fsync(f.fileno())
        faults.kill("DURING_WRITE")
        return data[half:]
    return data


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    path = os.fspath(path)
    return atomic_write(path, lambda f: f.write(_maybe_kill_midway(path, f, bytes(data))))


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> str:
    """JSON (sorted keys, trailing newline) written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, allow_nan=True) + "\n")


def atomic_save_npz(path: str | os.PathLike, **arrays) -> str:
    """``np.savez`` of ``arrays`` (no pickles), written atomically."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_save_csv(path: str | os.PathLike, rows: list) -> str:
    """CSV of dict rows (the first row's keys are the header, Unix line ends) written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def _check_plain(obj: Any, where: str = "state") -> None:
    """Only tensors and plain Python types, so ``torch.load(weights_only=True)`` can read it."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.dtype)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: keys must be str or int, got {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"{where} holds a {type(obj).__name__}; only tensors and plain types can be saved "
        "(so the file loads with weights_only=True)"
    )


def _feed(h, obj) -> None:
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            h.update(f"{type(k).__name__}:{k!r}=".encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def content_digest(obj) -> str:
    """SHA-256 (hex) of tensors and plain values (dict keys in sorted order, tensors by dtype,
    shape and bytes): the same content gives the same digest, whatever its memory layout."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def atomic_torch_save_state(path: str | os.PathLike, state: dict) -> str:
    """``torch.save`` of a dict of tensors / plain types, atomically, with the digest of its
    content under DIGEST_KEY (checked by load_torch_state); loadable weights-only."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    _check_plain(state)
    state = {k: v for k, v in state.items() if k != DIGEST_KEY}
    buffer = io.BytesIO()
    torch.save({**state, DIGEST_KEY: content_digest(state)}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_torch_state(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a file written by :func:`atomic_torch_save_state` without running code; its digest
    must match (files written before digests existed load unchecked)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such state file: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"state file {path} is corrupt or not a weights-only torch file: {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"state file {path} does not hold a dict")
    digest = state.pop(DIGEST_KEY, None)
    if digest is not None and digest != content_digest(state):
        raise ValueError(
            f"state file {path} is corrupt: its content does not match the SHA-256 digest "
            "stored in it (changed on disk after it was written)"
        )
    return state


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log and fsync (logs are append-only; a kill loses at most the tail)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line if line.endswith("\n") else line + "\n")
        f.flush()
        os.fsync(f.fileno())
