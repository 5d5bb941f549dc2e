// CUDA kernels of the in-place ops on the compact vectors: sparse_adamw_, scatter_merge_, restore_.
//
// Each is one elementwise kernel over the k selected entries (grid-stride). An entry whose index
// lies outside [0, weight.numel()) never touches the weight (sparse_adamw_ still updates its
// compact state, which is not indexed).
#include "common.cuh"

#include <torch/library.h>

#include <cmath>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace sara_kernels_cuda {

using sara_kernels_check::AdamNames;
namespace check = sara_kernels_check;
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

// Entry j of one tensor set, on its own (the non-vectorised paths).
template <typename weight_t, typename index_t>
__device__ __forceinline__ void adam_entry(weight_t* __restrict__ weight, int64_t numel, const index_t* __restrict__ index,
                                           const weight_t* __restrict__ base, float* __restrict__ delta,
                                           const float* __restrict__ grad, float* __restrict__ exp_avg,
                                           float* __restrict__ exp_avg_sq, int64_t j, const AdamScalars& s) {
  float d = delta[j], m = exp_avg[j], v = exp_avg_sq[j];
  adam_update(d, grad[j], m, v, s);
  delta[j] = d;
  exp_avg[j] = m;
  exp_avg_sq[j] = v;
  adam_write(weight, numel, index, base, j, d);
}

