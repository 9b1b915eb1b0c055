// The C++ host path of Communicator.all_reduce on the CUDA kernels (shardkit._C, used by
// shardkit/collectives/host_path.py): argument checks with errors naming the argument, the algorithm
// choice of algo="auto", zero-copy detection, chunking, the launch policy, the call fingerprint, the
// launch on torch's current stream and its error check, all in one call from Python. The Python host path
// spends 23-30 us per eager call on these on H200s (bench/profile_eager.py measures both paths).
//
// The one binding layer between torch and the raw-pointer kernels of csrc/dda, which stay free of torch
// headers (FlashInfer keeps its kernels and its torch binding apart the same way). A pybind11 class rather
// than a TORCH_LIBRARY custom class or op: calling a custom-class method from Python cost 5.5-8 us and a
// torch.ops op 2.7-3 us on the CPU machine, a pybind11 method 0.5-0.8 us. The stream comes from c10's
// device-guard interface (libc10, present in CPU wheels too), so nothing here links libc10_cuda.
//
// Calls it does not handle (algo "nccl" / "copy" / unknown, "auto" choosing those, a communicator whose
// error record is set) return None: the Python path then runs them, with its own messages. Algorithms:
// flat, tree (all_reduce.cu) and ll (ll_all_reduce.cu: no zero copy, kLLMaxBytes per launch). The fused
// all-reduce + residual + RMSNorm: its LL kernel (ll_rmsnorm.cu), for algo "ll" and "auto" where auto picks it
// (by the measured rule of the mode: the stream being captured into a CUDA graph or not); the Triton flat / tree
// kernels stay on the Python path.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cstring>
#include <iterator>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dda/all_reduce.h"
#include "dda/c_api.h"
#include "dda/layout.h"
#include "dda/policy.h"

namespace py = pybind11;

namespace shardkit {
namespace {

// The FFI dtype code of a reducible dtype (layout.h, checked against protocol.DTYPE_CODES).
std::optional<DType> dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return std::nullopt;
  }
}

// Python's spelling of an attribute of a tensor argument (torch.float16, cuda:1, (4, 5)) for a message;
// only ever called on the way to an error.
std::string python_text(py::handle obj, const char* attr, bool as_tuple = false) {
  py::object value = obj.attr(attr);
  if (as_tuple) value = py::reinterpret_steal<py::object>(PySequence_Tuple(value.ptr()));  // (4, 5), not torch.Size
  return as_tuple ? std::string(py::repr(value)) : std::string(py::str(value));
}

enum class Algo { kFlat, kTree, kLL, kOther };

const char* algo_name(Algo a) { return a == Algo::kFlat ? "flat" : a == Algo::kTree ? "tree" : "ll"; }

Algo parse_algo(const std::string& name) {
  return name == "flat" ? Algo::kFlat : name == "tree" ? Algo::kTree : name == "ll" ? Algo::kLL : Algo::kOther;
}

// One launch of a call: a chunk of `numel` elements from element `lo`.
struct Launch {
  Algo algo;
  int64_t lo, numel, shard;
  bool zero_copy;
  int64_t x_offset;  // byte offset of x in every workspace (zero copy), else 0
  bool packed;       // the kernels' 16-byte path (the fingerprint tells it from the element path)
  uint32_t sig;
  LaunchConfig config;
};

// A checked call: what the kernels need to know about x and out.
struct Call {
  at::Tensor x, out;
  Algo algo;
  bool in_place;
  py::object result;  // what all_reduce returns: the out the caller gave, or the new tensor
};

}  // namespace

