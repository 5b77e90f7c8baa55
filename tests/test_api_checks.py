"""The public API checks its arguments once at the boundary and reports NaN/Inf (docs/DESIGN.md §7):
perturb, training_loss, sample and generate_images; sampling keeps no autograd graph."""

import re
import sys
import warnings

import pytest
import torch
from helpers import tiny_net
from torch import nn

import pfgmpp_fast as pf
from pfgmpp_fast import checks, ops
from pfgmpp_fast import reference as R
from pfgmpp_fast.evaluation import generate as G

BACKENDS = (
    ["reference"]
    + (["cpu"] if ops.has_extension() else [])
    + (["triton"] if ops.triton_available(torch.device("cpu")) else [])
)


class Plain(nn.Module):
    """A plain denoiser x -> a·x; `poison` = (call index, value) writes value into sample 1."""

    def __init__(self, poison=None, D=8.0):
        super().__init__()
        self.a, self.poison, self.calls, self.D = nn.Parameter(torch.tensor(0.5)), poison, 0, D

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        out = self.a * x
        if self.poison is not None and self.calls == self.poison[0]:
            out = out.clone()
            out[1] = self.poison[1]
        self.calls += 1
        return out


class PoisonedPrecond(nn.Module):
    """EDMPrecond-like (raw + sigma_data) whose raw output is poisoned at one call."""

    def __init__(self, poison, D=8.0):
        super().__init__()
        self.sigma_data, self.D, self.poison, self.calls = 0.5, D, poison, 0
        self.conv = nn.Conv2d(1, 1, 1)

    def raw(self, x_in, c_noise, class_labels=None, augment_labels=None):
        out = self.conv(x_in.float())
        if self.calls == self.poison[0]:
            out = out.clone()
            out[1] = self.poison[1]
        self.calls += 1
        return out


# ------------------------------------------------------------------------------------ checks once


def _count_check_D(monkeypatch):
    calls = []
    original = checks.check_D

    def counting(D):
        calls.append(D)
        return original(D)

    monkeypatch.setattr(checks, "check_D", counting)
    return calls


def test_generate_images_checks_D_once(monkeypatch):
    calls = _count_check_D(monkeypatch)
    out = list(G.generate_images(Plain(), [0, 1, 2, 3, 4], batch_size=2, num_steps=2, image_shape=(1, 4, 4)))
    assert len(out) == 3 and len(calls) == 1


def test_pfgmpp_loss_checks_D_at_construction_only(monkeypatch):
    calls = _count_check_D(monkeypatch)
    loss = pf.PFGMPPLoss(D=8)
    for step in range(3):
        loss(Plain(), torch.randn(2, 1, 4, 4), 0, torch.arange(2 * step, 2 * step + 2))
    assert len(calls) == 1
    with pytest.raises(ValueError, match="network was trained with D=16"):
        loss(Plain(D=16.0), torch.randn(2, 1, 4, 4), 0, torch.arange(2))


@pytest.mark.parametrize("api", ["perturb", "prior", "training_loss", "sample", "ref_perturb", "ref_sample"])
def test_public_functions_check_D_once(monkeypatch, api):
    y, ids = torch.randn(2, 1, 4, 4), torch.arange(2)
    calls = _count_check_D(monkeypatch)
    if api == "perturb":
        pf.perturb(y, 1.0, 8, 0, ids)
    elif api == "prior":
        pf.prior((2, 1, 4, 4), 8, 80.0, 0, ids)
    elif api == "training_loss":
        pf.training_loss(Plain(), y, 8, 0, ids)
    elif api == "sample":
        pf.sample(Plain(), y, 8, 0, ids, num_steps=3)
    elif api == "ref_perturb":
        R.perturb(y, 1.0, 8, 0, ids)
    else:
        R.sample(Plain(), y, 8, 0, ids, num_steps=3)
    assert len(calls) == 1


# ------------------------------------------------------------------------------------ bad arguments


