// Autograd for the public ops, in C++ at the Autograd dispatch key (the torchvision pattern):
// no Python on the per-call path.
//
//  * No gradient needed (grad mode off, or nothing requires grad): redispatch straight to the
//    y-only kernel; nothing is saved, no graph node is made.
//  * Otherwise the kernel builds the graph node itself, as ATen's generated autograd kernels do
//    (NativeLayerNormBackward0): one NormBackward node for all four ops, its next edges collected
//    from the inputs, the *_fwd op (y plus statistics) redispatched below autograd, the output's
//    history set, and x, the parameters and the statistics saved as SavedVariables (version
//    checked on unpack). Its apply calls the *_bwd op through the dispatcher. A
//    torch::autograd::Function cost ~1.4 us more per call at (1, 768) (VariableInfo per input
//    and output, saved_data hash map, _wrap_outputs' bookkeeping) and refuses functorch
//    transforms (torch.func.grad works with this node).
//  * The *_fwd / *_bwd ops have no derivative formula: differentiating them (double backward
//    included) raises "derivative for ... is not implemented", as autograd's generic fallback
//    would, but from an unboxed kernel (the boxed fallback cost ~1.5 us per call, paid by every
//    backward the engine runs). The out= / in-place forms refuse arguments that require grad.
//  * Forward-mode AD is not implemented: a tangent on any input raises (rather than being
//    silently dropped).

#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>
#include <torch/version.h>

#include <array>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops.h"

namespace layernorm_ext {
namespace {

using torch::autograd::SavedVariable;

// torch >= 2.12 owns autograd nodes through c10::intrusive_ptr; earlier versions (the GPU image
// runs 2.11) through std::shared_ptr with torch::autograd::deleteNode as deleter. Told apart by
// the type, not by a version number.
constexpr bool kIntrusiveNodes =
    std::is_base_of_v<c10::intrusive_ptr_target, torch::autograd::Node>;
template <class T>
using NodePtr = std::conditional_t<kIntrusiveNodes, c10::intrusive_ptr<T>, std::shared_ptr<T>>;

template <class T, class... Args>
NodePtr<T> new_node(Args&&... args) {
  if constexpr (kIntrusiveNodes) {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  } else {
    // deleteNode frees long chains of nodes without deep recursion. It is found by
    // argument-dependent lookup (through Node), so this branch names it only where it exists.
    return NodePtr<T>(new T(std::forward<Args>(args)...), [](T* node) { deleteNode(node); });
  }
}

// Node-creation hooks: torch >= 2.14 fires them for every node it creates (custom Functions and
// generated kernels alike); earlier versions have no such hooks (nor this function).
template <class NodePtr>
void node_created(const NodePtr& node) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 14)
  torch::autograd::fire_node_creation_hooks(node);
#else
  (void)node;
#endif
}
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// Forward-mode AD has no formula here: raise instead of returning an output without tangent.
template <class... Ts>
void check_no_tangent(const char* op, const Ts&... tensors) {
  TORCH_CHECK_NOT_IMPLEMENTED(!(torch::autograd::isFwGradDefined(tensors) || ...),
                              "layernorm_ext::", op,
                              ": forward-mode automatic differentiation is not implemented");
}

// What a NormBackward node differentiates.
struct NormKind {
  bool rms;                   // RMSNorm (no mean, no bias) rather than LayerNorm
  bool fused;                 // add_*_norm: two inputs (input, residual), two outputs
  bool zero_centered_weight;  // the op's keyword
  int64_t normalized_ndim;    // trailing dims normalised (the shape is re-read from the input,
                              // which keeps symbolic sizes symbolic under torch.compile)
};

