// sampled_weight_grad_linear on the CPU: (grad_out^T x).view(-1)[index] without the dense
// [out, in] weight gradient.
//
// Entry j is sum_n grad_out[n, r_j] * x[n, c_j] with (r_j, c_j) = divmod(index[j], in). Two
// algorithms (variant 1 / 2), both with transient memory bounded by kWorkspaceBytes (32 MiB):
//
// direct (1): per chunk of nb tokens, transpose grad_out and x to feature-major [out, nb] and
//   [in, nb] (accumulation dtype), then each selected entry is one contiguous SIMD dot product of
//   two length-nb rows, parallel over entries (each entry owned by one thread: no races),
//   accumulated across token chunks. Cost: N*(out+in) converts + k*N multiply-adds; memory
//   (out+in)*nb*4 bytes. Its dot products reuse no registers across entries, so per
//   multiply-add it is ~8x slower than a GEMM (measured below); it wins at low density.
// gemm (2): for each block of rb consecutive output rows that holds selected entries (blocks start
//   at the next entry's row, so empty rows between blocks cost nothing), W[rb, in] =
//   grad_out[:, rows]^T x with at::mm (MKL/oneDNN sgemm), accumulated over token chunks with
//   addmm_ when fp16/bf16 inputs must be converted to fp32 in bounded chunks, then gather the
//   block's entries. Cost: rows_spanned*in*N multiply-adds at GEMM speed, independent of k;
//   memory rb*in*4 (+ conversion buffers) <= 32 MiB.
// auto (0): gemm when the density of the selected entries over the row span they cover exceeds a
//   crossover measured with benchmarks/bench_cpu_kernels.py (see kGemmDensity below).
#include "common.h"

#include <vector>

namespace sara_kernels_cpu {
namespace {

constexpr const char* kOp = "sampled_weight_grad_linear";

// Auto crossover, measured on this 2-core AMD EPYC (Zen 3, AVX2, shared VM) with
// benchmarks/bench_cpu_kernels.py, fp32, N = 512 tokens, median ms, direct / gemm:
//   density     0.1%        1%          5.8%        20%          50%
//   320x320     0.25/0.77   0.31/0.75   0.56/0.77   1.25/0.85    2.6/0.87
//   640x640     0.60/2.9    0.82/2.5    1.45/2.9    4.1/2.8      9.9/3.3
//   1280x1280   0.99/9.6    1.95/9.5    5.5/10.3    17.7/11.5    36.9/11.1
// Direct is ~linear in density (a per-entry dot product costs ~8x a GEMM multiply-add); the
// linear fits meet gemm at 11% (320), 12.6% (640) and 11.3% (1280). Both scale with N, so the
// crossover does not depend on it.
constexpr double kGemmDensity = 0.12;

// Feature block [f0, f1) of src [m, F] (row stride F) into dst [F, m] (row stride m), converted to
// the accumulation dtype; 32x32 tiles keep both sides in L1.
constexpr int64_t kTile = 32;

template <typename scalar_t, typename acc_t>
void transpose_block(const scalar_t* src, int64_t m, int64_t F, acc_t* dst, int64_t f0, int64_t f1) {
  for (int64_t t0 = 0; t0 < m; t0 += kTile) {
    const int64_t t1 = std::min(m, t0 + kTile);
    for (int64_t f = f0; f < f1; ++f) {
      acc_t* d = dst + f * m;
      for (int64_t t = t0; t < t1; ++t) d[t] = static_cast<acc_t>(src[t * F + f]);
    }
  }
}

template <typename acc_t>
SARA_HOT_CLONES acc_t dot(const acc_t* __restrict a, const acc_t* __restrict b, int64_t m) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t t = 0; t < m; ++t) s += a[t] * b[t];
  return s;
}

