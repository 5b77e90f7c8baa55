"""Post-hoc EMA after training: `python -m pfgmpp_fast phema` reconstructs networks of any EMA
length from the snapshots of a run trained with ``--phema`` (tracked during training by
training/ema.py's :class:`PowerFunctionEMA`). The maths, the snapshots' reading and the
reconstruction are the core module pfgmpp_fast/phema.py (its docstring has the derivation).
"""

from __future__ import annotations

import argparse
import os

from pfgmpp_fast.checkpoint import save_network
from pfgmpp_fast.phema import (
    MAX_ERROR,
    available_stds,
    list_snapshots,
    parse_stds,
    reconstruct,
    reconstruct_network,
    snapshot_name,
)
from pfgmpp_fast.utils.cli_errors import check_output_path, command, number

# available_stds and reconstruct_network are the Python API of post-hoc EMA named in the README.
__all__ = ["available_stds", "reconstruct_network", "add_arguments", "main"]


# ----------------------------------------------------------------------------------------
# Command line: python -m pfgmpp_fast phema


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="training run trained with --phema")
    p.add_argument(
        "--std", required=True, help="EMA lengths to reconstruct (relative standard deviations), e.g. 0.03,0.05,0.07"
    )
    p.add_argument(
        "--at-kimg",
        type=number(positive=True),
        default=None,
        help="training point (default: the newest phema snapshot)",
    )
    p.add_argument("--outdir", required=True, help="where the networks go (phema-<std>-<kimg>.safetensors)")
    p.add_argument(
        "--max-error",
        type=number(positive=True),
        default=MAX_ERROR,
        help=f"largest relative L2 error of a reconstructed EMA profile (default {MAX_ERROR:g})",
    )


@command
def main(args) -> int:
    stds = parse_stds(args.std, "--std")
    check_output_path("--outdir", args.outdir, is_dir=True)
    try:
        snaps = list_snapshots(args.run_dir)
        at_nimg = None if args.at_kimg is None else int(round(args.at_kimg * 1000))
        results = reconstruct(snaps, stds, at_nimg, max_error=args.max_error)
    except (ValueError, FileNotFoundError) as exc:
        # the run holds no snapshots that give these EMA lengths here: a runtime condition (exit 1)
        raise RuntimeError(str(exc)) from exc
    print(f"phema: {len(snaps)} snapshots of EMA lengths {sorted({s.std for s in snaps})} in {args.run_dir}")
    for net, info in results:
        path = os.path.join(args.outdir, snapshot_name(info["phema_std"], info["nimg"]))
        save_network(path, net, extra_metadata=dict(info, reconstructed_from=os.path.abspath(args.run_dir)))
        print(
            f"wrote {path} (std {info['phema_std']:g}, kimg {info['kimg']:g}, profile error "
            f"{info['phema_error']:.2e}, from {info['phema_sources']} snapshots)"
        )
    return 0
