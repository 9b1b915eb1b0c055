"""The CUDA kernels (csrc/dda/layout.h) and the Triton kernels share one workspace protocol, owned by
shardkit/memory/protocol.py: the header is compiled with the host compiler and every constant, the
FFI dtype codes and the epoch-buffer rule must agree with the Python owner (and the Triton side
must use the owner's constants)."""
import os
import shutil
import subprocess

import pytest
import torch

from shardkit.kernels import sync
from shardkit.memory import protocol

HEADER_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "dda")
EPOCHS = (0, 1, 2, 7, 2**32 - 1)
BUFFER_BYTES = 12288

PROGRAM = r"""
#include <cstdio>
#include "layout.h"
using namespace shardkit;
int main() {
  std::printf("MAX_WORLD %d\nMAX_PROGRAMS %d\nNUM_STAGES %d\n", kMaxWorld, kMaxPrograms, kNumStages);
  std::printf("EPOCH_OFF %lld\nDONE_OFF %lld\nERROR_OFF %lld\nSLOTS_OFF %lld\nSIGNAL_BYTES %lld\n",
              (long long)kEpochOff, (long long)kDoneOff, (long long)kErrorOff, (long long)kSlotsOff,
              (long long)kSignalBytes);
  std::printf("OK %d\nARRIVED %d\nMISMATCH %d\nTIMEOUT %d\nABORTED %d\n", kOk, kArrived, kMismatch, kTimeout,
              kAborted);
  std::printf("float32 %d\nfloat16 %d\nbfloat16 %d\n", int(DType::kFloat32), int(DType::kFloat16),
              int(DType::kBFloat16));
  const unsigned epochs[] = {EPOCHS};
  for (unsigned e : epochs)
    std::printf("buffer_%u %lld\n", e, (long long)epoch_buffer_offset(e, BUFFER_BYTES));
  return 0;
}
"""


@pytest.fixture(scope="module")
def header_values(tmp_path_factory) -> dict:
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on this machine to compile csrc/dda/layout.h")
    d = tmp_path_factory.mktemp("layout")
    src, exe = d / "layout.cpp", d / "layout"
    src.write_text(PROGRAM.replace("EPOCHS", ", ".join(f"{e}u" for e in EPOCHS))
                   .replace("BUFFER_BYTES", str(BUFFER_BYTES)))
    subprocess.run([cxx, "-std=c++17", "-I", HEADER_DIR, str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_constants_match_the_protocol(header_values):
    for name in ("MAX_WORLD", "MAX_PROGRAMS", "NUM_STAGES", "EPOCH_OFF", "DONE_OFF", "ERROR_OFF", "SLOTS_OFF",
                 "SIGNAL_BYTES", "OK", "ARRIVED", "MISMATCH", "TIMEOUT", "ABORTED"):
        assert header_values[name] == getattr(protocol, name), name


def test_dtype_codes_match_the_protocol(header_values):
    for dtype, code in protocol.DTYPE_CODES.items():
        assert header_values[str(dtype).removeprefix("torch.")] == code, dtype
    assert set(protocol.DTYPE_CODES) == {torch.float32, torch.float16, torch.bfloat16}


def test_epoch_buffer_rule_matches_the_protocol(header_values):
    for e in EPOCHS:
        assert header_values[f"buffer_{e}"] == protocol.epoch_buffer_offset(e, BUFFER_BYTES), e


def test_triton_side_uses_the_protocol_constants():
    for name in ("MAX_WORLD", "MAX_PROGRAMS", "SIGNAL_BYTES", "SLOTS_OFF", "EPOCH_MOD", "LOCAL_WAIT_SLOT"):
        assert getattr(sync, name) == getattr(protocol, name), name
