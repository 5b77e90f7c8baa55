"""`python -m pfgmpp_fast train`: the training command (training/train.py: its options and the run)
with in-training evaluation (``--eval-*``: evaluation/in_training.py).

The command lives here, above both workflows, because the training loop does not import the
evaluation workflow: it calls the evaluator it is handed at each network snapshot. The
evaluation is on when ``--eval-ref`` is given; the other ``--eval-*`` options are `fid calc`'s
(``--metrics``, ``--num-images``, ``--ref``, ``--features``, ``--steps``, ``--batch``,
``--inception-weights``, ``--digits-cache``) for the evaluation, with its checks.
"""

from __future__ import annotations

import argparse

from pfgmpp_fast.evaluation.features import FEATURES
from pfgmpp_fast.evaluation.generate import DEFAULT_STEPS
from pfgmpp_fast.evaluation.in_training import EVAL_METRICS, SnapshotEvaluator
from pfgmpp_fast.training import train
from pfgmpp_fast.utils.cli_errors import InvalidArgument, UsageError, command, int_at_least

__all__ = ["add_arguments", "evaluator_from_args", "main"]

# SnapshotEvaluator argument → (command-line option, args attribute)
EVAL_OPTIONS = {
    "ref": ("--eval-ref", "eval_ref"),
    "metrics": ("--eval-metrics", "eval_metrics"),
    "num_images": ("--eval-images", "eval_images"),
    "features": ("--eval-features", "eval_features"),
    "num_steps": ("--eval-steps", "eval_steps"),
    "batch": ("--eval-batch", "eval_batch"),
    "inception_weights": ("--eval-inception-weights", "eval_inception_weights"),
    "digits_cache": ("--eval-digits-cache", "eval_digits_cache"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    train.add_arguments(parser)
    g = parser.add_argument_group(
        "in-training evaluation: the EMA network at every network snapshot (--snap), through fid calc's "
        "streaming path on the job's ranks, recorded as Eval/<metric> in stats.jsonl and TensorBoard"
    )
    a = g.add_argument
    a("--eval-ref", default=None, metavar="NPZ", help="reference statistics (fid ref); turns the evaluation on")
    a(
        "--eval-metrics",
        default=None,
        metavar="LIST",
        help=f"comma-separated subset of {','.join(EVAL_METRICS)} (default fid; the FID is FDD with --eval-features "
        "digits; kid and prc need a reference made with fid ref --metrics kid/prc)",
    )
    a(
        "--eval-images",
        type=int_at_least(2),
        default=None,
        metavar="N",
        help="images per evaluation, seeds 0..N-1 (default 10000)",
    )
    a("--eval-features", choices=FEATURES, default=None, help="feature space (default inception; digits: FDD)")
    a("--eval-steps", type=int_at_least(1), default=None, metavar="N", help=f"sampling steps (default {DEFAULT_STEPS})")
    a("--eval-batch", type=int_at_least(1), default=None, metavar="N", help="images per batch and rank (default 64)")
    a(
        "--eval-inception-weights",
        default=None,
        metavar="PATH",
        help="local Inception weights (fid calc --inception-weights)",
    )
    a("--eval-digits-cache", default=None, metavar="PATH", help="digits feature network cache file")


def evaluator_from_args(args):
    """The SnapshotEvaluator of the --eval-* options (None without --eval-ref); errors name the option."""
    given = {name: getattr(args, attr) for name, (_, attr) in EVAL_OPTIONS.items() if getattr(args, attr) is not None}
    if "ref" not in given:
        if given:
            raise UsageError(
                "--eval-ref",
                f"is required with {EVAL_OPTIONS[next(iter(given))][0]}: the reference statistics (fid ref) the "
                "in-training evaluation compares with",
            )
        return None
    try:
        return SnapshotEvaluator(**given)
    except InvalidArgument as exc:
        raise UsageError.about(EVAL_OPTIONS[exc.name][0], exc) from None


@command
def main(args) -> int:
    return train.run_from_args(args, evaluator_from_args(args))
