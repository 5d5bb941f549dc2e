// The in-place ops on the compact [k] state: sparse_adamw_, scatter_merge_, restore_.
//
// All three are one parallel pass over the k selected entries (index strictly increasing, checked,
// so no two threads write the same weight entry). They touch 3-7 values per entry and are memory
// bound; fusing the AdamW update with the write-back saves the ~9 separate passes (and the
// temporaries) of the op-by-op PyTorch version.
#include "common.h"
#include "adamw_multi.h"

#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace sara_kernels_cpu {

using sara_kernels_msg::AdamNames;
using sara_kernels_msg::check_multi_lengths;
using sara_kernels_msg::check_multi_no_aliasing;
namespace {

struct AdamScalars {
  float decay;         // 1 - lr * weight_decay
  float lerp_w;        // 1 - beta1 (exp_avg.lerp_(grad, 1 - beta1))
  float beta2;         // exp_avg_sq.mul_(beta2)
  float one_m_beta2;   // .addcmul_(grad, grad, value=1 - beta2)
  float bc2_sqrt;      // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size; // -lr / (1 - beta1^step)
  bool maximize;
  bool apply_decay;
};

// No FP contraction in here beyond the explicit std::fma calls: each rounding follows ATen's.
// torch.optim.AdamW (single-tensor, foreach=False) per entry, in fp32, op for op as
// reference.sparse_adamw_ runs it: each Python scalar is rounded to fp32 where the tensor op
// receives it, and lerp uses ATen's formula (the fused form of its vectorised CPU kernel).
template <typename w_t, typename index_t>
SARA_HOT_CLONES __attribute__((optimize("fp-contract=off"))) void adamw_entries(w_t* __restrict weight, const index_t* __restrict idx,
                                   const w_t* __restrict base, float* __restrict delta,
                                   const float* __restrict grad, float* __restrict exp_avg,
                                   float* __restrict exp_avg_sq, int64_t b, int64_t e,
                                   const AdamScalars& s) {
  const bool small = std::abs(s.lerp_w) < 0.5f;
  const float coeff = small ? s.lerp_w : s.lerp_w - 1.0f;
  for (int64_t j = b; j < e; ++j) {
    const float g = s.maximize ? -grad[j] : grad[j];
    float d = delta[j];
    if (s.apply_decay) d = d * s.decay;
    float m = exp_avg[j];
    m = std::fma(coeff, g - m, small ? m : g);
    // ATen's vectorised addcmul_ computes self + (value * t1) * t2 as one FMA (it matches
    // bit for bit); sqrt below is MKL's in torch (not correctly rounded: ~20% of entries 1 ulp
    // apart), so the results agree to ~1e-7 relative, not bitwise.
    const float v = std::fma(s.one_m_beta2 * g, g, exp_avg_sq[j] * s.beta2);
    const float denom = std::sqrt(v) / s.bc2_sqrt + s.eps;
    d = d + s.neg_step_size * m / denom;
    delta[j] = d;
    exp_avg[j] = m;
    exp_avg_sq[j] = v;
    weight[static_cast<int64_t>(idx[j])] = static_cast<w_t>(static_cast<float>(base[j]) + d);
  }
}

void check_weight_side(const char* op, const at::Tensor& weight, const at::Tensor& index,
                       const at::Tensor& base) {
  check_float_tensor(op, "weight", weight);
  check_index_tensor(op, index);
  const int64_t k = index.numel();
  check_compact(op, "base", base, k, weight.scalar_type());
}


// Every check of one AdamW tensor set (dtypes, devices, sizes, layout, index values).
void check_adamw_tensors(const char* op, const AdamNames& n, const at::Tensor& weight,
                         const at::Tensor& index, const at::Tensor& base, const at::Tensor& delta,
                         const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq) {
  check_float_tensor(op, n.weight.c_str(), weight);
  TORCH_CHECK(weight.scalar_type() != at::kDouble, op_name(op), ": ", n.weight,
              " dtype Double is not supported; use Float, BFloat16 or Half");
  check_index_tensor(op, index, n.index.c_str());
  const int64_t k = index.numel();
  check_compact(op, n.base.c_str(), base, k, weight.scalar_type());
  check_compact(op, n.delta.c_str(), delta, k, at::kFloat);
  check_compact(op, n.grad.c_str(), grad, k, at::kFloat);
  check_compact(op, n.exp_avg.c_str(), exp_avg, k, at::kFloat);
  check_compact(op, n.exp_avg_sq.c_str(), exp_avg_sq, k, at::kFloat);
  check_index(op, index, weight.numel(), n.index.c_str());
}

void check_adamw_hyper(const char* op, double lr, double beta1, double beta2, double eps,
                       double weight_decay) {
  TORCH_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, op_name(op),
              ": betas must lie in [0, 1), got (", num(beta1), ", ", num(beta2), ")");
  TORCH_CHECK(lr >= 0 && eps >= 0 && weight_decay >= 0, op_name(op), ": lr=", num(lr), ", eps=", num(eps),
              " and weight_decay=", num(weight_decay), " must be non-negative");
}

