"""Post-hoc EMA (EDM2: Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", §3): choose the EMA length after training.

Training (``--phema STD,...``) tracks power-function EMAs: after the step that brings the run to
t images, ``ema ← β·ema + (1−β)·θ`` with ``β = (1 − batch/t)^(γ+1)``. After T images the EMA
weighs the parameters of the step ending at τ by ``(τ^(γ+1) − (τ−batch)^(γ+1)) / T^(γ+1)``:
exactly the mass of the profile ``p(τ) = (γ+1) τ^γ / T^(γ+1)`` on that step, so the snapshots
are samples of continuous profiles (parameters piecewise constant between steps). A profile's
length is its relative standard deviation ``std = sqrt((γ+1) / ((γ+2)²(γ+3)))`` (the standard
deviation of p divided by T), which decreases from STD_MAX (γ = (√5−3)/2) to 0 (γ → ∞).

Reconstruction: the profile q wanted (std, T) is approximated in L2 by a combination Σ x_i p_i
of the stored snapshot profiles; their inner products have a closed form, so x solves the
normal equations ``A x = b`` (A_ij = <p_i, p_j>, b_i = <p_i, q>), scaled to Σ x_i = 1 as in
EDM2, and the network is Σ x_i θ_i: a weighted average of the snapshots, so weights that never
changed come back unchanged (the raw Σ x_i is recorded). A requested profile that the snapshots
cannot express (relative L2 error of the scaled fit above ``max_error``) is refused instead of
returning a silently different EMA.

Snapshots live in ``RUN/phema/phema-<std>-<kimg>.safetensors`` (our network format; the std,
γ, nimg, kimg and step are in the metadata), outside the folder's network snapshots so nothing
that looks for ``network-snapshot-*`` picks them up.

This module holds the maths and the snapshots' reading and reconstruction (core: evaluation and
the apps use it); the tracking during training and the `phema` command are training/phema.py.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import List, Optional, Sequence

import numpy as np
import torch

from pfgmpp_fast.checkpoint import FORMAT, load_network, network_from_config
from pfgmpp_fast.utils.io_utils import is_temp_file

__all__ = [
    "STD_MAX",
    "DEFAULT_STDS",
    "MAX_ERROR",
    "std_to_exp",
    "exp_to_std",
    "profile_inner",
    "solve_coefficients",
    "parse_stds",
    "snapshot_name",
    "Snapshot",
    "list_snapshots",
    "available_stds",
    "reconstruct",
    "reconstruct_network",
]

STD_MAX = math.sqrt(((math.sqrt(5) - 3) / 2 + 1) / (((math.sqrt(5) - 3) / 2 + 2) ** 2 * ((math.sqrt(5) - 3) / 2 + 3)))
DEFAULT_STDS = (0.05, 0.10)  # EDM2's pair
MAX_ERROR = 0.1  # largest relative L2 error of a reconstructed profile
SUBDIR = "phema"


# ----------------------------------------------------------------------------------------
# The maths (float64 numpy; EDM2 §3.2 and its appendix)


def exp_to_std(gamma):
    """Relative standard deviation of the power-function profile with exponent ``gamma``."""
    g = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def std_to_exp(std: float) -> float:
    """The exponent γ of the profile with relative standard deviation ``std`` (0 < std < STD_MAX):
    the largest real root of γ³ + 7γ² + (16 − s⁻²)γ + (12 − s⁻²) = 0 (the branch γ > (√5−3)/2)."""
    std = float(std)
    if not (0 < std < STD_MAX):
        raise ValueError(
            f"std must be in (0, {STD_MAX:.4f}) (a power-function EMA's relative standard deviation), got {std!r}"
        )
    t = std**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots[np.abs(roots.imag) < 1e-7 * np.abs(roots).max()].real.max())


def profile_inner(t_a, g_a, t_b, g_b):
    """<p_a, p_b> = ∫ p_a p_b of the profiles p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t] (broadcasts)."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    lo = np.minimum(t_a, t_b)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (lo / t_a) ** (g_a + 1) * (lo / t_b) ** (g_b + 1) / lo


