"""The exponential moving averages a run keeps of its network, behind one interface
(:class:`EMA`, the shape of EDM2's training/phema.py): ``update(params, cur_nimg, batch_size)``
after every step, ``state_dict``/``load_state_dict`` for the training state, ``networks()`` for
snapshots. :class:`HalfLifeEMA` is EDM's average (a half-life in images with a ramp-up);
:class:`PowerFunctionEMA` tracks EDM2's power-function profiles for post-hoc EMA (the maths and
the reconstruction are the core module pfgmpp_fast/phema.py).

Each update is one foreach lerp per average with β a Python float of the image counter, so
updating never waits for the device.
"""

from __future__ import annotations

import abc
import copy
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from pfgmpp_fast.checkpoint import save_network
from pfgmpp_fast.phema import SUBDIR, snapshot_name, std_to_exp

__all__ = ["EMA", "HalfLifeEMA", "PowerFunctionEMA"]


class EMA(abc.ABC):
    """An average of the trained parameters, updated after every optimizer step."""

    @abc.abstractmethod
    def update(self, params: List[torch.Tensor], cur_nimg: int, batch_size: int) -> None:
        """After the step that brought the run from ``cur_nimg − batch_size`` to ``cur_nimg`` images."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """The averages on the CPU, for the training state."""

    @abc.abstractmethod
    def load_state_dict(self, state: Optional[dict], source: str = "the training state") -> None:
        """Continue exactly from ``state_dict()`` output (``source`` names it in errors)."""

    @abc.abstractmethod
    def networks(self) -> Iterator[Tuple[str, torch.nn.Module]]:
        """(label, a network holding the averaged parameters) for each average kept."""


class HalfLifeEMA(EMA):
    """EDM's EMA: β = 0.5^(batch / half-life) with the half-life in images, limited during
    ramp-up to ``rampup_ratio`` times the images seen before the step (None: no ramp-up)."""

    def __init__(self, net: torch.nn.Module, halflife_kimg: float, rampup_ratio: Optional[float] = None):
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.params = list(self.net.parameters())
        self.halflife_kimg, self.rampup_ratio = halflife_kimg, rampup_ratio

    def beta(self, cur_nimg: int, batch_size: int) -> float:
        """The weight of the old average in the update that ends at ``cur_nimg`` images."""
        halflife = self.halflife_kimg * 1000
        if self.rampup_ratio is not None:
            halflife = min(halflife, (cur_nimg - batch_size) * self.rampup_ratio)
        return 0.5 ** (batch_size / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, params: List[torch.Tensor], cur_nimg: int, batch_size: int) -> None:
        torch._foreach_lerp_(self.params, params, 1.0 - self.beta(cur_nimg, batch_size))

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.net.state_dict().items()}

    def load_state_dict(self, state: Optional[dict], source: str = "the training state") -> None:
        if state is None:
            raise ValueError(f"resume: {source} has no EMA network")
        self.net.load_state_dict(state, strict=True)

    def networks(self) -> Iterator[Tuple[str, torch.nn.Module]]:
        yield "ema", self.net


class PowerFunctionEMA(EMA):
    """The power-function EMAs of one run (one parameter copy per profile, β = (1 − Δt/t)^(γ+1)),
    state for resume, and snapshots every ``snap_kimg``."""

    def __init__(self, stds: Sequence[float], params: List[torch.Tensor], template: torch.nn.Module, snap_kimg: float):
        self.stds = tuple(float(s) for s in stds)
        self.gammas = tuple(std_to_exp(s) for s in self.stds)
        self.emas = [[p.detach().clone() for p in params] for _ in self.stds]
        self.template, self.snap_nimg = template, snap_kimg * 1000  # template: a module to save through

    @torch.no_grad()
    def update(self, params: List[torch.Tensor], cur_nimg: int, batch_size: int) -> None:
        for gamma, ema in zip(self.gammas, self.emas):
            beta = (1.0 - batch_size / cur_nimg) ** (gamma + 1)
            torch._foreach_lerp_(ema, params, 1.0 - beta)

    def state_dict(self) -> dict:
        return {"stds": list(self.stds), "emas": [[p.detach().cpu() for p in ema] for ema in self.emas]}

    def load_state_dict(self, state: Optional[dict], source: str = "the training state") -> None:
        """Exact continuation; a state without these profiles is refused (a power-function EMA
        averages from the first step, so it cannot start in the middle of a run)."""
        saved = list(state["stds"]) if state else []
        missing = [s for s in self.stds if s not in saved]
        if missing:
            raise ValueError(
                f"resume: {source} has no power-function EMA for --phema {missing} (it tracks "
                f"{saved or 'none'}); --phema must be given from the start of a run"
            )
        with torch.no_grad():
            for std, ema in zip(self.stds, self.emas):
                stored = state["emas"][saved.index(std)]
                if len(stored) != len(ema) or any(a.shape != b.shape for a, b in zip(stored, ema)):
                    raise ValueError(f"resume: the phema EMA {std} in {source} does not fit this network")
                torch._foreach_copy_(ema, [t.to(ema[0].device) for t in stored])

    def networks(self) -> Iterator[Tuple[str, torch.nn.Module]]:
        """One copy of the template, refilled with each profile in turn: use each before the next."""
        net = copy.deepcopy(self.template)
        params = list(net.parameters())
        for std, ema in zip(self.stds, self.emas):
            with torch.no_grad():
                torch._foreach_copy_(params, ema)
            yield f"{std:g}", net

    def due(self, prev_nimg: int, cur_nimg: int, done: bool) -> bool:
        """A snapshot at this tick end: a multiple of snap_kimg was reached since the last one."""
        return done or cur_nimg // self.snap_nimg > prev_nimg // self.snap_nimg

    def save(self, run_dir: str, cur_nimg: int, batch: int, extra: dict) -> None:
        """One snapshot per profile (atomic; rank 0 only)."""
        for (_, net), std, gamma in zip(self.networks(), self.stds, self.gammas):
            meta = dict(
                extra,
                phema_std=std,
                phema_gamma=gamma,
                nimg=int(cur_nimg),
                kimg=cur_nimg / 1000,
                step=int(cur_nimg // batch),
                batch=int(batch),
            )
            save_network(os.path.join(run_dir, SUBDIR, snapshot_name(std, cur_nimg)), net, extra_metadata=meta)
