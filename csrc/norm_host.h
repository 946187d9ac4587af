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
  at::Tensor mean;  // [M] accumulation type, or undefined (not requested / RMSNorm)
  at::Tensor rstd;  // [M] accumulation type, or undefined (not requested)
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
  at::Tensor dx;  // contiguous, input's shape
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

// `out` (optional) is an out= tensor to write into; stats are allocated when want_stats.
FwdProblem prepare_forward(Norm kind, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps,
                           bool zero_centered_weight, bool want_stats, const at::Tensor* out);

// Copies the result into `out` if the launcher had to write into a temporary.
void finish_forward(const FwdProblem& p, const at::Tensor* out);

BwdProblem prepare_backward(Norm kind, const at::Tensor& grad_out, const at::Tensor& input,
                            c10::SymIntArrayRef normalized_shape,
                            const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, bool zero_centered_weight,
                            std::array<bool, 3> output_mask);

// A gradient that was not requested comes back as an empty 1-D tensor (a fixed, simple shape
// for the fake kernels); the autograd layer turns it into "no gradient".
at::Tensor not_requested(const at::Tensor& input);

// --- Op bodies, instantiated by each backend with its launchers. ------------------------------

template <FwdLauncher Launch>
at::Tensor layer_norm_impl(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps,
                           bool zero_centered_weight) {
  FwdProblem p = prepare_forward(Norm::kLayerNorm, input, normalized_shape, weight, bias, eps,
                                 zero_centered_weight, /*want_stats=*/false, nullptr);
  Launch(p);
  return p.y;
}

template <FwdLauncher Launch>
at::Tensor& layer_norm_out_impl(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                                const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, double eps,
                                bool zero_centered_weight, at::Tensor& out) {
  FwdProblem p = prepare_forward(Norm::kLayerNorm, input, normalized_shape, weight, bias, eps,
                                 zero_centered_weight, /*want_stats=*/false, &out);
  Launch(p);
  finish_forward(p, &out);
  return out;
}

template <FwdLauncher Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_impl(
    const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool zero_centered_weight) {
  FwdProblem p = prepare_forward(Norm::kLayerNorm, input, normalized_shape, weight, bias, eps,
                                 zero_centered_weight, /*want_stats=*/true, nullptr);
  Launch(p);
  return {p.y, p.mean, p.rstd};
}

template <BwdLauncher Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_impl(
    const at::Tensor& grad_out, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool zero_centered_weight,
    std::array<bool, 3> output_mask) {
  BwdProblem p = prepare_backward(Norm::kLayerNorm, grad_out, input, normalized_shape, mean, rstd,
                                  weight, bias, zero_centered_weight, output_mask);
  Launch(p);
  return {p.dx.defined() ? p.dx : not_requested(input),
          p.dweight.defined() ? p.dweight : not_requested(input),
          p.dbias.defined() ? p.dbias : not_requested(input)};
}

template <FwdLauncher Launch>
at::Tensor rms_norm_impl(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                         const std::optional<at::Tensor>& weight, std::optional<double> eps,
                         bool zero_centered_weight) {
  FwdProblem p = prepare_forward(Norm::kRMSNorm, input, normalized_shape, weight, std::nullopt,
                                 rms_eps(input, eps), zero_centered_weight, false, nullptr);
  Launch(p);
  return p.y;
}

template <FwdLauncher Launch>
at::Tensor& rms_norm_out_impl(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                              const std::optional<at::Tensor>& weight, std::optional<double> eps,
                              bool zero_centered_weight, at::Tensor& out) {
  FwdProblem p = prepare_forward(Norm::kRMSNorm, input, normalized_shape, weight, std::nullopt,
                                 rms_eps(input, eps), zero_centered_weight, false, &out);
  Launch(p);
  finish_forward(p, &out);
  return out;
}

template <FwdLauncher Launch>
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_impl(const at::Tensor& input,
                                                     c10::SymIntArrayRef normalized_shape,
                                                     const std::optional<at::Tensor>& weight,
                                                     std::optional<double> eps,
                                                     bool zero_centered_weight) {
  FwdProblem p = prepare_forward(Norm::kRMSNorm, input, normalized_shape, weight, std::nullopt,
                                 rms_eps(input, eps), zero_centered_weight, true, nullptr);
  Launch(p);
  return {p.y, p.rstd};
}

template <BwdLauncher Launch>
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_impl(const at::Tensor& grad_out,
                                                     const at::Tensor& input,
                                                     c10::SymIntArrayRef normalized_shape,
                                                     const at::Tensor& rstd,
                                                     const std::optional<at::Tensor>& weight,
                                                     bool zero_centered_weight,
                                                     std::array<bool, 2> output_mask) {
  BwdProblem p =
      prepare_backward(Norm::kRMSNorm, grad_out, input, normalized_shape, std::nullopt, rstd,
                       weight, std::nullopt, zero_centered_weight,
                       {output_mask[0], output_mask[1], false});
  Launch(p);
  return {p.dx.defined() ? p.dx : not_requested(input),
          p.dweight.defined() ? p.dweight : not_requested(input)};
}

}  // namespace layernorm_ext
