#!/usr/bin/env bash
# Builds, tests and benchmarks pfgmpp_fast on a fresh GPU machine in one command of under ten
# minutes (docs/gpu_session.md), in phases, most valuable first.
#
#   scripts/gpu_session.sh            # set 1: probe, build, GPU tests, kernel benchmark,
#                                     #        compute-sanitizer memcheck, training benchmark
#   scripts/gpu_session.sh --set 2    # set 2: probe, build, sampling at 35 NFE (CUDA graphs,
#                                     #        FID-50k projection), network benchmark
#   scripts/gpu_session.sh --dry-run  # the same phases on the CPU, tiny sizes (CI runs it)
#
# Each phase runs under its own `timeout`, tees its log into $OUT while it runs and writes
# its results when it finishes, so a kill at any point returns every finished phase. The
# whole call stays under GPU_SESSION_BUDGET seconds (default 540). $OUT (default
# ./gpu-session-out) gets at most 8 files: session.txt (probe + one line per phase), one log
# per phase, and the benchmark results <device>-<date>.json/.md (commit those two under
# benchmarks/results/). Python packages the machine lacks can be put as wheels in .whl/.
set -uo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."

cpus() { env -u OMP_NUM_THREADS nproc; }  # nproc alone obeys OMP_NUM_THREADS
usage() { echo "usage: $0 [--set 1|2] [--dry-run]" >&2; exit 2; }
if [[ ${1:-} != --phase-body ]]; then
    SET=1 DRY=0
    while (($#)); do
        case $1 in
            --set) [[ ${2:-} == 1 || ${2:-} == 2 ]] || { echo "--set: expected 1 or 2, got '${2:-}'" >&2; usage; }
                   SET=$2; shift 2 ;;
            --dry-run) DRY=1; shift ;;
            -h|--help) sed -n 2,16p "$SELF"; exit 0 ;;
            *) echo "unknown option '$1'" >&2; usage ;;
        esac
    done
    export SET DRY
    export OUT=${OUT:-gpu-session-out}
    export PY=${PYTHON:-python3}
    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    export CMAKE_MIN=${CMAKE_MIN:-3.30}  # torch's C++20 needs CUDA20, which CMake < 3.30 can't give nvcc
    if ((DRY)); then
        export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    fi
fi

# ---------------------------------------------------------------------------------------
# Phase bodies (run as `$0 --phase-body NAME` under timeout, so each can be killed alone)

body_probe() {
    if ((DRY)); then echo "dry run: no GPU expected"; else
        nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv \
            || { echo "FATAL: nvidia-smi failed: no GPU"; return 1; }
    fi
    "$PY" - <<'EOF' || return 1
import os, platform, shutil, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{os.cpu_count()} CPUs")
try:
    import triton; print(f"triton {triton.__version__}")
except ImportError as exc:
    print(f"triton missing: {exc}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
import importlib.util
for mod in ("xdist", "pytest_timeout", "torch_fidelity", "safetensors"):
    print(f"{mod}: {'yes' if importlib.util.find_spec(mod) else 'MISSING'}")
print("nvcc:", shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None))
print("compute-sanitizer:", shutil.which("compute-sanitizer"))
EOF
    # The cmake setup.py uses: PyPI's (cmake module) first, else the one on PATH.
    local cm
    cm=$("$PY" -c "import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, 'cmake'))" 2>/dev/null) \
        && [[ -x $cm ]] || cm=$(command -v cmake) || { echo "FATAL: no cmake (need >= $CMAKE_MIN)"; return 3; }
    local v; v=$("$cm" --version | head -1 | awk '{print $3}')
    echo "cmake $v ($cm)"
    if [[ $(printf '%s\n' "$CMAKE_MIN" "$v" | sort -V | head -1) != "$CMAKE_MIN" ]]; then
        echo "FATAL: cmake $v is older than $CMAKE_MIN, which the build needs (torch's C++20 headers" \
             "need CUDA20; docs/DESIGN.md §8). Put a cmake>=$CMAKE_MIN wheel in .whl/ (docs/gpu_session.md)."
        return 3
    fi
}