def solve_coefficients(in_t, in_g, out_t, out_g):
    """(x [n_in, n_out], relative L2 error [n_out], raw sum [n_out]) of the fits Σ_i x_io p_i ≈ q_o:
    the least-squares coefficients scaled to sum to 1, as EDM2 does (its Algorithm 3), so the
    result is a weighted average of the snapshots (a parameter that never changed is
    reconstructed exactly); the error is that of the scaled fit, the raw sum that of the
    least-squares one."""
    rv = lambda v: np.asarray(v, dtype=np.float64).reshape(-1, 1)  # noqa: E731
    cv = lambda v: np.asarray(v, dtype=np.float64).reshape(1, -1)  # noqa: E731
    A = profile_inner(rv(in_t), rv(in_g), cv(in_t), cv(in_g))
    B = profile_inner(rv(in_t), rv(in_g), cv(out_t), cv(out_g))
    try:
        X = np.linalg.solve(A, B)
    except np.linalg.LinAlgError:  # singular: duplicate profiles; least squares still works
        X = np.linalg.lstsq(A, B, rcond=None)[0]
    raw_sum = X.sum(axis=0)
    X = X / raw_sum
    qq = profile_inner(out_t, out_g, out_t, out_g).reshape(-1)
    residual = qq - 2 * np.sum(X * B, axis=0) + np.einsum("io,ij,jo->o", X, A, X)
    return X, np.sqrt(np.maximum(residual, 0.0) / qq), raw_sum


def parse_stds(value, name: str = "phema") -> tuple:
    """'0.05,0.1' | [0.05, 0.1] → (0.05, 0.1): distinct, each in (0, STD_MAX)."""
    try:
        items = (
            value.split(",") if isinstance(value, str) else [value] if isinstance(value, (int, float)) else list(value)
        )
        stds = tuple(float(v) for v in items if str(v).strip() != "")
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be a comma-separated list of EMA lengths (relative standard "
            f"deviations), e.g. 0.05,0.1; got {value!r}"
        ) from None
    if not stds:
        raise ValueError(f"{name} must name at least one EMA length, got {value!r}")
    for s in stds:
        if not (0 < s < STD_MAX):
            raise ValueError(f"{name}: every EMA length must be in (0, {STD_MAX:.4f}), got {s!r}")
    if len(set(stds)) != len(stds):
        raise ValueError(f"{name}: EMA lengths must be distinct, got {value!r}")
    return stds


def snapshot_name(std: float, nimg: int) -> str:
    """phema-<std>-<kimg>.safetensors: the file name of the network of EMA length std at nimg images."""
    label = f"{std:.3f}" if round(std, 3) == std else f"{std:g}"
    return f"phema-{label}-{nimg / 1000:010.3f}.safetensors"


# ----------------------------------------------------------------------------------------
# Snapshots and reconstruction


@dataclasses.dataclass(frozen=True)
class Snapshot:
    path: str
    std: float
    gamma: float
    nimg: int
    config: str  # the network config (JSON), identical for the snapshots of one run
    run: str  # the options that define the run (JSON), identical too


def _read_snapshot(path: str) -> Snapshot:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"metadata format {meta.get('format')!r}, expected {FORMAT!r}")
        extra, config = json.loads(meta.get("extra", "{}")), meta["config"]
        return Snapshot(
            path,
            float(extra["phema_std"]),
            float(extra["phema_gamma"]),
            int(extra["nimg"]),
            config,
            json.dumps(extra.get("run"), sort_keys=True),
        )
    except Exception as exc:  # safetensors raises its own types
        raise ValueError(f"{path}: not a phema snapshot ({type(exc).__name__}: {exc})") from None


def _load_parameters(path: str, like: torch.nn.Module) -> dict:
    """The parameters of one snapshot, checked against ``like`` (names, shapes, finite values);
    reading the tensors alone, without building a network per snapshot."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as exc:  # safetensors raises its own types
        raise ValueError(f"{path}: truncated or corrupt phema snapshot ({type(exc).__name__}: {exc})") from None
    for name, p in like.named_parameters():
        t = tensors.get(name)
        if t is None or t.shape != p.shape:
            raise ValueError(f"{path}: parameter {name} is missing or has the wrong shape for this run's network")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: non-finite values (NaN/Inf) in {name}")
    return tensors


def list_snapshots(run_dir: str) -> List[Snapshot]:
    """Every phema snapshot of a run, sorted by (nimg, std): the order never depends on the listing."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run-dir: no such run directory {run_dir}")
    paths = [p for p in glob.glob(os.path.join(glob.escape(run_dir), SUBDIR, "*.safetensors")) if not is_temp_file(p)]
    if not paths:
        raise ValueError(
            f"run-dir: {run_dir} has no power-function EMA snapshots ({SUBDIR}/phema-*.safetensors); "
            "train it with --phema STD,... (e.g. --phema 0.05,0.1) to make them"
        )
    return sorted((_read_snapshot(p) for p in paths), key=lambda s: (s.nimg, s.std, s.path))


