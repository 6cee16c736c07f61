#!/usr/bin/env bash
# Every GPU check of fastdiff in ONE device call: at most 8 minutes on a fresh 16-core H100 / H200 with no
# network (the device tool allows 10 minutes a call and 15 in all).
#
#   OUT=dir bash tools/gpu_session.sh [--dry-run] [STAGE...]      (default: every stage, in this order)
#
# Stage     expected  limit   what (expected times: fresh 16-core H100, nothing carried; none measured yet)
#   env        5 s     30 s   nvidia-smi, torch / CUDA versions
#   build    150 s    270 s   reuse a carried fastdiff/_C*.so when it loads and runs a kernel on this GPU,
#                             else build for this GPU's arch only (TORCH_CUDA_ARCH_LIST=<cc>, MAX_JOBS=nproc);
#                             then tests/check_cuda_build.py (every op with a CPU kernel has a CUDA one)
#   test      75 s    150 s   the CUDA tests with FASTDIFF_REQUIRE_CUDA=1 (a test skipped for want of CUDA
#                             FAILS), --maxfail=5 (not -x: see several failures in one call)
#   smoke     15 s     60 s   tools/cuda_smoke.py (TF32 off), every kernel fwd + bwd vs the reference
#   sanitize  60 s    120 s   compute-sanitizer memcheck + racecheck over the smoke with
#                             PYTORCH_NO_CUDA_MEMORY_CACHING=1 (SANITIZE_TOOLS to choose others)
#   bench    170 s    240 s   tools/gpu_bench.py: ops GB/s vs copy, attention TFLOP/s vs SDPA and einsum,
#                             img64-S / img512-S forward b64 bf16 vs plain and torch.compile(max-autotune-
#                             no-cudagraphs), 32-step Heun + autoguidance + interval with / without CUDA graphs
# Expected total: about 475 s with the build, 330 s with a carried build. The session stops at the first
# failed stage (the rest are listed as not run); a stage past its limit is killed and counts as failed.
#
# $OUT (default ./gpu-out) gets at most 8 files: session.log (every stage's output), summary.txt (the table
# printed last: each stage's result and time, then the benchmark summary), bench.json, and one
# sanitize-<tool>.log per sanitizer tool (two by default).
# Environment: PYTHON (default python3, the one with torch), OUT, SANITIZE_TOOLS (default "memcheck racecheck"),
# GPU_SESSION_STUB=1 (CPU logic check: every stage runs `true`, except GPU_SESSION_FAIL=<stage> which fails).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-out}
SANITIZE_TOOLS=${SANITIZE_TOOLS:-memcheck racecheck}
STUB=${GPU_SESSION_STUB:-0}
ALL_STAGES=(env build test smoke sanitize bench)
declare -A EXPECT=([env]=5 [build]=150 [test]=75 [smoke]=15 [sanitize]=60 [bench]=170)
declare -A LIMIT=([env]=30 [build]=270 [test]=150 [smoke]=60 [sanitize]=120 [bench]=240)
CUDA_TESTS="tests/test_cuda_ops.py tests/test_attention.py tests/test_gpu_route.py tests/test_solver_step.py tests/test_cuda_graphs.py"

dry=0
stages=()
for a in "$@"; do
  case "$a" in
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) if [[ -v "EXPECT[$a]" ]]; then stages+=("$a"); else echo "gpu_session: unknown stage '$a' (stages: ${ALL_STAGES[*]})" >&2; exit 2; fi ;;
  esac
done
[ ${#stages[@]} -gt 0 ] || stages=("${ALL_STAGES[@]}")

export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# --- the stages (each run under `timeout`, its output to $OUT/<log>) -------------------------------------
st_env() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || return 1
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0), 'cc', torch.cuda.get_device_capability(0))"
}

carried_build_works() {  # the .so in fastdiff/ loads and runs a kernel on this GPU (right arch)
  "$PY" - <<'EOF' 2>/dev/null
import torch
from fastdiff.ops import _ext
assert _ext.LOADED and _ext.has_kernel("mp_silu", "cuda") and torch.cuda.is_available()
x = torch.ones(8, device="cuda")
torch.ops.fastdiff.mp_silu(x)
torch.cuda.synchronize()
EOF
}

