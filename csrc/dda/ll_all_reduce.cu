// LL all-reduce: one synchronisation per call, the flags carried in the data (NCCL's LL protocol:
// nccl/src/device/prims_ll.h, 16-byte stores of {data, flag, data, flag} polled until both flags match).
//
// Every rank PUSHES its input into its own slot of every peer's LL region (layout.h, protocol.py) as
// 16-byte lines {4 data bytes, flag, 4 data bytes, flag}, flag = k, the number of this LL call on the rank
// (1, 2, ... modulo 2**32; CallState::ll_call), one st.volatile.v4 per line and peer. Then it polls its OWN
// region until every line of every peer's slot carries flag k, sums all ranks' values in rank order in fp32
// (its own values straight from x) and writes out. The flat kernel instead stages, meets the peers at a
// block barrier and PULLS the peers' copies: a remote read is an NVLink round trip, a push is one way, and
// the barrier's signal write + poll is gone because every line is its own signal. Sums are the flat
// kernel's (0 + x_0 + x_1 + ... in fp32, the same conversions): bitwise equal to it, and equal on all ranks.
//
// Why one synchronisation is enough. LL call k uses the slots of parity k % 2. Rank A pushes into rank B's
// parity-p slot in call k+2 only after its call k+1 kernel saw all of B's call k+1 lines, which B pushed
// only in its call k+1 kernel, i.e. after its call k kernel (all of its reads of the parity-p slots)
// finished (one stream per rank: kernels of a rank run in order). So a rank is never two LL calls ahead of a
// peer's reads, and the two parities never collide. Other algorithms never touch the LL region, so calls of
// other kinds in between change nothing (the epoch still counts every call; the LL count only LL calls).
//
// Why flags need no reset. A line read in call k is trusted iff both its flags equal k mod 2**32. Written
// lines only ever carry the flag of the LL call that pushed them, so a stale line could pass only if it
// was pushed by a call k' = k - m * 2**32. The region is zeroed at allocation (PeerMemory), and calls with
// k % kLLCleanPeriod < 2 push whole slots (zeros beyond the message), so every line of a slot of parity p
// was rewritten within the last kLLCleanPeriod + 2 LL calls (or still holds 0 while k < kLLCleanPeriod):
// its flag is one of the previous kLLCleanPeriod + 1 calls', all distinct from k modulo 2**32, or 0, which no
// call before the first wrap uses. Wrap-around of k is therefore safe; no host-side reset is needed, and a
// CUDA graph replays the launch unchanged (k lives in device memory, kLLCallsOff).
//
// Protocol guarantees kept: the first line of a slot is a header {sig, k, sig, k}: ranks that disagree
// about the call (count, dtype, chunking, grid) see another signature with this call's flag and fail with
// kMismatch (threads waiting for lines that never come stop too); a peer that never pushes gives kTimeout
// naming it after timeout_iters polls; an earlier failure on this rank (error record) makes the call write
// NaN without waiting. Any world size 2..8, any count up to kLLMaxBytes of payload, any alignment
// (8-byte vector accesses where x and out allow it, element by element else and in the tail line).
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "all_reduce.h"
#include "convert.cuh"
#include "ll.cuh"

namespace shardkit {
namespace {

// The 8 payload bytes of line i of x (numel elements); elements past the end are 0.
template <typename T, bool ALIGNED>
__device__ __forceinline__ uint2 load_payload(const T* x, int64_t i, int64_t numel) {
  constexpr int E = 8 / sizeof(T);
  if (ALIGNED && (i + 1) * E <= numel) return *reinterpret_cast<const uint2*>(x + i * E);
  uint2 u = make_uint2(0u, 0u);
  T* v = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    if (i * E + e < numel) v[e] = x[i * E + e];
  }
  return u;
}

template <typename T, bool ALIGNED>
__device__ __forceinline__ void store_payload(T* out, int64_t i, int64_t numel, uint2 u) {
  constexpr int E = 8 / sizeof(T);
  if (ALIGNED && (i + 1) * E <= numel) {
    *reinterpret_cast<uint2*>(out + i * E) = u;
    return;
  }
  const T* v = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    if (i * E + e < numel) out[i * E + e] = v[e];
  }
}

