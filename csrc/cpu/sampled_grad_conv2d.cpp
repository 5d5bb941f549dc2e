// sampled_weight_grad_conv2d on the CPU: the weight gradient of F.conv2d at the selected entries,
// for any stride / padding / dilation / groups (depthwise included), without the dense gradient.
//
// Shapes: grad_out dy [N, O, P, Q], x [N, C, H, W], weight [O, Cg, kh, kw] with Cg = C / groups,
// Og = O / groups. Entry (o, c, i, j) of the gradient is
//   sum_{n, p, q} dy[n, o, p, q] * x[n, g*Cg + c, p*s0 + i*d0 - pad0, q*s1 + j*d1 - pad1],  g = o / Og,
// over the (p, q) where the x coordinate is inside the image. Two algorithms, both with transient
// memory bounded by kWorkspaceBytes (32 MiB):
//
// direct (1): per selected entry, loop over n and the output rows p whose input row is valid, and
//   over the valid q range (both computed analytically, no bounds test in the inner loop): a SIMD
//   dot product of dy[n, o, p, q_lo:q_hi] with x[n, ch, row, q*s1 + off] (contiguous for s1 = 1).
//   Parallel over entries (each owned by one thread); index order keeps the kh*kw entries of one
//   (o, c) pair, which read the same two planes, next to each other. Cost: k * N * P * Q
//   multiply-adds at dot-product speed; no workspace for fp32/fp64 (fp16/bf16 samples are
//   converted to fp32 a bounded chunk at a time).
// gemm (2): the dense weight gradient of a block of output channels, from
//   at::convolution_backward (weight gradient only: oneDNN on fp32, ~1.7x faster here than
//   at::im2col + at::mm, whose im2col alone cost as much as oneDNN's whole backward at
//   64->64 32x32), then gather the block's entries. Blocks are runs of whole groups (depthwise
//   included, one call for many groups) while one group's gradient fits in half the budget, else
//   rows of one group (and input-channel slices if one row does not fit); samples go in chunks
//   whose fp32 copies (fp16/bf16, strided slices) and column buffers fit the other half. Cost:
//   the dense backward of the spanned channels (2 * rows * Cg*kh*kw * P*Q * N flops), independent
//   of k; our transient memory: the block gradient + one chunk of copies <= kWorkspaceBytes.
// auto (0): gemm when the density of the entries over the output channels they span exceeds a
//   crossover measured with benchmarks/bench_cpu_kernels.py (kGemmDensity below), direct for
//   depthwise-like layers (kGemmMinCols).
#include "common.h"

#include <vector>

