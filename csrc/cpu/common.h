// Shared input checks and helpers of the CPU kernels (csrc/cpu/*.cpp).
//
// Every check names the op and the argument, so a bad call straight to torch.ops.sara_kernels_C
// fails with a message that says what to fix. The index check is the kernels' own guard against
// out-of-bounds reads and writes: the Python layer may skip its (data-dependent) index checks
// (sara_kernels.set_index_checks(False)), these never are.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

#include "message.h"

namespace sara_kernels_cpu {

// Error messages format numbers and shapes as strings (message.h).
using sara_kernels_msg::num;
using sara_kernels_msg::shape;

// Bound on the transient (workspace) memory one sampled-gradient call allocates: the dense-GEMM
// variants compute the weight gradient a chunk of rows at a time so this never grows with the
// weight. 32 MiB fits a 5120-wide fp32 row block of 1638 rows, or all of a 320x320 or 640x640
// layer (0.4 / 1.6 MB), so the UNet-sized layers are still one GEMM.
constexpr int64_t kWorkspaceBytes = int64_t{32} << 20;

// The bound in force: kWorkspaceBytes, unless SARA_KERNELS_CPU_WORKSPACE_BYTES (>= 1024) overrides
// it. The override exists for the tests, which shrink it to a few KiB so that small shapes run
// every chunking path (row / channel / token blocks) that only large layers reach by default.
inline int64_t workspace_bytes() {
  const char* env = std::getenv("SARA_KERNELS_CPU_WORKSPACE_BYTES");
  if (env == nullptr || *env == '\0') return kWorkspaceBytes;
  const long long v = std::atoll(env);
  return v >= 1024 ? static_cast<int64_t>(v) : kWorkspaceBytes;
}

// Grain of the element-wise loops (adamw / merge / restore / index checks / selection counts):
// below ~32k entries one thread is faster than waking the pool.
constexpr int64_t kElementwiseGrain = int64_t{1} << 15;

// setup.py compiles with plain -O3 (baseline x86-64: SSE2, no FMA), so the hot inner loops are
// cloned for x86-64-v3 (AVX2 + FMA: 8-wide fused multiply-adds instead of 4-wide SSE2 mul + add)
// and picked at load time (GCC function multi-versioning, an ifunc); other CPUs get the baseline.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SARA_HOT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SARA_HOT_CLONES
#endif

inline std::string op_name(const char* op) { return std::string("sara_kernels_C.") + op; }

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op_name(op), ": ", name, " must be a CPU tensor, got device ",
              t.device());
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op_name(op), ": ", name, " must be contiguous, got shape ",
              shape(t.sizes()), " with strides ", shape(t.strides()));
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op_name(op), ": ", name, " must be ", num(dim), "-D, got shape ", shape(t.sizes()));
}

inline bool is_float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// fp32 / fp64 / fp16 / bf16, on the CPU, contiguous.
inline void check_float_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op_name(op), ": ", name, " is undefined");
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op_name(op), ": ", name,
              " has dtype ", t.scalar_type(), "; expected Float, Double, Half or BFloat16");
  check_cpu(op, name, t);
  check_contiguous(op, name, t);
}

// A compact [k] vector of a given dtype, on the CPU, contiguous, with k entries.
inline void check_compact(const char* op, const char* name, const at::Tensor& t, int64_t k,
                          at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), op_name(op), ": ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == dtype, op_name(op), ": ", name, " has dtype ", t.scalar_type(),
              "; expected ", dtype);
  check_cpu(op, name, t);
  check_dim(op, name, t, 1);
  TORCH_CHECK(t.size(0) == k, op_name(op), ": ", name, " has ", num(t.size(0)),
              " entries but index has ", num(k));
  check_contiguous(op, name, t);
}

// Dtype, device, rank and layout of an index tensor (the values are checked by check_index_values).
inline void check_index_tensor(const char* op, const at::Tensor& index, const char* name = "index") {
  TORCH_CHECK(index.defined(), op_name(op), ": ", name, " is undefined");
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, op_name(op), ": ",
              name, " has dtype ", index.scalar_type(), "; expected Int (int32) or Long (int64)");
  check_cpu(op, name, index);
  check_dim(op, name, index, 1);
  check_contiguous(op, name, index);
}

// One O(k) parallel pass: every index in [0, numel) and strictly increasing (so sorted, no
// duplicates: the scatters can write entries in parallel without races). Each chunk also compares
// its first entry with the previous chunk's last. Reports the first offending position.
template <typename index_t>
void check_index_values(const char* op, const index_t* idx, int64_t k, int64_t numel,
                        const char* name = "index") {
  if (k == 0) return;
  std::atomic<int64_t> bad_range{k};
  std::atomic<int64_t> bad_order{k};
  at::parallel_for(0, k, kElementwiseGrain * 4, [&](int64_t b, int64_t e) {
    int64_t first_range = k, first_order = k;
    for (int64_t j = b; j < e; ++j) {
      const int64_t v = static_cast<int64_t>(idx[j]);
      if ((v < 0 || v >= numel) && first_range == k) first_range = j;
      if (j > 0 && !(static_cast<int64_t>(idx[j - 1]) < v) && first_order == k) first_order = j;
      if (first_range != k && first_order != k) break;
    }
    int64_t cur = bad_range.load();
    while (first_range < cur && !bad_range.compare_exchange_weak(cur, first_range)) {
    }
    cur = bad_order.load();
    while (first_order < cur && !bad_order.compare_exchange_weak(cur, first_order)) {
    }
  });
  const int64_t r = bad_range.load();
  TORCH_CHECK(r == k, op_name(op), ": ", name, "[", num(r), "] = ", num(static_cast<int64_t>(idx[r])),
              " is out of range: indices must lie in [0, ", num(numel), ")");
  const int64_t o = bad_order.load();
  TORCH_CHECK(o == k, op_name(op), ": ", name, " must be sorted in strictly increasing order (no ",
              "duplicates), but ", name, "[", num(o - 1), "] = ", num(static_cast<int64_t>(idx[o - 1])), " and ",
              name, "[", num(o), "] = ", num(static_cast<int64_t>(idx[o])));
}

inline void check_index(const char* op, const at::Tensor& index, int64_t numel,
                        const char* name = "index") {
  check_index_tensor(op, index, name);
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "sara_check_index", [&] {
    check_index_values<index_t>(op, index.const_data_ptr<index_t>(), index.numel(), numel, name);
  });
}

// The output dtype of the sampled gradients: fp32 accumulation for fp32/fp16/bf16, fp64 for fp64.
inline at::ScalarType accumulate_dtype(at::ScalarType s) {
  return s == at::kDouble ? at::kDouble : at::kFloat;
}

// a * b with an overflow check (shapes come from the user).
inline int64_t checked_mul(const char* op, const char* what, int64_t a, int64_t b) {
  int64_t out = 0;
  TORCH_CHECK(!__builtin_mul_overflow(a, b, &out), op_name(op), ": ", what, " overflows int64");
  return out;
}

}  // namespace sara_kernels_cpu
