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
//   selected entries of that chunk. fp16/bf16 inputs go to the tensor cores as they are with an fp32
//   result (mm.dtype_out, PyTorch >= 2.9); older PyTorch converts them to fp32 per token chunk. The
//   dense chunk takes at most half of kWorkspaceBytes, the converted input chunks the other half.
// variant 3 (tiled): see linear_tiled_kernel below: the dot products read operands staged in
//   shared memory, so global memory is read once per group of entries instead of once per entry.
// variant 0 (auto): tiled below kLinearTiledMaxDensity (k / (out * in)) on wide layers, gemm otherwise.
#include "common.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstring>

namespace sara_kernels_cuda {
namespace {

// Auto variant, from benchmarks/results/gpu_kernels_h200.json (bf16, SD1.5 shapes, CUDA-graph
// times against the dense cuBLAS gradient): the tiled kernel below kLinearTiledMaxDensity on
// layers with in_features >= kLinearTiledMinIn whose rows all fit its shared memory (1280x1280 at
// 0.1%: 0.87-0.90x dense, against 1.02-1.20x for gemm; at 0.6% it lost, 2.0x), gemm otherwise
// (0.98-1.07x dense at N = 32768 tokens, 1.07-1.6x at N = 4096 where fixed costs dominate).
// The direct kernel is never picked: 1.1-1.7x dense at 0.1% and up to 60x at 20%, since every
// entry streams its two operand columns with 2-byte gathers.
constexpr double kLinearTiledMaxDensity = 0.003;
constexpr int64_t kLinearTiledMinIn = 1024;

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
  const int64_t tokens =
      convert && !kHasMmOutDtype ? std::min(N, std::max<int64_t>(1, (budget / 2) / (rows + cols))) : N;
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
      } else if (kHasMmOutDtype) {
        // fp16 / bf16 inputs: one cuBLAS GEMM on the tensor cores with fp32 accumulation and an fp32
        // result (aten::mm.dtype_out), no converted copies of the inputs.
        mm_fp32_out(dense, g.narrow(1, o0, r).t(), x.narrow(1, c0, cc));
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

// ---------------------------------------------------------------------------------------------
// variant 3 (tiled): the entries' dot products read their operands from shared memory.
//
// A block owns a group of consecutive (sorted) entries and a slice of the tokens. For each chunk of
// kTileTokens(scalar_t) tokens it stages x[chunk, 0:I] and grad_out[chunk, rows of its entries]
// in shared memory, transposed to feature-major rows of 64 data bytes (a row = one feature over
// the chunk's tokens) padded to kTileRowBytes so that random rows spread over the banks. Each
// thread then accumulates up to kTilePerThread entries in registers, reading two 64-byte rows per
// entry with 16-byte loads. Global memory sees every x / grad_out element of the slice once per
// entry group (and the groups are sized so that their rows fit), instead of once per entry, which
// is what makes it beat the dense GEMM at low density. Partial sums over token slices go to a
// [splits, k] buffer summed afterwards (deterministic).
// ---------------------------------------------------------------------------------------------
constexpr int kTileThreads = 512;
constexpr int kTilePerThread = 16;
constexpr int64_t kTileMaxEntries = static_cast<int64_t>(kTileThreads) * kTilePerThread;
constexpr int kTileRowBytes = 80;  // 64 data bytes + 16 padding: rows start 20 words apart
constexpr int64_t kTileMinRows = 64;

template <typename scalar_t>
constexpr int tile_tokens() {
  return 64 / static_cast<int>(sizeof(scalar_t));
}

// acc += dot(a, b) over the 16 bytes of each operand.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void dot16(const uint4& a, const uint4& b, acc_t& acc);

template <>
__device__ __forceinline__ void dot16<at::BFloat16, float>(const uint4& a, const uint4& b, float& acc) {
  const uint32_t aw[4] = {a.x, a.y, a.z, a.w};
  const uint32_t bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc = fmaf(__uint_as_float(aw[i] << 16), __uint_as_float(bw[i] << 16), acc);
    acc = fmaf(__uint_as_float(aw[i] & 0xffff0000u), __uint_as_float(bw[i] & 0xffff0000u), acc);
  }
}

template <>
__device__ __forceinline__ void dot16<at::Half, float>(const uint4& a, const uint4& b, float& acc) {
  const uint32_t aw[4] = {a.x, a.y, a.z, a.w};
  const uint32_t bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 ah, bh;
    memcpy(&ah, &aw[i], 4);
    memcpy(&bh, &bw[i], 4);
    const float2 af = __half22float2(ah);
    const float2 bf = __half22float2(bh);
    acc = fmaf(af.x, bf.x, acc);
    acc = fmaf(af.y, bf.y, acc);
  }
}

