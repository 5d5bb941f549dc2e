// What the CPU and CUDA kernels of the fused AdamW ops share: the argument names in error
// messages, and sparse_adamw_multi_'s checks on its lists as a whole (lengths, aliasing).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <deque>
#include <string>
#include <unordered_map>
#include <utility>

#include "message.h"

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

using TensorList = c10::ArrayRef<at::Tensor>;

// Every list has one entry per weight.
inline void check_multi_lengths(const char* op, TensorList weights, TensorList indices, TensorList bases,
                                TensorList deltas, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                                c10::ArrayRef<double> steps) {
  const size_t n = weights.size();
  const std::pair<const char*, size_t> lengths[] = {
      {"indices", indices.size()}, {"bases", bases.size()},         {"deltas", deltas.size()},
      {"grads", grads.size()},     {"exp_avgs", exp_avgs.size()}, {"exp_avg_sqs", exp_avg_sqs.size()},
      {"steps", steps.size()}};
  for (const auto& [name, size] : lengths) {
    TORCH_CHECK(size == n, "sara_kernels_C.", op, ": ", name, " has ", num(size), " entries but weights has ", num(n),
                "; every list needs one entry per weight");
  }
}

// The sets run concurrently, so no two may write the same memory: each weight, delta and moment
// vector appears once (a weight listed twice would need its indices merged into one set).
inline void check_multi_no_aliasing(const char* op, TensorList weights, TensorList deltas, TensorList exp_avgs,
                                    TensorList exp_avg_sqs) {
  std::unordered_map<const void*, std::pair<const char*, size_t>> seen;  // address -> (list, position)
  seen.reserve(4 * weights.size());
  const std::pair<const char*, TensorList> lists[] = {
      {"weights", weights}, {"deltas", deltas}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  for (const auto& [name, list] : lists) {
    for (size_t i = 0; i < list.size(); ++i) {
      if (list[i].numel() == 0) continue;
      const auto [it, inserted] = seen.emplace(list[i].data_ptr(), std::make_pair(name, i));
      TORCH_CHECK_VALUE(inserted, "sara_kernels_C.", op, ": ", name, "[", num(i), "] and ", it->second.first, "[",
                        num(it->second.second), "] share memory; every tensor that the step writes must appear once");
    }
  }
}

}  // namespace sara_kernels_msg