class AllReduceHost {
 public:
  // table: every rank's workspace address; workspace: this rank's (PeerMemory.buffer); staging_offset: where
  // the zero-copy staging area starts in every workspace (protocol.staging_offset); error_record: this
  // rank's int32[4] error record (host memory);
  // rules: [(max_bytes, algo)] of algo="auto", max_bytes < 0 for no limit; flat_op / tree_op / ll_op:
  // protocol.OP_CODES of the CUDA kernels' calls; error_type: the exception raised when a launch fails;
  // rmsnorm_ll_max_bytes / rmsnorm_ll_eager_max_bytes: the fused op's measured LL rules in CUDA graphs / eager
  // (thresholds.rmsnorm_ll_max_bytes; < 0: auto leaves the fused op to the Python path in that mode).
  AllReduceHost(int rank, int world, int device_index, std::string device_text, std::vector<int64_t> table,
                int64_t workspace, int64_t staging_offset, int64_t error_record, int64_t buffer_bytes,
                int64_t timeout_iters, int sm_count, std::vector<std::pair<int64_t, std::string>> rules, int flat_op,
                int tree_op, int ll_op, py::object error_type, int rmsnorm_ll_op, int64_t rmsnorm_ll_max_bytes,
                int64_t rmsnorm_ll_eager_max_bytes, int64_t max_hidden)
      : rank_(rank), world_(world),
        device_(device_index < 0 ? c10::Device(c10::kCPU) : c10::Device(c10::kCUDA, c10::DeviceIndex(device_index))),
        device_text_(std::move(device_text)), workspace_(workspace), staging_offset_(staging_offset),
        error_record_(reinterpret_cast<int*>(error_record)), buffer_bytes_(buffer_bytes),
        timeout_iters_(timeout_iters), sm_count_(sm_count), flat_op_(flat_op), tree_op_(tree_op), ll_op_(ll_op),
        error_type_(std::move(error_type)), rmsnorm_ll_op_(rmsnorm_ll_op), rmsnorm_ll_max_bytes_(rmsnorm_ll_max_bytes),
        rmsnorm_ll_eager_max_bytes_(rmsnorm_ll_eager_max_bytes), max_hidden_(max_hidden) {
    if (world < 2 || world > kMaxWorld || rank < 0 || rank >= world || int(table.size()) != world) {
      throw py::value_error("AllReduceHost: needs 2.." + std::to_string(kMaxWorld) + " ranks, a rank below the world " +
                            "size and one workspace address per rank");
    }
    for (int r = 0; r < world; ++r) table_.base[r] = reinterpret_cast<char*>(table[r]);
    for (auto& [max_bytes, algo] : rules) rules_.emplace_back(max_bytes, parse_algo(algo));
    if (device_.is_cuda()) guard_ = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  }

  // Communicator.all_reduce(x, algo, out) (out may be x: in place); None where the Python path must run.
  py::object all_reduce(py::handle x, py::handle out, const std::string& algo) {
    std::optional<Call> call = prepare(x, out, algo);
    if (!call) return py::none();
    if (guard_ == nullptr) throw py::value_error("all_reduce: this AllReduceHost was made for the CPU (tests only)");
    const auto stream = static_cast<cudaStream_t>(guard_->getStreamNativeHandle(guard_->getStream(device_)));
    for_each_launch(*call, [&](const Launch& l) { launch(*call, l, stream); });
    return std::move(call->result);
  }

  // Communicator.all_reduce_residual_rmsnorm(x, residual, weight, eps, algo, out=, residual_out=) for algo "ll"
  // and "auto" where auto picks ll: (out, residual_out); None where the Python path must run (other algos, auto
  // picking flat/tree, empty x, a failed communicator). Argument errors: the Python path's messages.
  py::object all_reduce_residual_rmsnorm(py::handle x, py::handle residual, py::handle weight, py::handle eps,
                                         const std::string& algo, py::handle out, py::handle residual_out) {
    // auto's rule is the mode's: a call being captured into a CUDA graph is timed by its kernel alone.
    std::optional<RMSNormCall> call =
        prepare_rmsnorm(x, residual, weight, eps, algo, out, residual_out, algo == "auto" && capturing());
    if (!call) return py::none();
    if (guard_ == nullptr) {
      throw py::value_error("all_reduce_residual_rmsnorm: this AllReduceHost was made for the CPU (tests only)");
    }
    const auto stream = static_cast<cudaStream_t>(guard_->getStreamNativeHandle(guard_->getStream(device_)));
    for_each_rmsnorm_launch(*call, [&](const RMSNormLaunch& l) { launch_rmsnorm(*call, l, stream); });
    return py::make_tuple(std::move(call->out_obj), std::move(call->residual_out_obj));
  }

