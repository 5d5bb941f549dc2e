// The sampled-gradient variant the native kernels ran last, per op, for
// torch.ops.sara_kernels_C.last_grad_variant (and sara_kernels.backends()): which algorithm
// auto picked for the last call, without re-deriving the dispatch rules in Python.
#pragma once

#include <atomic>
#include <cstdint>

namespace sara_kernels_log {

enum GradOp : int { kLinear = 0, kConv2d = 1 };

// -1 until the op ran; otherwise 1 direct, 2 gemm, 3 tiled (never 0: auto is resolved first).
std::atomic<int>& last_grad_variant_slot(int op);

inline void record_grad_variant(int op, int64_t variant) {
  last_grad_variant_slot(op).store(static_cast<int>(variant), std::memory_order_relaxed);
}

}  // namespace sara_kernels_log
