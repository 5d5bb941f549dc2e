// CUDA kernels of sampled_weight_grad_conv2d: the conv2d weight gradient at the selected entries
// index[j] = ((o * Cg + c) * KH + i) * KW + jw of a weight [O, Cg = C / groups, KH, KW]:
//   out[j] = sum_{n,p,q} dy[n, o, p, q] * x[n, g * Cg + c, p * sh + i * dh - ph, q * sw + jw * dw - pw]
// (g = o / (O / groups); terms outside the input are zero padding), accumulated in fp32 (fp64 for
// fp64 inputs). Any stride, padding, dilation and groups (depthwise included).
//
// variant 1 (direct): one warp per entry (8 per block); the lanes walk the output positions (p, q)
//   of one sample (coalesced dy reads, strided x reads), then the samples, and the warp reduces
//   with shuffles. Neighbouring warps hold neighbouring (sorted) entries, which share the dy plane
//   and the x plane in L1/L2. When the entries alone give too few blocks, the samples are split
//   over blockIdx.y into a [splits, k] partial buffer summed afterwards (deterministic).
// variant 2 (gemm), fp16/bf16 inputs: cuDNN's dense weight gradient in the input dtype over
//   chunks of groups / output channels (conv_gemm_lowp below), then a gather; the entries are
//   rounded once to the input dtype, exactly like the dense gradient of full fine-tuning.
// variant 2 (gemm), fp32/fp64 inputs: per group, chunks of output channels (R) x input channels
//   (Cc) x samples (B): the input chunk is unfolded with at::im2col into [B, Cc*KH*KW, P*Q] and
//   dense[R, Cc*KH*KW] += dy[b, R, P*Q] @ cols[b]^T with cuBLAS (at::addmm_), then a gather kernel
//   copies the selected entries of the chunk. Workspace: the dense chunk <= kWorkspaceBytes / 4,
//   the per-sample buffers (columns, x and dy chunks) of a sample chunk <= / 2.
// variant 0 (auto): direct below the crossover density (k / weight numel; see below), gemm above.
#include "common.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/im2col.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>