template <>
__device__ __forceinline__ void dot16<float, float>(const uint4& a, const uint4& b, float& acc) {
  acc = fmaf(__uint_as_float(a.x), __uint_as_float(b.x), acc);
  acc = fmaf(__uint_as_float(a.y), __uint_as_float(b.y), acc);
  acc = fmaf(__uint_as_float(a.z), __uint_as_float(b.z), acc);
  acc = fmaf(__uint_as_float(a.w), __uint_as_float(b.w), acc);
}

template <>
__device__ __forceinline__ void dot16<double, double>(const uint4& a, const uint4& b, double& acc) {
  double a0, a1, b0, b1;
  memcpy(&a0, &a.x, 8);
  memcpy(&a1, &a.z, 8);
  memcpy(&b0, &b.x, 8);
  memcpy(&b1, &b.z, 8);
  acc = fma(a0, b0, acc);
  acc = fma(a1, b1, acc);
}

// Stage src[tokens n0 .. n0 + T) x features [f0, f0 + nf) of a row-major [N, F] matrix into
// feature-major shared rows dst[(f - f0) * kTileRowBytes + t * sizeof(scalar_t)]; tokens past
// n_end are zero. `vec`: 16-byte global loads are allowed (F, f0 multiples of the vector width
// and a 16-byte aligned base).
template <typename scalar_t>
__device__ __forceinline__ void stage_rows(unsigned char* __restrict__ dst, const scalar_t* __restrict__ src,
                                           int64_t F, int64_t f0, int64_t nf, int64_t n0, int64_t n_end,
                                           bool vec) {
  constexpr int T = tile_tokens<scalar_t>();
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  const int64_t blocks = (nf + V - 1) / V;
  const int64_t items = blocks * T;
#pragma unroll 4
  for (int64_t item = threadIdx.x; item < items; item += kTileThreads) {
    const int t = static_cast<int>(item % T);
    const int64_t fb = item / T;
    const int64_t n = n0 + t;
    scalar_t v[V];
    if (n < n_end && vec && (fb + 1) * V <= nf) {
      const uint4 raw = *reinterpret_cast<const uint4*>(src + n * F + f0 + fb * V);
      memcpy(v, &raw, 16);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const int64_t f = fb * V + e;
        v[e] = (n < n_end && f < nf) ? src[n * F + f0 + f] : scalar_t(0);
      }
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int64_t f = fb * V + e;
      if (f < nf) {
        *reinterpret_cast<scalar_t*>(dst + f * kTileRowBytes + t * static_cast<int>(sizeof(scalar_t))) = v[e];
      }
    }
  }
}