// Entries [4t, min(4t + 4, k)) of one tensor set. kVec: delta/grad/exp_avg/exp_avg_sq are 16-byte
// aligned and a full group moves with float4 loads and stores (a partial group, entry by entry).
// kCheck: a device-side assertion on each entry's index (in range, above the previous one), the
// check validate_index would run as a separate pass.
template <typename weight_t, typename index_t, bool kVec, bool kCheck>
__device__ __forceinline__ void adam_group(weight_t* __restrict__ weight, int64_t numel, const index_t* __restrict__ index,
                                           const weight_t* __restrict__ base, float* __restrict__ delta,
                                           const float* __restrict__ grad, float* __restrict__ exp_avg,
                                           float* __restrict__ exp_avg_sq, int64_t k, int64_t t, const AdamScalars& s) {
  const int64_t j0 = 4 * t;
  if (kVec && j0 + 4 <= k) {
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
    if constexpr (kCheck) {
      int64_t previous = j0 > 0 ? static_cast<int64_t>(index[j0 - 1]) : -1;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        CUDA_KERNEL_ASSERT(f[e] >= 0 && f[e] < numel && "sara_kernels: index holds a value outside [0, weight.numel())");
        CUDA_KERNEL_ASSERT(f[e] > previous && "sara_kernels: index must be sorted in strictly increasing order");
        previous = f[e];
      }
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
    const int64_t end = j0 + 4 < k ? j0 + 4 : k;
    for (int64_t j = j0; j < end; ++j) {
      if constexpr (kCheck) {
        const int64_t f = static_cast<int64_t>(index[j]);
        CUDA_KERNEL_ASSERT(f >= 0 && f < numel && "sara_kernels: index holds a value outside [0, weight.numel())");
        CUDA_KERNEL_ASSERT((j == 0 || static_cast<int64_t>(index[j - 1]) < f) &&
                           "sara_kernels: index must be sorted in strictly increasing order");
      }
      adam_entry(weight, numel, index, base, delta, grad, exp_avg, exp_avg_sq, j, s);
    }
  }
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
      adam_group<weight_t, index_t, true, false>(weight, numel, index, base, delta, grad, exp_avg, exp_avg_sq, k, t, s);
    }
  } else {
    for (int64_t j = first; j < k; j += stride) {
      adam_entry(weight, numel, index, base, delta, grad, exp_avg, exp_avg_sq, j, s);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// sparse_adamw_multi_: many tensor sets (one per layer) per launch
// ---------------------------------------------------------------------------------------------
// The sets of one launch travel in the kernel's parameters (no device-side table to fill, so a
// CUDA graph captures the launch as is). Each set gets ceil(k / kEntriesPerBlock) blocks; a block
// finds its set by a binary search over the block offsets. 40 sets keep the parameters under the
// 4 KB every CUDA version accepts; a UNet's 282 weights take 8 launches instead of 282.
constexpr int kMultiMaxSets = 40;
constexpr int64_t kEntriesPerBlock = 4LL * kThreads;

struct MultiAdamSets {
  void* weight[kMultiMaxSets];
  const void* index[kMultiMaxSets];
  const void* base[kMultiMaxSets];
  float* delta[kMultiMaxSets];
  const float* grad[kMultiMaxSets];
  float* exp_avg[kMultiMaxSets];
  float* exp_avg_sq[kMultiMaxSets];
  int64_t numel[kMultiMaxSets];
  int64_t k[kMultiMaxSets];
  float neg_step_size[kMultiMaxSets];  // per set: its step's bias corrections
  float inv_bc2_sqrt[kMultiMaxSets];
  int64_t block_start[kMultiMaxSets + 1];  // set i owns blocks [block_start[i], block_start[i + 1])
  int count;
};
static_assert(sizeof(MultiAdamSets) + sizeof(AdamScalars) <= 4000, "kernel parameters must stay under 4 KB");

template <typename weight_t, typename index_t, bool kVec, bool kCheck>
__global__ void __launch_bounds__(kThreads)
    sparse_adamw_multi_kernel(const __grid_constant__ MultiAdamSets sets, const AdamScalars common) {
  const int64_t block = blockIdx.x;
  int lo = 0, hi = sets.count - 1;  // the last set whose first block is <= this block
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (sets.block_start[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int i = lo;
  const int64_t k = sets.k[i];
  const int64_t t = (block - sets.block_start[i]) * kThreads + threadIdx.x;  // this thread's group of 4
  if (4 * t >= k) return;
  AdamScalars s = common;
  s.neg_step_size = sets.neg_step_size[i];
  s.inv_bc2_sqrt = sets.inv_bc2_sqrt[i];
  adam_group<weight_t, index_t, kVec, kCheck>(
      static_cast<weight_t*>(sets.weight[i]), sets.numel[i], static_cast<const index_t*>(sets.index[i]),
      static_cast<const weight_t*>(sets.base[i]), sets.delta[i], sets.grad[i], sets.exp_avg[i], sets.exp_avg_sq[i],
      k, t, s);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }


// One tensor set, checked, with contiguous index/base/grad (the mutated vectors must already be
// contiguous: they are written in place).
struct AdamSet {
  at::Tensor weight, index, base, delta, grad, exp_avg, exp_avg_sq;
};

AdamSet checked_adam_set(const char* op, const AdamNames& n, const at::Tensor& weight, const at::Tensor& index,
                         const at::Tensor& base, const at::Tensor& delta, const at::Tensor& grad,
                         const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq) {
  check::adamw_set(op, n, weight, index, base, delta, grad, exp_avg, exp_avg_sq);
  return {weight, index, base, delta, grad, exp_avg, exp_avg_sq};
}

// After the overlap check on the arguments themselves: the index and base as the kernels read
// them (contiguous; the other vectors are checked contiguous).
void make_readable(AdamSet& set) {
  set.index = set.index.contiguous();
  set.base = set.base.contiguous();
}

// check::adamw_no_overlap over the sets' own arguments.
void check_no_overlap(const char* op, const std::vector<AdamSet>& sets, const std::vector<const AdamNames*>& names) {
  std::vector<check::AdamTensors> refs;
  refs.reserve(sets.size());
  for (const AdamSet& t : sets) {
    refs.push_back({&t.weight, &t.index, &t.base, &t.delta, &t.grad, &t.exp_avg, &t.exp_avg_sq});
  }
  check::adamw_no_overlap(op, refs, names);
}

// Python-float arithmetic (double) as in torch.optim / sara_kernels.reference, then the fp32
// rounding the tensor ops apply to their scalar arguments.
AdamScalars adam_scalars(double step, double lr, double beta1, double beta2, double eps, double weight_decay,
                         bool maximize) {
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
  return s;
}

void sparse_adamw_cuda(const at::Tensor& weight, const at::Tensor& index_in, const at::Tensor& base_in,
                       const at::Tensor& delta, const at::Tensor& grad_in, const at::Tensor& exp_avg,
                       const at::Tensor& exp_avg_sq, double step, double lr, double beta1, double beta2, double eps,
                       double weight_decay, bool maximize) {
  const char* op = "sparse_adamw_";
  static const AdamNames names{};
  AdamSet set = checked_adam_set(op, names, weight, index_in, base_in, delta, grad_in, exp_avg, exp_avg_sq);
  check_cuda(op, "weight", weight);
  check_no_overlap(op, {set}, {&names});
  make_readable(set);
  check::step(op, "step", step);
  check::adamw_hyper(op, lr, beta1, beta2, eps, weight_decay);
  check::record("sparse_adamw_", 2);
  check::bump_versions({&weight, &delta, &exp_avg, &exp_avg_sq});
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t k = set.index.numel();
  if (k == 0) return;
  const at::Tensor& index = set.index;
  const at::Tensor& base = set.base;
  const at::Tensor& grad = set.grad;
  validate_index(op, index, weight.numel());
  const AdamScalars s = adam_scalars(step, lr, beta1, beta2, eps, weight_decay, maximize);

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

// Launches over the sets listed in `order` (all of one weight dtype, index dtype and alignment),
// kMultiMaxSets at a time.
template <typename weight_t, typename index_t, bool kVec>
void launch_multi(const std::vector<AdamSet>& sets, const std::vector<AdamScalars>& scalars,
                  const std::vector<size_t>& order, const AdamScalars& common, bool check, cudaStream_t stream) {
  size_t next = 0;
  while (next < order.size()) {
    MultiAdamSets args{};
    int64_t blocks = 0;
    int count = 0;
    for (; next < order.size() && count < kMultiMaxSets; ++next) {
      const AdamSet& set = sets[order[next]];
      const int64_t k = set.index.numel();
      const int64_t need = ceil_div(k, kEntriesPerBlock);
      if (count > 0 && blocks + need > INT32_MAX) break;  // the grid's x dimension
      TORCH_CHECK(need <= INT32_MAX, "sara_kernels.sparse_adamw_multi_: a set of ", num(k),
                  " entries is too large for one launch");
      args.weight[count] = set.weight.data_ptr();
      args.index[count] = set.index.data_ptr();
      args.base[count] = set.base.data_ptr();
      args.delta[count] = set.delta.data_ptr<float>();
      args.grad[count] = set.grad.data_ptr<float>();
      args.exp_avg[count] = set.exp_avg.data_ptr<float>();
      args.exp_avg_sq[count] = set.exp_avg_sq.data_ptr<float>();
      args.numel[count] = set.weight.numel();
      args.k[count] = k;
      args.neg_step_size[count] = scalars[order[next]].neg_step_size;
      args.inv_bc2_sqrt[count] = scalars[order[next]].inv_bc2_sqrt;
      args.block_start[count] = blocks;
      blocks += need;
      ++count;
    }
    args.block_start[count] = blocks;
    args.count = count;
    const dim3 grid(static_cast<unsigned int>(blocks));
    if (check) {
      sparse_adamw_multi_kernel<weight_t, index_t, kVec, true><<<grid, kThreads, 0, stream>>>(args, common);
    } else {
      sparse_adamw_multi_kernel<weight_t, index_t, kVec, false><<<grid, kThreads, 0, stream>>>(args, common);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void sparse_adamw_multi_cuda(at::TensorList weights, at::TensorList indices, at::TensorList bases,
                             at::TensorList deltas, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::ArrayRef<double> steps, double lr, double beta1,
                             double beta2, double eps, double weight_decay, bool maximize) {
  const char* op = "sparse_adamw_multi_";
  const size_t n = weights.size();
  check::adamw_lists(op, weights, indices, bases, deltas, grads, exp_avgs, exp_avg_sqs, steps);
  check::adamw_hyper(op, lr, beta1, beta2, eps, weight_decay);
  check::record("sparse_adamw_multi_", 2);
  if (n == 0) return;
  const at::Device device = weights[0].device();
  std::vector<AdamSet> sets;
  std::vector<AdamScalars> scalars;
  std::vector<const AdamNames*> names;
  sets.reserve(n);
  scalars.reserve(n);
  names.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    names.push_back(&AdamNames::at(i));
    sets.push_back(checked_adam_set(op, *names[i], weights[i], indices[i], bases[i], deltas[i], grads[i], exp_avgs[i],
                                    exp_avg_sqs[i]));
    TORCH_CHECK(weights[i].device() == device, check::prefix(op), names[i]->weight, " is on ",
                weights[i].device().str(), " but weights[0] is on ", device.str(), "; all tensors must be on one device");
    check_cuda(op, names[i]->weight.c_str(), weights[i]);
    check::step(op, "steps[" + std::to_string(i) + "]", steps[i]);
    scalars.push_back(adam_scalars(steps[i], lr, beta1, beta2, eps, weight_decay, maximize));
  }
  check_no_overlap(op, sets, names);
  for (AdamSet& set : sets) {
    make_readable(set);
    check::bump_versions({&set.weight, &set.delta, &set.exp_avg, &set.exp_avg_sq});
  }
  const c10::cuda::CUDAGuard guard(device);
  const IndexCheckMode mode = index_check_mode();
  if (mode == IndexCheckMode::kSync) {
    for (size_t i = 0; i < n; ++i) validate_index(op, sets[i].index, sets[i].weight.numel(), names[i]->index);
  }
  // Sets grouped by what the kernel is compiled for: weight dtype, index dtype, float4 alignment.
  std::map<std::tuple<int, int, bool>, std::vector<size_t>> groups;
  for (size_t i = 0; i < n; ++i) {
    const AdamSet& set = sets[i];
    if (set.index.numel() == 0) continue;
    const bool vec = aligned16(set.delta.data_ptr()) && aligned16(set.grad.data_ptr()) &&
                     aligned16(set.exp_avg.data_ptr()) && aligned16(set.exp_avg_sq.data_ptr());
    groups[{static_cast<int>(set.weight.scalar_type()), static_cast<int>(set.index.scalar_type()), vec}].push_back(i);
  }
  const AdamScalars common = scalars.empty() ? AdamScalars{} : scalars[0];  // per-set fields are overridden
  const bool check = mode == IndexCheckMode::kAsync;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (const auto& [key, order] : groups) {
    const auto weight_type = static_cast<at::ScalarType>(std::get<0>(key));
    const auto index_type = static_cast<at::ScalarType>(std::get<1>(key));
    const bool vec = std::get<2>(key);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight_type, "sara_kernels_sparse_adamw_multi_", [&] {
      using weight_t = scalar_t;
      AT_DISPATCH_INDEX_TYPES(index_type, "sara_kernels_sparse_adamw_multi_index", [&] {
        if (vec) {
          launch_multi<weight_t, index_t, true>(sets, scalars, order, common, check, stream);
        } else {
          launch_multi<weight_t, index_t, false>(sets, scalars, order, common, check, stream);
        }
      });
    });
  }
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

void scatter_merge_cuda(const at::Tensor& weight, const at::Tensor& index_in, const at::Tensor& base_in,
                        const at::Tensor& delta_in, double alpha) {
  const char* op = "scatter_merge_";
  check::weight_side(op, weight, index_in, base_in);
  check::compact(op, "delta", delta_in, index_in, check::Dtypes::kFp32OrFp64);
  check::same_device(op, {{"weight", &weight}, {"index", &index_in}, {"base", &base_in}, {"delta", &delta_in}});
  check::no_overlap(op, {{"weight", &weight, true}, {"index", &index_in, false}, {"base", &base_in, false},
                         {"delta", &delta_in, false}});
  check::finite(op, "alpha", alpha);
  check::index_meta(op, "index", index_in, weight.numel());
  check_cuda(op, "weight", weight);
  check::record("scatter_merge_", 2);
  check::bump_versions({&weight});
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor index = index_in.contiguous();
  const int64_t k = index.numel();
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
  check::weight_side(op, weight, index_in, base_in);
  check::same_device(op, {{"weight", &weight}, {"index", &index_in}, {"base", &base_in}});
  check::no_overlap(op, {{"weight", &weight, true}, {"index", &index_in, false}, {"base", &base_in, false}});
  check::index_meta(op, "index", index_in, weight.numel());
  check_cuda(op, "weight", weight);
  check::record("restore_", 2);
  check::bump_versions({&weight});
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor index = index_in.contiguous();
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

TORCH_LIBRARY_IMPL(sara_kernels, CUDA, m) {
  m.impl("sparse_adamw_", TORCH_FN(sara_kernels_cuda::sparse_adamw_cuda));
  m.impl("sparse_adamw_multi_", TORCH_FN(sara_kernels_cuda::sparse_adamw_multi_cuda));
  m.impl("scatter_merge_", TORCH_FN(sara_kernels_cuda::scatter_merge_cuda));
  m.impl("restore_", TORCH_FN(sara_kernels_cuda::restore_cuda));
}
