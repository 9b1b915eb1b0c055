#!/usr/bin/env bash
# shardkit's two commands, and CI's third; each sets up what it needs first.
#   ./run.sh sweep [args]   NCCL vs DDA all-reduce sweep (GPUs: torchrun over all local GPUs;
#                           no GPU: the same Triton kernels in the interpreter on a CPU world of 4)
#   ./run.sh test [args]    the test suite (pytest)
#   ./run.sh test-newest [args]  the error-path tests (or the tests named in the pytest args) on the newest
#                           torch / triton / numpy releases (requirements/newest.txt, in .venv-newest; CPU only)
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
  setup_venv .venv "$req"
}

# setup_venv DIR REQUIREMENTS: a venv in DIR with REQUIREMENTS and shardkit (editable); PY is its python.
setup_venv() {
  local dir=$1 req=$2
  [ -x "$dir/bin/python" ] || python3 -m venv "$dir"
  PY=$dir/bin/python
  local stamp="$dir/.installed-$(cksum < "$req" | cut -d' ' -f1)"
  if [ ! -f "$stamp" ]; then
    $PY -m pip install -q --upgrade pip
    $PY -m pip install -q -r "$req"
    $PY -m pip install -q --no-deps --no-build-isolation -e .
    touch "$stamp"
  fi
}

# The error paths (barrier mismatch / timeout / row wait in the interpreter, bad arguments, closed
# communicators): where a new triton or numpy broke the kernels before (issue 10).
ERROR_PATH_TESTS=(
  tests/collectives/test_errors.py
  tests/collectives/test_all_reduce_rmsnorm.py::test_ranks_disagreeing_all_raise
  tests/collectives/test_all_reduce_rmsnorm.py::test_row_wait_that_cannot_finish_raises_instead_of_hanging
  tests/collectives/test_all_reduce_rmsnorm.py::test_bad_inputs_raise_clear_errors
  tests/collectives/test_world_one.py
  tests/collectives/test_host_path.py  # the torch binding (csrc/torch), built against the newest torch
)

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
  test-newest)
    setup_venv .venv-newest requirements/newest.txt
    # The newest torch wheel is a CUDA build: hide any GPU, so that every kernel runs in the interpreter.
    for arg in "$@"; do [[ $arg == tests* || $arg == *.py* ]] && paths_given=1; done
    [ -n "${paths_given:-}" ] || set -- "${ERROR_PATH_TESTS[@]}" "$@"  # no tests named: the error paths
    CUDA_VISIBLE_DEVICES="" exec $PY -m pytest -q "$@" ;;
  *)
    echo "usage: ./run.sh sweep [args] | ./run.sh test [pytest args] | ./run.sh test-newest [pytest args]" >&2
    exit 2 ;;
esac
