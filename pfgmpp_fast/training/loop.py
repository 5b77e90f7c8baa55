"""The training loop: :class:`TrainingRun`, one rank's share of a run (setup, step, the ticks).
The entry points (`run_training`, the `train` command) are train.py.

What is different from the published EDM loop (and why it is fast and safe):

* the step is perturb → network → loss on the fused kernels (pfgmpp_fast.loss), the
  network is channels-last / autocast / compiled (networks.make_fast), Adam is fused,
  EMA and the gradient check are foreach kernels, and nothing in a step waits for the
  device (losses are summed on the device and read once per tick);
* the noise of training sample number i (its global position in the run) comes from the
  Philox stream keyed by (seed, i), and the data order and augmentations are functions of
  (seed, i) too, so a run is reproducible and does not depend on the number of ranks or
  on gradient accumulation (with dropout > 0 the dropout masks come from torch's RNG,
  seeded per rank: reproducible for a fixed rank count);
* files are written atomically; a non-finite loss or gradient skips the update on the device
  (fused Adam's ``found_inf``; EDM instead zeroes NaN gradients and applies the step), is counted, and the run stops with an error once the count exceeds
  ``max_nonfinite``; a diverged network is never written as a snapshot.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from pfgmpp_fast.checkpoint import load_network, save_network
from pfgmpp_fast.training.augment import drop_labels
from pfgmpp_fast.training.ema import HalfLifeEMA, PowerFunctionEMA
from pfgmpp_fast.training.loss_module import LossModule, augment_backend, flag_nonfinite_grads
from pfgmpp_fast.training.options import PRECISIONS, RESUME_KEYS, TrainingError, TrainingOptions, jsonable, option_diffs
from pfgmpp_fast.training.report import TickReporter
from pfgmpp_fast.training.schedule import BatchGeometry, LearningRateSchedule
from pfgmpp_fast.utils import distributed, faults
from pfgmpp_fast.utils.cli_errors import Preempted
from pfgmpp_fast.utils.io_utils import append_line, atomic_torch_save_state, load_torch_state

__all__ = ["TrainingRun"]


class TrainingRun:
    """One rank's share of a run: build (setup), load_state, step, train."""

    def __init__(self, o: TrainingOptions, device: torch.device, evaluator=None):
        self.o, self.device = o, device
        self.evaluator = evaluator  # scores the EMA network at each snapshot (train.run_training)
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        self.rank0 = self.rank == 0
        self.log_path = os.path.join(o["run_dir"], "log.txt")

    def log(self, msg: str):
        if self.rank0:
            print(msg, flush=True)
            append_line(self.log_path, msg)

    # -- setup ------------------------------------------------------------------------------
    def setup(self):
        """Everything a step needs, validated before the first step: backends, batch geometry,
        data, network + EMA (+ power-function EMAs), optimizer, loss, counters."""
        o = self.o
        self._configure_backends()
        self.geometry = BatchGeometry.resolve(o["batch"], o["batch_gpu"], self.world_size)
        self._build_data()
        self._build_network()
        self.phema = (
            PowerFunctionEMA(o["phema"], self.params, self.ema.net, o["phema_snap_kimg"]) if o["phema"] else None
        )
        self.averages = [self.ema] + ([self.phema] if self.phema is not None else [])
        self._build_optimizer()
        self.lr_schedule = LearningRateSchedule(o["lr"], o["lr_rampup_kimg"])
        self._reset_counters()

    def _configure_backends(self):
        o, dev = self.o, self.device
        if o["deterministic"]:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            if dev.type == "cuda":
                torch.backends.cudnn.benchmark = False
        elif dev.type == "cuda":
            torch.backends.cudnn.benchmark = o["cudnn_benchmark"]
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.precision = o["precision"] if o["precision"] != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
        self.net_dtype = PRECISIONS[self.precision]
        self.compile = (dev.type == "cuda") if o["compile"] == "auto" else o["compile"]
        self.channels_last = (dev.type == "cuda") if o["channels_last"] == "auto" else o["channels_last"]

    def _build_data(self):
        """The data set (validated completely before anything else happens) and augmentation."""
        from pfgmpp_fast.training.data import GlobalBatchSampler, load_dataset

        o, dev = self.o, self.device
        self.dataset = load_dataset(
            o["data"], resolution=o["resolution"], use_labels=o["cond"], xflip=o["xflip"], max_size=o["max_size"]
        )
        if self.dataset.images.numel() * self.dataset.images.element_size() < (2 << 30):
            self.dataset = self.dataset.to(dev)
        self.sampler = GlobalBatchSampler(len(self.dataset), seed=o["seed"], device=self.dataset.images.device)
        self.log(
            f"data: {o['data']} ({self.dataset.num_images} images, {self.dataset.channels}x"
            f"{self.dataset.resolution}x{self.dataset.resolution}, {self.dataset.label_dim} classes, "
            f"{len(self.dataset)} items with x-flips)"
        )

        self.augment_pipe = None
        if o["augment"] > 0:
            from pfgmpp_fast.training.augment import AugmentPipe

            self.augment_pipe = AugmentPipe.edm_default(o["augment"])

    def _build_network(self):
        """The network (seeded, or transferred), its half-life EMA and the fast training view."""
        from pfgmpp_fast.networks import build_network, make_fast

        o, dev = self.o, self.device
        overrides = dict(dropout=o["dropout"])
        if self.augment_pipe is not None:
            overrides["augment_dim"] = self.augment_pipe.dim
        overrides.update(o["network"])
        overrides.setdefault("sigma_data", o["sigma_data"])

        torch.manual_seed(o["seed"])
        net = build_network(
            o["arch"],
            self.dataset.resolution,
            self.dataset.channels,
            label_dim=self.dataset.label_dim,
            D=o["D"],
            **overrides,
        )
        if o["transfer"]:
            src = load_network(o["transfer"], device="cpu", trust_pickle=o["trust_pickle"])
            try:
                net.load_state_dict(src.state_dict(), strict=True)
            except RuntimeError as exc:
                raise ValueError(f"transfer: {o['transfer']} does not match the network of this run: {exc}") from None
            self.log(f"transfer: initialised the network from {o['transfer']} (trained with D={float(src.D):g})")
        self.net = net.to(dev).train().requires_grad_(True)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.ema = HalfLifeEMA(self.net, o["ema_halflife_kimg"], o["ema_rampup_ratio"])
        self.params = [p for p in self.net.parameters()]
        for p in self.params:  # grads exist from the start: a fixed list for foreach ops
            p.grad = torch.zeros_like(p)
        if self.net_dtype is not None or self.compile or self.channels_last:
            self.fast_net = make_fast(
                self.net, dtype=self.net_dtype, channels_last=self.channels_last, compile=self.compile
            )
        else:
            self.fast_net = self.net

    def _build_optimizer(self):
        """Fused Adam where the device supports it, and the loss module (DDP-wrapped on ranks)."""
        o, dev = self.o, self.device
        try:
            self.optimizer = torch.optim.Adam(self.params, lr=o["lr"], betas=(0.9, 0.999), eps=1e-8, fused=True)
            self.fused = True
        except (RuntimeError, ValueError):
            self.optimizer = torch.optim.Adam(self.params, lr=o["lr"], betas=(0.9, 0.999), eps=1e-8, foreach=True)
            self.fused = False
        self.found_inf = torch.zeros((), dtype=torch.float32, device=dev)

        # The loss (the fused path, or the pure reference).
        self.loss_module = LossModule(self.fast_net, o, self.net_dtype, self.channels_last)
        self.ddp = None
        if distributed.is_enabled():
            self.ddp = distributed.ddp(self.loss_module, dev)

    def _reset_counters(self):
        """Device-side accumulators, read once per tick."""
        o, dev = self.o, self.device
        self.cur_nimg, self.cur_tick, self.tick_start_nimg = 0, 0, 0
        # (finite steps, Σ step loss per image, Σ its square): identical on every rank
        self.loss_moments = torch.zeros(3, dtype=torch.float64, device=dev)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=dev)
        self.nonfinite_total = 0
        self.total_time_before = 0.0
        torch.manual_seed(o["seed"] * 1009 + self.rank)  # dropout RNG per rank

    # -- state ------------------------------------------------------------------------------
    def state_dict(self, in_tick: bool = False) -> dict:
        """The training state; ``in_tick``: written inside a tick (on preemption), with the tick's
        start and sums, so the resumed run finishes that tick and reports it as this one would."""
        state = dict(
            format="pfgmpp_fast.training_state/1",
            net={k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            ema=self.ema.state_dict(),
            optimizer=_to_cpu(self.optimizer.state_dict()),
            cur_nimg=int(self.cur_nimg),
            cur_tick=int(self.cur_tick),
            nonfinite_total=int(self.nonfinite_total),
            total_time=float(self.total_time()),
            rng_cpu_ranks=self._gather_rng("cpu"),
            options={k: jsonable(self.o[k]) for k in RESUME_KEYS},
            network_config=jsonable(self.net.config()),
        )
        if self.device.type == "cuda":
            state["rng_cuda_ranks"] = self._gather_rng("cuda")
        if self.phema is not None:
            state["phema"] = self.phema.state_dict()
        if in_tick:
            sums = dict(loss_moments=self.loss_moments.cpu(), nonfinite=self.nonfinite.cpu())
            state["tick"] = dict(start_nimg=int(self.tick_start_nimg), **sums)
        return state

    def _gather_rng(self, kind):
        """Every rank's RNG state (dropout masks), so a resumed run continues them exactly."""
        mine = torch.get_rng_state() if kind == "cpu" else torch.cuda.get_rng_state(self.device)
        if not distributed.is_enabled():
            return [mine]
        everyone = [None] * self.world_size
        torch.distributed.all_gather_object(everyone, mine)
        return everyone

    def load_state(self, path: str):
        state = load_torch_state(path)
        missing = [k for k in ("net", "ema", "optimizer", "cur_nimg", "options") if k not in state]
        if missing:
            raise ValueError(f"resume: {path} is not a training state (missing {missing})")
        saved = state["options"]
        diffs = option_diffs(saved, self.o)
        if diffs:
            raise ValueError(f"resume: {path} was written by an incompatible configuration:\n  " + "\n  ".join(diffs))
        try:
            self.net.load_state_dict(state["net"], strict=True)
            self.ema.load_state_dict(state["ema"], path)
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ValueError(f"resume: {path} does not fit the network/optimizer of this run: {exc}") from None
        if self.phema is not None:
            self.phema.load_state_dict(state.get("phema"), path)
        tick = state.get("tick")  # written inside a tick: that tick goes on, else the next one starts
        self.cur_nimg, self.cur_tick = int(state["cur_nimg"]), int(state["cur_tick"]) + (tick is None)
        self.tick_start_nimg = self.cur_nimg if tick is None else int(tick["start_nimg"])
        if tick is not None:
            self.loss_moments.copy_(tick["loss_moments"])
            self.nonfinite.copy_(tick["nonfinite"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.total_time_before = float(state.get("total_time", 0.0))
        cpu_states, cuda_states = state.get("rng_cpu_ranks") or [], state.get("rng_cuda_ranks") or []
        if len(cpu_states) == self.world_size:
            torch.set_rng_state(cpu_states[self.rank])
        else:
            torch.manual_seed((self.o["seed"] * 1009 + self.rank + 7919 * self.cur_nimg) % 2**63)
            self.log(
                f"resume: the state was written by {len(cpu_states)} rank(s), this run has "
                f"{self.world_size}: dropout masks are reseeded (weights continue exactly)"
            )
        if self.device.type == "cuda" and len(cuda_states) == self.world_size:
            torch.cuda.set_rng_state(cuda_states[self.rank], self.device)

    def total_time(self):
        return self.total_time_before + (time.time() - self.start_time)

    # -- one step ---------------------------------------------------------------------------
    def step(self):
        """One optimizer step of the global batch: gradients, update, averages, counters."""
        batch = self.o["batch"]
        step_loss = self._accumulate_gradients(self.cur_nimg // batch)
        global_loss = self._update(step_loss)
        for average in self.averages:
            average.update(self.params, self.cur_nimg + batch, batch)
        self._count(global_loss)
        self.cur_nimg += batch

    def _accumulate_gradients(self, step_index: int) -> torch.Tensor:
        """This rank's share of the step in rounds of batch_gpu: data, augmentation, loss and
        backward (scaled by loss_scaling); returns the summed loss of its images (on the device)."""
        o, dev, g = self.o, self.device, self.geometry
        indices = self.sampler.batch(step_index, o["batch"], self.rank, self.world_size)
        first_id = self.cur_nimg + self.rank * g.per_rank
        self.optimizer.zero_grad(set_to_none=False)
        step_loss = torch.zeros((), dtype=torch.float32, device=dev)
        module = self.ddp if self.ddp is not None else self.loss_module
        for r in range(g.rounds):
            sync = self.ddp is None or r == g.rounds - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                chunk = indices[r * g.batch_gpu : (r + 1) * g.batch_gpu]
                y, labels = self.dataset.get_batch(chunk, device=dev)
                ids = torch.arange(
                    first_id + r * g.batch_gpu, first_id + (r + 1) * g.batch_gpu, dtype=torch.int64, device=dev
                )
                if o["label_dropout"] > 0:
                    labels = drop_labels(labels, o["seed"], ids, o["label_dropout"])
                augment_labels = None
                if self.augment_pipe is not None:
                    y, augment_labels = self.augment_pipe(y, o["seed"], ids, backend=augment_backend(o["backend"]))
                loss = module(y, ids, labels, augment_labels)  # mean over the chunk
                (loss * (o["loss_scaling"] * g.batch_gpu / g.per_rank)).backward()
                step_loss += loss.detach().float() * g.batch_gpu
                if faults.should_kill("AT_STEP", str(step_index), exact=True):  # kill-and-resume tests
                    faults.kill("AT_STEP")
        return step_loss

    def _update(self, step_loss: torch.Tensor) -> torch.Tensor:
        """Unscale and check the gradients, then Adam at the scheduled rate; the update is
        skipped on the device (and counted) when the loss or a gradient is not finite. Returns
        the step's loss summed over the global batch (float64, on the device)."""
        o = self.o
        # The step's loss summed over the global batch, in the one collective of the step's
        # bookkeeping: it is non-finite exactly when some rank's part is (a float64 sum of
        # finite float32 parts cannot overflow), so the update is skipped on every rank alike.
        global_loss = step_loss.double()
        if distributed.is_enabled():
            torch.distributed.all_reduce(global_loss)
        self.found_inf.copy_((~torch.isfinite(global_loss)).float())
        grads = [p.grad for p in self.params]
        if o["loss_scaling"] != 1:
            torch._foreach_mul_(grads, 1.0 / o["loss_scaling"])
        flag_nonfinite_grads(grads, self.found_inf)  # identical on every rank: the grads are all-reduced
        self.lr_schedule.apply(self.optimizer, self.cur_nimg)
        if self.fused:
            self.optimizer.found_inf = self.found_inf
            self.optimizer.step()
        else:  # no found_inf support: one host sync, only on this path
            if not bool(self.found_inf):
                self.optimizer.step()
        return global_loss

    def _count(self, global_loss: torch.Tensor):
        """The tick's sums on the device: non-finite steps, the loss moments of finite ones."""
        self.nonfinite += self.found_inf.to(torch.int64)
        finite = self.found_inf == 0
        per_image = torch.where(finite, global_loss / self.o["batch"], torch.zeros_like(global_loss))
        self.loss_moments += torch.stack([finite.double(), per_image, per_image.square()])  # finite steps only

    # -- the loop ---------------------------------------------------------------------------
    def train(self, preemption=None):
        """Steps and ticks to the end of the run; with a utils.preemption.Preemption, a signal
        stops it after the step the ranks agree on, with a training state (Preempted)."""
        o = self.o
        total_nimg = int(round(o["duration_mimg"] * 1e6))
        self.start_time = time.time()
        if self.cur_nimg >= total_nimg:
            self.log(f"the run is complete ({self.cur_nimg / 1000:.3f} of {total_nimg / 1000:.3f} kimg); nothing to do")
            return
        self.reporter = TickReporter(o, self.rank0, self.device, total_nimg, self.cur_nimg, self.log)
        try:
            self._train_ticks(self.reporter, total_nimg, preemption)
        finally:  # however the run ends: the progress bar and TensorBoard's files are closed
            self.reporter.close()

    def _train_ticks(self, reporter: TickReporter, total_nimg: int, preemption):
        o = self.o
        tick_start_time, maintenance = time.time(), 0.0
        while True:
            done, stop = self.cur_nimg >= total_nimg, None
            if not done:
                self.step()
                reporter.advance(o["batch"])
                stop = preemption.poll_step() if preemption is not None else None
                done = self.cur_nimg >= total_nimg
                if not done and self.cur_tick != 0 and self.cur_nimg < self.tick_start_nimg + o["tick_kimg"] * 1000:
                    if stop:
                        self._stop_preempted(stop, preemption, reporter, in_tick=True)
                    continue

            # ---- end of a tick: the one host sync of the tick --------------------------
            loss_moments, nonfinite, last_step_bad, weights_bad = self._reduce_tick()
            tick_sec = time.time() - tick_start_time
            self.nonfinite_total += nonfinite
            reporter.report(
                tick=self.cur_tick,
                cur_nimg=self.cur_nimg,
                loss_moments=loss_moments,
                pixels=self.dataset.channels * self.dataset.resolution**2,
                nonfinite_total=self.nonfinite_total,
                total_sec=self.total_time(),
                tick_sec=tick_sec,
                tick_imgs=self.cur_nimg - self.tick_start_nimg,
                maintenance_sec=maintenance,
            )
            self._stop_if_diverged(done, last_step_bad, weights_bad)

            # ---- snapshots and training state ------------------------------------------
            maint_start = time.time()
            written = self._write_files(done, last_step_bad, self.tick_start_nimg)
            maintenance = time.time() - maint_start

            if done:
                break
            if stop:
                self._stop_preempted(stop, preemption, reporter, in_tick=False, written=written)
            self.cur_tick += 1
            self.tick_start_nimg, tick_start_time = self.cur_nimg, time.time()
            reporter.start_tick()

    def _write_files(self, done: bool, last_step_bad: bool, tick_start_nimg: int):
        """The tick's network snapshot (not of a diverged network) and training state, when due;
        returns the state's path when one was written."""
        o, kimg_tag = self.o, f"{self.cur_nimg // 1000:06d}"
        snap_due = o["snap_ticks"] is not None and (done or self.cur_tick % o["snap_ticks"] == 0)
        # every rank probes (identical EMA weights), so all of them stop together on divergence
        snapshot = snap_due and not last_step_bad and self._ema_is_sane(done)
        if snapshot and self.rank0:
            save_network(
                os.path.join(o["run_dir"], f"network-snapshot-{kimg_tag}.safetensors"),
                self.ema.net,
                extra_metadata={"kimg": self.cur_nimg / 1000, "seed": o["seed"], "D": jsonable(o["D"])},
            )
        if snapshot and self.evaluator is not None:  # before the state: a resume redoes an unfinished one
            self.reporter.evaluate(self.evaluator, self.ema.net, tick=self.cur_tick, cur_nimg=self.cur_nimg)
        if self.phema is not None and self.rank0 and self.phema.due(tick_start_nimg, self.cur_nimg, done):
            self.phema.save(
                o["run_dir"],
                self.cur_nimg,
                o["batch"],
                {"seed": o["seed"], "D": jsonable(o["D"]), "run": {k: jsonable(o[k]) for k in RESUME_KEYS}},
            )
        if o["dump_ticks"] is not None and (done or (self.cur_tick % o["dump_ticks"] == 0 and self.cur_tick != 0)):
            return self._write_state(self.state_dict())
        return None

    def _write_state(self, state: dict) -> str:
        path = os.path.join(self.o["run_dir"], f"training-state-{self.cur_nimg // 1000:06d}.pt")
        if self.rank0:
            atomic_torch_save_state(path, state)
        distributed.barrier()
        return path

    def _stop_preempted(self, signal_name: str, preemption, reporter, in_tick: bool, written=None):
        """After the step every rank agreed on: the training state (unless this tick end just
        wrote it; post-hoc EMA profiles included), one log line, Preempted (exit code 75). The
        phema snapshots stay on their schedule: the resumed run writes them as this one would."""
        reporter.close()
        path = written or self._write_state(self.state_dict(in_tick=in_tick))
        message = (
            f"preempted by {signal_name} at kimg {self.cur_nimg / 1000:.3f}: state written to {path}, "
            "resume with --resume auto"
        )
        if preemption.ignored:
            message += f" ({preemption.ignored} further signal(s) ignored while stopping)"
        if self.rank0:
            append_line(self.log_path, message)
        raise Preempted(message, signal_name)

    def _stop_if_diverged(self, done: bool, last_step_bad: bool, weights_bad: bool):
        """TrainingError when the weights are non-finite, the non-finite budget is spent, or the
        run ends on a non-finite step; a tick that ends on one gets no snapshot (logged)."""
        if weights_bad:
            raise TrainingError(
                f"the network weights became non-finite (NaN/Inf) by kimg {self.cur_nimg / 1000:.3f}: "
                "stopping without writing them. Lower the learning rate or check the data."
            )
        if self.nonfinite_total > self.o["max_nonfinite"]:
            raise TrainingError(
                f"{self.nonfinite_total} training steps had a non-finite loss or gradient (NaN/Inf), more than "
                f"max_nonfinite={self.o['max_nonfinite']}: stopping at kimg {self.cur_nimg / 1000:.3f}. Their updates "
                "were skipped. Lower the learning rate, use --precision fp32/bf16, or check the data."
            )
        if last_step_bad:  # the network diverged by the end of this tick: no snapshot of it
            if done:
                raise TrainingError(
                    f"the run ended with a non-finite loss or gradient (NaN/Inf) at kimg {self.cur_nimg / 1000:.3f} "
                    f"({self.nonfinite_total} non-finite steps in all); no final snapshot was written. "
                    "Lower the learning rate, use --precision fp32/bf16, or check the data."
                )
            self.log(
                f"tick {self.cur_tick}: the last step had a non-finite loss or gradient; no network snapshot this tick"
            )

    @torch.no_grad()
    def _ema_is_sane(self, done: bool) -> bool:
        """Whether the EMA network's denoising error on a fixed data batch is finite in float32
        (a network that diverged within the tick's last update is not written as a snapshot)."""
        y, labels = self.dataset.get_batch(torch.arange(min(8, len(self.dataset))), device=self.device)
        map_augment = getattr(self.ema.net.model, "map_augment", None)
        aug = None if map_augment is None else torch.zeros(y.shape[0], map_augment.in_features, device=self.device)
        sigma = torch.full((y.shape[0],), float(self.o["sigma_data"]), device=self.device)
        error = (self.ema.net(y, sigma, labels, augment_labels=aug).float() - y).square().mean()
        if bool(torch.isfinite(error)):
            return True
        message = (
            f"the network diverged at kimg {self.cur_nimg / 1000:.3f} (its denoising error is not finite): "
            "no snapshot written"
        )
        if done:
            raise TrainingError(message + ". Lower the learning rate or check the data.")
        self.log(f"tick {self.cur_tick}: {message}")
        return False

    def _reduce_tick(self):
        """(loss moments of the tick's finite steps, non-finite steps, last step non-finite,
        weights non-finite on any rank): checked on the device, read in this one sync. The loss
        moments and the step flags come from the global step losses, identical on all ranks."""
        weights_bad = torch.stack([~torch.isfinite(p).all() for p in self.params + self.ema.params]).any().double()
        if distributed.is_enabled():
            torch.distributed.all_reduce(weights_bad)
        packed = torch.cat(
            [self.loss_moments, torch.stack([self.nonfinite.double(), self.found_inf.double(), weights_bad])]
        )
        *moments, nonfinite, last_bad, weights_bad = packed.tolist()
        self.loss_moments.zero_()
        self.nonfinite.zero_()
        return moments, int(round(nonfinite)), last_bad > 0, weights_bad > 0


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
