#!/usr/bin/env bash
# One device-machine call: install, GPU tests, sweeps. Usage: bench/gpu_session.sh PART OUTDIR
#   PART=tests   GPU test suite (collectives + attention), then the all-reduce sweep on all GPUs
#   PART=more    the sweep on 2 GPUs, then the one-GPU attention benchmark
set -uo pipefail
part=$1; out=$2
mkdir -p "$out/results"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
{ nvidia-smi -L; nvidia-smi topo -m; python3 -c "import torch, triton, numpy; print(torch.__version__, triton.__version__, numpy.__version__)"; } 2>&1 | tee "$out/env.txt"
if [ "$part" = tests ]; then
  timeout 330 python3 -m pytest -q -rs -x -s tests/collectives/test_all_reduce_gpu.py tests/attention/test_attention_gpu.py \
     -p no:cacheprovider 2>&1 | tail -60 | tee "$out/gpu_tests.log"
  timeout 240 python3 -m torch.distributed.run --standalone --nproc-per-node="$n" bench/all_reduce_sweep.py \
     --out "$out/results" 2>&1 | grep -v "it/s\]" | tail -60 | tee "$out/sweep_x$n.log"
else
  CUDA_VISIBLE_DEVICES=0,1 timeout 240 python3 -m torch.distributed.run --standalone --nproc-per-node=2 \
     bench/all_reduce_sweep.py --out "$out/results" 2>&1 | grep -v "it/s\]" | tail -60 | tee "$out/sweep_x2.log"
  timeout 240 python3 bench/attention_chunk_bench.py --out "$out/results" 2>&1 | tail -60 | tee "$out/attention.log"
fi
tar czf "$out/results.tgz" -C "$out" results && rm -rf "$out/results"
