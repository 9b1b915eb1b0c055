// DDA flat (one-shot) and tree (two-shot) all-reduce in CUDA C++: the same algorithms, workspace
// and protocol as shardkit/kernels/all_reduce_{flat,tree}.py (see their docstrings for the design),
// with 16-byte vector accesses and one thread per peer in the barrier.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <type_traits>

#include "all_reduce.h"
#include "convert.cuh"
#include "sync.cuh"

namespace shardkit {
namespace {

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

// The block -> pack map of every loop below: a tile is blockDim.x * unroll packs, block b takes
// tiles b, b + G, ... of [lo, hi), and thread t the packs first + u * blockDim.x (u < unroll) of a
// tile. Staging and reduction must use the same map: block b only waits for the peers' block b, so
// it may only read what the peers' block b staged.
__device__ __forceinline__ int64_t tile_stride(int unroll) { return int64_t(blockDim.x) * unroll; }
__device__ __forceinline__ int64_t first_pack(int64_t lo, int unroll) {
  return lo + int64_t(blockIdx.x) * tile_stride(unroll) + threadIdx.x;
}

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> nan_pack() {
  Pack<T, VEC> v;
#pragma unroll
  for (int k = 0; k < VEC; ++k) v.v[k] = from_float<T>(NAN);
  return v;
}

// Copy packs [lo, hi) of src to dst (NaN when !ok: the call failed), all of a tile's loads issued
// before its stores.
template <typename T, int VEC, int U>
__device__ void copy_packs(const Pack<T, VEC>* src, Pack<T, VEC>* dst, int64_t lo, int64_t hi, int unroll, bool ok) {
  for (int64_t first = first_pack(lo, unroll); first < hi; first += int64_t(gridDim.x) * tile_stride(unroll)) {
    Pack<T, VEC> v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = first + int64_t(u) * blockDim.x;
      if (u < unroll && i < hi) {
        v[u] = ok ? load_pack<T, VEC>(reinterpret_cast<const char*>(src), 0, i) : nan_pack<T, VEC>();
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = first + int64_t(u) * blockDim.x;
      if (u < unroll && i < hi) dst[i] = v[u];
    }
  }
}

// Packs [lo, hi) of the sum over ranks 0..WORLD-1 (fp32, rank order) of the copies at byte offset
// `src` of every workspace, into out and, when `publish` is set and the call is ok, into publish.
// All WORLD * unroll loads of a tile are in flight before the adds: the copies are latency-bound.
// U (>= unroll) sizes the registers that hold them.
template <typename T, int VEC, int WORLD, int U>
__device__ void reduce_packs(const PeerTable& t, int64_t src, int64_t lo, int64_t hi, int unroll, bool ok,
                             Pack<T, VEC>* out, Pack<T, VEC>* publish) {
  for (int64_t first = first_pack(lo, unroll); first < hi; first += int64_t(gridDim.x) * tile_stride(unroll)) {
    Pack<T, VEC> in[U][WORLD];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = first + int64_t(u) * blockDim.x;
      if (ok && u < unroll && i < hi) {
#pragma unroll
        for (int r = 0; r < WORLD; ++r) in[u][r] = load_pack<T, VEC>(t.base[r], src, i);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = first + int64_t(u) * blockDim.x;
      if (u < unroll && i < hi) {
        Pack<T, VEC> v = nan_pack<T, VEC>();
        if (ok) {
          float acc[VEC] = {};
#pragma unroll
          for (int r = 0; r < WORLD; ++r) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) acc[k] += to_float(in[u][r].v[k]);
          }
#pragma unroll
          for (int k = 0; k < VEC; ++k) v.v[k] = from_float<T>(acc[k]);
          if (publish != nullptr) publish[i] = v;
        }
        out[i] = v;
      }
    }
  }
}

// Flat: one pack per thread per tile (unroll 1) and up to kMaxFlatThreads threads; measured faster than
// fewer threads with more packs each.
template <typename T, int VEC, int WORLD>
__global__ void __launch_bounds__(kMaxFlatThreads) flat_kernel(AllReduceArgs a) {
  using P = Pack<T, VEC>;
  const CallState cs = start_call(a.table, a.rank, a.sig);
  const int64_t buf = epoch_buffer_offset(cs.epoch, a.buffer_bytes);
  const int64_t src = a.zero_copy ? a.x_offset : buf;
  const int64_t packs = a.numel / VEC;
  bool ok = cs.ok;
  if (ok && !a.zero_copy) {
    copy_packs<T, VEC, 1>(static_cast<const P*>(a.x), reinterpret_cast<P*>(a.table.base[a.rank] + buf), 0, packs,
                          1, true);
  }
  if (ok) ok = block_barrier(a.table, a.rank, WORLD, blockIdx.x, cs, a.host_error_record, a.timeout_iters);
  reduce_packs<T, VEC, WORLD, 1>(a.table, src, 0, packs, 1, ok, static_cast<P*>(a.out), nullptr);
  if (ok && a.zero_copy) {
    block_barrier(a.table, a.rank, WORLD, kMaxPrograms + blockIdx.x, cs, a.host_error_record, a.timeout_iters);
  }
  finish_call(a.table, a.rank, cs.epoch);
}

