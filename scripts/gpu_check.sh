#!/usr/bin/env bash
# Every GPU check still owed (issue 5's GPU figures, and the failures of the first run) as one
# script for the lent device (see /work/.library/device/README.md: run it through `run` from the
# repository root; there `python3` holds a CUDA torch with triton, pytest and pytest-benchmark,
# and $OUT comes back; at most 8 files come back, and this writes 8):
#
#   bash scripts/gpu_check.sh     # first run on an H200, 2026-12-04: 115 s (build 24 s; the tests
#                                 # stopped at a segfault after 18 s; bench 59 s); expect ~4 min
#
# 1. installs the checkout editable with the machine's torch (`pip install -e .`, no deps, no index),
#    which builds fastdistill._C in place with its CUDA sources (sm_90 only, to keep the build short);
# 2. runs scripts/gpu_diag.py (compilers, C++ exceptions out of the CPU and CUDA entry points,
#    each in its own process, vmap against the reference with and without TF32), then every
#    cuda-marked test, one pytest process per file (each backend on device tensors against the
#    CPU reference, determinism, the batched loop) -- the Triton kernels run compiled;
# 3. runs benches/bench_gpu.py at K = 1, 4, 16, 64, 256 (eager reference, torch.func.vmap, the
#    batched engine with auto's layer backends and with the CUDA ones forced) and renders its
#    table. Everything is written under $OUT (default /tmp/gpu-check): logs, JSON, the table.
# Each stage has its own time limit, and a failing stage does not stop the later ones; the exit
# status is the number of failed stages.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
failed=0
stage() {  # stage NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc $rc after $((SECONDS - t0)) s; last lines:" | tee -a "$OUT/summary.txt"
  tail -n 5 "$OUT/$name.log" | sed 's/^/   /' | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}
{ nvidia-smi; "$PY" -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"; } \
  > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt" | tail -n 1
# An editable install, as a user does it: it builds fastdistill._C in place and maps kernels/ to
# fastdistill._kernels (the Triton kernels), which a bare `setup.py build_ext --inplace` does not.
stage build 300 env FASTDISTILL_REQUIRE_EXT=1 "$PY" -m pip install --no-deps --no-build-isolation \
  --no-index -v -e .
# one pytest process per test file, so that a crash in one file (a segfault in an extension) is
# reported as that file's failure and the other files still run; all into one log.
cuda_tests() {
  local f rc=0 r
  for f in $("$PY" -m pytest -m cuda --collect-only -q -p no:cacheprovider tests 2>/dev/null |
             grep '::' | cut -d: -f1 | sort -u); do
    echo "---- $f"
    "$PY" -m pytest -m cuda -q -p no:cacheprovider --tb=short -rfEs "$f"
    r=$?; echo "---- $f: rc $r"; [ $r -eq 0 ] || rc=1
  done
  return $rc
}
stage diag 180 "$PY" scripts/gpu_diag.py
stage cuda-tests 240 bash -c "$(declare -f cuda_tests); PY=$PY cuda_tests"
stage bench 300 "$PY" -m pytest benches/bench_gpu.py --benchmark-only -p no:cacheprovider \
  --benchmark-group-by=param:case --benchmark-columns=median,iqr,rounds --benchmark-json="$OUT/gpu.json"
[ -f "$OUT/gpu.json" ] && "$PY" benches/bench_gpu.py --table "$OUT/gpu.json" > "$OUT/gpu-table.md" && cat "$OUT/gpu-table.md"
echo "failed stages: $failed"
exit "$failed"
