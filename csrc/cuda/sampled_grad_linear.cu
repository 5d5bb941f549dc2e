// CUDA kernels of sampled_weight_grad_linear: out[j] = sum_n grad_out[n, o_j] * x[n, c_j] for the
// selected entries index[j] = o_j * in_features + c_j (fp32 accumulation, fp64 for fp64 inputs).
//
// variant 1 (direct): an SDDMM kernel. A block of 32 x 8 threads owns 32 consecutive entries
//   (lane = entry) and splits the tokens over its 8 warps; for one token a warp reads 32 entries
//   of one grad_out row and one x row, so entries sorted by row share the grad_out value
//   (broadcast) and read neighbouring x columns (coalesced when dense). When the entries alone give
//   too few blocks to fill the GPU, the tokens are further split over blockIdx.y into a
//   [splits, k] partial buffer that is summed afterwards (deterministic; no atomics).
// variant 2 (gemm): the dense gradient in chunks of rows x columns of [out, in], each formed by
//   cuBLAS (at::mm / addmm_) in fp32 (fp64) in a workspace, then a gather kernel copies the
//   selected entries of that chunk. fp16/bf16 inputs are converted to fp32 per token chunk. The
//   dense chunk takes at most half of kWorkspaceBytes, the converted input chunks the other half.
// variant 0 (auto): direct below kLinearDirectMaxDensity (k / (out * in)), gemm above.
#include "common.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace sara_kernels_cuda {
namespace {

// Auto variant: the direct kernel below this density, gemm at or above it. A placeholder from the
// asymptotic costs (direct ~ k * N irregular loads, gemm ~ out * in * N regular FLOPs); the GPU
// benchmarks set the measured crossover.
constexpr double kLinearDirectMaxDensity = 0.015;

constexpr int kLinEntries = 32;  // entries per block (threadIdx.x)
constexpr int kLinWarps = 8;     // token slices per block (threadIdx.y)
constexpr int64_t kLinMinTokensPerSplit = 256;

// out: [gridDim.y, k]; slice y reduces tokens [y * tokens_per_split, (y + 1) * tokens_per_split).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kLinEntries* kLinWarps)
    linear_direct_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                         const index_t* __restrict__ index, int64_t k, int64_t N, int64_t O, int64_t I,
                         int64_t tokens_per_split, acc_t* __restrict__ out) {
  __shared__ acc_t partial[kLinWarps][kLinEntries + 1];
  const int lane = threadIdx.x;
  const int slice = threadIdx.y;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * tokens_per_split;
  const int64_t n_end = min(N, n_begin + tokens_per_split);
  const int64_t numel = O * I;
  // The loop bound depends on blockIdx only, so every thread of the block runs the same iterations
  // and reaches the __syncthreads() calls.
  for (int64_t group = blockIdx.x; group * kLinEntries < k; group += gridDim.x) {
    const int64_t j = group * kLinEntries + lane;
    acc_t acc = acc_t(0);
    if (j < k) {
      const int64_t f = static_cast<int64_t>(index[j]);
      if (f >= 0 && f < numel) {  // an out-of-range entry reads nothing and yields 0
        const int64_t o = f / I;
        const int64_t c = f - o * I;
        const scalar_t* g = grad_out + o;
        const scalar_t* xx = x + c;
#pragma unroll 4
        for (int64_t n = n_begin + slice; n < n_end; n += kLinWarps) {
          acc += static_cast<acc_t>(g[n * O]) * static_cast<acc_t>(xx[n * I]);
        }
      }
    }
    partial[slice][lane] = acc;
    __syncthreads();
    if (slice == 0 && j < k) {
      acc_t sum = partial[0][lane];
#pragma unroll
      for (int w = 1; w < kLinWarps; ++w) sum += partial[w][lane];
      out[static_cast<int64_t>(blockIdx.y) * k + j] = sum;
    }
    __syncthreads();
  }
}

// out[j] = dense[o - o0, c - c0] for the entries inside the chunk rows [o0, o0 + rows) x
// columns [c0, c0 + cols); other entries are left alone.
template <typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    linear_gather_kernel(const acc_t* __restrict__ dense, const index_t* __restrict__ index, int64_t k, int64_t O,
                         int64_t I, int64_t o0, int64_t rows, int64_t c0, int64_t cols, acc_t* __restrict__ out) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < k;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t f = static_cast<int64_t>(index[j]);
    if (f < 0 || f >= O * I) continue;
    const int64_t o = f / I - o0;
    const int64_t c = f % I - c0;
    if (o >= 0 && o < rows && c >= 0 && c < cols) out[j] = dense[o * cols + c];
  }
}

