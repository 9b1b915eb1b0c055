// Launch policy of the CUDA DDA kernels: pure functions of a call's shape, so every rank reaches the same
// grid (the grid is part of the call fingerprint). The one source of truth: the torch binding
// (csrc/torch/all_reduce_host.cpp) calls these directly, Python (shardkit/kernels/all_reduce/cuda.py)
// through the C entry points of c_api.cu.
//
// Measured (bench/tune_all_reduce.py --kernels cuda on 2 and 4 H200s): flat, one 16-byte pack per thread
// per tile and 512 threads; tree, kMaxTreeThreads threads, every tile at once up to one program per SM,
// and more packs in flight per thread as the shard grows: 1 up to 256 KiB per shard, 2 up to 2 MiB, then
// 4 (capped by max_unroll(world)).
#pragma once
#include <algorithm>
#include <cstdint>

#include "all_reduce.h"

namespace shardkit {

struct LaunchConfig {
  int programs;  // blocks, 1..kMaxPrograms
  int threads;   // threads per block
  int unroll;    // 16-byte packs per thread per tile
};

// Programs for `elements` in tiles of threads * unroll 16-byte packs: one per tile, at most max_programs
// (the SM count: every program must be resident, since programs wait for the peers' same-numbered ones).
inline int grid(int64_t elements, int element_size, int threads, int unroll, int max_programs) {
  const int64_t tile = int64_t(threads) * (16 / element_size) * unroll;
  const int64_t tiles = (elements + tile - 1) / tile;
  return int(std::max<int64_t>(1, std::min<int64_t>({int64_t(max_programs), int64_t(kMaxPrograms), tiles})));
}

inline LaunchConfig flat_config(int64_t numel, int element_size, int sm_count) {
  constexpr int kThreads = 512;
  return {grid(numel, element_size, kThreads, 1, sm_count), kThreads, 1};
}

// Elements per shard of a tree call: numel / world rounded up to a multiple of 16 (16-byte aligned
// shard starts for every dtype; the Triton tree kernel's shard_elements is the same rule).
inline int64_t shard_elements(int64_t numel, int world) {
  const int64_t step = 16 * int64_t(world);
  return (numel + step - 1) / step * 16;
}

// LL (ll_all_reduce.cu): one 8-byte payload line per thread, 512 threads as the flat kernel (not tuned yet),
// up to one program per SM; numel * element_size <= kLLMaxBytes per call.
inline LaunchConfig ll_config(int64_t numel, int element_size, int sm_count) {
  constexpr int kThreads = 512;
  const int64_t lines = (numel * element_size + 7) / 8;
  const int64_t programs = (lines + kThreads - 1) / kThreads;
  return {int(std::max<int64_t>(1, std::min<int64_t>({int64_t(sm_count), int64_t(kMaxPrograms), programs}))), kThreads, 1};
}

// LL fused all-reduce + residual + RMSNorm (ll_rmsnorm.cu): rows padded to whole 8-byte payload lines, as many
// rows per launch as one LL slot holds (kLLMaxBytes of payload). Each row is split into `segments` blocks (a
// thread-block cluster, sm_90; the blocks add their sums of squares through distributed shared memory), so that
// the pushes of a few rows spread over many SMs: one block per row (be5aa1e) took 8.3 us at 16 rows x 16 KiB on
// 2xH200 against the LL all-reduce's 5.5 us for the same bytes over 64 blocks. Segments: the most (a power of two,
// at most kLLRMSNormMaxSegments) such that tokens * segments <= the SM count and a segment keeps at least
// kLLRMSNormMinSegmentLines lines; then one thread per line of a segment (64..kLLRMSNormMaxThreads threads). A
// thread keeps up to kLLRMSNormLinesPerThread lines in registers (wider segments: a second pass reads residual_out
// back); 1024 threads (64 registers each) spilled at sm_90, 512 do not.
constexpr int kLLRMSNormLinesPerThread = 2;
constexpr int kLLRMSNormMaxThreads = 512;
constexpr int kLLRMSNormMaxSegments = 8;  // the portable cluster size
constexpr int64_t kLLRMSNormMinSegmentLines = 256;

inline int64_t ll_row_lines(int64_t hidden, int element_size) { return (hidden * element_size + 7) / 8; }

// Rows per launch; 0 when a row is wider than an LL slot.
inline int64_t ll_rmsnorm_max_rows(int64_t hidden, int element_size) {
  const int64_t lines = ll_row_lines(hidden, element_size);
  return lines <= 0 || lines * 8 > kLLMaxBytes ? 0 : kLLMaxBytes / 8 / lines;
}

// The kernel's reading of a grid: programs <= tokens: one block per row (segments 1), block b owns rows b,
// b + programs, ...; programs = tokens * s with 2 <= s <= kLLRMSNormMaxSegments: s segments per row. 0: invalid.
inline int ll_rmsnorm_segments_of(int64_t programs, int64_t tokens) {
  if (programs <= tokens) return 1;
  return programs % tokens == 0 && programs / tokens <= kLLRMSNormMaxSegments ? int(programs / tokens) : 0;
}

// The grid of `segments` blocks per row (1: a block per row, up to one per SM) with one thread per line of a segment
// (64..kLLRMSNormMaxThreads threads): the policy's grid once it has chosen the segments, and other grids for tuning
// and tests (the bench's --ll-segments).
inline LaunchConfig ll_rmsnorm_grid(int64_t tokens, int64_t hidden, int element_size, int sm_count, int segments) {
  const int64_t segment_lines = (ll_row_lines(hidden, element_size) + segments - 1) / segments;
  const int64_t blocks = std::min<int64_t>(sm_count, kMaxPrograms);
  const int64_t programs = segments > 1 ? tokens * segments : std::max<int64_t>(1, std::min(tokens, blocks));
  return {int(programs), int(std::clamp<int64_t>((segment_lines + 31) / 32 * 32, 64, kLLRMSNormMaxThreads)), 1};
}

inline LaunchConfig ll_rmsnorm_config(int64_t tokens, int64_t hidden, int element_size, int sm_count) {
  const int64_t lines = ll_row_lines(hidden, element_size);
  const int64_t blocks = std::min<int64_t>(sm_count, kMaxPrograms);
  int segments = 1;
  while (segments < kLLRMSNormMaxSegments && tokens * segments * 2 <= blocks &&
         lines >= segments * 2 * kLLRMSNormMinSegmentLines) {
    segments *= 2;
  }
  return ll_rmsnorm_grid(tokens, hidden, element_size, sm_count, segments);
}

inline LaunchConfig tree_config(int64_t shard, int element_size, int world, int sm_count) {
  const int64_t shard_bytes = shard * element_size;
  const int unroll = std::min(shard_bytes <= (256 << 10) ? 1 : shard_bytes <= (2 << 20) ? 2 : 4, max_unroll(world));
  return {grid(shard, element_size, kMaxTreeThreads, unroll, sm_count), kMaxTreeThreads, unroll};
}

}  // namespace shardkit
