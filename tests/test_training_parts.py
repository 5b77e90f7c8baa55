"""The loop's parts, tested on their own: the learning-rate schedule and batch geometry
(training/schedule.py) and the EMAs behind one interface (training/ema.py)."""

import pytest
import torch

from pfgmpp_fast.training.ema import EMA, HalfLifeEMA, PowerFunctionEMA
from pfgmpp_fast.training.schedule import BatchGeometry, LearningRateSchedule

# ----------------------------------------------------------------------------------------
# Learning-rate schedule


def test_learning_rate_ramps_up_linearly_then_stays():
    schedule = LearningRateSchedule(lr=1e-3, rampup_kimg=10)
    assert schedule(0) == 0.0
    assert schedule(2500) == pytest.approx(2.5e-4, rel=1e-15)
    assert schedule(5000) == pytest.approx(5e-4, rel=1e-15)
    assert schedule(10_000) == schedule(10_001) == schedule(10**9) == 1e-3


@pytest.mark.parametrize("rampup", [None, 0, 0.0])
def test_no_rampup_means_the_full_rate_from_the_first_step(rampup):
    schedule = LearningRateSchedule(lr=2e-3, rampup_kimg=rampup)
    assert schedule(0) == schedule(512) == 2e-3


def test_apply_sets_every_parameter_group():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([{"params": [a]}, {"params": [b]}], lr=1.0)
    LearningRateSchedule(lr=1e-3, rampup_kimg=1).apply(optimizer, 250)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3 * 0.25] * 2


# ----------------------------------------------------------------------------------------
# Batch geometry


@pytest.mark.parametrize(
    "batch,batch_gpu,world,expected",
    [(512, None, 1, (512, 512, 1)), (512, None, 4, (128, 128, 1)), (512, 32, 2, (256, 32, 8)), (96, 8, 3, (32, 8, 4))],
)
def test_batch_geometry_splits_the_global_batch(batch, batch_gpu, world, expected):
    g = BatchGeometry.resolve(batch, batch_gpu, world)
    assert (g.per_rank, g.batch_gpu, g.rounds) == expected
    assert g.batch == batch and g.world_size == world and g.per_rank * world == batch == g.batch_gpu * g.rounds * world


def test_batch_geometry_refuses_uneven_splits():
    with pytest.raises(ValueError, match=r"batch \(10\) must be divisible by the number of ranks \(3\)"):
        BatchGeometry.resolve(10, None, 3)
    with pytest.raises(ValueError, match=r"must be a multiple of batch_gpu \(5\)"):
        BatchGeometry.resolve(32, 5, 2)


# ----------------------------------------------------------------------------------------
# EMAs


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()


def _train(net, averages, steps, batch, start=0, gen=None):
    """Random 'updates' of net's parameters (steps start+1 .. start+steps), each followed by the
    averages' update; returns the parameters after each step."""
    gen = gen or torch.Generator().manual_seed(1)
    params = list(net.parameters())
    history = []
    for step in range(start, start + steps):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        history.append([p.detach().clone() for p in params])
        for average in averages:
            average.update(params, (step + 1) * batch, batch)
    return history


@pytest.mark.parametrize("rampup_ratio", [None, 0.05, 0.5])
def test_half_life_ema_matches_the_plain_formula(rampup_ratio):
    """ema ← β·ema + (1−β)·θ with β = 0.5^(batch / h), h = min(half-life, ratio · images before the step)."""
    net, batch, halflife_kimg = _net(), 16, 0.1
    expected = [p.detach().clone() for p in net.parameters()]
    ema = HalfLifeEMA(net, halflife_kimg, rampup_ratio)
    history = _train(net, [ema], steps=30, batch=batch)
    for step, thetas in enumerate(history):
        h = halflife_kimg * 1000 if rampup_ratio is None else min(halflife_kimg * 1000, step * batch * rampup_ratio)
        beta = 0.5 ** (batch / max(h, 1e-8))
        expected = [beta * e + (1 - beta) * t for e, t in zip(expected, thetas)]
    for got, want in zip(ema.params, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if rampup_ratio is not None:  # the first step has no images before it: the EMA is the network
        assert ema.beta(batch, batch) == 0.0


def test_half_life_ema_is_a_separate_frozen_copy():
    net = _net()
    ema = HalfLifeEMA(net, 1.0)
    assert not ema.net.training and not any(p.requires_grad for p in ema.params)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(ema.params, net.parameters()))
    [(label, module)] = list(ema.networks())
    assert label == "ema" and module is ema.net