  // Is torch's current stream of this device being captured into a CUDA graph (what auto's rule for the fused op
  // asks)? False on a CPU host.
  bool capturing() const {
    return guard_ != nullptr &&
           stream_capturing(static_cast<cudaStream_t>(guard_->getStreamNativeHandle(guard_->getStream(device_))));
  }

  // The launches all_reduce_residual_rmsnorm would make, as dicts (CPU tests), or None; capturing: plan as for a
  // call captured into a CUDA graph (auto's graph rule).
  py::object plan_rmsnorm(py::handle x, py::handle residual, py::handle weight, py::handle eps, const std::string& algo,
                          py::handle out, py::handle residual_out, bool capturing) {
    std::optional<RMSNormCall> call = prepare_rmsnorm(x, residual, weight, eps, algo, out, residual_out, capturing);
    if (!call) return py::none();
    py::list launches;
    for_each_rmsnorm_launch(*call, [&](const RMSNormLaunch& l) {
      launches.append(py::dict(py::arg("lo") = l.lo, py::arg("rows") = l.rows, py::arg("sig") = l.sig,
                               py::arg("config") = py::make_tuple(l.config.programs, l.config.threads, l.config.unroll)));
    });
    return std::move(launches);
  }

  // The launches all_reduce would make, as dicts (CPU tests compare them with the Python path's), or None.
  py::object plan(py::handle x, py::handle out, const std::string& algo) {
    std::optional<Call> call = prepare(x, out, algo);
    if (!call) return py::none();
    py::list launches;
    for_each_launch(*call, [&](const Launch& l) {
      launches.append(py::dict(py::arg("algo") = algo_name(l.algo), py::arg("lo") = l.lo,
                               py::arg("numel") = l.numel, py::arg("shard") = l.shard,
                               py::arg("zero_copy") = l.zero_copy, py::arg("x_offset") = l.x_offset,
                               py::arg("packed") = l.packed, py::arg("sig") = l.sig,
                               py::arg("config") = py::make_tuple(l.config.programs, l.config.threads, l.config.unroll)));
    });
    return std::move(launches);
  }

 private:
  // A checked fused call: the tensors (out / residual_out made where not given) and the Python objects returned.
  struct RMSNormCall {
    at::Tensor x, residual, weight, out, residual_out;
    int64_t tokens, hidden;
    double eps;
    py::object out_obj, residual_out_obj;
  };

  // One launch of a fused call: rows [lo, lo + rows).
  struct RMSNormLaunch {
    int64_t lo, rows;
    uint32_t sig;
    LaunchConfig config;
  };

