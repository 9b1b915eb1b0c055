// Workspace layout shared with the Triton kernels (shardkit/kernels/sync.py): keep the two in step.
// tests/kernels/test_cuda_layout.py checks that the numbers agree.
#pragma once
#include <cstdint>

namespace shardkit {

constexpr int kMaxWorld = 8;
constexpr int kMaxPrograms = 256;
constexpr int kNumStages = 3;
constexpr int64_t kEpochOff = 0;     // int64 epoch, modulo 2**32 (local only)
constexpr int64_t kDoneOff = 8;      // int32 programs finished in the running call (local only)
constexpr int64_t kErrorOff = 16;    // int32[4] error record, device copy (local only)
constexpr int64_t kSlotsOff = 128;   // uint64 flags[kNumStages * kMaxPrograms][kMaxWorld]
constexpr int64_t kSignalBytes = 64 * 1024;

enum Status : int { kOk = 0, kArrived = 1, kMismatch = 2, kTimeout = 3, kAborted = 4 };

static_assert(kSlotsOff + int64_t(kNumStages) * kMaxPrograms * kMaxWorld * 8 <= kSignalBytes,
              "flag slots must fit in the signal area");

// Every rank's workspace base address, valid in this process. Passed by value to kernels.
struct PeerTable {
  char* base[kMaxWorld];
};

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One all-reduce call on one rank (host side). Same meaning as the Triton launchers' arguments.
struct AllReduceArgs {
  const void* x;          // [numel] this rank's input (ignored when zero_copy)
  void* out;              // [numel] output, may alias x
  PeerTable table;        // workspaces of ranks 0..world-1
  int* host_status;       // int32[4] error record in device-visible host memory
  int64_t numel;
  int rank;
  int world;              // 2..kMaxWorld
  uint32_t sig;           // 31-bit call signature, equal on all ranks
  int64_t x_offset;       // zero_copy: byte offset of x inside every workspace
  int64_t half_bytes;     // bytes of one half of the double-buffered staging area
  int64_t timeout_iters;  // barrier polls before giving up
  bool zero_copy;
  int programs;           // grid size, 1..kMaxPrograms
  int threads;            // threads per program, a multiple of 32 and >= world
  int unroll;             // 16-byte packs per thread per tile, all in flight: tree 1..max_unroll(world), flat 1
  DType dtype;
};

}  // namespace shardkit
