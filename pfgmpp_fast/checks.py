"""Argument validation for the public API, in one place: each check names the argument, the
value and the allowed range. Public entry points call these once, at the boundary; what
they pass on inside the package is trusted.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

__all__ = ["check_key", "check_D", "parse_D", "check_sample_ids", "check_positive", "check_images",
           "check_sampler_options", "check_sigma", "as_bool", "check_number", "parse_int_list", "check_seeds",
           "MAX_SEED", "MAX_SEEDS"]

MAX_SEED = 2 ** 63
MAX_SEEDS = 10 ** 9



def check_key(key) -> int:
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
        raise TypeError(f"key must be an int in [0, 2^63), got {type(key).__name__}")
    key = int(key)
    if not 0 <= key < 2**63:
        raise ValueError(f"key must be in [0, 2^63), got {key}")
    return key


def check_D(D) -> float:
    try:
        D = float(D)
    except (TypeError, ValueError):
        raise TypeError(f"D must be a number in (0, inf], got {D!r}") from None
    if math.isnan(D) or D <= 0:
        raise ValueError(f"D must be in (0, inf] (float('inf') = EDM diffusion), got {D}")
    return D


def check_sample_ids(sample_ids, name="sample_ids", device=None) -> torch.Tensor:
    if not torch.is_tensor(sample_ids):
        sample_ids = torch.as_tensor(np.asarray(sample_ids, dtype=np.int64), device=device)
    if sample_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor (int64), got {sample_ids.dtype}")
    if sample_ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {tuple(sample_ids.shape)}")
    sample_ids = sample_ids.to(torch.int64)
    if device is not None:
        sample_ids = sample_ids.to(device)
    return sample_ids


def check_positive(name, value, allow_inf=False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        rng = "(0, inf]" if allow_inf else "(0, inf)"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return value


def check_images(name, y, batch=None) -> None:
    if not torch.is_tensor(y):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if not y.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {y.dtype}")
    if y.dim() < 2:
        raise ValueError(f"{name} must have shape [B, ...] with at least 2 dims, got {tuple(y.shape)}")
    if batch is not None and y.shape[0] != batch:
        raise ValueError(f"{name} has batch size {y.shape[0]} but {batch} sample ids/seeds were given")


def check_sampler_options(solver, S_churn, S_min, S_max, S_noise, alpha, dtype) -> None:
    """The sampler's options (shared by reference.sample and the fused sampler)."""
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    for name, value in (("S_churn", S_churn), ("S_min", S_min), ("S_noise", S_noise), ("alpha", alpha)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (S_max >= S_min):
        raise ValueError(f"S_max must be >= S_min, got S_max={S_max}, S_min={S_min}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


def check_sigma(sigma, batch, device, dtype) -> torch.Tensor:
    """σ as a [B] tensor; a scalar is broadcast. Must be finite and > 0."""
    sigma = torch.as_tensor(sigma, dtype=dtype, device=device)
    if sigma.dim() == 0:
        sigma = sigma.expand(batch)
    sigma = sigma.reshape(-1)
    if sigma.shape[0] != batch:
        raise ValueError(f"sigma must be a scalar or have shape [{batch}], got {tuple(sigma.shape)}")
    if sigma.numel() and not bool(torch.isfinite(sigma).all() & (sigma > 0).all()):
        raise ValueError("sigma must be finite and > 0 (allowed range (0, inf))")
    return sigma


def parse_D(text) -> float:
    """'128' → 128.0, 'inf' / 'infinity' / 'edm' → inf; an error for anything outside (0, inf]."""
    if isinstance(text, str) and text.strip().lower() in ("inf", "infinity", "edm"):
        return float("inf")
    if isinstance(text, str):
        try:
            text = float(text)
        except ValueError:
            raise ValueError(f"D must be a number in (0, inf] or 'inf', got {text!r}") from None
    return check_D(text)


def as_bool(name, value) -> bool:
    """True/False, or the strings 1/0, true/false, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be a boolean, got {value!r}")


def check_number(name, value, allow_zero=False, integer=False, allow_inf=False):
    """A positive (or, with allow_zero, non-negative) number; an int with integer=True."""
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


def parse_int_list(text, name: str = "seeds") -> list:
    """'0-49999', '1,5,7-9' (inclusive ranges, as the published parse_int_list) -> [int]."""
    if isinstance(text, (list, tuple, range, np.ndarray)):
        return [int(v) for v in text]
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        return [int(text)]
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a string like '0-49999' or '1,5,7-9', got {text!r}")
    out = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"{name}: range {part!r} is empty (end < start)")
            if hi - lo + 1 + len(out) > MAX_SEEDS:
                raise ValueError(f"{name}: {part!r} holds more than {MAX_SEEDS} seeds")
            out.extend(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", part):
            out.append(int(part))
        else:
            raise ValueError(f"{name}: cannot parse {part!r} in {text!r}; expected non-negative integers "
                             "and inclusive ranges like '0-49999' or '1,5,7-9'")
    return out


def check_seeds(seeds, name: str = "seeds") -> np.ndarray:
    """Seeds as a sorted int64 array; each in [0, 2^63), no duplicates."""
    values = parse_int_list(seeds, name)
    if not values:
        raise ValueError(f"{name} is empty")
    for v in (min(values), max(values)):
        if not 0 <= v < MAX_SEED:
            raise ValueError(f"{name}: seed {v} is out of range; seeds must be in [0, 2^63)")
    arr = np.sort(np.asarray(values, dtype=np.int64))
    dup = arr[1:][arr[1:] == arr[:-1]]
    if dup.size:
        raise ValueError(f"{name}: seed {int(dup[0])} appears more than once (each seed is one image)")
    return arr
