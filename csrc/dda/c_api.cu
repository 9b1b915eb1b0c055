// C entry points of the DDA kernels for Python's ctypes (shardkit/kernels/all_reduce/cuda.py), declared in
// c_api.h: plain integers and addresses in, a cudaError_t out. No torch headers, no Python headers: calling
// through ctypes costs ~1 us, far less than a Triton launch from Python.
#include "c_api.h"

#include <cstring>

#include "all_reduce.h"
#include "policy.h"

namespace {

shardkit::AllReduceArgs make_args(uintptr_t x, uintptr_t out, const int64_t* table, int world, uintptr_t host_error_record,
                                  int64_t numel, int rank, uint32_t sig, int64_t x_offset, int64_t buffer_bytes,
                                  int64_t timeout_iters, int zero_copy, int programs, int threads, int unroll,
                                  int dtype) {
  shardkit::AllReduceArgs a{};
  a.x = reinterpret_cast<const void*>(x);
  a.out = reinterpret_cast<void*>(out);
  for (int r = 0; r < world && r < shardkit::kMaxWorld; ++r) a.table.base[r] = reinterpret_cast<char*>(table[r]);
  a.host_error_record = reinterpret_cast<int*>(host_error_record);
  a.numel = numel;
  a.rank = rank;
  a.world = world;
  a.sig = sig;
  a.x_offset = x_offset;
  a.buffer_bytes = buffer_bytes;
  a.timeout_iters = timeout_iters;
  a.zero_copy = zero_copy != 0;
  a.programs = programs;
  a.threads = threads;
  a.unroll = unroll;
  a.dtype = static_cast<shardkit::DType>(dtype);
  return a;
}

}  // namespace

extern "C" {

int shardkit_flat_all_reduce(uintptr_t x, uintptr_t out, const int64_t* table, int world, uintptr_t host_error_record,
                             int64_t numel, int rank, uint32_t sig, int64_t x_offset, int64_t buffer_bytes,
                             int64_t timeout_iters, int zero_copy, int programs, int threads, int unroll, int dtype,
                             uintptr_t stream) {
  const auto a = make_args(x, out, table, world, host_error_record, numel, rank, sig, x_offset, buffer_bytes, timeout_iters,
                           zero_copy, programs, threads, unroll, dtype);
  return shardkit::flat_all_reduce(a, reinterpret_cast<cudaStream_t>(stream));
}

int shardkit_ll_all_reduce(uintptr_t x, uintptr_t out, const int64_t* table, int world, uintptr_t host_error_record,
                           int64_t numel, int rank, uint32_t sig, int64_t x_offset, int64_t buffer_bytes,
                           int64_t timeout_iters, int zero_copy, int programs, int threads, int unroll, int dtype,
                           uintptr_t stream) {
  const auto a = make_args(x, out, table, world, host_error_record, numel, rank, sig, x_offset, buffer_bytes, timeout_iters,
                           zero_copy, programs, threads, unroll, dtype);
  return shardkit::ll_all_reduce(a, reinterpret_cast<cudaStream_t>(stream));
}

int shardkit_tree_all_reduce(uintptr_t x, uintptr_t out, const int64_t* table, int world, uintptr_t host_error_record,
                             int64_t numel, int rank, uint32_t sig, int64_t x_offset, int64_t buffer_bytes,
                             int64_t timeout_iters, int zero_copy, int programs, int threads, int unroll, int dtype,
                             int64_t shard, uintptr_t stream) {
  const auto a = make_args(x, out, table, world, host_error_record, numel, rank, sig, x_offset, buffer_bytes, timeout_iters,
                           zero_copy, programs, threads, unroll, dtype);
  return shardkit::tree_all_reduce(a, shard, reinterpret_cast<cudaStream_t>(stream));
}

int shardkit_ll_all_reduce_rmsnorm(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t out,
                                   uintptr_t residual_out, const int64_t* table, int world, uintptr_t host_error_record,
                                   int64_t tokens, int64_t hidden, float eps, int rank, uint32_t sig,
                                   int64_t buffer_bytes, int64_t timeout_iters, int programs, int threads, int dtype,
                                   uintptr_t stream) {
  shardkit::RMSNormArgs a{};
  a.x = reinterpret_cast<const void*>(x);
  a.residual = reinterpret_cast<const void*>(residual);
  a.weight = reinterpret_cast<const void*>(weight);
  a.out = reinterpret_cast<void*>(out);
  a.residual_out = reinterpret_cast<void*>(residual_out);
  for (int r = 0; r < world && r < shardkit::kMaxWorld; ++r) a.table.base[r] = reinterpret_cast<char*>(table[r]);
  a.host_error_record = reinterpret_cast<int*>(host_error_record);
  a.tokens = tokens;
  a.hidden = hidden;
  a.eps = eps;
  a.rank = rank;
  a.world = world;
  a.sig = sig;
  a.buffer_bytes = buffer_bytes;
  a.timeout_iters = timeout_iters;
  a.programs = programs;
  a.threads = threads;
  a.dtype = static_cast<shardkit::DType>(dtype);
  return shardkit::ll_all_reduce_rmsnorm(a, reinterpret_cast<cudaStream_t>(stream));
}

int shardkit_max_unroll(int world) { return shardkit::max_unroll(world); }

int shardkit_max_tree_threads() { return shardkit::kMaxTreeThreads; }

void shardkit_flat_config(int64_t numel, int element_size, int sm_count, int* config) {
  const auto c = shardkit::flat_config(numel, element_size, sm_count);
  config[0] = c.programs, config[1] = c.threads, config[2] = c.unroll;
}

void shardkit_tree_config(int64_t shard, int element_size, int world, int sm_count, int* config) {
  const auto c = shardkit::tree_config(shard, element_size, world, sm_count);
  config[0] = c.programs, config[1] = c.threads, config[2] = c.unroll;
}

void shardkit_ll_config(int64_t numel, int element_size, int sm_count, int* config) {
  const auto c = shardkit::ll_config(numel, element_size, sm_count);
  config[0] = c.programs, config[1] = c.threads, config[2] = c.unroll;
}

void shardkit_ll_rmsnorm_config(int64_t tokens, int64_t hidden, int element_size, int sm_count, int* config) {
  const auto c = shardkit::ll_rmsnorm_config(tokens, hidden, element_size, sm_count);
  config[0] = c.programs, config[1] = c.threads, config[2] = c.unroll;
}

void shardkit_ll_rmsnorm_grid(int64_t tokens, int64_t hidden, int element_size, int sm_count, int segments,
                              int* config) {
  const auto c = shardkit::ll_rmsnorm_grid(tokens, hidden, element_size, sm_count, segments);
  config[0] = c.programs, config[1] = c.threads, config[2] = c.unroll;
}

int64_t shardkit_ll_rmsnorm_max_rows(int64_t hidden, int element_size) {
  return shardkit::ll_rmsnorm_max_rows(hidden, element_size);
}

int shardkit_grid(int64_t elements, int element_size, int threads, int unroll, int max_programs) {
  return shardkit::grid(elements, element_size, threads, unroll, max_programs);
}

const char* shardkit_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
