// Cross-rank block barrier, call epoch and error record: the CUDA twin of shardkit/kernels/sync.py
// (same flags, same slots, same epoch rules; see that file's docstring for why each rule exists).
// Thread r < world publishes our arrival to rank r and waits for rank r's arrival, so each peer is
// handled by one thread and the block joins with __syncthreads (PyTorch's symm-mem barrier and
// vLLM's custom all-reduce use the same shape).
#pragma once
#include <cstdint>

#include "layout.h"

namespace shardkit {

__device__ __forceinline__ uint64_t* flag_slot(char* base, int slot, int who) {
  return reinterpret_cast<uint64_t*>(base + kSlotsOff + (int64_t(slot) * kMaxWorld + who) * 8);
}

__device__ __forceinline__ void store_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t load_volatile(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

struct CallState {
  uint32_t epoch;    // this call's epoch (modulo 2**32)
  uint64_t flag;     // sig << 32 | epoch
  uint32_t ll_call;  // this call's number among the LL calls (modulo 2**32), if it is one (ll_all_reduce.cu)
  bool ok;           // no earlier failure recorded on this rank
};

// Read the epoch and the device error record once per block; every thread gets the same values.
__device__ inline CallState start_call(const PeerTable& t, int rank, uint32_t sig) {
  __shared__ CallState s;
  if (threadIdx.x == 0) {
    char* own = t.base[rank];
    const uint32_t epoch =
        uint32_t(*reinterpret_cast<volatile int64_t*>(own + kEpochOff)) + 1u;  // wraps modulo 2**32
    s.epoch = epoch;
    s.flag = (uint64_t(sig) << 32) | epoch;
    s.ll_call = uint32_t(*reinterpret_cast<volatile int64_t*>(own + kLLCallsOff)) + 1u;
    s.ok = *reinterpret_cast<volatile int*>(own + kErrorOff) == 0;
  }
  __syncthreads();
  return s;
}

__device__ inline void record_error(const PeerTable& t, int rank, int* host_error_record, int code, int slot,
                                    int culprits, uint32_t epoch) {
  int* device_record = reinterpret_cast<int*>(t.base[rank] + kErrorOff);
  if (atomicCAS(device_record, 0, code) == 0) {
    // Plain stores to host memory, a system fence, then the code the host polls (no atomics on host
    // memory: the GPU may not support them there; see sync.py's record_error).
    volatile int* host = host_error_record;
    host[1] = slot;
    host[2] = culprits;
    host[3] = int(epoch);
    __threadfence_system();
    host[0] = code;
  }
}

// Barrier with the same-numbered block of every rank; returns true on success. All threads call it.
// `slot` = stage * kMaxPrograms + blockIdx.x.
__device__ inline bool block_barrier(const PeerTable& t, int rank, int world, int slot, const CallState& cs,
                                     int* host_error_record, int64_t timeout_iters) {
  __shared__ int s_code;
  __shared__ int s_culprits;
  if (threadIdx.x == 0) {
    s_code = 0;
    s_culprits = 0;
  }
  __syncthreads();  // the block's earlier stores precede the release below (cumulativity)
  const int peer = threadIdx.x;
  if (peer < world) {
    store_release_sys(flag_slot(t.base[peer], slot, rank), cs.flag);
    const uint64_t* mine = flag_slot(t.base[rank], slot, peer);
    const volatile int* device_record = reinterpret_cast<const volatile int*>(t.base[rank] + kErrorOff);
    int code = 0;
    for (int64_t it = 1;; ++it) {
      const uint64_t seen = load_volatile(mine);
      const uint32_t lag = uint32_t(seen) - cs.epoch;  // 0: this call; small: peer already ahead
      if (lag < 0x80000000u) {
        code = (lag == 0 && seen != cs.flag) ? kMismatch : kArrived;
        break;
      }
      if (it > timeout_iters) {
        code = kTimeout;
        break;
      }
      if ((it & 1023) == 0 && *device_record != 0) {
        code = kAborted;
        break;
      }
    }
    if (code == kArrived) {
      load_acquire_sys(mine);
    } else {
      atomicMax(&s_code, code);
      if (code != kAborted) atomicOr(&s_culprits, 1 << peer);
    }
  }
  __syncthreads();
  const int code = s_code;
  if (threadIdx.x == 0 && (code == kMismatch || code == kTimeout)) {
    record_error(t, rank, host_error_record, code, slot, s_culprits, cs.epoch);
  }
  return code == 0;
}

// Count this block as done; the last block of the launch publishes the new epoch (and, for an LL call,
// `ll_call` >= 0, the new LL call count): every block read both at its start.
__device__ inline void finish_call(const PeerTable& t, int rank, uint32_t epoch, int64_t ll_call = -1) {
  __syncthreads();
  if (threadIdx.x == 0) {
    char* own = t.base[rank];
    __threadfence();
    const unsigned finished = atomicAdd(reinterpret_cast<unsigned*>(own + kDoneOff), 1u);
    if (finished == gridDim.x - 1) {
      *reinterpret_cast<volatile unsigned*>(own + kDoneOff) = 0u;
      *reinterpret_cast<volatile int64_t*>(own + kEpochOff) = int64_t(epoch);
      if (ll_call >= 0) *reinterpret_cast<volatile int64_t*>(own + kLLCallsOff) = ll_call;
      __threadfence();
    }
  }
}

}  // namespace shardkit