template <typename scalar_t, typename index_t>
void grad_direct(const at::Tensor& grad_out,  // [N, out]
                 const at::Tensor& x,         // [N, in]
                 const index_t* idx, int64_t k, int64_t out_f, int64_t in_f,
                 at::Tensor& result) {  // [k] accumulation dtype (written, not read, by chunk 0)
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0);
  const int64_t per_token = (out_f + in_f) * static_cast<int64_t>(sizeof(acc_t));
  const int64_t nb = std::clamp<int64_t>(workspace_bytes() / per_token, 1, N);
  at::Tensor ws = at::empty({(out_f + in_f) * nb}, result.options());
  acc_t* gt = ws.data_ptr<acc_t>();  // [out, m]
  acc_t* xt = gt + out_f * nb;       // [in, m]
  acc_t* out = result.data_ptr<acc_t>();
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t m = std::min(nb, N - n0);
    // Both transposes in one parallel region (one pool wake-up, not two: on 2 cores each costs
    // ~20-50 us, comparable to the whole call at 0.1% density).
    const int64_t bg = (out_f + kTile - 1) / kTile, bx = (in_f + kTile - 1) / kTile;
    const scalar_t* gs = g + n0 * out_f;
    const scalar_t* xs = xp + n0 * in_f;
    at::parallel_for(0, bg + bx, std::max<int64_t>(1, 16384 / (kTile * m)), [&](int64_t b, int64_t e) {
      for (int64_t fb = b; fb < e; ++fb) {
        if (fb < bg) {
          transpose_block(gs, m, out_f, gt, fb * kTile, std::min(out_f, (fb + 1) * kTile));
        } else {
          const int64_t f0 = (fb - bg) * kTile;
          transpose_block(xs, m, in_f, xt, f0, std::min(in_f, f0 + kTile));
        }
      }
    });
    const int64_t grain = std::max<int64_t>(1, 16384 / m);
    at::parallel_for(0, k, grain, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        const int64_t flat = static_cast<int64_t>(idx[j]);
        const int64_t r = flat / in_f, c = flat - r * in_f;
        const acc_t sum = dot<acc_t>(gt + r * m, xt + c * m, m);
        out[j] = n0 == 0 ? sum : out[j] + sum;
      }
    });
  }
}

template <typename scalar_t, typename index_t>
void grad_gemm(const at::Tensor& grad_out,  // [N, out]
               const at::Tensor& x,         // [N, in]
               const index_t* idx, int64_t k, int64_t out_f, int64_t in_f,
               at::Tensor& result) {  // [k] accumulation dtype
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0);
  const auto acc = result.scalar_type();
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;  // fp16/bf16 -> fp32 in chunks
  const int64_t esz = static_cast<int64_t>(sizeof(acc_t));
  // Half the budget for the row block, half for the fp32 copies of a token chunk (fp16/bf16).
  const int64_t budget = convert ? workspace_bytes() / 2 : workspace_bytes();
  const int64_t rb = std::clamp<int64_t>(budget / (in_f * esz), 1, out_f);
  const int64_t nb = convert ? std::clamp<int64_t>(budget / ((in_f + rb) * esz), 1, N) : N;
  at::Tensor ws = at::empty({rb * in_f}, result.options());
  // With one token chunk, x is converted once, not once per row block.
  at::Tensor x_whole = (convert && nb == N) ? x.to(acc) : at::Tensor();
  at::Tensor x_buf = (convert && nb < N) ? at::empty({nb, in_f}, result.options()) : at::Tensor();
  at::Tensor g_buf = convert ? at::empty({nb * rb}, result.options()) : at::Tensor();
  acc_t* out = result.data_ptr<acc_t>();
  const acc_t* w = ws.const_data_ptr<acc_t>();

  int64_t j0 = 0;
  while (j0 < k) {
    const int64_t r0 = static_cast<int64_t>(idx[j0]) / in_f;
    const int64_t r1 = std::min(out_f, r0 + rb);
    const int64_t rows = r1 - r0;
    // First entry past this row block (index is sorted).
    const index_t* end = std::lower_bound(idx + j0, idx + k, static_cast<index_t>(r1 * in_f));
    const int64_t j1 = end - idx;
    at::Tensor block = ws.narrow(0, 0, rows * in_f).view({rows, in_f});
    for (int64_t n0 = 0; n0 < N; n0 += nb) {
      const int64_t m = std::min(nb, N - n0);
      at::Tensor gc = grad_out.narrow(0, n0, m).narrow(1, r0, rows);  // [m, rows]
      at::Tensor xc = x.narrow(0, n0, m);                             // [m, in]
      if (convert) {
        at::Tensor gb = g_buf.narrow(0, 0, m * rows).view({m, rows});
        gb.copy_(gc);
        gc = gb;
        if (x_whole.defined()) {
          xc = x_whole;
        } else {
          at::Tensor xb = x_buf.narrow(0, 0, m);
          xb.copy_(xc);
          xc = xb;
        }
      }
      if (n0 == 0) {
        at::mm_out(block, gc.t(), xc);
      } else {
        block.addmm_(gc.t(), xc);
      }
    }
    at::parallel_for(j0, j1, kElementwiseGrain, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) out[j] = w[static_cast<int64_t>(idx[j]) - r0 * in_f];
    });
    j0 = j1;
  }
}