  // Communicator._check_rmsnorm_args + check_rmsnorm_operands (same order, same messages), then the algorithm:
  // nullopt unless the call runs the LL kernel here.
  std::optional<RMSNormCall> prepare_rmsnorm(py::handle x_obj, py::handle residual_obj, py::handle weight_obj,
                                             py::handle eps_obj, const std::string& algo, py::handle out_obj,
                                             py::handle residual_out_obj, bool capturing) const {
    if (algo != "ll" && algo != "auto") return std::nullopt;  // the Python path checks and runs the others
    const std::string what = "all_reduce_residual_rmsnorm: ";
    const at::Tensor& x = tensor_arg(x_obj, "x");
    const at::Tensor& residual = tensor_arg(residual_obj, "residual");
    const at::Tensor& weight = tensor_arg(weight_obj, "weight");
    if (x.dim() == 0) throw py::value_error(what + "x must be [..., hidden], got a 0-d tensor");
    const int64_t hidden = x.size(-1);
    if (residual.sizes() != x.sizes() || residual.scalar_type() != x.scalar_type()) {
      throw py::value_error(what + "residual must have x's shape " + python_text(x_obj, "shape", true) + " and dtype " +
                            python_text(x_obj, "dtype") + ", got " + python_text(residual_obj, "shape", true) + " and " +
                            python_text(residual_obj, "dtype"));
    }
    if (weight.dim() != 1 || weight.size(0) != hidden || weight.scalar_type() != x.scalar_type()) {
      throw py::value_error(what + "weight must be [hidden] = [" + std::to_string(hidden) + "] of x's dtype " +
                            python_text(x_obj, "dtype") + ", got " + python_text(weight_obj, "shape", true) + " and " +
                            python_text(weight_obj, "dtype"));
    }
    if (hidden > max_hidden_) {
      throw py::value_error(what + "hidden size " + std::to_string(hidden) + " exceeds the supported " +
                            std::to_string(max_hidden_));
    }
    // eps: a Python int or float (bool included, as isinstance(eps, (int, float))), finite and >= 0.
    double eps = -1.0;
    if (PyLong_Check(eps_obj.ptr()) || PyFloat_Check(eps_obj.ptr())) {
      eps = PyFloat_AsDouble(eps_obj.ptr());
      if (eps == -1.0 && PyErr_Occurred()) throw py::error_already_set();  // an int too large for a double
    }
    if (!(eps >= 0.0 && eps < std::numeric_limits<double>::infinity())) {
      throw py::value_error(what + "eps must be a finite number >= 0, got " + std::string(py::repr(eps_obj)));
    }
    const std::pair<py::handle, const char*> outputs[] = {{out_obj, "out"}, {residual_out_obj, "residual_out"}};
    for (const auto& [obj, name] : outputs) {
      if (obj.is_none()) continue;
      const at::Tensor& t = tensor_arg(obj, name);
      if (t.sizes() != x.sizes() || t.scalar_type() != x.scalar_type()) {
        throw py::value_error(what + name + " must have x's shape " + python_text(x_obj, "shape", true) + " and dtype " +
                              python_text(x_obj, "dtype") + ", got " + python_text(obj, "shape", true) + " and " +
                              python_text(obj, "dtype"));
      }
    }
    if (!out_obj.is_none() && !residual_out_obj.is_none() &&
        overlap(THPVariable_Unpack(out_obj.ptr()), THPVariable_Unpack(residual_out_obj.ptr())) != Overlap::kApart) {
      throw py::value_error(what + "out and residual_out must be different buffers that do not overlap");
    }
    for (const auto& [obj, name] : outputs) {
      if (obj.is_none()) continue;
      const at::Tensor& t = THPVariable_Unpack(obj.ptr());
      if (overlap(t, weight) != Overlap::kApart) throw py::value_error(what + name + " must not overlap weight");
      const std::pair<const at::Tensor*, const char*> sources[] = {{&x, "x"}, {&residual, "residual"}};
      for (const auto& [source, source_name] : sources) {
        if (overlap(t, *source) == Overlap::kPartly) {
          throw py::value_error(what + name + " overlaps " + source_name + " partly: pass " + source_name +
                                " itself or a separate buffer");
        }
      }
    }
    const int64_t numel = x.numel(), esize = x.element_size();
    const int64_t max_rows = numel == 0 ? 0 : ll_rmsnorm_max_rows(hidden, int(esize));
    // Communicator._rmsnorm_auto: ll up to the size measured faster in this mode (chunked calls included).
    const int64_t limit = capturing ? rmsnorm_ll_max_bytes_ : rmsnorm_ll_eager_max_bytes_;
    const bool auto_ll = limit >= 0 && numel * esize <= limit && max_rows > 0;
    // The Python path: empty calls, auto choosing another kernel, rows too wide for ll (its message), failures.
    if (numel == 0 || (algo == "auto" && !auto_ll) || max_rows == 0 ||
        *reinterpret_cast<volatile int*>(error_record_) != kOk) {
      return std::nullopt;
    }
    RMSNormCall call{x, residual, weight, {}, {}, numel / hidden, hidden, eps};
    given_or_new(out_obj, x, call.out, call.out_obj);
    given_or_new(residual_out_obj, x, call.residual_out, call.residual_out_obj);
    return call;
  }