namespace sara_kernels_cpu {
namespace {

constexpr const char* kOp = "sampled_weight_grad_conv2d";

// Auto crossover, measured on this 2-core AMD EPYC (Zen 3, AVX2, shared VM) with
// benchmarks/bench_cpu_kernels.py, batch 2, 3x3, stride 1, padding 1, fp32, median ms,
// direct / gemm:
//   density           0.1%         1%          5.8%        20%          50%
//   64->64 16x16      0.021/0.39   0.062/0.44  0.30/0.45   1.12/0.46    2.77/0.58
//   64->64 32x32      0.046/1.58   0.17/1.9    0.95/2.2    2.28/1.61    6.2/1.58
//   128->128 16x16    0.034/1.22   0.31/1.79   1.6/1.7     5.6/1.96     10.9/1.57
//   128->128 32x32    0.11/7.2     0.67/7.3    3.8/7.1     12.9/7.1     31.3/8.5
// The linear fits of direct meet gemm at 8%, 14%, 6% and 11%: 10% splits the difference (within
// ~1.3x of the better variant on each shape).
constexpr double kGemmDensity = 0.10;
// Depthwise-like layers (fewer than this many columns Cg*kh*kw per group): direct at any density.
// Their dense gradient costs as many multiply-adds as direct at 100% density and the backend's
// grouped backward is slower per multiply-add (128-channel depthwise 3x3 at 32x32, batch 2:
// direct 0.28 ms at 50% vs dense backward 0.41 ms).
constexpr int64_t kGemmMinCols = 32;

struct Geometry {
  int64_t N, C, H, W;     // x
  int64_t O, P, Q;        // dy
  int64_t Cg, Og, kh, kw; // weight [O, Cg, kh, kw]
  int64_t s0, s1, p0, p1, d0, d1, groups;
};

// [lo, hi) of output positions p with 0 <= p*s + t*d - pad < size.
inline void valid_range(int64_t size, int64_t out, int64_t s, int64_t t, int64_t d, int64_t pad,
                        int64_t& lo, int64_t& hi) {
  const int64_t a = pad - t * d;  // p*s - a must lie in [0, size)
  lo = a <= 0 ? 0 : (a + s - 1) / s;
  hi = (size - 1 + a) >= 0 ? (size - 1 + a) / s + 1 : 0;
  hi = std::min(hi, out);
  if (hi < lo) hi = lo;
}

// The direct sum of one entry over m samples of fp32/fp64 planes dy [m, O, P, Q], x [m, C, H, W].
template <typename acc_t>
SARA_HOT_CLONES acc_t entry_sum(const acc_t* __restrict dy, const acc_t* __restrict x, int64_t m,
                                const Geometry& g, int64_t o, int64_t ch, int64_t i, int64_t j) {
  int64_t p_lo, p_hi, q_lo, q_hi;
  valid_range(g.H, g.P, g.s0, i, g.d0, g.p0, p_lo, p_hi);
  valid_range(g.W, g.Q, g.s1, j, g.d1, g.p1, q_lo, q_hi);
  const int64_t len = q_hi - q_lo;
  if (len <= 0 || p_hi <= p_lo) return 0;
  const int64_t row_off = i * g.d0 - g.p0;              // x row = p*s0 + row_off
  const int64_t col0 = q_lo * g.s1 + j * g.d1 - g.p1;  // x col of q_lo
  const int64_t s1 = g.s1;
  acc_t s = 0;
  for (int64_t n = 0; n < m; ++n) {
    const acc_t* dyp = dy + (n * g.O + o) * g.P * g.Q + q_lo;
    const acc_t* xp = x + (n * g.C + ch) * g.H * g.W + col0;
    for (int64_t p = p_lo; p < p_hi; ++p) {
      const acc_t* a = dyp + p * g.Q;
      const acc_t* b = xp + (p * g.s0 + row_off) * g.W;
      if (s1 == 1) {
#pragma omp simd reduction(+ : s)
        for (int64_t q = 0; q < len; ++q) s += a[q] * b[q];
      } else {
#pragma omp simd reduction(+ : s)
        for (int64_t q = 0; q < len; ++q) s += a[q] * b[q * s1];
      }
    }
  }
  return s;
}

template <typename scalar_t, typename index_t>
void grad_direct(const at::Tensor& grad_out,  // [N, O, P, Q]
                 const at::Tensor& x,         // [N, C, H, W]
                 const index_t* idx, int64_t k, const Geometry& g,
                 at::Tensor& result) {  // [k] accumulation dtype (written, not read, by chunk 0)
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t x_sample = g.C * g.H * g.W, dy_sample = g.O * g.P * g.Q;
  const int64_t nb = convert ? std::clamp<int64_t>(workspace_bytes() / ((x_sample + dy_sample) *
                                                                      int64_t{sizeof(acc_t)}),
                                                   1, g.N)
                             : g.N;
  acc_t* out = result.data_ptr<acc_t>();
  for (int64_t n0 = 0; n0 < g.N; n0 += nb) {
    const int64_t m = std::min(nb, g.N - n0);
    at::Tensor xc = x.narrow(0, n0, m), dyc = grad_out.narrow(0, n0, m);
    if (convert) {  // bounded fp32 copies of this chunk of samples
      xc = xc.to(result.scalar_type());
      dyc = dyc.to(result.scalar_type());
    }
    const acc_t* xp = xc.const_data_ptr<acc_t>();
    const acc_t* dyp = dyc.const_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, m * g.P * g.Q));
    at::parallel_for(0, k, grain, [&](int64_t b, int64_t e) {
      for (int64_t jj = b; jj < e; ++jj) {
        int64_t f = static_cast<int64_t>(idx[jj]);
        const int64_t j = f % g.kw;
        f /= g.kw;
        const int64_t i = f % g.kh;
        f /= g.kh;
        const int64_t c = f % g.Cg;
        const int64_t o = f / g.Cg;
        const int64_t ch = (o / g.Og) * g.Cg + c;
        const acc_t sum = entry_sum<acc_t>(dyp, xp, m, g, o, ch, i, j);
        out[jj] = n0 == 0 ? sum : out[jj] + sum;
      }
    });
  }
}