@pytest.mark.parametrize("kind", ["half-life", "power-function"])
def test_every_ema_continues_exactly_from_its_state(kind):
    """Through the shared interface: 12 steps in one go = 6 steps, state_dict, a new EMA that
    loads it, 6 more steps (bit for bit)."""

    def make(net):
        if kind == "half-life":
            return HalfLifeEMA(net, 0.05, 0.3)
        return PowerFunctionEMA((0.05, 0.1), list(net.parameters()), template=net, snap_kimg=1.0)

    net_a, net_b = _net(), _net()
    whole, first = make(net_a), make(net_b)
    assert isinstance(whole, EMA) and isinstance(first, EMA)
    _train(net_a, [whole], steps=12, batch=8)
    gen = torch.Generator().manual_seed(1)
    _train(net_b, [first], steps=6, batch=8, gen=gen)
    state = first.state_dict()
    assert _tensors(state) and all(t.device.type == "cpu" for t in _tensors(state))
    resumed = make(_net())  # a fresh EMA of a fresh network: only the state carries over
    resumed.load_state_dict(state)
    _train(net_b, [resumed], steps=6, batch=8, start=6, gen=gen)
    want, got = _tensors(whole.state_dict()), _tensors(resumed.state_dict())
    assert len(want) == len(got) and all(torch.equal(a, b) for a, b in zip(want, got))
    for (label_a, net_w), (label_r, net_r) in zip(whole.networks(), resumed.networks()):
        assert label_a == label_r
        assert all(torch.equal(a, b) for a, b in zip(net_w.parameters(), net_r.parameters()))


def test_power_function_networks_hold_each_profile():
    net = _net()
    tracker = PowerFunctionEMA((0.05, 0.2), list(net.parameters()), template=net, snap_kimg=1.0)
    _train(net, [tracker], steps=5, batch=4)
    labels = []
    for (label, module), ema in zip(tracker.networks(), tracker.emas):
        labels.append(label)
        assert all(torch.equal(p, e) for p, e in zip(module.parameters(), ema))
    assert labels == ["0.05", "0.2"] and not torch.equal(tracker.emas[0][0], tracker.emas[1][0])


def test_a_state_without_the_ema_is_refused():
    with pytest.raises(ValueError, match="has no EMA network"):
        HalfLifeEMA(_net(), 1.0).load_state_dict(None, "state.pt")
    with pytest.raises(ValueError, match=r"no power-function EMA for --phema \[0.05\]"):
        PowerFunctionEMA((0.05,), list(_net().parameters()), template=None, snap_kimg=1.0).load_state_dict(None)


def _tensors(state):
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


# ----------------------------------------------------------------------------------------
# The gradient check of a step (loss_module.flag_nonfinite_grads)


def _grads():
    """The gradients of a small conv net, one of them channels-last, as the loop keeps them."""
    from helpers import tiny_net

    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(p.shape, generator=gen) for p in tiny_net().parameters()]
    grads[0] = grads[0].contiguous(memory_format=torch.channels_last) if grads[0].dim() == 4 else grads[0]
    return grads


def test_the_gradient_check_makes_no_copy_of_the_gradients():
    """One foreach pass over the gradients in place (EDM's flatten-clean-copy-back moved every
    gradient three times: about 1 GB a step at CIFAR-10 size): no flattened buffer, no op per
    parameter."""
    from pfgmpp_fast.training.loss_module import flag_nonfinite_grads

    grads = _grads()
    before = [g.clone() for g in grads]
    found_inf = torch.zeros(())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        flag_nonfinite_grads(grads, found_inf)
    events = prof.events()
    top = sorted(e.name for e in events if e.cpu_parent is None and e.name != "[memory]")
    assert top == ["aten::_amp_foreach_non_finite_check_and_unscale_", "aten::ones"], top
    assert not {"aten::cat", "aten::nan_to_num_", "aten::_foreach_copy_"} & {e.name for e in events}
    allocated = sum(e.cpu_memory_usage for e in events if e.cpu_memory_usage > 0)
    assert allocated < 1024 < sum(g.numel() * g.element_size() for g in grads)
    assert float(found_inf) == 0.0
    assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(grads, before))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_gradient_check_finds_nonfinite_values_in_any_one_gradient(bad):
    from pfgmpp_fast.training.loss_module import flag_nonfinite_grads

    grads = _grads()
    for i, g in enumerate(grads):
        found_inf = torch.zeros(())
        poisoned = [x.clone() for x in grads]
        poisoned[i].view(-1)[(7 * i) % g.numel()] = bad
        flag_nonfinite_grads(poisoned, found_inf)
        assert float(found_inf) == 1.0, f"gradient {i} of {len(grads)}"
    found_inf = torch.ones(())  # a non-finite loss stays flagged when the gradients are fine
    flag_nonfinite_grads(grads, found_inf)
    assert float(found_inf) == 1.0
