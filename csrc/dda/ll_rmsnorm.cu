// LL fused all-reduce + residual add + RMSNorm: one synchronisation per call, the flags carried in the data
// (the LL protocol of ll.cuh, NCCL's prims_ll.h), for the tensor-parallel sync point of a Llama block:
//   residual_out = residual + sum over ranks of x,   out = RMSNorm(residual_out) * weight.
//
// Rows are padded to whole 8-byte payload lines (row_lines = ceil(hidden * element size / 8)): line j of row r is
// line r * row_lines + j of the slot, so a line never spans two rows. A grid of programs = tokens * segments
// (segments >= 2, policy.h) splits every row into `segments` contiguous ranges of lines, one block each, launched
// as one thread-block cluster per row; a grid of programs <= tokens gives block b the whole rows b, b + G, ....
// For each of its rows a block PUSHES this rank's x lines of its range into its slot of every peer's LL region
// (flag = k, this rank's LL call count, shared with the LL all-reduce), then polls the peers' lines of the same
// range in its own region, sums all ranks in rank order in fp32 (0 + x_0 + x_1 + ..., its own x straight from
// memory), adds the residual, rounds to the dtype (residual_out), block-reduces the sum of squares of the rounded
// range in a fixed order, adds the cluster's partial sums in segment order (distributed shared memory, one
// cluster barrier), and writes out = (h * rstd) * weight. One block per row (be5aa1e) left the pushes of a
// 16-row call to 16 SMs (8.3 us at 16 x 8192 bf16 on 2xH200); segments spread them over up to 8x more.
// Thread t handles lines t, t + threads, ... of the range both when pushing and when reducing; its first
// kLLRMSNormLinesPerThread lines of x, the residual and the weight are loaded before the call state is read.
//
// Why one synchronisation is enough, and why the flags need no reset: ll_all_reduce.cu's argument, unchanged.
// This kernel is an LL call like the LL all-reduce's (same counter, same parity slots, same header, whole slots
// pushed when k % kLLCleanPeriod < 2, the count published by finish_call), and every one of its blocks waits for
// every peer's header, so "a rank is never two LL calls ahead of a peer's reads" holds across both kinds of call.
// In place: out and residual_out may be x or residual; a thread reads its elements of x and residual (for the
// push and the sum) before it writes the same elements of out / residual_out (pass 1 of a wide range writes
// residual_out of a group right after reading that group), and no other thread or block touches them.
//
// Numerics (the Triton flat kernel's, shardkit/kernels/all_reduce/rmsnorm.py): residual_out is bitwise the
// Triton kernels' (same sums, same order, one rounding); rstd = rsqrt(sum(h*h) / hidden + eps) with Triton's
// instructions (row_rstd) and out = (h * rstd) * weight as Triton's _normalise, but the sum of squares is taken
// in this kernel's block order, not Triton's reduction tree, so out may differ from the Triton kernels' where the
// last bits of rstd differ (an ulp of the dtype at most, in a few elements). All ranks run the same grid
// (it is in the fingerprint) and the same order: out and residual_out are bitwise equal on every rank.
//
// Protocol guarantees (as the LL all-reduce): signature mismatch -> kMismatch on every rank (threads waiting for
// lines that never come stop too), an absent peer -> kTimeout naming it, an earlier failure on this rank -> NaN
// without waiting; any world 2..8; fp32/fp16/bf16; any hidden (tails: element access where a line is partial or
// a pointer is not 8-byte aligned), rows up to one LL slot (kLLMaxBytes; hidden 32768 in fp32 fits). A block
// whose failure stops it makes its whole row NaN in the cluster (siblings see its verdict's stop).
#include <cooperative_groups.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "all_reduce.h"
#include "convert.cuh"
#include "ll.cuh"
#include "policy.h"

namespace shardkit {
namespace {

// Line j (8 bytes) of row `row` of a [rows, hidden] tensor; elements past the row's end are 0. aligned: every
// pointer is 8-byte aligned and hidden a multiple of the line's elements (every line whole and aligned; the same
// value in all threads, so the branch costs nothing).
template <typename T>
__device__ __forceinline__ uint2 load_row_line(const T* p, int64_t row, int64_t j, int64_t hidden, bool aligned) {
  constexpr int E = 8 / sizeof(T);
  const T* q = p + row * hidden + j * E;
  if (aligned) return *reinterpret_cast<const uint2*>(q);
  uint2 u = make_uint2(0u, 0u);
  T* v = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    if (j * E + e < hidden) v[e] = q[e];
  }
  return u;
}

template <typename T>
__device__ __forceinline__ void store_row_line(T* p, int64_t row, int64_t j, int64_t hidden, bool aligned, uint2 u) {
  constexpr int E = 8 / sizeof(T);
  T* q = p + row * hidden + j * E;
  if (aligned) {
    *reinterpret_cast<uint2*>(q) = u;
    return;
  }
  const T* v = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    if (j * E + e < hidden) q[e] = v[e];
  }
}

