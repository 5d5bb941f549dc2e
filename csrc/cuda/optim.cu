// CUDA kernels of the in-place ops on the compact vectors: sparse_adamw_, scatter_merge_, restore_.
//
// Each is one elementwise kernel over the k selected entries (grid-stride). An entry whose index
// lies outside [0, weight.numel()) never touches the weight (sparse_adamw_ still updates its
// compact state, which is not indexed).
#include "common.cuh"

#include <torch/library.h>

#include <cmath>

namespace sara_kernels_cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// sparse_adamw_
// ---------------------------------------------------------------------------------------------
// fp32 scalars, rounded on the host exactly as torch.optim's tensor ops round Python floats.
struct AdamScalars {
  float decay;          // 1 - lr * weight_decay   (delta.mul_(...))
  float lerp_weight;    // 1 - beta1               (exp_avg.lerp_(grad, ...))
  float beta2;          // exp_avg_sq.mul_(beta2)
  float one_minus_beta2;  // addcmul_(grad, grad, value=1 - beta2)
  float inv_bc2_sqrt;   // exp_avg_sq.sqrt() / sqrt(bc2): ATen multiplies by the fp32 reciprocal
  float eps;
  float neg_step_size;  // addcdiv_(exp_avg, denom, value=-lr / bc1)
  bool apply_decay;
  bool maximize;
};

__device__ __forceinline__ void adam_update(float& d, float g, float& m, float& v, const AdamScalars& s) {
  if (s.maximize) g = -g;
  if (s.apply_decay) d = d * s.decay;
  // at::native::lerp (the same two branches, for accuracy near weight 0 and 1).
  m = (fabsf(s.lerp_weight) < 0.5f) ? m + s.lerp_weight * (g - m) : g - (g - m) * (1.0f - s.lerp_weight);
  v = v * s.beta2;
  v = v + s.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) * s.inv_bc2_sqrt + s.eps;
  d = d + s.neg_step_size * (m / denom);
}

template <typename weight_t, typename index_t>
__device__ __forceinline__ void adam_write(weight_t* __restrict__ weight, int64_t numel, const index_t* __restrict__ index,
                                           const weight_t* __restrict__ base, int64_t j, float d) {
  const int64_t f = static_cast<int64_t>(index[j]);
  if (f >= 0 && f < numel) weight[f] = static_cast<weight_t>(static_cast<float>(base[j]) + d);
}

