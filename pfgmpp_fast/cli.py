"""The pfgmpp_fast command line: python -m pfgmpp_fast COMMAND [options].

Each command lives in its own module, which provides `add_arguments(parser)` and
`main(args) -> int`; only the module of the command that runs is imported, so `--help` is
fast and a missing optional dependency only affects its own command.

One error path for every command (:func:`command`, which wraps each command's ``main``): a
command raises and this module prints one message, ``error: <option>: <what is wrong and what
is allowed>``, never a traceback (argparse reports malformed values the same way).
Exit codes: 0 success; 2 a usage error (a bad option value, or a file an option names that is
missing or of the wrong kind); 1 a failure while running (I/O, non-finite training, ...);
130 interrupted. ``PFGMPP_FAST_DEBUG=1`` re-raises errors, with their traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import math
import os
import sys

__all__ = ["COMMANDS", "UsageError", "blame", "check_output_path", "int_at_least", "number", "add_threads_argument",
           "command", "report", "build_parser", "main"]

COMMANDS = {
    "demo": ("pfgmpp_fast.apps.demo", "train a small PFGM++ on the embedded digits data and sample it (the main job)"),
    "train": ("pfgmpp_fast.training.options", "train a network (torchrun for several GPUs/nodes)"),
    "phema": ("pfgmpp_fast.training.phema", "post-hoc EMA: networks of any EMA length from a run trained with --phema"),
    "generate": ("pfgmpp_fast.evaluation.generate", "generate images from a network checkpoint"),
    "fid": ("pfgmpp_fast.evaluation.fid", "FID: reference statistics, streaming evaluation and sweeps"),
    "bench": ("pfgmpp_fast.apps.bench", "run the benchmark suite on this device"),
    "convert": ("pfgmpp_fast.checkpoint", "convert a published EDM/PFGM++ pickle to our safe format (needs --trust-pickle)"),
    "experiment": ("pfgmpp_fast.apps.experiments", "reproduce the paper's robustness findings on digits"),
}
DEBUG_ENV = "PFGMPP_FAST_DEBUG"


class UsageError(ValueError):
    """A bad command-line input: ``option`` names it, the message says what is wrong and allowed."""

    def __init__(self, option: str, message: str):
        message = str(message)
        bare = option.lstrip("-").replace("-", "_") + ": "
        if message.startswith(bare):            # "seeds: ..." from a checker → "--seeds: ..."
            message = message[len(bare):]
        super().__init__(f"{option}: {message}" if option and not message.startswith(option) else message)
        self.option = option


@contextlib.contextmanager
def blame(option: str):
    """Input errors (ValueError, TypeError, FileNotFoundError) raised inside become UsageErrors naming ``option``."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UsageError(option, str(exc)) from exc


def check_output_path(option: str, path, is_dir: bool = False):
    """Fail early (UsageError naming ``option``) when ``path`` cannot be created: the nearest
    existing ancestor must be a writable folder, and ``path`` itself not the wrong kind."""
    if path is None:
        return None
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and os.path.isdir(path) != is_dir:
        raise UsageError(option, f"{path} exists and is {'a file' if is_dir else 'a folder'}; "
                                 f"expected {'a folder' if is_dir else 'a file path'}")
    parent = path if is_dir else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(option, f"cannot create {path}: {parent} is "
                                 f"{'not a folder' if not os.path.isdir(parent) else 'not writable'}")
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


def add_threads_argument(p) -> None:
    p.add_argument("--threads", type=int_at_least(0), default=1,
                   help="CPU threads of torch (default 1: robust when other processes share the cores; "
                        "0 = torch's default)")


def _command_of(argv) -> str | None:
    for token in argv:
        if not token.startswith("-"):
            return token if token in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="python -m pfgmpp_fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name != command:
            continue
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            p.set_defaults(_missing=module)
    return parser


def _close_process_group() -> None:
    dist = sys.modules.get("pfgmpp_fast.utils.distributed")
    if dist is not None:
        dist.close()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser(_command_of(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:               # argparse has printed the usage error (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"error: the '{args.command}' command is not available in this build", file=sys.stderr)
        return 2
    return command(importlib.import_module(args._module).main)(args)


def report(exc: BaseException) -> int:
    """Print ``exc`` as one line and return the exit code (the module docstring's rules)."""
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    _close_process_group()
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
            return int(main_fn(args) or 0)
        except (Exception, KeyboardInterrupt) as exc:   # noqa: BLE001 - the one place errors become messages
            if os.environ.get(DEBUG_ENV) == "1" and not isinstance(exc, KeyboardInterrupt):
                raise
            return report(exc)
    run.__wrapped_command__ = True
    return main_fn if getattr(main_fn, "__wrapped_command__", False) else run
