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

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")
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
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            return "cuda" if has_cuda_kernels() else ("triton" if triton_available(device) else "reference")
        return "cpu" if has_extension() else "reference"
    if backend == "cpu":
        if not has_extension():
            raise RuntimeError("backend='cpu' needs the C++ extension pfgmpp_fast._C, which is not "
                               "built (pip install -e . / python setup.py build_ext --inplace)")
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got device {device}")
    if backend == "cuda":
        if not has_cuda_kernels():
            raise RuntimeError("backend='cuda' needs pfgmpp_fast._C built with its CUDA kernels; "
                               "it is not built or was built without CUDA")
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got device {device}")
    if backend == "triton" and not triton_available(device):
        raise RuntimeError(f"backend='triton' on device {device} needs CUDA tensors, or "
                           "TRITON_INTERPRET=1 set before triton is imported (CPU interpreter)")
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


def philox_normal(sample_ids: Tensor, key: int, n: int, stream: int, backend: str = "auto") -> Tensor:
    b = resolve_backend(backend, sample_ids.device)
    if b == "reference":
        return R.normal(key, sample_ids, n, stream)
    return _op("philox_normal", b)(sample_ids, int(key), int(n), int(stream))


def chi2(sample_ids: Tensor, key: int, D: float, stream: int = R.STREAM_CHI2, backend: str = "auto") -> Tensor:
    b = resolve_backend(backend, sample_ids.device)
    if b == "reference":
        return R.chi2(key, sample_ids, D, stream)
    return _op("chi2", b)(sample_ids, int(key), float(D), int(stream))


def perturb_op(y, scale, c_in, sample_ids, key, stream, out_dtype, channels_last, write_x, backend="auto"):
    b = resolve_backend(backend, y.device)
    if b == "reference":
        return R.ref_perturb(y, scale, c_in, sample_ids, key, stream, out_dtype, channels_last, write_x)
    return _op("perturb", b)(y, scale, c_in, sample_ids, int(key), int(stream), out_dtype,
                             bool(channels_last), bool(write_x))


def loss_fwd_bwd(F, y, scale, c_skip, c_out, sample_ids, key, stream, grad_scale, backend="auto"):
    b = resolve_backend(backend, y.device)
    if b == "reference":
        return R.ref_loss_fwd_bwd(F, y, scale, c_skip, c_out, sample_ids, key, stream, grad_scale)
    return _op("loss_fwd_bwd", b)(F, y, scale, c_skip, c_out, sample_ids, int(key), int(stream),
                                  float(grad_scale))


def sampler_update(x, F, base, A, Bf, h1, h2, sample_ids, key, alpha_scale, alpha_stream,
                   churn_scale, churn_stream, c_in_next, net_dtype, channels_last, backend="auto"):
    b = resolve_backend(backend, x.device)
    args = (x, F, base, float(A), float(Bf), float(h1), float(h2), sample_ids, int(key),
            float(alpha_scale), int(alpha_stream), float(churn_scale), int(churn_stream),
            float(c_in_next), net_dtype, bool(channels_last))
    if b == "reference":
        return R.ref_sampler_update(*args)
    return _op("sampler_update", b)(*args)


# ----------------------------------------------------------------------------------------
# Public fast API (same semantics as reference.perturb / reference.prior)

def _compute_dtype(t: Tensor):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def noise_scale(sigma: Tensor, D, key, sample_ids, backend: str = "auto") -> Tensor:
    """s = σ·√(D/V), V ~ χ²_D on the device (float64 [B], clamped to MAX_SCALE); σ for D = inf."""
    D = checks.check_D(D)
    sigma = sigma.to(torch.float64)
    if math.isinf(D):
        return sigma.clone()
    V = chi2(sample_ids, key, D, R.STREAM_CHI2, backend=backend)
    return (sigma * torch.sqrt(D / V)).clamp(max=R.MAX_SCALE)


def training_scalars(key, sample_ids, D, P_mean: float = -1.2, P_std: float = 1.2, backend: str = "auto"):
    """(σ, s) float64 [B] of the training step, drawn on the device (reference.training_scalars)."""
    if not math.isfinite(P_mean):
        raise ValueError(f"P_mean must be finite, got {P_mean}")
    checks.check_positive("P_std", P_std)
    z = philox_normal(sample_ids, key, 1, R.STREAM_SIGMA, backend=backend)[:, 0].to(torch.float64)
    sigma = torch.exp(P_mean + P_std * z)
    return sigma, noise_scale(sigma, D, key, sample_ids, backend=backend)


def _check_common(y, key, D, sample_ids, name="y"):
    checks.check_images(name, y)
    sample_ids = checks.check_sample_ids(sample_ids, device=y.device)
    checks.check_images(name, y, batch=sample_ids.shape[0])
    return checks.check_key(key), checks.check_D(D), sample_ids


def perturb(y: Tensor, sigma, D, key, sample_ids, backend: str = "auto") -> Tensor:
    """x = y + σ·√(D/V)·g in one fused pass (reference.perturb); y's dtype and memory format."""
    key, D, sample_ids = _check_common(y, key, D, sample_ids)
    sigma = checks.check_sigma(sigma, y.shape[0], y.device, torch.float64)
    cd = _compute_dtype(y)
    s = noise_scale(sigma, D, key, sample_ids, backend=backend).to(cd)
    ones = torch.ones_like(s)
    x, _ = perturb_op(y, s, ones, sample_ids, key, R.STREAM_NOISE, y.dtype, _is_channels_last(y),
                      False, backend=backend)
    return x


def perturb_net_input(y: Tensor, sigma, D, key, sample_ids, sigma_data: float = 0.5,
                      out_dtype=torch.float32, channels_last: bool = False, write_x: bool = False,
                      backend: str = "auto"):
    """The fused network input c_in(σ)·x (and x in fp32/fp64 when write_x) in one pass."""
    key, D, sample_ids = _check_common(y, key, D, sample_ids)
    if out_dtype not in NET_DTYPES:
        raise TypeError(f"out_dtype must be one of {NET_DTYPES}, got {out_dtype}")
    sigma = checks.check_sigma(sigma, y.shape[0], y.device, torch.float64)
    cd = _compute_dtype(y)
    s = noise_scale(sigma, D, key, sample_ids, backend=backend).to(cd)
    c_in = R.precond(sigma, sigma_data)[2].to(cd)
    return perturb_op(y, s, c_in, sample_ids, key, R.STREAM_NOISE, out_dtype, channels_last,
                      write_x, backend=backend)


def prior(shape, D, sigma_max, key, seeds, dtype=torch.float32, device=None, backend: str = "auto"):
    """Latents σ_max·√(D/V)·g (reference.prior), generated on the device."""
    shape = tuple(int(s) for s in shape)
    seeds = checks.check_sample_ids(seeds, name="seeds", device=device)
    if len(shape) < 2 or shape[0] != seeds.shape[0]:
        raise ValueError(f"shape must be [B, ...] with B = len(seeds) = {seeds.shape[0]}, got {shape}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    sigma_max = checks.check_positive("sigma_max", sigma_max)
    key, D = checks.check_key(key), checks.check_D(D)
    sigma = torch.full((shape[0],), sigma_max, dtype=torch.float64, device=seeds.device)
    s = noise_scale(sigma, D, key, seeds, backend=backend).to(dtype)
    g = philox_normal(seeds, key, math.prod(shape[1:]), R.STREAM_NOISE, backend=backend).to(dtype)
    return (s.view(-1, 1) * g).view(shape)
