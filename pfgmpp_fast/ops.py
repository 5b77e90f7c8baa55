"""Backend dispatch for the fused kernel-level ops (docs/KERNEL_OPS.md) and the fast public
`perturb`, `perturb_net_input`, `prior`, `noise_scale`, `training_scalars`.

Backends: 'reference' (pure torch, reference.ref_*), 'triton' (ops `pfgmpp_fast_triton::*`,
registered by the kernel files in pfgmpp_fast/kernels), 'cuda' / 'cpu' (the C++ extension's ops
`pfgmpp_fast::*`, loaded by pfgmpp_fast._ext), 'auto': on CUDA tensors the CUDA kernels when
built else Triton; on CPU tensors the C++ CPU op when built else the reference.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from pfgmpp_fast import checks
from pfgmpp_fast import reference as R

NET_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _import_triton_ops():
    """Importing pfgmpp_fast.kernels registers the pfgmpp_fast_triton ops (each kernel file
    registers its own)."""
    import pfgmpp_fast.kernels  # noqa: F401


try:  # at import: torch.compile cannot trace the registration itself
    _import_triton_ops()
except (ImportError, RuntimeError):  # no usable triton: backend='triton' fails when asked for
    pass


def _ext():
    try:
        from pfgmpp_fast import _ext as ext
    except ImportError:
        return None
    return ext


def has_extension() -> bool:
    ext = _ext()
    return bool(ext is not None and getattr(ext, "HAS_EXTENSION", False))


def has_cuda_kernels() -> bool:
    ext = _ext()
    return bool(ext is not None and getattr(ext, "HAS_CUDA_KERNELS", False))


def triton_available(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device) -> str:
    """The concrete backend for tensors on `device` (raises with a clear reason)."""
    checks.check_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            return "cuda" if has_cuda_kernels() else ("triton" if triton_available(device) else "reference")
        return "cpu" if has_extension() else "reference"
    if backend == "cpu":
        if not has_extension():
            raise RuntimeError(
                "backend='cpu' needs the C++ extension pfgmpp_fast._C, which is not "
                "built (pip install -e . / python setup.py build_ext --inplace)"
            )
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got device {device}")
    if backend == "cuda":
        if not has_cuda_kernels():
            raise RuntimeError(
                "backend='cuda' needs pfgmpp_fast._C built with its CUDA kernels; "
                "it is not built or was built without CUDA"
            )
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got device {device}")
    if backend == "triton" and not triton_available(device):
        raise RuntimeError(
            f"backend='triton' on device {device} needs CUDA tensors, or "
            "TRITON_INTERPRET=1 set before triton is imported (CPU interpreter)"
        )
    return backend


def _op(name: str, backend: str):
    if backend == "triton":
        _import_triton_ops()
        return getattr(torch.ops.pfgmpp_fast_triton, name)
    _ext()  # loads the library and its fake implementations
    return getattr(torch.ops.pfgmpp_fast, name)


# ----------------------------------------------------------------------------------------
# Kernel-level ops (argument lists of docs/KERNEL_OPS.md plus `backend`)


def philox4x32(counter: Tensor, key: int, backend: str = "auto") -> Tensor:
    b = resolve_backend(backend, counter.device)
    if b == "reference":
        return R.philox4x32(counter, key)
    return _op("philox4x32", b)(counter, int(key))


def philox_normal(key: int, sample_ids: Tensor, n: int, stream: int, backend: str = "auto") -> Tensor:
    """reference.normal on checked arguments; the compiled op's schema lists sample_ids first."""
    b = resolve_backend(backend, sample_ids.device)
    if b == "reference":
        return R.normal_unchecked(int(key), sample_ids, int(n), int(stream))
    return _op("philox_normal", b)(sample_ids, int(key), int(n), int(stream))


