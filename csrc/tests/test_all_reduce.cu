// Unit test of the CUDA DDA kernels on ONE GPU: W "ranks" are W workspaces on the same device,
// each rank's kernel on its own stream, all running concurrently (they wait for each other at the
// barriers exactly as ranks on different GPUs do). Checks flat, tree and LL, fp32/fp16/bf16, sizes with
// tails, several calls in a row (epoch and double buffering), against a double-precision sum; LL also
// bitwise against flat, misaligned and in place, across the LL counter's cleaning calls and its 2**32
// wrap, and its error paths (ranks with different signatures, a rank that never comes).
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

enum class Algo { kFlat, kTree, kLL };
const char* name(Algo a) { return a == Algo::kFlat ? "flat" : a == Algo::kTree ? "tree" : "ll"; }

// How an LL check differs from a plain call (positional: {offset, in_place, ll_calls, stale_byte}).
struct Variant {
  int offset = 0;              // elements between the allocation and x / out: 1 misaligns every access
  bool in_place = false;       // out = x
  uint32_t ll_calls = 0;       // LL calls completed before the first call (the counter in the signal area)
  int stale_byte = 0;          // fill of the LL region before the first call: flags of LL calls long ago
};

// W workspaces laid out as PeerMemory lays them out (protocol.py): signal area and LL region zeroed.
struct World {
  int world;
  int64_t buffer_bytes = 1 << 20;
  PeerTable table{};
  std::vector<int*> status;
  std::vector<cudaStream_t> streams;
  World(int w, const Variant& v) : world(w), status(w), streams(w) {
    const int64_t ws_bytes = ll_offset(buffer_bytes) + 2 * world * kLLSlotBytes;
    for (int r = 0; r < world; ++r) {
      CHECK(cudaMalloc(&table.base[r], ws_bytes));
      CHECK(cudaMemset(table.base[r], 0, kSignalBytes));
      CHECK(cudaMemset(table.base[r] + ll_offset(buffer_bytes), v.stale_byte, 2 * world * kLLSlotBytes));
      const int64_t calls = v.ll_calls;
      CHECK(cudaMemcpy(table.base[r] + kLLCallsOff, &calls, sizeof(calls), cudaMemcpyHostToDevice));
      CHECK(cudaHostAlloc(&status[r], 4 * sizeof(int), cudaHostAllocMapped));
      std::memset(status[r], 0, 4 * sizeof(int));
      CHECK(cudaStreamCreateWithFlags(&streams[r], cudaStreamNonBlocking));
    }
    CHECK(cudaDeviceSynchronize());
  }
  ~World() {
    for (int r = 0; r < world; ++r) {
      CHECK(cudaFree(table.base[r]));
      CHECK(cudaFreeHost(status[r]));
      CHECK(cudaStreamDestroy(streams[r]));
    }
  }
  AllReduceArgs args(const void* x, void* out, int64_t numel, int r, uint32_t sig, int programs, int threads, int unroll,
                     DType dtype, int64_t timeout_iters = 1 << 26) const {
    return AllReduceArgs{x, out, table, status[r], numel, r, world, sig, 0, buffer_bytes, timeout_iters, false, programs,
                         threads, unroll, dtype};
  }
};