namespace sara_kernels_cuda {
namespace {

// Auto variant: direct below a density, gemm at or above it.
// fp16/bf16 (gemm = cuDNN in the input dtype, 1.02-1.36x the dense gradient): the crossover
// depends on the reduction length L = N * P * Q each entry's dot product walks. Fitted to the
// H200 run in benchmarks/results/gpu_kernels_h200.json (where the direct kernel crossed the gemm
// one: ~1.4% at L = 64, ~1% at 256, 0.44-0.53% at 512-1024, 0.25-0.36% at 2048-32768):
//   density* = kConvLowpBase + kConvLowpPerSqrtL / sqrt(L),
// which picks the faster variant in every 0.1% / 0.6% / 2.3% cell of that run.
// fp32/fp64 (gemm = im2col + fp32 GEMM, several times slower than cuDNN): a placeholder.
constexpr double kConvLowpBase = 0.0025;
constexpr double kConvLowpPerSqrtL = 0.07;
constexpr double kConvDirectMaxDensity = 0.015;

constexpr int kConvWarps = kThreads / 32;  // entries per block

struct ConvGeom {
  int64_t N, C, O, Cg, Og, KH, KW;
  int H, W, P, Q;
  int sh, sw, ph, pw, dh, dw;
};

// out: [gridDim.y, k]; slice y reduces samples [y * samples_per_split, (y + 1) * samples_per_split).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    conv_direct_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                       const index_t* __restrict__ index, int64_t k, ConvGeom s, int64_t samples_per_split,
                       acc_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * samples_per_split;
  const int64_t n_end = min(s.N, n_begin + samples_per_split);
  const int64_t numel = s.O * s.Cg * s.KH * s.KW;
  const int PQ = s.P * s.Q;
  const int64_t HW = static_cast<int64_t>(s.H) * s.W;
  // j is the same for all 32 lanes of a warp, so the shuffles below see a full warp.
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kConvWarps + warp; j < k;
       j += static_cast<int64_t>(gridDim.x) * kConvWarps) {
    acc_t acc = acc_t(0);
    const int64_t f = static_cast<int64_t>(index[j]);
    if (f >= 0 && f < numel) {  // an out-of-range entry reads nothing and yields 0
      int64_t t = f;
      const int kw = static_cast<int>(t % s.KW);
      t /= s.KW;
      const int kh = static_cast<int>(t % s.KH);
      t /= s.KH;
      const int64_t c = t % s.Cg;
      const int64_t o = t / s.Cg;
      const int64_t channel = (o / s.Og) * s.Cg + c;
      const int ih0 = kh * s.dh - s.ph;
      const int iw0 = kw * s.dw - s.pw;
      for (int64_t n = n_begin; n < n_end; ++n) {
        const scalar_t* dyp = dy + (n * s.O + o) * PQ;
        const scalar_t* xp = x + (n * s.C + channel) * HW;
        for (int pq = lane; pq < PQ; pq += 32) {
          const int p = pq / s.Q;
          const int q = pq - p * s.Q;
          const int ih = p * s.sh + ih0;
          const int iw = q * s.sw + iw0;
          if (ih >= 0 && ih < s.H && iw >= 0 && iw < s.W) {
            acc += static_cast<acc_t>(dyp[pq]) * static_cast<acc_t>(xp[ih * s.W + iw]);
          }
        }
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) out[static_cast<int64_t>(blockIdx.y) * k + j] = acc;
  }
}

// out[j] = dense[o - o_begin, (c - c0) * KH * KW + i * KW + jw] for the entries with output channel
// in [o_begin, o_begin + rows) and in-group input channel in [c0, c0 + cc); others are left alone.
template <typename dense_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    conv_gather_kernel(const dense_t* __restrict__ dense, const index_t* __restrict__ index, int64_t k, int64_t numel,
                       int64_t Cg, int64_t KK, int64_t o_begin, int64_t rows, int64_t c0, int64_t cc,
                       acc_t* __restrict__ out) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < k;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t f = static_cast<int64_t>(index[j]);
    if (f < 0 || f >= numel) continue;
    const int64_t kk = f % KK;
    const int64_t t = f / KK;
    const int64_t c = t % Cg - c0;
    const int64_t o = t / Cg - o_begin;
    if (o >= 0 && o < rows && c >= 0 && c < cc) out[j] = static_cast<acc_t>(dense[o * (cc * KK) + c * KK + kk]);
  }
}

