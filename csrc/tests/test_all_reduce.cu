// Unit test of the CUDA DDA kernels on ONE GPU: W "ranks" are W workspaces on the same device,
// each rank's kernel on its own stream, all running concurrently (they wait for each other at the
// barriers exactly as ranks on different GPUs do). Checks flat and tree, fp32/fp16/bf16, sizes with
// tails, several calls in a row (epoch and double buffering), against a double-precision sum.
// Exits 0 with a notice when no GPU is present (CI builds it; GPU machines run it via ctest).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "dda/all_reduce.h"

using namespace shardkit;

#define CHECK(call)                                                                   \
  do {                                                                                \
    cudaError_t e_ = (call);                                                          \
    if (e_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

template <typename T> T cast(float v);
template <> float cast(float v) { return v; }
template <> __half cast(float v) { return __float2half(v); }
template <> __nv_bfloat16 cast(float v) { return __float2bfloat16(v); }
double back(float v) { return v; }
double back(__half v) { return __half2float(v); }
double back(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> DType dtype_of();
template <> DType dtype_of<float>() { return DType::kFloat32; }
template <> DType dtype_of<__half>() { return DType::kFloat16; }
template <> DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }

template <typename T>
int check(int world, bool tree, int64_t numel, int threads, int unroll, int calls, double tol, std::mt19937& gen) {
  const int64_t buffer_bytes = 1 << 20;
  const int64_t ws_bytes = kSignalBytes + 3 * buffer_bytes;
  PeerTable table{};
  std::vector<int*> status(world);
  std::vector<cudaStream_t> streams(world);
  std::vector<T*> x(world), out(world);
  for (int r = 0; r < world; ++r) {
    CHECK(cudaMalloc(&table.base[r], ws_bytes));
    CHECK(cudaMemset(table.base[r], 0, kSignalBytes));
    CHECK(cudaHostAlloc(&status[r], 4 * sizeof(int), cudaHostAllocMapped));
    status[r][0] = 0;
    CHECK(cudaStreamCreateWithFlags(&streams[r], cudaStreamNonBlocking));
    CHECK(cudaMalloc(&x[r], numel * sizeof(T) + 16));
    CHECK(cudaMalloc(&out[r], numel * sizeof(T) + 16));
  }
  CHECK(cudaDeviceSynchronize());
  std::normal_distribution<float> normal;
  int failures = 0;
  for (int call = 0; call < calls; ++call) {
    std::vector<std::vector<T>> host(world, std::vector<T>(numel));
    std::vector<double> ref(numel, 0.0);
    for (int r = 0; r < world; ++r) {
      for (int64_t i = 0; i < numel; ++i) {
        host[r][i] = cast<T>(normal(gen));
        ref[i] += back(host[r][i]);
      }
      CHECK(cudaMemcpy(x[r], host[r].data(), numel * sizeof(T), cudaMemcpyHostToDevice));
      CHECK(cudaMemset(out[r], 0xFF, numel * sizeof(T)));  // NaN poison: every element must be written
    }
    const int64_t shard = (numel + 16 * world - 1) / (16 * world) * 16;
    for (int r = 0; r < world; ++r) {
      AllReduceArgs a{x[r], out[r], table, status[r], numel, r, world, 12345u + uint32_t(numel),
                      0, buffer_bytes, 1 << 26, false, 3, threads, unroll, dtype_of<T>()};
      CHECK(tree ? tree_all_reduce(a, shard, streams[r]) : flat_all_reduce(a, streams[r]));
    }
    CHECK(cudaDeviceSynchronize());
    std::vector<T> got(numel), first(numel);
    for (int r = 0; r < world; ++r) {
      if (status[r][0] != 0) {
        std::fprintf(stderr, "rank %d reported error %d\n", r, status[r][0]);
        ++failures;
      }
      CHECK(cudaMemcpy(got.data(), out[r], numel * sizeof(T), cudaMemcpyDeviceToHost));
      if (r == 0) first = got;
      for (int64_t i = 0; i < numel; ++i) {
        const double g = back(got[i]);
        if (!(std::fabs(g - ref[i]) <= tol * (1.0 + std::fabs(ref[i])))) {
          std::fprintf(stderr, "%s world=%d numel=%lld unroll=%d call=%d rank=%d i=%lld: got %g want %g\n",
                       tree ? "tree" : "flat", world, (long long)numel, unroll, call, r, (long long)i, g, ref[i]);
          ++failures;
          break;
        }
        if (std::memcmp(&got[i], &first[i], sizeof(T)) != 0) {
          std::fprintf(stderr, "ranks differ bitwise at %lld\n", (long long)i);
          ++failures;
          break;
        }
      }
    }
  }
  for (int r = 0; r < world; ++r) {
    CHECK(cudaFree(table.base[r]));
    CHECK(cudaFreeHost(status[r]));
    CHECK(cudaStreamDestroy(streams[r]));
    CHECK(cudaFree(x[r]));
    CHECK(cudaFree(out[r]));
  }
  return failures;
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: test_all_reduce built but not run\n");
    return 0;
  }
  std::mt19937 gen(7);
  int failures = 0;
  for (int world : {2, 3, 4, 5}) {  // 5: the smaller max_unroll
    for (bool tree : {false, true}) {
      for (int64_t numel : {1, 7, 1000, 4099, 65536 + 8}) {
        // (threads, unroll): small blocks whose tiles wrap around the 3 programs, and the largest
        // blocks each kernel accepts (a launch over the register budget fails here, not in use).
        using Shape = std::pair<int, int>;
        const std::vector<Shape> shapes = tree ? std::vector<Shape>{{128, 1}, {128, 3}, {kMaxTreeThreads, max_unroll(world)}}
                                               : std::vector<Shape>{{128, 1}, {1024, 1}};
        for (const auto& [threads, unroll] : shapes) {
          failures += check<float>(world, tree, numel, threads, unroll, 3, 1e-5, gen);
          failures += check<__half>(world, tree, numel, threads, unroll, 3, 2e-3, gen);
          failures += check<__nv_bfloat16>(world, tree, numel, threads, unroll, 3, 1.6e-2, gen);
        }
      }
    }
  }
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