template <typename scalar_t, typename index_t>
void grad_gemm(const at::Tensor& grad_out,  // [N, O, P, Q]
               const at::Tensor& x,         // [N, C, H, W]
               const index_t* idx, int64_t k, const Geometry& g,
               at::Tensor& result) {  // [k] accumulation dtype
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = result.scalar_type();
  const int64_t esz = static_cast<int64_t>(sizeof(acc_t));
  const int64_t khw = g.kh * g.kw, L = g.P * g.Q, Kc = g.Cg * khw;
  const int64_t half = workspace_bytes() / 2;
  // Blocks: runs of whole groups while one group's gradient [Og, Cg, kh, kw] fits in half the
  // budget (always, for UNet layers: 1280x1280x3x3 fp32 is 59 MB, so 227 rows at a time);
  // otherwise rows of one group, and input-channel slices when even one row is too large.
  const bool whole_groups = g.Og * Kc * esz <= half;
  const int64_t gb = whole_groups ? std::clamp<int64_t>(half / (g.Og * Kc * esz), 1, g.groups) : 1;
  const int64_t cb = whole_groups ? g.Cg : std::clamp<int64_t>(half / (khw * esz), 1, g.Cg);
  const int64_t ob = whole_groups ? gb * g.Og : std::clamp<int64_t>(half / (cb * khw * esz), 1, g.Og);
  acc_t* out = result.data_ptr<acc_t>();

  int64_t j0 = 0;
  while (j0 < k) {
    const int64_t o_first = static_cast<int64_t>(idx[j0]) / Kc;
    int64_t o0, o1, groups_in;
    if (whole_groups) {
      const int64_t g0 = o_first / g.Og, g1 = std::min(g.groups, g0 + gb);
      o0 = g0 * g.Og, o1 = g1 * g.Og, groups_in = g1 - g0;
    } else {
      o0 = o_first, o1 = std::min((o_first / g.Og + 1) * g.Og, o0 + ob), groups_in = 1;
    }
    const int64_t rows = o1 - o0;
    const int64_t j1 = std::lower_bound(idx + j0, idx + k, static_cast<index_t>(o1 * Kc)) - idx;
    for (int64_t c0 = 0; c0 < g.Cg; c0 += cb) {
      const int64_t cn = std::min(cb, g.Cg - c0);
      // Skip input-channel slices without entries (only when a group is split).
      bool any = cn == g.Cg;
      for (int64_t j = j0; j < j1 && !any; ++j) {
        const int64_t c = (static_cast<int64_t>(idx[j]) % Kc) / khw;
        any = c >= c0 && c < c0 + cn;
      }
      if (!any) continue;
      // x channels of the block: groups_in whole groups (then cn == Cg), or a slice of one group.
      const int64_t x_c0 = (o0 / g.Og) * g.Cg + c0, x_cn = groups_in * cn;
      // Per sample: fp32 copies of x and dy (fp16/bf16, or strided slices), and the column
      // buffer the convolution backend may unfold into.
      const int64_t per_sample = (x_cn * g.H * g.W + rows * L + x_cn * khw * L) * esz;
      const int64_t nb = std::clamp<int64_t>(half / per_sample, 1, g.N);
      // convolution_backward reads only the weight's shape when it computes the weight gradient.
      at::Tensor weight_shape_only = at::empty({rows, cn, g.kh, g.kw}, result.options());
      at::Tensor block;  // [rows, cn, kh, kw]
      for (int64_t n0 = 0; n0 < g.N; n0 += nb) {
        const int64_t m = std::min(nb, g.N - n0);
        at::Tensor xc = x.narrow(0, n0, m).narrow(1, x_c0, x_cn).to(acc);
        at::Tensor dyc = grad_out.narrow(0, n0, m).narrow(1, o0, rows).to(acc);
        at::Tensor gw = std::get<1>(at::convolution_backward(
            dyc, xc, weight_shape_only, std::nullopt, {g.s0, g.s1}, {g.p0, g.p1}, {g.d0, g.d1},
            /*transposed=*/false, /*output_padding=*/{0, 0}, groups_in, {false, true, false}));
        if (n0 == 0) {
          block = gw.contiguous();
        } else {
          block.add_(gw);
        }
      }
      const int64_t cols_n = cn * khw;
      const acc_t* w = block.const_data_ptr<acc_t>();
      if (cn == g.Cg) {
        // The block is rows [o0, o1) of the flat weight: a plain offset, no integer divisions
        // (three 64-bit divisions per entry cost ~1 ms for 147k entries on this CPU).
        at::parallel_for(j0, j1, kElementwiseGrain, [&](int64_t b, int64_t e) {
          for (int64_t j = b; j < e; ++j) out[j] = w[static_cast<int64_t>(idx[j]) - o0 * Kc];
        });
      } else {
        at::parallel_for(j0, j1, kElementwiseGrain, [&](int64_t b, int64_t e) {
          for (int64_t j = b; j < e; ++j) {
            const int64_t f = static_cast<int64_t>(idx[j]);
            const int64_t o = f / Kc, rest = f - o * Kc;  // rest = c*khw + i*kw + j
            const int64_t c = rest / khw;
            if (c >= c0 && c < c0 + cn) out[j] = w[(o - o0) * cols_n + rest - c0 * khw];
          }
        });
      }
    }
    j0 = j1;
  }
}

