// The input checks of the public ops' native kernels, written once for the CPU and CUDA kernels.
//
// A call runs Python -> dispatcher -> the C++ kernel, which checks its inputs here and nowhere
// else. The messages and exception types are those of the Python validator that the reference and
// Triton backends run (sara_kernels/_checks.py): every error names the op and the argument, with
// dtypes and shapes printed as Python prints them ("torch.float16", "(4, 3)"), so a bad call reads
// the same whichever backend runs it. TORCH_CHECK_TYPE raises TypeError, TORCH_CHECK_VALUE
// ValueError, TORCH_CHECK_INDEX IndexError and TORCH_CHECK RuntimeError in Python.
//
// The data-dependent index checks (range, strictly increasing order) need a pass over the index,
// which is device code: csrc/cpu/common.h (check_index) and csrc/cuda/index_check.cu
// (validate_index) run it and report through index_range_error / index_order_error below.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <initializer_list>
#include <string>
#include <tuple>
#include <vector>

#include "message.h"

namespace sara_kernels_check {

using sara_kernels_msg::num;

inline std::string prefix(const char* op) { return std::string("sara_kernels.") + op + ": "; }

// A float as Python's repr spells it: the shortest digits that read back the same, with ".0" on
// a whole number (0.0, -1.0, 1e-08, 0.999, nan, inf).
inline std::string pyfloat(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buffer[40];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(buffer, sizeof(buffer), "%.*g", digits, value);
    if (std::strtod(buffer, nullptr) == value) break;
  }
  std::string out = buffer;
  if (out.find_first_of(".e") == std::string::npos) out += ".0";
  return out;
}

// torch.float32 etc., as Python prints a dtype.
inline std::string dtype_name(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(s);
  }
}

// (4, 3), (5,) and () as Python prints a tuple; [4, 3] as it prints a list.
inline std::string tuple(c10::IntArrayRef v) {
  std::string out = "(";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out + (v.size() == 1 ? ",)" : ")");
}
inline std::string list(c10::IntArrayRef v) { return sara_kernels_msg::shape(v); }

enum class Dtypes { kFloating, kIndex, kFp32, kFp32OrFp64 };

inline bool allowed(Dtypes d, at::ScalarType s) {
  switch (d) {
    case Dtypes::kFloating: return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
    case Dtypes::kIndex: return s == at::kInt || s == at::kLong;
    case Dtypes::kFp32: return s == at::kFloat;
    case Dtypes::kFp32OrFp64: return s == at::kFloat || s == at::kDouble;
  }
  return false;
}

inline const char* names(Dtypes d) {
  switch (d) {
    case Dtypes::kFloating: return "float32, float16, bfloat16, float64";
    case Dtypes::kIndex: return "int32, int64";
    case Dtypes::kFp32: return "float32";
    case Dtypes::kFp32OrFp64: return "float32, float64";
  }
  return "";
}

// dtype (TypeError) and, with dim >= 0, rank (ValueError).
inline void tensor(const char* op, const std::string& name, const at::Tensor& t, Dtypes dtypes, int64_t dim = -1) {
  TORCH_CHECK_VALUE(t.defined(), prefix(op), name, " is an undefined tensor");
  TORCH_CHECK_TYPE(allowed(dtypes, t.scalar_type()), prefix(op), name, " has dtype ", dtype_name(t.scalar_type()),
                   "; expected one of ", names(dtypes));
  TORCH_CHECK_VALUE(dim < 0 || t.dim() == dim, prefix(op), name, " must be ", num(dim), "-D, got shape ",
                    tuple(t.sizes()));
}

struct Named {
  std::string name;
  const at::Tensor* t;  // nullptr or undefined: skipped
};

// Every tensor on the first one's device (RuntimeError).
inline void same_device(const char* op, std::initializer_list<Named> tensors) {
  const Named* first = nullptr;
  for (const Named& n : tensors) {
    if (n.t == nullptr || !n.t->defined()) continue;
    if (first == nullptr) {
      first = &n;
      continue;
    }
    TORCH_CHECK(n.t->device() == first->t->device(), prefix(op), n.name, " is on ", n.t->device().str(), " but ",
                first->name, " is on ", first->t->device().str(), "; all tensors must be on one device");
  }
}

// The index's dtype, rank and width (its values: the device's check_index / validate_index).
inline void index_meta(const char* op, const std::string& name, const at::Tensor& index, int64_t numel) {
  tensor(op, name, index, Dtypes::kIndex, 1);
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong || numel <= INT32_MAX, prefix(op), name,
                   " is int32 but the weight has ", num(numel), " entries (>= 2**31); use int64 indices");
}

