// The native ops' schemas (namespace sara_kernels_C) and the Python module init.
//
// The public ops (torch.ops.sara_kernels.*) are defined in sara_kernels/_ops.py so the package
// imports without this extension; their CPU/CUDA kernels call these native ops, which take
// already-flattened, contiguous inputs. Kernels: csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "variant_log.h"

namespace sara_kernels_log {
std::atomic<int>& last_grad_variant_slot(int op) {
  static std::atomic<int> slots[2] = {-1, -1};
  return slots[op == kConv2d ? 1 : 0];
}
}  // namespace sara_kernels_log

namespace {
// The variant the last sampled_weight_grad_{linear,conv2d} call ran (-1: none yet).
int64_t last_grad_variant(std::string op) {
  TORCH_CHECK_VALUE(op == "sampled_weight_grad_linear" || op == "sampled_weight_grad_conv2d",
                    "sara_kernels_C.last_grad_variant: op must be 'sampled_weight_grad_linear' or "
                    "'sampled_weight_grad_conv2d', got '", op, "'");
  const int slot = op == "sampled_weight_grad_conv2d" ? sara_kernels_log::kConv2d : sara_kernels_log::kLinear;
  return sara_kernels_log::last_grad_variant_slot(slot).load(std::memory_order_relaxed);
}
}  // namespace

extern "C" {
// Importing sara_kernels._C loads this library and runs the static registrations below; the
// module itself holds nothing (no pybind11: ops are reached through torch.ops).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sara_kernels_C, m) {
  // weight: any shape -> int32 [k] sorted flat indices (int64 when numel >= 2^31).
  m.def("select_small_magnitude(Tensor weight, float? threshold, int? k) -> Tensor");
  // grad_out: [N, out], x: [N, in] (contiguous, same dtype), index: [k] -> fp32 [k] (fp64 for fp64).
  // variant: 0 auto, 1 direct (per-entry dot products), 2 gemm (chunked dense GEMM + gather),
  // 3 tiled (CUDA only: operands staged in shared memory).
  m.def(
      "sampled_weight_grad_linear(Tensor grad_out, Tensor x, Tensor index, int out_features, "
      "int in_features, int variant) -> Tensor");
  // grad_out: [N, O, P, Q], x: [N, C, H, W] (contiguous), index: [k] into [O, C/groups, kh, kw].
  m.def(
      "sampled_weight_grad_conv2d(Tensor grad_out, Tensor x, Tensor index, int[] weight_shape, "
      "int[] stride, int[] padding, int[] dilation, int groups, int variant) -> Tensor");
  m.def(
      "sparse_adamw_(Tensor(a!) weight, Tensor index, Tensor base, Tensor(b!) delta, Tensor grad, "
      "Tensor(c!) exp_avg, Tensor(d!) exp_avg_sq, float step, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool maximize) -> ()");
  // sparse_adamw_ over lists (one entry per layer, each with its own step) in one call: one
  // parallel range on the CPU, a few launches on CUDA instead of one per layer.
  m.def(
      "sparse_adamw_multi_(Tensor(a!)[] weights, Tensor[] indices, Tensor[] bases, Tensor(b!)[] deltas, "
      "Tensor[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, float[] steps, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool maximize) -> ()");
  m.def("scatter_merge_(Tensor(a!) weight, Tensor index, Tensor base, Tensor delta, float alpha) -> ()");
  m.def("restore_(Tensor(a!) weight, Tensor index, Tensor base) -> ()");
  // The variant (1 direct, 2 gemm, 3 tiled; -1 none yet) the last call of a sampled-gradient op
  // ran, on any device: what auto picked.
  m.def("last_grad_variant(str op) -> int", &last_grad_variant);
}