body_build() {
    local arch
    if ((DRY)); then
        arch=9.0
        echo "dry run: no rebuild; a GPU run does:"
        echo "  MAX_JOBS=$(cpus) TORCH_CUDA_ARCH_LIST=<device capability> $PY setup.py build_ext --inplace"
    else
        arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
        echo "building for TORCH_CUDA_ARCH_LIST=$arch with MAX_JOBS=$(cpus)"
        MAX_JOBS=$(cpus) TORCH_CUDA_ARCH_LIST=$arch "$PY" setup.py build_ext --inplace || {
            echo "FATAL: the build failed"; return 1; }
    fi
    # Stop loudly when the kernels are not registered: the CUDA tests would skip themselves
    # and the run would look green.
    "$PY" - "$DRY" <<'EOF'
import os, shutil, sys
import torch
from pfgmpp_fast import _C, _ext
dry = sys.argv[1] == "1"
has = lambda op, key: torch._C._dispatch_has_kernel_for_dispatch_key(f"pfgmpp_fast::{op}", key)
missing = [f"{op}/{key}" for op in _ext.OP_NAMES for key in ("CPU", "Meta") if not has(op, key)]
nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
expect_cuda = not dry or (nvcc and torch.version.cuda and os.environ.get("PFGMPP_FAST_NO_CUDA") != "1")
if expect_cuda:
    if not _C.built_with_cuda:
        missing.append("_C.built_with_cuda")
    missing += [f"{op}/CUDA" for op in _ext.OP_NAMES if not has(op, "CUDA")]
if missing:
    print(f"FATAL: kernels not registered: {', '.join(missing)}")
    sys.exit(1)
print(f"kernels registered for {len(_ext.OP_NAMES)} ops: CPU, Meta" + (", CUDA" if expect_cuda else
      " (CUDA kernels not expected: no nvcc or a CPU build of torch)"))
EOF
}

# pytest options: xdist workers and a per-test timeout where the plugins exist.
pytest_opts() {
    local workers=$1 per_test=$2
    has() { "$PY" -c "import importlib.util, sys; sys.exit(not importlib.util.find_spec('$1'))"; }
    has xdist && echo "-n $workers --dist loadfile"
    has pytest_timeout && echo "--timeout $per_test"
}

# The op tests of every fast backend: the cuda params carry `gpu`, the triton ones `triton`.
OP_SELECTION=(-m "gpu or triton")

op_files() { ls tests/test_ops_*.py; }

body_tests() {
    local listing; listing=$("$PY" -m pytest -p no:cacheprovider --collect-only -q "${OP_SELECTION[@]}" $(op_files) 2>&1)
    local n_triton n_cuda
    n_triton=$(grep -c '[[-]triton[]-]' <<<"$listing"); n_cuda=$(grep -c '[[-]cuda[]-]' <<<"$listing")
    echo "op tests selected: $(tail -1 <<<"$listing") — $n_triton triton, $n_cuda cuda parametrisations"
    if ((n_triton == 0 || n_cuda == 0)); then echo "FATAL: the selection lost a backend"; return 1; fi
    if ((DRY)); then  # the plumbing only: Triton under its CPU interpreter is slow
        "$PY" -m pytest -q -p no:cacheprovider -rs $(pytest_opts 1 120) "${OP_SELECTION[@]}" \
            tests/test_ops_philox.py -k "known_answers or cuda"
    else
        # Whole files per worker (--dist loadfile): a file's tests share its Triton kernels, so each
        # kernel is compiled cold once, not once per worker. The Inductor test has its own phase.
        "$PY" -m pytest -q -p no:cacheprovider -rs $(pytest_opts 8 90) "${OP_SELECTION[@]}" \
            --deselect "$INDUCTOR_TEST" tests
    fi
}

# torch.compile with Inductor over the Triton and CUDA ops: cold compiles, so a phase of its own.
INDUCTOR_TEST=tests/test_ops_loss.py::test_compiled_objective_fullgraph_gpu
body_inductor() {
    if ((DRY)); then
        "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_ops_loss.py -k "compiled_objective"
    else
        "$PY" -m pytest -q -p no:cacheprovider -rs "$INDUCTOR_TEST"
    fi
}

