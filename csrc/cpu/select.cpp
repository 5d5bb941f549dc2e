// select_small_magnitude on the CPU: the sorted flat indices of the entries to train.
//
// threshold mode: every i with |w[i]| < threshold, compared in the weight's dtype (the threshold is
//   rounded to it first, as `w.abs() < threshold` does in PyTorch); NaN is never selected.
//   Parallel in two passes over fixed chunks: count per chunk, exclusive prefix sum, write; the
//   output is in index order without a sort.
// k mode: the k smallest |w|, ties broken by the smaller index, NaN sorting after +inf (what the
//   reference's stable torch.sort gives). |w| maps to an unsigned key whose integer order is the
//   float order (the IEEE bits of a non-negative float, every NaN mapped to the maximum), so
//   std::nth_element on a copy of the keys finds the k-th smallest key K; then every entry with
//   key < K is selected plus the first (k - #less) entries with key == K in index order, written
//   with the same count / prefix-sum / write chunks. Transient memory: the key copy, 4 bytes per
//   entry (8 for fp64 weights).
#include "common.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace sara_kernels_cpu {
namespace {

constexpr const char* kOp = "select_small_magnitude";

// Entries per counting chunk: large enough that the per-chunk bookkeeping is noise, small enough
// that a 320x320 weight (102k entries) still splits over 2 threads.
constexpr int64_t kSelectChunk = int64_t{1} << 15;

inline uint32_t magnitude_key(float v) {
  if (std::isnan(v)) return std::numeric_limits<uint32_t>::max();
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits & 0x7fffffffu;  // |v|: the bits of a non-negative float order like the float
}

inline uint64_t magnitude_key(double v) {
  if (std::isnan(v)) return std::numeric_limits<uint64_t>::max();
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits & 0x7fffffffffffffffull;
}

// Count per chunk (counter(b, e) -> count), prefix sum, then write(chunk, b, e, out, offset).
template <typename out_t, typename Count, typename Write>
at::Tensor compact(int64_t n, at::ScalarType out_dtype, const at::TensorOptions& opts, Count counter,
                   Write writer) {
  const int64_t chunks = (n + kSelectChunk - 1) / kSelectChunk;
  std::vector<int64_t> offset(chunks + 1, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      offset[c + 1] = counter(c, c * kSelectChunk, std::min(n, (c + 1) * kSelectChunk));
    }
  });
  for (int64_t c = 0; c < chunks; ++c) offset[c + 1] += offset[c];
  at::Tensor out = at::empty({offset[chunks]}, opts.dtype(out_dtype));
  out_t* o = out.data_ptr<out_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      writer(c, c * kSelectChunk, std::min(n, (c + 1) * kSelectChunk), o + offset[c]);
    }
  });
  return out;
}

template <typename scalar_t, typename out_t>
at::Tensor select_threshold(const at::Tensor& weight, double threshold, at::ScalarType out_dtype) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  // Round the threshold to the weight dtype first, as `weight.abs() < threshold` does.
  const opmath_t t = static_cast<opmath_t>(static_cast<scalar_t>(threshold));
  auto selected = [&](int64_t i) { return std::abs(static_cast<opmath_t>(w[i])) < t; };
  return compact<out_t>(
      weight.numel(), out_dtype, weight.options(),
      [&](int64_t, int64_t b, int64_t e) {
        int64_t count = 0;
        for (int64_t i = b; i < e; ++i) count += selected(i) ? 1 : 0;
        return count;
      },
      [&](int64_t, int64_t b, int64_t e, out_t* o) {
        for (int64_t i = b; i < e; ++i) {
          if (selected(i)) *o++ = static_cast<out_t>(i);
        }
      });
}

