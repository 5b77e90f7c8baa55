"""Compile the Triton kernels for a CUDA target without a GPU, exactly as the launchers call them.

Each launcher (perturb, loss_fwd_bwd, sampler_update, chi2, philox*) runs on small CPU tensors
with its kernel launch recorded instead of executed; the recorded call goes through Triton's
own argument specialisation (so `do_not_specialize` and 16-byte alignment count as at run
time) and is compiled to PTX and cubin for sm_<arch>.  For each variant this reports:
accurate log/sin/cos (the interpreter never shows an approximate lowering), the widest
global load and store in bits (128 = the 16-byte accesses aligned sizes should get), the
narrowest global store, the 16-bit scalar global accesses (unvectorised bf16/fp16), the
floating-point divisions (div.full.f32 is Triton's approximate fp32 division, within 2 ulp:
docs/DESIGN.md §6) and the registers / spills / stack of the cubin.  Run it *without* TRITON_INTERPRET:

    python -m pfgmpp_fast.kernels.aot_check [--arch 90] [--json]

Exit status 0 when every variant compiles with accurate math and no spills, 1 on a failure,
3 when this Triton's ahead-of-time API is not the one this check drives (nothing checked).
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

APPROX = ("lg2.approx", "sin.approx", "cos.approx")


class AotUnavailable(Exception):
    """This Triton's ahead-of-time compile API differs from the one driven here."""


@contextlib.contextmanager
def _recording(modules, calls):
    """`launch(kernel)[grid](*args, **kw)` in `modules` records instead of launching."""

    class launch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append((self.kernel, grid, args, kw))

    saved = {m: m.launch for m in modules}
    for m in modules:
        m.launch = launch
    try:
        yield
    finally:
        for m, f in saved.items():
            m.launch = f


def _variants():
    """(name, callable running one launcher on CPU tensors): CIFAR-sized, aligned samples."""
    import torch

    from . import chi2, loss, perturb, philox, sampler_step

    B, shape = 2, (3, 32, 32)
    ids = torch.arange(B)
    img = lambda dtype, cl=False: torch.zeros(B, *shape, dtype=dtype).contiguous(  # noqa: E731
        memory_format=torch.channels_last if cl else torch.contiguous_format
    )
    vec = lambda dtype=torch.float32: torch.ones(B, dtype=dtype)  # noqa: E731
    strided = torch.zeros(B, 3, 32, 65, dtype=torch.float64)[..., 1::2].transpose(2, 3)

    def sampler(state, F_cl, net_dtype, net_cl, base, h2, noise):
        x = img(state)
        return lambda: sampler_step.sampler_update(
            x,
            img(torch.bfloat16, F_cl),
            x.clone() if base else None,
            0.5,
            -0.5,
            0.1,
            0.05 if h2 else None,
            ids,
            7,
            0.3 * noise,
            0x20001,
            0.2 * noise,
            0x10001,
            1.5,
            net_dtype,
            net_cl,
        )

    return [
        (
            "perturb flat fp32",
            lambda: perturb.perturb(img(torch.float32), vec(), vec(), ids, 7, 0, torch.bfloat16, False, True),
        ),
        (
            "perturb tiled fp32",
            lambda: perturb.perturb(img(torch.float32), vec(), vec(), ids, 7, 0, torch.bfloat16, True, False),
        ),
        (
            "perturb tiled fp32 out",
            lambda: perturb.perturb(img(torch.float32), vec(), vec(), ids, 7, 0, torch.float32, True, True),
        ),
        (
            "perturb strided fp64",
            lambda: perturb.perturb(
                strided, vec(torch.float64), vec(torch.float64), ids, 7, 0, torch.bfloat16, True, True
            ),
        ),
        (
            "loss flat",
            lambda: loss.loss_fwd_bwd(img(torch.bfloat16), img(torch.float32), vec(), vec(), vec(), ids, 7, 0, 1.0),
        ),
        (
            "loss tiled",
            lambda: loss.loss_fwd_bwd(
                img(torch.bfloat16, True), img(torch.float32), vec(), vec(), vec(), ids, 7, 0, 1.0
            ),
        ),
        ("sampler heun-1 flat fp32", sampler(torch.float32, False, torch.float32, False, False, True, 0)),
        ("sampler heun-2+noise flat fp32", sampler(torch.float32, False, torch.float32, False, True, False, 1)),
        ("sampler heun-2+noise tiled fp32", sampler(torch.float32, True, torch.bfloat16, True, True, False, 1)),
        ("sampler heun-2+noise tiled fp64", sampler(torch.float64, True, torch.bfloat16, True, True, False, 1)),
        ("chi2", lambda: chi2.chi2(torch.arange(512), 7, 3.0, 2)),
        ("philox_normal", lambda: philox.philox_normal(ids, 7, 3072, 0)),
        ("philox_raw", lambda: philox.philox4x32(torch.zeros(512, 4, dtype=torch.int64), 7)),
    ], (chi2, loss, perturb, philox, sampler_step)