def chi2(key: int, sample_ids: Tensor, D: float, stream: int = R.STREAM_CHI2, backend: str = "auto") -> Tensor:
    """reference.chi2 on checked arguments; the compiled op's schema lists sample_ids first."""
    b = resolve_backend(backend, sample_ids.device)
    if b == "reference":
        return R.chi2_unchecked(int(key), sample_ids, float(D), int(stream))
    return _op("chi2", b)(sample_ids, int(key), float(D), int(stream))


def perturb_op(y, scale, c_in, sample_ids, key, stream, out_dtype, channels_last, write_x, backend="auto"):
    b = resolve_backend(backend, y.device)
    if b == "reference":
        return R.ref_perturb(y, scale, c_in, sample_ids, key, stream, out_dtype, channels_last, write_x)
    return _op("perturb", b)(
        y, scale, c_in, sample_ids, int(key), int(stream), out_dtype, bool(channels_last), bool(write_x)
    )


def loss_fwd_bwd(F, y, scale, c_skip, c_out, sample_ids, key, stream, grad_scale, backend="auto"):
    b = resolve_backend(backend, y.device)
    if b == "reference":
        return R.ref_loss_fwd_bwd(F, y, scale, c_skip, c_out, sample_ids, key, stream, grad_scale)
    return _op("loss_fwd_bwd", b)(F, y, scale, c_skip, c_out, sample_ids, int(key), int(stream), float(grad_scale))


def _optional_float(v):
    return None if v is None else float(v)


def sampler_update(
    x,
    F,
    base,
    A,
    Bf,
    h1,
    h2,
    sample_ids,
    key,
    alpha_scale,
    alpha_stream,
    churn_scale,
    churn_stream,
    c_in_next,
    net_dtype,
    channels_last,
    backend="auto",
):
    """One sampler update (docs/KERNEL_OPS.md): F/base None = no drift / base x; h2 None = no y2,
    c_in_next None = no network input (those outputs are then empty tensors)."""
    b = resolve_backend(backend, x.device)
    args = (
        x,
        F,
        base,
        float(A),
        float(Bf),
        float(h1),
        _optional_float(h2),
        sample_ids,
        int(key),
        float(alpha_scale),
        int(alpha_stream),
        float(churn_scale),
        int(churn_stream),
        _optional_float(c_in_next),
        net_dtype,
        bool(channels_last),
    )
    if b == "reference":
        return R.ref_sampler_update(*args)
    return _op("sampler_update", b)(*args)


# ----------------------------------------------------------------------------------------
# Public fast API (same semantics as reference.perturb / reference.prior). The public functions
# check their arguments once; training_scalars_unchecked (the loss's) and the private
# _noise_scale, _prior take checked ones.


