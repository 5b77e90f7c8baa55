"""Training: `python -m pfgmpp_fast train` and `run_training(**options) -> run_dir`.

A drop-in for the published PFGM++ / EDM train.py: the defaults are the published
CIFAR-10 recipe (batch 512, lr 1e-3 with a 10 Mimg ramp-up, EMA half-life 0.5 Mimg with
ramp-up ratio 0.05, dropout 0.13, augmentation probability 0.12, 200 Mimg, DDPM++, D=128),
the run directory holds the published files (training_options.json, log.txt, stats.jsonl,
network snapshots, training states) and several GPUs/nodes work through ``torchrun``.

What is different (and why it is fast and safe):

* the step is perturb → network → loss on the fused kernels (pfgmpp_fast.loss), the
  network is channels-last / autocast / compiled (networks.make_fast), Adam is fused,
  EMA and gradient clean-up are foreach kernels, and nothing in a step waits for the
  device (losses are summed on the device and read once per tick);
* the noise of training sample number i (its global position in the run) comes from the
  Philox stream keyed by (seed, i), and the data order and augmentations are functions of
  (seed, i) too, so a run is reproducible and does not depend on the number of ranks or
  on gradient accumulation (with dropout > 0 the dropout masks come from torch's RNG,
  seeded per rank: reproducible for a fixed rank count);
* files are written atomically; ``--resume auto`` continues from the newest intact
  training state; a non-finite loss skips the update on the device (fused Adam's
  ``found_inf``), is counted, and the run stops with an error once the count exceeds
  ``--max-nonfinite``; bad data / checkpoints / options fail before any step.

Precision: ``auto`` = bf16 autocast on CUDA, fp32 on the CPU (the published code trains in
fp32; ``--precision fp32`` reproduces that exactly).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import json
import math
import os
import re
import signal
import sys
import time
from typing import Optional

import torch

from pfgmpp_fast import reference as R
from pfgmpp_fast.io_utils import (append_line, atomic_save_json, atomic_torch_save_state, atomic_write_bytes,
                                  is_temp_file, load_torch_state)

__all__ = ["DEFAULTS", "resolve_options", "run_training", "add_arguments", "main",
           "find_latest_state", "find_latest_snapshot", "TrainingError"]

# ----------------------------------------------------------------------------------------
# Options

DEFAULTS = dict(
    run_dir="runs/train",     # the run directory (EDM: --outdir); created if missing
    data="digits",            # 'digits' | folder | .zip | .npy | .npz
    cond=False,               # class-conditional (needs labels)
    arch="ddpmpp",            # ddpmpp | ncsnpp | adm
    D=128.0,                  # augmented dimension (PFGM++), inf = EDM
    resolution=None,          # expected data resolution (checked); default: the data's
    batch=512,                # global batch size
    batch_gpu=None,           # per-rank chunk (gradient accumulation); default batch / ranks
    lr=10e-4,
    lr_rampup_kimg=10000.0,
    ema_halflife_kimg=500.0,  # EDM --ema 0.5 Mimg
    ema_rampup_ratio=0.05,
    dropout=0.13,
    augment=0.12,             # augmentation probability (0 = off; the network then has no augment input)
    xflip=False,              # dataset x-flips (doubles the data set)
    duration_mimg=200.0,
    tick_kimg=50.0,
    snap_ticks=50,
    dump_ticks=500,
    seed=0,
    P_mean=-1.2,
    P_std=1.2,
    sigma_data=0.5,
    loss_scaling=1.0,         # EDM --ls (we unscale the gradients before Adam; EDM does not: same up to Adam's eps)
    network=None,             # dict of network overrides (model_channels, channel_mult, ...)
    precision="auto",         # auto | bf16 | fp16 | fp32
    compile="auto",           # auto (on for CUDA) | True | False
    channels_last="auto",
    backend="auto",           # kernel backend of the loss: auto | triton | cuda | cpu | reference
    device="auto",
    resume=None,              # None | 'auto' | path of a training-state-*.pt
    transfer=None,            # network file to start from (ours, or a published pickle with trust_pickle)
    trust_pickle=False,
    max_nonfinite=10,
    deterministic=False,
    progress="auto",          # auto (a TTY) | True | False
    max_size=None,            # use only the first max_size images
)

ARCHES = ("ddpmpp", "ncsnpp", "adm")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
# Options a resumed run must share with the run that wrote the state.
RESUME_KEYS = ("data", "cond", "arch", "D", "batch", "seed", "P_mean", "P_std", "sigma_data", "augment",
               "xflip", "network", "lr", "lr_rampup_kimg", "ema_halflife_kimg", "ema_rampup_ratio", "dropout",
               "max_size")
STATE_RE = re.compile(r"^training-state-(\d+)\.pt$")


class TrainingError(RuntimeError):
    """A training run stopped for a reason the user must act on (non-finite losses, ...)."""


def _as_bool(name, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be a boolean, got {value!r}")


def _positive(name, value, allow_zero=False, integer=False, allow_inf=False):
    kind = int if integer else float
    try:
        if isinstance(value, bool):
            raise TypeError
        out = kind(value) if not (integer and isinstance(value, float) and not value.is_integer()) else None
        if out is None:
            raise TypeError
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}") from None
    bad = math.isnan(out) or (out < 0 if allow_zero else out <= 0) or (math.isinf(out) and not allow_inf)
    if bad:
        rng = ("[0, " if allow_zero else "(0, ") + ("inf]" if allow_inf else "inf)")
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return out


def resolve_options(**options) -> dict:
    """Defaults + ``options``, validated (ValueError/TypeError naming the option)."""
    if "duration_kimg" in options:
        options["duration_mimg"] = _positive("duration_kimg", options.pop("duration_kimg")) / 1000.0
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
        raise ValueError(f"arch must be one of {ARCHES}, got {o['arch']!r}")
    if isinstance(o["D"], str):
        o["D"] = float("inf") if o["D"].lower() in ("inf", "edm") else o["D"]
    o["D"] = R.check_D(o["D"])
    if math.isfinite(o["D"]) and float(o["D"]).is_integer():
        o["D"] = float(o["D"])
    o["batch"] = int(_positive("batch", o["batch"], integer=True))
    if o["batch_gpu"] is not None:
        o["batch_gpu"] = int(_positive("batch_gpu", o["batch_gpu"], integer=True))
    for name in ("lr", "ema_halflife_kimg", "duration_mimg", "tick_kimg", "P_std", "sigma_data", "loss_scaling"):
        o[name] = _positive(name, o[name])
    for name in ("lr_rampup_kimg", "ema_rampup_ratio"):
        o[name] = None if o[name] is None else _positive(name, o[name], allow_zero=True)
    for name in ("snap_ticks", "dump_ticks"):
        o[name] = None if o[name] is None else int(_positive(name, o[name], integer=True))
    for name in ("dropout", "augment"):
        v = _positive(name, o[name], allow_zero=True)
        if v > 1:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
        o[name] = v
    if not isinstance(o["P_mean"], (int, float)) or not math.isfinite(o["P_mean"]):
        raise ValueError(f"P_mean must be a finite number, got {o['P_mean']!r}")
    o["P_mean"] = float(o["P_mean"])
    o["seed"] = int(_positive("seed", o["seed"], allow_zero=True, integer=True))
    if o["seed"] >= 2**63:
        raise ValueError(f"seed must be in [0, 2^63), got {o['seed']}")
    o["max_nonfinite"] = int(_positive("max_nonfinite", o["max_nonfinite"], allow_zero=True, integer=True))
    if o["resolution"] is not None:
        o["resolution"] = int(_positive("resolution", o["resolution"], integer=True))
    if o["max_size"] is not None:
        o["max_size"] = int(_positive("max_size", o["max_size"], integer=True))
    for name in ("cond", "xflip", "deterministic", "trust_pickle"):
        o[name] = _as_bool(name, o[name])
    for name in ("compile", "channels_last", "progress"):
        if o[name] != "auto":
            o[name] = _as_bool(name, o[name])
    if o["precision"] not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be one of auto, bf16, fp16, fp32, got {o['precision']!r}")
    if o["backend"] not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {o['backend']!r}")
    if o["network"] is None:
        o["network"] = {}
    if isinstance(o["network"], str):
        try:
            o["network"] = json.loads(o["network"])
        except json.JSONDecodeError as exc:
            raise ValueError(f"network must be a JSON object of network overrides, got {o['network']!r}: {exc}") from None
    if not isinstance(o["network"], dict):
        raise TypeError(f"network must be a dict of network overrides, got {type(o['network']).__name__}")
    if o["resume"] is not None and o["resume"] != "auto" and not os.path.isfile(o["resume"]):
        raise FileNotFoundError(f"resume: no such training state {o['resume']}")
    if o["transfer"] is not None and not os.path.isfile(o["transfer"]):
        raise FileNotFoundError(f"transfer: no such network file {o['transfer']}")
    return o


# ----------------------------------------------------------------------------------------
# Distributed helpers

class _Dist:
    """torch.distributed when launched by torchrun (or WORLD_SIZE > 1), else one process."""

    def __init__(self, device_option):
        self.created = False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        want_cuda = torch.cuda.is_available() if device_option == "auto" else str(device_option).startswith("cuda")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_option == "auto":
            self.device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
        else:
            self.device = torch.device(device_option)
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)       # before NCCL starts: it uses the current device
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
            self.created = True
        self.enabled = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        self.rank = torch.distributed.get_rank() if self.enabled else 0
        self.world_size = torch.distributed.get_world_size() if self.enabled else 1

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def close(self):
        if self.created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------
# Checkpoints

def find_latest_state(run_dir: str, log=print) -> Optional[str]:
    """The newest training state in ``run_dir`` that loads (temp files and corrupt ones skipped)."""
    candidates = []
    for path in glob.glob(os.path.join(glob.escape(run_dir), "training-state-*.pt")):
        name = os.path.basename(path)
        m = STATE_RE.match(name)
        if m and not is_temp_file(name):
            candidates.append((int(m.group(1)), os.path.getmtime(path), path))
    for _, _, path in sorted(candidates, reverse=True):
        try:
            state = load_torch_state(path)
            if "cur_nimg" in state and "net" in state:
                return path
        except (ValueError, OSError) as exc:
            log(f"resume: skipping unreadable state {path}: {exc}")
    return None


def find_latest_snapshot(run_dir: str) -> Optional[str]:
    """Path of the newest ``network-snapshot-<kimg>.safetensors`` in ``run_dir`` (None if none)."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(run_dir), "network-snapshot-*.safetensors")):
        m = re.match(r"^network-snapshot-(\d+)\.safetensors$", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), os.path.getmtime(path), path))
    return max(found)[2] if found else None


