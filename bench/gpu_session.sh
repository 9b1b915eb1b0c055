#!/usr/bin/env bash
# One device-machine call, most important first. Each step has its own time limit; after each step
# the results so far are packed into OUTDIR/results.tgz, so a call cut off midway still returns them.
#   bench/gpu_session.sh OUTDIR [quick]
set -uo pipefail
out=$1
res=/tmp/shardkit-results/results
rm -rf "$res" && mkdir -p "$res"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
{ nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$res/env.txt" 2>&1
step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  echo "=== $name"
  timeout "$secs" "$@" > "$res/$name.log" 2>&1; echo "rc=$?" >> "$res/$name.log"
  grep -vE "it/s\]|OMP_NUM_THREADS|^\*+$" "$res/$name.log" | tail -30
  tar czf "$out/results.tgz" -C "$(dirname "$res")" results
}
step install 45 python3 -m pip install --no-deps --no-build-isolation -e .
step ctest 45 bash -c "cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build/cmake -j 16 >/dev/null && ./build/cmake/test_dda_all_reduce"
step "sweep_x$n" 90 python3 -m torch.distributed.run --standalone --nproc-per-node="$n" bench/all_reduce_sweep.py \
  --out "$res" --sizes 1K-64M --write-thresholds
cp shardkit/collectives/thresholds.json "$res/"
step gpu_tests 130 python3 -m pytest -q -rs -x -p no:cacheprovider -k "not triton" tests/collectives/test_all_reduce_gpu.py \
  tests/collectives/test_all_reduce_rmsnorm_gpu.py tests/attention/test_ring_attention_gpu.py
step rmsnorm_bench 80 python3 -m torch.distributed.run --standalone --nproc-per-node="$n" bench/all_reduce_rmsnorm_bench.py --out "$res"
step ring_bench 120 python3 -m torch.distributed.run --standalone --nproc-per-node="$n" bench/ring_attention_bench.py --out "$res"
