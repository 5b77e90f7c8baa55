"""The Triton kernels as the GPU compiler sees them (no GPU needed), and how they are packaged.

kernels/aot_check.py compiles every launcher's real launch for sm_90 through Triton's own
argument specialisation; these tests hold its report to the code-quality bounds of issue 12
(accurate math, no spills, 16-byte accesses on aligned sizes, register counts per launch).
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
    "loss flat": (128, 64),
    "sampler heun-1 flat fp32": (128, 128),
    "sampler heun-2+noise flat fp32": (128, 128),
    "philox_normal": (0, 128),
}


def test_aligned_sizes_get_128_bit_accesses(aot_report):
    _, report, _ = aot_report
    for name, (ld, st) in MIN_ACCESS_BITS.items():
        got = report[name]["ld_bits"], report[name]["st_bits"]
        assert got[0] >= ld and got[1] >= st, f"{name}: widest load/store {got} bits, want >= {(ld, st)}"


def test_register_counts_of_the_chosen_launches(aot_report):
    """Warps per launch keep the fused fp32 kernels near half occupancy on sm_90 and every
    kernel within 128 registers.  `python -m pfgmpp_fast.kernels.aot_check` prints the counts."""
    _, report, _ = aot_report
    for name, r in report.items():
        limit = 72 if name.startswith(("perturb", "loss", "sampler")) and "fp64" not in name else 128
        assert r["regs"] <= limit, f"{name}: {r['regs']} registers with {r['num_warps']} warps, limit {limit}"


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
    """Every kernel file registers its op; the argument names and types (optional ones included:
    `float?`, `Tensor?`) are those of the C++ ops."""
    import pfgmpp_fast.kernels  # noqa: F401

    names = ("philox4x32", "philox_normal", "chi2", "perturb", "loss_fwd_bwd", "sampler_update")
    for name in names:
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