// Sum of v over the block in a fixed order (shuffles down within warps, then warp 0 over the warps' sums): the
// same bits on every rank for the same inputs. All threads call it; it synchronises the block twice.
__device__ __forceinline__ float block_sum(float v, float* s_warp, float* s_total) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) s_warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < int(blockDim.x / 32) ? s_warp[lane] : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) t += __shfl_down_sync(0xffffffffu, t, off);
    if (lane == 0) *s_total = t;
  }
  __syncthreads();
  return *s_total;
}

// rsqrt(ssq / hidden + eps) with the Triton fused kernels' instructions (their PTX at sm_90: div.full.f32,
// add.f32, rsqrt.approx.ftz.f32), so that equal sums of squares give equal rstd bits.
__device__ __forceinline__ float row_rstd(float ssq, int64_t hidden, float eps) {
  float mean, rstd;
  asm("div.full.f32 %0, %1, %2;" : "=f"(mean) : "f"(ssq), "f"(float(hidden)));
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(rstd) : "f"(mean + eps));
  return rstd;
}

// A thread's lines of a row are lo + threadIdx.x + i * blockDim.x, i < mine (lo, mine: the block's segment); it
// takes them LPT at a time (a "group"): loads, pushes, polls and sums a group at once (one round trip per peer per
// group). With one group (the policy's grids) the rounded row stays in registers; with more, pass 1 writes
// residual_out and pass 2 reads it back (rows wider than LPT * threads lines per segment: wide rows, ctest grids).
// segments > 1: launched as clusters of `segments` blocks, one cluster per row, block rank = segment; the blocks
// add their partial sums of squares through distributed shared memory in segment order.
template <typename T, int WORLD>
__global__ void __launch_bounds__(kLLRMSNormMaxThreads, 1)
    ll_rmsnorm_kernel(RMSNormArgs a, bool aligned, int segments) {
  constexpr int LPT = kLLRMSNormLinesPerThread;
  constexpr int E = 8 / sizeof(T);
  __shared__ LLVerdict s_verdict;
  __shared__ float s_warp[32];
  __shared__ float s_total;   // this block's sum of squares of the row (read by the cluster's other blocks)
  const T* x = static_cast<const T*>(a.x);
  const T* residual = static_cast<const T*>(a.residual);
  const T* weight = static_cast<const T*>(a.weight);
  T* out = static_cast<T*>(a.out);
  T* residual_out = static_cast<T*>(a.residual_out);
  const int64_t row_lines = (a.hidden + E - 1) / E;
  const int64_t segment_lines = (row_lines + segments - 1) / segments;
  const int64_t lo = min(row_lines, int64_t(blockIdx.x % segments) * segment_lines);
  const int64_t block_lines = min(row_lines - lo, segment_lines);  // of each of the block's rows
  const int64_t first_row = blockIdx.x / segments, row_step = gridDim.x / segments;  // first_row < tokens
  const int64_t mine = block_lines > threadIdx.x ? (block_lines - threadIdx.x + blockDim.x - 1) / blockDim.x : 0;
  const int groups = int((mine + LPT - 1) / LPT);
  const bool in_registers = groups <= 1;
  const auto line = [&](int i) { return lo + threadIdx.x + int64_t(i) * blockDim.x; };
  // The first group of the first row (x, residual, weight), loaded before start_call: their latency overlaps its
  // reads and the pushes start from registers.
  uint2 x0[LPT], r0[LPT], w0[LPT];
#pragma unroll
  for (int jj = 0; jj < LPT; ++jj) {
    if (jj < mine) {
      x0[jj] = load_row_line(x, first_row, line(jj), a.hidden, aligned);
      r0[jj] = load_row_line(residual, first_row, line(jj), a.hidden, aligned);
      w0[jj] = load_row_line(weight, 0, line(jj), a.hidden, aligned);
    }
  }
  const CallState cs = start_call(a.table, a.rank, a.sig);
  ll_verdict_start(s_verdict, cs.ok);
  const uint32_t k = cs.ll_call;
  const int64_t pushed = ll_slot_offset(k, a.rank, WORLD, a.buffer_bytes);  // our slot in every workspace
  if (cs.ok) {
    push_header<WORLD>(a.table, a.rank, pushed, a.sig, k);
    for (int64_t row = first_row; row < a.tokens; row += row_step) {
      for (int g = 0; g < groups; ++g) {
        uint2 v[LPT];
#pragma unroll
        for (int jj = 0; jj < LPT; ++jj) {  // the whole group's loads first: one memory latency per group
          const int i = g * LPT + jj;
          if (i < mine) v[jj] = row == first_row && g == 0 ? x0[jj] : load_row_line(x, row, line(i), a.hidden, aligned);
        }
#pragma unroll
        for (int jj = 0; jj < LPT; ++jj) {
          const int i = g * LPT + jj;
          if (i < mine) push_line<WORLD>(a.table, a.rank, pushed, row * row_lines + line(i), v[jj], k);
        }
      }
    }
    clean_slot<WORLD>(a.table, a.rank, pushed, a.tokens * row_lines, k);
  }
  __syncthreads();  // s_* initialised
  const char* own = a.table.base[a.rank];
  const volatile int* device_record = reinterpret_cast<const volatile int*>(own + kErrorOff);
  int64_t it = 0;
  bool header_checked = false;
  // Block-uniform loop over the block's rows (block_sum's __syncthreads also share the verdict).
  for (int64_t row = first_row; row < a.tokens; row += row_step) {
    uint2 h[LPT];  // this thread's lines of the residual, then of residual_out (rounded to T): the last group's
    float ssq = 0.f;
    if (s_verdict.stop == 0) {
      int code = kArrived, culprit = -1;
      if (!header_checked) {
        code = check_header<WORLD>(a.table, a.rank, a.sig, k, a.buffer_bytes, it, a.timeout_iters, device_record,
                                   &s_verdict.stop);
        culprit = threadIdx.x;
      }
      header_checked = true;
      for (int g = 0; g < groups && code == kArrived; ++g) {
        const bool preloaded = row == first_row && g == 0;
        float acc[LPT][E] = {};
#pragma unroll
        for (int jj = 0; jj < LPT; ++jj) {  // the residual lines, loaded before the waits
          const int i = g * LPT + jj;
          if (i < mine) h[jj] = preloaded ? r0[jj] : load_row_line(residual, row, line(i), a.hidden, aligned);
        }
        // Ranks in order (the sums' order); each peer's lines of the group are all loaded at once (one round
        // trip), then the ones that had not arrived yet are polled.
#pragma unroll
        for (int r = 0; r < WORLD; ++r) {
          if (code != kArrived) break;
          uint4 v[LPT];  // {data, flag, data, flag} lines (this rank's own x: {data, -, data, -})
          if (r == a.rank) {
#pragma unroll
            for (int jj = 0; jj < LPT; ++jj) {
              const int i = g * LPT + jj;
              if (i < mine) {
                const uint2 d = preloaded ? x0[jj] : load_row_line(x, row, line(i), a.hidden, aligned);
                v[jj] = make_uint4(d.x, k, d.y, k);
              }
            }
          } else {
            const char* lines = own + ll_slot_offset(k, r, WORLD, a.buffer_bytes) + kLLHeaderBytes +
                                (row * row_lines + line(g * LPT)) * 16;
#pragma unroll
            for (int jj = 0; jj < LPT; ++jj) {
              if (g * LPT + jj < mine) v[jj] = load_line(lines + int64_t(jj) * blockDim.x * 16);
            }
#pragma unroll
            for (int jj = 0; jj < LPT; ++jj) {
              if (g * LPT + jj < mine && code == kArrived && (v[jj].y != k || v[jj].w != k)) {
                code = wait_line(lines + int64_t(jj) * blockDim.x * 16, k, v[jj], it, a.timeout_iters, device_record,
                                 &s_verdict.stop);
                culprit = r;
              }
            }
            if (code != kArrived) break;
          }
#pragma unroll
          for (int jj = 0; jj < LPT; ++jj) {
            const uint2 d = make_uint2(v[jj].x, v[jj].z);
            const T* dv = reinterpret_cast<const T*>(&d);
#pragma unroll
            for (int e = 0; e < E; ++e) {
              if (g * LPT + jj < mine) acc[jj][e] += to_float(dv[e]);
            }
          }
        }
        if (code == kArrived) {
#pragma unroll
          for (int jj = 0; jj < LPT; ++jj) {
            const int i = g * LPT + jj;
            if (i >= mine) break;
            T* hv = reinterpret_cast<T*>(&h[jj]);  // the residual line, overwritten element by element
#pragma unroll
            for (int e = 0; e < E; ++e) {  // padding elements: 0 on every rank and in the residual, so h = 0
              hv[e] = from_float<T>(acc[jj][e] + to_float(hv[e]));
              const float f = to_float(hv[e]);
              ssq += f * f;
            }
            // Pass 1 of a wide row: residual_out now (this thread read x and residual of these lines already).
            if (!in_registers) store_row_line(residual_out, row, line(i), a.hidden, aligned, h[jj]);
          }
        }
      }
      ll_note(s_verdict, code, culprit);
    }
    float total = block_sum(ssq, s_warp, &s_total);
    bool ok = s_verdict.stop == 0;
    if (segments > 1) {  // one row per block: the row's sum over the cluster's blocks, in segment order
#if __CUDA_ARCH__ >= 900
      namespace cg = cooperative_groups;
      cg::cluster_group cluster = cg::this_cluster();
      cluster.sync();  // every block's s_total and stop of the row are final
      total = 0.f;
      for (int s = 0; s < segments; ++s) {
        total += *cluster.map_shared_rank(&s_total, s);
        ok = ok && *cluster.map_shared_rank(&s_verdict.stop, s) == 0;  // a sibling failed: the row is NaN
      }
      cg::cluster_group::barrier_arrive();  // barrier_wait at the end: siblings read our shared memory till then
#else
      __trap();  // clusters need sm_90 (the policy takes segments only there)
#endif
    }
    const float rstd = row_rstd(total, a.hidden, a.eps);
    for (int g = 0; g < groups; ++g) {
#pragma unroll
      for (int jj = 0; jj < LPT; ++jj) {
        const int i = g * LPT + jj;
        if (i >= mine) break;
        const int64_t j = line(i);
        const uint2 hl = in_registers || !ok ? h[jj] : load_row_line(residual_out, row, j, a.hidden, aligned);
        const uint2 wl = g == 0 ? w0[jj] : load_row_line(weight, 0, j, a.hidden, aligned);
        uint2 y, r_out;
        T* yv = reinterpret_cast<T*>(&y);
        T* rv = reinterpret_cast<T*>(&r_out);
        const T* hv = reinterpret_cast<const T*>(&hl);
        const T* wv = reinterpret_cast<const T*>(&wl);
#pragma unroll
        for (int e = 0; e < E; ++e) {
          yv[e] = from_float<T>(ok ? to_float(hv[e]) * rstd * to_float(wv[e]) : NAN);
          rv[e] = ok ? hv[e] : from_float<T>(NAN);
        }
        if (in_registers || !ok) store_row_line(residual_out, row, j, a.hidden, aligned, r_out);
        store_row_line(out, row, j, a.hidden, aligned, y);
      }
    }
  }
  ll_finish(s_verdict, a.table, a.rank, a.host_error_record, cs, k);
#if __CUDA_ARCH__ >= 900
  if (segments > 1) cooperative_groups::cluster_group::barrier_wait();
#endif
}

