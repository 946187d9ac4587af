// Meta kernels: output shapes, dtypes and strides of every op, with symbolic sizes, so FakeTensor,
// torch.compile (dynamic=True included) and torch.export trace the ops without running them.
// They run the same checks as the real kernels (checks.h) and allocate what the real kernels
// allocate: contiguous outputs in the input's dtype, statistics in the accumulation type,
// parameter gradients in the parameters' dtype, empty 1-D tensors for gradients not requested.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "checks.h"

namespace layernorm_ext {
namespace {

using OptTensor = std::optional<at::Tensor>;

at::Tensor empty_like_input(const at::Tensor& input) {
  return at::empty_symint(input.sym_sizes(),
                          input.options().memory_format(at::MemoryFormat::Contiguous));
}

at::Tensor stat(const at::Tensor& input, int64_t normalized_ndim) {
  return at::empty_symint(stat_sym_shape(input, normalized_ndim),
                          input.options().dtype(acc_type(input.scalar_type())));
}

at::Tensor not_requested_meta(const at::Tensor& input) { return at::empty({0}, input.options()); }

at::Tensor param_grad(bool requested, const OptTensor& param, const at::Tensor& input) {
  if (requested && param.has_value() && param->defined()) {
    return at::empty_symint(param->sym_sizes(), param->options());
  }
  return not_requested_meta(input);
}

void check_same_as_input(const char* op, const at::Tensor& input, const at::Tensor& t,
                         const char* name) {
  TORCH_CHECK(t.sym_sizes().equals(input.sym_sizes()), op, ": expected ", name,
              " to have the input's shape ", input.sym_sizes(), ", but got ", t.sym_sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": expected ", name,
              " to have the input's dtype (", input.scalar_type(), "), but got ", t.scalar_type());
}

void check_grad_residual(const char* op, const at::Tensor& input, const OptTensor& g) {
  if (g.has_value() && g->defined()) {
    check_same_as_input(op, input, *g, "grad_residual");
  }
}

at::Tensor layer_norm_meta(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                           const OptTensor& weight, const OptTensor& bias, double /*eps*/,
                           bool /*zero_centered_weight*/) {
  check_norm_inputs("layernorm_ext::layer_norm", input, normalized_shape, weight, bias);
  return empty_like_input(input);
}

void layer_norm_out_meta(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                         const OptTensor& weight, const OptTensor& bias, double /*eps*/,
                         bool /*zero_centered_weight*/, at::Tensor& out) {
  check_norm_inputs("layernorm_ext::layer_norm", input, normalized_shape, weight, bias);
  check_out("layernorm_ext::layer_norm", input, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_meta(
    const at::Tensor& input, c10::SymIntArrayRef normalized_shape, const OptTensor& weight,
    const OptTensor& bias, double /*eps*/, bool /*zero_centered_weight*/) {
  check_norm_inputs("layernorm_ext::layer_norm", input, normalized_shape, weight, bias);
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  return {empty_like_input(input), stat(input, nd), stat(input, nd)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_meta(
    const at::Tensor& grad_out, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const at::Tensor& mean, const at::Tensor& rstd, const OptTensor& weight, const OptTensor& bias,
    bool /*zero_centered_weight*/, std::array<bool, 3> output_mask,
    const OptTensor& grad_residual) {
  const char* op = "layernorm_ext::layer_norm_bwd";
  check_norm_inputs(op, input, normalized_shape, weight, bias);
  check_norm_backward_inputs(op, grad_out, input, static_cast<int64_t>(normalized_shape.size()),
                             mean, rstd);
  check_grad_residual(op, input, grad_residual);
  return {output_mask[0] ? empty_like_input(input) : not_requested_meta(input),
          param_grad(output_mask[1], weight, input), param_grad(output_mask[2], bias, input)};
}

at::Tensor rms_norm_meta(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                         const OptTensor& weight, std::optional<double> /*eps*/,
                         bool /*zero_centered_weight*/) {
  check_norm_inputs("layernorm_ext::rms_norm", input, normalized_shape, weight, std::nullopt);
  return empty_like_input(input);
}

void rms_norm_out_meta(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                       const OptTensor& weight, std::optional<double> /*eps*/,
                       bool /*zero_centered_weight*/, at::Tensor& out) {
  check_norm_inputs("layernorm_ext::rms_norm", input, normalized_shape, weight, std::nullopt);
  check_out("layernorm_ext::rms_norm", input, out);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_meta(const at::Tensor& input,
                                                     c10::SymIntArrayRef normalized_shape,
                                                     const OptTensor& weight,
                                                     std::optional<double> /*eps*/,
                                                     bool /*zero_centered_weight*/) {
  check_norm_inputs("layernorm_ext::rms_norm", input, normalized_shape, weight, std::nullopt);
  return {empty_like_input(input), stat(input, static_cast<int64_t>(normalized_shape.size()))};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_meta(
    const at::Tensor& grad_out, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const at::Tensor& rstd, const OptTensor& weight, bool /*zero_centered_weight*/,
    std::array<bool, 2> output_mask, const OptTensor& grad_residual) {
  const char* op = "layernorm_ext::rms_norm_bwd";
  check_norm_inputs(op, input, normalized_shape, weight, std::nullopt);
  check_norm_backward_inputs(op, grad_out, input, static_cast<int64_t>(normalized_shape.size()),
                             std::nullopt, rstd);
  check_grad_residual(op, input, grad_residual);
  return {output_mask[0] ? empty_like_input(input) : not_requested_meta(input),
          param_grad(output_mask[1], weight, input)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_meta(
    const at::Tensor& input, const at::Tensor& residual, c10::SymIntArrayRef normalized_shape,
    const OptTensor& weight, const OptTensor& bias, double /*eps*/, bool /*zero_centered_weight*/) {
  const char* op = "layernorm_ext::add_layer_norm";
  check_norm_inputs(op, input, normalized_shape, weight, bias);
  check_same_as_input(op, input, residual, "residual");
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  return {empty_like_input(input), empty_like_input(input), stat(input, nd), stat(input, nd)};
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_meta(
    const at::Tensor& input, const at::Tensor& residual, c10::SymIntArrayRef normalized_shape,
    const OptTensor& weight, const OptTensor& bias, double eps, bool zero_centered_weight) {
  auto r = add_layer_norm_fwd_meta(input, residual, normalized_shape, weight, bias, eps,
                                   zero_centered_weight);
  return {std::get<0>(r), std::get<1>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd_meta(
    const at::Tensor& input, const at::Tensor& residual, c10::SymIntArrayRef normalized_shape,
    const OptTensor& weight, std::optional<double> /*eps*/, bool /*zero_centered_weight*/) {
  const char* op = "layernorm_ext::add_rms_norm";
  check_norm_inputs(op, input, normalized_shape, weight, std::nullopt);
  check_same_as_input(op, input, residual, "residual");
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  return {empty_like_input(input), empty_like_input(input), stat(input, nd)};
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_meta(
    const at::Tensor& input, const at::Tensor& residual, c10::SymIntArrayRef normalized_shape,
    const OptTensor& weight, std::optional<double> eps, bool zero_centered_weight) {
  auto r =
      add_rms_norm_fwd_meta(input, residual, normalized_shape, weight, eps, zero_centered_weight);
  return {std::get<0>(r), std::get<1>(r)};
}

void add_layer_norm_inplace_meta(const at::Tensor& input, at::Tensor& residual,
                                 c10::SymIntArrayRef normalized_shape, const OptTensor& weight,
                                 const OptTensor& bias, double /*eps*/,
                                 bool /*zero_centered_weight*/, at::Tensor& out) {
  const char* op = "layernorm_ext::add_layer_norm_inplace";
  check_norm_inputs(op, input, normalized_shape, weight, bias);
  check_same_as_input(op, input, residual, "residual");
  check_out(op, input, out);
}

void add_rms_norm_inplace_meta(const at::Tensor& input, at::Tensor& residual,
                               c10::SymIntArrayRef normalized_shape, const OptTensor& weight,
                               std::optional<double> /*eps*/, bool /*zero_centered_weight*/,
                               at::Tensor& out) {
  const char* op = "layernorm_ext::add_rms_norm_inplace";
  check_norm_inputs(op, input, normalized_shape, weight, std::nullopt);
  check_same_as_input(op, input, residual, "residual");
  check_out(op, input, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, Meta, m) {
  m.impl("add_layer_norm", TORCH_FN(add_layer_norm_meta));
  m.impl("add_layer_norm_fwd", TORCH_FN(add_layer_norm_fwd_meta));
  m.impl("add_layer_norm_inplace", TORCH_FN(add_layer_norm_inplace_meta));
  m.impl("add_rms_norm", TORCH_FN(add_rms_norm_meta));
  m.impl("add_rms_norm_fwd", TORCH_FN(add_rms_norm_fwd_meta));
  m.impl("add_rms_norm_inplace", TORCH_FN(add_rms_norm_inplace_meta));
  m.impl("layer_norm", TORCH_FN(layer_norm_meta));
  m.impl("layer_norm.out", TORCH_FN(layer_norm_out_meta));
  m.impl("layer_norm_fwd", TORCH_FN(layer_norm_fwd_meta));
  m.impl("layer_norm_bwd", TORCH_FN(layer_norm_bwd_meta));
  m.impl("rms_norm", TORCH_FN(rms_norm_meta));
  m.impl("rms_norm.out", TORCH_FN(rms_norm_out_meta));
  m.impl("rms_norm_fwd", TORCH_FN(rms_norm_fwd_meta));
  m.impl("rms_norm_bwd", TORCH_FN(rms_norm_bwd_meta));
}

}  // namespace layernorm_ext