def is_channels_last(t: Tensor) -> bool:
    """A 4-D tensor laid out channels-last (and not also contiguous, as when C == 1)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def noise_scale(sigma: Tensor, D, key, sample_ids, backend: str = "auto") -> Tensor:
    """s = σ·√(D/V), V ~ χ²_D on the device (float64 [B], clamped to MAX_SCALE); σ for D = inf."""
    sample_ids, key, D = checks.check_sample_ids(sample_ids), checks.check_key(key), checks.check_D(D)
    return _noise_scale(sigma, D, key, sample_ids, backend)


def _noise_scale(sigma: Tensor, D: float, key: int, sample_ids: Tensor, backend: str) -> Tensor:
    sigma = sigma.to(torch.float64)
    if math.isinf(D):
        return sigma.clone()
    V = chi2(key, sample_ids, D, R.STREAM_CHI2, backend=backend)
    return (sigma * torch.sqrt(D / V)).clamp(max=R.MAX_SCALE)


def training_scalars(key, sample_ids, D, P_mean: float = -1.2, P_std: float = 1.2, backend: str = "auto"):
    """(σ, s) float64 [B] of the training step, drawn on the device (reference.training_scalars)."""
    sample_ids, key, D = checks.check_sample_ids(sample_ids), checks.check_key(key), checks.check_D(D)
    checks.check_training_options(P_mean, P_std)
    return training_scalars_unchecked(key, sample_ids, D, P_mean, P_std, backend)


def training_scalars_unchecked(key: int, sample_ids: Tensor, D: float, P_mean: float, P_std: float, backend: str):
    z = philox_normal(key, sample_ids, 1, R.STREAM_SIGMA, backend=backend)[:, 0].to(torch.float64)
    sigma = torch.exp(P_mean + P_std * z)
    return sigma, _noise_scale(sigma, D, key, sample_ids, backend)


def _report_input(report: checks.DeviceReport, y: Tensor, sample_ids: Tensor, name: str = "y") -> None:
    """σ out of range (added by check_sigma), negative ids (on a GPU) and NaN/Inf in the input,
    read once (the call's one host sync)."""
    if torch.compiler.is_compiling():
        return
    report.ids(sample_ids)
    report.nonfinite(name, y, sample_ids)
    report.raise_if_any()


def perturb(y: Tensor, sigma, D, key, sample_ids, backend: str = "auto") -> Tensor:
    """x = y + σ·√(D/V)·g in one fused pass (reference.perturb); y's dtype and memory format.
    NaN/Inf in y is an error naming the sample ids."""
    key, D, sample_ids = checks.check_common("y", y, key, D, sample_ids)
    report = checks.DeviceReport()
    sigma = checks.check_sigma(sigma, y.shape[0], y.device, torch.float64, report)
    cd = R.compute_dtype(y)
    s = _noise_scale(sigma, D, key, sample_ids, backend).to(cd)
    x, _ = perturb_op(
        y, s, torch.ones_like(s), sample_ids, key, R.STREAM_NOISE, y.dtype, is_channels_last(y), False, backend=backend
    )
    _report_input(report, y, sample_ids)
    return x


def perturb_net_input(
    y: Tensor,
    sigma,
    D,
    key,
    sample_ids,
    sigma_data: float = 0.5,
    out_dtype=torch.float32,
    channels_last: bool = False,
    write_x: bool = False,
    backend: str = "auto",
):
    """The fused network input c_in(σ)·x (and x in fp32/fp64 when write_x) in one pass."""
    key, D, sample_ids = checks.check_common("y", y, key, D, sample_ids)
    if out_dtype not in NET_DTYPES:
        raise TypeError(f"out_dtype must be one of {NET_DTYPES}, got {out_dtype}")
    report = checks.DeviceReport()
    sigma = checks.check_sigma(sigma, y.shape[0], y.device, torch.float64, report)
    c_in = R.precond(sigma, sigma_data)[2]
    cd = R.compute_dtype(y)
    s = _noise_scale(sigma, D, key, sample_ids, backend).to(cd)
    out = perturb_op(
        y, s, c_in.to(cd), sample_ids, key, R.STREAM_NOISE, out_dtype, channels_last, write_x, backend=backend
    )
    _report_input(report, y, sample_ids)
    return out


def prior(shape, D, sigma_max, key, seeds, dtype=torch.float32, device=None, backend: str = "auto"):
    """Latents σ_max·√(D/V)·g (reference.prior), generated on the device."""
    shape, D, sigma_max, key, seeds = checks.check_prior(shape, D, sigma_max, key, seeds, device)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    latents = prior_unchecked(shape, D, sigma_max, key, seeds, dtype, backend)
    report = checks.DeviceReport()
    report.ids(seeds, "seeds")  # on a GPU: read once (on the CPU check_sample_ids did it)
    report.raise_if_any()
    return latents


def prior_unchecked(shape, D: float, sigma_max: float, key: int, seeds: Tensor, dtype, backend: str) -> Tensor:
    sigma = torch.full((shape[0],), sigma_max, dtype=torch.float64, device=seeds.device)
    s = _noise_scale(sigma, D, key, seeds, backend).to(dtype)
    g = philox_normal(key, seeds, math.prod(shape[1:]), R.STREAM_NOISE, backend=backend).to(dtype)
    return (s.view(-1, 1) * g).view(shape)
