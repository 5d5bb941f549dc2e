// The in-place ops on the compact [k] state: sparse_adamw_, scatter_merge_, restore_.
//
// All three are one parallel pass over the k selected entries (index strictly increasing, checked,
// so no two threads write the same weight entry). They touch 3-7 values per entry and are memory
// bound; fusing the AdamW update with the write-back saves the ~9 separate passes (and the
// temporaries) of the op-by-op PyTorch version.
#include "common.h"

#include <cmath>

namespace sara_kernels_cpu {
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
  check_weight_side(op, weight, index, base);
  TORCH_CHECK(weight.scalar_type() != at::kDouble, op_name(op),
              ": weight dtype Double is not supported; use Float, BFloat16 or Half");
  const int64_t k = index.numel();
  check_compact(op, "delta", delta, k, at::kFloat);
  check_compact(op, "grad", grad, k, at::kFloat);
  check_compact(op, "exp_avg", exp_avg, k, at::kFloat);
  check_compact(op, "exp_avg_sq", exp_avg_sq, k, at::kFloat);
  TORCH_CHECK(step >= 1, op_name(op), ": step must be >= 1 (AdamW counts from 1), got ", num(step));
  TORCH_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, op_name(op),
              ": betas must lie in [0, 1), got (", num(beta1), ", ", num(beta2), ")");
  TORCH_CHECK(lr >= 0 && eps >= 0 && weight_decay >= 0, op_name(op), ": lr=", num(lr), ", eps=", num(eps),
              " and weight_decay=", num(weight_decay), " must be non-negative");
  check_index(op, index, weight.numel());
  if (k == 0) return;
  // Host scalars in double, as Python computes them, then rounded to fp32 where a tensor op
  // would receive them.
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
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), op, [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
      scalar_t* w = weight.data_ptr<scalar_t>();
      const index_t* idx = index.const_data_ptr<index_t>();
      const scalar_t* bp = base.const_data_ptr<scalar_t>();
      float* dp = delta.data_ptr<float>();
      const float* gp = grad.const_data_ptr<float>();
      float* mp = exp_avg.data_ptr<float>();
      float* vp = exp_avg_sq.data_ptr<float>();
      at::parallel_for(0, k, kElementwiseGrain, [&](int64_t b, int64_t e) {
        adamw_entries<scalar_t, index_t>(w, idx, bp, dp, gp, mp, vp, b, e, s);
      });
    });
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
  m.impl("scatter_merge_", &sara_kernels_cpu::scatter_merge_cpu);
  m.impl("restore_", &sara_kernels_cpu::restore_cpu);
}