[[noreturn]] inline void index_range_error(const char* op, const std::string& name, int64_t lo, int64_t hi,
                                           int64_t numel) {
  TORCH_CHECK_INDEX(false, prefix(op), name, " holds values in [", num(lo), ", ", num(hi), "] but must lie in [0, ",
                    num(numel), ") (the weight has ", num(numel), " entries)");
  std::abort();  // unreachable: TORCH_CHECK_INDEX(false, ...) throws
}

[[noreturn]] inline void index_order_error(const char* op, const std::string& name) {
  TORCH_CHECK_VALUE(false, prefix(op), name,
                    " must be sorted in strictly increasing order (no duplicates); sort it with "
                    "torch.unique(index) or build it with select_small_magnitude");
  std::abort();
}

// A [k] vector beside the index: dtype, 1-D, k entries, contiguous (it is read or written flat).
inline void compact(const char* op, const std::string& name, const at::Tensor& t, const at::Tensor& index,
                    Dtypes dtypes, const std::string& index_name = "index") {
  tensor(op, name, t, dtypes, 1);
  TORCH_CHECK_VALUE(t.sizes() == index.sizes(), prefix(op), name, " has shape ", tuple(t.sizes()), " but ",
                    index_name, " has ", tuple(index.sizes()));
  TORCH_CHECK_VALUE(t.is_contiguous(), prefix(op), name, " must be contiguous");
}

// The weight an in-place op writes at index, and its pre-trained values at those entries.
inline void weight_side(const char* op, const at::Tensor& weight, const at::Tensor& index, const at::Tensor& base,
                        const std::string& w = "weight", const std::string& i = "index",
                        const std::string& b = "base") {
  tensor(op, w, weight, Dtypes::kFloating);
  TORCH_CHECK_VALUE(weight.is_contiguous(), prefix(op), w, " must be contiguous (indices address ", w,
                    ".view(-1)); got strides ", tuple(weight.strides()), " for shape ", tuple(weight.sizes()));
  tensor(op, i, index, Dtypes::kIndex, 1);
  TORCH_CHECK_VALUE(base.defined() && base.dim() == 1, prefix(op), b, " must be 1-D, got shape ",
                    tuple(base.sizes()));
  TORCH_CHECK_TYPE(base.scalar_type() == weight.scalar_type(), prefix(op), b, " is ", dtype_name(base.scalar_type()),
                   " but ", w, " is ", dtype_name(weight.scalar_type()), "; they must match");
  TORCH_CHECK_VALUE(base.sizes() == index.sizes(), prefix(op), b, " has shape ", tuple(base.sizes()), " but ", i,
                    " has ", tuple(index.sizes()));
}

inline void finite(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value), prefix(op), name, " must be finite, got ", pyfloat(value));
}

// AdamW's hyperparameters: finite, betas in [0, 1), lr, eps and weight_decay non-negative.
inline void adamw_hyper(const char* op, double lr, double beta1, double beta2, double eps, double weight_decay) {
  finite(op, "lr", lr);
  finite(op, "beta1", beta1);
  finite(op, "beta2", beta2);
  finite(op, "eps", eps);
  finite(op, "weight_decay", weight_decay);
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, prefix(op), "betas must lie in [0, 1), got (",
                    pyfloat(beta1), ", ", pyfloat(beta2), ")");
  TORCH_CHECK_VALUE(lr >= 0 && eps >= 0 && weight_decay >= 0, prefix(op), "lr=", pyfloat(lr), ", eps=", pyfloat(eps),
                    " and weight_decay=", pyfloat(weight_decay), " must be non-negative");
}

inline void step(const char* op, const std::string& name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value), prefix(op), name, " must be finite, got ", pyfloat(value));
  TORCH_CHECK_VALUE(value >= 1, prefix(op), name, " must be >= 1 (AdamW counts from 1), got ", pyfloat(value));
}

// The names of one AdamW tensor set: "weight", ... for sparse_adamw_; "weights[3]", ... for set 3
// of sparse_adamw_multi_.
struct AdamNames {
  std::string weight = "weight", index = "index", base = "base", delta = "delta", grad = "grad",
              exp_avg = "exp_avg", exp_avg_sq = "exp_avg_sq";

  // The names of set i, built once per thread and index (not 7 strings per set and call).
  static const AdamNames& at(size_t i) {
    thread_local std::deque<AdamNames> cache;
    while (cache.size() <= i) {
      const std::string s = "[" + std::to_string(cache.size()) + "]";
      cache.push_back({"weights" + s, "indices" + s, "bases" + s, "deltas" + s, "grads" + s, "exp_avgs" + s,
                       "exp_avg_sqs" + s});
    }
    return cache[i];
  }
};

