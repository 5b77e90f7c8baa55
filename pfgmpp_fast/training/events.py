"""TensorBoard event files of a run (rank 0): every statistic of every stats.jsonl row as a scalar.

The scalar of statistic ``name`` is the row's ``mean`` (what EDM-style tools plot), at step =
the images seen when the row was written (``cur_nimg``: a tick's row and the evaluation row at
its snapshot share the step; a name two rows of one step both hold, e.g. Progress/kimg, is
written once), at the row's own timestamp. The step counts images, not kimg, so ticks shorter
than 1 kimg get steps of their own. Events are flushed at every row, so a run that ends by an
error, a signal or a kill has its rows up to then on disk.

On resume the rows after the training state are written again: the writer opens with
TensorBoard's ``purge_step`` (a SessionLog.START at the first image after the state), and
TensorBoard's reader drops the earlier attempt's events from there on, as resume drops its
stats.jsonl rows (run_files.drop_stats_after).

Written when the ``tensorboard`` package is installed (``--no-tensorboard`` turns it off);
without it the run says so once in its log and writes none.
"""

from __future__ import annotations

import glob
import os
from typing import Callable, Optional

__all__ = ["EVENT_FILE_PATTERN", "EventFiles", "open_event_files"]

EVENT_FILE_PATTERN = "events.out.tfevents.*"


class EventFiles:
    """The run directory's TensorBoard writer: ``add_row(row, step)``, ``close()``."""

    def __init__(self, writer):
        self.writer = writer
        self._step: Optional[int] = None
        self._written: set = set()  # names written at self._step

    def add_row(self, row: dict, step: int) -> None:
        """Each ``{"num", "mean", "std"}`` statistic of a stats.jsonl row, then a flush."""
        if step != self._step:
            self._step, self._written = step, set()
        walltime = row.get("timestamp")
        for name, stat in row.items():
            if isinstance(stat, dict) and name not in self._written:
                self.writer.add_scalar(name, float(stat["mean"]), global_step=step, walltime=walltime)
                self._written.add(name)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def open_event_files(run_dir: str, start_nimg: int, log: Callable[[str], None]) -> Optional[EventFiles]:
    """The writer of a run that starts (or resumes) at ``start_nimg`` images; None when the
    tensorboard package is not installed (said once in the log)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("tensorboard: the package is not installed, so no TensorBoard event files (pip install tensorboard)")
        return None
    resumed = bool(glob.glob(os.path.join(glob.escape(run_dir), EVENT_FILE_PATTERN)))
    # the earlier attempt's events after start_nimg are replaced by this attempt's (module docstring)
    writer = SummaryWriter(run_dir, purge_step=start_nimg + 1 if resumed else None, flush_secs=60)
    return EventFiles(writer)