// Tree: up to kMaxTreeThreads threads with up to max_unroll(WORLD) packs each in flight.
template <typename T, int VEC, int WORLD>
__global__ void __launch_bounds__(kMaxTreeThreads) tree_kernel(AllReduceArgs a, int64_t shard) {
  using P = Pack<T, VEC>;
  // Unaligned calls (VEC 1, element by element) are a slow path anyway: no unroll, no spills.
  constexpr int U = VEC == 1 ? 1 : max_unroll(WORLD);
  const int unroll = min(a.unroll, U);
  const CallState cs = start_call(a.table, a.rank, a.sig);
  const int64_t buf = epoch_buffer_offset(cs.epoch, a.buffer_bytes);
  const int64_t src = a.zero_copy ? a.x_offset : buf;
  const int64_t packs = a.numel / VEC, shard_packs = shard / VEC;
  P* own = reinterpret_cast<P*>(a.table.base[a.rank] + buf);
  P* out = static_cast<P*>(a.out);
  auto shard_lo = [&](int s) { return min(int64_t(s) * shard_packs, packs); };
  auto shard_hi = [&](int s) { return min(int64_t(s + 1) * shard_packs, packs); };
  bool ok = cs.ok;
  if (ok && !a.zero_copy) {
    for (int s = 0; s < WORLD; ++s) {  // shard by shard, with the reduction's block map
      copy_packs<T, VEC, U>(static_cast<const P*>(a.x), own, shard_lo(s), shard_hi(s), unroll, true);
    }
  }
  if (ok) ok = block_barrier(a.table, a.rank, WORLD, blockIdx.x, cs, a.host_error_record, a.timeout_iters);
  // Reduce-scatter: our shard, summed over all ranks, into out and into our epoch buffer.
  reduce_packs<T, VEC, WORLD, U>(a.table, src, shard_lo(a.rank), shard_hi(a.rank), unroll, ok, out, own);
  if (ok) ok = block_barrier(a.table, a.rank, WORLD, kMaxPrograms + blockIdx.x, cs, a.host_error_record, a.timeout_iters);
  for (int j = 1; j < WORLD; ++j) {  // all-gather: the peers' reduced shards
    const int s = (a.rank + j) % WORLD;
    copy_packs<T, VEC, U>(reinterpret_cast<const P*>(a.table.base[s] + buf), out, shard_lo(s), shard_hi(s),
                          unroll, ok);
  }
  finish_call(a.table, a.rank, cs.epoch);
}

template <typename T, template <typename, int, int> class Launch, typename... Extra>
cudaError_t dispatch(const AllReduceArgs& a, cudaStream_t stream, Extra... extra) {
  constexpr int kVec = 16 / sizeof(T);
  if (a.numel * int64_t(sizeof(T)) > a.buffer_bytes) return cudaErrorInvalidValue;  // chunk on the host
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

bool valid(const AllReduceArgs& a, bool tree) {
  return a.world >= 2 && a.world <= kMaxWorld && a.rank >= 0 && a.rank < a.world && a.programs >= 1 &&
         a.programs <= kMaxPrograms && a.threads >= a.world && a.threads % 32 == 0 &&
         a.threads <= (tree ? kMaxTreeThreads : kMaxFlatThreads) && a.unroll >= 1 &&
         a.unroll <= (tree ? max_unroll(a.world) : 1) && a.numel >= 0;
}

}  // namespace

cudaError_t flat_all_reduce(const AllReduceArgs& a, cudaStream_t stream) {
  if (!valid(a, false)) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return dispatch<float, FlatLaunch>(a, stream);
    case DType::kFloat16: return dispatch<__half, FlatLaunch>(a, stream);
    case DType::kBFloat16: return dispatch<__nv_bfloat16, FlatLaunch>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t tree_all_reduce(const AllReduceArgs& a, int64_t shard, cudaStream_t stream) {
  if (!valid(a, true) || shard % 16 != 0 || shard * a.world < a.numel) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return dispatch<float, TreeLaunch>(a, stream, shard);
    case DType::kFloat16: return dispatch<__half, TreeLaunch>(a, stream, shard);
    case DType::kBFloat16: return dispatch<__nv_bfloat16, TreeLaunch>(a, stream, shard);
  }
  return cudaErrorInvalidValue;
}

}  // namespace shardkit
