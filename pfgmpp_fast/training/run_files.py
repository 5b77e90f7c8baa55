"""Housekeeping of a run directory on resume: leftovers of interrupted writes, stats rows of
ticks that the resumed run writes again."""
from __future__ import annotations

import json
import os

from pfgmpp_fast.utils.io_utils import atomic_write_text, is_temp_file

__all__ = ["remove_temp_files", "drop_stats_after"]


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
            if int(json.loads(line)["Progress/tick"]) < next_tick:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if len(kept) != len(lines):
        atomic_write_text(stats_path, "".join(k + "\n" for k in kept))