  // An output argument: the tensor the caller passed (obj), or a new one like `like` (None); `keep` holds the
  // Python object returned to the caller.
  static void given_or_new(const py::handle& obj, const at::Tensor& like, at::Tensor& tensor, py::object& keep) {
    if (obj.is_none()) {
      tensor = at::empty_like(like);
      keep = py::reinterpret_steal<py::object>(THPVariable_Wrap(tensor));
    } else {
      tensor = THPVariable_Unpack(obj.ptr());
      keep = py::reinterpret_borrow<py::object>(obj);
    }
  }

  enum class Overlap { kApart, kSame, kPartly };

  // communicator._overlap: how the bytes of two contiguous tensors on this device meet.
  static Overlap overlap(const at::Tensor& a, const at::Tensor& b) {
    const auto a_lo = reinterpret_cast<uintptr_t>(a.data_ptr()), b_lo = reinterpret_cast<uintptr_t>(b.data_ptr());
    const auto a_hi = a_lo + uintptr_t(a.nbytes()), b_hi = b_lo + uintptr_t(b.nbytes());
    if (a_lo >= b_hi || b_lo >= a_hi) return Overlap::kApart;
    return a_lo == b_lo && a_hi == b_hi ? Overlap::kSame : Overlap::kPartly;
  }

  // Communicator.all_reduce_residual_rmsnorm's LL launches: rows in chunks of ll_rmsnorm_max_rows, each with the
  // fingerprint of the whole call (total rows, chunk, rows, hidden, dtype, eps bits, grid).
  template <typename F>
  void for_each_rmsnorm_launch(const RMSNormCall& c, F&& each) const {
    const int esize = int(c.x.element_size());
    const int64_t step = ll_rmsnorm_max_rows(c.hidden, esize);
    const int64_t chunks = (c.tokens + step - 1) / step;
    int64_t eps_bits;
    std::memcpy(&eps_bits, &c.eps, sizeof(eps_bits));  // protocol.float_bits
    for (int64_t i = 0; i < chunks; ++i) {
      RMSNormLaunch l{};
      l.lo = i * step;
      l.rows = std::min(step, c.tokens - l.lo);
      l.config = ll_rmsnorm_config(l.rows, c.hidden, esize, sm_count_);
      const int64_t fields[] = {c.tokens, i, chunks, l.rows, c.hidden, int(*dtype_code(c.x.scalar_type())), eps_bits,
                                l.config.programs, l.config.threads};
      l.sig = call_signature(rmsnorm_ll_op_, fields, int(std::size(fields)));
      each(l);
    }
  }

  void launch_rmsnorm(const RMSNormCall& c, const RMSNormLaunch& l, cudaStream_t stream) const {
    const int64_t offset = l.lo * c.hidden * c.x.element_size();
    RMSNormArgs a{};
    a.x = static_cast<const char*>(c.x.data_ptr()) + offset;
    a.residual = static_cast<const char*>(c.residual.data_ptr()) + offset;
    a.weight = c.weight.data_ptr();
    a.out = static_cast<char*>(c.out.data_ptr()) + offset;
    a.residual_out = static_cast<char*>(c.residual_out.data_ptr()) + offset;
    a.table = table_;
    a.host_error_record = error_record_;
    a.tokens = l.rows;
    a.hidden = c.hidden;
    a.eps = float(c.eps);
    a.rank = rank_;
    a.world = world_;
    a.sig = l.sig;
    a.buffer_bytes = buffer_bytes_;
    a.timeout_iters = timeout_iters_;
    a.programs = l.config.programs;
    a.threads = l.config.threads;
    a.dtype = *dtype_code(c.x.scalar_type());
    const cudaError_t code = ll_all_reduce_rmsnorm(a, stream);
    if (code != cudaSuccess) {
      const std::string what = "LL all-reduce + RMSNorm launch: CUDA error " + std::to_string(int(code)) + " (" +
                               shardkit_error_string(int(code)) + ")";
      PyErr_SetString(error_type_.ptr(), what.c_str());
      throw py::error_already_set();
    }
  }

