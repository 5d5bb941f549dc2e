// Autograd and autocast of the layer ops sparse_linear and sparse_conv2d, for every device.
//
// The forward is the dense layer's own (F.linear / F.conv2d on the merged weight); the backward
// gives x and bias their usual gradients and delta the weight gradient at the selected entries
// only (the sampled_weight_grad_* op, whichever backend runs it). No dense weight gradient exists.
// Written in C++ so that a layer's forward and backward cost what nn.Linear's and nn.Conv2d's do
// (one dispatcher call, no Python on the autograd path); the same kernels run eagerly and under
// torch.compile, which traces through them. Without the compiled extension, sara_kernels/_ops.py
// registers the same formulas in Python.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <functional>
#include <string>
#include <vector>

#include "checks.h"

namespace sara_kernels_autograd {
namespace {

namespace check = sara_kernels_check;
using torch::autograd::variable_list;

// Under torch.compile's tracing (dynamic shapes) sizes are symbolic: the checks that read them are
// the fake kernels' there, and these run on the eager call.
bool symbolic(const at::Tensor& t) { return t.defined() && t.unsafeGetTensorImpl()->has_symbolic_sizes_strides(); }

int64_t concrete(const c10::SymInt& v) { return v.guard_int(__FILE__, __LINE__); }

// The checks both layer ops share: dtypes, ranks, delta beside index, bias beside the weight's
// outputs, one device. The index values are checked by the sampled-gradient kernel that reads them.
void check_layer(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                 const at::Tensor& index, const at::Tensor& delta) {
  check::tensor(op, "x", x, check::Dtypes::kFloating);
  check::tensor(op, "weight", weight, check::Dtypes::kFloating);
  check::tensor(op, "index", index, check::Dtypes::kIndex, 1);
  check::tensor(op, "delta", delta, check::Dtypes::kFp32OrFp64, 1);
  if (symbolic(x) || symbolic(weight) || symbolic(bias) || symbolic(index) || symbolic(delta)) return;
  TORCH_CHECK_VALUE(delta.sizes() == index.sizes(), check::prefix(op), "delta has shape ", check::tuple(delta.sizes()),
                    " but index has ", check::tuple(index.sizes()));
  if (bias.defined()) {
    TORCH_CHECK_VALUE(bias.dim() == 1, check::prefix(op), "bias must be 1-D, got shape ", check::tuple(bias.sizes()));
    TORCH_CHECK_VALUE(bias.size(0) == weight.size(0), check::prefix(op), "bias has ", check::num(bias.size(0)),
                      " entries but weight has ", check::num(weight.size(0)), " outputs");
  }
  check::same_device(op, {{"x", &x}, {"weight", &weight}, {"bias", &bias}, {"index", &index}, {"delta", &delta}});
  check::index_meta(op, "index", index, weight.numel());
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t)>&
linear_grad_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sara_kernels::sampled_weight_grad_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  return op;
}

using ConvGradSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                               c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t);
const c10::TypedOperatorHandle<ConvGradSig>& conv2d_grad_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sara_kernels::sampled_weight_grad_conv2d", "")
                             .typed<ConvGradSig>();
  return op;
}