def _save_network_file(path, net, extra):
    try:
        from pfgmpp_fast.checkpoint import save_network
    except ImportError:        # checkpoint.py not available: a plain safetensors file
        from safetensors.torch import save as st_save
        tensors = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
        meta = {"config": json.dumps(net.config(), default=str), "extra": json.dumps(extra)}
        atomic_write_bytes(path, st_save(tensors, metadata=meta))
        return
    save_network(path, net, extra_metadata=extra)


def _load_transfer(path, trust_pickle):
    from pfgmpp_fast.checkpoint import load_network
    return load_network(path, device="cpu", trust_pickle=trust_pickle)


# ----------------------------------------------------------------------------------------
# The run

class _Run:
    def __init__(self, o: dict, dist: _Dist):
        self.o, self.dist, self.device = o, dist, dist.device
        self.rank0 = dist.rank == 0
        self.log_path = os.path.join(o["run_dir"], "log.txt")

    def log(self, msg: str):
        if self.rank0:
            print(msg, flush=True)
            append_line(self.log_path, msg)

    # -- setup ------------------------------------------------------------------------------
    def setup(self):
        from pfgmpp_fast.data import GlobalBatchSampler, load_dataset
        from pfgmpp_fast.networks import build_network
        o, dev = self.o, self.device
        if o["deterministic"]:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            if dev.type == "cuda":
                torch.backends.cudnn.benchmark = False
        elif dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.precision = o["precision"] if o["precision"] != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
        self.net_dtype = PRECISIONS[self.precision]
        self.compile = (dev.type == "cuda") if o["compile"] == "auto" else o["compile"]
        self.channels_last = (dev.type == "cuda") if o["channels_last"] == "auto" else o["channels_last"]

        # Batch geometry.
        W = self.dist.world_size
        if o["batch"] % W:
            raise ValueError(f"batch ({o['batch']}) must be divisible by the number of ranks ({W})")
        self.per_rank = o["batch"] // W
        self.batch_gpu = o["batch_gpu"] or self.per_rank
        if self.per_rank % self.batch_gpu:
            raise ValueError(f"batch per rank ({self.per_rank} = batch {o['batch']} / {W} ranks) must be a "
                             f"multiple of batch_gpu ({self.batch_gpu})")
        self.rounds = self.per_rank // self.batch_gpu

        # Data (validated completely before anything else happens).
        self.dataset = load_dataset(o["data"], resolution=o["resolution"], use_labels=o["cond"], xflip=o["xflip"],
                                    max_size=o["max_size"])
        if self.dataset.images.numel() * self.dataset.images.element_size() < (2 << 30):
            self.dataset = self.dataset.to(dev)
        self.sampler = GlobalBatchSampler(len(self.dataset), seed=o["seed"], device=self.dataset.images.device)
        self.log(f"data: {o['data']} ({self.dataset.num_images} images, {self.dataset.channels}x"
                 f"{self.dataset.resolution}x{self.dataset.resolution}, {self.dataset.label_dim} classes, "
                 f"{len(self.dataset)} items with x-flips)")

        # Augmentation.
        self.augment_pipe = None
        if o["augment"] > 0:
            from pfgmpp_fast.augment import AugmentPipe
            self.augment_pipe = AugmentPipe.edm_default(o["augment"])
        overrides = dict(dropout=o["dropout"])
        if self.augment_pipe is not None:
            overrides["augment_dim"] = self.augment_pipe.dim
        overrides.update(o["network"])
        overrides.setdefault("sigma_data", o["sigma_data"])

        # Networks.
        torch.manual_seed(o["seed"])
        net = build_network(o["arch"], self.dataset.resolution, self.dataset.channels,
                            label_dim=self.dataset.label_dim, D=o["D"], **overrides)
        if o["transfer"]:
            src = _load_transfer(o["transfer"], o["trust_pickle"])
            try:
                net.load_state_dict(src.state_dict(), strict=True)
            except RuntimeError as exc:
                raise ValueError(f"transfer: {o['transfer']} does not match the network of this run: {exc}") from None
            self.log(f"transfer: initialised the network from {o['transfer']}")
        self.net = net.to(dev).train().requires_grad_(True)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.params = [p for p in self.net.parameters()]
        self.ema_params = [p for p in self.ema.parameters()]
        for p in self.params:      # grads exist from the start: a fixed list for foreach ops
            p.grad = torch.zeros_like(p)
        if self.net_dtype is not None or self.compile or self.channels_last:
            from pfgmpp_fast.networks import make_fast
            self.fast_net = make_fast(self.net, dtype=self.net_dtype, channels_last=self.channels_last,
                                      compile=self.compile)
        else:
            self.fast_net = self.net

        # Optimiser: fused Adam where the device supports it.
        try:
            self.optimizer = torch.optim.Adam(self.params, lr=o["lr"], betas=(0.9, 0.999), eps=1e-8, fused=True)
            self.fused = True
        except (RuntimeError, ValueError):
            self.optimizer = torch.optim.Adam(self.params, lr=o["lr"], betas=(0.9, 0.999), eps=1e-8, foreach=True)
            self.fused = False
        self.found_inf = torch.zeros((), dtype=torch.float32, device=dev)

        # The loss (the fused path, or the pure reference).
        self.loss_module = _LossModule(self.fast_net, o, self.net_dtype, self.channels_last)
        self.ddp = None
        if self.dist.enabled:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[dev] if dev.type == "cuda" else None, broadcast_buffers=False)

        # Counters (device-side accumulators read once per tick).
        self.cur_nimg, self.cur_tick = 0, 0
        self.loss_acc = torch.zeros((), dtype=torch.float64, device=dev)
        self.loss_count = torch.zeros((), dtype=torch.float64, device=dev)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=dev)
        self.nonfinite_total = 0
        self.total_time_before = 0.0
        torch.manual_seed(o["seed"] * 1009 + self.dist.rank)     # dropout RNG per rank

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = dict(
            format="pfgmpp_fast.training_state/1",
            net={k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            ema={k: v.detach().cpu() for k, v in self.ema.state_dict().items()},
            optimizer=_to_cpu(self.optimizer.state_dict()),
            cur_nimg=int(self.cur_nimg), cur_tick=int(self.cur_tick),
            nonfinite_total=int(self.nonfinite_total), total_time=float(self.total_time()),
            rng_cpu_ranks=self._gather_rng("cpu"),
            options={k: _jsonable(self.o[k]) for k in RESUME_KEYS},
            network_config=_jsonable(self.net.config()),
        )
        if self.device.type == "cuda":
            state["rng_cuda_ranks"] = self._gather_rng("cuda")
        return state

    def _gather_rng(self, kind):
        """Every rank's RNG state (dropout masks), so a resumed run continues them exactly."""
        mine = torch.get_rng_state() if kind == "cpu" else torch.cuda.get_rng_state(self.device)
        if not self.dist.enabled:
            return [mine]
        everyone = [None] * self.dist.world_size
        torch.distributed.all_gather_object(everyone, mine)
        return everyone

    def load_state(self, path: str):
        state = load_torch_state(path)
        missing = [k for k in ("net", "ema", "optimizer", "cur_nimg", "options") if k not in state]
        if missing:
            raise ValueError(f"resume: {path} is not a training state (missing {missing})")
        saved = state["options"]
        diffs = [f"{k}: state has {saved.get(k)!r}, this run has {_jsonable(self.o[k])!r}"
                 for k in RESUME_KEYS if k in saved and saved.get(k) != _jsonable(self.o[k])]
        if diffs:
            raise ValueError(f"resume: {path} was written by an incompatible configuration:\n  " + "\n  ".join(diffs))
        try:
            self.net.load_state_dict(state["net"], strict=True)
            self.ema.load_state_dict(state["ema"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ValueError(f"resume: {path} does not fit the network/optimizer of this run: {exc}") from None
        self.cur_nimg, self.cur_tick = int(state["cur_nimg"]), int(state["cur_tick"]) + 1   # the next tick
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.total_time_before = float(state.get("total_time", 0.0))
        cpu_states, cuda_states = state.get("rng_cpu_ranks") or [], state.get("rng_cuda_ranks") or []
        if len(cpu_states) == self.dist.world_size:
            torch.set_rng_state(cpu_states[self.dist.rank])
        else:
            torch.manual_seed((self.o["seed"] * 1009 + self.dist.rank + 7919 * self.cur_nimg) % 2**63)
            self.log(f"resume: the state was written by {len(cpu_states)} rank(s), this run has "
                     f"{self.dist.world_size}: dropout masks are reseeded (weights continue exactly)")
        if self.device.type == "cuda" and len(cuda_states) == self.dist.world_size:
            torch.cuda.set_rng_state(cuda_states[self.dist.rank], self.device)

    def total_time(self):
        return self.total_time_before + (time.time() - self.start_time)

    # -- one step ---------------------------------------------------------------------------
    def step(self):
        o, dev = self.o, self.device
        step_index = self.cur_nimg // o["batch"]
        indices = self.sampler.batch(step_index, o["batch"], self.dist.rank, self.dist.world_size)
        first_id = self.cur_nimg + self.dist.rank * self.per_rank
        self.optimizer.zero_grad(set_to_none=False)
        step_loss = torch.zeros((), dtype=torch.float32, device=dev)
        module = self.ddp if self.ddp is not None else self.loss_module
        for r in range(self.rounds):
            sync = self.ddp is None or r == self.rounds - 1
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                chunk = indices[r * self.batch_gpu:(r + 1) * self.batch_gpu]
                y, labels = self.dataset.get_batch(chunk, device=dev)
                ids = torch.arange(first_id + r * self.batch_gpu, first_id + (r + 1) * self.batch_gpu,
                                   dtype=torch.int64, device=dev)
                augment_labels = None
                if self.augment_pipe is not None:
                    y, augment_labels = self.augment_pipe(y, o["seed"], ids, backend=_aug_backend(o["backend"]))
                loss = module(y, ids, labels, augment_labels)          # mean over the chunk
                (loss * (o["loss_scaling"] * self.batch_gpu / self.per_rank)).backward()
                step_loss += loss.detach().float() * self.batch_gpu
                _kill_hook("step", step_index)

        # Skip the update (on the device) when the loss is not finite on any rank.
        self.found_inf.copy_((~torch.isfinite(step_loss)).float())
        if self.dist.enabled:
            torch.distributed.all_reduce(self.found_inf, op=torch.distributed.ReduceOp.MAX)
        grads = [p.grad for p in self.params]
        if o["loss_scaling"] != 1:
            torch._foreach_mul_(grads, 1.0 / o["loss_scaling"])
        _sanitize_(grads)
        lr_scale = 1.0 if not o["lr_rampup_kimg"] else min(self.cur_nimg / (o["lr_rampup_kimg"] * 1000), 1.0)
        for g in self.optimizer.param_groups:
            g["lr"] = o["lr"] * lr_scale
        if self.fused:
            self.optimizer.found_inf = self.found_inf
            self.optimizer.step()
        else:                       # no found_inf support: one host sync, only on this path
            if not bool(self.found_inf):
                self.optimizer.step()

        # EMA (foreach lerp; EDM's half-life with ramp-up).
        halflife = o["ema_halflife_kimg"] * 1000
        if o["ema_rampup_ratio"] is not None:
            halflife = min(halflife, self.cur_nimg * o["ema_rampup_ratio"])
        beta = 0.5 ** (o["batch"] / max(halflife, 1e-8))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - beta)

        self.nonfinite += self.found_inf.to(torch.int64)
        finite = self.found_inf == 0
        self.loss_acc += torch.where(finite, step_loss, torch.zeros_like(step_loss)).double()
        self.loss_count += finite.double() * self.per_rank          # images of finite steps only
        self.cur_nimg += o["batch"]

    # -- the loop ---------------------------------------------------------------------------
    def train(self):
        o = self.o
        total_nimg = int(round(o["duration_mimg"] * 1e6))
        N = self.dataset.channels * self.dataset.resolution ** 2
        self.start_time = time.time()
        if self.cur_nimg >= total_nimg:
            self.log(f"the run is complete ({self.cur_nimg / 1000:.3f} of {total_nimg / 1000:.3f} kimg); nothing to do")
            return
        tick_start_nimg, tick_start_time = self.cur_nimg, time.time()
        stats_path = os.path.join(o["run_dir"], "stats.jsonl")
        bar = _progress_bar(o, self.rank0, total_nimg, self.cur_nimg)
        maintenance = 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        while True:
            done = self.cur_nimg >= total_nimg
            if not done:
                self.step()
                if bar is not None:
                    bar.update(o["batch"] / 1000)
                done = self.cur_nimg >= total_nimg
                if (not done and self.cur_tick != 0
                        and self.cur_nimg < tick_start_nimg + o["tick_kimg"] * 1000):
                    continue

            # ---- end of a tick: the one host sync of the tick --------------------------
            loss_sum, loss_count, nonfinite = self._reduce_tick()
            tick_end_time = time.time()
            tick_time = tick_end_time - tick_start_time
            tick_imgs = self.cur_nimg - tick_start_nimg
            self.nonfinite_total += nonfinite
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0
            stats = {
                "Loss/loss": loss_sum / loss_count / N if loss_count else float("nan"),
                "Loss/loss_per_image": loss_sum / loss_count if loss_count else float("nan"),
                "Loss/nonfinite_steps": self.nonfinite_total,
                "Progress/tick": self.cur_tick,
                "Progress/kimg": self.cur_nimg / 1000,
                "Timing/total_sec": self.total_time(),
                "Timing/sec_per_tick": tick_time,
                "Timing/sec_per_kimg": tick_time / max(tick_imgs, 1) * 1000,
                "Timing/maintenance_sec": maintenance,
                "Resources/peak_gpu_mem_gb": peak,
                "Resources/cpu_mem_gb": _cpu_mem_gb(),
                "Perf/img_per_sec": tick_imgs / max(tick_time, 1e-9),
                "timestamp": time.time(),
            }
            if self.rank0:
                append_line(stats_path, json.dumps(stats, sort_keys=True))
                line = (f"tick {self.cur_tick:<5d} kimg {self.cur_nimg / 1000:<9.3f} loss {stats['Loss/loss']:<8.4f} "
                        f"time {stats['Timing/total_sec']:<8.1f} sec/tick {tick_time:<7.2f} "
                        f"sec/kimg {stats['Timing/sec_per_kimg']:<7.3f} img/s {stats['Perf/img_per_sec']:<8.1f} "
                        f"gpumem {peak:<6.2f} nonfinite {self.nonfinite_total}")
                if bar is not None:
                    bar.write(line)
                    append_line(self.log_path, line)
                else:
                    self.log(line)
            if self.nonfinite_total > o["max_nonfinite"]:
                raise TrainingError(
                    f"{self.nonfinite_total} training steps had a non-finite loss (NaN/Inf), more than "
                    f"max_nonfinite={o['max_nonfinite']}: stopping at kimg {self.cur_nimg / 1000:.3f}. Their updates "
                    "were skipped. Lower the learning rate, use --precision fp32/bf16, or check the data.")

            # ---- snapshots and training state ------------------------------------------
            maint_start = time.time()
            kimg_tag = f"{self.cur_nimg // 1000:06d}"
            if o["snap_ticks"] is not None and (done or self.cur_tick % o["snap_ticks"] == 0) and self.rank0:
                _save_network_file(os.path.join(o["run_dir"], f"network-snapshot-{kimg_tag}.safetensors"), self.ema,
                                   {"kimg": self.cur_nimg / 1000, "seed": o["seed"], "D": _jsonable(o["D"])})
            if o["dump_ticks"] is not None and (done or (self.cur_tick % o["dump_ticks"] == 0 and self.cur_tick != 0)):
                state = self.state_dict()
                if self.rank0:
                    atomic_torch_save_state(os.path.join(o["run_dir"], f"training-state-{kimg_tag}.pt"), state)
                self.dist.barrier()
            maintenance = time.time() - maint_start

            if done:
                break
            self.cur_tick += 1
            tick_start_nimg, tick_start_time = self.cur_nimg, time.time()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
        if bar is not None:
            bar.close()

    def _reduce_tick(self):
        """(Σ loss, images with a finite loss, non-finite steps) of the tick over all ranks."""
        packed = torch.stack([self.loss_acc, self.loss_count, self.nonfinite.double()])
        if self.dist.enabled:
            torch.distributed.all_reduce(packed)
            packed[2] /= self.dist.world_size       # found_inf is identical on all ranks
        loss_sum, loss_count, nonfinite = packed.tolist()
        self.loss_acc.zero_()
        self.loss_count.zero_()
        self.nonfinite.zero_()
        return loss_sum, loss_count, int(round(nonfinite))


class _LossModule(torch.nn.Module):
    """The loss as a module around the network, so DDP sees one forward per chunk."""

    def __init__(self, net, o, net_dtype, channels_last):
        super().__init__()
        self.net = net
        self.o, self.net_dtype, self.channels_last = o, net_dtype, channels_last

    def forward(self, y, sample_ids, labels, augment_labels):
        o = self.o
        if o["backend"] == "reference":
            return R.training_loss(self.net, y, o["D"], o["seed"], sample_ids, o["P_mean"], o["P_std"],
                                   o["sigma_data"], labels=labels, augment_labels=augment_labels)
        from pfgmpp_fast.loss import training_loss
        return training_loss(self.net, y, o["D"], o["seed"], sample_ids, o["P_mean"], o["P_std"], o["sigma_data"],
                             labels=labels, augment_labels=augment_labels, backend=o["backend"],
                             net_dtype=self.net_dtype, channels_last=self.channels_last)


def _aug_backend(backend):
    return "reference" if backend == "reference" else "auto"


def _sanitize_(grads):
    """EDM's nan_to_num(nan=0, posinf=1e5, neginf=-1e5) on every gradient, in a fixed number
    of kernels: flatten into one buffer, clean it, copy back with one foreach copy."""
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.nan_to_num_(flat, nan=0.0, posinf=1e5, neginf=-1e5)
    torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))