// out: [gridDim.y, k]. Block (x, y): entries [x * group, (x + 1) * group), tokens
// [y * tokens_per_split, ...). Shared memory: I rows of x, then max_rows rows of grad_out.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kTileThreads, 1)
    linear_tiled_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                        const index_t* __restrict__ index, int64_t k, int64_t N, int64_t O, int64_t I,
                        int64_t group, int64_t max_rows, int64_t tokens_per_split, bool vec_x, bool vec_g,
                        acc_t* __restrict__ out) {
  constexpr int T = tile_tokens<scalar_t>();
  constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
  extern __shared__ __align__(16) unsigned char tile_smem[];
  unsigned char* xs = tile_smem;
  unsigned char* gs = tile_smem + I * kTileRowBytes;
  const int64_t numel = O * I;
  const int64_t e_begin = static_cast<int64_t>(blockIdx.x) * group;
  const int64_t e_end = min(k, e_begin + group);
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * tokens_per_split;
  const int64_t n_end = min(N, n_begin + tokens_per_split);
  if (e_begin >= e_end) return;  // uniform over the block

  // This thread's entries: rows (-1 = none / out of range: contributes 0) and x row offsets.
  int32_t row[kTilePerThread];
  uint32_t xoff[kTilePerThread];
  acc_t acc[kTilePerThread];
  int32_t o_min = INT32_MAX, o_max = -1;
#pragma unroll
  for (int s = 0; s < kTilePerThread; ++s) {
    const int64_t j = e_begin + static_cast<int64_t>(s) * kTileThreads + threadIdx.x;
    row[s] = -1;
    xoff[s] = 0;
    acc[s] = acc_t(0);
    if (j < e_end) {
      const int64_t f = static_cast<int64_t>(index[j]);
      if (f >= 0 && f < numel) {
        const int64_t o = f / I;
        row[s] = static_cast<int32_t>(o);
        xoff[s] = static_cast<uint32_t>((f - o * I) * kTileRowBytes);
        o_min = min(o_min, row[s]);
        o_max = max(o_max, row[s]);
      }
    }
  }
  // The rows the group spans (one window when they fit; an unsorted index still only reads inside
  // the tensors, it may just take more windows).
  __shared__ int span[2];
  if (threadIdx.x == 0) {
    span[0] = INT32_MAX;
    span[1] = -1;
  }
  __syncthreads();
  if (o_max >= 0) {
    atomicMin(&span[0], o_min);
    atomicMax(&span[1], o_max);
  }
  __syncthreads();
  const int64_t first_row = span[0];
  const int64_t last_row = span[1];

  // Windows of at most max_rows staged grad_out rows; the staged range starts at a multiple of the
  // vector width, so a window's own rows are [w0, w0 + max_rows - V).
  for (int64_t w0 = first_row; w0 <= last_row; w0 += max_rows - V) {
    const int64_t wa = w0 - (w0 % V);
    const int64_t wrows = min(O - wa, max_rows);
    const int64_t w_stop = min(wa + wrows, w0 + max_rows - V);
    uint32_t goff[kTilePerThread];
#pragma unroll
    for (int s = 0; s < kTilePerThread; ++s) {
      const bool active = row[s] >= w0 && row[s] < w_stop;
      goff[s] = active ? static_cast<uint32_t>((row[s] - wa) * kTileRowBytes) : 0xffffffffu;
    }
    for (int64_t n0 = n_begin; n0 < n_end; n0 += T) {
      stage_rows<scalar_t>(xs, x, I, 0, I, n0, n_end, vec_x);
      stage_rows<scalar_t>(gs, grad_out, O, wa, wrows, n0, n_end, vec_g);
      __syncthreads();
#pragma unroll
      for (int s = 0; s < kTilePerThread; ++s) {
        if (goff[s] != 0xffffffffu) {
          const unsigned char* a = xs + xoff[s];
          const unsigned char* b = gs + goff[s];
#pragma unroll
          for (int v = 0; v < 4; ++v) {
            const uint4 av = *reinterpret_cast<const uint4*>(a + 16 * v);
            const uint4 bv = *reinterpret_cast<const uint4*>(b + 16 * v);
            dot16<scalar_t, acc_t>(av, bv, acc[s]);
          }
        }
      }
      __syncthreads();
    }
  }
  acc_t* dst = out + static_cast<int64_t>(blockIdx.y) * k;
#pragma unroll
  for (int s = 0; s < kTilePerThread; ++s) {
    const int64_t j = e_begin + static_cast<int64_t>(s) * kTileThreads + threadIdx.x;
    if (j < e_end) dst[j] = acc[s];
  }
}

// Shared memory per block of the tiled variant: I x rows + max_rows grad_out rows.
inline int64_t tiled_smem_bytes(int64_t I, int64_t max_rows) { return (I + max_rows) * kTileRowBytes; }

// Dynamic shared memory the tiled kernel may take: the device's opt-in limit less a 16 KB margin
// (its static shared memory is 8 bytes). The one failing case of the H200 test run asked for
// 231,360 of 232,448 bytes (with several windows); 205 KB (1280x1280) ran and matched.
constexpr int64_t kTileSmemMargin = 16 << 10;

inline int64_t smem_optin_limit(const at::Tensor& t) {
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, t.get_device()));
  return bytes - kTileSmemMargin;
}

// Whether the tiled variant can run this layer: x rows and every grad_out row (plus one vector
// of alignment slack) fit in shared memory at once, so each entry group stages one window. (The
// kernel can walk several windows, but the H200 test run of that path failed, with 231 KB of
// shared memory, and it is not offered until that is understood.)
inline bool tiled_fits(const at::Tensor& g, int64_t O, int64_t I) {
  const int64_t limit = smem_optin_limit(g);
  return O <= INT32_MAX && tiled_smem_bytes(I, O + 8 + kTileMinRows) <= limit;
}