// The backward node both layer ops share (edges: x, bias, delta). It keeps x only for delta's
// gradient and the weight only for x's, as a generated ATen backward node would: no autograd
// Function machinery, so the forward costs what the dense layer's does.
struct LayerBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable x, weight, index, delta;  // delta: read only by a create_graph backward
  std::vector<c10::SymInt> x_sizes;
  std::vector<int64_t> weight_sizes, stride, padding, dilation;
  int64_t groups = 1;
  bool conv = false;
  at::ScalarType delta_dtype = at::kFloat, bias_dtype = at::kFloat;

  std::string name() const override { return conv ? "SparseConv2dBackward" : "SparseLinearBackward"; }

  void release_variables() override {
    x.reset_data();
    weight.reset_data();
    index.reset_data();
    delta.reset_data();
  }

  // The weight as a function of delta (its values unchanged: weight + scatter(delta - delta)), so
  // that a gradient computed from it depends on delta as the merged weight does.
  at::Tensor weight_of_delta(const at::Tensor& weight_, const at::Tensor& index_) {
    const at::Tensor d = delta.unpack();
    if (!d.defined() || !d.requires_grad()) return weight_;
    return weight_.detach()
        .reshape({-1})
        .index_add(0, index_.to(at::kLong), (d - d.detach()).to(weight_.scalar_type()))
        .view(weight_.sizes());
  }

  // Under create_graph (grad mode on in the backward: gradient penalties, higher-order grads) the
  // gradients are built from differentiable dense ops, so that their own gradients are exact: x's
  // through the weight's dependence on delta, delta's through the dense weight gradient (O(weight)
  // memory, only on this path). Without it the sampled kernels run (no dense weight gradient).
  variable_list apply_differentiable(const at::Tensor& grad, const at::Tensor& x_, const at::Tensor& weight_,
                                     const at::Tensor& index_) {
    at::Tensor grad_x, grad_bias, grad_delta;
    const at::Tensor flat = index_.to(at::kLong);
    if (!conv) {
      const int64_t out_features = weight_sizes[0], in_features = weight_sizes[1];
      if (should_compute_output(0)) grad_x = at::matmul(grad, weight_of_delta(weight_, index_).to(grad.scalar_type()));
      if (should_compute_output(1)) grad_bias = grad.reshape({-1, out_features}).sum(0).to(bias_dtype);
      if (should_compute_output(2)) {
        const auto acc = x_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
        const at::Tensor dense = at::matmul(grad.reshape({-1, out_features}).to(acc).t(),
                                            x_.reshape({-1, in_features}).to(acc));
        grad_delta = dense.reshape({-1}).index_select(0, flat).to(delta_dtype);
      }
      return {grad_x, grad_bias, grad_delta};
    }
    if (should_compute_output(0)) grad_x = conv_input_grad(grad, weight_of_delta(weight_, index_));
    if (should_compute_output(1)) grad_bias = grad.sum({0, 2, 3}).to(bias_dtype);
    if (should_compute_output(2)) {
      const auto acc = x_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      const at::Tensor shape_only = at::zeros(weight_sizes, x_.options().dtype(acc));
      const at::Tensor dense = std::get<1>(at::convolution_backward(
          grad.to(acc), x_.to(acc), shape_only, c10::nullopt, stride, padding, dilation, false, {0, 0}, groups,
          {false, true, false}));
      grad_delta = dense.reshape({-1}).index_select(0, flat).to(delta_dtype);
    }
    return {grad_x, grad_bias, grad_delta};
  }

  // The input gradient as a transposed convolution: convolution_backward could also allocate a
  // dense weight-gradient tensor.
  at::Tensor conv_input_grad(const at::Tensor& grad, const at::Tensor& w) {
    std::vector<c10::SymInt> output_padding;
    for (int i = 0; i < 2; ++i) {
      output_padding.push_back(x_sizes[2 + i] - ((grad.sym_size(2 + i) - 1) * stride[i] - 2 * padding[i] +
                                                 dilation[i] * (weight_sizes[2 + i] - 1) + 1));
    }
    return at::conv_transpose2d_symint(grad, w.to(grad.scalar_type()), c10::nullopt, c10::fromIntArrayRefSlow(stride),
                                       c10::fromIntArrayRefSlow(padding), output_padding, groups,
                                       c10::fromIntArrayRefSlow(dilation));
  }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor& grad = grads[0];
    at::Tensor grad_x, grad_bias, grad_delta;
    if (!grad.defined()) return {grad_x, grad_bias, grad_delta};
    const at::Tensor x_ = x.unpack(), weight_ = weight.unpack(), index_ = index.unpack();
    if (at::GradMode::is_enabled()) return apply_differentiable(grad, x_, weight_, index_);
    if (!conv) {
      const int64_t out_features = weight_sizes[0], in_features = weight_sizes[1];
      if (should_compute_output(0)) grad_x = at::matmul(grad, weight_.to(grad.scalar_type()));
      if (should_compute_output(1)) grad_bias = grad.reshape({-1, out_features}).sum(0).to(bias_dtype);
      if (should_compute_output(2)) {
        grad_delta = linear_grad_op().call(grad, x_, index_, out_features, in_features).to(delta_dtype);
      }
      return {grad_x, grad_bias, grad_delta};
    }
    if (should_compute_output(0)) grad_x = conv_input_grad(grad, weight_);
    if (should_compute_output(1)) grad_bias = grad.sum({0, 2, 3}).to(bias_dtype);
    if (should_compute_output(2)) {
      grad_delta =
          conv2d_grad_op().call(grad, x_, index_, weight_sizes, stride, padding, dilation, groups).to(delta_dtype);
    }
    return {grad_x, grad_bias, grad_delta};
  }
};

// Run the dense forward below autograd; when x, bias or delta needs a gradient, attach the node.
template <typename Forward>
at::Tensor with_backward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& index, const at::Tensor& delta, Forward&& forward,
                         const std::function<void(LayerBackward&)>& setup) {
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = forward();
  }
  if (!torch::autograd::compute_requires_grad(x, bias, delta)) return out;
  auto node = c10::make_intrusive<LayerBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, bias, delta));
  if (delta.requires_grad()) {
    node->x = torch::autograd::SavedVariable(x, false);
    node->delta = torch::autograd::SavedVariable(delta, false);
  }
  if (x.requires_grad()) node->weight = torch::autograd::SavedVariable(weight, false);
  node->index = torch::autograd::SavedVariable(index, false);
  node->x_sizes = x.sym_sizes().vec();
  for (const c10::SymInt& size : weight.sym_sizes()) node->weight_sizes.push_back(concrete(size));
  node->delta_dtype = delta.scalar_type();
  node->bias_dtype = bias.defined() ? bias.scalar_type() : weight.scalar_type();
  setup(*node);
  torch::autograd::set_history(out, node);
  return out;
}

