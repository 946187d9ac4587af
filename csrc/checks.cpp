#include "checks.h"

#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <sstream>

namespace layernorm_ext {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool is_half_or_bf16(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

void check_param_dtype(const char* op, const char* name, at::ScalarType input_t,
                       const at::Tensor& p) {
  const at::ScalarType pt = p.scalar_type();
  const bool ok = pt == input_t || (is_half_or_bf16(input_t) && pt == at::kFloat);
  TORCH_CHECK(ok, op, ": expected ", name, " to have the input's dtype (", input_t, ")",
              is_half_or_bf16(input_t) ? " or Float" : "", ", but got ", name, " of dtype ", pt,
              ". Supported combinations: input and parameters of one dtype (Float, Double, Half, "
              "BFloat16), or Half/BFloat16 input with Float parameters.");
}

void check_same_device(const char* op, const at::Tensor& input, const at::Tensor& other) {
  TORCH_CHECK(input.device() == other.device(), op,
              ": Expected all tensors to be on the same device, but found at least two devices, ",
              input.device(), " and ", other.device(), "!");
}

}  // namespace

at::ScalarType acc_type(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_norm_inputs(const char* op, const at::Tensor& input,
                       c10::SymIntArrayRef normalized_shape,
                       const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias) {
  const int64_t normalized_ndim = static_cast<int64_t>(normalized_shape.size());
  // Shape checks, in ATen's order and with ATen's words (aten/src/ATen/native/layer_norm.h).
  TORCH_CHECK(normalized_ndim >= 1, op,
              ": Expected normalized_shape to be at least 1-dimensional, i.e., containing at "
              "least one element, but got normalized_shape = ",
              normalized_shape);
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_w || weight->sym_sizes().equals(normalized_shape), op,
              ": Expected weight to be of same shape as normalized_shape, but got weight of shape ",
              weight->sym_sizes(), " and normalized_shape = ", normalized_shape);
  TORCH_CHECK(!has_b || bias->sym_sizes().equals(normalized_shape), op,
              ": Expected bias to be of same shape as normalized_shape, but got bias of shape ",
              bias->sym_sizes(), " and normalized_shape = ", normalized_shape);
  const c10::SymIntArrayRef input_shape = input.sym_sizes();
  const int64_t input_ndim = input.dim();
  if (input_ndim < normalized_ndim ||
      !input_shape.slice(input_ndim - normalized_ndim).equals(normalized_shape)) {
    std::ostringstream ss;
    ss << op << ": Given normalized_shape=" << normalized_shape << ", expected input with shape [*";
    for (const auto& size : normalized_shape) {
      ss << ", " << size;
    }
    ss << "], but got input of size" << input_shape;
    TORCH_CHECK(false, ss.str());
  }

  // Dtype contract. Checked even for empty input: an integer tensor is an error, not a no-op
  // (pytorch#78444 asserted inside autograd instead).
  const at::ScalarType t = input.scalar_type();
  TORCH_CHECK(is_supported_float(t), op,
              ": expected input to have a floating-point dtype (Float, Double, Half or BFloat16), "
              "but got ",
              t);
  if (has_w) {
    check_param_dtype(op, "weight", t, *weight);
  }
  if (has_b) {
    check_param_dtype(op, "bias", t, *bias);
  }
  if (has_w && has_b) {
    TORCH_CHECK(weight->scalar_type() == bias->scalar_type(), op,
                ": expected weight and bias to have the same dtype, but got weight of dtype ",
                weight->scalar_type(), " and bias of dtype ", bias->scalar_type());
  }

  if (has_w) {
    check_same_device(op, input, *weight);
  }
  if (has_b) {
    check_same_device(op, input, *bias);
  }
}

void check_norm_backward_inputs(const char* op, const at::Tensor& grad_out, const at::Tensor& input,
                                int64_t normalized_ndim, const std::optional<at::Tensor>& mean,
                                const at::Tensor& rstd) {
  TORCH_CHECK(grad_out.sym_sizes().equals(input.sym_sizes()), op,
              ": expected grad_out to have the input's shape ", input.sym_sizes(), ", but got ",
              grad_out.sym_sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), op,
              ": expected grad_out to have the input's dtype (", input.scalar_type(), "), but got ",
              grad_out.scalar_type());
  check_same_device(op, input, grad_out);
  const at::ScalarType acc = acc_type(input.scalar_type());
  c10::SymInt rows = 1;
  for (const auto i : c10::irange(input.dim() - normalized_ndim)) {
    rows *= input.sym_size(i);
  }
  auto check_stat = [&](const char* name, const at::Tensor& s) {
    TORCH_CHECK(s.scalar_type() == acc, op, ": expected ", name, " to have dtype ", acc,
                ", but got ", s.scalar_type());
    TORCH_CHECK(s.sym_numel() == rows, op, ": expected ", name, " to have ", rows,
                " elements (one per row), but got ", s.sym_numel());
    check_same_device(op, input, s);
  };
  if (mean.has_value()) {
    check_stat("mean", *mean);
  }
  check_stat("rstd", rstd);
}