// sparse_adamw_multi_'s lists: one entry per weight in each.
inline void adamw_lists(const char* op, at::TensorList weights, at::TensorList indices, at::TensorList bases,
                        at::TensorList deltas, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, c10::ArrayRef<double> steps) {
  const size_t n = weights.size();
  const std::pair<const char*, size_t> lengths[] = {
      {"indices", indices.size()}, {"bases", bases.size()},         {"deltas", deltas.size()},
      {"grads", grads.size()},     {"exp_avgs", exp_avgs.size()}, {"exp_avg_sqs", exp_avg_sqs.size()},
      {"steps", steps.size()}};
  for (const auto& [name, size] : lengths) {
    TORCH_CHECK_VALUE(size == n, prefix(op), name, " has ", num(size), " entries but weights has ", num(n),
                      "; every list needs one entry per weight");
  }
}

// Every check of one AdamW set but the index values (and overlap: see no_overlap).
inline void adamw_set(const char* op, const AdamNames& n, const at::Tensor& weight, const at::Tensor& index,
                      const at::Tensor& base, const at::Tensor& delta, const at::Tensor& grad,
                      const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq) {
  weight_side(op, weight, index, base, n.weight, n.index, n.base);
  compact(op, n.delta, delta, index, Dtypes::kFp32, n.index);
  compact(op, n.grad, grad, index, Dtypes::kFp32, n.index);
  compact(op, n.exp_avg, exp_avg, index, Dtypes::kFp32, n.index);
  compact(op, n.exp_avg_sq, exp_avg_sq, index, Dtypes::kFp32, n.index);
  TORCH_CHECK_TYPE(weight.scalar_type() != at::kDouble, prefix(op), n.weight,
                   " dtype float64 is not supported; use fp32, bf16 or fp16");
  same_device(op, {{n.weight, &weight},
                   {n.index, &index},
                   {n.base, &base},
                   {n.delta, &delta},
                   {n.grad, &grad},
                   {n.exp_avg, &exp_avg},
                   {n.exp_avg_sq, &exp_avg_sq}});
  index_meta(op, n.index, index, weight.numel());
}

// No tensor the op writes shares memory with another argument (another written one, or one it
// reads): the result would depend on the order of reads and writes. A sweep over the byte ranges,
// sorted; the error names the first clash in argument order (written first, then read).
struct Arg {
  std::string name;
  const at::Tensor* t;
  bool written;
};

inline void no_overlap(const char* op, const std::vector<Arg>& args) {
  struct Span {
    uintptr_t storage;
    int64_t start, position, end;
    bool written;
  };
  std::vector<Span> spans;
  spans.reserve(args.size());
  for (size_t i = 0; i < args.size(); ++i) {
    const at::Tensor& t = *args[i].t;
    if (!t.defined() || t.numel() == 0 || !t.has_storage()) continue;
    int64_t extent = 0;
    for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * std::abs(t.stride(d));
    const int64_t item = static_cast<int64_t>(t.element_size());
    const int64_t start = t.storage_offset() * item;
    spans.push_back({reinterpret_cast<uintptr_t>(t.storage().data()), start, static_cast<int64_t>(i),
                     start + (extent + 1) * item, args[i].written});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return std::tie(a.storage, a.start, a.position) < std::tie(b.storage, b.start, b.position);
  });
  int64_t best_lo = -1, best_hi = -1;
  uintptr_t storage = 0;
  bool have = false;
  int64_t any_end = -1, written_end = -1, any_at = 0, written_at = 0;
  auto clash = [&](int64_t a, int64_t b) {
    const int64_t lo = std::min(a, b), hi = std::max(a, b);
    if (best_lo < 0 || std::tie(lo, hi) < std::tie(best_lo, best_hi)) best_lo = lo, best_hi = hi;
  };
  for (const Span& s : spans) {
    if (!have || s.storage != storage) storage = s.storage, have = true, any_end = written_end = -1;
    if (s.start < written_end) {
      clash(written_at, s.position);
    } else if (s.written && s.start < any_end) {
      clash(any_at, s.position);
    }
    if (s.end > any_end) any_end = s.end, any_at = s.position;
    if (s.written && s.end > written_end) written_end = s.end, written_at = s.position;
  }
  TORCH_CHECK_VALUE(best_lo < 0, prefix(op), args[best_hi < 0 ? 0 : best_hi].name, " and ",
                    args[best_lo < 0 ? 0 : best_lo].name,
                    " share memory; a tensor the op writes must not overlap any other argument (pass separate "
                    "tensors, e.g. .clone())");
}