at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          const at::Tensor& index, const at::Tensor& delta) {
  constexpr const char* op = "sparse_linear";
  check_layer(op, x, weight, bias.value_or(at::Tensor()), index, delta);
  TORCH_CHECK_VALUE(weight.dim() == 2 && x.dim() > 0 && x.sym_size(-1) == weight.sym_size(1), check::prefix(op), "x ",
                    check::tuple(x.sizes()), " does not match weight ", check::tuple(weight.sizes()), " ([out, in])");
  return at::linear(x, weight, bias);
}

at::Tensor conv2d_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          const at::Tensor& index, const at::Tensor& delta, c10::IntArrayRef stride,
                          c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "sparse_conv2d";
  check_layer(op, x, weight, bias.value_or(at::Tensor()), index, delta);
  TORCH_CHECK_VALUE(weight.dim() == 4, check::prefix(op), "weight must be 4-D, got shape ",
                    check::tuple(weight.sizes()));
  if (!symbolic(x) && !symbolic(weight)) check::conv2d(op, x, weight.sizes(), stride, padding, dilation, groups);
  return at::conv2d(x, weight, bias, stride, padding, dilation, groups);
}

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& index, const at::Tensor& delta) {
  TORCH_CHECK(!weight.requires_grad() || !at::GradMode::is_enabled(), check::prefix("sparse_linear"),
              "weight requires grad, but this op never forms a dense weight gradient; freeze the weight "
              "(weight.requires_grad_(False)) and train delta");
  return with_backward(
      x, weight, bias.value_or(at::Tensor()), index, delta,
      [&] { return linear_forward(x, weight, bias, index, delta); }, [](LayerBackward&) {});
}

at::Tensor sparse_conv2d(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& index, const at::Tensor& delta, c10::IntArrayRef stride,
                         c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(!weight.requires_grad() || !at::GradMode::is_enabled(), check::prefix("sparse_conv2d"),
              "weight requires grad, but this op never forms a dense weight gradient; freeze the weight "
              "(weight.requires_grad_(False)) and train delta");
  return with_backward(
      x, weight, bias.value_or(at::Tensor()), index, delta,
      [&] { return conv2d_forward(x, weight, bias, index, delta, stride, padding, dilation, groups); },
      [&](LayerBackward& node) {
        node.conv = true;
        node.stride = stride.vec();
        node.padding = padding.vec();
        node.dilation = dilation.vec();
        node.groups = groups;
      });
}

// Autocast: x, weight and bias in the autocast dtype (as nn.Linear / nn.Conv2d compute under
// torch.autocast: floating tensors other than fp64, on the autocast device); delta stays fp32.
template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor sparse_linear_autocast(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& index,
                                  const at::Tensor& delta) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sara_kernels::sparse_linear", "")
                             .typed<decltype(sparse_linear)>();
  return op.call(at::autocast::cached_cast(dtype, x, device), at::autocast::cached_cast(dtype, weight, device),
                 at::autocast::cached_cast(dtype, bias, device), index, delta);
}

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor sparse_conv2d_autocast(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& index,
                                  const at::Tensor& delta, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                  c10::IntArrayRef dilation, int64_t groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sara_kernels::sparse_conv2d", "")
                             .typed<decltype(sparse_conv2d)>();
  return op.call(at::autocast::cached_cast(dtype, x, device), at::autocast::cached_cast(dtype, weight, device),
                 at::autocast::cached_cast(dtype, bias, device), index, delta, stride, padding, dilation, groups);
}

}  // namespace
}  // namespace sara_kernels_autograd

TORCH_LIBRARY_IMPL(sara_kernels, CompositeExplicitAutograd, m) {
  m.impl("sparse_linear", &sara_kernels_autograd::linear_forward);
  m.impl("sparse_conv2d", &sara_kernels_autograd::conv2d_forward);
}

TORCH_LIBRARY_IMPL(sara_kernels, Autograd, m) {
  m.impl("sparse_linear", &sara_kernels_autograd::sparse_linear);
  m.impl("sparse_conv2d", &sara_kernels_autograd::sparse_conv2d);
}

TORCH_LIBRARY_IMPL(sara_kernels, AutocastCPU, m) {
  m.impl("sparse_linear",
         &sara_kernels_autograd::sparse_linear_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("sparse_conv2d",
         &sara_kernels_autograd::sparse_conv2d_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(sara_kernels, AutocastCUDA, m) {
  m.impl("sparse_linear",
         &sara_kernels_autograd::sparse_linear_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("sparse_conv2d",
         &sara_kernels_autograd::sparse_conv2d_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}
