"""Start-up of the data set on several ranks: peak memory and time per rank, first and second start.

Measures what `train` does with its data before the first step (training/loop.py
`_build_data`): load the data set, keep it where it is on the CPU, make the batch sampler and
gather the first batch. Run it as

    python benchmarks/bench_data_startup.py --images 200000 --data /tmp/synthetic-200k.zip \\
        [--ranks 2] [--pythonpath OTHER_CHECKOUT --label today]

It writes the zip (random 32x32 RGB images, through the `dataset` command's builder) if it
does not exist, then starts ``--ranks`` gloo ranks with torchrun twice (first start: no cache
file; second start: the cache exists) and prints one table row per start and rank: seconds
from the launch until the first batch could be taken, the rank's peak resident memory
(ru_maxrss), its anonymous resident memory at that point (RssAnon: what the rank holds
privately, without the shared pages of a memory-mapped cache), and the seconds spent in
load_dataset. ``--pythonpath`` runs the ranks on another checkout (e.g. the code before the
cache) for comparison.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(spec: str, out: str, launched: float) -> None:
    """One rank: the data part of TrainingRun.setup, timed."""
    import torch

    from pfgmpp_fast.training.data import GlobalBatchSampler, load_dataset
    from pfgmpp_fast.utils import distributed

    torch.set_num_threads(1)
    device = distributed.init("cpu")
    start = time.time()
    dataset = load_dataset(spec)
    if dataset.images.numel() * dataset.images.element_size() < (2 << 30):
        dataset = dataset.to(device)  # loop.py: the device-resident path (a no-op on the CPU)
    loaded = time.time()
    sampler = GlobalBatchSampler(len(dataset), seed=0, device=dataset.images.device)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    images, _ = dataset.get_batch(sampler.batch(0, 512, rank, world), device=device)
    ready = time.time()
    row = {
        "rank": rank,
        "ready_s": ready - launched,
        "load_s": loaded - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_anon_mib": _rss_anon_mib(),
        "images": dataset.num_images,
        "batch_mean": float(images.mean()),
    }
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump(row, f)
    distributed.close()


def make_zip(path: str, count: int) -> None:
    import numpy as np

    sys.path.insert(0, ROOT)
    from pfgmpp_fast.training.dataset_tool import build_dataset

    with tempfile.TemporaryDirectory() as tmp:
        array = os.path.join(tmp, "images.npy")
        np.save(array, np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8))
        build_dataset(array, path, progress=True)


def start(args, label: str, which: str) -> list:
    out = tempfile.mkdtemp(prefix="bench-data-")
    env = {**os.environ, "PYTHONPATH": args.pythonpath or ROOT, "OMP_NUM_THREADS": "1"}
    launched = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.ranks}",
            os.path.abspath(__file__),
            "--worker",
            args.data,
            out,
            repr(launched),
        ],
        env=env,
        check=True,
    )
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "rank-*.json"))):
        with open(path) as f:
            rows.append({"code": label, "start": which, **json.load(f)})
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/tmp/synthetic-200k.zip")
    p.add_argument("--images", type=int, default=200_000)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--pythonpath", default=None, help="run the ranks on this checkout instead")
    p.add_argument("--label", default="this checkout")
    args = p.parse_args()
    if not os.path.exists(args.data):
        make_zip(args.data, args.images)
    for old in glob.glob(
        os.path.join(os.path.dirname(os.path.abspath(args.data)), os.path.basename(args.data) + ".*.pfgmpp-cache")
    ):
        os.unlink(old)  # the first start finds no cache
    rows = start(args, args.label, "first") + start(args, args.label, "second")
    print("| code | start | rank | ready (s) | load_dataset (s) | peak RSS (MiB) | RssAnon at ready (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['code']} | {r['start']} | {r['rank']} | {r['ready_s']:.1f} | {r['load_s']:.1f} | "
            f"{r['peak_rss_mib']:.0f} | {r['rss_anon_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
