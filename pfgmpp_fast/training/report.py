"""What a training tick reports: one row of stats.jsonl, one log line, the progress bar. Rank 0
writes; the numbers come from the tick's one host sync (TrainingRun.train).

A row has EDM's form (torch_utils/training_stats: ``Collector.as_dict()`` plus ``timestamp``):
every statistic is ``{"num": n, "mean": m, "std": s}`` under EDM's name where we record the
same quantity (Loss/loss, Progress/tick, Progress/kimg, Timing/total_sec, Timing/sec_per_tick,
Timing/sec_per_kimg, Timing/maintenance_sec, Resources/cpu_mem_gb, Resources/peak_gpu_mem_gb,
Resources/peak_gpu_mem_reserved_gb), so scripts written for EDM read ``row["Loss/loss"]["mean"]``.
Ours beside them, in the same form: Loss/loss_per_image, Loss/nonfinite_steps, Perf/img_per_sec.
In-training evaluation (``train --eval-metrics``) adds its own row at each network snapshot:
``Eval/<metric column>`` (Eval/FID, Eval/FDD, Eval/KID, ...: the names of `fid calc`'s results),
Timing/eval_sec, and the row's Progress/tick and Progress/kimg (the tick it belongs to, so resume
treats it as that tick's). Every row also goes to TensorBoard's event files (events.py).

Loss/loss: EDM reports every element of the per-element loss λ·(D_θ − y)²; the fused loss kernel
sums over an image's elements on the device, so our scalars are the steps' losses per element
(one per training step of the tick with a finite loss: the mean over the step's global batch
and the image's C·H·W elements). ``mean`` is therefore EDM's mean exactly (every step has the
same number of elements); ``num`` counts steps (EDM's counts elements) and ``std`` is the
spread between steps (EDM's is between elements). Single values (the tick, the timings, ...)
are EDM's ``report0`` statistics: num 1, std 0.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from pfgmpp_fast.training.events import open_event_files
from pfgmpp_fast.utils.io_utils import append_line

__all__ = ["TickReporter", "moments_stat", "single_stat", "stat_value", "is_eval_row"]


def moments_stat(num: float, total: float, total_sq: float) -> dict:
    """EDM's Collector statistic of `num` scalars with sum `total` and sum of squares `total_sq`:
    NaN mean/std when num is 0, std NaN when the sum is not finite, 0 when num is 1."""
    num = int(round(num))
    if num == 0:
        return {"num": 0, "mean": float("nan"), "std": float("nan")}
    mean = total / num
    if not math.isfinite(total):
        std = float("nan")
    elif num == 1:
        std = 0.0
    else:
        std = math.sqrt(max(total_sq / num - mean * mean, 0.0))
    return {"num": num, "mean": mean, "std": std}


def single_stat(value: float) -> dict:
    """EDM's report0 statistic of one value."""
    return moments_stat(1, float(value), float(value) ** 2)


def stat_value(row: dict, name: str, default=None):
    """The mean of statistic `name` in a stats.jsonl row (EDM's form; a plain number, as older
    versions of this package wrote, is taken as it is)."""
    value = row.get(name, default)
    return value["mean"] if isinstance(value, dict) else value


def is_eval_row(row: dict) -> bool:
    """Whether a stats.jsonl row is an in-training evaluation's (Eval/...), not a tick's."""
    return any(name.startswith("Eval/") for name in row)


