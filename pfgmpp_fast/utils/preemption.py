"""Graceful preemption: the one home of the signal mechanics of `train`, `fid calc`/`sweep` and
`experiment`.

A cluster sends SIGTERM before it kills a job (Slurm and Kubernetes do; Slurm can send SIGUSR1
earlier with ``--signal=USR1@SECONDS``; torchrun forwards what it receives to its workers).
Inside ``with Preemption(signals):`` those signals only record a request; the work stops at its
next safe point (train: after the current optimizer step; fid calc: after the current shard;
experiment: after the current point), keeps what it needs to continue (train: a training
state; fid calc: the shard file; experiment: the finished points) and raises :class:`Preempted`,
which the command line turns into exit code 75 (``PREEMPTED_EXIT_CODE``, sysexits' EX_TEMPFAIL:
try again later), so a job script can requeue on it. Rerunning the same command continues
(train: ``--resume auto``) with the same bits as an uninterrupted run.

Further signals while the work stops are counted and ignored (files are written atomically, so
even a SIGKILL then leaves the previous file intact); the handlers that were installed before
come back when the ``with`` block ends (commands run in-process in tests and the demo). Handlers
can only be installed by the main thread; elsewhere the process keeps its own.

Under torch.distributed every rank must stop at the same point: :func:`agreed` takes
the MAX of the ranks' signal numbers in one all-reduce (call it where the ranks synchronise
anyway), and :meth:`Preemption.poll_step` does the same once per training step without making
the host wait for the step (see there).
"""

from __future__ import annotations

import signal
import threading
from typing import Optional, Sequence, Union

import torch

from pfgmpp_fast.utils import distributed
from pfgmpp_fast.utils.cli_errors import PREEMPTED_EXIT_CODE, InvalidValue, Preempted

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "DEFAULT_SIGNALS",
    "Preempted",
    "Preemption",
    "parse_signals",
    "add_preempt_argument",
    "agreed",
    "stop_if_requested",
]

DEFAULT_SIGNALS = ("TERM", "USR1")
# Signals a scheduler sends ahead of a kill (SIGKILL/SIGSTOP cannot be caught; XCPU: CPU-time limits).
CATCHABLE = ("TERM", "USR1", "USR2", "INT", "HUP", "QUIT", "ALRM", "XCPU")

# One request per process, shared by nested contexts (experiment → its training runs).
_request = {"signal": None, "count": 0}
_active = []  # the contexts entered and not left, innermost last


def parse_signals(value: Union[str, Sequence[str], None]) -> tuple:
    """'TERM,USR1' (or 'SIGTERM,SIGUSR1', any case; a sequence of names) → ('TERM', 'USR1');
    'none' / '' / None → () (no handlers: a signal acts as it would without us)."""
    names = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if value is None:
        return ()
    if names is None or not all(isinstance(name, str) for name in names):
        raise InvalidValue("preempt_signals", f"must be signal names such as 'TERM,USR1', got {value!r}", sep=": ")
    out = []
    for name in names:
        word = name.strip().upper()
        word = word[3:] if word.startswith("SIG") else word
        if word in ("", "NONE") and len(names) == 1:
            return ()
        if word not in CATCHABLE:
            raise InvalidValue(
                "preempt_signals",
                f"must be comma-separated signal names of {', '.join(CATCHABLE)} (e.g. TERM,USR1), "
                f"or 'none' to turn preemption off; got {value!r}",
                sep=": ",
            )
        if word not in out:
            out.append(word)
    return tuple(out)


def add_preempt_argument(parser) -> None:
    """The commands' ``--preempt-signals`` option (parsed by parse_signals)."""
    from pfgmpp_fast.utils.cli_errors import checked

    parser.add_argument(
        "--preempt-signals",
        dest="preempt_signals",
        type=checked(parse_signals, "signals"),
        default=DEFAULT_SIGNALS,
        metavar="SIG,...",
        help="signals that stop the work at its next safe point, keeping what it needs to continue, "
        f"with exit code {PREEMPTED_EXIT_CODE} (default TERM,USR1; 'none': off)",
    )


def _handle(signum, frame) -> None:
    if _request["signal"] is None:
        _request["signal"] = signal.Signals(signum).name
    _request["count"] += 1


