#!/usr/bin/env bash
# Device-machine checks and benchmarks, most important first. Each step has its own time limit; the
# benchmarks write into a scratch folder, and after every step OUTDIR gets what the device tool can
# bring back (at most 8 files): records.jsonl (the benchmarks' records, a fragment of the store),
# thresholds.json (shardkit/thresholds.json, which --write-thresholds updates), session.log (every
# step's log, with its exit status and seconds), session.tgz (the tables, plots and full logs) and
# env.txt. A call cut off midway keeps what the finished steps wrote. Back on the host:
#   python bench/report.py --merge OUTDIR/records.jsonl   (adds the records to bench/results/records.jsonl
#                                                          and rewrites the tables there)
#   cp OUTDIR/thresholds.json shardkit/thresholds.json   (after a look at git diff: the measured rules)
#
#   SHARDKIT_COMMIT=<hash>[+dirty] bench/gpu_session.sh OUTDIR [STEP|PRESET...]   (default: every step, in order)
# SHARDKIT_COMMIT names the code the records were measured with (bench/records.py); set it from the
# host's checkout, e.g. $(git rev-parse --short=7 HEAD)$(git diff --quiet HEAD -- shardkit csrc bench || echo +dirty),
# since the device's copy of the tree may have no .git.
# Steps: install ctest gpu_tests gpu_kernel_tests bench_suites profile_eager sweep rmsnorm_bench
#        chunk_bench ring_bench ring_transfer sweep_ll moe_bench tp_block tune (sweep_ll, moe_bench, tp_block
#        and tune are not in the default list)
# Presets: the issue runs on all GPUs of the machine (issues 16 and 17: 4 and 8 GPUs), one device call
# (<= 10 minutes, a fresh machine each: every preset installs first) each; the sums of their step
# limits stay under 600 s:
#   issue_runs_1 = install sweep sweep_ll rmsnorm_bench   limits 60 + 180 + 60 + 240 s
#   issue_runs_2 = install ring_bench                 limits 60 + 420 (4 GPUs) / 520 (8 GPUs) s
#   issue_runs_3 = install moe_bench tp_block         limits 60 + 150 + 90 + 240 s
#   issue_runs   = all three (one long session without the device tool's 10-minute limit)
# What adapts to the GPU count n (torch.cuda.device_count()): every torchrun takes all n GPUs; ring
# lengths 32K-256K (n < 4), 32K-512K (n = 4..7, groups of 2 and n GPUs), 32K-1M (n >= 8, n GPUs
# only, 3 repetitions), CP decode up to the longest length; tp_block runs TP=n.
# Environment overrides: GPU_TESTS_S, SWEEP_S, RMSNORM_S, RING_S, MOE_S, TP_S, TUNE_S (step time limits),
# GPU_TESTS (test paths), SWEEP_ARGS, RMSNORM_ARGS, RING_ARGS, MOE_ARGS, TP_ARGS, TUNE_ARGS (options;
# TP_ARGS="--model-dir DIR" adds the tiny-llama decode where the checkpoint was carried to the machine).
set -uo pipefail
out=$1; shift
steps=${*:-install ctest gpu_tests gpu_kernel_tests bench_suites profile_eager sweep rmsnorm_bench chunk_bench ring_bench ring_transfer}
steps=${steps//issue_runs_1/install sweep sweep_ll rmsnorm_bench}
steps=${steps//issue_runs_2/install ring_bench}
steps=${steps//issue_runs_3/install moe_bench tp_block}
steps=${steps//issue_runs/install sweep sweep_ll rmsnorm_bench ring_bench moe_bench tp_block}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX")  # the benchmarks' --out: records, tables, plots, logs
trap 'rm -rf "$work"' EXIT  # OUTDIR holds all of it (session.tgz)
if [ -z "${SHARDKIT_COMMIT:-}" ] && ! git rev-parse --short HEAD >/dev/null 2>&1; then
  echo "warning: no SHARDKIT_COMMIT and no .git: records will say commit 'unknown'" >&2
fi
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
run="python3 -m torch.distributed.run --standalone --nproc-per-node=$n"
{ nvidia-smi -L; nvidia-smi topo -m; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } \
  > "$out/env.txt" 2>&1
if [ "$n" -ge 8 ]; then
  ring_args="--lengths 32768 131072 262144 524288 1048576 --worlds $n --local-backends triton cudnn --reps 3 --budget-s 400"
  ring_s=520
elif [ "$n" -ge 4 ]; then
  ring_args="--lengths 32768 131072 262144 524288 --worlds 2 $n --local-backends triton cudnn --budget-s 320"
  ring_s=420
else
  ring_args="--lengths 32768 131072 262144 --budget-s 200"
  ring_s=240
fi
step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2 t0=$SECONDS rc; shift 2
  echo "=== $name"
  timeout "$secs" "$@" > "$work/$name.log" 2>&1; rc=$?
  echo "rc=$rc after $((SECONDS - t0)) s (limit $secs s)" >> "$work/$name.log"
  grep -vE "it/s\]|OMP_NUM_THREADS|^\*+$" "$work/$name.log" | tail -30
  { echo "=== $name"; grep -vE "it/s\]|OMP_NUM_THREADS|^\*+$" "$work/$name.log"; } >> "$out/session.log"
  cp shardkit/thresholds.json "$out/"  # benches with --write-thresholds update it
  if [ -f "$work/records.jsonl" ]; then cp "$work/records.jsonl" "$out/"; fi
  tar -czf "$out/session.tgz" -C "$work" .
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
      --benchmark-group-by=group --records-out "$work"
    step bench_kernels 120 python3 -m pytest -q -p no:cacheprovider bench/test_kernels_benchmark.py \
      --records-out "$work" ;;
  profile_eager) step profile_eager 60 $run bench/profile_eager.py --out "$work" ;;
  sweep) step "sweep_x$n" "${SWEEP_S:-180}" $run bench/all_reduce_sweep.py --out "$work" \
      ${SWEEP_ARGS:---sizes 1K-256M --write-thresholds} ;;
  sweep_ll)  # the LL kernel (CUDA only) at the sizes it is for, in its own process: a focused scan
    step "sweep_ll_x$n" 60 $run bench/all_reduce_sweep.py --out "$work" --algos nccl,flat,ll --sizes 1K-1M ;;
  rmsnorm_bench) step rmsnorm_bench "${RMSNORM_S:-240}" $run bench/all_reduce_rmsnorm_bench.py --out "$work" \
      ${RMSNORM_ARGS:---tokens 1,8,16,32,64,128,256,1024,4096 --write-thresholds} ;;
  chunk_bench) step chunk_bench 150 python3 bench/attention_chunk_bench.py --out "$work" --no-sweep --write-thresholds ;;
  ring_bench) step "ring_bench_x$n" "${RING_S:-$ring_s}" $run bench/ring_attention_bench.py --out "$work" \
      ${RING_ARGS:-$ring_args --write-thresholds} ;;
  ring_transfer) step ring_transfer 60 $run bench/ring_transfer_bench.py --out "$work" ;;
  moe_bench)  # torch's symmetric memory picks its backend at the first allocation: its baseline runs alone
    step "moe_bench_x$n" "${MOE_S:-150}" $run bench/moe_bench.py --out "$work" ${MOE_ARGS:---quick}
    step "moe_symm_mem_x$n" 90 $run bench/moe_bench.py --out "$work" ${MOE_ARGS:---quick} --impls torch_symm_mem ;;
  tp_block) step "tp_block_x$n" "${TP_S:-240}" python3 bench/tp_block_bench.py --session --out "$work" ${TP_ARGS:-} ;;
  tune) step tune "${TUNE_S:-200}" $run bench/tune_all_reduce.py --out "$work" ${TUNE_ARGS:-} ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