  // The tensor behind argument `name`, checked as collectives/checks.check_tensor does.
  const at::Tensor& tensor_arg(py::handle obj, const char* name) const {
    if (!THPVariable_Check(obj.ptr())) {
      throw py::type_error(std::string("all_reduce: ") + name + " must be a torch.Tensor, got " +
                           Py_TYPE(obj.ptr())->tp_name);
    }
    const at::Tensor& t = THPVariable_Unpack(obj.ptr());
    if (!dtype_code(t.scalar_type())) {
      throw py::type_error(std::string("all_reduce: ") + name + " must be float32, float16 or bfloat16, got " +
                           python_text(obj, "dtype"));
    }
    if (t.device() != device_) {
      throw py::value_error(std::string("all_reduce: ") + name + " must be on " + device_text_ +
                            " (this rank's device), got " + python_text(obj, "device"));
    }
    if (!t.is_contiguous()) {
      throw py::value_error(std::string("all_reduce: ") + name + " must be contiguous (call .contiguous() first)");
    }
    return t;
  }

  Algo choose(const std::string& algo, int64_t nbytes) const {
    if (algo != "auto") return parse_algo(algo);
    for (const auto& [max_bytes, chosen] : rules_) {  // thresholds.choose: the first rule admitting nbytes
      if (max_bytes < 0 || nbytes <= max_bytes) return chosen;
    }
    return rules_.empty() ? Algo::kOther : rules_.back().second;
  }

  std::optional<Call> prepare(py::handle x_obj, py::handle out_obj, const std::string& algo) const {
    const at::Tensor& x = tensor_arg(x_obj, "x");
    bool in_place = false;
    if (!out_obj.is_none() && out_obj.ptr() != x_obj.ptr()) {
      const at::Tensor& out = tensor_arg(out_obj, "out");
      if (out.sizes() != x.sizes() || out.scalar_type() != x.scalar_type()) {
        throw py::value_error("all_reduce: out must have x's shape " + python_text(x_obj, "shape", true) + " and dtype " +
                              python_text(x_obj, "dtype") + ", got " + python_text(out_obj, "shape", true) + " and " +
                              python_text(out_obj, "dtype"));
      }
      const auto x_lo = reinterpret_cast<uintptr_t>(x.data_ptr()), out_lo = reinterpret_cast<uintptr_t>(out.data_ptr());
      const auto nbytes = uintptr_t(x.nbytes());
      if (x_lo < out_lo + nbytes && out_lo < x_lo + nbytes) {
        if (x_lo != out_lo) {
          throw py::value_error("all_reduce: out overlaps x partly: pass x itself (in place) or a separate buffer");
        }
        in_place = true;  // another view of x's memory
      }
    } else {
      in_place = !out_obj.is_none();
    }
    const Algo chosen = choose(algo, int64_t(x.nbytes()));
    // A failed communicator: the Python path raises the error record's message.
    if (chosen == Algo::kOther || *reinterpret_cast<volatile int*>(error_record_) != kOk) return std::nullopt;
    Call call{x, x, chosen, in_place, py::reinterpret_borrow<py::object>(out_obj)};
    if (out_obj.is_none()) {
      call.out = at::empty_like(x);
      call.result = py::reinterpret_steal<py::object>(THPVariable_Wrap(call.out));
    } else if (!in_place) {
      call.out = THPVariable_Unpack(out_obj.ptr());
    }
    return call;
  }

