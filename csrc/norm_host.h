// Backend-independent host side of every op: validate, view the input as rows, allocate outputs,
// then hand a plain problem description to a backend launcher (CPU or CUDA). The op functions
// registered by each backend are the templates at the bottom, instantiated with that backend's
// launchers, so CPU and CUDA cannot drift apart in checks, shapes, dtypes or empty handling.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>

#include <array>
#include <optional>
#include <tuple>

#include "checks.h"

namespace layernorm_ext {

enum class Norm : int { kLayerNorm = 0, kRMSNorm = 1 };

// Op names used in error messages.
inline const char* op_name(Norm kind) {
  return kind == Norm::kLayerNorm ? "layernorm_ext::layer_norm" : "layernorm_ext::rms_norm";
}

// Index into the kernels' dtype-combination tables (same order as cpu::DTypeCombo).
int dtype_combo(at::ScalarType input, const at::Tensor& weight, const at::Tensor& bias);

// A forward call, validated and laid out as M rows of N elements.
struct FwdProblem {
  Norm kind;
  int64_t M;
  int64_t N;
  at::Tensor x;  // rows of the input, x_stride apart (may be the caller's strided tensor)
  int64_t x_stride;
  at::Tensor weight;  // contiguous [N], or undefined
  at::Tensor bias;    // contiguous [N], or undefined (always undefined for RMSNorm)
  at::Tensor y;       // rows of the output, y_stride apart
  int64_t y_stride;
  bool y_fresh = false;  // y was allocated by this call (not the caller's out= buffer)
  at::Tensor mean;       // [M] accumulation type, or undefined (not requested / RMSNorm)
  at::Tensor rstd;       // [M] accumulation type, or undefined (not requested)
  // Fused residual add (undefined when absent): residual_out = input + residual is written first,
  // then normalised. x is then the input's rows and the kernel reads residual_out for statistics.
  at::Tensor residual;
  int64_t residual_stride = 0;
  at::Tensor residual_out;  // rows residual_out_stride apart
  int64_t residual_out_stride = 0;
  double eps;
  bool zero_centered_weight;
  int combo;
};

// A backward call. dx / dweight / dbias are undefined when not requested.
struct BwdProblem {
  Norm kind;
  int64_t M;
  int64_t N;
  at::Tensor dy;
  int64_t dy_stride;
  at::Tensor x;
  int64_t x_stride;
  at::Tensor mean;  // contiguous [M] (LayerNorm), else undefined
  at::Tensor rstd;  // contiguous [M]
  at::Tensor weight;
  at::Tensor dx;             // contiguous, input's shape
  at::Tensor grad_residual;  // rows of the gradient of residual_out (fused add), or undefined
  int64_t grad_residual_stride = 0;
  at::Tensor dweight;
  at::Tensor dbias;
  bool zero_centered_weight;
  int combo;
};

using FwdLauncher = void (*)(const FwdProblem&);
using BwdLauncher = void (*)(const BwdProblem&);

// Resolves RMSNorm's optional eps as torch does: the machine epsilon of the computation type
// (fp32 for fp16 / bf16 / fp32 input, fp64 for fp64).
double rms_eps(const at::Tensor& input, std::optional<double> eps);

// Optional tensors of a forward call.
struct FwdExtras {
  const at::Tensor* out = nullptr;           // out= for the normalised result
  const at::Tensor* residual = nullptr;      // fused residual add
  const at::Tensor* residual_out = nullptr;  // where input + residual goes (may be `residual`)
  const char* op = nullptr;  // op name for messages (default: layer_norm / rms_norm)
};

// Validates and lays out a forward call; stats are allocated when want_stats. With a residual and
// `fuse_add` false, residual_out is computed here (at::add) and the launcher sees a plain norm of
// it: for backends whose kernels do not fuse the add yet.
FwdProblem prepare_forward(Norm kind, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps,
                           bool zero_centered_weight, bool want_stats, const FwdExtras& extras = {},
                           bool fuse_add = true);

// Copies results into caller-provided tensors if the launcher had to write into temporaries.
void finish_forward(const FwdProblem& p, const FwdExtras& extras);

// grad_residual: gradient of residual_out of a fused add, added into dx (by the kernel when
// fuse_add, else here after the launch, see finish_backward).
BwdProblem prepare_backward(Norm kind, const at::Tensor& grad_out, const at::Tensor& input,
                            c10::SymIntArrayRef normalized_shape,
                            const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, bool zero_centered_weight,
                            std::array<bool, 3> output_mask,
                            const std::optional<at::Tensor>& grad_residual, bool fuse_add);

// For backends that do not fuse the residual gradient: dx += grad_residual.
void finish_backward(BwdProblem& p, const std::optional<at::Tensor>& grad_residual, bool fuse_add);

// A gradient that was not requested comes back as an empty 1-D tensor (a fixed, simple shape
// for the fake kernels); the autograd layer turns it into "no gradient".
at::Tensor not_requested(const at::Tensor& input);

// --- Op bodies, instantiated by each backend with its launchers. ------------------------------
// kFusedAdd: the backend's kernels implement FwdProblem::residual and BwdProblem::grad_residual.
// It defaults to false so that a backend which does not know about them still computes the
// right thing (the host adds, unfused).

template <FwdLauncher Launch>
at::Tensor layer_norm_impl(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps,
                           bool zero_centered_weight) {
  FwdProblem p = prepare_forward(Norm::kLayerNorm, input, normalized_shape, weight, bias, eps,
                                 zero_centered_weight, /*want_stats=*/false);
  Launch(p);
  return p.y;
}

template <FwdLauncher Launch>
void layer_norm_out_impl(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                         const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, double eps,
                         bool zero_centered_weight, at::Tensor& out) {
  FwdExtras extras;
  extras.out = &out;
  FwdProblem p = prepare_forward(Norm::kLayerNorm, input, normalized_shape, weight, bias, eps,
                                 zero_centered_weight, /*want_stats=*/false, extras);
  Launch(p);
  finish_forward(p, extras);
}

template <FwdLauncher Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_impl(
    const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool zero_centered_weight) {
  FwdProblem p = prepare_forward(Norm::kLayerNorm, input, normalized_shape, weight, bias, eps,
                                 zero_centered_weight, /*want_stats=*/true);
  Launch(p);
  return {p.y, p.mean, p.rstd};
}

template <BwdLauncher Launch, bool kFusedAdd = false>
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_impl(
    const at::Tensor& grad_out, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool zero_centered_weight,
    std::array<bool, 3> output_mask, const std::optional<at::Tensor>& grad_residual) {
  BwdProblem p =
      prepare_backward(Norm::kLayerNorm, grad_out, input, normalized_shape, mean, rstd, weight,
                       bias, zero_centered_weight, output_mask, grad_residual, kFusedAdd);
  Launch(p);
  finish_backward(p, grad_residual, kFusedAdd);
  return {p.dx.defined() ? p.dx : not_requested(input),
          p.dweight.defined() ? p.dweight : not_requested(input),
          p.dbias.defined() ? p.dbias : not_requested(input)};
}

template <FwdLauncher Launch>
at::Tensor rms_norm_impl(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                         const std::optional<at::Tensor>& weight, std::optional<double> eps,
                         bool zero_centered_weight) {
  FwdProblem p = prepare_forward(Norm::kRMSNorm, input, normalized_shape, weight, std::nullopt,
                                 rms_eps(input, eps), zero_centered_weight, false);
  Launch(p);
  return p.y;
}

template <FwdLauncher Launch>
void rms_norm_out_impl(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                       const std::optional<at::Tensor>& weight, std::optional<double> eps,
                       bool zero_centered_weight, at::Tensor& out) {
  FwdExtras extras;
  extras.out = &out;
  FwdProblem p = prepare_forward(Norm::kRMSNorm, input, normalized_shape, weight, std::nullopt,
                                 rms_eps(input, eps), zero_centered_weight, false, extras);
  Launch(p);
  finish_forward(p, extras);
}

template <FwdLauncher Launch>
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_impl(const at::Tensor& input,
                                                     c10::SymIntArrayRef normalized_shape,
                                                     const std::optional<at::Tensor>& weight,
                                                     std::optional<double> eps,
                                                     bool zero_centered_weight) {
  FwdProblem p = prepare_forward(Norm::kRMSNorm, input, normalized_shape, weight, std::nullopt,
                                 rms_eps(input, eps), zero_centered_weight, true);
  Launch(p);
  return {p.y, p.rstd};
}

template <BwdLauncher Launch, bool kFusedAdd = false>
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_impl(
    const at::Tensor& grad_out, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight, bool zero_centered_weight,
    std::array<bool, 2> output_mask, const std::optional<at::Tensor>& grad_residual) {
  BwdProblem p = prepare_backward(
      Norm::kRMSNorm, grad_out, input, normalized_shape, std::nullopt, rstd, weight, std::nullopt,
      zero_centered_weight, {output_mask[0], output_mask[1], false}, grad_residual, kFusedAdd);
  Launch(p);
  finish_backward(p, grad_residual, kFusedAdd);
  return {p.dx.defined() ? p.dx : not_requested(input),
          p.dweight.defined() ? p.dweight : not_requested(input)};
}

// --- Fused residual add + norm. -----------------------------------------------------------------

template <FwdLauncher Launch, bool kFusedAdd = false>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_fwd_impl(
    Norm kind, const at::Tensor& input, const at::Tensor& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool zero_centered_weight, bool want_stats) {
  FwdExtras extras;
  extras.residual = &residual;
  extras.op =
      kind == Norm::kLayerNorm ? "layernorm_ext::add_layer_norm" : "layernorm_ext::add_rms_norm";
  FwdProblem p = prepare_forward(kind, input, normalized_shape, weight, bias, eps,
                                 zero_centered_weight, want_stats, extras, kFusedAdd);
  Launch(p);
  return {p.y, p.residual_out, p.mean, p.rstd};
}

template <FwdLauncher Launch, bool kFusedAdd = false>
std::tuple<at::Tensor, at::Tensor> add_layer_norm_impl(const at::Tensor& input,
                                                       const at::Tensor& residual,
                                                       c10::SymIntArrayRef normalized_shape,
                                                       const std::optional<at::Tensor>& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       double eps, bool zero_centered_weight) {
  auto r = add_norm_fwd_impl<Launch, kFusedAdd>(Norm::kLayerNorm, input, residual, normalized_shape,
                                                weight, bias, eps, zero_centered_weight, false);
  return {std::get<0>(r), std::get<1>(r)};
}

template <FwdLauncher Launch, bool kFusedAdd = false>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_impl(
    const at::Tensor& input, const at::Tensor& residual, c10::SymIntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool zero_centered_weight) {
  return add_norm_fwd_impl<Launch, kFusedAdd>(Norm::kLayerNorm, input, residual, normalized_shape,
                                              weight, bias, eps, zero_centered_weight, true);
}

template <FwdLauncher Launch, bool kFusedAdd = false>
std::tuple<at::Tensor, at::Tensor> add_rms_norm_impl(
    const at::Tensor& input, const at::Tensor& residual, c10::SymIntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, std::optional<double> eps, bool zero_centered_weight) {
  auto r = add_norm_fwd_impl<Launch, kFusedAdd>(Norm::kRMSNorm, input, residual, normalized_shape,
                                                weight, std::nullopt, rms_eps(input, eps),
                                                zero_centered_weight, false);
  return {std::get<0>(r), std::get<1>(r)};
}

template <FwdLauncher Launch, bool kFusedAdd = false>
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd_impl(
    const at::Tensor& input, const at::Tensor& residual, c10::SymIntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, std::optional<double> eps, bool zero_centered_weight) {
  auto r = add_norm_fwd_impl<Launch, kFusedAdd>(Norm::kRMSNorm, input, residual, normalized_shape,
                                                weight, std::nullopt, rms_eps(input, eps),
                                                zero_centered_weight, true);
  return {std::get<0>(r), std::get<1>(r), std::get<3>(r)};
}

// In place, for inference: residual <- input + residual, out <- norm(residual). `out` may be
// `input` itself (each row is read before it is overwritten).
template <FwdLauncher Launch, bool kFusedAdd = false>
void add_norm_inplace_impl(Norm kind, const at::Tensor& input, at::Tensor& residual,
                           c10::SymIntArrayRef normalized_shape,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps,
                           bool zero_centered_weight, at::Tensor& out) {
  FwdExtras extras;
  extras.out = &out;
  extras.residual = &residual;
  extras.residual_out = &residual;
  extras.op =
      kind == Norm::kLayerNorm ? "layernorm_ext::add_layer_norm_" : "layernorm_ext::add_rms_norm_";
  FwdProblem p = prepare_forward(kind, input, normalized_shape, weight, bias, eps,
                                 zero_centered_weight, false, extras, kFusedAdd);
  Launch(p);
  finish_forward(p, extras);
}

template <FwdLauncher Launch, bool kFusedAdd = false>
void add_layer_norm_inplace_impl(const at::Tensor& input, at::Tensor& residual,
                                 c10::SymIntArrayRef normalized_shape,
                                 const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps,
                                 bool zero_centered_weight, at::Tensor& out) {
  add_norm_inplace_impl<Launch, kFusedAdd>(Norm::kLayerNorm, input, residual, normalized_shape,
                                           weight, bias, eps, zero_centered_weight, out);
}

template <FwdLauncher Launch, bool kFusedAdd = false>
void add_rms_norm_inplace_impl(const at::Tensor& input, at::Tensor& residual,
                               c10::SymIntArrayRef normalized_shape,
                               const std::optional<at::Tensor>& weight, std::optional<double> eps,
                               bool zero_centered_weight, at::Tensor& out) {
  add_norm_inplace_impl<Launch, kFusedAdd>(Norm::kRMSNorm, input, residual, normalized_shape,
                                           weight, std::nullopt, rms_eps(input, eps),
                                           zero_centered_weight, out);
}

}  // namespace layernorm_ext
