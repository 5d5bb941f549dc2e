// Argument names of the fused AdamW ops in error messages (CPU and CUDA kernels share them).
#pragma once

#include <cstddef>
#include <deque>
#include <string>

namespace sara_kernels_msg {

// "weight", "index", ... for sparse_adamw_; "weights[3]", "indices[3]", ... for set 3 of
// sparse_adamw_multi_.
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

}  // namespace sara_kernels_msg
