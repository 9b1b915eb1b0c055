#!/usr/bin/env bash
# One device-machine call: install, GPU tests, sweeps on all GPUs and on 2, the one-GPU attention
# benchmark. Usage: bench/gpu_session.sh OUTDIR  (results packed into OUTDIR/results.tgz)
set -uo pipefail
out=$1
mkdir -p "$out/results"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
{ nvidia-smi -L; nvidia-smi topo -m; python3 -c "import torch, triton, numpy; print(torch.__version__, triton.__version__, numpy.__version__)"; } > "$out/results/env.txt" 2>&1
timeout 200 python3 -m pytest -q -rs -s tests/collectives/test_all_reduce_gpu.py tests/attention/test_attention_gpu.py \
   -p no:cacheprovider 2>&1 | tail -40 | tee "$out/results/gpu_tests.log"
timeout 150 python3 -m torch.distributed.run --standalone --nproc-per-node="$n" bench/all_reduce_sweep.py \
   --out "$out/results" --write-thresholds 2>&1 | grep -v "it/s\]" | tail -45 | tee "$out/results/sweep_x$n.log"
CUDA_VISIBLE_DEVICES=0,1 timeout 120 python3 -m torch.distributed.run --standalone --nproc-per-node=2 \
   bench/all_reduce_sweep.py --out "$out/results" --write-thresholds 2>&1 | grep -v "it/s\]" | tail -45 | tee "$out/results/sweep_x2.log"
cp shardkit/collectives/thresholds.json "$out/results/"
timeout 120 python3 bench/attention_chunk_bench.py --out "$out/results" 2>&1 | tail -40 | tee "$out/results/attention.log"
tar czf "$out/results.tgz" -C "$out" results && rm -rf "$out/results"