// One AdamW set's tensors in schema order: weight, index, base, delta, grad, exp_avg, exp_avg_sq.
using AdamTensors = std::array<const at::Tensor*, 7>;

// no_overlap over AdamW sets: the written tensors (weight, delta, moments) of every set first, in
// argument order, then the read ones (index, base, grad); the first clash named as the validator does.
inline void adamw_no_overlap(const char* op, const std::vector<AdamTensors>& sets,
                             const std::vector<const AdamNames*>& names) {
  std::vector<Arg> args;
  args.reserve(7 * sets.size());
  for (const bool written : {true, false}) {
    for (size_t i = 0; i < sets.size(); ++i) {
      const AdamTensors& t = sets[i];
      const AdamNames& n = *names[i];
      if (written) {
        args.insert(args.end(), {{n.weight, t[0], true}, {n.delta, t[3], true}, {n.exp_avg, t[5], true},
                                 {n.exp_avg_sq, t[6], true}});
      } else {
        args.insert(args.end(), {{n.index, t[1], false}, {n.base, t[2], false}, {n.grad, t[4], false}});
      }
    }
  }
  no_overlap(op, args);
}

// sampled_weight_grad_linear: grad_out [..., out], x [..., in], same leading dims and dtype.
inline void linear_grad(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& index,
                        int64_t out_features, int64_t in_features) {
  tensor(op, "grad_out", grad_out, Dtypes::kFloating);
  tensor(op, "x", x, Dtypes::kFloating);
  tensor(op, "index", index, Dtypes::kIndex, 1);
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), prefix(op), "grad_out is ",
                   dtype_name(grad_out.scalar_type()), " but x is ", dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(out_features > 0 && in_features > 0, prefix(op), "out_features=", num(out_features),
                    " and in_features=", num(in_features), " must be positive");
  TORCH_CHECK_VALUE(grad_out.dim() > 0 && grad_out.size(-1) == out_features, prefix(op), "grad_out has shape ",
                    tuple(grad_out.sizes()), "; its last dim must be out_features=", num(out_features));
  TORCH_CHECK_VALUE(x.dim() > 0 && x.size(-1) == in_features, prefix(op), "x has shape ", tuple(x.sizes()),
                    "; its last dim must be in_features=", num(in_features));
  TORCH_CHECK_VALUE(grad_out.sizes().slice(0, grad_out.dim() - 1) == x.sizes().slice(0, x.dim() - 1), prefix(op),
                    "grad_out ", tuple(grad_out.sizes()), " and x ", tuple(x.sizes()),
                    " must share their leading (token) dims");
  same_device(op, {{"grad_out", &grad_out}, {"x", &x}, {"index", &index}});
  int64_t numel = 0;
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(out_features, in_features, &numel), prefix(op),
                    "out_features * in_features overflows int64");
  index_meta(op, "index", index, numel);
}

// The spatial output size of a convolution of x with a weight of weight_shape ([O, C/g, k...]).
inline std::vector<int64_t> conv_output_size(const char* op, c10::IntArrayRef x_shape, c10::IntArrayRef weight_shape,
                                             c10::IntArrayRef stride, c10::IntArrayRef padding,
                                             c10::IntArrayRef dilation) {
  for (auto s : stride) TORCH_CHECK_VALUE(s > 0, prefix(op), "stride must be positive, got ", list(stride));
  for (auto p : padding) TORCH_CHECK_VALUE(p >= 0, prefix(op), "padding must be non-negative, got ", list(padding));
  for (auto d : dilation) TORCH_CHECK_VALUE(d > 0, prefix(op), "dilation must be positive, got ", list(dilation));
  std::vector<int64_t> out;
  for (size_t i = 0; i < stride.size(); ++i) {
    const int64_t size = x_shape[2 + i] + 2 * padding[i] - dilation[i] * (weight_shape[2 + i] - 1) - 1;
    TORCH_CHECK_VALUE(size >= 0, prefix(op), "the kernel ", tuple(weight_shape.slice(2)), " (dilation ",
                      list(dilation), ") is larger than the padded input ", tuple(x_shape.slice(2)), " (padding ",
                      list(padding), ")");
    out.push_back(size / stride[i] + 1);
  }
  return out;
}

