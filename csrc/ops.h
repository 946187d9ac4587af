// Typed dispatcher handles for the ops that other ops call (autograd redispatch). Looked up once;
// calling through the dispatcher keeps every backend (CPU, CUDA, Meta/Fake) reachable and lets
// AOTAutograd and export see real ops in the backward graph.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace layernorm_ext::ops {

using OptTensor = std::optional<at::Tensor>;

inline auto& layer_norm() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("layernorm_ext::layer_norm", "")
                       .typed<at::Tensor(const at::Tensor&, c10::SymIntArrayRef, const OptTensor&,
                                         const OptTensor&, double, bool)>();
  return op;
}

inline auto& layer_norm_fwd() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("layernorm_ext::layer_norm_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, c10::SymIntArrayRef, const OptTensor&,
                           const OptTensor&, double, bool)>();
  return op;
}

inline auto& layer_norm_bwd() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("layernorm_ext::layer_norm_bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                           const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                           bool, std::array<bool, 3>, const OptTensor&)>();
  return op;
}

inline auto& rms_norm() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("layernorm_ext::rms_norm", "")
                       .typed<at::Tensor(const at::Tensor&, c10::SymIntArrayRef, const OptTensor&,
                                         std::optional<double>, bool)>();
  return op;
}

inline auto& rms_norm_fwd() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("layernorm_ext::rms_norm_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, c10::SymIntArrayRef, const OptTensor&,
                           std::optional<double>, bool)>();
  return op;
}

inline auto& rms_norm_bwd() {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("layernorm_ext::rms_norm_bwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, const at::Tensor&,
              const OptTensor&, bool, std::array<bool, 2>, const OptTensor&)>();
  return op;
}

inline auto& add_layer_norm() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("layernorm_ext::add_layer_norm", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                           const OptTensor&, const OptTensor&, double, bool)>();
  return op;
}

inline auto& add_layer_norm_fwd() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("layernorm_ext::add_layer_norm_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                           const OptTensor&, const OptTensor&, double, bool)>();
  return op;
}

inline auto& add_rms_norm() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("layernorm_ext::add_rms_norm", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                           const OptTensor&, std::optional<double>, bool)>();
  return op;
}

inline auto& add_rms_norm_fwd() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("layernorm_ext::add_rms_norm_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                           const OptTensor&, std::optional<double>, bool)>();
  return op;
}

// The forms that write into arguments (out=, in-place residual).
inline auto& layer_norm_out() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("layernorm_ext::layer_norm", "out")
                       .typed<void(const at::Tensor&, c10::SymIntArrayRef, const OptTensor&,
                                   const OptTensor&, double, bool, at::Tensor&)>();
  return op;
}

inline auto& rms_norm_out() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("layernorm_ext::rms_norm", "out")
                       .typed<void(const at::Tensor&, c10::SymIntArrayRef, const OptTensor&,
                                   std::optional<double>, bool, at::Tensor&)>();
  return op;
}

inline auto& add_layer_norm_inplace() {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("layernorm_ext::add_layer_norm_inplace", "")
          .typed<void(const at::Tensor&, at::Tensor&, c10::SymIntArrayRef, const OptTensor&,
                      const OptTensor&, double, bool, at::Tensor&)>();
  return op;
}

inline auto& add_rms_norm_inplace() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("layernorm_ext::add_rms_norm_inplace", "")
                       .typed<void(const at::Tensor&, at::Tensor&, c10::SymIntArrayRef,
                                   const OptTensor&, std::optional<double>, bool, at::Tensor&)>();
  return op;
}

}  // namespace layernorm_ext::ops