  // Communicator._run's launches: one for a zero-copy input or one that fits an epoch buffer (LL: its
  // slot), else chunks of that size; each with the fingerprint of the whole call.
  template <typename F>
  void for_each_launch(const Call& c, F&& each) const {
    const int64_t numel = c.x.numel(), esize = c.x.element_size(), nbytes = numel * esize;
    if (numel == 0) return;
    // PeerMemory.holds: is x inside this rank's staging area (then every peer reads it in place)?
    const int64_t x_offset = int64_t(reinterpret_cast<uintptr_t>(c.x.data_ptr()) - uintptr_t(workspace_));
    const bool held = x_offset >= staging_offset_ && x_offset + nbytes <= staging_offset_ + buffer_bytes_;
    // A flat in-place call must stage: peers read our input until they are done. LL pushes x from
    // wherever it lives.
    const bool tree = c.algo == Algo::kTree, ll = c.algo == Algo::kLL;
    const bool zero_copy = held && x_offset % 16 == 0 && !(c.algo == Algo::kFlat && c.in_place) && !ll;
    const int64_t capacity = ll ? kLLMaxBytes : buffer_bytes_;
    const int64_t step = zero_copy || nbytes <= capacity ? numel : capacity / esize;
    const int64_t chunks = (numel + step - 1) / step;
    const auto x_ptr = reinterpret_cast<uintptr_t>(c.x.data_ptr()), out_ptr = reinterpret_cast<uintptr_t>(c.out.data_ptr());
    const int dtype = int(*dtype_code(c.x.scalar_type()));
    for (int64_t i = 0; i < chunks; ++i) {
      Launch l{};
      l.algo = c.algo;
      l.lo = i * step;
      l.numel = std::min(step, numel - l.lo);
      l.zero_copy = zero_copy;
      l.x_offset = zero_copy ? x_offset : 0;
      l.shard = tree ? shard_elements(l.numel, world_) : 0;
      l.config = tree ? tree_config(l.shard, int(esize), world_, sm_count_)
                 : ll ? ll_config(l.numel, int(esize), sm_count_) : flat_config(l.numel, int(esize), sm_count_);
      // (LL's work map does not depend on alignment: every line carries its own flag.)
      l.packed = ll || ((x_ptr + l.lo * esize) % 16 == 0 && (out_ptr + l.lo * esize) % 16 == 0 &&
                        l.numel % (16 / esize) == 0);
      const int64_t fields[] = {numel, i, chunks, l.numel, dtype, zero_copy ? x_offset : -1, l.packed,
                                l.config.programs, l.config.threads, l.config.unroll};
      l.sig = call_signature(tree ? tree_op_ : ll ? ll_op_ : flat_op_, fields, int(std::size(fields)));
      each(l);
    }
  }

  void launch(const Call& c, const Launch& l, cudaStream_t stream) const {
    const int64_t esize = c.x.element_size();
    AllReduceArgs a{};
    a.x = static_cast<const char*>(c.x.data_ptr()) + l.lo * esize;
    a.out = static_cast<char*>(c.out.data_ptr()) + l.lo * esize;
    a.table = table_;
    a.host_error_record = error_record_;
    a.numel = l.numel;
    a.rank = rank_;
    a.world = world_;
    a.sig = l.sig;
    a.x_offset = l.x_offset;
    a.buffer_bytes = buffer_bytes_;
    a.timeout_iters = timeout_iters_;
    a.zero_copy = l.zero_copy;
    a.programs = l.config.programs;
    a.threads = l.config.threads;
    a.unroll = l.config.unroll;
    a.dtype = *dtype_code(c.x.scalar_type());
    const cudaError_t code = l.algo == Algo::kTree ? tree_all_reduce(a, l.shard, stream)
                             : l.algo == Algo::kLL ? ll_all_reduce(a, stream) : flat_all_reduce(a, stream);
    if (code != cudaSuccess) {
      const std::string what = std::string(l.algo == Algo::kLL ? "LL" : algo_name(l.algo)) +
                               " all-reduce launch: CUDA error " +
                               std::to_string(int(code)) + " (" + shardkit_error_string(int(code)) + ")";
      PyErr_SetString(error_type_.ptr(), what.c_str());
      throw py::error_already_set();
    }
  }

