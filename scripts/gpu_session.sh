#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one call (see README "Benchmarks"):
# build the extension there, run the GPU tests (and compute-sanitizer on the CUDA ops),
# then the whole benchmark suite. Results land in $OUT (or ./gpu-session-out) and in
# benchmarks/results/; commit the latter with the device named in the file name.
#
# The GPU machine has torch, triton, cmake, ninja, pybind11 and pytest but no registry:
# carry missing wheels (torch-fidelity, safetensors, ...) in .whl/ as the device README says.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-session-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

echo "== build"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee "$OUT/build.log"

echo "== GPU tests"
python3 -m pytest -q -m gpu tests 2>&1 | tail -60 | tee "$OUT/gpu-tests.log"

if command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer memcheck on the CUDA op tests"
    compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -m gpu tests/test_cpp_ops.py \
        2>&1 | tail -30 | tee "$OUT/memcheck.log"
fi

echo "== benchmark suite"
python3 -m pfgmpp_fast bench --outdir benchmarks/results 2>&1 | tee "$OUT/bench.log"
cp benchmarks/results/*"$(date -u +%Y-%m-%d)"* "$OUT/" 2>/dev/null || true
