// LL fused all-reduce + residual add + RMSNorm: one synchronisation per call, the flags carried in the data
// (the LL protocol of ll.cuh, NCCL's prims_ll.h), for the tensor-parallel sync point of a Llama block:
//   residual_out = residual + sum over ranks of x,   out = RMSNorm(residual_out) * weight.
//
// Rows are padded to whole 8-byte payload lines (row_lines = ceil(hidden * element size / 8)): line j of row r is
// line r * row_lines + j of the slot, so a line never spans two rows. Block b owns rows b, b + G, ...: for each it
// PUSHES this rank's x lines of the row into its slot of every peer's LL region (flag = k, this rank's LL call
// count, shared with the LL all-reduce), then polls the peers' lines of the same row in its own region, sums all
// ranks in rank order in fp32 (0 + x_0 + x_1 + ..., its own x straight from memory), adds the residual, rounds
// to the dtype (residual_out), block-reduces the sum of squares of the rounded row in a fixed order, and writes
// out = (h * rstd) * weight. Thread t handles lines t, t + threads, ... of a row both when pushing and when
// reducing, and keeps its lines of the rounded row, the sums and the weight in registers (policy.h: 2 lines per
// thread, up to 1024 threads: rows of up to 16 KiB, hidden 8192 in bf16); it loads all its lines of one peer at
// once and then polls only those that had not arrived.
//
// Why one synchronisation is enough, and why the flags need no reset: ll_all_reduce.cu's argument, unchanged.
// This kernel is an LL call like the LL all-reduce's (same counter, same parity slots, same header, whole slots
// pushed when k % kLLCleanPeriod < 2, the count published by finish_call), and every one of its blocks waits for
// every peer's header, so "a rank is never two LL calls ahead of a peer's reads" holds across both kinds of call.
// In place: out and residual_out may be x or residual; a thread reads its elements of x and residual (for the
// push and the sum) before the block reduction and writes the same elements of out / residual_out after it, and
// no other thread or block touches them.
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
// a pointer is not 8-byte aligned), rows up to kLLRMSNormMaxRowBytes (policy.h).
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

