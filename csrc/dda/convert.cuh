// fp32 <-> element conversions of the all-reduce kernels (all_reduce.cu, ll_all_reduce.cu): every sum is
// taken in fp32, in rank order, so that all kernels and all ranks round alike.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace shardkit {

template <typename T> __device__ __forceinline__ float to_float(T v) { return float(v); }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v) { return T(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16(v); }

}  // namespace shardkit
