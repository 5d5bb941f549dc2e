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

// kWorkspaceBytes, or SARA_KERNELS_CUDA_WORKSPACE_BYTES when set (the tests shrink it to reach the
// chunked paths of the gemm variants on small shapes).
inline int64_t workspace_bytes() {
  const char* env = std::getenv("SARA_KERNELS_CUDA_WORKSPACE_BYTES");
  if (env == nullptr || env[0] == '\0') return kWorkspaceBytes;
  char* end = nullptr;
  const long long value = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && value > 0, "environment variable SARA_KERNELS_CUDA_WORKSPACE_BYTES=",
                    env, " must be a positive integer (bytes)");
  return static_cast<int64_t>(value);
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

// ---------------------------------------------------------------------------------------------
// Host-side input checks. Every message starts with "sara_kernels_C.<op>: <argument>".
// ---------------------------------------------------------------------------------------------
inline void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.defined(), "sara_kernels_C.", op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.is_cuda(), "sara_kernels_C.", op, ": ", name, " must be a CUDA tensor, got device ",
              t.device());
  TORCH_CHECK(t.device() == device, "sara_kernels_C.", op, ": ", name, " is on ", t.device(),
              " but the other tensors are on ", device, "; all tensors must be on one device");
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, "sara_kernels_C.", op, ": ", name, " must be ", num(dim), "-D, got shape ",
                    shape(t.sizes()));
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "sara_kernels_C.", op, ": ", name, " must be contiguous, got strides ",
                    shape(t.strides()), " for shape ", shape(t.sizes()));
}

inline bool is_float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), "sara_kernels_C.", op, ": ", name, " has dtype ",
                   t.scalar_type(), "; expected one of Float, Half, BFloat16, Double");
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, "sara_kernels_C.", op, ": ", name, " has dtype ",
                   t.scalar_type(), "; expected ", expected);
}

inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t k) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == k, "sara_kernels_C.", op, ": ", name, " has shape ",
                    shape(t.sizes()), " but index has [", num(k), "]");
}

// index: 1-D int32/int64 on `device`; returns it contiguous. numel: the entries it addresses.
inline at::Tensor checked_index(const char* op, const at::Tensor& index, const at::Device& device, int64_t numel) {
  check_cuda(op, "index", index, device);
  TORCH_CHECK_TYPE(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, "sara_kernels_C.", op,
                   ": index has dtype ", index.scalar_type(), "; expected Int or Long");
  check_dim(op, "index", index, 1);
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong || numel <= INT32_MAX, "sara_kernels_C.", op,
                   ": index is int32 but the weight has ", num(numel), " entries (>= 2**31); use int64 indices");
  return index.contiguous();
}

// Index validation (range [0, numel) and strictly increasing order), defined in index_check.cu.
//
// Choice: every kernel skips an out-of-range index itself (never reads or writes through it), and
// this host-side validation is ASYNCHRONOUS by default: one small kernel over the k indices that
// fires a device-side assertion (like PyTorch's own index kernels / at::_assert_async) when an
// index is out of range or the order is broken. It costs no host sync, so it is safe inside
// CUDA graphs and does not stall the backward pass; the readable, catchable error comes from the
// Python layer (sara_kernels._checks.check_index, one sync, can be switched off), which runs
// before every native call. SARA_KERNELS_CUDA_INDEX_CHECK selects the mode per call:
//   "async" (default): the device assertion above;
//   "sync":  a flag reduction + one .item() that raises IndexError / ValueError naming the op
//            and the argument (skipped while the current stream is capturing a CUDA graph);
//   "0" / "off": no validation (kernels still skip out-of-range indices).
void validate_index(const char* op, const at::Tensor& index, int64_t numel);

// The mode SARA_KERNELS_CUDA_INDEX_CHECK selects (see validate_index). Kernels that fold the
// check into their own pass (sparse_adamw_multi_) read it here.
enum class IndexCheckMode { kOff, kAsync, kSync };
IndexCheckMode index_check_mode();

}  // namespace sara_kernels_cuda
