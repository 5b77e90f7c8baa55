"""Post-training weight quantisation (pfgmpp_fast/quantize.py)."""

import pytest
import torch
from helpers import tiny_net

from pfgmpp_fast.evaluation import quantize as Q


def test_bits32_is_identity_and_a_copy():
    net = tiny_net()
    q = Q.quantize_network(net, 32)
    assert q is not net
    for (n1, p1), (n2, p2) in zip(net.state_dict().items(), q.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
        assert p1.data_ptr() != p2.data_ptr()


def test_bits4_levels_per_channel_and_other_params_untouched():
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    q = Q.quantize_network(net, 4)
    for k, v in net.state_dict().items():  # the original is not modified
        assert torch.equal(v, before[k])
    weights = dict(Q.quantizable_weights(q))
    assert len(weights) >= 5
    changed = 0
    for name, p in q.named_parameters():
        orig = dict(net.named_parameters())[name]
        if name in weights:
            flat = p.detach().reshape(p.shape[0], -1)
            for row, orow in zip(flat, orig.detach().reshape(p.shape[0], -1)):
                assert torch.unique(row).numel() <= 16
                # symmetric grid: the channel's largest magnitude is kept exactly
                assert torch.allclose(row.abs().max(), orow.abs().max(), rtol=1e-6)
            changed += int(not torch.equal(p, orig))
        else:
            assert torch.equal(p, orig), name  # biases, norms, 1-D params
    assert changed == len(weights)


def test_error_shrinks_with_bits_and_grid_is_exact():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 5, 3, 3, generator=g)
    w[2] = 0.0  # an all-zero channel stays zero
    errors = []
    for bits in (2, 3, 4, 6, 8, 12, 16):
        q = Q.quantize_tensor(w, bits)
        assert q.dtype == w.dtype and q.shape == w.shape
        assert torch.equal(q[2], torch.zeros_like(q[2]))
        qmax = 2 ** (bits - 1) - 1
        scale = w.reshape(6, -1).abs().amax(1).clamp(min=1e-30) / qmax
        k = q.reshape(6, -1).double() / scale.double().view(-1, 1)
        assert torch.allclose(k, k.round(), atol=1e-3)  # integer multiples of the scale
        assert k.abs().max() <= qmax + 1e-3
        errors.append(float((q - w).norm() / w.norm()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4


def test_linear_module_and_state_dict_helper():
    lin = torch.nn.Linear(7, 3)
    sd = Q.quantized_state_dict(lin, 3)
    assert list(sd) == ["weight"]
    for row in sd["weight"]:
        assert torch.unique(row).numel() <= 7


@pytest.mark.parametrize("bits", [1, 33, 0, 4.0, True])
def test_bad_bits(bits):
    with pytest.raises((ValueError, TypeError), match="bits"):
        Q.quantize_network(torch.nn.Linear(2, 2), bits)