// Lines map to threads as first + j * stride (the same map for the push and the reduction, so that in
// place every line of x is read before the same thread overwrites it). Blocks never wait for each other.
template <typename T, int WORLD, bool ALIGNED>
__global__ void __launch_bounds__(1024) ll_kernel(AllReduceArgs a) {  // 1024 threads: ctest's largest block
  constexpr int E = 8 / sizeof(T);
  __shared__ LLVerdict s_verdict;
  const CallState cs = start_call(a.table, a.rank, a.sig);
  ll_verdict_start(s_verdict, cs.ok);
  const uint32_t k = cs.ll_call;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const int64_t lines = (a.numel + E - 1) / E;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t pushed = ll_slot_offset(k, a.rank, WORLD, a.buffer_bytes);  // our slot in every workspace
  if (cs.ok) {
    push_header<WORLD>(a.table, a.rank, pushed, a.sig, k);
    for (int64_t i = first; i < lines; i += stride) {
      push_line<WORLD>(a.table, a.rank, pushed, i, load_payload<T, ALIGNED>(x, i, a.numel), k);
    }
    clean_slot<WORLD>(a.table, a.rank, pushed, lines, k);  // the rest of the slot, every kLLCleanPeriod calls
  }
  __syncthreads();  // s_* initialised
  const char* own = a.table.base[a.rank];
  const volatile int* device_record = reinterpret_cast<const volatile int*>(own + kErrorOff);
  int64_t it = 0;
  bool header_checked = false;
  // Block-uniform loop over the block's tiles (a __syncthreads per tile shares the verdict).
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < lines; base += stride) {
    const int64_t i = base + threadIdx.x;
    uint4 got[WORLD];
    uint2 mine = make_uint2(0u, 0u);
    if (s_verdict.stop == 0) {
      int code = kArrived, culprit = -1;
      if (!header_checked) {
        code = check_header<WORLD>(a.table, a.rank, a.sig, k, a.buffer_bytes, it, a.timeout_iters, device_record,
                                   &s_verdict.stop);
        culprit = threadIdx.x;
      }
      header_checked = true;
      if (i < lines) {
        mine = load_payload<T, ALIGNED>(x, i, a.numel);
#pragma unroll
        for (int r = 0; r < WORLD; ++r) {
          if (r == a.rank || code != kArrived) continue;
          code = wait_line(own + ll_slot_offset(k, r, WORLD, a.buffer_bytes) + kLLHeaderBytes + i * 16, k, got[r], it,
                           a.timeout_iters, device_record, &s_verdict.stop);
          culprit = r;
        }
      }
      ll_note(s_verdict, code, culprit);
    }
    __syncthreads();
    const bool ok = s_verdict.stop == 0;
    if (i < lines) {
      uint2 result;
      T* r_out = reinterpret_cast<T*>(&result);
      if (ok) {
        float acc[E] = {};
#pragma unroll
        for (int r = 0; r < WORLD; ++r) {
          const uint2 d = r == a.rank ? mine : make_uint2(got[r].x, got[r].z);
          const T* v = reinterpret_cast<const T*>(&d);
#pragma unroll
          for (int e = 0; e < E; ++e) acc[e] += to_float(v[e]);
        }
#pragma unroll
        for (int e = 0; e < E; ++e) r_out[e] = from_float<T>(acc[e]);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) r_out[e] = from_float<T>(NAN);
      }
      store_payload<T, ALIGNED>(out, i, a.numel, result);
    }
  }
  ll_finish(s_verdict, a.table, a.rank, a.host_error_record, cs, k);
}

template <typename T>
cudaError_t launch(const AllReduceArgs& a, cudaStream_t stream) {
  const bool aligned = reinterpret_cast<uintptr_t>(a.x) % 8 == 0 && reinterpret_cast<uintptr_t>(a.out) % 8 == 0;
  auto go = [&](auto world_c, auto aligned_c) {
    ll_kernel<T, decltype(world_c)::value, decltype(aligned_c)::value><<<a.programs, a.threads, 0, stream>>>(a);
    return cudaGetLastError();
  };
  auto by_world = [&](auto aligned_c) -> cudaError_t {
    switch (a.world) {
      case 2: return go(std::integral_constant<int, 2>{}, aligned_c);
      case 3: return go(std::integral_constant<int, 3>{}, aligned_c);
      case 4: return go(std::integral_constant<int, 4>{}, aligned_c);
      case 5: return go(std::integral_constant<int, 5>{}, aligned_c);
      case 6: return go(std::integral_constant<int, 6>{}, aligned_c);
      case 7: return go(std::integral_constant<int, 7>{}, aligned_c);
      case 8: return go(std::integral_constant<int, 8>{}, aligned_c);
      default: return cudaErrorInvalidValue;
    }
  };
  return aligned ? by_world(std::true_type{}) : by_world(std::false_type{});
}

}  // namespace

cudaError_t ll_all_reduce(const AllReduceArgs& a, cudaStream_t stream) {
  const bool valid = a.world >= 2 && a.world <= kMaxWorld && a.rank >= 0 && a.rank < a.world && a.programs >= 1 &&
                     a.programs <= kMaxPrograms && a.threads >= a.world && a.threads % 32 == 0 && a.threads <= 1024 &&
                     a.unroll == 1 && a.numel >= 0 && !a.zero_copy;
  if (!valid) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return a.numel * 4 <= kLLMaxBytes ? launch<float>(a, stream) : cudaErrorInvalidValue;
    case DType::kFloat16: return a.numel * 2 <= kLLMaxBytes ? launch<__half>(a, stream) : cudaErrorInvalidValue;
    case DType::kBFloat16: return a.numel * 2 <= kLLMaxBytes ? launch<__nv_bfloat16>(a, stream) : cudaErrorInvalidValue;
  }
  return cudaErrorInvalidValue;
}

}  // namespace shardkit
