// Validation of a flat index vector on the device (see the comment on validate_index in common.cuh).
#include "common.cuh"

#include <ATen/ops/aminmax.h>
#include <ATen/ops/zeros.h>


namespace sara_kernels_cuda {
namespace {

constexpr int kOutOfRange = 1;
constexpr int kNotIncreasing = 2;

// flag != nullptr: OR the failures into *flag (sync mode); else a device-side assertion.
template <typename index_t>
__global__ void validate_index_kernel(const index_t* __restrict__ index, int64_t k, int64_t numel, int* flag) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < k;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = static_cast<int64_t>(index[j]);
    int bad = 0;
    if (v < 0 || v >= numel) bad |= kOutOfRange;
    if (j > 0 && static_cast<int64_t>(index[j - 1]) >= v) bad |= kNotIncreasing;
    if (bad != 0) {
      if (flag != nullptr) {
        atomicOr(flag, bad);
      } else {
        CUDA_KERNEL_ASSERT((bad & kOutOfRange) == 0 &&
                           "sara_kernels: index holds a value outside [0, weight.numel())");
        CUDA_KERNEL_ASSERT((bad & kNotIncreasing) == 0 &&
                           "sara_kernels: index must be sorted in strictly increasing order");
      }
    }
  }
}

using Mode = IndexCheckMode;

}  // namespace

void validate_index(const char* op, const at::Tensor& index, int64_t numel, const std::string& name) {
  const int64_t k = index.numel();
  if (k == 0) return;
  const Mode mode = index_check_mode();
  if (mode == Mode::kOff) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(index.get_device()).stream();
  if (mode == Mode::kSync) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) return;  // a sync is illegal while capturing
  }
  at::Tensor flag;
  int* flag_ptr = nullptr;
  if (mode == Mode::kSync) {
    flag = at::zeros({1}, index.options().dtype(at::kInt));
    flag_ptr = flag.data_ptr<int>();
  }
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "sara_kernels_validate_index", [&] {
    validate_index_kernel<index_t>
        <<<blocks_for(k), kThreads, 0, stream>>>(index.data_ptr<index_t>(), k, numel, flag_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (mode == Mode::kSync) {
    const int bad = static_cast<int>(flag.item().toInt());
    if ((bad & kOutOfRange) != 0) {
      const auto [lo, hi] = at::aminmax(index);
      sara_kernels_check::index_range_error(op, name, lo.item().toLong(), hi.item().toLong(), numel);
    }
    if ((bad & kNotIncreasing) != 0) sara_kernels_check::index_order_error(op, name);
  }
}

}  // namespace sara_kernels_cuda
