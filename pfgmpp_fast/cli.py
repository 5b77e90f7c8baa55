"""The pfgmpp_fast command line: python -m pfgmpp_fast COMMAND [options].

Each command lives in its own module, which provides `add_arguments(parser)` and
`main(args) -> int`; only the module of the command that runs is imported, so `--help` is
fast and a missing optional dependency only affects its own command. Every command's ``main``
runs through the one error path of utils/cli_errors.py (one message, exit 2 for usage errors,
1 for failures, never a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pfgmpp_fast.utils.cli_errors import command

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = {
    "demo": ("pfgmpp_fast.apps.demo", "train a small PFGM++ on the embedded digits data and sample it (the main job)"),
    "train": ("pfgmpp_fast.apps.train_command", "train a network (torchrun for several GPUs/nodes)"),
    "dataset": (
        "pfgmpp_fast.training.dataset_tool",
        "build a data set zip in the published format (images + dataset.json)",
    ),
    "phema": ("pfgmpp_fast.training.phema", "post-hoc EMA: networks of any EMA length from a run trained with --phema"),
    "generate": ("pfgmpp_fast.evaluation.generate", "generate images from a network checkpoint"),
    "fid": ("pfgmpp_fast.evaluation.fid", "FID: reference statistics, streaming evaluation and sweeps"),
    "bench": ("pfgmpp_fast.apps.bench", "run the benchmark suite on this device"),
    "convert": (
        "pfgmpp_fast.checkpoint",
        "convert a published EDM/PFGM++ pickle to our safe format (needs --trust-pickle)",
    ),
    "experiment": ("pfgmpp_fast.apps.experiments", "reproduce the paper's robustness findings on digits"),
}


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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser(_command_of(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"error: the '{args.command}' command is not available in this build", file=sys.stderr)
        return 2
    return command(importlib.import_module(args._module).main)(args)