void check_out(const char* op, const at::Tensor& input, const at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == input.scalar_type(), op, ": Expected out tensor to have dtype ",
              input.scalar_type(), ", but got ", out.scalar_type(), " instead");
  check_same_device(op, input, out);
  // No resizing: torch.compile cannot functionalize a custom op that resizes an argument it
  // writes, so eager refuses too rather than behave differently.
  TORCH_CHECK(out.sym_sizes().equals(input.sym_sizes()), op,
              ": expected out to have the input's shape ", input.sym_sizes(), ", but got ",
              out.sym_sizes());
}

c10::SymDimVector stat_sym_shape(const at::Tensor& input, int64_t normalized_ndim) {
  c10::SymDimVector shape;
  const int64_t axis = input.dim() - normalized_ndim;
  shape.reserve(input.dim());
  for (const auto i : c10::irange(input.dim())) {
    shape.push_back(i < axis ? input.sym_size(i) : c10::SymInt(1));
  }
  return shape;
}

RowShape row_shape(const at::Tensor& input, int64_t normalized_ndim) {
  const int64_t axis = input.dim() - normalized_ndim;
  int64_t M = 1;
  int64_t N = 1;
  for (const auto i : c10::irange(input.dim())) {
    (i < axis ? M : N) *= input.size(i);
  }
  return {M, N};
}

int64_t row_stride_or_neg(const at::Tensor& t, int64_t normalized_ndim) {
  const int64_t ndim = t.dim();
  const int64_t axis = ndim - normalized_ndim;
  // The normalized block must be one contiguous run of N elements (size-1 dims have any stride).
  int64_t expected = 1;
  for (int64_t d = ndim - 1; d >= axis; --d) {
    const int64_t size = t.size(d);
    if (size != 1 && t.stride(d) != expected) {
      return -1;
    }
    expected *= size;
  }
  const int64_t N = expected;
  // The leading dims must collapse into a single row stride.
  int64_t row_stride = -1;
  int64_t next_expected = -1;
  for (int64_t d = axis - 1; d >= 0; --d) {
    const int64_t size = t.size(d);
    if (size == 1) {
      continue;
    }
    if (row_stride < 0) {
      row_stride = t.stride(d);
    } else if (t.stride(d) != next_expected) {
      return -1;
    }
    next_expected = t.stride(d) * size;
  }
  return row_stride < 0 ? N : row_stride;
}

Rows as_rows(const at::Tensor& t, int64_t normalized_ndim) {
  const int64_t stride = row_stride_or_neg(t, normalized_ndim);
  if (stride >= 0) {
    return {t, stride};
  }
  at::Tensor c = t.contiguous();
  return {c, row_shape(c, normalized_ndim).N};
}

at::Tensor contiguous_param(const std::optional<at::Tensor>& p) {
  if (!p.has_value() || !p->defined()) {
    return at::Tensor();
  }
  return p->contiguous();
}

}  // namespace layernorm_ext
