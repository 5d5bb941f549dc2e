// CUDA kernel of select_small_magnitude, built from ATen ops (a sort / compaction is not worth a
// hand-written kernel): the same ops as sara_kernels.reference, so the result matches it exactly.
//   threshold: sorted flat indices of |w| < threshold (at::nonzero keeps index order);
//   k:         a stable sort of |w| (ties keep index order, so they go to the smaller index), the
//              first k positions, sorted ascending.
// Result: int32 [count] (int64 when weight.numel() >= 2^31), on the weight's device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"

namespace sara_kernels_cuda {
namespace {

using sara_kernels_check::num;

at::Tensor select_small_magnitude_cuda(const at::Tensor& weight, std::optional<double> threshold,
                                       std::optional<int64_t> k) {
  const char* op = "select_small_magnitude";
  sara_kernels_check::tensor(op, "weight", weight, sara_kernels_check::Dtypes::kFloating);
  TORCH_CHECK(weight.is_cuda(), sara_kernels_check::prefix(op), "weight must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(weight.device());
  TORCH_CHECK_VALUE(threshold.has_value() != k.has_value(), sara_kernels_check::prefix(op),
                    "give exactly one of threshold or k");
  sara_kernels_check::record("select_small_magnitude", 2);
  const int64_t numel = weight.numel();
  const at::ScalarType index_dtype = numel >= (int64_t{1} << 31) ? at::kLong : at::kInt;
  const at::Tensor magnitude = weight.contiguous().reshape({-1}).abs();
  if (threshold.has_value()) {
    const double t = *threshold;
    TORCH_CHECK_VALUE(t > 0.0, sara_kernels_check::prefix(op), "threshold must be a positive number, got ", sara_kernels_check::pyfloat(t));
    return at::nonzero(magnitude.lt(t)).flatten().to(index_dtype);
  }
  const int64_t count = *k;
  TORCH_CHECK_VALUE(count >= 0 && count <= numel, sara_kernels_check::prefix(op), "k=", num(count), " must lie in [0, ",
                    num(numel), "] (the weight's entry count)");
  if (count == 0) return at::empty({0}, weight.options().dtype(index_dtype));
  const at::Tensor order = std::get<1>(at::sort(magnitude, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor chosen = std::get<0>(at::sort(order.narrow(0, 0, count), /*stable=*/false, 0, false));
  return chosen.to(index_dtype);
}

}  // namespace
}  // namespace sara_kernels_cuda

TORCH_LIBRARY_IMPL(sara_kernels, CUDA, m) {
  m.impl("select_small_magnitude", TORCH_FN(sara_kernels_cuda::select_small_magnitude_cuda));
}
