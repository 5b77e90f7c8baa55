"""One writer per run directory: a job owns its directory while it runs.

The owner holds ``fcntl.flock`` on ``DIR/.pfgmpp_fast.lock`` and writes who it is into that
file (host, pid, start time, command, torchelastic run); it removes the file when the job
ends. A second job on the directory is refused with that description; the kernel drops the
lock when the holder's process ends (killed or not), so a directory whose job was killed is
free again at once (the file a killed job leaves is taken over, never trusted), and a
worker group restarted by torchrun takes the lock of its dead rank 0.
Under torch.distributed rank 0 holds the lock for the job and every rank gets the verdict.

flock is local to one machine unless the file system forwards it (NFSv4, Lustre with
``flock``): on other shared file systems it protects only against jobs on the same host.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
from typing import Optional

from pfgmpp_fast.utils import distributed

__all__ = ["LOCK_NAME", "RunDirectoryBusy", "RunLock", "acquire_run_dir", "read_holder"]

LOCK_NAME = ".pfgmpp_fast.lock"
_held: dict = {}  # realpath -> [fd, depth]: re-entrant within one process


class RunDirectoryBusy(RuntimeError):
    """Another live job owns the directory (a runtime condition: exit code 1 on the command line)."""


def read_holder(directory: str) -> Optional[dict]:
    """The holder information written into a directory's lock file (None if absent/unreadable)."""
    try:
        with open(os.path.join(directory, LOCK_NAME), encoding="utf-8") as f:
            return json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "a job that has not written its details yet"
    text = (
        f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}, "
        f"command: {holder.get('command')}"
    )
    return text + (f" ({holder['torchelastic']})" if holder.get("torchelastic") else "")


def _acquire(directory: str, purpose: str) -> Optional[str]:
    """Take the lock (None) or return why not."""
    key = os.path.realpath(directory)
    if key in _held:
        _held[key][1] += 1
        return None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return (
                f"{directory} is in use by another job ({_describe(read_holder(directory))}); "
                f"wait for it to finish or stop it, or use another directory for this {purpose}"
            )
        if _same_file(fd, path):
            break
        os.close(fd)  # the previous holder removed this file as we opened it: take the new one
    holder = dict(
        host=socket.gethostname(),
        pid=os.getpid(),
        purpose=purpose,
        started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join(getattr(sys, "orig_argv", sys.argv)),
        torchelastic=distributed.elastic_info(),
    )
    os.ftruncate(fd, 0)  # the lock file itself, in place: the lock lives on this inode
    os.pwrite(fd, (json.dumps(holder, sort_keys=True) + "\n").encode(), 0)
    os.fsync(fd)
    _held[key] = [fd, 1]
    return None


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _release(directory: str) -> None:
    key = os.path.realpath(directory)
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        try:
            os.unlink(os.path.join(directory, LOCK_NAME))  # still ours: the directory keeps only results
        except FileNotFoundError:
            pass
        os.close(entry[0])  # closing the descriptor drops the flock


class RunLock:
    """Ownership of a run directory by this job (see :func:`acquire_run_dir`)."""

    def __init__(self, directory: str, held: bool):
        self.directory, self.held = directory, held

    def release(self) -> None:
        if self.held:
            self.held = False
            _release(self.directory)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def acquire_run_dir(directory: str, purpose: str = "run") -> RunLock:
    """Own ``directory`` until ``release()`` (or the end of a ``with`` block): rank 0 holds
    the lock; every rank raises RunDirectoryBusy, naming the holder, when another job owns it."""
    refusal = _acquire(directory, purpose) if distributed.get_rank() == 0 else None
    if distributed.is_enabled():
        import torch

        verdict = [refusal]
        torch.distributed.broadcast_object_list(verdict, src=0)
        refusal = verdict[0]
    if refusal is not None:
        raise RunDirectoryBusy(refusal)
    return RunLock(directory, held=distributed.get_rank() == 0)
