"""Argument validation for the public API, in one place: each check names the argument, the
value and the allowed range. Public entry points call these once, at the boundary; what
they pass on inside the package is trusted. The errors are ValueError/TypeError that also carry
the argument's name (utils/cli_errors.py: InvalidValue, InvalidType), so a command names its
option without reading the message.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from pfgmpp_fast.utils.cli_errors import InvalidType, InvalidValue

__all__ = [
    "check_key",
    "check_D",
    "parse_D",
    "check_sample_ids",
    "check_positive",
    "check_images",
    "check_sampler_options",
    "check_training_options",
    "check_sigma",
    "as_bool",
    "check_number",
    "parse_int_list",
    "check_seeds",
    "check_net_D",
    "check_sigma_max",
    "check_common",
    "check_prior",
    "check_elements_per_sample",
    "per_sample_count",
    "format_ids",
    "check_backend",
    "DeviceReport",
    "BACKENDS",
    "MAX_SEED",
    "MAX_SEEDS",
    "MAX_SIGMA",
    "MAX_ELEMENTS_PER_SAMPLE",
    "SOLVERS",
    "MULTISTEP_SOLVERS",
]

MAX_SEED = 2**63
MAX_SEEDS = 10**9
MAX_SIGMA = 1e30  # = reference.MAX_SCALE: the largest noise scale every backend represents unclamped
# Element e of a sample draws from Philox block e // 4, one 32-bit counter word (docs/DESIGN.md §2).
MAX_ELEMENTS_PER_SAMPLE = 2**34
BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")  # what every op's `backend` may be (ops.py)


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_key(key) -> int:
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
        raise InvalidType("key", f"must be an int in [0, 2^63), got {type(key).__name__}")
    key = int(key)
    if not 0 <= key < 2**63:
        raise InvalidValue("key", f"must be in [0, 2^63), got {key}")
    return key


def check_D(D) -> float:
    if isinstance(D, bool):
        raise InvalidType("D", f"must be a number in (0, inf], got the bool {D!r}")
    try:
        D = float(D)
    except (TypeError, ValueError):
        raise InvalidType("D", f"must be a number in (0, inf], got {D!r}") from None
    if math.isnan(D) or D <= 0:
        raise InvalidValue("D", f"must be in (0, inf] (float('inf') = EDM diffusion), got {D}")
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
    if (
        sample_ids.device.type == "cpu"
        and sample_ids.numel()
        and not torch.compiler.is_compiling()
        and int(sample_ids.min()) < 0
    ):  # free on the host; on a GPU see DeviceReport.ids
        raise ValueError(f"{name} must be in [0, 2^63), got {int(sample_ids.min())}")
    return sample_ids


def check_common(name, images, key, D, sample_ids, ids_name="sample_ids"):
    """(key, D, sample ids) of a per-sample op on `images` [B, ...]: each checked once."""
    check_images(name, images)
    check_elements_per_sample(None, f"the elements per sample of {name}", per_sample_count(images.shape), name)
    sample_ids = check_sample_ids(sample_ids, name=ids_name, device=images.device)
    check_images(name, images, batch=sample_ids.shape[0])
    return check_key(key), check_D(D), sample_ids


def check_elements_per_sample(op, what: str, n, name=None) -> None:
    """At most 2^34 elements per sample in an op that draws normals per element; `what` names the
    count ("n", "the elements per sample of y"), `name` the argument (default `what`), `op` the
    op's name or None (a public function). The C++ ops (csrc/ops.cpp) give the same message."""
    if 0 <= n <= MAX_ELEMENTS_PER_SAMPLE:
        return
    detail = f"must be in [0, 2^34], got {n} (element e draws from Philox block e // 4, a 32-bit counter word)"
    message = f"{what} {detail}"
    raise InvalidValue(name or what, detail, message=f"{op}: {message}" if op else message)


def per_sample_count(shape) -> int:
    """Elements per sample of a [B, ...] shape (B may be 0)."""
    return math.prod(shape[1:])


def check_prior(shape, D, sigma_max, key, seeds, device=None):
    """(shape, D, sigma_max, key, seeds) of latents [B, ...] with one seed per image, each checked once."""
    shape = tuple(int(s) for s in shape)
    seeds = check_sample_ids(seeds, name="seeds", device=device)
    if len(shape) < 2 or shape[0] != seeds.shape[0]:
        raise ValueError(f"shape must be [B, ...] with B = len(seeds) = {seeds.shape[0]}, got {shape}")
    check_elements_per_sample(None, "the elements per sample of shape", per_sample_count(shape), "shape")
    return shape, check_D(D), check_sigma_max("sigma_max", sigma_max), check_key(key), seeds