at::Tensor sampled_weight_grad_conv2d_cpu(const at::Tensor& grad_out_in,  // [N, O, P, Q]
                                          const at::Tensor& x_in,         // [N, C, H, W]
                                          const at::Tensor& index_in,     // [k] into [O, C/g, kh, kw]
                                          at::IntArrayRef weight_shape,   // [O, C/g, kh, kw]
                                          at::IntArrayRef stride,         // [2]
                                          at::IntArrayRef padding,        // [2]
                                          at::IntArrayRef dilation,       // [2]
                                          int64_t groups) {
  // The ATen ops inside (GEMMs, oneDNN weight gradients) run below autograd: inputs that require
  // grad must neither fail (mm's out= variant refuses them) nor give an output that does.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  sara_kernels_check::conv2d_grad(kOp, grad_out_in, x_in, index_in, weight_shape, stride, padding, dilation, groups);
  const int64_t variant = sara_kernels_check::settings().grad_variant.load(std::memory_order_relaxed);
  TORCH_CHECK_VALUE(variant != 3, prefix(kOp), "the 'tiled' variant is a CUDA linear kernel; use auto, direct or gemm");
  const at::Tensor grad_out = grad_out_in.contiguous(), x = x_in.contiguous();
  Geometry g{};
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.O = weight_shape[0], g.Cg = weight_shape[1], g.kh = weight_shape[2], g.kw = weight_shape[3];
  g.s0 = stride[0], g.s1 = stride[1], g.p0 = padding[0], g.p1 = padding[1];
  g.d0 = dilation[0], g.d1 = dilation[1], g.groups = groups, g.Og = g.O / groups;
  const int64_t span_h = g.H + 2 * g.p0 - g.d0 * (g.kh - 1) - 1;
  const int64_t span_w = g.W + 2 * g.p1 - g.d1 * (g.kw - 1) - 1;
  g.P = span_h / g.s0 + 1, g.Q = span_w / g.s1 + 1;
  int64_t numel = checked_mul(kOp, "weight_shape numel", g.O, g.Cg);
  numel = checked_mul(kOp, "weight_shape numel", numel, g.kh * g.kw);
  const at::Tensor index = check_index(kOp, index_in, numel);

  sara_kernels_check::record("sampled_weight_grad_conv2d", 1);  // the variant, once it is chosen
  const int64_t k = index.numel();
  // Both variants write every entry, so no zero fill unless there is nothing to sum.
  at::Tensor result = at::empty({k}, x.options().dtype(accumulate_dtype(x.scalar_type())));
  if (k == 0 || g.N == 0 || g.P * g.Q == 0) return result.zero_();

  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), kOp, [&] {
    const index_t* idx = index.const_data_ptr<index_t>();
    int64_t v = variant;
    if (v == 0) {
      const int64_t Kc = g.Cg * g.kh * g.kw;
      const int64_t channels = static_cast<int64_t>(idx[k - 1]) / Kc - static_cast<int64_t>(idx[0]) / Kc + 1;
      const double density = static_cast<double>(k) / static_cast<double>(channels * Kc);
      v = (density >= kGemmDensity && Kc >= kGemmMinCols) ? 2 : 1;
    }
    sara_kernels_check::record("sampled_weight_grad_conv2d", 1, v);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
      if (v == 1) {
        grad_direct<scalar_t, index_t>(grad_out, x, idx, k, g, result);
      } else {
        grad_gemm<scalar_t, index_t>(grad_out, x, idx, k, g, result);
      }
    });
  });
  return result;
}

}  // namespace
}  // namespace sara_kernels_cpu

TORCH_LIBRARY_IMPL(sara_kernels, CPU, m) {
  m.impl("sampled_weight_grad_conv2d", &sara_kernels_cpu::sampled_weight_grad_conv2d_cpu);
}
