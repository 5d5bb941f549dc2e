// The native ops' schemas (namespace sara_kernels_C) and the Python module init.
//
// The public ops (torch.ops.sara_kernels.*) are defined in sara_kernels/_ops.py so the package
// imports without this extension; their CPU/CUDA kernels call these native ops, which take
// already-flattened, contiguous inputs. Kernels: csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA).
#include <Python.h>
#include <torch/library.h>

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
  // variant: 0 auto, 1 direct (per-entry dot products), 2 gemm (chunked dense GEMM + gather).
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
  m.def("scatter_merge_(Tensor(a!) weight, Tensor index, Tensor base, Tensor delta, float alpha) -> ()");
  m.def("restore_(Tensor(a!) weight, Tensor index, Tensor base) -> ()");
}