def test_D_true_and_mismatch_and_negative_ids_and_huge_sigma():
    y, ids = torch.randn(2, 1, 4, 4), torch.arange(2)
    with pytest.raises(TypeError, match="D must be a number.*bool"):
        pf.perturb(y, 1.0, True, 0, ids)
    with pytest.raises(TypeError, match="bool"):
        pf.sample(Plain(), y, True, 0, ids)
    with pytest.raises(ValueError, match=r"D=16 was given but the network was trained with D=8"):
        pf.training_loss(Plain(D=8.0), y, 16, 0, ids)
    with pytest.raises(ValueError, match=r"D=16 was given but the network was trained with D=8"):
        pf.sample(tiny_net(D=8.0), torch.randn(2, 1, 8, 8), 16, 0, ids, num_steps=2)
    with pytest.raises(ValueError, match=r"sample_ids must be in \[0, 2\^63\), got -3"):
        pf.perturb(y, 1.0, 8, 0, torch.tensor([0, -3]))
    with pytest.raises(ValueError, match=r"seeds must be in \[0, 2\^63\)"):
        pf.sample(Plain(), y, 8, 0, torch.tensor([-1, 2]), num_steps=2)
    with pytest.raises(ValueError, match=r"sigma must be in \(0, 1e\+30\], got 1e\+300"):
        pf.perturb(y, 1e300, 8, 0, ids)
    with pytest.raises(ValueError, match=r"sigma must be in \(0, 1e\+30\]"):
        R.perturb(y, torch.tensor([1.0, 1e31]), 8, 0, ids)
    with pytest.raises(ValueError, match=r"sigma_max must be in \(0, 1e\+30\]"):
        pf.prior((2, 1, 4, 4), 8, 1e300, 0, ids)
    assert checks.MAX_SIGMA == R.MAX_SCALE


def test_device_report_reads_negative_ids_once():
    report = checks.DeviceReport()
    report.add(torch.tensor([-1, -1, 3]), lambda rows, values: f"rows {rows} steps {values}")
    with pytest.raises(FloatingPointError, match=r"rows \[2\] steps \[3\]"):
        report.raise_if_any()
    checks.DeviceReport().raise_if_any()  # nothing to read: no error


# ------------------------------------------------------------------------------------ NaN / Inf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["perturb", "perturb_net_input"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0.0, 1e31])
def test_perturb_reports_sigma_out_of_range_with_its_value(backend, fn, bad):
    y = torch.randn(3, 1, 4, 4)
    with pytest.raises(ValueError, match=rf"sigma must be in \(0, 1e\+30\], got {re.escape(repr(bad))}"):
        getattr(pf, fn)(y, torch.tensor([0.5, bad, bad], dtype=torch.float64), 8, 0, torch.arange(3), backend=backend)
    y[0, 0, 0, 0] = float("nan")  # σ is checked first
    with pytest.raises(ValueError, match=r"sigma must be in"):
        getattr(pf, fn)(y, bad, 8, 0, torch.arange(3), backend=backend)


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def _count_host_reads(monkeypatch):
    """Every read of tensor values by the host (a device sync on a GPU), by the function that
    made it."""
    reads = []
    for name in HOST_READS:

        def counting(self, *args, _original=getattr(torch.Tensor, name), **kwargs):
            reads.append(sys._getframe(1).f_code.co_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return reads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["perturb", "perturb_net_input"])
