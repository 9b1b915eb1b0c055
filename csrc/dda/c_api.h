// C entry points of the DDA kernels (c_api.cu): plain integers and addresses in, a cudaError_t code out.
// Python calls them through ctypes (shardkit/kernels/all_reduce/cuda.py); the torch binding
// (csrc/torch) calls the C++ entry points of all_reduce.h and policy.h directly and these for messages.
#pragma once
#include <cstdint>

extern "C" {

// table: host array of `world` workspace addresses; stream: a cudaStream_t (0 = legacy default).
int shardkit_flat_all_reduce(uintptr_t x, uintptr_t out, const int64_t* table, int world, uintptr_t host_error_record,
                             int64_t numel, int rank, uint32_t sig, int64_t x_offset, int64_t buffer_bytes,
                             int64_t timeout_iters, int zero_copy, int programs, int threads, int unroll, int dtype,
                             uintptr_t stream);
int shardkit_tree_all_reduce(uintptr_t x, uintptr_t out, const int64_t* table, int world, uintptr_t host_error_record,
                             int64_t numel, int rank, uint32_t sig, int64_t x_offset, int64_t buffer_bytes,
                             int64_t timeout_iters, int zero_copy, int programs, int threads, int unroll, int dtype,
                             int64_t shard, uintptr_t stream);
// The LL fused all-reduce + residual + RMSNorm (ll_rmsnorm.cu) of x, residual [tokens, hidden] and weight [hidden].
int shardkit_ll_all_reduce_rmsnorm(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t out,
                                   uintptr_t residual_out, const int64_t* table, int world, uintptr_t host_error_record,
                                   int64_t tokens, int64_t hidden, float eps, int rank, uint32_t sig,
                                   int64_t buffer_bytes, int64_t timeout_iters, int programs, int threads, int dtype,
                                   uintptr_t stream);
int shardkit_max_unroll(int world);
int shardkit_max_tree_threads();
// The launch policy (policy.h): config = {programs, threads, unroll}.
void shardkit_flat_config(int64_t numel, int element_size, int sm_count, int* config);
void shardkit_tree_config(int64_t shard, int element_size, int world, int sm_count, int* config);
void shardkit_ll_config(int64_t numel, int element_size, int sm_count, int* config);
void shardkit_ll_rmsnorm_config(int64_t tokens, int64_t hidden, int element_size, int sm_count, int* config);
void shardkit_ll_rmsnorm_grid(int64_t tokens, int64_t hidden, int element_size, int sm_count, int segments,
                              int* config);
int64_t shardkit_ll_rmsnorm_max_rows(int64_t hidden, int element_size);
int shardkit_grid(int64_t elements, int element_size, int threads, int unroll, int max_programs);
const char* shardkit_error_string(int code);

}  // extern "C"
