"""The one error path of every command, the named argument errors, and the argparse pieces
the commands share.

Each command's ``main`` is wrapped by :func:`command`: it raises, and one message is printed,
``error: <option>: <what is wrong and what is allowed>``, never a traceback (argparse reports
malformed values the same way). Exit codes: 0 success; 2 a usage error (a bad option value, or
a file an option names that is missing or of the wrong kind); 1 a failure while running (I/O,
non-finite training, ...); 75 (``PREEMPTED_EXIT_CODE``, sysexits' EX_TEMPFAIL) preempted: a
signal stopped the work at a safe point after keeping what it needs to continue, so the same
command continues it (utils/preemption.py); 130 interrupted. ``PFGMPP_FAST_DEBUG=1`` re-raises errors, with
their traceback. The checkers raise :class:`InvalidArgument` errors (ValueError/TypeError/
FileNotFoundError that carry the argument's ``name`` and ``detail``), so a command maps them to
its own option spelling without reading messages. Below every layer (no package import), so
every module can use it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
from typing import Optional

__all__ = [
    "InvalidArgument",
    "InvalidValue",
    "InvalidType",
    "MissingFile",
    "UsageError",
    "Preempted",
    "PREEMPTED_EXIT_CODE",
    "blame",
    "check_output_path",
    "int_at_least",
    "number",
    "boolean",
    "BoolOption",
    "Unsupported",
    "checked",
    "supported_choice",
    "D_from_published",
    "add_threads_argument",
    "command",
    "report",
    "DEBUG_ENV",
]

DEBUG_ENV = "PFGMPP_FAST_DEBUG"
PREEMPTED_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, the same command continues


class InvalidArgument(Exception):
    """An error about one named argument, raised by the checkers (pfgmpp_fast.checks, the training
    options): ``name`` is the argument as the API calls it and ``detail`` what is wrong and allowed,
    so a command names its own option for it without reading the message. The message is
    ``name + sep + detail`` ("D must be in ...", or with ``sep=": "`` the name as a label:
    "seeds: range ..."), or ``message`` where given. Use the concrete kinds below."""

    def __init__(self, name: str, detail: str, sep: str = " ", message: Optional[str] = None):
        super().__init__(name + sep + detail if message is None else message)
        self.name, self.detail = name, detail
        self.labelled = message is None and sep == ": "  # the name only labels the detail

    def __reduce__(self):  # picklable (exceptions cross process boundaries)
        return _rebuild, (type(self), self.name, self.detail, str(self), self.labelled)


def _rebuild(kind, name, detail, message, labelled):
    exc = kind(name, detail, message=message)
    exc.labelled = labelled
    return exc


class InvalidValue(InvalidArgument, ValueError):
    """A named argument with a value outside its allowed range."""


class InvalidType(InvalidArgument, TypeError):
    """A named argument of the wrong type."""


class MissingFile(InvalidArgument, FileNotFoundError):
    """A named argument naming a file that does not exist."""


class UsageError(ValueError):
    """A bad command-line input: ``option`` names it, ``message`` says what is wrong and allowed
    (the error reads ``<option>: <message>``; with ``worded=True`` the message is a sentence that
    already starts with the option, e.g. ``--fp16=1 means ...``, and reads as written)."""

    def __init__(self, option: str, message: str, *, worded: bool = False):
        super().__init__(message if worded else f"{option}: {message}")
        self.option = option

    @classmethod
    def about(cls, option: str, exc: BaseException) -> "UsageError":
        """The input error ``exc`` as a UsageError naming ``option``: ``<option>: <message>``, where
        the option replaces a name that only labels the message (``seeds: range ...`` →
        ``--seeds: range ...``; ``D must be ...`` → ``--D: D must be ...``)."""
        return cls(option, _after_option(exc))


def _after_option(exc: BaseException) -> str:
    """What follows ``<option>: `` for the input error ``exc``: its message, less the argument's
    name where that only labels it (an :class:`InvalidArgument` says so)."""
    return exc.detail if isinstance(exc, InvalidArgument) and exc.labelled else str(exc)


class Preempted(Exception):
    """The work stopped at a safe point on a preemption signal (``signal``: 'SIGTERM', ...) after
    keeping what it needs to continue; the message says what was kept and how to continue. The
    command exits with PREEMPTED_EXIT_CODE (utils/preemption.py raises it)."""

    def __init__(self, message: str, signal: str = "SIGTERM"):
        super().__init__(message)
        self.signal = signal

    def __reduce__(self):  # picklable (exceptions cross process boundaries)
        return type(self), (str(self), self.signal)


@contextlib.contextmanager
def blame(option: str):
    """Input errors (ValueError, TypeError, FileNotFoundError) raised inside become UsageErrors naming ``option``."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UsageError.about(option, exc) from exc


def check_output_path(option: str, path, is_dir: bool = False):
    """Fail early (UsageError naming ``option``) when ``path`` cannot be created: the nearest
    existing ancestor must be a writable folder, and ``path`` itself not the wrong kind."""
    if path is None:
        return None
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and os.path.isdir(path) != is_dir:
        raise UsageError(
            option,
            f"{path} exists and is {'a file' if is_dir else 'a folder'}; "
            f"expected {'a folder' if is_dir else 'a file path'}",
        )
    parent = path if is_dir else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            option,
            f"cannot create {path}: {parent} is {'not a folder' if not os.path.isdir(parent) else 'not writable'}",
        )
    return path