// The variant the setting forces (0: auto); tiled (3) exists only on CUDA.
int64_t forced_variant(const char* op) {
  const int64_t v = sara_kernels_check::settings().grad_variant.load(std::memory_order_relaxed);
  TORCH_CHECK_VALUE(v != 3, prefix(op), "the 'tiled' variant is a CUDA linear kernel; use auto, direct or gemm");
  return v;
}

at::Tensor sampled_weight_grad_linear_cpu(const at::Tensor& grad_out_in,  // [..., out]
                                          const at::Tensor& x_in,         // [..., in]
                                          const at::Tensor& index_in,     // [k] int32/int64
                                          int64_t out_features, int64_t in_features) {
  // The ATen ops inside (GEMMs) run below autograd: inputs that require grad must neither fail
  // (mm's out= variant refuses them) nor give an output that does.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  sara_kernels_check::linear_grad(kOp, grad_out_in, x_in, index_in, out_features, in_features);
  const int64_t variant = forced_variant(kOp);
  const at::Tensor index = check_index(kOp, index_in, out_features * in_features);
  const at::Tensor grad_out = grad_out_in.reshape({-1, out_features}).contiguous();
  const at::Tensor x = x_in.reshape({-1, in_features}).contiguous();

  sara_kernels_check::record("sampled_weight_grad_linear", 1);  // the variant, once it is chosen
  const int64_t k = index.numel();
  // Both variants write every entry, so no zero fill unless there is nothing to sum.
  at::Tensor result = at::empty({k}, x.options().dtype(accumulate_dtype(x.scalar_type())));
  if (k == 0 || x.size(0) == 0) return result.zero_();

  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), kOp, [&] {
    const index_t* idx = index.const_data_ptr<index_t>();
    int64_t v = variant;
    if (v == 0) {
      // Density over the rows the entries span (the GEMM variant's work).
      const int64_t rows = static_cast<int64_t>(idx[k - 1]) / in_features -
                           static_cast<int64_t>(idx[0]) / in_features + 1;
      const double density = static_cast<double>(k) / static_cast<double>(rows * in_features);
      v = density >= kGemmDensity ? 2 : 1;
    }
    sara_kernels_check::record("sampled_weight_grad_linear", 1, v);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
      if (v == 1) {
        grad_direct<scalar_t, index_t>(grad_out, x, idx, k, out_features, in_features, result);
      } else {
        grad_gemm<scalar_t, index_t>(grad_out, x, idx, k, out_features, in_features, result);
      }
    });
  });
  return result;
}

}  // namespace
}  // namespace sara_kernels_cpu

TORCH_LIBRARY_IMPL(sara_kernels, CPU, m) {
  m.impl("sampled_weight_grad_linear", &sara_kernels_cpu::sampled_weight_grad_linear_cpu);
}