template <typename T>
cudaError_t launch(const RMSNormArgs& a, cudaStream_t stream) {
  constexpr int E = 8 / sizeof(T);
  const auto aligned8 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; };
  const bool aligned = aligned8(a.x) && aligned8(a.residual) && aligned8(a.weight) && aligned8(a.out) &&
                       aligned8(a.residual_out) && a.hidden % E == 0;
  if (a.tokens * ((a.hidden + E - 1) / E) > kLLLines) return cudaErrorInvalidValue;
  const int segments = ll_rmsnorm_segments_of(a.programs, a.tokens);
  auto go = [&](auto world_c) {
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = unsigned(segments);
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(unsigned(a.programs));
    config.blockDim = dim3(unsigned(a.threads));
    config.stream = stream;
    config.attrs = &cluster;
    config.numAttrs = segments > 1 ? 1 : 0;
    return cudaLaunchKernelEx(&config, ll_rmsnorm_kernel<T, decltype(world_c)::value>, a, aligned, segments);
  };
  switch (a.world) {
    case 2: return go(std::integral_constant<int, 2>{});
    case 3: return go(std::integral_constant<int, 3>{});
    case 4: return go(std::integral_constant<int, 4>{});
    case 5: return go(std::integral_constant<int, 5>{});
    case 6: return go(std::integral_constant<int, 6>{});
    case 7: return go(std::integral_constant<int, 7>{});
    case 8: return go(std::integral_constant<int, 8>{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t ll_all_reduce_rmsnorm(const RMSNormArgs& a, cudaStream_t stream) {
  const bool valid = a.world >= 2 && a.world <= kMaxWorld && a.rank >= 0 && a.rank < a.world && a.tokens >= 1 &&
                     a.hidden >= 1 && a.programs >= 1 && a.programs <= kMaxPrograms &&
                     ll_rmsnorm_segments_of(a.programs, a.tokens) > 0 &&
                     a.threads >= a.world && a.threads % 32 == 0 && a.threads <= kLLRMSNormMaxThreads && a.eps >= 0.f;
  if (!valid) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return launch<float>(a, stream);
    case DType::kFloat16: return launch<__half>(a, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream, &status) == cudaSuccess && status != cudaStreamCaptureStatusNone;
}

}  // namespace shardkit
