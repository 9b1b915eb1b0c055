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
constexpr int64_t kLLCallsOff = 32;  // int64 LL calls completed, modulo 2**32 (local only)
constexpr int64_t kSlotsOff = 128;   // uint64 flags[kNumStages * kMaxPrograms][kMaxWorld]
constexpr int64_t kSignalBytes = 64 * 1024;

enum Status : int { kOk = 0, kArrived = 1, kMismatch = 2, kTimeout = 3, kAborted = 4 };

// Byte offset of the epoch buffer a call of `epoch` stages into: [signal][staging][buffer 0][buffer 1]
// (protocol.epoch_buffer_offset).
SHARDKIT_HOST_DEVICE constexpr int64_t epoch_buffer_offset(uint32_t epoch, int64_t buffer_bytes) {
  return kSignalBytes + buffer_bytes * (1 + int64_t(epoch & 1));
}

// 31-bit fingerprint of a call (protocol.call_signature): the op code (protocol.OP_CODES), then every field
// in order, multiply-xor mixed modulo 2**61 (the low 61 bits of 64-bit wrapping arithmetic), then modulo
// 2**31 - 1. Equal calls give equal values on every rank and in both host paths (Python and C++).
inline uint32_t call_signature(int op_code, const int64_t* fields, int count) {
  uint64_t h = uint64_t(op_code) * 1000003u;
  for (int i = 0; i < count; ++i) {
    h = ((h ^ uint64_t(fields[i])) * 1000000007u + 2147483629u) & ((uint64_t(1) << 61) - 1);
  }
  return uint32_t(h % 2147483647u);
}

// The LL region after the epoch buffers (protocol.py's docstring; ll_all_reduce.cu argues why it is safe):
// [parity][source] slots of a 16-byte header {sig, flag, sig, flag} and 16-byte lines {data, flag, data, flag}.
constexpr int64_t kLLMaxBytes = 256 * 1024;  // payload of one LL call per rank
constexpr int64_t kLLHeaderBytes = 16;
constexpr int64_t kLLSlotBytes = kLLHeaderBytes + 2 * kLLMaxBytes;
constexpr uint32_t kLLCleanPeriod = 1u << 20;  // LL calls k with k % period < 2 push whole slots

SHARDKIT_HOST_DEVICE constexpr int64_t ll_offset(int64_t buffer_bytes) { return kSignalBytes + 3 * buffer_bytes; }

// Byte offset of the slot that LL call `calls` of rank `source` pushes into (protocol.ll_slot_offset).
SHARDKIT_HOST_DEVICE constexpr int64_t ll_slot_offset(uint32_t calls, int source, int world, int64_t buffer_bytes) {
  return ll_offset(buffer_bytes) + (int64_t(calls & 1) * world + source) * kLLSlotBytes;
}

static_assert(kErrorOff + 16 <= kLLCallsOff && kLLCallsOff + 8 <= kSlotsOff, "LL counter between the error record and the slots");
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