void conv_direct(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& index, const ConvGeom& s,
                 at::Tensor& out) {
  const int64_t k = index.numel();
  const int64_t grid_x = std::min<int64_t>(ceil_div(k, kConvWarps), kMaxBlocks);
  const int64_t PQ = static_cast<int64_t>(s.P) * s.Q;
  const int64_t splits0 = choose_splits(dy, grid_x, s.N, std::max<int64_t>(1, ceil_div(2048, PQ)));
  const int64_t samples_per_split = ceil_div(s.N, splits0);
  const int64_t splits = ceil_div(s.N, samples_per_split);
  at::Tensor target = splits == 1 ? out : at::empty({splits, k}, out.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const dim3 grid(static_cast<unsigned int>(grid_x), static_cast<unsigned int>(splits));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "sara_kernels_conv_direct", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "sara_kernels_conv_direct_index", [&] {
      conv_direct_kernel<scalar_t, acc_t, index_t><<<grid, kThreads, 0, stream>>>(
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), index.data_ptr<index_t>(), k, s, samples_per_split,
          target.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (splits > 1) out.copy_(target.sum(0));
}

void conv_gemm(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& index, const ConvGeom& s,
               int64_t groups, at::Tensor& out) {
  const int64_t k = index.numel();
  const at::ScalarType acc = out.scalar_type();
  const int64_t budget = workspace_bytes() / static_cast<int64_t>(c10::elementSize(acc));  // elements
  const int64_t KK = s.KH * s.KW;
  const int64_t L = static_cast<int64_t>(s.P) * s.Q;
  const int64_t HW = static_cast<int64_t>(s.H) * s.W;
  const int64_t numel = s.O * s.Cg * KK;
  // One sample's columns [Cc * KK, L] <= budget / 4; the dense chunk [R, Cc * KK] <= budget / 4;
  // a sample chunk's columns + converted x + converted dy <= budget / 2.
  const int64_t Cc = std::min(s.Cg, std::max<int64_t>(1, (budget / 4) / (KK * L)));
  const int64_t R = std::min(s.Og, std::max<int64_t>(1, (budget / 4) / (Cc * KK)));
  const int64_t B = std::min(s.N, std::max<int64_t>(1, (budget / 2) / (Cc * KK * L + Cc * HW + R * L)));
  at::Tensor workspace = at::empty({R * Cc * KK}, out.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (int64_t grp = 0; grp < groups; ++grp) {
    for (int64_t o0 = 0; o0 < s.Og; o0 += R) {
      const int64_t r = std::min(R, s.Og - o0);
      const int64_t o_begin = grp * s.Og + o0;
      for (int64_t c0 = 0; c0 < s.Cg; c0 += Cc) {
        const int64_t cc = std::min(Cc, s.Cg - c0);
        at::Tensor dense = workspace.narrow(0, 0, r * cc * KK).view({r, cc * KK});
        dense.zero_();
        for (int64_t n0 = 0; n0 < s.N; n0 += B) {
          const int64_t b = std::min(B, s.N - n0);
          const at::Tensor xc = x.narrow(0, n0, b).narrow(1, grp * s.Cg + c0, cc).to(acc).contiguous();
          const at::Tensor cols = at::im2col(xc, {s.KH, s.KW}, {s.dh, s.dw}, {s.ph, s.pw}, {s.sh, s.sw});
          TORCH_CHECK(cols.dim() == 3 && cols.size(0) == b && cols.size(1) == cc * KK && cols.size(2) == L,
                      "sara_kernels.sampled_weight_grad_conv2d: internal error: im2col gave shape ",
                      shape(cols.sizes()), ", expected ", shape({b, cc * KK, L}));
          const at::Tensor dyc = dy.narrow(0, n0, b).narrow(1, o_begin, r).to(acc);  // [b, r, P, Q]
          for (int64_t i = 0; i < b; ++i) {
            dense.addmm_(dyc.select(0, i).reshape({r, L}), cols.select(0, i).t());
          }
        }
        AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "sara_kernels_conv_gather", [&] {
          if (acc == at::kDouble) {
            conv_gather_kernel<double, double, index_t><<<blocks_for(k), kThreads, 0, stream>>>(
                dense.data_ptr<double>(), index.data_ptr<index_t>(), k, numel, s.Cg, KK, o_begin, r, c0, cc,
                out.data_ptr<double>());
          } else {
            conv_gather_kernel<float, float, index_t><<<blocks_for(k), kThreads, 0, stream>>>(
                dense.data_ptr<float>(), index.data_ptr<index_t>(), k, numel, s.Cg, KK, o_begin, r, c0, cc,
                out.data_ptr<float>());
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
    }
  }
}

// fp16/bf16 gemm: cuDNN's own weight gradient (at::convolution_backward, weight only) in the input
// dtype, over chunks of whole groups or of output channels whose gradient fits in the workspace
// bound, then a gather. cuDNN accumulates in fp32 and rounds each entry once to the input dtype:
// the selected entries get exactly the values of the dense weight gradient that full
// fine-tuning would compute (a relative error up to 2**-8 for bf16, 2**-11 for fp16, against the
// fp32 sum), at the dense gradient's speed. The im2col path above keeps fp32 results for
// fp32/fp64 inputs (where cuDNN could take TF32 shortcuts).
void conv_gemm_lowp(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& index, const ConvGeom& s,
                    int64_t groups, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    at::Tensor& out) {
  const int64_t k = index.numel();
  const int64_t KK = s.KH * s.KW;
  const int64_t numel = s.O * s.Cg * KK;
  const int64_t elem = static_cast<int64_t>(c10::elementSize(x.scalar_type()));
  const int64_t budget = std::max<int64_t>(1, workspace_bytes() / elem);  // elements of one gradient chunk
  const int64_t group_numel = s.Og * s.Cg * KK;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto gather = [&](const at::Tensor& gw, int64_t o_begin, int64_t rows) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gw.scalar_type(), "sara_kernels_conv_gather_lowp", [&] {
      AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "sara_kernels_conv_gather_lowp_index", [&] {
        conv_gather_kernel<scalar_t, float, index_t><<<blocks_for(k), kThreads, 0, stream>>>(
            gw.data_ptr<scalar_t>(), index.data_ptr<index_t>(), k, numel, s.Cg, KK, o_begin, rows, 0, s.Cg,
            out.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  };
  if (group_numel <= budget) {
    // Runs of whole groups (all of them at once for an ordinary convolution).
    const int64_t per = std::min<int64_t>(groups, std::max<int64_t>(1, budget / group_numel));
    for (int64_t g0 = 0; g0 < groups; g0 += per) {
      const int64_t gc = std::min(per, groups - g0);
      const bool all = gc == groups;
      const at::Tensor xc = all ? x : x.narrow(1, g0 * s.Cg, gc * s.Cg);
      const at::Tensor dyc = all ? dy : dy.narrow(1, g0 * s.Og, gc * s.Og);
      const at::Tensor shape_only = at::empty({gc * s.Og, s.Cg, s.KH, s.KW}, x.options());
      const at::Tensor gw = std::get<1>(at::convolution_backward(dyc, xc, shape_only, std::nullopt, stride, padding,
                                                                 dilation, false, {0, 0}, gc, {false, true, false}))
                                .contiguous();
      gather(gw, g0 * s.Og, gc * s.Og);
    }
  } else {
    // One group's gradient exceeds the bound: chunks of its output channels.
    const int64_t R = std::min<int64_t>(s.Og, std::max<int64_t>(1, budget / (s.Cg * KK)));
    for (int64_t grp = 0; grp < groups; ++grp) {
      const at::Tensor xc = groups == 1 ? x : x.narrow(1, grp * s.Cg, s.Cg);
      for (int64_t o0 = 0; o0 < s.Og; o0 += R) {
        const int64_t r = std::min(R, s.Og - o0);
        const at::Tensor dyc = dy.narrow(1, grp * s.Og + o0, r);
        const at::Tensor shape_only = at::empty({r, s.Cg, s.KH, s.KW}, x.options());
        const at::Tensor gw = std::get<1>(at::convolution_backward(dyc, xc, shape_only, std::nullopt, stride,
                                                                   padding, dilation, false, {0, 0}, 1,
                                                                   {false, true, false}))
                                  .contiguous();
        gather(gw, grp * s.Og + o0, r);
      }
    }
  }
}

at::Tensor sampled_weight_grad_conv2d_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                           const at::Tensor& index_in, at::IntArrayRef weight_shape,
                                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                           int64_t groups) {
  // The ATen ops inside (GEMMs, cuDNN weight gradients) run below autograd: inputs that require
  // grad must neither fail (mm's out= variant refuses them) nor give an output that does.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const char* op = "sampled_weight_grad_conv2d";
  sara_kernels_check::conv2d_grad(op, grad_out_in, x_in, index_in, weight_shape, stride, padding, dilation, groups);
  check_cuda(op, "grad_out", grad_out_in);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  for (const auto v : {stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]}) {
    TORCH_CHECK_VALUE(v <= INT32_MAX, sara_kernels_check::prefix(op), "stride, padding and dilation must stay below 2**31");
  }
  int64_t variant = sara_kernels_check::settings().grad_variant.load(std::memory_order_relaxed);
  TORCH_CHECK_VALUE(variant != 3, sara_kernels_check::prefix(op),
                    "the 'tiled' variant is a linear-only kernel; use auto, direct or gemm");
  const at::Tensor grad_out = grad_out_in.contiguous(), x = x_in.contiguous();
  const int64_t O = weight_shape[0], Cg = weight_shape[1], KH = weight_shape[2], KW = weight_shape[3];
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t P = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1);
  const int64_t Q = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1);
  const int64_t P_out = P / stride[0] + 1, Q_out = Q / stride[1] + 1;
  TORCH_CHECK_VALUE(H * W <= INT32_MAX && P_out * Q_out <= INT32_MAX && KH <= INT32_MAX && KW <= INT32_MAX,
                    sara_kernels_check::prefix(op), "spatial sizes must stay below 2**31 elements per plane");
  const int64_t numel = O * Cg * KH * KW;
  const at::Tensor index = index_in.contiguous();
  sara_kernels_check::record("sampled_weight_grad_conv2d", 2);  // the variant, once it is chosen
  const int64_t k = index.numel();
  const at::ScalarType acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (k == 0) return at::empty({0}, grad_out.options().dtype(acc));
  validate_index(op, index, numel);
  if (N == 0) return at::zeros({k}, grad_out.options().dtype(acc));

  ConvGeom s;
  s.N = N;
  s.C = x.size(1);
  s.O = O;
  s.Cg = Cg;
  s.Og = O / groups;
  s.KH = KH;
  s.KW = KW;
  s.H = static_cast<int>(H);
  s.W = static_cast<int>(W);
  s.P = static_cast<int>(P_out);
  s.Q = static_cast<int>(Q_out);
  s.sh = static_cast<int>(stride[0]);
  s.sw = static_cast<int>(stride[1]);
  s.ph = static_cast<int>(padding[0]);
  s.pw = static_cast<int>(padding[1]);
  s.dh = static_cast<int>(dilation[0]);
  s.dw = static_cast<int>(dilation[1]);

  // Entries with an out-of-range index stay 0 (the gemm gather skips them).
  at::Tensor out = at::zeros({k}, grad_out.options().dtype(acc));
  if (variant == 0) {
    const double density = static_cast<double>(k) / static_cast<double>(numel);
    const bool lowp = grad_out.scalar_type() == at::kHalf || grad_out.scalar_type() == at::kBFloat16;
    const double L = static_cast<double>(N) * static_cast<double>(P_out) * static_cast<double>(Q_out);
    const double crossover = lowp ? kConvLowpBase + kConvLowpPerSqrtL / std::sqrt(std::max(L, 1.0)) : kConvDirectMaxDensity;
    variant = density < crossover ? 1 : 2;
  }
  sara_kernels_check::record("sampled_weight_grad_conv2d", 2, variant);
  if (variant == 1) {
    conv_direct(grad_out, x, index, s, out);
  } else if (grad_out.scalar_type() == at::kHalf || grad_out.scalar_type() == at::kBFloat16) {
    conv_gemm_lowp(grad_out, x, index, s, groups, stride, padding, dilation, out);
  } else {
    conv_gemm(grad_out, x, index, s, groups, out);
  }
  return out;
}

}  // namespace
}  // namespace sara_kernels_cuda

TORCH_LIBRARY_IMPL(sara_kernels, CUDA, m) {
  m.impl("sampled_weight_grad_conv2d", TORCH_FN(sara_kernels_cuda::sampled_weight_grad_conv2d_cuda));
}
