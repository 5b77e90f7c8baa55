#!/usr/bin/env bash
# The Triton kernels against every Triton we support (default 3.6 3.7 3.8; the GPU machine
# has 3.6, this one 3.8): for each version, a virtual environment over this Python's
# packages with only Triton replaced, then the Triton op tests under the CPU interpreter
# and the ahead-of-time sm_90 compile checks. No GPU needed; run after scripts/setup.sh.
#   bash scripts/check_triton_versions.sh [VERSION ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENVS=${VENVS:-/tmp/pfgmpp_fast-triton-venvs}
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.6 3.7 3.8)
for v in "${versions[@]}"; do
  env_dir="$VENVS/triton-$v"
  if [ ! -x "$env_dir/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$env_dir"
    "$env_dir/bin/pip" install -q --disable-pip-version-check --no-deps "triton==$v.*"
  fi
  echo "== Triton $("$env_dir/bin/python" -c "import triton; print(triton.__version__)")"
  PYTHONPATH="$PWD" "$env_dir/bin/python" -m pytest -q -p no:cacheprovider -m triton -n 2 tests/ | tail -n 1
  PYTHONPATH="$PWD" "$env_dir/bin/python" -m pytest -q -p no:cacheprovider tests/test_triton_aot.py | tail -n 1
done
