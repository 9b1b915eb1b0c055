"""The CUDA kernels (csrc/dda/layout.h) and the Triton kernels share one workspace protocol, owned by
shardkit/memory/protocol.py: the header is compiled with the host compiler and every constant, the
FFI dtype codes, the epoch-buffer rule and the LL slot rule must agree with the Python owner (and the Triton side
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
  std::printf("LL_CALLS_OFF %lld\nLL_MAX_BYTES %lld\nLL_HEADER_BYTES %lld\nLL_SLOT_BYTES %lld\nLL_CLEAN_PERIOD %u\n",
              (long long)kLLCallsOff, (long long)kLLMaxBytes, (long long)kLLHeaderBytes, (long long)kLLSlotBytes,
              kLLCleanPeriod);
  const unsigned epochs[] = {EPOCHS};
  for (unsigned e : epochs) {
    std::printf("buffer_%u %lld\n", e, (long long)epoch_buffer_offset(e, BUFFER_BYTES));
    for (int world = 2; world <= kMaxWorld; world += 3)
      for (int source = 0; source < world; source += 2)
        std::printf("ll_slot_%u_%d_%d %lld\n", e, source, world, (long long)ll_slot_offset(e, source, world, BUFFER_BYTES));
  }
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


def test_ll_layout_matches_the_protocol(header_values):
    for name in ("LL_CALLS_OFF", "LL_MAX_BYTES", "LL_HEADER_BYTES", "LL_SLOT_BYTES", "LL_CLEAN_PERIOD"):
        assert header_values[name] == getattr(protocol, name), name
    checked = 0
    for e in EPOCHS:  # LL call counts, here: the slot's parity is the count's
        for world in range(2, protocol.MAX_WORLD + 1, 3):
            for source in range(0, world, 2):
                assert header_values[f"ll_slot_{e}_{source}_{world}"] == protocol.ll_slot_offset(
                    e, source, world, BUFFER_BYTES), (e, source, world)
                checked += 1
    assert checked == len(EPOCHS) * (1 + 3 + 4)
    # The cleaning period must divide 2**32 (so k % period is the same for k and k mod 2**32) and leave
    # the previous period + 1 calls' flags distinct from this call's.
    assert protocol.LL_CLEAN_PERIOD & (protocol.LL_CLEAN_PERIOD - 1) == 0 and protocol.LL_CLEAN_PERIOD + 2 < 2**32
    last = protocol.ll_slot_offset(1, protocol.MAX_WORLD - 1, protocol.MAX_WORLD, BUFFER_BYTES) + protocol.LL_SLOT_BYTES
    assert last == protocol.workspace_bytes(BUFFER_BYTES, protocol.MAX_WORLD)


def test_triton_side_uses_the_protocol_constants():
    for name in ("MAX_WORLD", "MAX_PROGRAMS", "SIGNAL_BYTES", "SLOTS_OFF", "EPOCH_MOD", "LOCAL_WAIT_SLOT"):
        assert getattr(sync, name) == getattr(protocol, name), name
