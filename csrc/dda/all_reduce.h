// DDA flat (one-shot) and tree (two-shot) all-reduce on peer memory: host entry points.
// Raw pointers and CUDA runtime types only (no torch headers); the torch binding is csrc/binding.cpp.
#pragma once
#include <cuda_runtime.h>

#include "layout.h"

namespace shardkit {

// Largest AllReduceArgs::unroll for `world` ranks: a thread keeps world * unroll 16-byte loads in
// registers, so larger worlds get fewer packs per tile.
__host__ __device__ constexpr int max_unroll(int world) { return world <= 4 ? 8 : 4; }

// Every rank reads every rank's staged copy and sums locally in fixed rank order (fp32).
cudaError_t flat_all_reduce(const AllReduceArgs& args, cudaStream_t stream);

// Reduce-scatter over shards of `shard` elements (a multiple of 16), then all-gather.
cudaError_t tree_all_reduce(const AllReduceArgs& args, int64_t shard, cudaStream_t stream);

}  // namespace shardkit
