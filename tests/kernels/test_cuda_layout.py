"""The CUDA kernels (csrc/dda/layout.h) and the Triton kernels (shardkit/kernels/sync.py) share one
workspace layout and flag protocol: their constants must agree."""
import os
import re

from shardkit.kernels import sync

HEADER = os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "dda", "layout.h")


def header_constants() -> dict:
    text = open(HEADER).read()
    found = {name: eval(expr, {}) for name, expr in re.findall(r"constexpr \w+ k(\w+) = ([0-9 *]+);", text)}
    found.update({name: int(v) for name, v in re.findall(r"\bk(\w+) = (\d+)[,\s}]", text.split("enum Status")[1])})
    return found


def test_layout_matches_triton():
    c = header_constants()
    assert c["MaxWorld"] == sync.MAX_WORLD
    assert c["MaxPrograms"] == sync.MAX_PROGRAMS
    assert c["NumStages"] == sync.NUM_STAGES
    assert c["EpochOff"] == sync.EPOCH_OFF
    assert c["DoneOff"] == sync.DONE_OFF
    assert c["ErrorOff"] == sync.ERROR_OFF
    assert c["SlotsOff"] == sync.SLOTS_OFF
    assert c["SignalBytes"] == sync.SIGNAL_BYTES
    assert (c["Ok"], c["Arrived"], c["Mismatch"], c["Timeout"], c["Aborted"]) == (
        sync.OK, sync.ARRIVED, sync.MISMATCH, sync.TIMEOUT, sync.ABORTED)