class TickReporter:
    """The reporting of one run's ticks: ``advance`` per step, ``report`` at each tick end,
    ``evaluate`` at a snapshot (the in-training evaluation and its row), ``start_tick`` after it (the peak GPU memory
    is per tick), ``close`` at the end, also when the run ends by an error (flushes TensorBoard)."""

    def __init__(self, o, rank0: bool, device: torch.device, total_nimg: int, cur_nimg: int, log):
        self.rank0, self.device, self.log = rank0, device, log
        self.stats_path = os.path.join(o["run_dir"], "stats.jsonl")
        self.log_path = os.path.join(o["run_dir"], "log.txt")
        self.events = open_event_files(o["run_dir"], cur_nimg, log) if rank0 and o["tensorboard"] else None
        show = o["progress"] if o["progress"] != "auto" else sys.stderr.isatty()
        self.bar = None
        if show and rank0:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_nimg / 1000,
                initial=cur_nimg / 1000,
                unit="kimg",
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}]",
            )
        self.start_tick()

    def start_tick(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def advance(self, nimg: int):
        if self.bar is not None:
            self.bar.update(nimg / 1000)

    def report(
        self,
        *,
        tick: int,
        cur_nimg: int,
        loss_moments,
        pixels: int,
        nonfinite_total: int,
        total_sec: float,
        tick_sec: float,
        tick_imgs: int,
        maintenance_sec: float,
    ) -> dict:
        """The tick's row. loss_moments: (finite steps, Σ step loss per image, Σ its square)."""
        steps, total, total_sq = loss_moments
        on_gpu = self.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if on_gpu else 0.0
        reserved = torch.cuda.max_memory_reserved(self.device) / 2**30 if on_gpu else 0.0
        stats = {
            "Loss/loss": moments_stat(steps, total / pixels, total_sq / pixels**2),
            "Loss/loss_per_image": moments_stat(steps, total, total_sq),
            "Loss/nonfinite_steps": single_stat(nonfinite_total),
            "Progress/tick": single_stat(tick),
            "Progress/kimg": single_stat(cur_nimg / 1000),
            "Timing/total_sec": single_stat(total_sec),
            "Timing/sec_per_tick": single_stat(tick_sec),
            "Timing/sec_per_kimg": single_stat(tick_sec / max(tick_imgs, 1) * 1000),
            "Timing/maintenance_sec": single_stat(maintenance_sec),
            "Resources/cpu_mem_gb": single_stat(_cpu_mem_gb()),
            "Resources/peak_gpu_mem_gb": single_stat(peak),
            "Resources/peak_gpu_mem_reserved_gb": single_stat(reserved),
            "Perf/img_per_sec": single_stat(tick_imgs / max(tick_sec, 1e-9)),
            "timestamp": time.time(),
        }
        if self.rank0:
            self._write_row(stats, cur_nimg)
            v = {name: stat_value(stats, name) for name in stats}
            line = (
                f"tick {tick:<5d} kimg {cur_nimg / 1000:<9.3f} loss {v['Loss/loss']:<8.4f} "
                f"time {total_sec:<8.1f} sec/tick {tick_sec:<7.2f} "
                f"sec/kimg {v['Timing/sec_per_kimg']:<7.3f} img/s {v['Perf/img_per_sec']:<8.1f} "
                f"gpumem {peak:<6.2f} nonfinite {nonfinite_total}"
            )
            self._say(line)
        return stats

    def evaluate(self, evaluator, net: torch.nn.Module, *, tick: int, cur_nimg: int) -> dict:
        """The in-training evaluation of this tick's snapshot (every rank calls it), and its row:
        ``evaluator(net)`` = {metric column: value}. It draws from no random stream of the run, so
        a run with evaluation trains exactly as one without."""
        start = time.time()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), torch.no_grad():
            scores = evaluator(net)
        return self.report_eval(tick=tick, cur_nimg=cur_nimg, scores=scores, seconds=time.time() - start)

    def report_eval(self, *, tick: int, cur_nimg: int, scores: dict, seconds: float) -> dict:
        """The row of the evaluation at this tick's snapshot: ``scores`` = {metric column: value}."""
        stats = {f"Eval/{name}": single_stat(value) for name, value in scores.items()}
        stats.update(
            {
                "Progress/tick": single_stat(tick),
                "Progress/kimg": single_stat(cur_nimg / 1000),
                "Timing/eval_sec": single_stat(seconds),
                "timestamp": time.time(),
            }
        )
        if self.rank0:
            self._write_row(stats, cur_nimg)
            line = f"eval kimg {cur_nimg / 1000:<9.3f} " + " ".join(f"{k} {v:.6g}" for k, v in scores.items())
            self._say(line + f" ({seconds:.1f} s)")
        return stats

    def _say(self, line: str) -> None:
        if self.bar is not None:  # above the bar, and into log.txt
            self.bar.write(line)
            append_line(self.log_path, line)
        else:
            self.log(line)

    def _write_row(self, stats: dict, cur_nimg: int) -> None:
        append_line(self.stats_path, json.dumps(stats, sort_keys=True))
        if self.events is not None:
            self.events.add_row(stats, cur_nimg)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.events is not None:
            self.events.close()
            self.events = None


def _cpu_mem_gb() -> float:
    """Resident memory of this process now (GiB), EDM's Resources/cpu_mem_gb (psutil's rss);
    the peak where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except Exception:
        return 0.0