def _kill_hook(where: str, step_index: int):
    """Test hook: PFGMPP_FAST_KILL_AT_STEP=k SIGKILLs this process in the middle of step k
    (after its backward pass, before the optimiser update)."""
    target = os.environ.get("PFGMPP_FAST_KILL_AT_STEP")
    if target is not None and where == "step" and int(target) == step_index:
        os.kill(os.getpid(), signal.SIGKILL)


def _cpu_mem_gb() -> float:
    """Peak resident memory of this process (GiB)."""
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20      # KiB on Linux
    except Exception:
        return 0.0


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _jsonable(value):
    """Plain JSON-compatible form (inf stays a float; tuples become lists)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value)
    return value


def _progress_bar(o, rank0, total_nimg, cur_nimg):
    show = o["progress"] if o["progress"] != "auto" else sys.stderr.isatty()
    if not (show and rank0):
        return None
    from tqdm import tqdm
    return tqdm(total=total_nimg / 1000, initial=cur_nimg / 1000, unit="kimg", dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}]")


# ----------------------------------------------------------------------------------------
# Entry points

def run_training(run_dir=None, **options) -> str:
    """Train with ``options`` (see DEFAULTS; ``duration_kimg``, ``aug_dim`` and
    ``network_overrides`` are accepted aliases). Returns the run directory, which holds
    ``network-snapshot-*.safetensors`` (see :func:`find_latest_snapshot`). Works as one
    process or under torchrun.

    Example (a small CPU run)::

        run_training("runs/digits", data="digits", batch=64, duration_kimg=50, precision="fp32",
                     compile=False, network=dict(model_channels=16, channel_mult=[1, 2],
                     num_blocks=1, attn_resolutions=[]), tick_kimg=5, snap_ticks=2)
    """
    if run_dir is not None:
        options["run_dir"] = run_dir
    o = resolve_options(**options)
    dist = _Dist(o["device"])
    try:
        os.makedirs(o["run_dir"], exist_ok=True)
        run = _Run(o, dist)
        resume_path = None
        if o["resume"] == "auto":
            resume_path = find_latest_state(o["run_dir"], log=run.log)
        elif o["resume"]:
            resume_path = o["resume"]
        run.setup()
        if resume_path:
            run.load_state(resume_path)
            run.log(f"resume: continuing from {resume_path} at kimg {run.cur_nimg / 1000:.3f}")
        elif o["resume"] == "auto":
            run.log("resume: no training state found; starting a new run")
        if run.rank0:
            resolved = {**_jsonable(o), "world_size": dist.world_size, "device": str(dist.device),
                        "resolved_precision": run.precision, "resolved_compile": run.compile,
                        "resolved_channels_last": run.channels_last, "batch_gpu_resolved": run.batch_gpu,
                        "fused_adam": run.fused, "network_config": _jsonable(run.net.config()),
                        "augment_pipe": None if run.augment_pipe is None else run.augment_pipe.options()}
            atomic_save_json(os.path.join(o["run_dir"], "training_options.json"), resolved)
        run.log(f"training {o['arch']} D={o['D']} on {dist.device} x{dist.world_size}: batch {o['batch']} "
                f"(batch_gpu {run.batch_gpu}, {run.rounds} rounds), precision {run.precision}, "
                f"compile {run.compile}, backend {o['backend']}, {o['duration_mimg'] * 1000:g} kimg")
        run.train()
        run.log("done.")
        return o["run_dir"]
    finally:
        dist.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    a = parser.add_argument
    a("--outdir", "--run-dir", dest="run_dir", default=d["run_dir"], help="run directory (created; resumable)")
    a("--data", default=d["data"], help="'digits' (embedded), a folder/.zip of PNGs, or .npy/.npz (default: digits)")
    a("--cond", action="store_true", help="class-conditional training (needs labels)")
    a("--arch", choices=ARCHES, default=d["arch"])
    a("--D", "--aug_dim", "--aug-dim", dest="D", default="128", help="augmented dimension D (inf = EDM)")
    a("--resolution", type=int, default=None, help="expected data resolution (checked)")
    a("--batch", type=int, default=d["batch"], help="global batch size")
    a("--batch-gpu", "--batch_gpu", dest="batch_gpu", type=int, default=None, help="per-rank chunk (gradient accumulation)")
    a("--lr", type=float, default=d["lr"])
    a("--lr-rampup", dest="lr_rampup_kimg", type=float, default=d["lr_rampup_kimg"], help="lr ramp-up (kimg)")
    a("--ema", dest="ema_halflife_mimg", type=float, default=d["ema_halflife_kimg"] / 1000, help="EMA half-life (Mimg)")
    a("--ema-rampup", dest="ema_rampup_ratio", type=float, default=d["ema_rampup_ratio"])
    a("--dropout", type=float, default=d["dropout"])
    a("--augment", type=float, default=d["augment"], help="augmentation probability (0 = off)")
    a("--xflip", action="store_true", help="dataset x-flips")
    a("--duration", dest="duration_mimg", type=float, default=d["duration_mimg"], help="training duration (Mimg)")
    a("--tick", dest="tick_kimg", type=float, default=d["tick_kimg"], help="kimg per tick")
    a("--snap", dest="snap_ticks", type=int, default=d["snap_ticks"], help="ticks between network snapshots")
    a("--dump", dest="dump_ticks", type=int, default=d["dump_ticks"], help="ticks between training states")
    a("--seed", type=int, default=d["seed"])
    a("--ls", dest="loss_scaling", type=float, default=d["loss_scaling"], help="loss scaling")
    a("--network", default=None, help='JSON network overrides, e.g. \'{"model_channels": 64}\'')
    a("--cres", default=None, help="channel multipliers, e.g. 1,2,2,2")
    a("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=d["precision"])
    a("--compile", dest="compile", action="store_true", default=None)
    a("--no-compile", dest="compile", action="store_false")
    a("--channels-last", dest="channels_last", action="store_true", default=None)
    a("--no-channels-last", dest="channels_last", action="store_false")
    a("--backend", choices=BACKENDS, default=d["backend"], help="kernel backend of the fused loss")
    a("--device", default=d["device"])
    a("--resume", default=None, help="'auto' (newest intact state in the run dir) or a training-state file")
    a("--transfer", default=None, help="initialise the network from this file")
    a("--trust-pickle", action="store_true", help="allow loading a published pickle for --transfer (runs code!)")
    a("--max-nonfinite", type=int, default=d["max_nonfinite"], help="stop after this many non-finite losses")
    a("--deterministic", action="store_true")
    a("--no-progress", dest="progress", action="store_false", default="auto")
    a("--max-size", type=int, default=None, help="use only the first N images")
    a("--dry-run", action="store_true", help="print the resolved options and exit")


def options_from_args(args) -> dict:
    o = {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}
    o["ema_halflife_kimg"] = args.ema_halflife_mimg * 1000
    if o.get("compile") is None:
        o["compile"] = "auto"
    if o.get("channels_last") is None:
        o["channels_last"] = "auto"
    network = json.loads(args.network) if args.network else {}
    if args.cres:
        network["channel_mult"] = [int(x) for x in str(args.cres).split(",")]
    o["network"] = network
    return o


def main(args) -> int:
    try:
        o = resolve_options(**options_from_args(args))
    except (ValueError, TypeError, FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(_jsonable(o), indent=2, sort_keys=True))
        return 0
    try:
        run_training(**o)
    except (ValueError, TypeError, FileNotFoundError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
