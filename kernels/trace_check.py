"""Trace the Triton ops the way torch.compile does on a GPU, without one.

The training objective (σ and χ² draws, perturb, a small network, the fused loss, which
computes dL/dF in its forward) and one sampler step run under torch.compile(fullgraph=True) on fake CUDA tensors,
through AOTAutograd, which decomposes each `pfgmpp_fast_triton` op into its Triton kernel
launches — what Inductor receives on a GPU.  Nothing requires grad: autograd's engine needs
a CUDA driver for CUDA tensors, and the loss's backward launches no kernel.  When no GPU driver is present, Triton is given
an sm_<arch> target so torch's mutation analysis can build each kernel's TTIR.  For every
kernel launch in the traced graphs this reports the arguments torch believes the kernel
writes (it clones those) and any constexpr Inductor could not write into generated code.
Run it *without* TRITON_INTERPRET:

    python -m pfgmpp_fast.kernels.trace_check [--arch 90] [--json]

Exit status 0 when every objective traces without a graph break, every kernel's TTIR is
analysed and only its output buffers count as written, 1 otherwise.
"""

import argparse
import json
import logging
import os
import sys

# The arguments each kernel writes (its outputs); anything else torch sees written is cloned.
OUTPUTS = {
    "_philox_normal_kernel": {"out_ptr"},
    "_chi2_kernel": {"out_ptr"},
    "_perturb_kernel": {"net_ptr", "x_ptr"},
    "_loss_kernel": {"grad_ptr", "part_ptr"},
    "_sampler_kernel": {"y1_ptr", "y2_ptr", "net_ptr"},
}


class _TargetOnly:
    """A Triton driver that only names a compile target (no device to launch on)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target


def _ensure_target(arch: int):
    from triton.runtime import driver

    try:
        driver.active.get_current_target()
    except RuntimeError:  # no GPU driver on this machine
        driver.set_active(_TargetOnly(arch))


def _objectives():
    """(name, run) pairs; run() builds fake CUDA inputs and calls the compiled function."""
    import torch
    from torch import nn

    from pfgmpp_fast import ops
    from pfgmpp_fast import reference as R
    from pfgmpp_fast.loss import training_loss

    class TinyPrecond(nn.Module):  # an EDMPrecond-like network: raw() and sigma_data
        sigma_data = 0.5

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1, device="cuda").requires_grad_(False)

        def raw(self, x_in, c_noise, class_labels=None, augment_labels=None):
            return self.conv(x_in.to(torch.float32)) * c_noise.view(-1, 1, 1, 1)

    def training():
        net = TinyPrecond()
        y = torch.randn(4, 3, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)

        def objective(y, ids):
            return training_loss(net, y, 128.0, 7, ids, backend="triton", net_dtype=torch.bfloat16)

        return objective, (y, torch.arange(4, device="cuda"))

    def sampler_step():
        x, base = torch.randn(2, 3, 8, 8, device="cuda"), torch.randn(2, 3, 8, 8, device="cuda")
        F = torch.randn(2, 3, 8, 8, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        ids = torch.arange(2, device="cuda")

        def step(x, F, base, ids):
            return ops.sampler_update(
                x,
                F,
                base,
                0.4,
                -1.1,
                0.3,
                0.15,
                ids,
                7,
                0.2,
                R.stream_alpha(3),
                0.5,
                R.stream_churn(3),
                0.8,
                torch.bfloat16,
                True,
                backend="triton",
            )

        return step, (x, F, base, ids)

    return [("training loss", training), ("sampler step", sampler_step)]


def _kernel_calls(graphs, objective: str):
    """One dict per Triton kernel launch in the traced graphs."""
    import triton.language as tl
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    calls = []
    for gm in graphs:
        for node in gm.graph.nodes:
            if "triton_kernel_wrapper" not in str(node.target):
                continue
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            kernel = getattr(kernel, "fn", kernel)  # torch wraps a launch's num_warps in an Autotuner
            constants = kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"])
            constexprs = {p.name for p in kernel.params if p.is_constexpr}
            not_scalar = {
                k: repr(v)
                for k, v in constants.items()
                if k in constexprs and (isinstance(v, tl.dtype) or not isinstance(v, (bool, int, float, type(None))))
            }
            calls.append(
                dict(
                    objective=objective,
                    kernel=kernel.__name__,
                    writes=sorted(node.kwargs.get("tensors_to_clone", [])),
                    non_scalar_constexprs=not_scalar,
                )
            )
    return calls


def check_all(arch: int):
    """(kernel launch dicts, errors): traces each objective under FakeTensorMode."""
    import torch
    from torch._dynamo.backends.common import aot_autograd
    from torch._subclasses.fake_tensor import FakeTensorMode

    import pfgmpp_fast.kernels  # noqa: F401  (registers the ops)

    _ensure_target(arch)
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").addHandler(handler)
    calls, errors = [], []
    for name, build in _objectives():
        graphs = []

        def record(gm, example_inputs):
            graphs.append(gm)
            return gm

        torch._dynamo.reset()
        try:
            with FakeTensorMode():
                fn, inputs = build()
                torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=record))(*inputs)
        except Exception as exc:  # a graph break under fullgraph, a schema or tracing error
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        calls += _kernel_calls(graphs, name)
    errors += [f"mutation analysis: {w}" for w in warnings]
    return calls, errors


def failures(call: dict) -> list:
    out = []
    extra = set(call["writes"]) - OUTPUTS.get(call["kernel"], set())
    if extra:
        out.append(f"torch treats {sorted(extra)} as written (cloned on every call)")
    if call["non_scalar_constexprs"]:
        out.append(f"constexprs Inductor cannot write into generated code: {call['non_scalar_constexprs']}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET to trace (the interpreter's kernels are not traceable)", file=sys.stderr)
        return 2
    calls, errors = check_all(args.arch)
    failed = bool(errors) or any(failures(c) for c in calls)
    if args.json:
        print(json.dumps(dict(calls=calls, errors=errors)))
    else:
        for e in errors:
            print(f"FAIL {e}")
        for c in calls:
            bad = failures(c)
            print(f"{'FAIL' if bad else 'OK  '} {c['objective']:14s} {c['kernel']:22s} writes {c['writes']}")
            for b in bad:
                print(f"     {b}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