// The gradients for a NormBackward node's edges. need[i]: edge i wants its gradient. `input` is
// x, or residual_out for the fused ops (whose grads[1] is the gradient of residual_out).
variable_list norm_backward(const NormKind& k, const std::vector<bool>& need,
                            const variable_list& grads, const at::Tensor& input,
                            const OptTensor& weight, const OptTensor& bias, const OptTensor& mean,
                            const at::Tensor& rstd) {
  const size_t w = k.fused ? 2 : 1;  // edge of the weight
  const bool need_in = need[0];
  const bool need_res = k.fused && need[1];
  const bool need_x = need_in || need_res;
  const bool need_w = need[w];
  const bool need_b = !k.rms && need[w + 1];
  variable_list result(need.size());
  const at::Tensor& grad_out = grads[0];
  const at::Tensor grad_res = k.fused ? grads[1] : at::Tensor();
  if (!(need_x || need_w || need_b) || !(grad_out.defined() || grad_res.defined())) {
    return result;
  }
  at::Tensor dx, dw, db;
  if (!grad_out.defined()) {
    dx = grad_res;  // only residual_out was used: nothing flows through the norm
  } else {
    const OptTensor grad_res_opt = grad_res.defined() ? OptTensor(grad_res) : std::nullopt;
    const auto shape = input.sym_sizes().slice(input.dim() - k.normalized_ndim);
    if (k.rms) {
      std::tie(dx, dw) =
          ops::rms_norm_bwd().call(grad_out, input, shape, rstd, weight, k.zero_centered_weight,
                                   {need_x, need_w}, grad_res_opt);
    } else {
      std::tie(dx, dw, db) = ops::layer_norm_bwd().call(grad_out, input, shape, mean.value(), rstd,
                                                        weight, bias, k.zero_centered_weight,
                                                        {need_x, need_w, need_b}, grad_res_opt);
    }
  }
  if (need_in) result[0] = dx;
  // input and residual get the same gradient, as two tensors (autograd may accumulate into one
  // of them in place).
  if (need_res) result[1] = need_in ? dx.clone() : dx;
  if (need_w) result[w] = dw;
  if (need_b) result[w + 1] = db;
  return result;
}

OptTensor opt(at::Tensor t) { return t.defined() ? OptTensor(std::move(t)) : std::nullopt; }

// The backward node of layer_norm, rms_norm, add_layer_norm and add_rms_norm. Next edges, in
// order: input, residual (fused ops only), weight, bias (LayerNorm only); absent optional
// parameters get an invalid edge, as in ATen's generated nodes.
class NormBackward final : public torch::autograd::Node {
 public:
  explicit NormBackward(const NormKind& kind) : kind_(kind) {}

  std::string name() const override {
    return kind_.rms ? (kind_.fused ? "layernorm_ext::AddRMSNormBackward"
                                    : "layernorm_ext::RMSNormBackward")
                     : (kind_.fused ? "layernorm_ext::AddLayerNormBackward"
                                    : "layernorm_ext::LayerNormBackward");
  }

  // `input` is x, or for the fused ops residual_out: an output of this node, saved as such so
  // that it does not hold its own grad_fn (no reference cycle). Call after set_history.
  void save(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
            const at::Tensor& mean, const at::Tensor& rstd) {
    input_ = SavedVariable(input, /*is_output=*/kind_.fused);
    if (weight.has_value()) weight_ = SavedVariable(*weight, false);
    if (bias.has_value()) bias_ = SavedVariable(*bias, false);
    if (mean.defined()) mean_ = SavedVariable(mean, false);
    rstd_ = SavedVariable(rstd, false);
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto self = getptr();
    return norm_backward(kind_, needs(), grads, input_.unpack(self), opt(weight_.unpack(self)),
                         opt(bias_.unpack(self)), opt(mean_.unpack(self)), rstd_.unpack(self));
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : saved()) v->reset_data();
  }

  // Compiled autograd: the saved tensors become graph inputs, the kind specialises the graph,
  // and the backward enters the graph as one opaque call (as ATen's generated nodes do).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(kind_.rms);
    args.collect(kind_.fused);
    args.collect(kind_.zero_centered_weight);
    args.collect(kind_.normalized_ndim);
    args.collect(input_, kind_.fused);
    for (const SavedVariable* v : {&weight_, &bias_, &mean_, &rstd_}) args.collect(*v, false);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    using torch::dynamo::autograd::IValuePacker;
    for (SavedVariable* v : this->saved()) saved.before(*v);
    const auto self = getptr();
    torch::dynamo::autograd::PackedArgs args;
    args.pack(needs());
    args.pack(kind_.rms);
    args.pack(kind_.fused);
    args.pack(kind_.zero_centered_weight);
    args.pack(kind_.normalized_ndim);
    args.pack(input_.unpack(self));
    for (const SavedVariable* v : {&weight_, &bias_, &mean_}) args.pack(opt(v->unpack(self)));
    args.pack(rstd_.unpack(self));
    std::vector<at::TypePtr> schema = {IValuePacker<std::vector<bool>>::packed_type(),
                                       IValuePacker<bool>::packed_type(),
                                       IValuePacker<bool>::packed_type(),
                                       IValuePacker<bool>::packed_type(),
                                       IValuePacker<int64_t>::packed_type(),
                                       IValuePacker<at::Tensor>::packed_type(),
                                       IValuePacker<OptTensor>::packed_type(),
                                       IValuePacker<OptTensor>::packed_type(),
                                       IValuePacker<OptTensor>::packed_type(),
                                       IValuePacker<at::Tensor>::packed_type()};
    const auto& py = torch::dynamo::autograd::getPyCompilerInterface();
    const std::string fn = py->bind_function(saved.get_py_compiler(), "layernorm_ext_NormBackward",
                                             &norm_backward_ivalue, std::move(schema),
                                             /*is_custom_function=*/true, /*is_traceable=*/true);
    variable_list result = py->call_function(
        saved.get_py_compiler(), "apply_functional", fn, grads, args.vec(),
        IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
            torch::dynamo::autograd::get_input_metadata(next_edges())));
    for (SavedVariable* v : this->saved()) saved.after(*v);
    return result;
  }

 private:
  std::array<SavedVariable*, 5> saved() { return {&input_, &weight_, &bias_, &mean_, &rstd_}; }

  std::vector<bool> needs() const {
    std::vector<bool> need(num_outputs());
    for (size_t i = 0; i < need.size(); ++i) need[i] = task_should_compute_output(i);
    return need;
  }

  // norm_backward on the arguments apply_with_saved packs (what the compiled graph calls).
  static variable_list norm_backward_ivalue(const variable_list& grads,
                                            const std::vector<c10::IValue>& packed) {
    torch::dynamo::autograd::PackedArgs args(packed);
    const auto need = args.unpack<std::vector<bool>>();
    NormKind k{};
    k.rms = args.unpack<bool>();
    k.fused = args.unpack<bool>();
    k.zero_centered_weight = args.unpack<bool>();
    k.normalized_ndim = args.unpack<int64_t>();
    const auto input = args.unpack<at::Tensor>();
    const auto weight = args.unpack<OptTensor>();
    const auto bias = args.unpack<OptTensor>();
    const auto mean = args.unpack<OptTensor>();
    const auto rstd = args.unpack<at::Tensor>();
    return norm_backward(k, need, grads, input, weight, bias, mean, rstd);
  }

  NormKind kind_;
  SavedVariable input_, weight_, bias_, mean_, rstd_;
};

