// The workspace protocol shared with the Triton kernels: the twin of shardkit/memory/protocol.py (its
// one Python owner; read its docstring for the layout). tests/kernels/test_cuda_layout.py compiles this
// header and checks that every constant, the dtype codes and the epoch-buffer rule agree.
#pragma once
#include <cstdint>

// The header is plain C++ too (tests/kernels/test_cuda_layout.py compiles it with the host compiler).
#ifdef __CUDACC__
#define SHARDKIT_HOST_DEVICE __host__ __device__
#else
#define SHARDKIT_HOST_DEVICE
#endif

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

// Byte offset of the epoch buffer a call of `epoch` stages into: [signal][staging][buffer 0][buffer 1]
// (protocol.epoch_buffer_offset).
SHARDKIT_HOST_DEVICE constexpr int64_t epoch_buffer_offset(uint32_t epoch, int64_t buffer_bytes) {
  return kSignalBytes + buffer_bytes * (1 + int64_t(epoch & 1));
}

static_assert(kSlotsOff + int64_t(kNumStages) * kMaxPrograms * kMaxWorld * 8 <= kSignalBytes,
              "flag slots must fit in the signal area");

// Every rank's workspace base address, valid in this process. Passed by value to kernels.
struct PeerTable {
  char* base[kMaxWorld];
};

// FFI dtype codes (protocol.DTYPE_CODES).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One all-reduce call on one rank (host side). Same meaning as the Triton launchers' arguments.
struct AllReduceArgs {
  const void* x;          // [numel] this rank's input (ignored when zero_copy)
  void* out;              // [numel] output, may alias x
  PeerTable table;        // workspaces of ranks 0..world-1
  int* host_error_record;       // int32[4] error record in device-visible host memory
  int64_t numel;
  int rank;
  int world;              // 2..kMaxWorld
  uint32_t sig;           // 31-bit call signature, equal on all ranks
  int64_t x_offset;       // zero_copy: byte offset of x inside every workspace
  int64_t buffer_bytes;   // bytes of one epoch buffer (and of the staging area)
  int64_t timeout_iters;  // barrier polls before giving up
  bool zero_copy;
  int programs;           // grid size, 1..kMaxPrograms
  int threads;            // threads per program, a multiple of 32 and >= world
  int unroll;             // 16-byte packs per thread per tile, all in flight: tree 1..max_unroll(world), flat 1
  DType dtype;
};

}  // namespace shardkit
