// The in-place ops on the compact [k] state: sparse_adamw_, scatter_merge_, restore_.
//
// All three are one parallel pass over the k selected entries (index strictly increasing, checked,
// so no two threads write the same weight entry). They touch 3-7 values per entry and are memory
// bound; fusing the AdamW update with the write-back saves the ~9 separate passes (and the
// temporaries) of the op-by-op PyTorch version.
#include "common.h"

#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace sara_kernels_cpu {

namespace check = sara_kernels_check;
using check::AdamNames;
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

// Every check of one AdamW tensor set (checks.h), then its index values; returns the index and
// base as contiguous tensors (they are only read, so a strided one is copied).
std::pair<at::Tensor, at::Tensor> check_adamw_tensors(const char* op, const AdamNames& n, const at::Tensor& weight,
                                                      const at::Tensor& index, const at::Tensor& base,
                                                      const at::Tensor& delta, const at::Tensor& grad,
                                                      const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq) {
  check::adamw_set(op, n, weight, index, base, delta, grad, exp_avg, exp_avg_sq);
  return {check_index(op, index, weight.numel(), n.index), base.contiguous()};
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
  const AdamNames names{};
  const auto [index_c, base_c] = check_adamw_tensors(op, names, weight, index, base, delta, grad, exp_avg, exp_avg_sq);
  check::adamw_no_overlap(op, {{&weight, &index, &base, &delta, &grad, &exp_avg, &exp_avg_sq}}, {&names});
  check::step(op, "step", step);
  check::adamw_hyper(op, lr, beta1, beta2, eps, weight_decay);
  check::record("sparse_adamw_", 1);
  check::bump_versions({&weight, &delta, &exp_avg, &exp_avg_sq});
  const int64_t k = index.numel();
  if (k == 0) return;
  const AdamScalars s = adam_scalars(step, lr, beta1, beta2, eps, weight_decay, maximize);
  at::parallel_for(0, k, kElementwiseGrain, [&](int64_t b, int64_t e) {
    adamw_range(weight, index_c, base_c, delta, grad, exp_avg, exp_avg_sq, b, e, s);
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
  check::adamw_lists(op, weights, indices, bases, deltas, grads, exp_avgs, exp_avg_sqs, steps);
  check::adamw_hyper(op, lr, beta1, beta2, eps, weight_decay);
  check::record("sparse_adamw_multi_", 1);
  if (n == 0) return;
  std::vector<int64_t> offsets(n + 1, 0);
  std::vector<AdamScalars> scalars(n);
  std::vector<const AdamNames*> names(n);
  std::vector<check::AdamTensors> sets(n);
  std::vector<at::Tensor> index_c(n), base_c(n);
  for (size_t i = 0; i < n; ++i) {
    names[i] = &AdamNames::at(i);
    std::tie(index_c[i], base_c[i]) = check_adamw_tensors(op, *names[i], weights[i], indices[i], bases[i], deltas[i],
                                                          grads[i], exp_avgs[i], exp_avg_sqs[i]);
    TORCH_CHECK(weights[i].device() == weights[0].device(), prefix(op), names[i]->weight, " is on ",
                weights[i].device().str(), " but weights[0] is on ", weights[0].device().str(),
                "; all tensors must be on one device");
    check::step(op, "steps[" + std::to_string(i) + "]", steps[i]);
    sets[i] = {&weights[i], &indices[i], &bases[i], &deltas[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i]};
    offsets[i + 1] = offsets[i] + indices[i].numel();
    scalars[i] = adam_scalars(steps[i], lr, beta1, beta2, eps, weight_decay, maximize);
  }
  check::adamw_no_overlap(op, sets, names);
  for (const check::AdamTensors& t : sets) check::bump_versions({t[0], t[3], t[5], t[6]});
  const int64_t total = offsets[n];
  if (total == 0) return;
  at::parallel_for(0, total, kElementwiseGrain, [&](int64_t b, int64_t e) {
    // The first set whose entries reach past b, then set by set to e.
    size_t i = std::upper_bound(offsets.begin(), offsets.end(), b) - offsets.begin() - 1;
    for (; i < n && offsets[i] < e; ++i) {
      const int64_t lo = std::max(b, offsets[i]) - offsets[i];
      const int64_t hi = std::min(e, offsets[i + 1]) - offsets[i];
      if (lo < hi) {
        adamw_range(weights[i], index_c[i], base_c[i], deltas[i], grads[i], exp_avgs[i], exp_avg_sqs[i], lo, hi,
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

// scatter_merge_ (delta defined) and restore_ (delta undefined): the checks, then one parallel
// pass that writes weight[index[j]] (base + alpha * delta, or base exactly).
void write_entries(const char* op, const at::Tensor& weight, const at::Tensor& index_in, const at::Tensor& base_in,
                   const at::Tensor& delta, double alpha) {
  check::weight_side(op, weight, index_in, base_in);
  std::vector<check::Arg> args = {{"weight", &weight, true}, {"index", &index_in, false}, {"base", &base_in, false}};
  if (delta.defined()) {
    check::compact(op, "delta", delta, index_in, check::Dtypes::kFp32OrFp64);
    check::same_device(op, {{"weight", &weight}, {"index", &index_in}, {"base", &base_in}, {"delta", &delta}});
    args.push_back({"delta", &delta, false});
  } else {
    check::same_device(op, {{"weight", &weight}, {"index", &index_in}, {"base", &base_in}});
  }
  check::no_overlap(op, args);
  if (delta.defined()) check::finite(op, "alpha", alpha);
  const at::Tensor index = check_index(op, index_in, weight.numel());
  const at::Tensor base = base_in.contiguous();
  check::record(op, 1);
  check::bump_versions({&weight});
  const int64_t k = index.numel();
  if (k == 0) return;
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "sara_kernels_write_entries", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sara_kernels_write_entries", [&] {
      scalar_t* w = weight.data_ptr<scalar_t>();
      const index_t* idx = index.const_data_ptr<index_t>();
      const scalar_t* bp = base.const_data_ptr<scalar_t>();
      if (!delta.defined()) {
        at::parallel_for(0, k, kElementwiseGrain, [&](int64_t b, int64_t e) {
          for (int64_t j = b; j < e; ++j) w[static_cast<int64_t>(idx[j])] = bp[j];
        });
      } else if (delta.scalar_type() == at::kFloat) {
        merge_entries<scalar_t, float, index_t>(w, idx, bp, delta.const_data_ptr<float>(), k, alpha);
      } else {
        merge_entries<scalar_t, double, index_t>(w, idx, bp, delta.const_data_ptr<double>(), k, alpha);
      }
    });
  });
}

void scatter_merge_cpu(const at::Tensor& weight, const at::Tensor& index, const at::Tensor& base,
                       const at::Tensor& delta, double alpha) {
  write_entries("scatter_merge_", weight, index, base, delta, alpha);
}

void restore_cpu(const at::Tensor& weight, const at::Tensor& index, const at::Tensor& base) {
  write_entries("restore_", weight, index, base, at::Tensor(), 1.0);
}

}  // namespace
}  // namespace sara_kernels_cpu

TORCH_LIBRARY_IMPL(sara_kernels, CPU, m) {
  m.impl("sparse_adamw_", &sara_kernels_cpu::sparse_adamw_cpu);
  m.impl("sparse_adamw_multi_", &sara_kernels_cpu::sparse_adamw_multi_cpu);
  m.impl("scatter_merge_", &sara_kernels_cpu::scatter_merge_cpu);
  m.impl("restore_", &sara_kernels_cpu::restore_cpu);
}
