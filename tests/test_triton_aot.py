"""The Triton kernels as the GPU compiler sees them (no GPU needed), and how they are packaged.

kernels/aot_check.py compiles every launcher's real launch for sm_90 through Triton's own
argument specialisation; these tests hold its report to the code-quality bounds of issue 12
(accurate math, no spills, 16-byte accesses on aligned sizes, register counts per launch) and
issue 23 (channels-last stores, the fp32 division the tolerances assume).
kernels/trace_check.py traces the training objective and a sampler step with torch.compile
as on a GPU, on fake CUDA tensors (issue 23: Inductor over triton_op).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from pfgmpp_fast import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def aot_report():
    """One sm_90 compile of every variant (in a process without TRITON_INTERPRET)."""
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "pfgmpp_fast.kernels.aot_check", "--arch", "90", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())
    assert proc.stdout.strip(), proc.stderr
    report = {r["name"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    return proc.returncode, report, proc.stderr


def test_kernels_compile_for_sm90_with_accurate_math(aot_report):
    """The interpreter accepts code the Triton compiler rejects: every variant compiles for
    sm_90, log/sin/cos did not lower to approximate PTX, and nothing spills."""
    rc, report, stderr = aot_report
    assert {r["kernel"] for r in report.values()} == {
        "_perturb_kernel",
        "_loss_kernel",
        "_sampler_kernel",
        "_chi2_kernel",
        "_philox_normal_kernel",
        "_philox_raw_kernel",
    }
    for name, r in report.items():
        assert "error" not in r, f"{name}: {r.get('error')}"
        assert r["approx"] == [], f"{name}: approximate math {r['approx']}"
        assert r["local"] == 0, f"{name}: {r['local']} bytes of local memory (spills)"
        assert r["stack"] <= 32, f"{name}: {r['stack']}-byte stack frame (accurate sin/cos needs 32)"
    assert rc == 0, stderr


# Widest global load / store (bits) on CIFAR-sized contiguous operands: 128 = 4 fp32 per
# thread; the loss gradient is bf16, so its 4 elements per thread are one 64-bit store.
# With N in do_not_specialize these were 32-64 / 32 bits.
MIN_ACCESS_BITS = {
    "perturb flat fp32": (128, 128),
    "perturb tiled fp32": (128, 64),
    "perturb tiled fp32 out": (128, 128),
    "loss flat": (128, 64),
    "loss tiled": (128, 64),
    "sampler heun-1 flat fp32": (128, 128),
    "sampler heun-2+noise flat fp32": (128, 128),
    "sampler heun-2+noise tiled fp32": (128, 128),
    "philox_normal": (0, 128),
}


def test_aligned_sizes_get_128_bit_accesses(aot_report):
    _, report, _ = aot_report
    for name, (ld, st) in MIN_ACCESS_BITS.items():
        got = report[name]["ld_bits"], report[name]["st_bits"]
        assert got[0] >= ld and got[1] >= st, f"{name}: widest load/store {got} bits, want >= {(ld, st)}"


# Narrowest global store (bits) of the channels-last (tiled) launches, C = 3: a pixel quad's
# 12 channels-last elements move as three 4-element chunks, 64 bits in bf16, 128 in fp32 (the
# old tiles padded C to 4 and stored one 16-bit bf16 / 32-bit fp32 element per access, and
# loaded bf16 F the same way).  The loss also stores one 32-bit partial sum per program.
MIN_STORE_BITS = {
    "perturb tiled fp32": 64,
    "perturb tiled fp32 out": 128,
    "loss tiled": 32,
    "sampler heun-2+noise tiled fp32": 64,
    "sampler heun-2+noise tiled fp64": 64,
}


def test_channels_last_operands_move_in_vectors(aot_report):
    _, report, _ = aot_report
    for name, bits in MIN_STORE_BITS.items():
        r = report[name]
        assert r["half_accesses"] == 0, f"{name}: {r['half_accesses']} scalar 16-bit global loads/stores"
        assert r["st_bits_min"] >= bits, f"{name}: a {r['st_bits_min']}-bit global store, want >= {bits}"


def test_fp32_loss_divides_as_the_tolerances_assume(aot_report):
    """docs/DESIGN.md §6: Triton lowers the fp32 loss target's division to div.full.f32 (within
    2 ulp), not the exact div.rn.f32 of the interpreter and the C++ kernels; the fp64 χ²
    divides exactly.  If Triton's lowering changes, the documented bound must be revisited."""
    _, report, _ = aot_report
    for name in ("loss flat", "loss tiled"):
        assert report[name]["divisions"] == ["div.full.f32"], f"{name}: {report[name]['divisions']}"
    assert report["chi2"]["divisions"] == ["div.rn.f64"]
    others = [n for n, r in report.items() if r["divisions"] and not n.startswith(("loss", "chi2"))]
    assert others == [], f"unexpected divisions in {others}"