template <typename scalar_t, typename out_t>
at::Tensor select_k(const at::Tensor& weight, int64_t k, at::ScalarType out_dtype) {
  using opmath_t = at::opmath_type<scalar_t>;
  using key_t = decltype(magnitude_key(opmath_t{}));
  const int64_t n = weight.numel();
  if (k == 0) return at::empty({0}, weight.options().dtype(out_dtype));
  if (k == n) return at::arange(n, weight.options().dtype(out_dtype));
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  auto key = [&](int64_t i) { return magnitude_key(static_cast<opmath_t>(w[i])); };

  key_t kth;
  {
    std::vector<key_t> keys(n);
    at::parallel_for(0, n, kElementwiseGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) keys[i] = key(i);
    });
    std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end());
    kth = keys[k - 1];
  }

  // Per chunk: #key < kth and #key == kth; then how many of the ties each chunk contributes.
  const int64_t chunks = (n + kSelectChunk - 1) / kSelectChunk;
  std::vector<int64_t> less(chunks), equal(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int64_t l = 0, q = 0;
      for (int64_t i = c * kSelectChunk, e = std::min(n, (c + 1) * kSelectChunk); i < e; ++i) {
        const key_t v = key(i);
        l += v < kth ? 1 : 0;
        q += v == kth ? 1 : 0;
      }
      less[c] = l;
      equal[c] = q;
    }
  });
  int64_t total_less = 0;
  for (int64_t c = 0; c < chunks; ++c) total_less += less[c];
  int64_t ties_left = k - total_less;  // the first ties_left entries == kth (in index order)
  TORCH_INTERNAL_ASSERT(ties_left >= 1);
  std::vector<int64_t> ties(chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    ties[c] = std::min(ties_left, equal[c]);
    ties_left -= ties[c];
  }
  return compact<out_t>(
      n, out_dtype, weight.options(),
      [&](int64_t c, int64_t, int64_t) { return less[c] + ties[c]; },
      [&](int64_t c, int64_t b, int64_t e, out_t* o) {
        int64_t tie_budget = ties[c];
        for (int64_t i = b; i < e; ++i) {
          const key_t v = key(i);
          if (v < kth || (v == kth && tie_budget-- > 0)) *o++ = static_cast<out_t>(i);
        }
      });
}

at::Tensor select_small_magnitude_cpu(const at::Tensor& weight_in,  // any shape
                                      std::optional<double> threshold, std::optional<int64_t> k) {
  sara_kernels_check::tensor(kOp, "weight", weight_in, sara_kernels_check::Dtypes::kFloating);
  TORCH_CHECK_VALUE(threshold.has_value() != k.has_value(), prefix(kOp), "give exactly one of threshold or k");
  const int64_t n = weight_in.numel();
  if (threshold.has_value()) {
    TORCH_CHECK_VALUE(*threshold > 0, prefix(kOp),
                      "threshold must be a positive number, got ", sara_kernels_check::pyfloat(*threshold));
  } else {
    TORCH_CHECK_VALUE(*k >= 0 && *k <= n, prefix(kOp), "k=", num(*k), " must lie in [0, ", num(n),
                      "] (the weight's entry count)");
  }
  const at::Tensor weight = weight_in.contiguous();
  // int32 indices unless the weight has 2^31 entries or more (reference.index_dtype_for).
  const bool wide = n >= (int64_t{1} << 31);
  const at::ScalarType out_dtype = wide ? at::kLong : at::kInt;
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), kOp, [&] {
    if (threshold.has_value()) {
      out = wide ? select_threshold<scalar_t, int64_t>(weight, *threshold, out_dtype)
                 : select_threshold<scalar_t, int32_t>(weight, *threshold, out_dtype);
    } else {
      out = wide ? select_k<scalar_t, int64_t>(weight, *k, out_dtype)
                 : select_k<scalar_t, int32_t>(weight, *k, out_dtype);
    }
  });
  sara_kernels_check::record("select_small_magnitude", 1);
  return out;
}

}  // namespace
}  // namespace sara_kernels_cpu

TORCH_LIBRARY_IMPL(sara_kernels, CPU, m) {
  m.impl("select_small_magnitude", &sara_kernels_cpu::select_small_magnitude_cpu);
}
