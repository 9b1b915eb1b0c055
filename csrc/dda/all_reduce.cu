// DDA flat (one-shot) and tree (two-shot) all-reduce in CUDA C++: the same algorithms, workspace
// and protocol as shardkit/kernels/all_reduce_{flat,tree}.py (see their docstrings for the design),
// with 16-byte vector accesses and one thread per peer in the barrier.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <type_traits>

#include "all_reduce.h"
#include "sync.cuh"

namespace shardkit {
namespace {

template <typename T> __device__ __forceinline__ float to_float(T v) { return float(v); }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v) { return T(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16(v); }

// VEC elements moved as one unit: 16 bytes when the call is aligned, else one element.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const char* base, int64_t byte_off, int64_t i) {
  // .cg: peer data must not be served from a stale L1 line of an earlier call.
  const Pack<T, VEC>* p = reinterpret_cast<const Pack<T, VEC>*>(base + byte_off) + i;
  if constexpr (sizeof(Pack<T, VEC>) == 16) {
    const int4 raw = __ldcg(reinterpret_cast<const int4*>(p));
    return *reinterpret_cast<const Pack<T, VEC>*>(&raw);
  } else {
    return *p;
  }
}

// Stage packs [lo, hi) of x into `dst` with the block -> pack map used by the reduction that
// follows: block b only ever reads what the peers' block b staged (it only waits for block b).
template <typename T, int VEC>
__device__ void stage(const T* x, char* dst, int64_t lo, int64_t hi) {
  const Pack<T, VEC>* src = reinterpret_cast<const Pack<T, VEC>*>(x);
  Pack<T, VEC>* d = reinterpret_cast<Pack<T, VEC>*>(dst);
  for (int64_t i = lo + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < hi; i += int64_t(gridDim.x) * blockDim.x) {
    d[i] = src[i];
  }
}

// Sum of pack i over ranks 0..WORLD-1 in rank order (fp32), or NaN when the call failed.
template <typename T, int VEC, int WORLD>
__device__ __forceinline__ Pack<T, VEC> sum_pack(const PeerTable& t, int64_t byte_off, int64_t i, bool ok) {
  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = ok ? 0.f : NAN;
  if (ok) {
    Pack<T, VEC> in[WORLD];
#pragma unroll
    for (int r = 0; r < WORLD; ++r) in[r] = load_pack<T, VEC>(t.base[r], byte_off, i);  // all loads in flight
#pragma unroll
    for (int r = 0; r < WORLD; ++r) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += to_float(in[r].v[k]);
    }
  }
  Pack<T, VEC> out;
#pragma unroll
  for (int k = 0; k < VEC; ++k) out.v[k] = from_float<T>(acc[k]);
  return out;
}

template <typename T, int VEC, int WORLD>
__global__ void flat_kernel(AllReduceArgs a) {
  const CallState cs = start_call(a.table, a.rank, a.sig);
  const int64_t half = kSignalBytes + a.half_bytes * (1 + (cs.epoch & 1));
  const int64_t src = a.zero_copy ? a.x_offset : half;
  const int64_t packs = a.numel / VEC;
  bool ok = cs.ok;
  if (ok && !a.zero_copy) stage<T, VEC>(static_cast<const T*>(a.x), a.table.base[a.rank] + half, 0, packs);
  if (ok) ok = block_barrier(a.table, a.rank, WORLD, blockIdx.x, cs, a.host_status, a.timeout_iters);
  Pack<T, VEC>* out = static_cast<Pack<T, VEC>*>(a.out);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < packs; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = sum_pack<T, VEC, WORLD>(a.table, src, i, ok);
  }
  if (ok && a.zero_copy) {
    block_barrier(a.table, a.rank, WORLD, kMaxPrograms + blockIdx.x, cs, a.host_status, a.timeout_iters);
  }
  finish_call(a.table, a.rank, cs.epoch);
}