def test_register_counts_of_the_chosen_launches(aot_report):
    """Warps per launch keep the fused fp32 kernels near half occupancy on sm_90 and every
    kernel within 128 registers.  `python -m pfgmpp_fast.kernels.aot_check` prints the counts."""
    _, report, _ = aot_report
    for name, r in report.items():
        limit = 72 if name.startswith(("perturb", "loss", "sampler")) and "fp64" not in name else 128
        assert r["regs"] <= limit, f"{name}: {r['regs']} registers with {r['num_warps']} warps, limit {limit}"


def test_compiled_objective_traces_to_the_triton_kernels_without_a_gpu():
    """torch.compile(fullgraph=True) of the training objective (σ, χ², perturb, a network, the
    fused loss) and of a sampler step, through AOTAutograd on fake CUDA tensors: no graph break,
    torch's mutation analysis reads every kernel's TTIR (sm_90) and counts only its outputs as
    written (the old kernels made it clone the sample ids), and every constexpr is a Python
    scalar Inductor can write into its generated code (the old ones passed a tl.dtype)."""
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "pfgmpp_fast.kernels.trace_check", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.stdout.strip(), proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == []
    from pfgmpp_fast.kernels.trace_check import OUTPUTS, failures

    assert {c["kernel"] for c in result["calls"]} == set(OUTPUTS)
    assert [(c["kernel"], failures(c)) for c in result["calls"] if failures(c)] == []
    assert proc.returncode == 0, proc.stderr


def test_philox_normal_rejects_n_beyond_its_32_bit_block_counter():
    """n is bounded by 2^34 (block e // 4 is one 32-bit counter word), as in the C++ op."""
    empty = torch.zeros(0, dtype=torch.int64)
    assert ops.philox_normal(1, empty, 2**34, 0, backend="triton").shape == (0, 2**34)
    for n in (2**34 + 1, -1):
        with pytest.raises(ValueError, match=r"n must be in \[0, 2\^34\], got " + str(n)):
            ops.philox_normal(1, empty, n, 0, backend="triton")


def test_grid_beyond_cuda_limit_fails_clearly():
    from pfgmpp_fast.kernels.layout import grid

    assert grid(3, 5) == (15,)
    with pytest.raises(ValueError, match=r"2\*\*31 - 1"):
        grid(2**20, 2**11)


def test_each_triton_op_is_registered_with_the_cpp_op_arguments():
    """Every kernel file registers its op and names its kernel (torch hashes its source into
    the AOTAutograd cache key); the argument names and types (optional ones included:
    `float?`, `Tensor?`) are those of the C++ ops."""
    import pfgmpp_fast.kernels  # noqa: F401

    kernels_of = getattr(torch._library.triton, "get_triton_kernels_for_op", None)  # not in every torch
    names = ("philox4x32", "philox_normal", "chi2", "perturb", "loss_fwd_bwd", "sampler_update")
    for name in names:
        if kernels_of is not None:
            assert len(kernels_of(f"pfgmpp_fast_triton::{name}")) == 1, name
        schema = getattr(torch.ops.pfgmpp_fast_triton, name).default._schema
        if ops.has_extension():
            cpp = getattr(torch.ops.pfgmpp_fast, name).default._schema
            assert [a.name for a in schema.arguments] == [a.name for a in cpp.arguments], name
            assert [str(a.type) for a in schema.arguments] == [str(a.type) for a in cpp.arguments], name


def test_kernels_ship_inside_the_package(tmp_path):
    """pfgmpp_fast.kernels comes from the symlink alone: a build copies the files under
    pfgmpp_fast/kernels and never installs a top-level `kernels` package."""
    import pfgmpp_fast.kernels as k

    assert os.path.realpath(os.path.dirname(k.__file__)) == os.path.join(os.path.realpath(ROOT), "kernels")
    assert "kernels" not in sys.modules
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    built = tmp_path / "pfgmpp_fast" / "kernels"
    assert (built / "layout.py").is_file() and not (built / "layout.py").is_symlink()
    assert not (tmp_path / "kernels").exists()
