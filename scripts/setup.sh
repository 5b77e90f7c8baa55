#!/usr/bin/env bash
# Sets up everything pfgmpp_fast needs on a fresh machine (idempotent, quiet when done):
# torch and the build tools first (the extension is built against the installed torch,
# so the build runs with --no-build-isolation), then the package itself, editable, with
# its C++/CUDA extension compiled by CMake.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" -m pip install -q --disable-pip-version-check \
    "torch==${TORCH_VERSION:-2.14.1}" setuptools wheel pybind11 ninja "cmake>=3.30"
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test]"
"$PY" -c "import pfgmpp_fast._ext as e; print('pfgmpp_fast ready: extension', 'with CUDA kernels' if e.HAS_CUDA_KERNELS else '(CPU kernels)')"