class Preemption:
    """``with Preemption(('TERM', 'USR1')) as p:`` — the signals record a request (``requested``)
    instead of ending the process; the previous handlers come back at the end of the block."""

    def __init__(self, signals: Union[str, Sequence[str], None] = DEFAULT_SIGNALS, inner_stops: bool = True):
        """inner_stops: whether :func:`stop_if_requested` inside this context (and not inside a
        nested one) stops the work; the training loop says False, so that work it runs between
        its steps (e.g. an evaluation through fid calc's code) never stops it without its state."""
        self.signals = parse_signals(signals)
        self.inner_stops = inner_stops
        self._previous = {}
        self.lagged = None  # poll_step reads the previous step's agreement (None: on NCCL)
        self._in_flight = None  # poll_step: (flag, CUDA event) of the previous step's all-reduce
        self._slots = []

    def __enter__(self) -> "Preemption":
        _active.append(self)
        if threading.current_thread() is threading.main_thread():
            for name in self.signals:
                number = getattr(signal, "SIG" + name)
                self._previous[number] = signal.signal(number, _handle)
        return self

    def __exit__(self, *exc) -> bool:
        for number, previous in self._previous.items():
            signal.signal(number, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        _active.remove(self)
        if not _active:  # the next run in this process starts without a request
            _request.update(signal=None, count=0)
        return False

    @property
    def requested(self) -> Optional[str]:
        """The first signal this process received ('SIGTERM', ...), None without one."""
        return _request["signal"]

    @property
    def ignored(self) -> int:
        """How many signals came after the first (counted, ignored)."""
        return max(_request["count"] - 1, 0)

    def poll_step(self) -> Optional[str]:
        """Once per training step, on every rank: the signal on which every rank stops after this
        step, None to go on.

        One process: this process's request, at once. gloo (CPU): :func:`agreed`, at once (the
        collective is synchronous anyway). NCCL (``lagged``): a synchronous read would make the
        host wait for the whole step on the GPU, every step; instead each step launches the
        all-reduce of this step's flag and an asynchronous copy of it to pinned memory, and reads
        the previous step's result (waiting only for that step's event while this step runs).
        Every rank reads the same step's result at the same step, so all stop after the same
        step: the one after the signal arrived, one step later than without the lag."""
        if self.lagged is None:
            self.lagged = distributed.is_enabled() and _nccl()
        if not self.lagged:
            return agreed()
        flag = torch.full((1,), _local_flag(), dtype=torch.int32, device=distributed.comm_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        event = None
        if flag.is_cuda:  # two pinned buffers and events, in turn: one in flight, one being read
            if not self._slots:
                self._slots = [(torch.empty(1, dtype=torch.int32, pin_memory=True), torch.cuda.Event()) for _ in "ab"]
            self._slots.reverse()
            host, event = self._slots[0]
            host.copy_(flag, non_blocking=True)
            event.record()
            flag = host
        previous, self._in_flight = self._in_flight, (flag, event)
        if previous is None:
            return None
        if previous[1] is not None:
            previous[1].synchronize()
        return _name(int(previous[0][0]))


def agreed() -> Optional[str]:
    """Whether every rank stops here: the signal (of the highest number) that any rank received,
    None when none did. One all-reduce under torch.distributed: every rank calls this at the
    same point."""
    if not distributed.is_enabled():
        return _request["signal"]
    flag = torch.tensor([_local_flag()], dtype=torch.int32, device=distributed.comm_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return _name(int(flag.item()))


def stop_if_requested(kept: str) -> None:
    """At a safe point that every rank reaches in step: raise :class:`Preempted` when any rank
    received a preemption signal inside an active :class:`Preemption` (``kept``: what was kept
    and how to continue). Outside one, or where the innermost says ``inner_stops=False``:
    nothing, and no collective."""
    if not _active or not _active[-1].inner_stops:
        return
    signal_name = agreed()
    if signal_name is not None:
        raise Preempted(f"preempted by {signal_name}: {kept}", signal_name)


def _local_flag() -> int:
    return int(getattr(signal, _request["signal"])) if _request["signal"] else 0


def _nccl() -> bool:
    return torch.distributed.get_backend() == "nccl"


def _name(number: int) -> Optional[str]:
    return signal.Signals(number).name if number else None