def available_stds(run_dir: str) -> List[float]:
    """The EMA lengths (relative standard deviations) tracked in ``run_dir``."""
    return sorted({s.std for s in list_snapshots(run_dir)})


def reconstruct(
    snapshots: Sequence[Snapshot],
    stds: Sequence[float],
    at_nimg: Optional[int] = None,
    max_error: float = MAX_ERROR,
    device="cpu",
) -> list:
    """[(EDMPrecond, info)] for each std: Σ x_i θ_i over the snapshots taken at or before at_nimg
    (default: the newest). Parameters are combined in float64; buffers come from the newest
    snapshot. Independent of the order of ``snapshots``."""
    snaps = sorted({s.path: s for s in snapshots}.values(), key=lambda s: (s.nimg, s.std, s.path))
    if not snaps:
        raise ValueError("no phema snapshots given")
    stds = parse_stds(list(stds), "std")
    last = snaps[-1].nimg
    at_nimg = last if at_nimg is None else int(at_nimg)
    if not snaps[0].nimg <= at_nimg <= last:
        raise ValueError(
            f"at-kimg must be within the phema snapshots, [{snaps[0].nimg / 1000:g}, "
            f"{last / 1000:g}] kimg, got {at_nimg / 1000:g}"
        )
    snaps = [s for s in snaps if s.nimg <= at_nimg]
    if len({s.config for s in snaps}) != 1 or len({s.run for s in snaps}) != 1:
        runs = sorted({s.run for s in snaps})
        raise ValueError(
            f"the phema snapshots come from different runs (network configs or options differ, e.g. "
            f"{runs[:2]}): a fresh run must not write into the run directory of another"
        )
    out_g = [std_to_exp(s) for s in stds]
    X, error, raw_sum = solve_coefficients(
        [s.nimg for s in snaps], [s.gamma for s in snaps], [at_nimg] * len(stds), out_g
    )
    bad = [(s, e) for s, e in zip(stds, error) if not e <= max_error]
    if bad:
        tracked = sorted({s.std for s in snaps})
        raise ValueError(
            "std: "
            + "; ".join(
                f"{s:g} cannot be expressed by the stored profiles (relative error {e:.3f} > {max_error:g})"
                for s, e in bad
            )
            + f". The run tracks {tracked} with {len(snaps)} snapshots up to {at_nimg / 1000:g} kimg; "
            "ask for a length between them or close to them, or snapshot more often (--phema-snap)"
        )
    newest = load_network(snaps[-1].path, device="cpu")  # validated: format, shapes, finite values
    names = [n for n, _ in newest.named_parameters()]
    acc = [{n: torch.zeros_like(p, dtype=torch.float64) for n, p in newest.named_parameters()} for _ in stds]
    for i, snap in enumerate(snaps):
        state = _load_parameters(snap.path, newest)
        for o, sums in enumerate(acc):
            for n in names:
                sums[n].add_(state[n].double(), alpha=float(X[i, o]))
    results = []
    for o, std in enumerate(stds):
        net = network_from_config(json.loads(snaps[-1].config), device="cpu")
        state = newest.state_dict()
        state.update({n: acc[o][n].to(state[n].dtype) for n in names})
        net.load_state_dict(state, strict=True)
        info = dict(
            phema_std=std,
            phema_gamma=out_g[o],
            nimg=at_nimg,
            kimg=at_nimg / 1000,
            phema_error=float(error[o]),
            phema_sources=len(snaps),
            phema_raw_coefficient_sum=float(raw_sum[o]),
        )
        results.append((net.to(device).eval().requires_grad_(False), info))
    return results


def reconstruct_network(
    run_dir: str, std: float, at_kimg: Optional[float] = None, device="cpu", max_error: float = MAX_ERROR
):
    """The network of EMA length ``std`` at ``at_kimg`` (default: the newest phema snapshot),
    reconstructed from the power-function EMA snapshots of ``run_dir``: an ordinary EDMPrecond
    in eval mode without gradients."""
    at_nimg = None if at_kimg is None else int(round(float(at_kimg) * 1000))
    return reconstruct(list_snapshots(run_dir), [std], at_nimg, max_error=max_error, device=device)[0][0]