template <typename T, int VEC, int WORLD>
__global__ void tree_kernel(AllReduceArgs a, int64_t shard) {
  const CallState cs = start_call(a.table, a.rank, a.sig);
  const int64_t half = kSignalBytes + a.half_bytes * (1 + (cs.epoch & 1));
  const int64_t src = a.zero_copy ? a.x_offset : half;
  const int64_t packs = a.numel / VEC, shard_packs = shard / VEC;
  char* own = a.table.base[a.rank];
  bool ok = cs.ok;
  if (ok && !a.zero_copy) {
    for (int s = 0; s < WORLD; ++s) {  // shard by shard, with the reduction's block map
      const int64_t lo = s * shard_packs, hi = min(lo + shard_packs, packs);
      for (int64_t i = lo + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < hi; i += int64_t(gridDim.x) * blockDim.x) {
        reinterpret_cast<Pack<T, VEC>*>(own + half)[i] = reinterpret_cast<const Pack<T, VEC>*>(a.x)[i];
      }
    }
  }
  if (ok) ok = block_barrier(a.table, a.rank, WORLD, blockIdx.x, cs, a.host_status, a.timeout_iters);
  Pack<T, VEC>* out = static_cast<Pack<T, VEC>*>(a.out);
  {  // reduce-scatter: our shard, summed over all ranks, into out and into our half
    const int64_t lo = a.rank * shard_packs, hi = min(lo + shard_packs, packs);
    for (int64_t i = lo + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < hi; i += int64_t(gridDim.x) * blockDim.x) {
      const Pack<T, VEC> v = sum_pack<T, VEC, WORLD>(a.table, src, i, ok);
      out[i] = v;
      if (ok) reinterpret_cast<Pack<T, VEC>*>(own + half)[i] = v;
    }
  }
  if (ok) ok = block_barrier(a.table, a.rank, WORLD, kMaxPrograms + blockIdx.x, cs, a.host_status, a.timeout_iters);
  for (int j = 1; j < WORLD; ++j) {  // all-gather: the peers' reduced shards
    const int s = (a.rank + j) % WORLD;
    const int64_t lo = s * shard_packs, hi = min(lo + shard_packs, packs);
    for (int64_t i = lo + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < hi; i += int64_t(gridDim.x) * blockDim.x) {
      Pack<T, VEC> v;
      if (ok) {
        v = load_pack<T, VEC>(a.table.base[s], half, i);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v.v[k] = from_float<T>(NAN);
      }
      out[i] = v;
    }
  }
  finish_call(a.table, a.rank, cs.epoch);
}

template <typename T, template <typename, int, int> class Launch, typename... Extra>
cudaError_t dispatch(const AllReduceArgs& a, cudaStream_t stream, Extra... extra) {
  constexpr int kVec = 16 / sizeof(T);
  if (a.numel * int64_t(sizeof(T)) > a.half_bytes) return cudaErrorInvalidValue;  // chunk on the host
  const bool aligned = a.numel % kVec == 0 && reinterpret_cast<uintptr_t>(a.x) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(a.out) % 16 == 0 && a.x_offset % 16 == 0;
  auto go = [&](auto vec) -> cudaError_t {
    constexpr int V = decltype(vec)::value;
    switch (a.world) {
      case 2: return Launch<T, V, 2>::run(a, stream, extra...);
      case 3: return Launch<T, V, 3>::run(a, stream, extra...);
      case 4: return Launch<T, V, 4>::run(a, stream, extra...);
      case 5: return Launch<T, V, 5>::run(a, stream, extra...);
      case 6: return Launch<T, V, 6>::run(a, stream, extra...);
      case 7: return Launch<T, V, 7>::run(a, stream, extra...);
      case 8: return Launch<T, V, 8>::run(a, stream, extra...);
      default: return cudaErrorInvalidValue;
    }
  };
  return aligned ? go(std::integral_constant<int, kVec>{}) : go(std::integral_constant<int, 1>{});
}

template <typename T, int VEC, int WORLD> struct FlatLaunch {
  static cudaError_t run(const AllReduceArgs& a, cudaStream_t stream) {
    flat_kernel<T, VEC, WORLD><<<a.programs, a.threads, 0, stream>>>(a);
    return cudaGetLastError();
  }
};

template <typename T, int VEC, int WORLD> struct TreeLaunch {
  static cudaError_t run(const AllReduceArgs& a, cudaStream_t stream, int64_t shard) {
    tree_kernel<T, VEC, WORLD><<<a.programs, a.threads, 0, stream>>>(a, shard);
    return cudaGetLastError();
  }
};

bool valid(const AllReduceArgs& a) {
  return a.world >= 2 && a.world <= kMaxWorld && a.rank >= 0 && a.rank < a.world && a.programs >= 1 &&
         a.programs <= kMaxPrograms && a.threads >= a.world && a.threads % 32 == 0 && a.threads <= 1024 &&
         a.numel >= 0;
}

}  // namespace

cudaError_t flat_all_reduce(const AllReduceArgs& a, cudaStream_t stream) {
  if (!valid(a)) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return dispatch<float, FlatLaunch>(a, stream);
    case DType::kFloat16: return dispatch<__half, FlatLaunch>(a, stream);
    case DType::kBFloat16: return dispatch<__nv_bfloat16, FlatLaunch>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t tree_all_reduce(const AllReduceArgs& a, int64_t shard, cudaStream_t stream) {
  if (!valid(a) || shard % 16 != 0 || shard * a.world < a.numel) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return dispatch<float, TreeLaunch>(a, stream, shard);
    case DType::kFloat16: return dispatch<__half, TreeLaunch>(a, stream, shard);
    case DType::kBFloat16: return dispatch<__nv_bfloat16, TreeLaunch>(a, stream, shard);
  }
  return cudaErrorInvalidValue;
}

}  // namespace shardkit