// A 2-D convolution's x against weight_shape and groups; with grad_out, its shape too.
inline void conv2d(const char* op, const at::Tensor& x, c10::IntArrayRef weight_shape, c10::IntArrayRef stride,
                   c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                   const at::Tensor* grad_out = nullptr) {
  const char* what[] = {"stride", "padding", "dilation"};
  const c10::IntArrayRef values[] = {stride, padding, dilation};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK_VALUE(values[i].size() == 2, prefix(op), what[i], " must have 2 entries, got ", list(values[i]));
  }
  bool positive = weight_shape.size() == 4;
  for (auto s : weight_shape) positive = positive && s > 0;
  TORCH_CHECK_VALUE(positive, prefix(op), "weight_shape must be 4 positive ints [out, in/groups, kh, kw], got ",
                    list(weight_shape));
  TORCH_CHECK_VALUE(x.dim() == 4, prefix(op), "x must be 4-D [N, C, H, W], got shape ", tuple(x.sizes()));
  TORCH_CHECK_VALUE(groups > 0 && weight_shape[0] % groups == 0, prefix(op), "groups=", num(groups),
                    " must be positive and divide the ", num(weight_shape[0]), " output channels");
  TORCH_CHECK_VALUE(x.size(1) == weight_shape[1] * groups, prefix(op), "x has ", num(x.size(1)),
                    " channels but weight_shape ", list(weight_shape), " with groups=", num(groups), " expects ",
                    num(weight_shape[1] * groups));
  const auto out = conv_output_size(op, x.sizes(), weight_shape, stride, padding, dilation);
  if (grad_out != nullptr) {
    const std::vector<int64_t> expected = {x.size(0), weight_shape[0], out[0], out[1]};
    TORCH_CHECK_VALUE(grad_out->sizes() == c10::IntArrayRef(expected), prefix(op), "grad_out has shape ",
                      tuple(grad_out->sizes()), " but the convolution of x ", tuple(x.sizes()), " with weight_shape ",
                      list(weight_shape), " gives ", tuple(expected));
  }
}

// sampled_weight_grad_conv2d: grad_out [N, O, P, Q], x [N, C, H, W], index into [O, C/g, kh, kw].
inline void conv2d_grad(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& index,
                        c10::IntArrayRef weight_shape, c10::IntArrayRef stride, c10::IntArrayRef padding,
                        c10::IntArrayRef dilation, int64_t groups) {
  tensor(op, "grad_out", grad_out, Dtypes::kFloating, 4);
  tensor(op, "x", x, Dtypes::kFloating, 4);
  tensor(op, "index", index, Dtypes::kIndex, 1);
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), prefix(op), "grad_out is ",
                   dtype_name(grad_out.scalar_type()), " but x is ", dtype_name(x.scalar_type()));
  conv2d(op, x, weight_shape, stride, padding, dilation, groups, &grad_out);
  same_device(op, {{"grad_out", &grad_out}, {"x", &x}, {"index", &index}});
  int64_t numel = 1;
  for (auto s : weight_shape) {
    TORCH_CHECK_VALUE(!__builtin_mul_overflow(numel, s, &numel), prefix(op), "weight_shape numel overflows int64");
  }
  index_meta(op, "index", index, numel);
}

// The tunables that tests and benchmarks set (never read from the environment per call).
struct Settings {
  std::atomic<int64_t> grad_variant{0};     // 0 auto, 1 direct, 2 gemm, 3 tiled (GradVariant in Python)
  std::atomic<int64_t> index_checks{1};     // the process default: 0 off, 1 async, 2 sync
  std::atomic<int64_t> workspace_bytes{0};  // 0: the device's default bound on a call's workspace
};
Settings& settings();

// The index checks in force for the calling thread: its own setting (sara_kernels.index_checks),
// else the process default (SARA_KERNELS_CHECK_INDEX at import).
int64_t& thread_index_checks();  // -1: not set in this thread
inline int64_t index_checks() {
  const int64_t own = thread_index_checks();
  return own >= 0 ? own : settings().index_checks.load(std::memory_order_relaxed);
}

// The tensors an in-place kernel writes get a new version, as those an ATen in-place op writes do:
// a graph that saved one before the write then refuses to backward through it (never a gradient
// computed from values that changed under it).
inline void bump_versions(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t->defined()) t->unsafeGetTensorImpl()->bump_version();
  }
}

// Record that op ran on backend (1 cpu, 2 cuda; the Python kernels record 3 reference, 4 triton)
// with variant (1 direct, 2 gemm, 3 tiled; 0 none), for sara_kernels.backends() and the tests. op
// is the op's name (a string literal): a new op needs no entry anywhere.
void record(const char* op, int64_t backend, int64_t variant = 0);

}  // namespace sara_kernels_check
