#!/usr/bin/env bash
# shardkit's two commands; each sets up what it needs first.
#   ./run.sh sweep [args]   NCCL vs DDA all-reduce sweep (GPUs: torchrun over all local GPUs;
#                           no GPU: the same Triton kernels in the interpreter on a CPU world of 4)
#   ./run.sh test [args]    the test suite (pytest)
set -euo pipefail
cd "$(dirname "$0")"

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }

setup() {
  # A python that already has a CUDA torch and triton (e.g. a GPU image without network) is used as is.
  if have_gpu && python3 -c "import torch, triton; assert torch.cuda.is_available()" 2>/dev/null; then
    PY=python3
    $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
    return
  fi
  local req=requirements/cpu.txt
  have_gpu && req=requirements/gpu.txt
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
  local stamp=".venv/.installed-$(cksum < "$req" | cut -d' ' -f1)"
  if [ ! -f "$stamp" ]; then
    $PY -m pip install -q --upgrade pip
    $PY -m pip install -q -r "$req"
    $PY -m pip install -q --no-deps --no-build-isolation -e .
    touch "$stamp"
  fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
  sweep)
    setup
    if have_gpu; then
      n=$($PY -c "import torch; print(torch.cuda.device_count())")
      exec $PY -m torch.distributed.run --standalone --nproc-per-node="$n" bench/all_reduce_sweep.py "$@"
    else
      exec $PY bench/all_reduce_sweep.py --cpu-world 4 "$@"
    fi ;;
  test)
    setup
    # The CUDA C++ kernels (csrc/) must compile wherever nvcc is present, GPU or not.
    if command -v nvcc >/dev/null 2>&1 && command -v cmake >/dev/null 2>&1; then
      cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null
      cmake --build build/cmake -j "$(nproc)"
      if have_gpu; then ctest --test-dir build/cmake --output-on-failure; fi
    fi
    exec $PY -m pytest -q "$@" ;;
  *)
    echo "usage: ./run.sh sweep [args] | ./run.sh test [pytest args]" >&2
    exit 2 ;;
esac