template <typename T>
int check(int world, Algo algo, int64_t numel, int threads, int unroll, int calls, double tol, std::mt19937& gen,
          const Variant& variant = {}) {
  World w(world, variant);
  std::vector<T*> x(world), out(world), flat_out(world);
  for (int r = 0; r < world; ++r) {
    CHECK(cudaMalloc(&x[r], (numel + 8) * sizeof(T)));
    CHECK(cudaMalloc(&out[r], (numel + 8) * sizeof(T)));
    CHECK(cudaMalloc(&flat_out[r], (numel + 8) * sizeof(T)));
  }
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
      CHECK(cudaMemcpy(x[r] + variant.offset, host[r].data(), numel * sizeof(T), cudaMemcpyHostToDevice));
      CHECK(cudaMemset(out[r], 0xFF, (numel + 8) * sizeof(T)));  // NaN poison: every element must be written
    }
    const int64_t shard = (numel + 16 * world - 1) / (16 * world) * 16;
    const uint32_t sig = 12345u + uint32_t(numel);
    for (int r = 0; r < world; ++r) {
      T* xr = x[r] + variant.offset;
      T* outr = variant.in_place ? xr : out[r] + variant.offset;
      if (algo == Algo::kLL) {  // flat first on the same inputs (interleaved calls share the epoch): the bits to match
        CHECK(flat_all_reduce(w.args(xr, flat_out[r], numel, r, sig, 3, 128, 1, dtype_of<T>()), w.streams[r]));
      }
      const AllReduceArgs a = w.args(xr, outr, numel, r, sig, 3, threads, unroll, dtype_of<T>());
      CHECK(algo == Algo::kTree ? tree_all_reduce(a, shard, w.streams[r])
            : algo == Algo::kFlat ? flat_all_reduce(a, w.streams[r])
                                  : ll_all_reduce(a, w.streams[r]));
    }
    CHECK(cudaDeviceSynchronize());
    std::vector<T> got(numel + 8), first(numel), flat(numel);
    for (int r = 0; r < world; ++r) {
      if (w.status[r][0] != 0) {
        std::fprintf(stderr, "rank %d reported error %d\n", r, w.status[r][0]);
        ++failures;
      }
      T* outr = variant.in_place ? x[r] : out[r];
      CHECK(cudaMemcpy(got.data(), outr, (numel + 8) * sizeof(T), cudaMemcpyDeviceToHost));
      if (algo == Algo::kLL) CHECK(cudaMemcpy(flat.data(), flat_out[r], numel * sizeof(T), cudaMemcpyDeviceToHost));
      const T* g0 = got.data() + variant.offset;
      if (r == 0) std::memcpy(first.data(), g0, numel * sizeof(T));
      for (int64_t i = 0; i < numel; ++i) {
        const double g = back(g0[i]);
        if (!(std::fabs(g - ref[i]) <= tol * (1.0 + std::fabs(ref[i])))) {
          std::fprintf(stderr, "%s world=%d numel=%lld threads=%d unroll=%d offset=%d in_place=%d ll_calls=%u call=%d "
                       "rank=%d i=%lld: got %g want %g\n", name(algo), world, (long long)numel, threads, unroll,
                       variant.offset, int(variant.in_place), variant.ll_calls, call, r, (long long)i, g, ref[i]);
          ++failures;
          break;
        }
        if (std::memcmp(&g0[i], &first[i], sizeof(T)) != 0) {
          std::fprintf(stderr, "%s: ranks differ bitwise at %lld\n", name(algo), (long long)i);
          ++failures;
          break;
        }
        if (algo == Algo::kLL && std::memcmp(&g0[i], &flat[i], sizeof(T)) != 0) {
          std::fprintf(stderr, "ll world=%d numel=%lld: differs bitwise from flat at %lld\n", world, (long long)numel,
                       (long long)i);
          ++failures;
          break;
        }
      }
      if (!variant.in_place) {  // nothing written around out
        const T* all = got.data();
        for (int64_t i = 0; i < variant.offset; ++i) failures += !std::isnan(back(all[i]));
        for (int64_t i = variant.offset + numel; i < numel + 8; ++i) failures += !std::isnan(back(all[i]));
      }
    }
  }
  for (int r = 0; r < world; ++r) {
    CHECK(cudaFree(x[r]));
    CHECK(cudaFree(out[r]));
    CHECK(cudaFree(flat_out[r]));
  }
  return failures;
}

