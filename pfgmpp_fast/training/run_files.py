"""The run directory: which files make one (a fresh run never goes where another run's files are),
EDM's numbered run folders (``NNNNN-<desc>``), and on resume: the newest intact training state,
the leftovers of interrupted writes, the stats rows of ticks that the resumed run writes again."""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
from typing import Optional

from pfgmpp_fast.training.events import EVENT_FILE_PATTERN
from pfgmpp_fast.training.report import stat_value
from pfgmpp_fast.utils.io_utils import atomic_write_text, is_temp_file, load_torch_state

__all__ = [
    "find_latest_state",
    "remove_temp_files",
    "drop_stats_after",
    "run_files_in",
    "check_fresh_run_dir",
    "next_numbered_run_dir",
    "latest_numbered_run_dir",
]

STATE_RE = re.compile(r"^training-state-(\d+)\.pt$")
# What a training run writes into its directory (the lock file is not a run's file).
RUN_FILE_PATTERNS = (
    "training_options.json",
    "stats.jsonl",
    "log.txt",
    "network-snapshot-*",
    "training-state-*",
    "phema/*",
    EVENT_FILE_PATTERN,
)
RUN_ID_RE = re.compile(r"^\d+")


def run_files_in(run_dir: str) -> list:
    """The training-run files in ``run_dir`` (names relative to it, sorted, TensorBoard's event files
    last; [] if it is missing)."""
    if not os.path.isdir(run_dir):
        return []
    found = set()
    for pattern in RUN_FILE_PATTERNS:
        found.update(os.path.relpath(p, run_dir) for p in glob.glob(os.path.join(glob.escape(run_dir), pattern)))
    return sorted(found, key=lambda name: (fnmatch.fnmatch(name, EVENT_FILE_PATTERN), name))


def check_fresh_run_dir(run_dir: str) -> None:
    """A fresh run (no resume) never writes beside another run's files: ValueError if ``run_dir``
    holds any, naming them and what to do instead."""
    found = run_files_in(run_dir)
    if found:
        shown = ", ".join(found[:3]) + (f", ... ({len(found)} files)" if len(found) > 3 else "")
        raise ValueError(
            f"{run_dir} already holds a training run ({shown}); a fresh run would mix its stats and "
            "snapshots with it. Continue that run with --resume auto (run_training: resume='auto'), "
            "or train into a new directory (another --outdir, or --name NAME / --desc TEXT for a "
            "new folder inside it)"
        )


def _run_ids(parent: str):
    if not os.path.isdir(parent):
        return []
    return [
        (int(m.group()), name)
        for name in os.listdir(parent)
        if os.path.isdir(os.path.join(parent, name)) and (m := RUN_ID_RE.match(name))
    ]


def next_numbered_run_dir(parent: str, desc: str) -> str:
    """EDM's run folder of a new run: ``parent/<id:05d>-<desc>``, id one above every numbered folder in parent."""
    return os.path.join(parent, f"{max((i for i, _ in _run_ids(parent)), default=-1) + 1:05d}-{desc}")


def latest_numbered_run_dir(parent: str, desc: str) -> Optional[str]:
    """The newest ``parent/<id>-<desc>`` folder (the run ``--resume auto`` continues), None if there is none."""
    same = [(i, name) for i, name in _run_ids(parent) if re.fullmatch(r"\d+-" + re.escape(desc), name)]
    return os.path.join(parent, max(same)[1]) if same else None


def find_latest_state(run_dir: str, log=print) -> Optional[str]:
    """The newest training state in ``run_dir`` that loads (temp files and corrupt ones skipped)."""
    candidates = []
    for path in glob.glob(os.path.join(glob.escape(run_dir), "training-state-*.pt")):
        name = os.path.basename(path)
        m = STATE_RE.match(name)
        if m and not is_temp_file(name):
            candidates.append((int(m.group(1)), os.path.getmtime(path), path))
    for _, _, path in sorted(candidates, reverse=True):
        try:
            state = load_torch_state(path)
            if "cur_nimg" in state and "net" in state:
                return path
        except (ValueError, OSError) as exc:
            log(f"resume: skipping unreadable state {path}: {exc}")
    return None


def remove_temp_files(run_dir: str, log=print) -> None:
    """Leftovers of writes that were killed half-way (io_utils temp names) go on resume."""
    for name in sorted(os.listdir(run_dir)):
        if is_temp_file(name):
            os.unlink(os.path.join(run_dir, name))
            log(f"resume: removed {name}, left by an interrupted write")


def drop_stats_after(stats_path: str, next_tick: int) -> None:
    """stats.jsonl rows of ticks >= next_tick (and torn lines) were written after the state we
    resume from; the resumed run writes those ticks again, so drop them (no duplicates)."""
    if not os.path.exists(stats_path):
        return
    with open(stats_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            if int(stat_value(json.loads(line), "Progress/tick")) < next_tick:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if len(kept) != len(lines):
        atomic_write_text(stats_path, "".join(k + "\n" for k in kept))
