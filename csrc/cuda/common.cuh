// Shared helpers of the CUDA kernels (csrc/cuda/*.cu): input checks whose messages name the op
// and the argument, launch geometry, the workspace bound, and the index validation entry point.
//
// Kept light on purpose (no ATen/ATen.h, no torch/extension.h, no ATen/cuda/CUDAContext.h: the
// local toolkit has no cuBLAS headers); ATen ops are reached through the per-op headers.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include "checks.h"
#include "message.h"
#include <torch/version.h>

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#include <ATen/ops/mm.h>
#define SARA_KERNELS_HAS_MM_OUT_DTYPE 1
#else
#define SARA_KERNELS_HAS_MM_OUT_DTYPE 0
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace sara_kernels_cuda {

// Error messages format numbers and shapes as strings (message.h).
using sara_kernels_msg::num;
using sara_kernels_msg::shape;

constexpr int kThreads = 256;
// Grid-stride loops everywhere: grids never exceed this many blocks (any k or N still works).
constexpr int64_t kMaxBlocks = 65535LL * 16;
// Upper bound of the dense fp32/fp64 scratch the gemm variants allocate (dense chunk, fp32 copies
// of the input chunks, im2col columns), except when one minimal chunk (one output row/channel,
// one token/sample, one input channel) alone exceeds it.
constexpr int64_t kWorkspaceBytes = 64LL << 20;

// The bound in force (the tests shrink it to reach the chunked paths of the gemm variants on small
// shapes): kWorkspaceBytes unless the workspace_bytes setting (> 0) overrides it.
inline int64_t workspace_bytes() {
  const int64_t v = sara_kernels_check::settings().workspace_bytes.load(std::memory_order_relaxed);
  return v > 0 ? v : kWorkspaceBytes;
}
// fp16/bf16 GEMMs with an fp32 result (aten::mm.dtype_out: tensor cores, fp32 accumulation, no
// converted copies of the inputs), where this PyTorch has them.
constexpr bool kHasMmOutDtype = SARA_KERNELS_HAS_MM_OUT_DTYPE != 0;

// out[fp32] = a @ b for fp16/bf16 a, b (only called when kHasMmOutDtype).
inline void mm_fp32_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
#if SARA_KERNELS_HAS_MM_OUT_DTYPE
  at::mm_out(out, a, b, at::kFloat);
#else
  TORCH_CHECK(false, "sara_kernels: internal error: mm.dtype_out is not available in this PyTorch");
#endif
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned int blocks_for(int64_t n, int64_t per_block = kThreads) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(ceil_div(n, per_block), kMaxBlocks)));
}

inline int sm_count(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.get_device()));
  return std::max(count, 1);
}

// Split the reduction (over tokens / samples) into `splits` slices written to a [splits, k]
// partial buffer and summed afterwards (deterministic, no atomics), so that a small k still fills
// the GPU. `blocks` is the number of blocks the entries alone give; `length` the reduction length
// and `min_per_split` the least reduction work worth a slice.
inline int64_t choose_splits(const at::Tensor& t, int64_t blocks, int64_t length, int64_t min_per_split) {
  const int64_t target = 4LL * sm_count(t);
  if (blocks >= target || length <= min_per_split) return 1;
  int64_t splits = std::min(ceil_div(target, blocks), ceil_div(length, min_per_split));
  return std::max<int64_t>(1, std::min<int64_t>(splits, 64));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Host-side input checks: the argument checks are csrc/checks.h (shared with the CPU kernels); the
// kernels here add that their tensors are CUDA tensors.
inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), sara_kernels_check::prefix(op), name, " must be a CUDA tensor, got device ", t.device().str());
}

// The index's values (range, strictly increasing) per the index_checks setting.
void validate_index(const char* op, const at::Tensor& index, int64_t numel, const std::string& name = "index");

// Kernels that fold the check into their own pass (sparse_adamw_multi_) read the mode here.
// The index_checks setting: 0 off, 1 async (device-side assertion, no sync), 2 sync (raises).
enum class IndexCheckMode { kOff = 0, kAsync = 1, kSync = 2 };
inline IndexCheckMode index_check_mode() { return static_cast<IndexCheckMode>(sara_kernels_check::index_checks()); }

}  // namespace sara_kernels_cuda
