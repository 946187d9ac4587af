#include "norm_host.h"

#include "cpu/large_alloc.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>

#include <limits>

namespace layernorm_ext {

int dtype_combo(at::ScalarType input, const at::Tensor& weight, const at::Tensor& bias) {
  const at::Tensor& param = weight.defined() ? weight : bias;
  const bool mixed = param.defined() && param.scalar_type() != input;
  switch (input) {
    case at::kFloat:
      return 0;
    case at::kDouble:
      return 1;
    case at::kHalf:
      return mixed ? 4 : 2;
    case at::kBFloat16:
      return mixed ? 5 : 3;
    default:
      TORCH_INTERNAL_ASSERT(false, "dtype_combo: unvalidated dtype ", input);
  }
}

double rms_eps(const at::Tensor& input, std::optional<double> eps) {
  if (eps.has_value()) {
    return *eps;
  }
  return input.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                            : static_cast<double>(std::numeric_limits<float>::epsilon());
}

at::Tensor not_requested(const at::Tensor& input) { return at::empty({0}, input.options()); }

FwdProblem prepare_forward(Norm kind, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps,
                           bool zero_centered_weight, bool want_stats, const at::Tensor* out) {
  const char* op = op_name(kind);
  check_norm_inputs(op, input, normalized_shape, weight, bias);
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  const RowShape shape = row_shape(input, nd);

  FwdProblem p;
  p.kind = kind;
  p.M = shape.M;
  p.N = shape.N;
  Rows rows = as_rows(input, nd);
  p.x = std::move(rows.data);
  p.x_stride = rows.stride;
  p.weight = contiguous_param(weight);
  p.bias = kind == Norm::kLayerNorm ? contiguous_param(bias) : at::Tensor();
  p.eps = eps;
  p.zero_centered_weight = zero_centered_weight;
  p.combo = dtype_combo(input.scalar_type(), p.weight, p.bias);

  bool direct = false;
  if (out != nullptr) {
    check_and_resize_out(op, input, *out);
    const int64_t s = row_stride_or_neg(*out, nd);
    // Write in place only where rows do not overlap.
    direct = s >= 0 && (p.M <= 1 || s >= p.N);
    if (direct) {
      p.y = *out;
      p.y_stride = s;
    }
  }
  if (!direct) {
    p.y = cpu::empty_output(input.sizes(), input.options());
    p.y_stride = p.N;
  }
  if (want_stats) {
    const auto stat_options = input.options().dtype(acc_type(input.scalar_type()));
    const c10::SymDimVector stat_shape = stat_sym_shape(input, nd);
    if (kind == Norm::kLayerNorm) {
      p.mean = at::empty_symint(stat_shape, stat_options);
    }
    p.rstd = at::empty_symint(stat_shape, stat_options);
    if (p.N == 0 && p.M > 0) {
      // No element to average: report the statistics of an empty set as NaN rather than
      // leaving uninitialised memory behind.
      if (p.mean.defined()) p.mean.fill_(std::numeric_limits<double>::quiet_NaN());
      p.rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    }
  }
  return p;
}

void finish_forward(const FwdProblem& p, const at::Tensor* out) {
  if (out != nullptr && !p.y.is_same(*out)) {
    out->copy_(p.y);
  }
}

BwdProblem prepare_backward(Norm kind, const at::Tensor& grad_out, const at::Tensor& input,
                            c10::SymIntArrayRef normalized_shape,
                            const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, bool zero_centered_weight,
                            std::array<bool, 3> output_mask) {
  const char* op = kind == Norm::kLayerNorm ? "layernorm_ext::layer_norm_bwd"
                                            : "layernorm_ext::rms_norm_bwd";
  check_norm_inputs(op, input, normalized_shape, weight, bias);
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  check_norm_backward_inputs(op, grad_out, input, nd, mean, rstd);
  const RowShape shape = row_shape(input, nd);

  BwdProblem p;
  p.kind = kind;
  p.M = shape.M;
  p.N = shape.N;
  Rows x_rows = as_rows(input, nd);
  p.x = std::move(x_rows.data);
  p.x_stride = x_rows.stride;
  Rows dy_rows = as_rows(grad_out, nd);
  p.dy = std::move(dy_rows.data);
  p.dy_stride = dy_rows.stride;
  if (kind == Norm::kLayerNorm) {
    p.mean = mean->contiguous();
  }
  p.rstd = rstd.contiguous();
  p.weight = contiguous_param(weight);
  const at::Tensor b = contiguous_param(bias);
  p.zero_centered_weight = zero_centered_weight;
  p.combo = dtype_combo(input.scalar_type(), p.weight, b);

  if (output_mask[0]) {
    p.dx = cpu::empty_output(input.sizes(), input.options());
  }
  // With no rows the parameter gradients are sums over nothing: zeros, not garbage.
  if (output_mask[1] && p.weight.defined()) {
    p.dweight = p.M == 0 ? at::zeros_like(p.weight) : at::empty_like(p.weight);
  }
  if (output_mask[2] && b.defined()) {
    p.dbias = p.M == 0 ? at::zeros_like(b) : at::empty_like(b);
  }
  return p;
}

}  // namespace layernorm_ext
