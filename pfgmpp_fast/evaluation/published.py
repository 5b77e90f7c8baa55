"""The published PFGM++ generate.py / fid.py conventions our commands follow when asked.

- ``generate`` without ``--network``, ``--outdir RUN`` a run directory: every checkpoint in RUN
  (``--ckpt``..``--end_ckpt`` kimg unless ``--edm=1``) gets its images in ``RUN/ckpt_<kimg>/``
  (``ckpt_2_`` / ``ckpt_3_`` when the largest seed is above 49999 / 99999), as published.
- ``fid calc --images RUN`` where RUN holds such folders: the FID of each (``--gen_seed`` 1, 2, 3
  picks ``ckpt_``, ``ckpt_2_``, ``ckpt_3_``).
- ``fid calc --images DIR --num N``: more images than N → the published random subset, chosen
  by ``--seed`` exactly as the published ImageFolderDataset chooses it.
"""

from __future__ import annotations

import os
import re

import numpy as np

from pfgmpp_fast.utils.cli_errors import UsageError

__all__ = ["run_checkpoints", "in_ckpt_range", "ckpt_folder", "generation_jobs", "ckpt_folders", "random_subset"]

_OUR_SNAPSHOT_RE = re.compile(r"^network-snapshot-(\d+)\.safetensors$")
_STATE_RE = {False: re.compile(r"^training-state-(\d+)\.pt$"), True: re.compile(r"^training-state-(\d+)\.pkl$")}
_FOLDER_RE = {1: re.compile(r"^ckpt_(\d{6})$"), 2: re.compile(r"^ckpt_2_(\d{6})$"), 3: re.compile(r"^ckpt_3_(\d{6})$")}


def _numbered(folder: str, pattern: re.Pattern, want_dir: bool = False) -> list:
    """[(number, path)] of the entries of ``folder`` whose name matches ``pattern``, sorted."""
    out = []
    for name in os.listdir(folder):
        m = pattern.match(name)
        if m and os.path.isdir(os.path.join(folder, name)) == want_dir:
            out.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(out)


def run_checkpoints(run_dir: str, use_pickle: bool = False) -> list:
    """[(kimg, path)] of the networks to generate from in a run directory: the published
    ``training-state-<kimg>.pkl`` with use_pickle; else our ``network-snapshot-<kimg>.safetensors``
    (the EMA network, which the published code takes from each state), or, in a run of the
    published code, its ``training-state-<kimg>.pt``. [] if there are none."""
    if not os.path.isdir(run_dir):
        return []
    if use_pickle:
        return _numbered(run_dir, _STATE_RE[True])
    return _numbered(run_dir, _OUR_SNAPSHOT_RE) or _numbered(run_dir, _STATE_RE[False])


def in_ckpt_range(kimg: int, ckpt: int, end_ckpt: int) -> bool:
    return ckpt <= kimg <= end_ckpt


def ckpt_folder(run_dir: str, kimg: int, seeds) -> str:
    """The published image folder of a checkpoint: RUN/ckpt_<kimg:06d>, ckpt_2_ / ckpt_3_ for seed
    sets ending above 49999 / 99999 (its second and third 50k sets)."""
    last = int(np.max(seeds))
    prefix = "ckpt_3_" if last > 99999 else "ckpt_2_" if last > 49999 else "ckpt_"
    return os.path.join(run_dir, f"{prefix}{kimg:06d}")


def generation_jobs(args, seeds) -> list:
    """``generate``'s [(network file, PNG folder)]: --network into --outdir or, without --network,
    each checkpoint of the run directory --outdir into its ckpt_<kimg> folder (UsageError if none)."""
    if args.network:
        return [(args.network, args.outdir)]
    found = run_checkpoints(args.outdir, args.use_pickle) if args.outdir else []
    if not found:
        raise UsageError(
            "--network",
            "is required (a network checkpoint, e.g. network-snapshot-*.safetensors), "
            "unless --outdir is a run directory holding checkpoints (network-snapshot-*.safetensors, "
            "training-state-*.pt, or with --use_pickle=1 training-state-*.pkl)",
        )
    if args.npz:
        raise UsageError("--npz", "needs --network (from a run directory the images go to its ckpt_<kimg> folders)")
    return [
        (path, ckpt_folder(args.outdir, kimg, seeds))
        for kimg, path in found
        if args.edm or in_ckpt_range(kimg, args.ckpt, args.end_ckpt)
    ]


def ckpt_folders(images_dir: str, gen_seed: int = 1, ckpt: int = 0, end_ckpt: int = 1000000) -> list:
    """[(kimg, path)] of the ``ckpt_`` (gen_seed 1), ``ckpt_2_`` (2) or ``ckpt_3_`` (3) image folders
    in ``images_dir`` with kimg in [ckpt, end_ckpt]; [] when it holds none (a plain image folder)."""
    if not os.path.isdir(images_dir):
        return []
    return [
        (k, p)
        for k, p in _numbered(images_dir, _FOLDER_RE[gen_seed], want_dir=True)
        if in_ckpt_range(k, ckpt, end_ckpt)
    ]


def random_subset(count: int, num: int, seed: int) -> np.ndarray:
    """Indices (sorted) of the images the published fid.py uses out of ``count`` when it wants
    ``num``: all if count <= num, else the first num of a NumPy RandomState(seed mod 2^31)
    shuffle of 0..count-1 (its ImageFolderDataset's max_size with random_seed)."""
    idx = np.arange(count, dtype=np.int64)
    if count > num:
        np.random.RandomState(seed % (1 << 31)).shuffle(idx)
        idx = np.sort(idx[:num])
    return idx
