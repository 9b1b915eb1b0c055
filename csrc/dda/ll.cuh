// The LL protocol's device side, shared by the LL all-reduce (ll_all_reduce.cu) and the LL fused all-reduce +
// residual + RMSNorm (ll_rmsnorm.cu): 16-byte lines {4 data bytes, flag, 4 data bytes, flag} pushed with one
// volatile store and polled until both flags are this LL call's number, the slot header {sig, k, sig, k} that
// carries the call's fingerprint, and the periodic rewrite of whole slots. ll_all_reduce.cu's comment argues why
// one synchronisation per call and no flag reset are enough; every kernel built on these functions keeps its
// rules: slot of parity k % 2, header pushed by block 0, every block checks every peer's header, whole slots
// pushed when k % kLLCleanPeriod < 2, the LL count published by finish_call.
#pragma once
#include <cstdint>

#include "sync.cuh"

namespace shardkit {

constexpr int64_t kLLLines = kLLMaxBytes / 8;  // payload lines of one slot

__device__ __forceinline__ void store_line(char* p, uint2 data, uint32_t flag) {
  // One 16-byte volatile store: each {data, flag} half is written at once (8-byte single-copy atomicity),
  // which is all the reader relies on.
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(data.x), "r"(flag), "r"(data.y),
               "r"(flag)
               : "memory");
}

__device__ __forceinline__ uint4 load_line(const char* p) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

// Poll the line at p until both its flags are `flag` (kArrived), for at most timeout_iters polls of this
// thread in this call (kTimeout), or until this rank failed elsewhere (kAborted: the device error record or
// the block's stop flag, checked every 1024 polls).
__device__ __forceinline__ int wait_line(const char* p, uint32_t flag, uint4& v, int64_t& it, int64_t timeout_iters,
                                         const volatile int* device_record, const volatile int* stop) {
  for (;; ++it) {
    v = load_line(p);
    if (v.y == flag && v.w == flag) return kArrived;
    if (it > timeout_iters) return kTimeout;
    if ((it & 1023) == 1023 && (*device_record != 0 || *stop != 0)) return kAborted;
  }
}

// A block's verdict on its LL call (a __shared__ LLVerdict of the kernel): the worst code and the ranks to blame
// for the error record, and stop (any failure): its threads stop waiting and write NaN.
struct LLVerdict {
  int code;
  int culprits;
  int stop;
};

// Thread 0, before the block's first __syncthreads: a call whose start failed (!ok) writes NaN without waiting.
__device__ __forceinline__ void ll_verdict_start(LLVerdict& v, bool ok) {
  if (threadIdx.x == 0) {
    v.code = 0;
    v.culprits = 0;
    v.stop = ok ? 0 : 1;
  }
}

// A thread's wait ended in `code` (kArrived: nothing to note); culprit: the rank it waited for. kAborted (this rank
// failed elsewhere) stops the block but is not this block's error to record.
__device__ __forceinline__ void ll_note(LLVerdict& v, int code, int culprit) {
  if (code == kArrived) return;
  v.stop = 1;
  if (code != kAborted) {
    atomicMax(&v.code, code);
    atomicOr(&v.culprits, 1 << culprit);
  }
}

// The end of an LL call, after the block's last wait: record the block's error (if any), then count the block as
// done (the last block publishes the new epoch and LL call count k + 1).
__device__ __forceinline__ void ll_finish(const LLVerdict& v, const PeerTable& t, int rank, int* host_error_record,
                                          const CallState& cs, uint32_t k) {
  __syncthreads();
  if (threadIdx.x == 0 && v.code != 0) {
    record_error(t, rank, host_error_record, v.code, blockIdx.x, v.culprits, cs.epoch);
  }
  finish_call(t, rank, cs.epoch, k);
}

// Block 0 pushes the header {sig, k, sig, k} of this rank's slot (byte offset `pushed`) to every peer.
template <int WORLD>
__device__ __forceinline__ void push_header(const PeerTable& t, int rank, int64_t pushed, uint32_t sig, uint32_t k) {
  if (blockIdx.x == 0 && threadIdx.x < WORLD && threadIdx.x != rank) {
    store_line(t.base[threadIdx.x] + pushed, make_uint2(sig, sig), k);
  }
}

// Push line i (a payload line index of the slot) to every peer, in a rotated order (not every rank writes
// to rank 0 first).
template <int WORLD>
__device__ __forceinline__ void push_line(const PeerTable& t, int rank, int64_t pushed, int64_t i, uint2 v, uint32_t k) {
#pragma unroll
  for (int j = 1; j < WORLD; ++j) {
    const int p = (rank + j) % WORLD;
    store_line(t.base[p] + pushed + kLLHeaderBytes + i * 16, v, k);
  }
}

// In LL calls k with k % kLLCleanPeriod < 2, rewrite the lines [used, kLLLines) of this rank's slot in every
// peer (zeros, flag k): no line grows older than the period. All threads of the grid share the work.
template <int WORLD>
__device__ __forceinline__ void clean_slot(const PeerTable& t, int rank, int64_t pushed, int64_t used, uint32_t k) {
  if (k % kLLCleanPeriod >= 2) return;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = used + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < kLLLines; i += stride) {
    push_line<WORLD>(t, rank, pushed, i, make_uint2(0u, 0u), k);
  }
}

// Thread `src` < WORLD (src != rank) of a block waits for the header of src's slot in this rank's region and
// checks its signature: kArrived, kMismatch (another call's fingerprint with this call's flag), kTimeout or
// kAborted. Other threads return kArrived at once.
template <int WORLD>
__device__ __forceinline__ int check_header(const PeerTable& t, int rank, uint32_t sig, uint32_t k, int64_t buffer_bytes,
                                            int64_t& it, int64_t timeout_iters, const volatile int* device_record,
                                            const volatile int* stop) {
  const int src = threadIdx.x;
  if (src >= WORLD || src == rank) return kArrived;
  uint4 h;
  int code = wait_line(t.base[rank] + ll_slot_offset(k, src, WORLD, buffer_bytes), k, h, it, timeout_iters,
                       device_record, stop);
  if (code == kArrived && (h.x != sig || h.z != sig)) code = kMismatch;
  return code;
}

}  // namespace shardkit
