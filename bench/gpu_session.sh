#!/usr/bin/env bash
# Device-machine checks and benchmarks, most important first. Each step has its own time limit and
# writes into OUTDIR: its log (<step>.log), the benchmarks' records (OUTDIR/records.jsonl, a fragment
# of the store) and their tables/plots, thresholds.json after every step; a call cut off midway keeps
# what the finished steps wrote. Back on the host: python bench/report.py --merge OUTDIR/records.jsonl
# (adds the records to bench/results/records.jsonl and rewrites the tables there).
#   SHARDKIT_COMMIT=<hash>[+dirty] bench/gpu_session.sh OUTDIR [STEP...]   (default: every step, in order)
# SHARDKIT_COMMIT names the code the records were measured with (bench/records.py); set it from the
# host's checkout, e.g. $(git rev-parse --short=7 HEAD)$(git diff --quiet HEAD -- shardkit csrc bench || echo +dirty),
# since the device's copy of the tree may have no .git.
# Steps: install ctest gpu_tests gpu_kernel_tests bench_suites profile_eager sweep rmsnorm_bench
#        chunk_bench ring_bench ring_transfer tune (tune is not in the default list)
# Environment overrides: GPU_TESTS_S, RING_S, RMSNORM_S, TUNE_S (step time limits), GPU_TESTS (test paths),
# RING_ARGS, TUNE_ARGS (ring bench and tuning options).
set -uo pipefail
out=$1; shift
steps=${*:-install ctest gpu_tests gpu_kernel_tests bench_suites profile_eager sweep rmsnorm_bench chunk_bench ring_bench ring_transfer}
mkdir -p "$out"
if [ -z "${SHARDKIT_COMMIT:-}" ] && ! git rev-parse --short HEAD >/dev/null 2>&1; then
  echo "warning: no SHARDKIT_COMMIT and no .git: records will say commit 'unknown'" >&2
fi
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
run="python3 -m torch.distributed.run --standalone --nproc-per-node=$n"
{ nvidia-smi -L; nvidia-smi topo -m; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } \
  > "$out/env.txt" 2>&1
step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  echo "=== $name"
  timeout "$secs" "$@" > "$out/$name.log" 2>&1; echo "rc=$?" >> "$out/$name.log"
  grep -vE "it/s\]|OMP_NUM_THREADS|^\*+$" "$out/$name.log" | tail -30
  cp shardkit/thresholds.json "$out/"  # benches with --write-thresholds update it
}
for s in $steps; do case $s in
  install) step install 60 python3 -m pip install --no-deps --no-build-isolation -e . ;;
  ctest) step ctest 120 bash -c "cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null && \
    cmake --build build/cmake -j 16 >/dev/null && ./build/cmake/test_dda_all_reduce" ;;
  gpu_tests) step gpu_tests "${GPU_TESTS_S:-300}" python3 -m pytest -q -rs -p no:cacheprovider -m gpu ${GPU_TESTS:-tests/} ;;
  gpu_kernel_tests) step gpu_kernel_tests 120 python3 -m pytest -q -rs -p no:cacheprovider tests/attention/test_attention_sdpa.py \
      tests/attention/test_attention_chunk.py tests/attention/test_attention_merge.py tests/attention/test_attention_ops.py \
      tests/kernels/test_launch.py ;;
  bench_suites)
    step bench_all_reduce 120 $run -m pytest -q -p no:cacheprovider bench/test_all_reduce_benchmark.py \
      --benchmark-group-by=group --records-out "$out"
    step bench_kernels 120 python3 -m pytest -q -p no:cacheprovider bench/test_kernels_benchmark.py \
      --records-out "$out" ;;
  profile_eager) step profile_eager 60 $run bench/profile_eager.py --out "$out" ;;
  sweep) step "sweep_x$n" 120 $run bench/all_reduce_sweep.py --out "$out" --sizes 1K-64M --write-thresholds ;;
  rmsnorm_bench) step rmsnorm_bench "${RMSNORM_S:-200}" $run bench/all_reduce_rmsnorm_bench.py --out "$out" \
      --write-thresholds ;;
  chunk_bench) step chunk_bench 150 python3 bench/attention_chunk_bench.py --out "$out" --no-sweep --write-thresholds ;;
  ring_bench) step ring_bench "${RING_S:-240}" $run bench/ring_attention_bench.py --out "$out" \
      ${RING_ARGS:---lengths 32768 131072 262144 --budget-s 200} ;;
  ring_transfer) step ring_transfer 60 $run bench/ring_transfer_bench.py --out "$out" ;;
  tune) step tune "${TUNE_S:-200}" $run bench/tune_all_reduce.py --out "$out" ${TUNE_ARGS:-} ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
