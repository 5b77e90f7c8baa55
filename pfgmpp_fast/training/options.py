"""Training options: one frozen dataclass with the published CIFAR-10 recipe as defaults and
their validation (every error names the option, the value and the allowed range). The `train`
command (train.py) parses them from the command line; the loop (loop.py) runs them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

import torch

from pfgmpp_fast import checks
from pfgmpp_fast.utils.cli_errors import InvalidArgument, InvalidType, InvalidValue, MissingFile
from pfgmpp_fast.utils.preemption import DEFAULT_SIGNALS, parse_signals

__all__ = [
    "TrainingOptions",
    "DEFAULTS",
    "ARCHES",
    "PRECISIONS",
    "RESUME_KEYS",
    "TrainingError",
    "resolve_options",
    "jsonable",
    "option_diffs",
]


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """Everything a run is configured by (EDM's train.py options, named as there where possible)."""

    run_dir: str = "runs/train"  # the run directory (EDM: --outdir); created if missing
    data: str = "digits"  # 'digits' | folder | .zip | .npy | .npz
    cond: bool = False  # class-conditional (needs labels)
    arch: str = "ddpmpp"  # ddpmpp | ncsnpp | adm
    D: float = math.inf  # augmented dimension (PFGM++); inf = EDM, the published train.py's default
    resolution: Optional[int] = None  # expected data resolution (checked); default: the data's
    batch: int = 512  # global batch size
    batch_gpu: Optional[int] = None  # per-rank chunk (gradient accumulation); default batch / ranks
    lr: float = 10e-4  # Adam learning rate after the ramp-up
    lr_rampup_kimg: Optional[float] = 10000.0  # linear lr ramp-up length (kimg)
    ema_halflife_kimg: float = 500.0  # EMA half-life (EDM --ema 0.5 Mimg)
    ema_rampup_ratio: Optional[float] = 0.05  # EMA half-life ramp-up: at most this fraction of the images so far
    phema: Optional[tuple] = None  # power-function EMA lengths to track for post-hoc EMA (training/phema.py)
    phema_snap_kimg: float = 5000.0  # kimg between power-function EMA snapshots
    dropout: float = 0.13  # dropout probability of the network
    augment: float = 0.12  # augmentation probability (0 = off; the network then has no augment input)
    label_dropout: float = 0.0  # probability that a sample's label becomes "no label" (zeros), for
    # classifier-free guidance; needs cond
    xflip: bool = False  # dataset x-flips (doubles the data set)
    duration_mimg: float = 200.0  # training length (Mimg)
    tick_kimg: float = 50.0  # images per tick (one host sync, one log line per tick)
    snap_ticks: Optional[int] = 50  # ticks between network snapshots (None: never)
    dump_ticks: Optional[int] = 500  # ticks between training states (None: never)
    seed: int = 0  # network init, data order, augmentation and noise
    P_mean: float = -1.2  # mean of ln σ in training
    P_std: float = 1.2  # standard deviation of ln σ in training
    sigma_data: float = 0.5  # σ_d of the EDM preconditioning
    loss_scaling: float = 1.0  # EDM --ls (gradients are unscaled before Adam; same up to Adam's eps)
    network: dict = dataclasses.field(default_factory=dict)  # network overrides (model_channels, channel_mult, ...)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on the CPU) | bf16 | fp16 | fp32
    compile: object = "auto"  # auto (on for CUDA) | True | False
    channels_last: object = "auto"  # auto (on for CUDA) | True | False
    backend: str = "auto"  # kernel backend of the loss: auto | triton | cuda | cpu | reference
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    resume: Optional[str] = None  # None | 'auto' | path of a training-state-*.pt
    transfer: Optional[str] = None  # network file to start from (ours, or a published pickle with trust_pickle)
    trust_pickle: bool = False  # allow a published pickle for transfer (restricted unpickler)
    max_nonfinite: int = 10  # stop once more steps than this had a non-finite loss
    deterministic: bool = False  # torch.use_deterministic_algorithms
    cudnn_benchmark: bool = True  # torch.backends.cudnn.benchmark on CUDA (EDM --bench; off when deterministic)
    progress: object = "auto"  # progress bar: auto (a TTY) | True | False
    max_size: Optional[int] = None  # use only the first max_size images
    cache_dir: Optional[str] = None  # where the decoded data set is cached (data_cache.py); None: next to it
    preempt_signals: tuple = DEFAULT_SIGNALS  # signals that stop the run after the current step with a
    # training state and exit code 75 (utils/preemption.py); () = off
    tensorboard: bool = True  # TensorBoard event files in the run directory when the package is installed

    def __getitem__(self, name):  # o["batch"] reads like the published options dict
        return getattr(self, name)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


DEFAULTS = TrainingOptions().as_dict()
ARCHES = ("ddpmpp", "ncsnpp", "adm")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# Options a resumed run must share with the run that wrote the state.
RESUME_KEYS = (
    "data",
    "cond",
    "arch",
    "D",
    "batch",
    "seed",
    "P_mean",
    "P_std",
    "sigma_data",
    "augment",
    "xflip",
    "network",
    "lr",
    "lr_rampup_kimg",
    "ema_halflife_kimg",
    "ema_rampup_ratio",
    "dropout",
    "max_size",
    "label_dropout",
)


class TrainingError(RuntimeError):
    """A training run stopped for a reason the user must act on (non-finite losses, ...)."""


def parse_network_overrides(text: str) -> dict:
    """The network overrides given as JSON text (`--network`): a JSON object, else InvalidValue."""
    try:
        network = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidValue(
            "network",
            f"must be a JSON object of network overrides, e.g. '{{\"model_channels\": 64}}', got {text!r} ({exc})",
            sep=": ",
        ) from None
    if not isinstance(network, dict):
        raise InvalidValue("network", f"must be a JSON object of network overrides, got {text!r}", sep=": ")
    return network


def resolve_options(**options) -> TrainingOptions:
    """Defaults + ``options``, validated: a bad option raises an InvalidValue/InvalidType/MissingFile
    (ValueError/TypeError/FileNotFoundError) that names it in its message and in ``.name``."""
    if "duration_kimg" in options:
        options["duration_mimg"] = checks.check_number("duration_kimg", options.pop("duration_kimg")) / 1000.0
    if "aug_dim" in options:
        options["D"] = options.pop("aug_dim")
    if "network_overrides" in options:
        options["network"] = options.pop("network_overrides")
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(sorted(DEFAULTS))}")
    o = {**DEFAULTS, **options}
    o["run_dir"] = os.fspath(o["run_dir"])
    if o["arch"] not in ARCHES:
        raise InvalidValue("arch", f"must be one of {ARCHES}, got {o['arch']!r}")
    o["D"] = checks.parse_D(o["D"])
    if math.isfinite(o["D"]) and float(o["D"]).is_integer():
        o["D"] = float(o["D"])
    o["batch"] = int(checks.check_number("batch", o["batch"], integer=True))
    if o["batch_gpu"] is not None:
        o["batch_gpu"] = int(checks.check_number("batch_gpu", o["batch_gpu"], integer=True))
    for name in ("lr", "ema_halflife_kimg", "duration_mimg", "tick_kimg", "P_std", "sigma_data", "loss_scaling"):
        o[name] = checks.check_number(name, o[name])
    if o["phema"] is not None:
        from pfgmpp_fast.phema import parse_stds

        try:
            o["phema"] = parse_stds(o["phema"])
        except InvalidArgument:
            raise
        except ValueError as exc:  # a plain ValueError: its whole message is the detail
            raise InvalidValue("phema", str(exc), message=str(exc)) from None
    o["phema_snap_kimg"] = checks.check_number("phema_snap_kimg", o["phema_snap_kimg"])
    for name in ("lr_rampup_kimg", "ema_rampup_ratio"):
        o[name] = None if o[name] is None else checks.check_number(name, o[name], allow_zero=True)
    for name in ("snap_ticks", "dump_ticks"):
        o[name] = None if o[name] is None else int(checks.check_number(name, o[name], integer=True))
    for name in ("dropout", "augment", "label_dropout"):
        v = checks.check_number(name, o[name], allow_zero=True)
        if v > 1:
            raise InvalidValue(name, f"must be in [0, 1], got {v}")
        o[name] = v
    if not isinstance(o["P_mean"], (int, float)) or not math.isfinite(o["P_mean"]):
        raise InvalidValue("P_mean", f"must be a finite number, got {o['P_mean']!r}")
    o["P_mean"] = float(o["P_mean"])
    o["seed"] = int(checks.check_number("seed", o["seed"], allow_zero=True, integer=True))
    if o["seed"] >= 2**63:
        raise InvalidValue("seed", f"must be in [0, 2^63), got {o['seed']}")
    o["max_nonfinite"] = int(checks.check_number("max_nonfinite", o["max_nonfinite"], allow_zero=True, integer=True))
    if o["resolution"] is not None:
        o["resolution"] = int(checks.check_number("resolution", o["resolution"], integer=True))
    if o["max_size"] is not None:
        o["max_size"] = int(checks.check_number("max_size", o["max_size"], integer=True))
    for name in ("cond", "xflip", "deterministic", "trust_pickle", "cudnn_benchmark", "tensorboard"):
        o[name] = checks.as_bool(name, o[name])
    if o["label_dropout"] > 0 and not o["cond"]:
        raise InvalidValue(
            "label_dropout", f"= {o['label_dropout']:g} needs cond (a class-conditional network: --cond)"
        )
    for name in ("compile", "channels_last", "progress"):
        if o[name] != "auto":
            o[name] = checks.as_bool(name, o[name])
    if o["precision"] not in ("auto", *PRECISIONS):
        raise InvalidValue("precision", f"must be one of auto, bf16, fp16, fp32, got {o['precision']!r}")
    if o["backend"] not in checks.BACKENDS:
        raise InvalidValue("backend", f"must be one of {checks.BACKENDS}, got {o['backend']!r}")
    o["preempt_signals"] = parse_signals(o["preempt_signals"])
    if o["network"] is None:
        o["network"] = {}
    if isinstance(o["network"], str):
        o["network"] = parse_network_overrides(o["network"])
    if not isinstance(o["network"], dict):
        raise InvalidType("network", f"must be a dict of network overrides, got {type(o['network']).__name__}")
    if o["resume"] is not None and o["resume"] != "auto" and not os.path.isfile(o["resume"]):
        raise MissingFile("resume", f"no such training state {o['resume']}", sep=": ")
    if o["transfer"] is not None and not os.path.isfile(o["transfer"]):
        raise MissingFile("transfer", f"no such network file {o['transfer']}", sep=": ")
    return TrainingOptions(**o)


def option_diffs(saved: dict, o: TrainingOptions) -> list:
    """The RESUME_KEYS on which options ``saved`` by a run (a training state's or its
    training_options.json) differ from ``o``: ['key: state has ..., this run has ...']."""
    return [
        f"{k}: state has {saved.get(k)!r}, this run has {jsonable(o[k])!r}"
        for k in RESUME_KEYS
        if k in saved and saved.get(k) != jsonable(o[k])
    ]


def jsonable(value):
    """Plain JSON-compatible form (inf stays a float; tuples become lists)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value)
    return value
