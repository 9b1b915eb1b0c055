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
// takes at most kMaxTreeThreads threads per block. The flat kernel takes unroll 1 and up to 1024 threads.
__host__ __device__ constexpr int max_unroll(int world) { return world <= 2 ? 8 : 16 / world; }
constexpr int kMaxTreeThreads = 256;

// Every rank reads every rank's staged copy and sums locally in fixed rank order (fp32).
cudaError_t flat_all_reduce(const AllReduceArgs& args, cudaStream_t stream);

// One synchronisation per call (ll_all_reduce.cu): every rank pushes its input as {data, flag} lines into its
// slot of every peer's LL region and sums what it finds in its own. Up to kLLMaxBytes of payload, any
// alignment; threads up to 1024, unroll 1; not zero_copy (x is read wherever it lives).
cudaError_t ll_all_reduce(const AllReduceArgs& args, cudaStream_t stream);

// Reduce-scatter over shards of `shard` elements (a multiple of 16), then all-gather.
cudaError_t tree_all_reduce(const AllReduceArgs& args, int64_t shard, cudaStream_t stream);

}  // namespace shardkit