def int_at_least(low: int):
    """An argparse ``type``: an integer >= low (argparse then names the option in its error)."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


def number(positive: bool = False, allow_inf: bool = False):
    """An argparse ``type``: a float, never NaN; > 0 if ``positive``, >= 0 otherwise; finite
    unless ``allow_inf``."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if math.isnan(value) or (value <= 0 if positive else value < 0) or (math.isinf(value) and not allow_inf):
            allowed = ("(0, " if positive else "[0, ") + ("inf]" if allow_inf else "inf)")
            raise argparse.ArgumentTypeError(f"must be a number in {allowed}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


_TRUE_WORDS = ("1", "true", "t", "yes", "y", "on")
_FALSE_WORDS = ("0", "false", "f", "no", "n", "off")


def boolean(text) -> bool:
    """An argparse ``type``: a boolean as click's BOOL reads it (the published scripts' ``--cond=1``):
    1/0, true/false, t/f, yes/no, y/n, on/off, in any case."""
    word = str(text).strip().lower()
    if word in _TRUE_WORDS or word in _FALSE_WORDS:
        return word in _TRUE_WORDS
    raise argparse.ArgumentTypeError(f"must be a boolean (1/0, true/false, yes/no, on/off), got {text!r}")


class BoolOption(argparse.Action):
    """A published BOOL option: ``--cond`` alone is true; ``--cond=0``, ``--cond 1``, ``--cond=true``
    as click reads them. With ``refuse`` (the message: it is not supported, what to use instead)
    the feature does not exist here: false (the published default) is accepted, true is refused
    while parsing."""

    def __init__(self, option_strings, dest, refuse=None, **kwargs):
        self.refuse = refuse
        super().__init__(option_strings, dest, nargs="?", metavar="BOOL", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            value = True if values is None else boolean(values)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        if value and self.refuse:
            raise argparse.ArgumentError(self, self.refuse)
        setattr(namespace, self.dest, value)


class Unsupported(argparse.Action):
    """A published flag whose feature does not exist here: refused while parsing with ``refuse``
    (it is not supported, what to use instead)."""

    def __init__(self, option_strings, dest, refuse="", help=None, **kwargs):
        self.refuse = refuse
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help or refuse)

    def __call__(self, parser, namespace, values, option_string=None):
        raise argparse.ArgumentError(self, self.refuse)


def checked(check, name: str):
    """An argparse ``type`` from a checker that raises ValueError/TypeError (argparse names the option)."""

    def parse(text):
        try:
            return check(text)
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(_after_option(exc)) from None

    parse.__name__ = name
    return parse


def supported_choice(supported, unsupported, instead: str):
    """An argparse ``type`` for a published choice of which only ``supported`` exists here: the
    ``unsupported`` values are refused, saying so and what to use ``instead``."""

    def parse(text):
        if text in supported:
            return text
        if text in unsupported:
            raise argparse.ArgumentTypeError(f"{text} is not supported here; {instead}")
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(supported + unsupported)}, got {text!r}")

    parse.__name__ = "choice"
    return parse


def D_from_published(D, aug_dim, pfgmpp, default):
    """D from our ``--D`` and the published pair ``--pfgmpp BOOL --aug_dim N`` (already parsed):
    ``--pfgmpp=1`` means D = --aug_dim (published default 128), ``--pfgmpp=0`` means D = inf
    (--aug_dim is then unused, as published); without --pfgmpp, --D or --aug_dim give D, else ``default``."""
    if D is not None and aug_dim is not None and D != aug_dim:
        raise UsageError("--aug_dim", f"--aug_dim {aug_dim:g} and --D {D:g} disagree; give one of them", worded=True)
    given = D if D is not None else aug_dim
    if pfgmpp is None:
        return default if given is None else given
    if pfgmpp:
        return 128.0 if given is None else given
    if D is not None and not math.isinf(D):
        raise UsageError(
            "--pfgmpp",
            f"--pfgmpp=0 means D = inf (EDM diffusion), but --D {D:g} was given; "
            "drop --D, or use --pfgmpp=1 for a finite D",
            worded=True,
        )
    return math.inf


def add_threads_argument(p) -> None:
    p.add_argument(
        "--threads",
        type=int_at_least(0),
        default=1,
        help="CPU threads of torch (default 1: robust when other processes share the cores; 0 = torch's default)",
    )


def _close_process_group(failed: bool) -> None:
    dist = sys.modules.get("pfgmpp_fast.utils.distributed")
    if dist is not None:
        dist.close(failed=failed)


def report(exc: BaseException) -> int:
    """Print ``exc`` as one line and return the exit code (the module docstring's rules)."""
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    if isinstance(exc, Preempted):  # every rank stops at the same agreed point: leave in order
        _close_process_group(failed=False)
        if os.environ.get("RANK", "0") == "0":  # the same line on every rank: once
            print(str(exc), file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    _close_process_group(failed=True)
    message = str(exc).strip() or type(exc).__name__
    if not isinstance(exc, (ValueError, TypeError, OSError, RuntimeError, ArithmeticError)):
        message = f"unexpected {type(exc).__name__}: {message} (rerun with {DEBUG_ENV}=1 for the traceback)"
    print(f"error: {message}", file=sys.stderr)
    # input errors (ValueError incl. UsageError, TypeError, a missing file) are usage errors
    return 2 if isinstance(exc, (ValueError, TypeError, FileNotFoundError)) else 1


def command(main_fn):
    """Wrap a command's ``main(args)``: errors become one message and an exit code (:func:`report`)."""

    @functools.wraps(main_fn)
    def run(args) -> int:
        try:
            code = int(main_fn(args) or 0)
            _close_process_group(failed=False)  # a command that joined a process group leaves it
            return code
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the one place errors become messages
            if os.environ.get(DEBUG_ENV) == "1" and not isinstance(exc, KeyboardInterrupt):
                raise
            return report(exc)

    run.__wrapped_command__ = True
    return main_fn if getattr(main_fn, "__wrapped_command__", False) else run
