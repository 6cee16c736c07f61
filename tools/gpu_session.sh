#!/usr/bin/env bash
# The GPU checks of issue 9, for a machine with an NVIDIA GPU (the device tool's H100 / H200, or your own).
#
#   bash tools/gpu_session.sh STAGE...
#
# Stages (run in the order given; each logs to $OUT/<stage>.log and prints its exit status and time):
#   build          build the extension in place with CUDA for this GPU's architecture (skipped if built)
#   info           fastdiff info --device cuda (kernel table + self-check on the GPU)
#   test           the CUDA tests: tests/test_cuda_ops.py, test_attention.py, test_solver_step.py,
#                  test_cuda_graphs.py
#   test-all       the whole test suite
#   smoke          tools/cuda_smoke.py: every kernel once, fwd + bwd, vs the reference
#   sanitize       compute-sanitizer memcheck, racecheck, initcheck and synccheck over tools/cuda_smoke.py
#   bench          fastdiff bench --device cuda (every suite, bf16, no torch.compile): $OUT/bench.json
#   bench-compile  network + sampling suites with the plain baseline under torch.compile max-autotune
#
# Environment: PYTHON (default python3, the one with torch), OUT (default ./gpu-out), BENCH_ARGS (extra
# arguments for both bench stages). The device tool gives 10 minutes per call: a fresh machine needs
# `build` first in every call (about a minute or two on 16 cores), e.g. `build info test smoke`, then
# `build sanitize`, then `build bench`, then `build bench-compile`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-out}
BENCH_ARGS=${BENCH_ARGS:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

stage() {  # stage NAME COMMAND...: run, log, time, remember a failure
  local name=$1 t0=$SECONDS rc
  shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

has_cuda_kernels() {
  "$PY" - <<'EOF' 2>/dev/null
import torch
from fastdiff import ops
assert ops.HAS_EXTENSION and torch.cuda.is_available()
assert torch._C._dispatch_has_kernel_for_dispatch_key("fastdiff::mp_silu", "CUDA")
EOF
}

build() {
  if has_cuda_kernels; then echo "already built with CUDA kernels"; return 0; fi
  local arch
  arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
  FASTDIFF_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) "$PY" setup.py -q build_ext --inplace &&
    "$PY" tests/check_cuda_build.py
}

sanitize() {
  local rc=0 tool
  for tool in memcheck racecheck initcheck synccheck; do
    echo "--- compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" tools/cuda_smoke.py > "$OUT/sanitize-$tool.log" 2>&1
    local r=$?
    tail -n 3 "$OUT/sanitize-$tool.log"
    echo "--- $tool: exit $r"
    [ $r -eq 0 ] || rc=1
  done
  return $rc
}

[ $# -gt 0 ] || { sed -n '2,20p' "$0"; exit 2; }
for s in "$@"; do
  case "$s" in
    build) stage build build ;;
    info) stage info "$PY" -m fastdiff info --device cuda ;;
    test) stage test "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda_ops.py tests/test_attention.py \
            tests/test_solver_step.py tests/test_cuda_graphs.py ;;
    test-all) stage test-all "$PY" -m pytest -q -p no:cacheprovider ;;
    smoke) stage smoke "$PY" tools/cuda_smoke.py ;;
    sanitize) stage sanitize sanitize ;;
    # shellcheck disable=SC2086
    bench) stage bench "$PY" -m fastdiff bench --device cuda --compile none --no-progress --json "$OUT/bench.json" $BENCH_ARGS ;;
    # shellcheck disable=SC2086
    bench-compile) stage bench-compile "$PY" -m fastdiff bench network sampling --device cuda --compile max-autotune \
                     --no-progress --json "$OUT/bench-compile.json" $BENCH_ARGS ;;
    *) echo "unknown stage $s"; status=2 ;;
  esac
done
exit $status