// Host scalars in double, as Python computes them, then rounded to fp32 where a tensor op
// would receive them.
AdamScalars adam_scalars(double step, double lr, double beta1, double beta2, double eps,
                         double weight_decay, bool maximize) {
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  AdamScalars s{};
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.apply_decay = weight_decay != 0;
  s.lerp_w = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_m_beta2 = static_cast<float>(1.0 - beta2);
  s.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  s.eps = static_cast<float>(eps);
  s.neg_step_size = static_cast<float>(-(lr / bc1));
  s.maximize = maximize;
  return s;
}

// Entries [b, e) of one tensor set, dispatched on its weight and index dtypes.
void adamw_range(const at::Tensor& weight, const at::Tensor& index, const at::Tensor& base,
                 const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& exp_avg,
                 const at::Tensor& exp_avg_sq, int64_t b, int64_t e, const AdamScalars& s) {
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "sara_kernels_sparse_adamw_", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sara_kernels_sparse_adamw_", [&] {
      adamw_entries<scalar_t, index_t>(weight.data_ptr<scalar_t>(), index.const_data_ptr<index_t>(),
                                       base.const_data_ptr<scalar_t>(), delta.data_ptr<float>(),
                                       grad.const_data_ptr<float>(), exp_avg.data_ptr<float>(),
                                       exp_avg_sq.data_ptr<float>(), b, e, s);
    });
  });
}

void sparse_adamw_cpu(const at::Tensor& weight,      // any shape, fp32/bf16/fp16, contiguous
                      const at::Tensor& index,       // [k] int32/int64 into weight.view(-1)
                      const at::Tensor& base,        // [k] weight dtype
                      const at::Tensor& delta,       // [k] fp32, updated
                      const at::Tensor& grad,        // [k] fp32
                      const at::Tensor& exp_avg,     // [k] fp32, updated
                      const at::Tensor& exp_avg_sq,  // [k] fp32, updated
                      double step, double lr, double beta1, double beta2, double eps,
                      double weight_decay, bool maximize) {
  constexpr const char* op = "sparse_adamw_";
  TORCH_CHECK(step >= 1, op_name(op), ": step must be >= 1 (AdamW counts from 1), got ", num(step));
  check_adamw_hyper(op, lr, beta1, beta2, eps, weight_decay);
  check_adamw_tensors(op, AdamNames{}, weight, index, base, delta, grad, exp_avg, exp_avg_sq);
  const int64_t k = index.numel();
  if (k == 0) return;
  const AdamScalars s = adam_scalars(step, lr, beta1, beta2, eps, weight_decay, maximize);
  at::parallel_for(0, k, kElementwiseGrain, [&](int64_t b, int64_t e) {
    adamw_range(weight, index, base, delta, grad, exp_avg, exp_avg_sq, b, e, s);
  });
}

// sparse_adamw_ over lists of tensor sets (one per layer), each with its own step, in one call:
// the entries of all sets are one parallel range, so many small layers share the thread pool's
// work instead of waking it once per layer.
void sparse_adamw_multi_cpu(at::TensorList weights, at::TensorList indices, at::TensorList bases,
                            at::TensorList deltas, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::ArrayRef<double> steps, double lr, double beta1,
                            double beta2, double eps, double weight_decay, bool maximize) {
  constexpr const char* op = "sparse_adamw_multi_";
  const size_t n = weights.size();
  check_multi_lengths(op, weights, indices, bases, deltas, grads, exp_avgs, exp_avg_sqs, steps);
  check_adamw_hyper(op, lr, beta1, beta2, eps, weight_decay);
  std::vector<int64_t> offsets(n + 1, 0);
  std::vector<AdamScalars> scalars(n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(steps[i] >= 1, op_name(op), ": steps[", num(i), "] must be >= 1 (AdamW counts from 1), got ",
                num(steps[i]));
    check_adamw_tensors(op, AdamNames::at(i), weights[i], indices[i], bases[i], deltas[i], grads[i],
                        exp_avgs[i], exp_avg_sqs[i]);
    offsets[i + 1] = offsets[i] + indices[i].numel();
    scalars[i] = adam_scalars(steps[i], lr, beta1, beta2, eps, weight_decay, maximize);
  }
  check_multi_no_aliasing(op, weights, deltas, exp_avgs, exp_avg_sqs);
  const int64_t total = offsets[n];
  if (total == 0) return;
  at::parallel_for(0, total, kElementwiseGrain, [&](int64_t b, int64_t e) {
    // The first set whose entries reach past b, then set by set to e.
    size_t i = std::upper_bound(offsets.begin(), offsets.end(), b) - offsets.begin() - 1;
    for (; i < n && offsets[i] < e; ++i) {
      const int64_t lo = std::max(b, offsets[i]) - offsets[i];
      const int64_t hi = std::min(e, offsets[i + 1]) - offsets[i];
      if (lo < hi) {
        adamw_range(weights[i], indices[i], bases[i], deltas[i], grads[i], exp_avgs[i], exp_avg_sqs[i], lo, hi,
                    scalars[i]);
      }
    }
  });
}

