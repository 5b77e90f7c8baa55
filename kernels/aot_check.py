"""Compile every Triton kernel for a CUDA target without a GPU (ASTSource -> ... -> cubin).

The CPU interpreter accepts Python the compiler rejects, and it never shows whether a math
function lowered to an approximate instruction; this check does both.  Run it in a process
*without* TRITON_INTERPRET:  python -m pfgmpp_fast.kernels.aot_check [--arch 90]
Exit status 0 when every variant compiles with accurate log / sin / cos.
"""
import argparse
import os
import sys


def _variants():
    import triton.language as tl

    from . import chi2, loss, perturb, philox, sampler_step

    i64 = "i64"
    strides = lambda *names: {f"{p}_{s}": i64 for p in names for s in ("sb", "sc", "sh", "sw")}  # noqa: E731
    out = []
    for tiled, ymode, nmode, comp in [(False, 0, 0, tl.float32), (True, 0, 1, tl.float32), (False, 2, 1, tl.float64)]:
        ptr = "*fp32" if comp == tl.float32 else "*fp64"
        sig = dict(y_ptr=ptr, scale_ptr=ptr, cin_ptr=ptr, sid_ptr="*i64", net_ptr="*bf16", x_ptr=ptr,
                   k0=i64, k1=i64, **strides("y", "n"))
        out.append((f"perturb tiled={tiled} y_mode={ymode} net_mode={nmode} {comp}", perturb._perturb_kernel, sig,
                    dict(Y_MODE=ymode, NET_MODE=nmode, WRITE_X=True, COMPUTE=comp, TILED=tiled, BLOCK=1024,
                         C_PAD=4, BLOCK_HW=256)))
    for tiled in (False, True):
        sig = dict(F_ptr="*bf16", y_ptr="*fp32", scale_ptr="*fp32", cskip_ptr="*fp32", cout_ptr="*fp32",
                   sid_ptr="*i64", grad_ptr="*bf16", part_ptr="*fp32", grad_scale="fp32", k0=i64, k1=i64,
                   **strides("f", "y", "g"))
        out.append((f"loss tiled={tiled}", loss._loss_kernel, sig,
                    dict(F_MODE=1, Y_MODE=0, G_MODE=1, COMPUTE=tl.float32, TILED=tiled, BLOCK=1024, C_PAD=4,
                         BLOCK_HW=256)))
    scalars = {f"{n}_{p}": "fp32" for n in ("A", "B", "h1", "h2", "as", "cs", "ci") for p in ("hi", "lo")}
    for tiled, comp in [(False, tl.float32), (True, tl.float32), (True, tl.float64)]:
        ptr = "*fp32" if comp == tl.float32 else "*fp64"
        sig = dict(x_ptr=ptr, F_ptr="*bf16", base_ptr=ptr, sid_ptr="*i64", y1_ptr=ptr, y2_ptr=ptr, net_ptr="*bf16",
                   k0=i64, k1=i64, **scalars, **strides("f", "n"))
        out.append((f"sampler tiled={tiled} {comp}", sampler_step._sampler_kernel, sig,
                    dict(HAS_F=True, HAS_BASE=True, HAS_Y2=True, HAS_NET=True, HAS_ALPHA=True, HAS_CHURN=True,
                         F_MODE=1, NET_MODE=1, COMPUTE=comp, TILED=tiled, BLOCK=1024, C_PAD=4, BLOCK_HW=256)))
    out.append(("chi2", chi2._chi2_kernel, dict(sid_ptr="*i64", out_ptr="*fp64", D_hi="fp32", D_lo="fp32",
                                                k0=i64, k1=i64), dict(BLOCK=256, ATTEMPTS=16)))
    out.append(("philox_normal", philox._philox_normal_kernel, dict(sid_ptr="*i64", out_ptr="*fp32", k0=i64, k1=i64),
                dict(BLOCK=1024)))
    out.append(("philox_raw", philox._philox_raw_kernel, dict(ctr_ptr="*i64", out_ptr="*i64", k0=i64, k1=i64),
                dict(BLOCK=256)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for name, fn, sig, constexprs in _variants():
        full = {a: sig.get(a, "i32") for a in fn.arg_names}
        full.update({k: "constexpr" for k in constexprs})
        try:
            src = ASTSource(fn=fn, signature=full,
                            constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        except TypeError as exc:  # another Triton version's ASTSource API: cannot check here
            print(f"SKIP: this Triton's ASTSource API differs ({exc})")
            return 3
        try:
            ptx = triton.compile(src, target=target, options={"num_warps": 4}).asm["ptx"]
        except Exception as exc:  # report every failing variant, then fail
            failures += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
            continue
        approx = [ins for ins in ("lg2.approx", "sin.approx", "cos.approx") if ins in ptx]
        if approx:
            failures += 1
            print(f"FAIL {name}: approximate math {approx} (the spec needs accurate logf/sinf/cosf)")
        else:
            print(f"OK   {name}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