// kVec: delta/grad/exp_avg/exp_avg_sq are 16-byte aligned; each thread handles 4 entries with
// float4 loads and stores (the last, partial group element by element).
template <typename weight_t, typename index_t, bool kVec>
__global__ void __launch_bounds__(kThreads)
    sparse_adamw_kernel(weight_t* __restrict__ weight, int64_t numel, const index_t* __restrict__ index,
                        const weight_t* __restrict__ base, float* __restrict__ delta, const float* __restrict__ grad,
                        float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq, int64_t k, AdamScalars s) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if constexpr (kVec) {
    const int64_t groups = (k + 3) / 4;
    for (int64_t t = first; t < groups; t += stride) {
      const int64_t j0 = 4 * t;
      if (j0 + 4 <= k) {
        // Every load of the group is issued before the first use (one memory round trip per
        // thread instead of two: the index and base loads no longer wait for the update).
        float4 d4 = reinterpret_cast<const float4*>(delta)[t];
        const float4 g4 = reinterpret_cast<const float4*>(grad)[t];
        float4 m4 = reinterpret_cast<const float4*>(exp_avg)[t];
        float4 v4 = reinterpret_cast<const float4*>(exp_avg_sq)[t];
        int64_t f[4];
        float b[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          f[e] = static_cast<int64_t>(index[j0 + e]);
          b[e] = static_cast<float>(base[j0 + e]);
        }
        adam_update(d4.x, g4.x, m4.x, v4.x, s);
        adam_update(d4.y, g4.y, m4.y, v4.y, s);
        adam_update(d4.z, g4.z, m4.z, v4.z, s);
        adam_update(d4.w, g4.w, m4.w, v4.w, s);
        reinterpret_cast<float4*>(delta)[t] = d4;
        reinterpret_cast<float4*>(exp_avg)[t] = m4;
        reinterpret_cast<float4*>(exp_avg_sq)[t] = v4;
        const float d[4] = {d4.x, d4.y, d4.z, d4.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (f[e] >= 0 && f[e] < numel) weight[f[e]] = static_cast<weight_t>(b[e] + d[e]);
        }
      } else {
        for (int64_t j = j0; j < k; ++j) {
          float d = delta[j], m = exp_avg[j], v = exp_avg_sq[j];
          adam_update(d, grad[j], m, v, s);
          delta[j] = d;
          exp_avg[j] = m;
          exp_avg_sq[j] = v;
          adam_write(weight, numel, index, base, j, d);
        }
      }
    }
  } else {
    for (int64_t j = first; j < k; j += stride) {
      float d = delta[j], m = exp_avg[j], v = exp_avg_sq[j];
      adam_update(d, grad[j], m, v, s);
      delta[j] = d;
      exp_avg[j] = m;
      exp_avg_sq[j] = v;
      adam_write(weight, numel, index, base, j, d);
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

void sparse_adamw_cuda(const at::Tensor& weight, const at::Tensor& index_in, const at::Tensor& base_in,
                       const at::Tensor& delta, const at::Tensor& grad_in, const at::Tensor& exp_avg,
                       const at::Tensor& exp_avg_sq, double step, double lr, double beta1, double beta2, double eps,
                       double weight_decay, bool maximize) {
  const char* op = "sparse_adamw_";
  check_cuda(op, "weight", weight, weight.device());
  const c10::cuda::CUDAGuard guard(weight.device());
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kHalf ||
                       weight.scalar_type() == at::kBFloat16,
                   "sara_kernels_C.", op, ": weight has dtype ", weight.scalar_type(),
                   "; expected one of Float, Half, BFloat16");
  check_contiguous(op, "weight", weight);
  const at::Tensor index = checked_index(op, index_in, weight.device(), weight.numel());
  const int64_t k = index.numel();
  check_cuda(op, "base", base_in, weight.device());
  check_dtype(op, "base", base_in, weight.scalar_type());
  check_size(op, "base", base_in, k);
  const std::pair<const char*, const at::Tensor*> compact[] = {
      {"delta", &delta}, {"grad", &grad_in}, {"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq}};
  for (const auto& [name, t] : compact) {
    check_cuda(op, name, *t, weight.device());
    check_dtype(op, name, *t, at::kFloat);
    check_size(op, name, *t, k);
  }
  // The mutated compact vectors must be contiguous (written in place); grad and base are read only.
  check_contiguous(op, "delta", delta);
  check_contiguous(op, "exp_avg", exp_avg);
  check_contiguous(op, "exp_avg_sq", exp_avg_sq);
  TORCH_CHECK_VALUE(step >= 1.0, "sara_kernels_C.", op, ": step must be >= 1, got ", num(step));
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0, "sara_kernels_C.", op,
                    ": betas must lie in [0, 1), got (", num(beta1), ", ", num(beta2), ")");
  if (k == 0) return;
  const at::Tensor base = base_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  validate_index(op, index, weight.numel());

  // Python-float arithmetic (double) as in torch.optim / sara_kernels.reference, then the fp32
  // rounding the tensor ops apply to their scalar arguments.
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  const double step_size = lr / bias_correction1;
  const double bc2_sqrt = std::sqrt(bias_correction2);
  AdamScalars s;
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.lerp_weight = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.inv_bc2_sqrt = 1.0f / static_cast<float>(bc2_sqrt);
  s.eps = static_cast<float>(eps);
  s.neg_step_size = static_cast<float>(-step_size);
  s.apply_decay = weight_decay != 0.0;
  s.maximize = maximize;

  const bool vec = aligned16(delta.data_ptr()) && aligned16(grad.data_ptr()) && aligned16(exp_avg.data_ptr()) &&
                   aligned16(exp_avg_sq.data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t numel = weight.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sara_kernels_sparse_adamw_", [&] {
    using weight_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "sara_kernels_sparse_adamw_index", [&] {
      auto* w = weight.data_ptr<weight_t>();
      const auto* b = base.data_ptr<weight_t>();
      const auto* idx = index.data_ptr<index_t>();
      if (vec) {
        sparse_adamw_kernel<weight_t, index_t, true><<<blocks_for(ceil_div(k, 4)), kThreads, 0, stream>>>(
            w, numel, idx, b, delta.data_ptr<float>(), grad.data_ptr<float>(), exp_avg.data_ptr<float>(),
            exp_avg_sq.data_ptr<float>(), k, s);
      } else {
        sparse_adamw_kernel<weight_t, index_t, false><<<blocks_for(k), kThreads, 0, stream>>>(
            w, numel, idx, b, delta.data_ptr<float>(), grad.data_ptr<float>(), exp_avg.data_ptr<float>(),
            exp_avg_sq.data_ptr<float>(), k, s);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ---------------------------------------------------------------------------------------------
// scatter_merge_ / restore_
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// weight[index[j]] = weight_t(acc_t(base[j]) + acc_t(delta[j]) * alpha)
template <typename weight_t, typename delta_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    scatter_merge_kernel(weight_t* __restrict__ weight, int64_t numel, const index_t* __restrict__ index,
                         const weight_t* __restrict__ base, const delta_t* __restrict__ delta, acc_t alpha, int64_t k) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < k;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t f = static_cast<int64_t>(index[j]);
    if (f < 0 || f >= numel) continue;
    // Two roundings (no fused multiply-add), as the reference's separate tensor ops.
    const acc_t value = static_cast<acc_t>(base[j]) + mul_rn(static_cast<acc_t>(delta[j]), alpha);
    weight[f] = static_cast<weight_t>(value);
  }
}

template <typename weight_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    restore_kernel(weight_t* __restrict__ weight, int64_t numel, const index_t* __restrict__ index,
                   const weight_t* __restrict__ base, int64_t k) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < k;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t f = static_cast<int64_t>(index[j]);
    if (f < 0 || f >= numel) continue;
    weight[f] = base[j];
  }
}

// weight, index, base checks shared by scatter_merge_ and restore_; returns the contiguous index.
at::Tensor check_weight_side(const char* op, const at::Tensor& weight, const at::Tensor& index_in,
                             const at::Tensor& base) {
  check_cuda(op, "weight", weight, weight.device());
  check_float_dtype(op, "weight", weight);
  check_contiguous(op, "weight", weight);
  at::Tensor index = checked_index(op, index_in, weight.device(), weight.numel());
  check_cuda(op, "base", base, weight.device());
  check_dtype(op, "base", base, weight.scalar_type());
  check_size(op, "base", base, index.numel());
  return index;
}

void scatter_merge_cuda(const at::Tensor& weight, const at::Tensor& index_in, const at::Tensor& base_in,
                        const at::Tensor& delta_in, double alpha) {
  const char* op = "scatter_merge_";
  check_cuda(op, "weight", weight, weight.device());
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor index = check_weight_side(op, weight, index_in, base_in);
  const int64_t k = index.numel();
  check_cuda(op, "delta", delta_in, weight.device());
  TORCH_CHECK_TYPE(delta_in.scalar_type() == at::kFloat || delta_in.scalar_type() == at::kDouble,
                   "sara_kernels_C.", op, ": delta has dtype ", delta_in.scalar_type(), "; expected Float or Double");
  check_size(op, "delta", delta_in, k);
  if (k == 0) return;
  const at::Tensor base = base_in.contiguous();
  const at::Tensor delta = delta_in.contiguous();
  validate_index(op, index, weight.numel());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t numel = weight.numel();
  const bool fp64 = weight.scalar_type() == at::kDouble || delta.scalar_type() == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sara_kernels_scatter_merge_", [&] {
    using weight_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "sara_kernels_scatter_merge_index", [&] {
      auto* w = weight.data_ptr<weight_t>();
      const auto* b = base.data_ptr<weight_t>();
      const auto* idx = index.data_ptr<index_t>();
      if (delta.scalar_type() == at::kDouble) {
        scatter_merge_kernel<weight_t, double, double, index_t>
            <<<blocks_for(k), kThreads, 0, stream>>>(w, numel, idx, b, delta.data_ptr<double>(), alpha, k);
      } else if (fp64) {  // fp64 weight, fp32 delta
        scatter_merge_kernel<weight_t, float, double, index_t>
            <<<blocks_for(k), kThreads, 0, stream>>>(w, numel, idx, b, delta.data_ptr<float>(), alpha, k);
      } else {
        scatter_merge_kernel<weight_t, float, float, index_t><<<blocks_for(k), kThreads, 0, stream>>>(
            w, numel, idx, b, delta.data_ptr<float>(), static_cast<float>(alpha), k);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void restore_cuda(const at::Tensor& weight, const at::Tensor& index_in, const at::Tensor& base_in) {
  const char* op = "restore_";
  check_cuda(op, "weight", weight, weight.device());
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor index = check_weight_side(op, weight, index_in, base_in);
  const int64_t k = index.numel();
  if (k == 0) return;
  const at::Tensor base = base_in.contiguous();
  validate_index(op, index, weight.numel());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t numel = weight.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sara_kernels_restore_", [&] {
    AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "sara_kernels_restore_index", [&] {
      restore_kernel<scalar_t, index_t><<<blocks_for(k), kThreads, 0, stream>>>(
          weight.data_ptr<scalar_t>(), numel, index.data_ptr<index_t>(), base.data_ptr<scalar_t>(), k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace
}  // namespace sara_kernels_cuda

TORCH_LIBRARY_IMPL(sara_kernels_C, CUDA, m) {
  m.impl("sparse_adamw_", TORCH_FN(sara_kernels_cuda::sparse_adamw_cuda));
  m.impl("scatter_merge_", TORCH_FN(sara_kernels_cuda::scatter_merge_cuda));
  m.impl("restore_", TORCH_FN(sara_kernels_cuda::restore_cuda));
}
