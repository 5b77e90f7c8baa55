"""What a training tick reports: one row of stats.jsonl (EDM's keys), one log line, the progress
bar. Rank 0 writes; the numbers come from the tick's one host sync (TrainingRun.train)."""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from pfgmpp_fast.utils.io_utils import append_line

__all__ = ["TickReporter"]


class TickReporter:
    """The reporting of one run's ticks: ``advance`` per step, ``report`` at each tick end,
    ``start_tick`` after it (the peak GPU memory is per tick), ``close`` at the end."""

    def __init__(self, o, rank0: bool, device: torch.device, total_nimg: int, cur_nimg: int, log):
        self.rank0, self.device, self.log = rank0, device, log
        self.stats_path = os.path.join(o["run_dir"], "stats.jsonl")
        self.log_path = os.path.join(o["run_dir"], "log.txt")
        show = o["progress"] if o["progress"] != "auto" else sys.stderr.isatty()
        self.bar = None
        if show and rank0:
            from tqdm import tqdm
            self.bar = tqdm(total=total_nimg / 1000, initial=cur_nimg / 1000, unit="kimg", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}]")
        self.start_tick()

    def start_tick(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def advance(self, nimg: int):
        if self.bar is not None:
            self.bar.update(nimg / 1000)

    def report(self, *, tick: int, cur_nimg: int, loss_sum: float, loss_count: float, pixels: int,
               nonfinite_total: int, total_sec: float, tick_sec: float, tick_imgs: int, maintenance_sec: float) -> dict:
        """The tick's stats (loss per pixel and per image over the images of finite steps)."""
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0
        stats = {
            "Loss/loss": loss_sum / loss_count / pixels if loss_count else float("nan"),
            "Loss/loss_per_image": loss_sum / loss_count if loss_count else float("nan"),
            "Loss/nonfinite_steps": nonfinite_total,
            "Progress/tick": tick,
            "Progress/kimg": cur_nimg / 1000,
            "Timing/total_sec": total_sec,
            "Timing/sec_per_tick": tick_sec,
            "Timing/sec_per_kimg": tick_sec / max(tick_imgs, 1) * 1000,
            "Timing/maintenance_sec": maintenance_sec,
            "Resources/peak_gpu_mem_gb": peak,
            "Resources/cpu_mem_gb": _cpu_mem_gb(),
            "Perf/img_per_sec": tick_imgs / max(tick_sec, 1e-9),
            "timestamp": time.time(),
        }
        if self.rank0:
            append_line(self.stats_path, json.dumps(stats, sort_keys=True))
            line = (f"tick {tick:<5d} kimg {cur_nimg / 1000:<9.3f} loss {stats['Loss/loss']:<8.4f} "
                    f"time {total_sec:<8.1f} sec/tick {tick_sec:<7.2f} "
                    f"sec/kimg {stats['Timing/sec_per_kimg']:<7.3f} img/s {stats['Perf/img_per_sec']:<8.1f} "
                    f"gpumem {peak:<6.2f} nonfinite {nonfinite_total}")
            if self.bar is not None:       # above the bar, and into log.txt
                self.bar.write(line)
                append_line(self.log_path, line)
            else:
                self.log(line)
        return stats

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _cpu_mem_gb() -> float:
    """Peak resident memory of this process (GiB)."""
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20      # KiB on Linux
    except Exception:
        return 0.0