  int rank_, world_;
  c10::Device device_;
  std::string device_text_;
  int64_t workspace_, staging_offset_;
  int* error_record_;
  int64_t buffer_bytes_, timeout_iters_;
  int sm_count_, flat_op_, tree_op_, ll_op_;
  py::object error_type_;
  PeerTable table_{};
  std::vector<std::pair<int64_t, Algo>> rules_;
  const c10::impl::DeviceGuardImplInterface* guard_ = nullptr;
  int rmsnorm_ll_op_;
  int64_t rmsnorm_ll_max_bytes_, rmsnorm_ll_eager_max_bytes_, max_hidden_;
};

}  // namespace shardkit

PYBIND11_MODULE(_C, m) {
  using shardkit::AllReduceHost;
  m.doc() = "shardkit's torch binding: the C++ host path of the all-reduce (csrc/torch)";
  // The torch it was compiled against: one source tree may serve venvs with different torch releases
  // (the editable install builds in place), and a binding is only valid with its own.
  m.attr("torch_version") = SHARDKIT_TORCH_VERSION;
  py::class_<AllReduceHost>(m, "AllReduceHost")
      .def(py::init<int, int, int, std::string, std::vector<int64_t>, int64_t, int64_t, int64_t, int64_t, int64_t, int,
                    std::vector<std::pair<int64_t, std::string>>, int, int, int, py::object, int, int64_t, int64_t,
                    int64_t>(),
           py::arg("rank"), py::arg("world"), py::arg("device_index"), py::arg("device_text"), py::arg("table"),
           py::arg("workspace"), py::arg("staging_offset"), py::arg("error_record"), py::arg("buffer_bytes"),
           py::arg("timeout_iters"),
           py::arg("sm_count"), py::arg("rules"), py::arg("flat_op"), py::arg("tree_op"), py::arg("ll_op"),
           py::arg("error_type"), py::arg("rmsnorm_ll_op"), py::arg("rmsnorm_ll_max_bytes"),
           py::arg("rmsnorm_ll_eager_max_bytes"), py::arg("max_hidden"))
      .def("all_reduce", &AllReduceHost::all_reduce, py::arg("x"), py::arg("out"), py::arg("algo"))
      .def("plan", &AllReduceHost::plan, py::arg("x"), py::arg("out"), py::arg("algo"))
      .def("all_reduce_residual_rmsnorm", &AllReduceHost::all_reduce_residual_rmsnorm, py::arg("x"), py::arg("residual"),
           py::arg("weight"), py::arg("eps"), py::arg("algo"), py::arg("out"), py::arg("residual_out"))
      .def("capturing", &AllReduceHost::capturing)
      .def("plan_rmsnorm", &AllReduceHost::plan_rmsnorm, py::arg("x"), py::arg("residual"), py::arg("weight"),
           py::arg("eps"), py::arg("algo"), py::arg("out"), py::arg("residual_out"), py::arg("capturing") = false);
  // The launch policy and fingerprint as the host path computes them (tests compare them with Python's).
  m.def("flat_config", [](int64_t numel, int element_size, int sm_count) {
    const auto c = shardkit::flat_config(numel, element_size, sm_count);
    return py::make_tuple(c.programs, c.threads, c.unroll);
  });
  m.def("tree_config", [](int64_t shard, int element_size, int world, int sm_count) {
    const auto c = shardkit::tree_config(shard, element_size, world, sm_count);
    return py::make_tuple(c.programs, c.threads, c.unroll);
  });
  m.def("ll_config", [](int64_t numel, int element_size, int sm_count) {
    const auto c = shardkit::ll_config(numel, element_size, sm_count);
    return py::make_tuple(c.programs, c.threads, c.unroll);
  });
  m.def("ll_rmsnorm_config", [](int64_t tokens, int64_t hidden, int element_size, int sm_count) {
    const auto c = shardkit::ll_rmsnorm_config(tokens, hidden, element_size, sm_count);
    return py::make_tuple(c.programs, c.threads, c.unroll);
  });
  m.def("ll_rmsnorm_max_rows", &shardkit::ll_rmsnorm_max_rows);
  m.def("shard_elements", &shardkit::shard_elements);
  m.def("call_signature", [](int op_code, const std::vector<int64_t>& fields) {
    return shardkit::call_signature(op_code, fields.data(), int(fields.size()));
  });
}