// weight[index] = base + alpha * delta in acc_t (fp64 when weight or delta is fp64).
template <typename w_t, typename d_t, typename index_t>
void merge_entries(w_t* weight, const index_t* idx, const w_t* base, const d_t* delta, int64_t k,
                   double alpha) {
  using acc_t = std::conditional_t<std::is_same_v<w_t, double> || std::is_same_v<d_t, double>,
                                   double, float>;
  const acc_t a = static_cast<acc_t>(alpha);  // `delta.to(acc) * alpha` rounds alpha to acc_t
  at::parallel_for(0, k, kElementwiseGrain, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const acc_t d = static_cast<acc_t>(delta[j]) * a;
      weight[static_cast<int64_t>(idx[j])] = static_cast<w_t>(static_cast<acc_t>(base[j]) + d);
    }
  });
}

void scatter_merge_cpu(const at::Tensor& weight,  // any shape, contiguous
                       const at::Tensor& index,   // [k] int32/int64 into weight.view(-1)
                       const at::Tensor& base,    // [k] weight dtype
                       const at::Tensor& delta,   // [k] fp32 or fp64
                       double alpha) {
  constexpr const char* op = "scatter_merge_";
  check_weight_side(op, weight, index, base);
  const int64_t k = index.numel();
  TORCH_CHECK(delta.scalar_type() == at::kFloat || delta.scalar_type() == at::kDouble,
              op_name(op), ": delta has dtype ", delta.scalar_type(), "; expected Float or Double");
  check_compact(op, "delta", delta, k, delta.scalar_type());
  check_index(op, index, weight.numel());
  if (k == 0) return;
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), op, [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
      scalar_t* w = weight.data_ptr<scalar_t>();
      const index_t* idx = index.const_data_ptr<index_t>();
      const scalar_t* bp = base.const_data_ptr<scalar_t>();
      if (delta.scalar_type() == at::kFloat) {
        merge_entries<scalar_t, float, index_t>(w, idx, bp, delta.const_data_ptr<float>(), k, alpha);
      } else {
        merge_entries<scalar_t, double, index_t>(w, idx, bp, delta.const_data_ptr<double>(), k, alpha);
      }
    });
  });
}

void restore_cpu(const at::Tensor& weight,  // any shape, contiguous
                 const at::Tensor& index,   // [k] int32/int64 into weight.view(-1)
                 const at::Tensor& base) {  // [k] weight dtype
  constexpr const char* op = "restore_";
  check_weight_side(op, weight, index, base);
  check_index(op, index, weight.numel());
  const int64_t k = index.numel();
  if (k == 0) return;
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), op, [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
      scalar_t* w = weight.data_ptr<scalar_t>();
      const index_t* idx = index.const_data_ptr<index_t>();
      const scalar_t* bp = base.const_data_ptr<scalar_t>();
      at::parallel_for(0, k, kElementwiseGrain, [&](int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) w[static_cast<int64_t>(idx[j])] = bp[j];
      });
    });
  });
}

}  // namespace
}  // namespace sara_kernels_cpu

TORCH_LIBRARY_IMPL(sara_kernels_C, CPU, m) {
  m.impl("sparse_adamw_", &sara_kernels_cpu::sparse_adamw_cpu);
  m.impl("sparse_adamw_multi_", &sara_kernels_cpu::sparse_adamw_multi_cpu);
  m.impl("scatter_merge_", &sara_kernels_cpu::scatter_merge_cpu);
  m.impl("restore_", &sara_kernels_cpu::restore_cpu);
}