// At most LPT lines of a row per thread (policy.h): the rounded row, the weight and the row's running sums stay
// in registers.
template <typename T, int WORLD>
__global__ void __launch_bounds__(1024, 1) ll_rmsnorm_kernel(RMSNormArgs a, bool aligned) {
  constexpr int LPT = kLLRMSNormLinesPerThread;
  constexpr int E = 8 / sizeof(T);
  __shared__ int s_code;      // kMismatch / kTimeout of this block, for the error record
  __shared__ int s_culprits;  // ranks that sent another signature or never arrived
  __shared__ int s_stop;      // any failure: stop waiting, write NaN
  __shared__ float s_warp[32];
  __shared__ float s_total;
  const CallState cs = start_call(a.table, a.rank, a.sig);
  if (threadIdx.x == 0) {
    s_code = 0;
    s_culprits = 0;
    s_stop = cs.ok ? 0 : 1;
  }
  const uint32_t k = cs.ll_call;
  const T* x = static_cast<const T*>(a.x);
  const T* residual = static_cast<const T*>(a.residual);
  const T* weight = static_cast<const T*>(a.weight);
  T* out = static_cast<T*>(a.out);
  T* residual_out = static_cast<T*>(a.residual_out);
  const int64_t row_lines = (a.hidden + E - 1) / E;
  const int64_t pushed = ll_slot_offset(k, a.rank, WORLD, a.buffer_bytes);  // our slot in every workspace
  if (cs.ok) {
    push_header<WORLD>(a.table, a.rank, pushed, a.sig, k);
    for (int64_t row = blockIdx.x; row < a.tokens; row += gridDim.x) {
      for (int64_t j = threadIdx.x; j < row_lines; j += blockDim.x) {
        push_line<WORLD>(a.table, a.rank, pushed, row * row_lines + j, load_row_line(x, row, j, a.hidden, aligned), k);
      }
    }
    clean_slot<WORLD>(a.table, a.rank, pushed, a.tokens * row_lines, k);
  }
  // This thread's lines j_jj = threadIdx.x + jj * threads of a row: the first `mine` of LPT.
  const int64_t lines_here = (row_lines - int64_t(threadIdx.x) + blockDim.x - 1) / blockDim.x;  // >= 0
  const int mine = int(lines_here < LPT ? lines_here : LPT);
  uint2 w[LPT];  // the weight lines, loaded while the pushes travel
#pragma unroll
  for (int jj = 0; jj < LPT; ++jj) {
    if (jj < mine) w[jj] = load_row_line(weight, 0, threadIdx.x + int64_t(jj) * blockDim.x, a.hidden, aligned);
  }
  __syncthreads();  // s_* initialised
  const char* own = a.table.base[a.rank];
  const volatile int* device_record = reinterpret_cast<const volatile int*>(own + kErrorOff);
  int64_t it = 0;
  bool header_checked = false;
  // Block-uniform loop over the block's rows (block_sum's __syncthreads also share the verdict).
  for (int64_t row = blockIdx.x; row < a.tokens; row += gridDim.x) {
    uint2 h[LPT];  // this thread's lines of the residual, then of residual_out (rounded to T)
    float ssq = 0.f;
    if (s_stop == 0) {
      int code = kArrived, culprit = -1;
      if (!header_checked) {
        code = check_header<WORLD>(a.table, a.rank, a.sig, k, a.buffer_bytes, it, a.timeout_iters, device_record,
                                   &s_stop);
        culprit = threadIdx.x;
      }
      header_checked = true;
      float acc[LPT][E] = {};
#pragma unroll
      for (int jj = 0; jj < LPT; ++jj) {  // the residual lines, loaded before the waits
        if (jj < mine) h[jj] = load_row_line(residual, row, threadIdx.x + int64_t(jj) * blockDim.x, a.hidden, aligned);
      }
      // Ranks in order (the sums' order); each peer's lines are all loaded at once (one round trip), then the
      // ones that had not arrived yet are polled.
#pragma unroll
      for (int r = 0; r < WORLD; ++r) {
        if (code != kArrived) break;
        uint4 v[LPT];  // {data, flag, data, flag} lines (this rank's own x: {data, -, data, -})
        if (r == a.rank) {
#pragma unroll
          for (int jj = 0; jj < LPT; ++jj) {
            if (jj < mine) {
              const uint2 d = load_row_line(x, row, threadIdx.x + int64_t(jj) * blockDim.x, a.hidden, aligned);
              v[jj] = make_uint4(d.x, k, d.y, k);
            }
          }
        } else {
          const char* lines = own + ll_slot_offset(k, r, WORLD, a.buffer_bytes) + kLLHeaderBytes +
                              (row * row_lines + threadIdx.x) * 16;
#pragma unroll
          for (int jj = 0; jj < LPT; ++jj) {
            if (jj < mine) v[jj] = load_line(lines + int64_t(jj) * blockDim.x * 16);
          }
#pragma unroll
          for (int jj = 0; jj < LPT; ++jj) {
            if (jj < mine && code == kArrived && (v[jj].y != k || v[jj].w != k)) {
              code = wait_line(lines + int64_t(jj) * blockDim.x * 16, k, v[jj], it, a.timeout_iters, device_record,
                               &s_stop);
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
            if (jj < mine) acc[jj][e] += to_float(dv[e]);
          }
        }
      }
      if (code == kArrived) {
#pragma unroll
        for (int jj = 0; jj < LPT; ++jj) {
          if (jj >= mine) break;
          T* hv = reinterpret_cast<T*>(&h[jj]);  // the residual line, overwritten element by element
#pragma unroll
          for (int e = 0; e < E; ++e) {  // padding elements: 0 on every rank and in the residual, so h = 0
            hv[e] = from_float<T>(acc[jj][e] + to_float(hv[e]));
            const float f = to_float(hv[e]);
            ssq += f * f;
          }
        }
      }
      if (code != kArrived) {
        s_stop = 1;
        if (code != kAborted) {
          atomicMax(&s_code, code);
          atomicOr(&s_culprits, 1 << culprit);
        }
      }
    }
    const float total = block_sum(ssq, s_warp, &s_total);
    const bool ok = s_stop == 0;
    const float rstd = row_rstd(total, a.hidden, a.eps);
#pragma unroll
    for (int jj = 0; jj < LPT; ++jj) {
      if (jj >= mine) break;
      const int64_t j = threadIdx.x + int64_t(jj) * blockDim.x;
      uint2 y, r_out;
      T* yv = reinterpret_cast<T*>(&y);
      T* rv = reinterpret_cast<T*>(&r_out);
      const T* hv = reinterpret_cast<const T*>(&h[jj]);
      const T* wv = reinterpret_cast<const T*>(&w[jj]);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        yv[e] = from_float<T>(ok ? to_float(hv[e]) * rstd * to_float(wv[e]) : NAN);
        rv[e] = ok ? hv[e] : from_float<T>(NAN);
      }
      store_row_line(residual_out, row, j, a.hidden, aligned, r_out);
      store_row_line(out, row, j, a.hidden, aligned, y);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && s_code != 0) {
    record_error(a.table, a.rank, a.host_error_record, s_code, blockIdx.x, s_culprits, cs.epoch);
  }
  finish_call(a.table, a.rank, cs.epoch, k);
}

template <typename T>
cudaError_t launch(const RMSNormArgs& a, cudaStream_t stream) {
  constexpr int E = 8 / sizeof(T);
  const auto aligned8 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; };
  const bool aligned = aligned8(a.x) && aligned8(a.residual) && aligned8(a.weight) && aligned8(a.out) &&
                       aligned8(a.residual_out) && a.hidden % E == 0;
  const int64_t row_lines = (a.hidden + E - 1) / E;
  if (row_lines > int64_t(kLLRMSNormLinesPerThread) * a.threads || a.tokens * row_lines > kLLLines) {
    return cudaErrorInvalidValue;
  }
  auto go = [&](auto world_c) {
    ll_rmsnorm_kernel<T, decltype(world_c)::value><<<a.programs, a.threads, 0, stream>>>(a, aligned);
    return cudaGetLastError();
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
                     a.hidden >= 1 && a.programs >= 1 && a.programs <= kMaxPrograms && a.programs <= a.tokens &&
                     a.threads >= a.world && a.threads % 32 == 0 && a.threads <= 1024 && a.eps >= 0.f;
  if (!valid) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return launch<float>(a, stream);
    case DType::kFloat16: return launch<__half>(a, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace shardkit
