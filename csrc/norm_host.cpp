#include "norm_host.h"

#include <ATen/EmptyTensor.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <utility>

#include "cpu/pages.h"

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
  return input.scalar_type() == at::kDouble
             ? std::numeric_limits<double>::epsilon()
             : static_cast<double>(std::numeric_limits<float>::epsilon());
}

namespace {

// Every tensor these kernels allocate. On CPU it comes straight from the CPU allocator
// (at::detail::empty_cpu, as ATen's own CPU kernels allocate): at::empty's dispatcher round trip
// measured ~0.1 us per tensor, a tenth of a whole (1, 50) call. A large fresh one is advised
// onto transparent huge pages before anything writes it (cpu/pages.cpp: its page faults cost
// more than the kernel). Elsewhere through at::empty.
// (These run below the dispatcher, at the backend's key: nothing above it needs to see them.)
at::Tensor new_tensor(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().is_cpu()) {
    at::Tensor t = at::detail::empty_cpu(sizes, options);
    cpu::advise_huge_pages(t.mutable_data_ptr(), static_cast<int64_t>(t.nbytes()));
    return t;
  }
  return at::empty(sizes, options);
}

// A fresh contiguous tensor of the input's shape and options (outputs the op allocates itself).
at::Tensor empty_contiguous_like(const at::Tensor& input) {
  return new_tensor(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace

at::Tensor not_requested(const at::Tensor& input) { return new_tensor({0}, input.options()); }

namespace {

// Rows of a tensor the kernel writes: the tensor itself when its rows do not overlap, else a
// contiguous temporary that finish_forward copies back.
std::pair<at::Tensor, int64_t> writable_rows(const at::Tensor& t, int64_t nd, int64_t M,
                                             int64_t N) {
  const int64_t s = row_stride_or_neg(t, nd);
  if (s >= 0 && (M <= 1 || s >= N)) {
    return {t, s};
  }
  return {empty_contiguous_like(t), N};
}

void check_residual(const char* op, const at::Tensor& input, const at::Tensor& residual,
                    const char* name) {
  TORCH_CHECK(residual.sym_sizes().equals(input.sym_sizes()), op, ": expected ", name,
              " to have the input's shape ", input.sym_sizes(), ", but got ", residual.sym_sizes());
  TORCH_CHECK(residual.scalar_type() == input.scalar_type(), op, ": expected ", name,
              " to have the input's dtype (", input.scalar_type(), "), but got ",
              residual.scalar_type());
  TORCH_CHECK(residual.device() == input.device(), op,
              ": Expected all tensors to be on the same device, but found at least two devices, ",
              input.device(), " and ", residual.device(), "!");
}

}  // namespace

FwdProblem prepare_forward(Norm kind, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps,
                           bool zero_centered_weight, bool want_stats, const FwdExtras& extras,
                           bool fuse_add) {
  const char* op = extras.op != nullptr ? extras.op : op_name(kind);
  check_norm_inputs(op, input, normalized_shape, weight, bias);
  const int64_t nd = static_cast<int64_t>(normalized_shape.size());
  const RowShape shape = row_shape(input, nd);

  FwdProblem p;
  p.kind = kind;
  p.M = shape.M;
  p.N = shape.N;
  p.weight = contiguous_param(weight);
  p.bias = kind == Norm::kLayerNorm ? contiguous_param(bias) : at::Tensor();
  p.eps = eps;
  p.zero_centered_weight = zero_centered_weight;
  p.combo = dtype_combo(input.scalar_type(), p.weight, p.bias);

  if (extras.residual != nullptr) {
    check_residual(op, input, *extras.residual, "residual");
    TORCH_CHECK(extras.out == nullptr || extras.residual_out == nullptr ||
                    !extras.out->is_same(*extras.residual_out),
                op, ": out and the updated residual must be different tensors");
    if (extras.residual_out != nullptr && !extras.residual_out->is_same(*extras.residual)) {
      check_residual(op, input, *extras.residual_out, "residual_out");
    }
    if (extras.residual_out != nullptr) {
      at::assert_no_internal_overlap(*extras.residual_out);
      at::assert_no_partial_overlap(*extras.residual_out, input);
      for (const std::optional<at::Tensor>* t : {&weight, &bias}) {
        if (t->has_value() && (*t)->defined()) at::assert_no_overlap(*extras.residual_out, **t);
      }
      std::tie(p.residual_out, p.residual_out_stride) =
          writable_rows(*extras.residual_out, nd, p.M, p.N);
    } else {
      p.residual_out = empty_contiguous_like(input);
      p.residual_out_stride = p.N;
    }
  }
  if (extras.residual != nullptr && !fuse_add) {
    // The backend normalises a precomputed sum: same rounding (one add in the storage dtype).
    at::add_out(p.residual_out, input, *extras.residual);
    Rows rows = as_rows(p.residual_out, nd);
    p.x = std::move(rows.data);
    p.x_stride = rows.stride;
  } else {
    Rows rows = as_rows(input, nd);
    p.x = std::move(rows.data);
    p.x_stride = rows.stride;
    if (extras.residual != nullptr) {
      Rows res = as_rows(*extras.residual, nd);
      p.residual = std::move(res.data);
      p.residual_stride = res.stride;
    }
  }

  bool direct = false;
  if (extras.out != nullptr) {
    check_out(op, input, *extras.out);
    // As ATen's out= functions: no internal overlap, no partial overlap with the input (exactly
    // the input is fine: each row is read before it is written), none with anything else read.
    at::assert_no_internal_overlap(*extras.out);
    at::assert_no_partial_overlap(*extras.out, input);
    for (const std::optional<at::Tensor>* t : {&weight, &bias}) {
      if (t->has_value() && (*t)->defined()) at::assert_no_overlap(*extras.out, **t);
    }
    if (extras.residual != nullptr) at::assert_no_overlap(*extras.out, *extras.residual);
    std::tie(p.y, p.y_stride) = writable_rows(*extras.out, nd, p.M, p.N);
    direct = true;
  }
  if (!direct) {
    p.y = empty_contiguous_like(input);
    p.y_stride = p.N;
    p.y_fresh = true;
  }
  if (want_stats) {
    const auto stat_options = input.options().dtype(acc_type(input.scalar_type()));
    // Backend kernels see concrete sizes (symbolic ones exist only in the meta kernels).
    const c10::SymDimVector stat_shape = stat_sym_shape(input, nd);
    const at::IntArrayRef sizes = C10_AS_INTARRAYREF_SLOW(stat_shape);
    if (kind == Norm::kLayerNorm) {
      p.mean = new_tensor(sizes, stat_options);
    }
    p.rstd = new_tensor(sizes, stat_options);
    if (p.N == 0 && p.M > 0) {
      // Rows without elements: empty sums are zero, so mean 0 (as ATen) and variance 0, i.e.
      // rstd = 1/sqrt(eps) (ATen leaves NaN there). Finite, so traced and eager runs compare equal.
      if (p.mean.defined()) p.mean.zero_();
      p.rstd.fill_(1.0 / std::sqrt(eps));
    }
  }
  return p;
}

void finish_forward(const FwdProblem& p, const FwdExtras& extras) {
  if (extras.out != nullptr && !p.y.is_same(*extras.out)) {
    extras.out->copy_(p.y);
  }
  if (extras.residual_out != nullptr && !p.residual_out.is_same(*extras.residual_out)) {
    extras.residual_out->copy_(p.residual_out);
  }
}

BwdProblem prepare_backward(Norm kind, const at::Tensor& grad_out, const at::Tensor& input,
                            c10::SymIntArrayRef normalized_shape,
                            const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, bool zero_centered_weight,
                            std::array<bool, 3> output_mask,
                            const std::optional<at::Tensor>& grad_residual, bool fuse_add) {
  const char* op =
      kind == Norm::kLayerNorm ? "layernorm_ext::layer_norm_bwd" : "layernorm_ext::rms_norm_bwd";
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
    p.dx = empty_contiguous_like(input);
    if (grad_residual.has_value() && grad_residual->defined()) {
      check_residual(op, input, *grad_residual, "grad_residual");
      if (fuse_add) {
        Rows g = as_rows(*grad_residual, nd);
        p.grad_residual = std::move(g.data);
        p.grad_residual_stride = g.stride;
      }
    }
  }
  // With no rows the parameter gradients are sums over nothing: zeros, not garbage.
  if (output_mask[1] && p.weight.defined()) {
    p.dweight =
        p.M == 0 ? at::zeros_like(p.weight) : new_tensor(p.weight.sizes(), p.weight.options());
  }
  if (output_mask[2] && b.defined()) {
    p.dbias = p.M == 0 ? at::zeros_like(b) : new_tensor(b.sizes(), b.options());
  }
  return p;
}

void finish_backward(BwdProblem& p, const std::optional<at::Tensor>& grad_residual, bool fuse_add) {
  if (!fuse_add && p.dx.defined() && grad_residual.has_value() && grad_residual->defined()) {
    p.dx.add_(*grad_residual);
  }
}

}  // namespace layernorm_ext
