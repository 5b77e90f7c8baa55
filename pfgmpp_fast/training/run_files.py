"""The run directory on resume: the newest intact training state, the leftovers of interrupted
writes, the stats rows of ticks that the resumed run writes again."""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Optional

from pfgmpp_fast.training.report import stat_value
from pfgmpp_fast.utils.io_utils import atomic_write_text, is_temp_file, load_torch_state

__all__ = ["find_latest_state", "remove_temp_files", "drop_stats_after"]

STATE_RE = re.compile(r"^training-state-(\d+)\.pt$")


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