def check_net_D(net, D: float) -> None:
    """A D that disagrees with the network's own D (the one it was trained with) is an error."""
    net_D = getattr(net, "D", None)
    if isinstance(net_D, (int, float)) and not isinstance(net_D, bool) and float(net_D) != D:
        detail = (
            f"{D:g} was given but the network was trained with D={float(net_D):g} "
            "(a network/D mismatch; omit D / --D to use the network's)"
        )
        raise InvalidValue("D", detail, sep="=")


def check_positive(name, value, allow_inf=False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidType(name, f"must be a number, got {value!r}") from None
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        rng = "(0, inf]" if allow_inf else "(0, inf)"
        raise InvalidValue(name, f"must be in {rng}, got {value}")
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


def check_training_options(P_mean, P_std) -> None:
    """The training noise-level distribution ln σ ~ N(P_mean, P_std²)."""
    if isinstance(P_mean, bool) or not math.isfinite(P_mean):
        raise InvalidValue("P_mean", f"must be a finite number, got {P_mean!r}")
    check_positive("P_std", P_std)


SOLVERS = ("heun", "euler", "dpmpp2m", "ipndm", "ipndm_v")  # the sampler's solvers (step loops: sampler.py)
MULTISTEP_SOLVERS = ("dpmpp2m", "ipndm", "ipndm_v")  # reuse earlier steps' evaluations; deterministic (no churn)


def check_sampler_options(solver, S_churn, S_min, S_max, S_noise, alpha, dtype) -> None:
    """The sampler's options (shared by reference.sample and sampler.SamplerOptions)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    for name, value in (("S_churn", S_churn), ("S_min", S_min), ("S_noise", S_noise), ("alpha", alpha)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if solver in MULTISTEP_SOLVERS and S_churn > 0:
        raise ValueError(f"S_churn must be 0 with solver={solver!r} (a multistep solver has no churn), got {S_churn!r}")
    if not (S_max >= S_min):
        raise ValueError(f"S_max must be >= S_min, got S_max={S_max}, S_min={S_min}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


def check_sigma(sigma, batch, device, dtype, report: DeviceReport | None = None) -> torch.Tensor:
    """σ as a [B] tensor; a scalar is broadcast. Must be in (0, MAX_SIGMA] (NaN fails too): checked
    here (a host read), or with `report` added to the call's one read (a ValueError from
    `report.raise_if_any()`)."""
    sigma = torch.as_tensor(sigma, dtype=dtype, device=device)
    if sigma.dim() == 0:
        sigma = sigma.expand(batch)
    sigma = sigma.reshape(-1)
    if sigma.shape[0] != batch:
        raise ValueError(f"sigma must be a scalar or have shape [{batch}], got {tuple(sigma.shape)}")
    if not sigma.numel():
        return sigma
    bad = ~((sigma > 0) & (sigma <= MAX_SIGMA))
    explain = lambda rows, _: f"sigma must be in (0, {MAX_SIGMA:g}], got {sigma[rows[0]].item()}"  # noqa: E731
    if report is not None and not torch.compiler.is_compiling():
        report.add(bad, explain, ValueError)
    elif bool(bad.any()):
        raise ValueError(explain(bad.nonzero()[0].tolist(), None))
    return sigma


def check_sigma_max(name, value) -> float:
    """A scalar noise level in (0, MAX_SIGMA]."""
    value = check_positive(name, value)
    if value > MAX_SIGMA:
        raise ValueError(f"{name} must be in (0, {MAX_SIGMA:g}], got {value}")
    return value


class DeviceReport:
    """Conditions evaluated on the device and read back once per call (one host sync).

    `add(bad, explain)`: `bad` is a bool tensor [B] (or an int64 tensor [B]: -1 fine,
    else the step where it went wrong), `explain(rows, values)` builds the message for the bad rows.
    `raise_if_any()` reads every flag at once and raises the first failure."""

    def __init__(self):
        self._items = []

    def add(self, bad: torch.Tensor, explain, error=FloatingPointError) -> None:
        self._items.append((bad.reshape(-1), explain, error))

    def nonfinite(self, name: str, t: torch.Tensor, ids: torch.Tensor, ids_name: str = "sample_ids", hint="") -> None:
        """Report the rows of `t` [B, ...] holding NaN/Inf, by their sample ids; `hint` is appended
        (a string, or a function of the bad rows that returns one)."""
        bad = ~torch.isfinite(t).flatten(1).all(dim=1) if t.dim() > 1 else ~torch.isfinite(t)
        self.add(
            bad,
            lambda rows, _: (
                f"{name} contains NaN/Inf for {ids_name} {format_ids(ids, rows)}"
                f"{hint(rows) if callable(hint) else hint}"
            ),
        )

    def ids(self, ids: torch.Tensor, name: str = "sample_ids") -> None:
        """Negative ids on a GPU, checked with the call's one host read (on the CPU check_sample_ids did it)."""
        if ids.device.type != "cpu":
            self.add(ids < 0, lambda rows, _: f"{name} must be in [0, 2^63), got {format_ids(ids, rows)}", ValueError)

    def raise_if_any(self) -> None:
        if not self._items:
            return
        flags = torch.cat(
            [b.to(torch.int64) if b.dtype == torch.bool else b.to(torch.int64) + 1 for b, _, _ in self._items]
        ).cpu()  # the one host read
        start = 0
        for bad, explain, error in self._items:
            part = flags[start : start + bad.numel()]
            start += bad.numel()
            rows = part.nonzero().flatten()
            if rows.numel():
                values = part[rows] - (0 if bad.dtype == torch.bool else 1)
                raise error(explain(rows.tolist(), values.tolist()))