NodePtr<NormBackward> make_node(bool rms, bool fused, c10::SymIntArrayRef normalized_shape,
                                bool zero_centered_weight,
                                torch::autograd::edge_list&& next_edges) {
  auto node = new_node<NormBackward>(
      NormKind{rms, fused, zero_centered_weight, static_cast<int64_t>(normalized_shape.size())});
  node->set_next_edges(std::move(next_edges));
  return node;
}

at::Tensor layer_norm_autograd(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                               const OptTensor& weight, const OptTensor& bias, double eps,
                               bool zero_centered_weight) {
  check_no_tangent("layer_norm", input, weight, bias);
  if (!torch::autograd::compute_requires_grad(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::layer_norm().call(input, normalized_shape, weight, bias, eps, zero_centered_weight);
  }
  auto node = make_node(false, false, normalized_shape, zero_centered_weight,
                        torch::autograd::collect_next_edges(input, weight, bias));
  at::Tensor out, mean, rstd;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(out, mean, rstd) = ops::layer_norm_fwd().call(input, normalized_shape, weight, bias,
                                                           eps, zero_centered_weight);
  }
  torch::autograd::set_history(out, node);
  node->save(input, weight, bias, mean, rstd);
  node_created(node);
  return out;
}

at::Tensor rms_norm_autograd(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                             const OptTensor& weight, std::optional<double> eps,
                             bool zero_centered_weight) {
  check_no_tangent("rms_norm", input, weight);
  if (!torch::autograd::compute_requires_grad(input, weight)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::rms_norm().call(input, normalized_shape, weight, eps, zero_centered_weight);
  }
  auto node = make_node(true, false, normalized_shape, zero_centered_weight,
                        torch::autograd::collect_next_edges(input, weight));
  at::Tensor out, rstd;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(out, rstd) =
        ops::rms_norm_fwd().call(input, normalized_shape, weight, eps, zero_centered_weight);
  }
  torch::autograd::set_history(out, node);
  node->save(input, weight, std::nullopt, at::Tensor(), rstd);
  node_created(node);
  return out;
}

