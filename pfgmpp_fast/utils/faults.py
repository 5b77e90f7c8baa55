"""Fault injection for the kill-and-resume tests: one mechanism, one environment scheme.

``PFGMPP_FAST_KILL_<POINT>=<match>`` SIGKILLs the process when the code reaches <POINT> with
a value that matches; ``PFGMPP_FAST_KILL_<POINT>_SKIP=n`` lets the first n matches pass.

    DURING_WRITE  match: a substring of the file name; utils/io_utils writes half of the
                  bytes, makes them durable, then dies (before the rename)
    AT_STEP       match: the training step index; training/loop.py dies after the step's
                  backward pass, before the optimiser update

``PFGMPP_FAST_KILL_<POINT>_SIGNAL=<name>`` (e.g. TERM, USR1) sends that signal instead of
SIGKILL, for the preemption tests (utils/preemption.py): the process then goes on, as it would
when a scheduler's signal arrives at that moment (DURING_WRITE: the rest of the file is written).
"""

from __future__ import annotations

import os
import signal

ENV_PREFIX = "PFGMPP_FAST_KILL_"
_matches: dict = {}


def should_kill(point: str, value: str, exact: bool = False) -> bool:
    """True when PFGMPP_FAST_KILL_<point> matches `value` (substring, or equal with exact) and
    the match is past the _SKIP count. Unset (the normal case): one environment lookup."""
    marker = os.environ.get(ENV_PREFIX + point)
    if not marker or not (marker == value if exact else marker in value):
        return False
    _matches[point] = _matches.get(point, 0) + 1
    return _matches[point] > int(os.environ.get(ENV_PREFIX + point + "_SKIP", "0"))


def kill(point: str) -> None:
    """Send this process SIGKILL, or the signal PFGMPP_FAST_KILL_<point>_SIGNAL names."""
    name = os.environ.get(ENV_PREFIX + point + "_SIGNAL", "KILL").upper().removeprefix("SIG")
    os.kill(os.getpid(), getattr(signal, "SIG" + name))