void linear_tiled(const at::Tensor& g, const at::Tensor& x, const at::Tensor& index, int64_t O, int64_t I,
                  at::Tensor& out) {
  const int64_t k = index.numel();
  const int64_t N = g.size(0);
  const int64_t limit = smem_optin_limit(g);
  TORCH_CHECK_VALUE(tiled_fits(g, O, I), "sara_kernels.sampled_weight_grad_linear: variant 3 (tiled) needs ",
                    num(tiled_smem_bytes(I, O + 8 + kTileMinRows)), " bytes of shared memory for out_features=", num(O),
                    ", in_features=", num(I), " but the device allows ", num(limit), "; use variant 0 (auto), 1 or 2");
  // grad_out rows staged per window: what fits, at most O (+ one vector of alignment slack).
  const int64_t max_rows = std::min<int64_t>(limit / kTileRowBytes - I, O + 8);
  // Entries per block: the expected rows of a group (uniform density over the layer) should fit
  // one window, with room for the spread of a random selection.
  const double density = static_cast<double>(k) / (static_cast<double>(O) * static_cast<double>(I));
  const double rows_fit = static_cast<double>(std::min<int64_t>(max_rows - 8, O));
  int64_t group = static_cast<int64_t>(0.75 * rows_fit * density * static_cast<double>(I));
  if (rows_fit >= static_cast<double>(O)) group = kTileMaxEntries;  // every row fits
  group = std::max<int64_t>(kTileThreads, std::min<int64_t>(kTileMaxEntries, group));
  group = std::min<int64_t>(group, k);
  const int64_t groups = ceil_div(k, group);
  const int64_t smem = tiled_smem_bytes(I, max_rows);
  const int64_t per_sm = std::max<int64_t>(1, std::min<int64_t>(2048 / kTileThreads, (limit + kTileSmemMargin) / (smem + 1024)));
  const int64_t target = per_sm * sm_count(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sara_kernels_linear_tiled", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int T = tile_tokens<scalar_t>();
    constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
    const int64_t chunks = ceil_div(N, T);
    int64_t splits = std::min<int64_t>(chunks, std::max<int64_t>(1, ceil_div(target, groups)));
    // The partial buffer stays within the workspace bound.
    const int64_t max_splits = std::max<int64_t>(1, workspace_bytes() / (k * static_cast<int64_t>(sizeof(acc_t))));
    splits = std::min(splits, max_splits);
    const int64_t tokens_per_split = ceil_div(chunks, splits) * T;
    splits = ceil_div(N, tokens_per_split);
    at::Tensor target_buf = splits == 1 ? out : at::empty({splits, k}, out.options());
    const bool vec_x = I % V == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
    const bool vec_g = O % V == 0 && reinterpret_cast<uintptr_t>(g.data_ptr()) % 16 == 0;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "sara_kernels_linear_tiled_index", [&] {
      auto kernel = linear_tiled_kernel<scalar_t, acc_t, index_t>;
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      const dim3 grid(static_cast<unsigned int>(groups), static_cast<unsigned int>(splits));
      kernel<<<grid, kTileThreads, static_cast<size_t>(smem), stream>>>(
          g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), index.data_ptr<index_t>(), k, N, O, I, group, max_rows,
          tokens_per_split, vec_x, vec_g, target_buf.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (splits > 1) at::sum_out(out, target_buf, {0});
  });
}

at::Tensor sampled_weight_grad_linear_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                           const at::Tensor& index_in, int64_t out_features, int64_t in_features) {
  // The ATen ops inside (GEMMs) run below autograd: inputs that require grad must neither fail
  // (mm's out= variant refuses them) nor give an output that does.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const char* op = "sampled_weight_grad_linear";
  sara_kernels_check::linear_grad(op, grad_out_in, x_in, index_in, out_features, in_features);
  check_cuda(op, "grad_out", grad_out_in);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  int64_t variant = sara_kernels_check::settings().grad_variant.load(std::memory_order_relaxed);
  const at::Tensor grad_out = grad_out_in.reshape({-1, out_features}).contiguous();
  const at::Tensor x = x_in.reshape({-1, in_features}).contiguous();
  const int64_t numel = out_features * in_features;
  const at::Tensor index = index_in.contiguous();
  sara_kernels_check::record("sampled_weight_grad_linear", 2);  // the variant, once it is chosen
  const int64_t k = index.numel();
  const at::ScalarType acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (k == 0) return at::empty({0}, grad_out.options().dtype(acc));
  validate_index(op, index, numel);
  if (grad_out.size(0) == 0) return at::zeros({k}, grad_out.options().dtype(acc));
  // Entries with an out-of-range index stay 0 (the gemm gather skips them).
  at::Tensor out = at::zeros({k}, grad_out.options().dtype(acc));
  if (variant == 0) {
    const double density = static_cast<double>(k) / static_cast<double>(numel);
    variant = density < kLinearTiledMaxDensity && in_features >= kLinearTiledMinIn &&
                      tiled_fits(grad_out, out_features, in_features)
                  ? 3
                  : 2;
  }
  sara_kernels_check::record("sampled_weight_grad_linear", 2, variant);
  if (variant == 1) {
    linear_direct(grad_out, x, index, out_features, in_features, out);
  } else if (variant == 3) {
    linear_tiled(grad_out, x, index, out_features, in_features, out);
  } else {
    linear_gemm(grad_out, x, index, out_features, in_features, out);
  }
  return out;
}

}  // namespace
}  // namespace sara_kernels_cuda

TORCH_LIBRARY_IMPL(sara_kernels, CUDA, m) {
  m.impl("sampled_weight_grad_linear", TORCH_FN(sara_kernels_cuda::sampled_weight_grad_linear_cuda));
}
