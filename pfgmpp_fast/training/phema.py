"""Post-hoc EMA during and after training: :class:`PowerFunctionEMA` tracks the power-function
EMAs of a run trained with ``--phema`` and writes their snapshots; `python -m pfgmpp_fast phema`
reconstructs networks of any EMA length from them. The maths, the snapshots' reading and the
reconstruction are the core module pfgmpp_fast/phema.py (its docstring has the derivation).
"""
from __future__ import annotations

import argparse
import copy
import os
from typing import List, Optional, Sequence

import torch

from pfgmpp_fast.checkpoint import save_network
from pfgmpp_fast.utils.cli_errors import check_output_path, command, number
from pfgmpp_fast.phema import (MAX_ERROR, SUBDIR, available_stds, list_snapshots, parse_stds, reconstruct,
                               reconstruct_network, snapshot_name, std_to_exp)

# available_stds and reconstruct_network are the Python API of post-hoc EMA named in the README.
__all__ = ["PowerFunctionEMA", "available_stds", "reconstruct_network", "add_arguments", "main"]


# ----------------------------------------------------------------------------------------
# Tracking during training

class PowerFunctionEMA:
    """The power-function EMAs of one run: parameter copies updated with one foreach lerp per
    profile (β is a Python float of the image counter: no host sync), state for resume, and
    snapshots every ``snap_kimg``."""

    def __init__(self, stds: Sequence[float], params: List[torch.Tensor], template: torch.nn.Module,
                 snap_kimg: float):
        self.stds = tuple(float(s) for s in stds)
        self.gammas = tuple(std_to_exp(s) for s in self.stds)
        self.emas = [[p.detach().clone() for p in params] for _ in self.stds]
        self.template, self.snap_nimg = template, snap_kimg * 1000      # template: a module to save through

    @torch.no_grad()
    def update(self, params: List[torch.Tensor], t_next: int, t_delta: int):
        """After the step that brought the run from t_next − t_delta to t_next images."""
        for gamma, ema in zip(self.gammas, self.emas):
            beta = (1.0 - t_delta / t_next) ** (gamma + 1)
            torch._foreach_lerp_(ema, params, 1.0 - beta)

    def state_dict(self) -> dict:
        return {"stds": list(self.stds), "emas": [[p.detach().cpu() for p in ema] for ema in self.emas]}

    def load_state_dict(self, state: Optional[dict], source: str = "the training state"):
        """Exact continuation; a state without these profiles is refused (a power-function EMA
        averages from the first step, so it cannot start in the middle of a run)."""
        saved = list(state["stds"]) if state else []
        missing = [s for s in self.stds if s not in saved]
        if missing:
            raise ValueError(f"resume: {source} has no power-function EMA for --phema {missing} (it tracks "
                             f"{saved or 'none'}); --phema must be given from the start of a run")
        with torch.no_grad():
            for std, ema in zip(self.stds, self.emas):
                stored = state["emas"][saved.index(std)]
                if len(stored) != len(ema) or any(a.shape != b.shape for a, b in zip(stored, ema)):
                    raise ValueError(f"resume: the phema EMA {std} in {source} does not fit this network")
                torch._foreach_copy_(ema, [t.to(ema[0].device) for t in stored])

    def due(self, prev_nimg: int, cur_nimg: int, done: bool) -> bool:
        """A snapshot at this tick end: a multiple of snap_kimg was reached since the last one."""
        return done or cur_nimg // self.snap_nimg > prev_nimg // self.snap_nimg

    def save(self, run_dir: str, cur_nimg: int, batch: int, extra: dict):
        """One snapshot per profile (atomic; rank 0 only)."""
        net = copy.deepcopy(self.template)
        params = list(net.parameters())
        for std, gamma, ema in zip(self.stds, self.gammas, self.emas):
            with torch.no_grad():
                torch._foreach_copy_(params, ema)
            meta = dict(extra, phema_std=std, phema_gamma=gamma, nimg=int(cur_nimg), kimg=cur_nimg / 1000,
                        step=int(cur_nimg // batch), batch=int(batch))
            save_network(os.path.join(run_dir, SUBDIR, snapshot_name(std, cur_nimg)), net, extra_metadata=meta)


# ----------------------------------------------------------------------------------------
# Command line: python -m pfgmpp_fast phema

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="training run trained with --phema")
    p.add_argument("--std", required=True, help="EMA lengths to reconstruct (relative standard deviations), "
                                                "e.g. 0.03,0.05,0.07")
    p.add_argument("--at-kimg", type=number(positive=True), default=None,
                   help="training point (default: the newest phema snapshot)")
    p.add_argument("--outdir", required=True, help="where the networks go (phema-<std>-<kimg>.safetensors)")
    p.add_argument("--max-error", type=number(positive=True), default=MAX_ERROR,
                   help=f"largest relative L2 error of a reconstructed EMA profile (default {MAX_ERROR:g})")


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
        print(f"wrote {path} (std {info['phema_std']:g}, kimg {info['kimg']:g}, profile error "
              f"{info['phema_error']:.2e}, from {info['phema_sources']} snapshots)")
    return 0
