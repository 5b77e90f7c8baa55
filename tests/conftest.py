"""Test conventions: Triton runs under its CPU interpreter unless a GPU is present;
tests marked `gpu` are skipped without CUDA."""

import os

# One intra-op thread in this process and every process a test starts (they inherit it):
# tests compare results across processes bit for bit, and float reductions depend on the
# thread count. Set before torch starts its thread pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Must happen before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line(
        "markers", "slow: long-running end-to-end test: left out of `make test`, run by `make test-slow` and CI"
    )
    config.addinivalue_line("markers", "triton: runs a Triton kernel (GPU, or the CPU interpreter)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def poison_uninitialized_memory():
    """torch.empty returns NaN-filled tensors: an output element a kernel forgets stays NaN."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev)


@pytest.fixture(autouse=True)
def restore_thread_count():
    """A test that changes torch's thread count (e.g. a command's --threads) leaves it as it was."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """The digits feature network, trained once per session into a cache file that
    subprocesses started by tests read too."""
    from pfgmpp_fast.evaluation import features

    path = str(tmp_path_factory.mktemp("digits") / "digits-features.safetensors")
    features.get_feature_extractor("digits", digits_cache=path)
    return path


@pytest.fixture(scope="session")
def digits(digits_cache):
    """The digits feature extractor (64-d features of uint8 [B, 1, 8, 8] images)."""
    from pfgmpp_fast.evaluation import features

    return features.get_feature_extractor("digits", digits_cache=digits_cache)