def parse_D(text) -> float:
    """'128' → 128.0, 'inf' / 'infinity' / 'edm' → inf; an error for anything outside (0, inf]."""
    if isinstance(text, str) and text.strip().lower() in ("inf", "infinity", "edm"):
        return float("inf")
    if isinstance(text, str):
        try:
            text = float(text)
        except ValueError:
            raise InvalidValue("D", f"must be a number in (0, inf] or 'inf', got {text!r}") from None
    return check_D(text)


def as_bool(name, value) -> bool:
    """True/False, or the strings 1/0, true/false, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise InvalidValue(name, f"must be a boolean, got {value!r}")


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
        raise InvalidType(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}") from None
    bad = math.isnan(out) or (out < 0 if allow_zero else out <= 0) or (math.isinf(out) and not allow_inf)
    if bad:
        rng = ("[0, " if allow_zero else "(0, ") + ("inf]" if allow_inf else "inf)")
        raise InvalidValue(name, f"must be in {rng}, got {value!r}")
    return out


def parse_int_list(text, name: str = "seeds") -> list:
    """'0-49999', '1,5,7-9' (inclusive ranges, as the published parse_int_list) -> [int]."""
    if isinstance(text, (list, tuple, range, np.ndarray)):
        return [int(v) for v in text]
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        return [int(text)]
    if not isinstance(text, str):
        raise InvalidType(name, f"must be a string like '0-49999' or '1,5,7-9', got {text!r}")
    out = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise InvalidValue(name, f"range {part!r} is empty (end < start)", sep=": ")
            if hi - lo + 1 + len(out) > MAX_SEEDS:
                raise InvalidValue(name, f"{part!r} holds more than {MAX_SEEDS} seeds", sep=": ")
            out.extend(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", part):
            out.append(int(part))
        else:
            raise InvalidValue(
                name,
                f"cannot parse {part!r} in {text!r}; expected non-negative integers "
                "and inclusive ranges like '0-49999' or '1,5,7-9'",
                sep=": ",
            )
    return out


def check_seeds(seeds, name: str = "seeds") -> np.ndarray:
    """Seeds as a sorted int64 array; each in [0, 2^63), no duplicates."""
    values = parse_int_list(seeds, name)
    if not values:
        raise InvalidValue(name, "is empty")
    for v in (min(values), max(values)):
        if not 0 <= v < MAX_SEED:
            raise InvalidValue(name, f"seed {v} is out of range; seeds must be in [0, 2^63)", sep=": ")
    arr = np.sort(np.asarray(values, dtype=np.int64))
    dup = arr[1:][arr[1:] == arr[:-1]]
    if dup.size:
        raise InvalidValue(name, f"seed {int(dup[0])} appears more than once (each seed is one image)", sep=": ")
    return arr


def format_ids(ids: torch.Tensor, rows, limit: int = 8) -> str:
    """ids[rows] for a message, the first `limit` of them."""
    values = ids[rows[:limit]].tolist()
    return str(values) + (f" (and {len(rows) - limit} more)" if len(rows) > limit else "")
