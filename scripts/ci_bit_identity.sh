#!/usr/bin/env bash
# The bit-identity tests (pytest -m bitidentity: ranks vs one process, shards vs one pass,
# resume vs uninterrupted, batch independence of the sampler) under CPU code paths other than
# the suite's: MKL's "COMPATIBLE" reproducibility kernels (another GEMM blocking: with them the
# digits features of a batch of 8 and of 5 differ by ~1e-6, as on CPUs whose BLAS treats batch
# shapes differently) and ATen's scalar "default" kernels instead of AVX2/AVX-512. Equal bits
# are promised by construction (the same batches, the same reduction order), so they must hold
# here too. One thread, as in the suite (two ranks of two threads each oversubscribe 2 cores);
# OMP_NUM_THREADS=2 in the environment runs the other work split as well.
#   bash scripts/ci_bit_identity.sh [PYTEST ARGS ...]      (run after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
export MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PYTHON:-python3}
"$PY" -c "import torch; print('bit identity under MKL_CBWR=COMPATIBLE, ATen', torch.backends.cpu.get_cpu_capability(),
      'kernels,', torch.get_num_threads(), 'threads')"
exec "$PY" -m pytest -q -p no:cacheprovider -m bitidentity tests "$@"