st_build() {
  if carried_build_works; then
    echo "build: the carried fastdiff/_C*.so runs on this GPU; not rebuilding"
  else
    local arch
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
    echo "build: for sm_${arch/./} only, $(nproc) jobs"
    rm -f fastdiff/_C*.so
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FASTDIFF_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) \
      "$PY" setup.py -q build_ext --inplace || return 1
    carried_build_works || { echo "build: the new build does not run a kernel on this GPU"; return 1; }
  fi
  "$PY" tests/check_cuda_build.py
}

st_test() {
  # shellcheck disable=SC2086
  FASTDIFF_REQUIRE_CUDA=1 "$PY" -m pytest -q -p no:cacheprovider --maxfail=5 $CUDA_TESTS
}

st_smoke() { "$PY" tools/cuda_smoke.py; }  # TF32 is switched off inside

st_sanitize() {
  local tool rc=0
  for tool in $SANITIZE_TOOLS; do
    echo "--- compute-sanitizer --tool $tool (log: $OUT/sanitize-$tool.log)"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" tools/cuda_smoke.py \
      > "$OUT/sanitize-$tool.log" 2>&1
    local r=$?
    tail -n 3 "$OUT/sanitize-$tool.log"
    echo "--- $tool: exit $r"
    [ $r -eq 0 ] || rc=1
  done
  return $rc
}

st_bench() { "$PY" tools/gpu_bench.py --out "$OUT" --budget $((LIMIT[bench] - 40)); }

# --- driver ------------------------------------------------------------------------------------------------
total=0
for s in "${stages[@]}"; do total=$((total + EXPECT[$s])); done
if [ $dry -eq 1 ]; then
  echo "gpu_session: dry run, OUT=$OUT"
  for s in "${stages[@]}"; do printf '  %-9s expected %4d s, limit %4d s\n' "$s" "${EXPECT[$s]}" "${LIMIT[$s]}"; done
  echo "  total expected ${total} s (budget 480 s)"
  exit 0
fi

mkdir -p "$OUT"
: > "$OUT/session.log"
declare -A RESULT=() TOOK=()
status=0
failed=""
for s in "${stages[@]}"; do
  if [ -n "$failed" ]; then RESULT[$s]="not run"; TOOK[$s]=0; continue; fi
  echo "=== $s (expected ${EXPECT[$s]} s, limit ${LIMIT[$s]} s)" | tee -a "$OUT/session.log"
  t0=$SECONDS
  if [ "$STUB" = "1" ]; then
    if [ "${GPU_SESSION_FAIL:-}" = "$s" ]; then false; else true; fi
    rc=$?
  else
    export -f "st_$s" carried_build_works
    export PY OUT SANITIZE_TOOLS CUDA_TESTS
    timeout --signal=TERM --kill-after=10 "${LIMIT[$s]}" bash -c "$(declare -p LIMIT); st_$s" 2>&1 | tee -a "$OUT/session.log"
    rc=${PIPESTATUS[0]}
  fi
  TOOK[$s]=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then RESULT[$s]="ok"; else
    RESULT[$s]="FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'))"
    failed=$s
    status=1
  fi
  echo "=== $s: ${RESULT[$s]} after ${TOOK[$s]} s" | tee -a "$OUT/session.log"
done

{
  echo
  echo "| stage | result | time | expected |"
  echo "|---|---|---|---|"
  for s in "${stages[@]}"; do echo "| $s | ${RESULT[$s]} | ${TOOK[$s]} s | ${EXPECT[$s]} s |"; done
  if [ -z "$failed" ]; then echo "gpu_session: every stage passed"; else echo "gpu_session: stopped at the failed stage '$failed'"; fi
  if grep -q '^| suite | case |' "$OUT/session.log"; then
    echo
    sed -n '/^| suite | case |/,/^gpu_bench: [0-9]/p' "$OUT/session.log"
  fi
} > "$OUT/summary.txt.tmp"
mv "$OUT/summary.txt.tmp" "$OUT/summary.txt"
cat "$OUT/summary.txt"
exit $status