// Fused residual add + norm. Both outputs are differentiable; the norm's backward runs on the
// saved sum (residual_out) and adds the gradient of residual_out in the same kernel. input and
// residual receive the same gradient.
std::tuple<at::Tensor, at::Tensor> add_layer_norm_autograd(
    const at::Tensor& input, const at::Tensor& residual, c10::SymIntArrayRef normalized_shape,
    const OptTensor& weight, const OptTensor& bias, double eps, bool zero_centered_weight) {
  check_no_tangent("add_layer_norm", input, residual, weight, bias);
  if (!torch::autograd::compute_requires_grad(input, residual, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::add_layer_norm().call(input, residual, normalized_shape, weight, bias, eps,
                                      zero_centered_weight);
  }
  auto node = make_node(false, true, normalized_shape, zero_centered_weight,
                        torch::autograd::collect_next_edges(input, residual, weight, bias));
  at::Tensor out, residual_out, mean, rstd;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(out, residual_out, mean, rstd) = ops::add_layer_norm_fwd().call(
        input, residual, normalized_shape, weight, bias, eps, zero_centered_weight);
  }
  torch::autograd::set_history(out, node);
  torch::autograd::set_history(residual_out, node);
  node->save(residual_out, weight, bias, mean, rstd);
  node_created(node);
  return {out, residual_out};
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_autograd(
    const at::Tensor& input, const at::Tensor& residual, c10::SymIntArrayRef normalized_shape,
    const OptTensor& weight, std::optional<double> eps, bool zero_centered_weight) {
  check_no_tangent("add_rms_norm", input, residual, weight);
  if (!torch::autograd::compute_requires_grad(input, residual, weight)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::add_rms_norm().call(input, residual, normalized_shape, weight, eps,
                                    zero_centered_weight);
  }
  auto node = make_node(true, true, normalized_shape, zero_centered_weight,
                        torch::autograd::collect_next_edges(input, residual, weight));
  at::Tensor out, residual_out, rstd;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(out, residual_out, rstd) = ops::add_rms_norm_fwd().call(
        input, residual, normalized_shape, weight, eps, zero_centered_weight);
  }
  torch::autograd::set_history(out, node);
  torch::autograd::set_history(residual_out, node);
  node->save(residual_out, weight, std::nullopt, at::Tensor(), rstd);
  node_created(node);
  return {out, residual_out};
}

// --- The ops without a derivative formula, and the forms that write into arguments -----------
//
// Unboxed kernels built from each op's typed handle (ops.h): the boxed generic fallbacks they
// replace packed every call into an IValue stack (~1.5 us per call at (1, 768)).

template <class Handle>
struct HandleSignature;
template <class F>
struct HandleSignature<c10::TypedOperatorHandle<F>> {
  using type = F;
};
template <auto Op>
using SignatureOf = typename HandleSignature<std::remove_reference_t<decltype(Op())>>::type;

bool requires_grad_arg(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
bool requires_grad_arg(const OptTensor& t) { return t.has_value() && requires_grad_arg(*t); }
template <class T>
bool requires_grad_arg(const T& /*not a tensor*/) {
  return false;
}

bool tangent_arg(const at::Tensor& t) { return torch::autograd::isFwGradDefined(t); }
bool tangent_arg(const OptTensor& t) { return torch::autograd::isFwGradDefined(t); }
template <class T>
bool tangent_arg(const T& /*not a tensor*/) {
  return false;
}

void append_tensor(std::vector<at::Tensor>& out, const at::Tensor& t) { out.push_back(t); }
void append_tensor(std::vector<at::Tensor>& out, const OptTensor& t) {
  if (t.has_value()) out.push_back(*t);
}
template <class T>
void append_tensor(std::vector<at::Tensor>& /*out*/, const T& /*not a tensor*/) {}

template <class NodeP>
void set_output_history(const at::Tensor& t, const NodeP& node) {
  torch::autograd::set_history(t, node);
}
template <class NodeP, class... Ts>
void set_output_history(const std::tuple<Ts...>& outputs, const NodeP& node) {
  std::apply([&](const auto&... t) { (set_output_history(t, node), ...); }, outputs);
}

// Autograd kernel of the *_fwd / *_bwd ops. Nothing requiring grad (the engine runs backward
// with grad mode off): straight below autograd. Otherwise the outputs get a NotImplemented node,
// so that differentiating them raises "derivative for <op> is not implemented" at backward time.
template <auto Op, class Sig = SignatureOf<Op>>
struct NoDerivative;
template <auto Op, class R, class... Args>
struct NoDerivative<Op, R(Args...)> {
  static R call(c10::DispatchKeySet ks, Args... args) {
    TORCH_CHECK_NOT_IMPLEMENTED(!(tangent_arg(args) || ...), Op().schema().name(),
                                ": forward-mode automatic differentiation is not implemented");
    if (!at::GradMode::is_enabled() || !(requires_grad_arg(args) || ...)) {
      at::AutoDispatchBelowADInplaceOrView guard;
      return Op().redispatch(ks & c10::after_ADInplaceOrView_keyset, args...);
    }
    std::vector<at::Tensor> inputs;
    (append_tensor(inputs, args), ...);
    auto node = new_node<torch::autograd::NotImplemented>(Op().schema().name());
    node->set_next_edges(torch::autograd::collect_next_edges(at::ArrayRef<at::Tensor>(inputs)));
    R outputs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      outputs = Op().redispatch(ks & c10::after_ADInplaceOrView_keyset, args...);
    }
    set_output_history(outputs, node);
    return outputs;
  }
};