def test_perturb_reads_the_device_once(backend, fn, monkeypatch):
    """σ's range, negative ids and NaN/Inf in y are checked on the device and read together:
    one host sync per call (σ's range used to be a read of its own)."""
    y, sigma, ids = torch.randn(3, 1, 4, 4), torch.tensor([0.5, 1.0, 80.0]), torch.arange(3)
    reads = _count_host_reads(monkeypatch)
    getattr(pf, fn)(y, sigma, 8, 0, ids, backend=backend)
    getattr(pf, fn)(y, 2.0, 8, 0, ids, backend=backend)
    # check_sample_ids reads the ids' sign on the host only when they are host tensors (free there)
    assert [r for r in reads if r != "check_sample_ids"] == ["raise_if_any"] * 2, reads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_perturb_reports_nonfinite_y(backend, bad):
    y = torch.randn(3, 1, 4, 4)
    y[2, 0, 1, 1] = bad
    with pytest.raises(FloatingPointError, match=r"y contains NaN/Inf for sample_ids \[12\]"):
        pf.perturb(y, 1.0, 8, 0, torch.tensor([10, 11, 12]), backend=backend)
    with pytest.raises(FloatingPointError, match=r"y contains NaN/Inf"):
        pf.perturb_net_input(y, 1.0, 8, 0, torch.arange(3), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_loss_reports_nan_in_y(backend):
    y = torch.randn(3, 1, 8, 8)
    y[1, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"y contains NaN/Inf for sample_ids \[5\]"):
        pf.training_loss(tiny_net(), y, 8.0, 0, torch.tensor([4, 5, 6]), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("net_kind", ["precond", "plain"])
def test_training_loss_reports_a_network_returning_nan(backend, net_kind):
    net = PoisonedPrecond((0, float("nan"))) if net_kind == "precond" else Plain((0, float("nan")))
    with pytest.raises(FloatingPointError, match=r"network output contains NaN/Inf for sample_ids \[8\]"):
        pf.training_loss(net, torch.randn(3, 1, 4, 4), 8.0, 0, torch.tensor([7, 8, 9]), backend=backend)


@pytest.mark.parametrize("D", [1e-6, 1e-4, 1e-3, 0.01, 0.05, 0.1])
def test_training_loss_small_D_is_reported_with_its_reason(D):
    """For D ≤ 0.1 the Student-t noise overflows the loss (it has infinite variance for D ≤ 2):
    never a silent NaN, an error naming D and the noise scale."""
    y = torch.rand(64, 1, 8, 8) * 2 - 1
    with pytest.raises(FloatingPointError, match=rf"D={D:g} the noise scale .* reaches .*use a larger D"):
        pf.training_loss(tiny_net(D=D), y, D, 0, torch.arange(64))


def test_training_loss_check_finite_false_returns_the_value():
    """The training loop counts non-finite steps on the device itself (no host read)."""
    y = torch.randn(3, 1, 4, 4)
    y[0, 0, 0, 0] = float("nan")
    loss = pf.training_loss(Plain(), y, 8.0, 0, torch.arange(3), check_finite=False)
    assert not torch.isfinite(loss)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sample_reports_nonfinite_latents(bad):
    latents = torch.randn(3, 1, 4, 4) * 80
    latents[0, 0, 2, 2] = bad
    with pytest.raises(FloatingPointError, match=r"latents contains NaN/Inf for seeds \[20\]"):
        pf.sample(Plain(), latents, 8, 0, torch.tensor([20, 21, 22]), num_steps=3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("call,step", [(0, 0), (3, 1), (4, 2)])  # Heun, 3 steps: calls 0,1 | 2,3 | 4
@pytest.mark.parametrize("net_kind", ["precond", "plain"])
def test_sample_reports_a_network_returning_nonfinite_at_its_step(bad, call, step, net_kind):
    net = PoisonedPrecond((call, bad)) if net_kind == "precond" else Plain((call, bad))
    latents = torch.randn(3, 1, 4, 4) * 80
    with pytest.raises(
        FloatingPointError, match=rf"network returned NaN/Inf for seeds \[31\] \(first at step \[{step}\]"
    ):
        pf.sample(net, latents, 8, 0, torch.tensor([30, 31, 32]), num_steps=3)


class OneBadElement(nn.Module):
    """A plain denoiser x -> x/2 that writes `value` into one element of one sample at the
    calls given as {call index: (sample, flat element index)}."""

    def __init__(self, value, where):
        super().__init__()
        self.value, self.where, self.calls, self.D = value, where, 0, 8.0

    def forward(self, x, sigma, class_labels=None):
        out = x * 0.5
        if self.calls in self.where:
            row, element = self.where[self.calls]
            out[row].view(-1)[element] = self.value
        self.calls += 1
        return out


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("solver", ["heun", "euler", "dpmpp2m", "ipndm"])
def test_sample_reports_one_nonfinite_element_per_seed_at_its_first_step(bad, solver):
    """A single NaN/±Inf element anywhere in a sample's network output is caught, per seed, at
    the first step it appeared in (Heun: calls 0,1 | 2,3 | 4,5 | 6; else one call per step)."""
    calls = {"heun": (1, 4, 6)}.get(solver, (0, 2, 3))
    where = {calls[0]: (2, 47), calls[1]: (0, 0), calls[2]: (2, 5)}  # seed 22 twice: its first step counts
    net = OneBadElement(bad, where)
    with pytest.raises(FloatingPointError, match=r"seeds \[20, 22\] \(first at step \[0, 2\] of steps 0..3\)"):
        pf.sample(net, torch.randn(3, 3, 4, 4) * 80, 8, 0, torch.tensor([20, 21, 22]), num_steps=4, solver=solver)


def test_sample_reads_the_flags_once_not_per_step(monkeypatch):
    """The NaN/Inf flags stay on the device during the loop: one read (.cpu()) per call."""
    reads = []
    original = checks.DeviceReport.raise_if_any
    monkeypatch.setattr(checks.DeviceReport, "raise_if_any", lambda self: (reads.append(1), original(self))[1])
    pf.sample(Plain(), torch.randn(2, 1, 4, 4), 8, 0, torch.arange(2), num_steps=6)
    assert len(reads) == 1


# ------------------------------------------------------------------------------------ no graph


def test_sample_keeps_no_autograd_graph_unless_asked():
    net = tiny_net()
    assert all(p.requires_grad for p in net.parameters())
    latents = pf.prior((2, 1, 8, 8), 8.0, 80.0, 0, torch.arange(2))
    x = pf.sample(net, latents, 8.0, 0, torch.arange(2), num_steps=3)
    assert not x.requires_grad and x.grad_fn is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "autograd kernel was not registered" on the way back
        x_grad = pf.sample(net, latents, 8.0, 0, torch.arange(2), num_steps=3, requires_grad=True)
        assert x_grad.requires_grad
        x_grad.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)
    assert torch.allclose(x_grad.detach(), x, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_reports_from_one_device_read(backend, monkeypatch):
    """On CUDA, negative ids and NaN/Inf are flagged on the device and read once per call."""
    if backend == "cuda" and not ops.has_cuda_kernels():
        pytest.skip("built without the CUDA kernels")
    dev = torch.device("cuda")
    y = torch.randn(3, 1, 4, 4, device=dev)
    with pytest.raises(ValueError, match=r"sample_ids must be in \[0, 2\^63\), got \[-2\]"):
        pf.perturb(y, 1.0, 8, 0, torch.tensor([0, -2, 1], device=dev), backend=backend)
    with pytest.raises(ValueError, match=r"seeds must be in \[0, 2\^63\)"):
        pf.prior((3, 1, 4, 4), 8, 80.0, 0, torch.tensor([0, -2, 1], device=dev), backend=backend)
    y[1, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"y contains NaN/Inf for sample_ids \[11\]"):
        pf.perturb(y, 1.0, 8, 0, torch.tensor([10, 11, 12], device=dev), backend=backend)
    net = Plain((3, float("inf"))).to(dev)
    reads = []
    original = checks.DeviceReport.raise_if_any
    monkeypatch.setattr(checks.DeviceReport, "raise_if_any", lambda self: (reads.append(1), original(self))[1])
    with pytest.raises(FloatingPointError, match=r"seeds \[31\] \(first at step \[1\]"):
        pf.sample(
            net,
            torch.randn(3, 1, 4, 4, device=dev) * 80,
            8,
            0,
            torch.tensor([30, 31, 32], device=dev),
            num_steps=3,
            backend=backend,
        )
    assert len(reads) == 1