def compile_call(kernel, args, kwargs, target):
    """Compile one recorded launch through the JIT's own binder (its specialisation of the
    arguments: integers == 1 / % 16, pointers 16-byte aligned, unless do_not_specialize)."""
    import triton

    try:
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        src = ASTSource(kernel, signature, constexprs, attrs)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise AotUnavailable(f"{type(exc).__name__}: {exc}") from exc
    return triton.compile(src, target=target, options=options.__dict__)


def access_bits(ptx: str, op: str) -> list:
    """Widths in bits of every `op` (ld.global / st.global) access in the PTX."""
    return [
        int(vec or 1) * int(bits)
        for vec, bits in re.findall(op + r"(?:\.[a-z_0-9]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx)
    ]


def vector_bits(ptx: str, op: str) -> int:
    """Widest `op` access in the PTX, in bits (0 when none)."""
    return max(access_bits(ptx, op), default=0)


def resource_usage(cubin: bytes) -> dict:
    """Registers, spill bytes and stack frame of the cubin's kernel (cuobjdump -res-usage)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    field = lambda name: int(re.search(name + r":(\d+)", out).group(1))  # noqa: E731
    return dict(regs=field("REG"), stack=field("STACK"), local=field("LOCAL"))


def check_all(arch: int):
    """One result dict per variant (raises AotUnavailable if this Triton cannot be driven)."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    variants, modules = _variants()
    results = []
    for name, run in variants:
        calls = []
        with _recording(modules, calls):
            run()
        for kernel, grid, args, kwargs in calls:
            res = dict(
                name=name,
                kernel=kernel.__name__,
                num_warps=kwargs.get("num_warps", 4),
                meta={k: v for k, v in kwargs.items() if k in ("BLOCK", "C_PAD", "BLOCK_HW", "TILED")},
            )
            try:
                compiled = compile_call(kernel, args, kwargs, target)
            except AotUnavailable:
                raise
            except Exception as exc:  # report every failing variant
                res["error"] = f"{type(exc).__name__}: {exc}"
                results.append(res)
                continue
            ptx = compiled.asm["ptx"]
            res.update(
                approx=[i for i in APPROX if i in ptx],
                ld_bits=vector_bits(ptx, r"ld\.global"),
                st_bits=vector_bits(ptx, r"st\.global"),
                st_bits_min=min(access_bits(ptx, r"st\.global"), default=0),
                half_accesses=len(re.findall(r"(?:ld|st)\.global(?:\.[a-z_0-9]+)*?\.[bfu]16\b", ptx)),
                divisions=sorted(set(re.findall(r"\bdiv(?:\.[a-z]+)*\.f(?:32|64)\b", ptx))),
                **resource_usage(compiled.asm["cubin"]),
            )
            results.append(res)
    return results


def failures(res: dict) -> list:
    if "error" in res:
        return [res["error"]]
    out = []
    if res["approx"]:
        out.append(f"approximate math {res['approx']} (the spec needs accurate logf/sinf/cosf)")
    if res["local"]:
        out.append(f"{res['local']} bytes of local memory (register spills)")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--json", action="store_true", help="print the results as one JSON list")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    try:
        results = check_all(args.arch)
    except AotUnavailable as exc:
        print(f"SKIP: this Triton's ahead-of-time API differs ({exc})")
        return 3
    failed = 0
    for res in results:
        bad = failures(res)
        failed += bool(bad)
        if not args.json:
            usage = (
                ""
                if "error" in res
                else f"regs {res['regs']:3d} stack {res['stack']:3d} ld {res['ld_bits']:3d}b st {res['st_bits']:3d}b"
            )
            print(
                f"{'FAIL' if bad else 'OK  '} {res['name']:34s} warps {res['num_warps']} {usage}"
                + "".join(f"\n     {b}" for b in bad)
            )
    if args.json:
        print(json.dumps(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