# A benchmark suite into $OUT (one results file for the whole session), inside the phase's
# time: bench sizes its suites' timeouts from --budget and keeps finished ones if killed.
bench() {
    local only=$1 budget=$2; shift 2
    local mode=(); ((DRY)) && mode=(--smoke --device cpu)
    # Results go to $RESULTS (outside $OUT: no temporary file of the atomic writer can land in
    # $OUT) under the date the session started with; each phase copies them into $OUT.
    "$PY" -m pfgmpp_fast bench "${mode[@]}" --only "$only" --outdir "$RESULTS" --append --date "$SESSION_DATE" \
        --budget "$budget" "$@"
    local rc=$?
    cp "$RESULTS"/*.json "$RESULTS"/*.md "$OUT"/ 2>/dev/null
    return $rc
}

body_kernels() { bench kernels $((PHASE_CAP - 15)) --no-compile; }
# Set 1 measures ours and the published style; the hand-compiled baseline (two more cold
# Inductor compiles) is left to set 2, which measures all three in one run.
body_training() { bench training $((PHASE_CAP - 15)) $( [[ $SET == 1 ]] && echo --skip-variants hand-compiled); }
body_sampling() { bench sampling $((PHASE_CAP - 15)); }
body_networks() { bench networks $((PHASE_CAP - 15)); }

# compute-sanitizer's selection: the cuda parametrisations of the tests and cases marked `memcheck`
# (tests/op_helpers.py): every op on contiguous, storage-offset and channels-last (C = 1, 3, 5)
# images, odd N and a batch of 66000; ~23 small tests, no 2^31-element one.
MEMCHECK_SELECTION=(-m "memcheck and gpu and not triton")
body_memcheck() {
    local run=("$PY" -m pytest -q -p no:cacheprovider "${MEMCHECK_SELECTION[@]}" $(op_files))
    if command -v compute-sanitizer >/dev/null; then
        # Without the caching allocator every tensor is its own allocation, so an
        # out-of-bounds access can't land unseen inside a cached block.
        local said=/tmp/pfgmpp_fast-memcheck.out rc
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
            --print-limit 50 "${run[@]}" 2>&1 | tee "$said"
        rc=${PIPESTATUS[0]}
        # Some container runtimes hide the device from compute-sanitizer ("Device not
        # supported"): say so plainly, not as a bare failure.
        if grep -q "Device not supported" "$said"; then
            echo "memcheck NOT RUN: compute-sanitizer does not support this device; the CUDA op tests ran in phase tests"
            return 3
        fi
        ((rc == 9)) && echo "memcheck: compute-sanitizer FOUND MEMORY ERRORS (above)"
        return "$rc"
    elif ((DRY)); then
        echo "dry run: compute-sanitizer not found; the same selection without it:"
        "${run[@]}"
    else
        echo "compute-sanitizer not found: phase skipped"; return 1
    fi
}

if [[ ${1:-} == --phase-body ]]; then
    "body_$2"
    exit $?
fi

# ---------------------------------------------------------------------------------------
# The driver: phases in order, each capped by its own time and by what is left.

mkdir -p "$OUT"
export SESSION_DATE=$(date -u +%F)   # one results file name for the whole call, even across midnight
export RESULTS=${TMPDIR:-/tmp}/pfgmpp_fast-gpu-session.$$
mkdir -p "$RESULTS"
SUMMARY=$OUT/session.txt
: >"$SUMMARY"
TOTAL=${GPU_SESSION_BUDGET:-540}
START=$SECONDS
FAILED=0
note() { echo "$*" | tee -a "$SUMMARY"; }

# run_phase NAME CAP LOG [fatal]: the phase under timeout, its log teed into $OUT live.
run_phase() {
    local name=$1 cap=$2 log=$3 fatal=${4:-}
    local left=$((TOTAL - (SECONDS - START) - 5))
    ((cap > left)) && cap=$left
    if ((cap < 20)); then note "phase $name: SKIPPED (${left}s left of ${TOTAL}s)"; FAILED=1; return 1; fi
    note "== phase $name (at $((SECONDS - START))s, timeout ${cap}s, log $log)"
    local t0=$SECONDS rc tee_opt=()
    [[ $log == session.txt ]] && tee_opt=(-a)
    PHASE_CAP=$cap timeout -k 10 "$cap" "$BASH" "$SELF" --phase-body "$name" 2>&1 | tee "${tee_opt[@]}" "$OUT/$log"
    rc=${PIPESTATUS[0]}
    local status="ok"
    ((rc == 124 || rc == 137)) && status="TIMED OUT" || { ((rc)) && status="FAILED (exit $rc)"; }
    note "phase $name: $status in $((SECONDS - t0))s"
    if ((rc)); then
        FAILED=1
        if [[ -n $fatal ]]; then note "STOP: phase $name is needed by the phases after it"; exit 1; fi
    fi
    return 0
}

note "gpu_session: set $SET$( ((DRY)) && echo ', dry run'), budget ${TOTAL}s, $(date -u +%FT%TZ)"
if ((!DRY)) && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PYTHONPATH && note "wheels from .whl/ installed in /tmp/site (first on the path)"
fi
# Caps (seconds) against the estimates for a 16-core H100 machine; set 1's caps add up to
# 30 + 100 + 130 + 80 + 50 = 390, leaving training at least 150 of the 540.
run_phase probe 30 session.txt fatal    # est. 10-15 s
run_phase build 100 build.log fatal     # est. 35-60 s (MAX_JOBS = all cores, one arch)
if [[ $SET == 1 ]]; then
    run_phase tests 130 tests.log       # est. 60-110 s: ~500 tests, ~100-200 cold Triton compiles
    run_phase kernels 80 kernels.log    # est. 45-70 s
    run_phase memcheck 50 memcheck.log  # est. 25-40 s: ~15 s start-up + ~23 small tests under compute-sanitizer
    run_phase training "$TOTAL" training.log  # the rest (>= 150 s): ours + published, cold compile 60-120 s
else
    run_phase inductor 90 inductor.log  # est. 40-80 s: cold Inductor compiles of the fused loss
    run_phase sampling 150 sampling.log # est. 60-120 s
    run_phase networks 80 networks.log  # est. 40-70 s
    run_phase training "$TOTAL" training.log  # the rest: ours, published and hand-compiled in one run
fi
note "gpu_session: done in $((SECONDS - START))s; $( ((FAILED)) && echo 'SOME PHASES FAILED' || echo 'all phases ok')"
ls "$OUT" | tee -a "$SUMMARY"
exit $FAILED