// The out= and in-place forms (void ops). Autograd: like ATen's out= functions they are not
// differentiable, and say so when an argument requires grad. ADInplaceOrView: bump the version
// counter of every argument written (positions `Written`), like ATen's in-place ops (autograd's
// generic fallback only bumps tensors that are also returned, and these ops return nothing:
// torch.compile cannot functionalize a custom op that returns an alias).
template <auto Op, class Written, class Sig = SignatureOf<Op>>
struct Mutating;
template <auto Op, size_t... Written, class... Args>
struct Mutating<Op, std::index_sequence<Written...>, void(Args...)> {
  static_assert((std::is_same_v<std::tuple_element_t<Written, std::tuple<Args...>>, at::Tensor&> &&
                 ...),
                "every position in Written must be a Tensor(a!) argument of the op");

  static void autograd(c10::DispatchKeySet ks, Args... args) {
    if (at::GradMode::is_enabled()) {
      TORCH_CHECK(!(requires_grad_arg(args) || ...), Op().schema().name(), ".",
                  Op().schema().overload_name(),
                  ": functions with out=... arguments don't support automatic differentiation, "
                  "but one of the arguments requires grad.");
    }
    at::AutoDispatchBelowAutograd guard;
    Op().redispatch(ks & c10::after_autograd_keyset, args...);
  }

  static void inplace_or_view(c10::DispatchKeySet ks, Args... args) {
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      Op().redispatch(ks & c10::after_ADInplaceOrView_keyset, args...);
    }
    const auto all = std::forward_as_tuple(args...);
    (torch::autograd::impl::bump_version(std::get<Written>(all)), ...);
  }
};

// Argument positions written: out (layer_norm.out, rms_norm.out); residual and out (in-place).
using LayerNormOut = Mutating<&ops::layer_norm_out, std::index_sequence<6>>;
using RMSNormOut = Mutating<&ops::rms_norm_out, std::index_sequence<5>>;
using AddLayerNormInplace = Mutating<&ops::add_layer_norm_inplace, std::index_sequence<1, 7>>;
using AddRMSNormInplace = Mutating<&ops::add_rms_norm_inplace, std::index_sequence<1, 6>>;

}  // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, Autograd, m) {
  m.impl("layer_norm", TORCH_FN(layer_norm_autograd));
  m.impl("rms_norm", TORCH_FN(rms_norm_autograd));
  m.impl("add_layer_norm", TORCH_FN(add_layer_norm_autograd));
  m.impl("add_rms_norm", TORCH_FN(add_rms_norm_autograd));
  m.impl("layer_norm_fwd", TORCH_FN(NoDerivative<&ops::layer_norm_fwd>::call));
  m.impl("layer_norm_bwd", TORCH_FN(NoDerivative<&ops::layer_norm_bwd>::call));
  m.impl("rms_norm_fwd", TORCH_FN(NoDerivative<&ops::rms_norm_fwd>::call));
  m.impl("rms_norm_bwd", TORCH_FN(NoDerivative<&ops::rms_norm_bwd>::call));
  m.impl("add_layer_norm_fwd", TORCH_FN(NoDerivative<&ops::add_layer_norm_fwd>::call));
  m.impl("add_rms_norm_fwd", TORCH_FN(NoDerivative<&ops::add_rms_norm_fwd>::call));
  m.impl("layer_norm.out", TORCH_FN(LayerNormOut::autograd));
  m.impl("rms_norm.out", TORCH_FN(RMSNormOut::autograd));
  m.impl("add_layer_norm_inplace", TORCH_FN(AddLayerNormInplace::autograd));
  m.impl("add_rms_norm_inplace", TORCH_FN(AddRMSNormInplace::autograd));
}

TORCH_LIBRARY_IMPL(layernorm_ext, ADInplaceOrView, m) {
  m.impl("layer_norm.out", TORCH_FN(LayerNormOut::inplace_or_view));
  m.impl("rms_norm.out", TORCH_FN(RMSNormOut::inplace_or_view));
  m.impl("add_layer_norm_inplace", TORCH_FN(AddLayerNormInplace::inplace_or_view));
  m.impl("add_rms_norm_inplace", TORCH_FN(AddRMSNormInplace::inplace_or_view));
}

}  // namespace layernorm_ext
