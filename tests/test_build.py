"""The C++/CUDA extension builds, imports and registers every op (CPU always; CUDA whenever
nvcc and a CUDA build of torch exist), and installs as pfgmpp_fast.* only."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

OPS = ("philox4x32", "philox_normal", "chi2", "perturb", "loss_fwd_bwd", "sampler_update")


def _nvcc_present() -> bool:
    return shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()


def test_extension_imports():
    from pfgmpp_fast import _ext

    assert _ext.HAS_EXTENSION
    assert set(_ext.OP_NAMES) == set(OPS)
    for name in OPS:
        assert hasattr(torch.ops.pfgmpp_fast, name)


@pytest.mark.parametrize("name", OPS)
def test_cpu_kernel_registered(name):
    import pfgmpp_fast._ext  # noqa: F401

    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pfgmpp_fast::{name}", "CPU")
    # The fake (meta) implementation exists, so torch.compile can trace the op.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pfgmpp_fast::{name}", "Meta")


@pytest.mark.skipif(
    not _nvcc_present() or torch.version.cuda is None or os.environ.get("PFGMPP_FAST_NO_CUDA") == "1",
    reason="CUDA kernels are only built with nvcc and a CUDA build of torch",
)
@pytest.mark.parametrize("name", OPS)
def test_cuda_kernel_compiled_and_registered(name):
    from pfgmpp_fast import _C, _ext

    assert _C.built_with_cuda, "nvcc is present but the extension was built without CUDA"
    assert _ext.HAS_CUDA_KERNELS
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pfgmpp_fast::{name}", "CUDA")


def test_schemas_match_kernel_ops_contract():
    import pfgmpp_fast._ext  # noqa: F401

    schema = {name: str(getattr(torch.ops.pfgmpp_fast, name).default._schema) for name in OPS}
    assert schema["perturb"] == (
        "pfgmpp_fast::perturb(Tensor y, Tensor scale, Tensor c_in, Tensor sample_ids, int key, "
        "int stream, ScalarType out_dtype, bool channels_last, bool write_x) -> (Tensor, Tensor)"
    )
    assert schema["sampler_update"].startswith(
        "pfgmpp_fast::sampler_update(Tensor x, Tensor? F, Tensor? base, float A, float Bf, float h1, "
        "float? h2, Tensor sample_ids, int key, float alpha_scale, int alpha_stream, "
        "float churn_scale, int churn_stream, float? c_in_next, ScalarType net_dtype, "
        "bool channels_last)"
    )


def test_installed_as_subpackages_only(tmp_path):
    """pfgmpp_fast.kernels (the Triton kernels) imports; no top-level `kernels` package."""
    code = (
        "import importlib.util, pfgmpp_fast.kernels as k, pfgmpp_fast._C as c; "
        "print(importlib.util.find_spec('kernels') is None, k.__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert out.stdout.split() == ["True", "pfgmpp_fast.kernels"]
