// DDA flat (one-shot), LL (one-shot, one synchronisation) and tree (two-shot) all-reduce on peer memory:
// host entry points.
// Raw pointers and CUDA runtime types only (no torch headers); the one binding layer is c_api.cu (C entry
// points for ctypes: shardkit/kernels/all_reduce/cuda.py).
#pragma once
#include <cuda_runtime.h>

#include "layout.h"

namespace shardkit {

// Largest AllReduceArgs::unroll of the tree kernel for `world` ranks: a thread keeps world * unroll
// 16-byte loads in registers, at most 16 (no spills at sm_90; 32 spilled), and the tree kernel
// takes at most kMaxTreeThreads threads per block. The flat kernel takes unroll 1 and up to kMaxFlatThreads
// threads (1024 did not fit the register file from world 5 on at sm_90; bounding it at 1024 spilled from there).
__host__ __device__ constexpr int max_unroll(int world) { return world <= 2 ? 8 : 16 / world; }
constexpr int kMaxTreeThreads = 256;
constexpr int kMaxFlatThreads = 512;

// Every rank reads every rank's staged copy and sums locally in fixed rank order (fp32).
cudaError_t flat_all_reduce(const AllReduceArgs& args, cudaStream_t stream);

// One synchronisation per call (ll_all_reduce.cu): every rank pushes its input as {data, flag} lines into its
// slot of every peer's LL region and sums what it finds in its own. Up to kLLMaxBytes of payload, any
// alignment; threads up to 1024, unroll 1; not zero_copy (x is read wherever it lives).
cudaError_t ll_all_reduce(const AllReduceArgs& args, cudaStream_t stream);

// One fused all-reduce + residual add + RMSNorm call on one rank (host side): for x, residual [tokens, hidden]
// (rows contiguous) and weight [hidden],
//   residual_out = residual + sum over ranks of x   (fp32, ranks in order, rounded to the dtype)
//   out          = residual_out * rsqrt(mean(residual_out**2) + eps) * weight
// out and residual_out may each be x or residual (not each other, not weight); no other overlap.
struct RMSNormArgs {
  const void* x;
  const void* residual;
  const void* weight;
  void* out;
  void* residual_out;
  PeerTable table;
  int* host_error_record;  // int32[4] error record in device-visible host memory
  int64_t tokens;          // rows, 1..ll_rmsnorm_max_rows(hidden, element size) (policy.h)
  int64_t hidden;          // columns, rows of at most kLLMaxBytes
  float eps;
  int rank;
  int world;               // 2..kMaxWorld
  uint32_t sig;            // 31-bit call signature, equal on all ranks
  int64_t buffer_bytes;    // bytes of one epoch buffer (the LL region lies after the epoch buffers)
  int64_t timeout_iters;   // polls before giving up
  int programs;            // blocks, 1..kMaxPrograms: <= tokens (block b owns rows b, b + programs, ...) or
                           // tokens * S, 2 <= S <= 8 (S blocks per row, a thread-block cluster: sm_90)
  int threads;             // a multiple of 32, >= world, <= kLLRMSNormMaxThreads (512)
  DType dtype;
};

// One synchronisation per call (ll_rmsnorm.cu): the LL all-reduce's protocol (ll.cuh) with rows padded to whole
// lines; each block (or cluster of blocks) owns whole rows, sums them, adds the residual and normalises.
cudaError_t ll_all_reduce_rmsnorm(const RMSNormArgs& args, cudaStream_t stream);

// Is `stream` being captured into a CUDA graph? (The fused op's auto rule differs per mode; here so that the torch
// binding, which links no CUDA runtime of its own, can ask.)
bool stream_capturing(cudaStream_t stream);

// Reduce-scatter over shards of `shard` elements (a multiple of 16), then all-gather.
cudaError_t tree_all_reduce(const AllReduceArgs& args, int64_t shard, cudaStream_t stream);

}  // namespace shardkit
