#!/usr/bin/env bash
# Every GPU check issue 5 still owes, as one script for the lent device (see
# /work/.library/device/README.md: run it through `run` from the repository root; there `python3`
# holds a CUDA torch with triton, pytest and pytest-benchmark, and $OUT comes back):
#
#   bash scripts/gpu_check.sh            # an estimate, never timed: ~6-8 min on one H100/H200
#
# 1. builds fastdistill._C in place with its CUDA sources (sm_90 only, to keep the build short);
# 2. runs every cuda-marked test (each backend on device tensors against the CPU reference,
#    determinism, the batched loop) -- the Triton kernels run compiled, not interpreted;
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
stage build 300 env FASTDISTILL_REQUIRE_EXT=1 "$PY" setup.py build_ext --inplace
stage cuda-tests 240 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests -rs
stage bench 300 "$PY" -m pytest benches/bench_gpu.py --benchmark-only -p no:cacheprovider \
  --benchmark-group-by=param:case --benchmark-columns=median,iqr,rounds --benchmark-json="$OUT/gpu.json"
[ -f "$OUT/gpu.json" ] && "$PY" benches/bench_gpu.py --table "$OUT/gpu.json" > "$OUT/gpu-table.md" && cat "$OUT/gpu-table.md"
echo "failed stages: $failed"
exit "$failed"