// LL error paths on 2 ranks: another signature on rank 1 -> both ranks record kMismatch naming the other,
// outputs NaN; rank 1 never launching -> rank 0 records kTimeout naming rank 1, output NaN.
int check_ll_errors() {
  int failures = 0;
  const int64_t numel = 5000;
  float* buf[2];
  for (auto& b : buf) {
    CHECK(cudaMalloc(&b, 2 * numel * sizeof(float)));
    CHECK(cudaMemset(b, 0, numel * sizeof(float)));  // x: zeros (sums finite); out after it
  }
  for (bool absent : {false, true}) {
    World w(2, {});
    for (int r = 0; r < 2; ++r) CHECK(cudaMemset(buf[r] + numel, 0, numel * sizeof(float)));
    for (int r = 0; r < (absent ? 1 : 2); ++r) {
      const uint32_t sig = absent ? 7u : 7u + r;
      CHECK(ll_all_reduce(w.args(buf[r], buf[r] + numel, numel, r, sig, 4, 256, 1, DType::kFloat32, absent ? 1 << 16 : 1 << 26),
                          w.streams[r]));
    }
    CHECK(cudaDeviceSynchronize());
    for (int r = 0; r < (absent ? 1 : 2); ++r) {
      const int want = absent ? kTimeout : kMismatch;
      const int culprit = absent ? 2 : 1 << (1 - r);
      if (w.status[r][0] != want || w.status[r][2] != culprit) {
        std::fprintf(stderr, "ll %s: rank %d recorded code %d culprits %d, want %d and %d\n",
                     absent ? "absent peer" : "mismatch", r, w.status[r][0], w.status[r][2], want, culprit);
        ++failures;
      }
      std::vector<float> got(numel);
      CHECK(cudaMemcpy(got.data(), buf[r] + numel, numel * sizeof(float), cudaMemcpyDeviceToHost));
      for (float v : got) {
        if (!std::isnan(v)) {
          std::fprintf(stderr, "ll %s: rank %d wrote a number, not NaN\n", absent ? "absent peer" : "mismatch", r);
          ++failures;
          break;
        }
      }
    }
  }
  for (auto& b : buf) CHECK(cudaFree(b));
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
    for (Algo algo : {Algo::kFlat, Algo::kTree}) {
      const bool tree = algo == Algo::kTree;
      for (int64_t numel : {1, 7, 1000, 4099, 65536 + 8}) {
        // (threads, unroll): small blocks whose tiles wrap around the 3 programs, and the largest
        // blocks each kernel accepts (a launch over the register budget fails here, not in use).
        using Shape = std::pair<int, int>;
        const std::vector<Shape> shapes = tree ? std::vector<Shape>{{128, 1}, {128, 3}, {kMaxTreeThreads, max_unroll(world)}}
                                               : std::vector<Shape>{{128, 1}, {1024, 1}};
        for (const auto& [threads, unroll] : shapes) {
          failures += check<float>(world, algo, numel, threads, unroll, 3, 1e-5, gen);
          failures += check<__half>(world, algo, numel, threads, unroll, 3, 2e-3, gen);
          failures += check<__nv_bfloat16>(world, algo, numel, threads, unroll, 3, 1.6e-2, gen);
        }
      }
    }
  }
  // LL: worlds 2 and 5, counts with tails up to the largest call, 3 programs of 128 threads (tiles wrap
  // around the grid) and one of 1024, misaligned and in place, 4 calls in a row (both parities twice).
  for (int world : {2, 5}) {
    for (int64_t numel : {1, 7, 1000, 4099, 65536 + 5}) {
      for (int threads : {128, 1024}) {
        failures += check<float>(world, Algo::kLL, numel, threads, 1, 4, 1e-5, gen);
        failures += check<__half>(world, Algo::kLL, numel, threads, 1, 4, 2e-3, gen);
        failures += check<__nv_bfloat16>(world, Algo::kLL, numel, threads, 1, 4, 1.6e-2, gen);
      }
      failures += check<__half>(world, Algo::kLL, numel, 128, 1, 2, 2e-3, gen, Variant{1, false, 0, 0});
      failures += check<float>(world, Algo::kLL, numel, 128, 1, 2, 1e-5, gen, Variant{1, true, 0, 0});
      failures += check<__nv_bfloat16>(world, Algo::kLL, numel, 1024, 1, 2, 1.6e-2, gen, Variant{0, true, 0, 0});
    }
    const int64_t largest = kLLMaxBytes / 2;
    failures += check<__nv_bfloat16>(world, Algo::kLL, largest, 1024, 1, 2, 1.6e-2, gen);
    failures += check<float>(world, Algo::kLL, kLLMaxBytes / 4 - 3, 128, 1, 2, 1e-5, gen);
    // Across the cleaning calls (k % period < 2) and the 2**32 wrap of the LL counter: the region holds
    // flags of calls long ago (0x5a5a5a5a), as it would after 2**32 calls; small calls after a large one.
    for (uint32_t before : {kLLCleanPeriod - 3, 0xFFFFFFFFu - 2}) {
      failures += check<__nv_bfloat16>(world, Algo::kLL, 65536 + 5, 1024, 1, 5, 1.6e-2, gen,
                                        Variant{0, false, before, 0x5a});
    }
  }
  failures += check_ll_errors();
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
