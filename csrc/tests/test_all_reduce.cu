// Unit test of the CUDA DDA kernels on ONE GPU: W "ranks" are W workspaces on the same device,
// each rank's kernel on its own stream, all running concurrently (they wait for each other at the
// barriers exactly as ranks on different GPUs do). Checks flat, tree and LL, fp32/fp16/bf16, sizes with
// tails, several calls in a row (epoch and double buffering), against a double-precision sum; LL also
// bitwise against flat, misaligned and in place, across the LL counter's cleaning calls and its 2**32
// wrap, and its error paths (ranks with different signatures, a rank that never comes); the LL fused
// all-reduce + residual + RMSNorm (ll_rmsnorm.cu) against the host's fp32 sums and a double-precision norm.
// Exits 0 with a notice when no GPU is present (CI builds it; GPU machines run it via ctest).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "dda/all_reduce.h"
#include "dda/policy.h"

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
    // LL: flat first on the same inputs (interleaved calls share the epoch): the bits to match. Every rank's flat
    // call is launched before any rank's second call: one host thread stands for W hosts here, so a launch that
    // blocks (see main) must not hold back a kernel that a running one waits for.
    for (int r = 0; r < world && algo == Algo::kLL; ++r) {
      CHECK(flat_all_reduce(w.args(x[r] + variant.offset, flat_out[r], numel, r, sig, 3, 128, 1, dtype_of<T>()),
                            w.streams[r]));
    }
    for (int r = 0; r < world; ++r) {
      T* xr = x[r] + variant.offset;
      T* outr = variant.in_place ? xr : out[r] + variant.offset;
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

// After a failed call on 2 ranks (absent: rank 1 never came, else rank 1 sent another signature): rank r's error
// record names the failure and the peer to blame, and all `count` outputs at `out` are NaN. Returns the failures.
int check_failed_call(const char* what, const World& w, int r, bool absent, const float* out, int64_t count) {
  int failures = 0;
  const int want = absent ? kTimeout : kMismatch;
  const int culprit = absent ? 2 : 1 << (1 - r);
  const char* why = absent ? "absent peer" : "mismatch";
  if (w.status[r][0] != want || w.status[r][2] != culprit) {
    std::fprintf(stderr, "%s %s: rank %d recorded code %d culprits %d, want %d and %d\n", what, why, r, w.status[r][0],
                 w.status[r][2], want, culprit);
    ++failures;
  }
  std::vector<float> got(count);
  CHECK(cudaMemcpy(got.data(), out, count * sizeof(float), cudaMemcpyDeviceToHost));
  for (float v : got) {
    if (!std::isnan(v)) {
      std::fprintf(stderr, "%s %s: rank %d wrote a number, not NaN\n", what, why, r);
      ++failures;
      break;
    }
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
    for (int r = 0; r < (absent ? 1 : 2); ++r) failures += check_failed_call("ll", w, r, absent, buf[r] + numel, numel);
  }
  for (auto& b : buf) CHECK(cudaFree(b));
  return failures;
}

// The LL fused all-reduce + residual + RMSNorm (ll_rmsnorm.cu) on `world` ranks, `calls` calls in a row (odd
// calls follow an LL all-reduce: the two kinds share the LL counter and slots): residual_out bitwise equal to
// the host's fp32 sums in rank order (the kernel's numerics), out within two roundings of a double-precision
// reference, both bitwise equal on every rank, outputs poisoned with NaN first and nothing written around them.
// offset 1 misaligns every tensor; in_place: out = x and residual_out = residual.
template <typename T>
int check_ll_rmsnorm(int world, int64_t tokens, int64_t hidden, int calls, double tol, std::mt19937& gen,
                     int offset = 0, bool in_place = false, int policy_sms = 0) {
  World w(world, {});
  const int64_t n = tokens * hidden, cap = n + 8;
  std::vector<T*> x(world), res(world), out(world), res_out(world), weight(world), scratch(world);
  for (int r = 0; r < world; ++r) {
    for (T** p : {&x[r], &res[r], &out[r], &res_out[r], &weight[r], &scratch[r]}) CHECK(cudaMalloc(p, cap * sizeof(T)));
  }
  const float eps = 1e-5f;
  // policy_sms > 0: the policy's grid for that many SMs (rows split over a cluster of blocks where it says so);
  // else rows wrap around at most 5 blocks, one block per row.
  const LaunchConfig policy = ll_rmsnorm_config(tokens, hidden, sizeof(T), policy_sms > 0 ? policy_sms : 132);
  const int threads = policy.threads;
  const int programs = policy_sms > 0 ? policy.programs : int(std::min<int64_t>(tokens, 5));
  std::normal_distribution<float> normal;
  int failures = 0;
  for (int call = 0; call < calls; ++call) {
    std::vector<std::vector<T>> hx(world, std::vector<T>(n));
    std::vector<T> hres(n), hw(hidden);
    for (auto& v : hx) for (auto& e : v) e = cast<T>(normal(gen));
    for (auto& e : hres) e = cast<T>(normal(gen));
    for (auto& e : hw) e = cast<T>(1.0f + 0.5f * normal(gen));
    for (int r = 0; r < world; ++r) {
      CHECK(cudaMemcpy(x[r] + offset, hx[r].data(), n * sizeof(T), cudaMemcpyHostToDevice));
      CHECK(cudaMemcpy(res[r] + offset, hres.data(), n * sizeof(T), cudaMemcpyHostToDevice));
      CHECK(cudaMemcpy(weight[r] + offset, hw.data(), hidden * sizeof(T), cudaMemcpyHostToDevice));
      CHECK(cudaMemset(out[r], 0xFF, cap * sizeof(T)));
      CHECK(cudaMemset(res_out[r], 0xFF, cap * sizeof(T)));
    }
    for (int r = 0; r < world; ++r) {
      if (call % 2) {
        CHECK(ll_all_reduce(w.args(x[r] + offset, scratch[r], std::min<int64_t>(n, 1000), r, 99u, 2, 128, 1,
                                   dtype_of<T>()), w.streams[r]));
      }
      RMSNormArgs a{};
      a.x = x[r] + offset;
      a.residual = res[r] + offset;
      a.weight = weight[r] + offset;
      a.out = in_place ? x[r] + offset : out[r] + offset;
      a.residual_out = in_place ? res[r] + offset : res_out[r] + offset;
      a.table = w.table;
      a.host_error_record = w.status[r];
      a.tokens = tokens;
      a.hidden = hidden;
      a.eps = eps;
      a.rank = r;
      a.world = world;
      a.sig = 777u + uint32_t(n);
      a.buffer_bytes = w.buffer_bytes;
      a.timeout_iters = 1 << 26;
      a.programs = programs;
      a.threads = threads;
      a.dtype = dtype_of<T>();
      CHECK(ll_all_reduce_rmsnorm(a, w.streams[r]));
    }
    CHECK(cudaDeviceSynchronize());
    // The host's emulation of residual_out (fp32, 0 + x_0 + ... + x_{W-1}, + residual, one rounding) and the
    // double-precision out.
    std::vector<T> want_res(n);
    std::vector<double> want_out(n);
    for (int64_t t = 0; t < tokens; ++t) {
      double ssq = 0.0;
      for (int64_t c = 0; c < hidden; ++c) {
        const int64_t i = t * hidden + c;
        float acc = 0.f;
        for (int r = 0; r < world; ++r) acc += float(back(hx[r][i]));
        want_res[i] = cast<T>(acc + float(back(hres[i])));
        ssq += back(want_res[i]) * back(want_res[i]);
      }
      const double rstd = 1.0 / std::sqrt(ssq / double(hidden) + eps);
      for (int64_t c = 0; c < hidden; ++c) want_out[t * hidden + c] = back(want_res[t * hidden + c]) * rstd * back(hw[c]);
    }
    std::vector<T> got_out(cap), got_res(cap), first_out(n), first_res(n);
    for (int r = 0; r < world; ++r) {
      if (w.status[r][0] != 0) {
        std::fprintf(stderr, "ll rmsnorm: rank %d reported error %d\n", r, w.status[r][0]);
        ++failures;
      }
      CHECK(cudaMemcpy(got_out.data(), in_place ? x[r] : out[r], cap * sizeof(T), cudaMemcpyDeviceToHost));
      CHECK(cudaMemcpy(got_res.data(), in_place ? res[r] : res_out[r], cap * sizeof(T), cudaMemcpyDeviceToHost));
      const T* go = got_out.data() + offset;
      const T* gr = got_res.data() + offset;
      if (r == 0) {
        std::memcpy(first_out.data(), go, n * sizeof(T));
        std::memcpy(first_res.data(), gr, n * sizeof(T));
      }
      for (int64_t i = 0; i < n; ++i) {
        const double o = back(go[i]);
        const char* bad = std::memcmp(&gr[i], &want_res[i], sizeof(T)) != 0 ? "residual_out differs from fp32 sums"
                          : !(std::fabs(o - want_out[i]) <= 2 * tol * (1.0 + std::fabs(want_out[i]))) ? "out off"
                          : std::memcmp(&go[i], &first_out[i], sizeof(T)) != 0 ? "out differs from rank 0's"
                          : std::memcmp(&gr[i], &first_res[i], sizeof(T)) != 0 ? "residual_out differs from rank 0's"
                                                                                : nullptr;
        if (bad) {
          std::fprintf(stderr, "ll rmsnorm world=%d tokens=%lld hidden=%lld offset=%d in_place=%d call=%d rank=%d "
                       "i=%lld: %s (out %g want %g, residual_out %g want %g)\n", world, (long long)tokens,
                       (long long)hidden, offset, int(in_place), call, r, (long long)i, bad, o, want_out[i],
                       back(gr[i]), back(want_res[i]));
          ++failures;
          break;
        }
      }
      if (!in_place) {  // nothing written around out and residual_out
        for (const T* all : {got_out.data(), got_res.data()}) {
          for (int64_t i = 0; i < offset; ++i) failures += !std::isnan(back(all[i]));
          for (int64_t i = offset + n; i < cap; ++i) failures += !std::isnan(back(all[i]));
        }
      }
    }
  }
  for (int r = 0; r < world; ++r) {
    for (T* p : {x[r], res[r], out[r], res_out[r], weight[r], scratch[r]}) CHECK(cudaFree(p));
  }
  return failures;
}

// LL fused error paths on 2 ranks, as check_ll_errors: another signature on rank 1 -> kMismatch on both, an
// absent rank 1 -> kTimeout naming it on rank 0; outputs NaN.
int check_ll_rmsnorm_errors() {
  int failures = 0;
  const int64_t tokens = 3, hidden = 1000, n = tokens * hidden;
  float* buf[2];
  for (auto& b : buf) {
    CHECK(cudaMalloc(&b, 4 * n * sizeof(float)));
    CHECK(cudaMemset(b, 0, 4 * n * sizeof(float)));  // x, residual, weight: zeros (finite sums); out, residual_out
  }
  for (bool absent : {false, true}) {
    World w(2, {});
    for (int r = 0; r < (absent ? 1 : 2); ++r) {
      RMSNormArgs a{};
      a.x = buf[r];
      a.residual = buf[r];
      a.weight = buf[r];
      a.out = buf[r] + 2 * n;
      a.residual_out = buf[r] + 3 * n;
      a.table = w.table;
      a.host_error_record = w.status[r];
      a.tokens = tokens;
      a.hidden = hidden;
      a.eps = 1e-6f;
      a.rank = r;
      a.world = 2;
      a.sig = absent ? 7u : 7u + r;
      a.buffer_bytes = w.buffer_bytes;
      a.timeout_iters = absent ? 1 << 16 : 1 << 26;
      a.programs = 2;
      a.threads = 256;
      a.dtype = DType::kFloat32;
      CHECK(ll_all_reduce_rmsnorm(a, w.streams[r]));
    }
    CHECK(cudaDeviceSynchronize());
    for (int r = 0; r < (absent ? 1 : 2); ++r) {
      failures += check_failed_call("ll rmsnorm", w, r, absent, buf[r] + 2 * n, 2 * n);  // out and residual_out
    }
  }
  for (auto& b : buf) CHECK(cudaFree(b));
  return failures;
}

int main(int argc, char** argv) {
  // Load every kernel when CUDA starts, not at its first launch. Since CUDA 12.2 modules load lazily and a first
  // launch may synchronise the context (CUDA programming guide, Lazy Loading: potential hazards). One host thread
  // drives all ranks on one GPU here: the first launch of a new LL instantiation as rank 0's second kernel waited for
  // rank 0's flat kernel, which waited at its barrier for rank 1's, not launched yet: rank 0's flat timed out, so its
  // LL call wrote NaN without pushing, and rank 1's LL call timed out waiting for it (kTimeout on both ranks). Ranks
  // in separate processes (PeerMemory) cannot block each other's launches this way. check() now also launches
  // every rank's first kernel before any rank's second; CUDA_MODULE_LOADING=LAZY (kept if set) checks that alone.
  setenv("CUDA_MODULE_LOADING", "EAGER", 0);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: test_all_reduce built but not run\n");
    return 0;
  }
  std::mt19937 gen(7);
  int failures = 0;
  // An argument runs only the parts whose names contain it (e.g. "rmsnorm"); ctest runs them all.
  const std::string only = argc > 1 ? argv[1] : "";
  auto want = [&](const std::string& name) { return only.empty() || name.find(only) != std::string::npos; };
  // One line per part as it ends (failures so far, seconds): a slow or stuck part shows where it is.
  const auto start = std::chrono::steady_clock::now();
  auto part = [&](const std::string& name) {
    if (!want(name)) return;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("[%6.1f s] %s done, %d failure(s) so far\n", s, name.c_str(), failures);
    std::fflush(stdout);
  };
  for (int world : {2, 3, 4, 5}) {  // 5: the smaller max_unroll
    if (!want("flat + tree")) break;
    for (Algo algo : {Algo::kFlat, Algo::kTree}) {
      const bool tree = algo == Algo::kTree;
      for (int64_t numel : {1, 7, 1000, 4099, 65536 + 8}) {
        // (threads, unroll): small blocks whose tiles wrap around the 3 programs, and the largest
        // blocks each kernel accepts (a launch over the register budget fails here, not in use).
        using Shape = std::pair<int, int>;
        const std::vector<Shape> shapes = tree ? std::vector<Shape>{{128, 1}, {128, 3}, {kMaxTreeThreads, max_unroll(world)}}
                                               : std::vector<Shape>{{128, 1}, {kMaxFlatThreads, 1}};
        for (const auto& [threads, unroll] : shapes) {
          failures += check<float>(world, algo, numel, threads, unroll, 3, 1e-5, gen);
          failures += check<__half>(world, algo, numel, threads, unroll, 3, 2e-3, gen);
          failures += check<__nv_bfloat16>(world, algo, numel, threads, unroll, 3, 1.6e-2, gen);
        }
      }
    }
    part("flat + tree, world " + std::to_string(world));
  }
  // LL: worlds 2 and 5, counts with tails up to the largest call, 3 programs of 128 threads (tiles wrap
  // around the grid) and one of 1024, misaligned and in place, 4 calls in a row (both parities twice).
  for (int world : {2, 5}) {
    if (!want("ll")) break;
    for (int64_t numel : {1, 7, 1000, 4099, 65536 + 5}) {
      // fp32 calls of at most kLLMaxBytes (65536 + 5 floats overflow one LL slot: ll_all_reduce rejects them with
      // cudaErrorInvalidValue); the largest fp32 call is below.
      const int64_t numel32 = std::min<int64_t>(numel, kLLMaxBytes / 4 - 5);
      for (int threads : {128, 1024}) {
        failures += check<float>(world, Algo::kLL, numel32, threads, 1, 4, 1e-5, gen);
        failures += check<__half>(world, Algo::kLL, numel, threads, 1, 4, 2e-3, gen);
        failures += check<__nv_bfloat16>(world, Algo::kLL, numel, threads, 1, 4, 1.6e-2, gen);
      }
      failures += check<__half>(world, Algo::kLL, numel, 128, 1, 2, 2e-3, gen, Variant{1, false, 0, 0});
      failures += check<float>(world, Algo::kLL, numel32, 128, 1, 2, 1e-5, gen, Variant{1, true, 0, 0});
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
  part("ll");
  if (want("ll errors")) failures += check_ll_errors();
  part("ll errors");
  // LL fused all-reduce + residual + RMSNorm: worlds 2 and 5; hidden with tails of every line size (4099, 1001),
  // decode shapes (8192), the most rows of one launch; misaligned and in place.
  for (int world : {2, 5}) {
    if (!want("ll rmsnorm")) break;
    for (const auto& [tokens, hidden] : std::vector<std::pair<int64_t, int64_t>>{{1, 8192}, {7, 4099}, {3, 1001},
                                                                                 {16, 8192}, {2, 96}}) {
      failures += check_ll_rmsnorm<__nv_bfloat16>(world, tokens, hidden, 3, 1.6e-2, gen);
      failures += check_ll_rmsnorm<__half>(world, tokens, hidden, 2, 2e-3, gen);
    }
    failures += check_ll_rmsnorm<float>(world, 5, 1001, 3, 1e-5, gen);
    failures += check_ll_rmsnorm<float>(world, 1, 4096, 2, 1e-5, gen);
    failures += check_ll_rmsnorm<float>(world, 32, 2048, 2, 1e-5, gen);  // 32 rows x 8 KiB: one whole slot
    failures += check_ll_rmsnorm<__nv_bfloat16>(world, 4, 4096, 2, 1.6e-2, gen, 1, false);
    failures += check_ll_rmsnorm<__half>(world, 3, 1001, 2, 2e-3, gen, 1, true);
    failures += check_ll_rmsnorm<float>(world, 9, 4096, 2, 1e-5, gen, 0, true);
  }
  part("ll rmsnorm");
  // The policy's grids on 2 ranks, at most 64 blocks a rank (both ranks' clusters must be resident on this one
  // GPU at once): rows over clusters of 8 blocks (8 x 8192, 7 x 8192, 1 x 16384), of 4 (16 x 8192 on 66 SMs,
  // 4 x 4099 misaligned in place), fp32 rows of 128 KiB (a second pass over residual_out).
  if (want("ll rmsnorm, the policy's grids")) {
    failures += check_ll_rmsnorm<__nv_bfloat16>(2, 8, 8192, 3, 1.6e-2, gen, 0, false, 132);
    failures += check_ll_rmsnorm<__nv_bfloat16>(2, 16, 8192, 2, 1.6e-2, gen, 0, false, 66);
    failures += check_ll_rmsnorm<__nv_bfloat16>(2, 1, 16384, 2, 1.6e-2, gen, 0, false, 132);
    failures += check_ll_rmsnorm<__nv_bfloat16>(2, 4, 4099, 2, 1.6e-2, gen, 1, true, 132);
    failures += check_ll_rmsnorm<__half>(2, 7, 8192, 2, 2e-3, gen, 0, false, 132);
    failures += check_ll_rmsnorm<float>(2, 2, 32768, 2, 1e-5, gen, 0, false, 132);
  }
  part("ll rmsnorm, the policy's grids");
  if (want("ll rmsnorm errors")) failures += check_ll_rmsnorm_errors();
  part("ll rmsnorm errors");
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
