// What the CPU kernels (csrc/cpu/*.cpp) share: the workspace bound, loop grains, the index-values
// check and small helpers. The argument checks are csrc/checks.h, shared with the CUDA kernels.
//
// The index-values check is the CPU kernels' own guard against out-of-bounds reads and writes; it
// runs on every call whatever the index-check setting (one O(k) pass, no sync to save here).
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

#include "checks.h"
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

// The bound in force: kWorkspaceBytes, unless the workspace_bytes setting (>= 1024) overrides
// it. The tests shrink it to a few KiB (sara_kernels.backends.workspace_bytes) so that small shapes
// run every chunking path (row / channel / token blocks) that only large layers reach by default.
inline int64_t workspace_bytes() {
  const int64_t v = sara_kernels_check::settings().workspace_bytes.load(std::memory_order_relaxed);
  return v >= 1024 ? v : kWorkspaceBytes;
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

using sara_kernels_check::prefix;

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
  if (bad_range.load() != k) {
    int64_t lo = static_cast<int64_t>(idx[0]), hi = lo;
    for (int64_t j = 1; j < k; ++j) {
      lo = std::min<int64_t>(lo, static_cast<int64_t>(idx[j]));
      hi = std::max<int64_t>(hi, static_cast<int64_t>(idx[j]));
    }
    sara_kernels_check::index_range_error(op, name, lo, hi, numel);
  }
  if (bad_order.load() != k) sara_kernels_check::index_order_error(op, name);
}

// The index's dtype and rank (checks.h), then its values; a non-contiguous index is read as a
// contiguous copy (returned).
inline at::Tensor check_index(const char* op, const at::Tensor& index_in, int64_t numel,
                              const std::string& name = "index") {
  sara_kernels_check::index_meta(op, name, index_in, numel);
  at::Tensor index = index_in.contiguous();
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "sara_check_index", [&] {
    check_index_values<index_t>(op, index.const_data_ptr<index_t>(), index.numel(), numel, name.c_str());
  });
  return index;
}
// The output dtype of the sampled gradients: fp32 accumulation for fp32/fp16/bf16, fp64 for fp64.
inline at::ScalarType accumulate_dtype(at::ScalarType s) {
  return s == at::kDouble ? at::kDouble : at::kFloat;
}

// a * b with an overflow check (shapes come from the user).
inline int64_t checked_mul(const char* op, const char* what, int64_t a, int64_t b) {
  int64_t out = 0;
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(a, b, &out), prefix(op), what, " overflows int64");
  return out;
}

}  // namespace sara_kernels_cpu
