"""Post-training weight quantisation (the PFGM++ paper's PTQ robustness experiment).

Symmetric, per-output-channel, uniform fake quantisation of the weights of every
convolution and linear layer: for a weight W with output channels along dim 0,

    scale_c = max_j |W[c, j...]| / (2^(b-1) - 1)
    W_q[c]  = clamp(round(W[c] / scale_c), -(2^(b-1) - 1), 2^(b-1) - 1) · scale_c

so every output channel holds at most 2^b - 1 distinct values (a zero channel stays zero).
Weights are stored back in their original dtype ("fake quant": the network still runs in
floating point, only the weight values are restricted). Biases, normalisation parameters
and embeddings stay as they are. bits >= 32 is the identity (weights are already float32).

Which tensors count as conv/linear weights: parameters named ``weight`` with >= 2
dimensions (that covers torch.nn.Conv*/Linear and the EDM networks' own Conv2d/Linear
modules, whose parameters are also called ``weight``; GroupNorm weights are 1-D).
"""

from __future__ import annotations

import copy
from typing import Dict, Iterator, Tuple

import torch

__all__ = ["quantize_tensor", "quantizable_weights", "quantize_network", "quantized_state_dict"]

MAX_BITS = 32


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int in [2, {MAX_BITS}], got {bits!r}")
    if not 2 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [2, {MAX_BITS}] (1 bit has no symmetric grid), got {bits}")
    return bits


def quantize_tensor(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantised copy of `weight` (per output channel = dim 0), same dtype and shape."""
    bits = _check_bits(bits)
    if not torch.is_tensor(weight) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {type(weight).__name__}")
    if weight.dim() < 1:
        raise ValueError("weight must have at least one dimension (output channels first)")
    if bits >= MAX_BITS:
        return weight.detach().clone()
    qmax = float(2 ** (bits - 1) - 1)
    w = weight.detach().to(torch.float64)
    flat = w.reshape(w.shape[0], -1)
    scale = flat.abs().amax(dim=1) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero channel stays zero
    q = torch.round(flat / safe.view(-1, 1)).clamp(-qmax, qmax) * safe.view(-1, 1)
    return q.view(w.shape).to(weight.dtype)


def quantizable_weights(net: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every conv/linear weight of `net` (see the module docstring)."""
    for name, p in net.named_parameters():
        if name.rsplit(".", 1)[-1] == "weight" and p.dim() >= 2:
            yield name, p


def quantized_state_dict(net: torch.nn.Module, bits: int) -> Dict[str, torch.Tensor]:
    """{name: fake-quantised weight} for every conv/linear weight (to copy into a network
    in place, e.g. a compiled one that must not be rebuilt)."""
    bits = _check_bits(bits)
    return {name: quantize_tensor(p, bits) for name, p in quantizable_weights(net)}


def quantize_network(net: torch.nn.Module, bits: int) -> torch.nn.Module:
    """A deep copy of `net` whose conv/linear weights are fake-quantised to `bits` bits."""
    bits = _check_bits(bits)
    if not isinstance(net, torch.nn.Module):
        raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
    out = copy.deepcopy(net)
    with torch.no_grad():
        for _, p in quantizable_weights(out):
            p.copy_(quantize_tensor(p, bits))
    return out