void linear_direct(const at::Tensor& g, const at::Tensor& x, const at::Tensor& index, int64_t O, int64_t I,
                   at::Tensor& out) {
  const int64_t k = index.numel();
  const int64_t N = g.size(0);
  const int64_t groups = ceil_div(k, kLinEntries);
  const int64_t grid_x = std::min<int64_t>(groups, kMaxBlocks);
  const int64_t splits0 = choose_splits(g, grid_x, N, kLinMinTokensPerSplit);
  const int64_t tokens_per_split = ceil_div(N, splits0);
  const int64_t splits = ceil_div(N, tokens_per_split);
  at::Tensor target = splits == 1 ? out : at::empty({splits, k}, out.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const dim3 grid(static_cast<unsigned int>(grid_x), static_cast<unsigned int>(splits));
  const dim3 block(kLinEntries, kLinWarps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sara_kernels_linear_direct", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "sara_kernels_linear_direct_index", [&] {
      linear_direct_kernel<scalar_t, acc_t, index_t><<<grid, block, 0, stream>>>(
          g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), index.data_ptr<index_t>(), k, N, O, I,
          tokens_per_split, target.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (splits > 1) out.copy_(target.sum(0));
}

void linear_gemm(const at::Tensor& g, const at::Tensor& x, const at::Tensor& index, int64_t O, int64_t I,
                 at::Tensor& out) {
  const int64_t k = index.numel();
  const int64_t N = g.size(0);
  const at::ScalarType acc = out.scalar_type();
  const bool convert = g.scalar_type() != acc;
  const int64_t budget = workspace_bytes() / static_cast<int64_t>(c10::elementSize(acc));  // elements
  // Dense chunk [rows, cols] <= budget / 2; converted input chunks T x (rows + cols) <= budget / 2.
  const int64_t cols = std::min(I, std::max<int64_t>(1, budget / 2));
  const int64_t rows = std::min(O, std::max<int64_t>(1, (budget / 2) / cols));
  const int64_t tokens = convert ? std::min(N, std::max<int64_t>(1, (budget / 2) / (rows + cols))) : N;
  at::Tensor workspace = at::empty({rows * cols}, out.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (int64_t o0 = 0; o0 < O; o0 += rows) {
    const int64_t r = std::min(rows, O - o0);
    for (int64_t c0 = 0; c0 < I; c0 += cols) {
      const int64_t cc = std::min(cols, I - c0);
      at::Tensor dense = workspace.narrow(0, 0, r * cc).view({r, cc});
      if (!convert) {
        // fp32 / fp64 inputs: cuBLAS reads the strided chunks directly.
        at::mm_out(dense, g.narrow(1, o0, r).t(), x.narrow(1, c0, cc));
      } else {
        dense.zero_();
        for (int64_t n0 = 0; n0 < N; n0 += tokens) {
          const int64_t t = std::min(tokens, N - n0);
          const at::Tensor a = g.narrow(0, n0, t).narrow(1, o0, r).to(acc);   // [t, r]
          const at::Tensor b = x.narrow(0, n0, t).narrow(1, c0, cc).to(acc);  // [t, cc]
          dense.addmm_(a.t(), b);
        }
      }
      AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "sara_kernels_linear_gather", [&] {
        if (acc == at::kDouble) {
          linear_gather_kernel<double, index_t><<<blocks_for(k), kThreads, 0, stream>>>(
              dense.data_ptr<double>(), index.data_ptr<index_t>(), k, O, I, o0, r, c0, cc, out.data_ptr<double>());
        } else {
          linear_gather_kernel<float, index_t><<<blocks_for(k), kThreads, 0, stream>>>(
              dense.data_ptr<float>(), index.data_ptr<index_t>(), k, O, I, o0, r, c0, cc, out.data_ptr<float>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
}

at::Tensor sampled_weight_grad_linear_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& index_in, int64_t out_features, int64_t in_features,
                                           int64_t variant) {
  const char* op = "sampled_weight_grad_linear";
  check_cuda(op, "grad_out", grad_out, grad_out.device());
  const c10::cuda::CUDAGuard guard(grad_out.device());
  check_cuda(op, "x", x, grad_out.device());
  check_float_dtype(op, "grad_out", grad_out);
  check_dtype(op, "x", x, grad_out.scalar_type());
  check_dim(op, "grad_out", grad_out, 2);
  check_dim(op, "x", x, 2);
  check_contiguous(op, "grad_out", grad_out);
  check_contiguous(op, "x", x);
  TORCH_CHECK_VALUE(out_features > 0 && in_features > 0, "sara_kernels_C.", op, ": out_features=", out_features,
                    " and in_features=", in_features, " must be positive");
  TORCH_CHECK_VALUE(grad_out.size(1) == out_features, "sara_kernels_C.", op, ": grad_out has shape ",
                    grad_out.sizes(), "; its last dim must be out_features=", out_features);
  TORCH_CHECK_VALUE(x.size(1) == in_features, "sara_kernels_C.", op, ": x has shape ", x.sizes(),
                    "; its last dim must be in_features=", in_features);
  TORCH_CHECK_VALUE(x.size(0) == grad_out.size(0), "sara_kernels_C.", op, ": grad_out ", grad_out.sizes(),
                    " and x ", x.sizes(), " must have the same number of rows (tokens)");
  TORCH_CHECK_VALUE(variant >= 0 && variant <= 2, "sara_kernels_C.", op, ": variant=", variant,
                    " must be 0 (auto), 1 (direct) or 2 (gemm)");
  const int64_t numel = out_features * in_features;
  const at::Tensor index = checked_index(op, index_in, grad_out.device(), numel);
  const int64_t k = index.numel();
  const at::ScalarType acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (k == 0) return at::empty({0}, grad_out.options().dtype(acc));
  validate_index(op, index, numel);
  if (grad_out.size(0) == 0) return at::zeros({k}, grad_out.options().dtype(acc));
  // Entries with an out-of-range index stay 0 (the gemm gather skips them).
  at::Tensor out = at::zeros({k}, grad_out.options().dtype(acc));
  if (variant == 0) {
    const double density = static_cast<double>(k) / static_cast<double>(numel);
    variant = density < kLinearDirectMaxDensity ? 1 : 2;
  }
  if (variant == 1) {
    linear_direct(grad_out, x, index, out_features, in_features, out);
  } else {
    linear_gemm(grad_out, x, index, out_features, in_features, out);
  }
  return out;
}

}  // namespace
}  // namespace sara_kernels_cuda

TORCH_LIBRARY_IMPL(sara_kernels_C, CUDA, m) {
  m.impl("sampled_weight_grad_linear", TORCH_FN(sara_kernels_cuda::sampled_weight_grad_linear_cuda));
}
