// Every op schema of the extension. (The Python module init, whose import loads this shared
// library and so runs the registrations below, is in python_entry.cpp.)
//
// Backends register their kernels from their own files with TORCH_LIBRARY_IMPL:
//   cpu/norm_cpu.cpp  (CPU)      cuda/norm_cuda.cpp (CUDA, only when built with nvcc)
//   meta.cpp          (Meta: shapes for FakeTensor / torch.compile / export)
//   autograd.cpp      (Autograd: a C++ autograd Node built per call, as ATen's generated kernels)

#include <torch/library.h>

#include "cpu/isa.h"
#include "cpu/stream_policy.h"

namespace layernorm_ext {

TORCH_LIBRARY(layernorm_ext, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};

  // out= overloads return nothing: torch.compile can only functionalize a custom op that writes
  // into an argument when it does not also return it (the Python API returns `out`).
  //
  // LayerNorm. `layer_norm` is the public op: its CPU / CUDA kernels compute y only (the
  // inference path, taken directly under no_grad / inference_mode); its Autograd kernel calls
  // layer_norm_fwd, which also returns the per-row mean and rstd saved for layer_norm_bwd.
  m.def(
      "layer_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, "
      "Tensor? bias=None, float eps=1e-05, *, bool zero_centered_weight=False) -> Tensor",
      tags);
  m.def(
      "layer_norm.out(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, "
      "Tensor? bias=None, float eps=1e-05, *, bool zero_centered_weight=False, "
      "Tensor(a!) out) -> ()",
      tags);
  m.def(
      "layer_norm_fwd(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, "
      "Tensor? bias=None, float eps=1e-05, *, bool zero_centered_weight=False) "
      "-> (Tensor out, Tensor mean, Tensor rstd)",
      tags);
  // Gradients not asked for in output_mask come back as empty 1-D tensors.
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor input, SymInt[] normalized_shape, Tensor mean, "
      "Tensor rstd, Tensor? weight, Tensor? bias, bool zero_centered_weight, bool[3] output_mask, "
      "Tensor? grad_residual=None) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
      tags);

  // RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight. eps=None means the machine epsilon of the
  // computation type (fp32 for fp16/bf16/fp32 input), as torch.nn.functional.rms_norm.
  m.def(
      "rms_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, float? eps=None, "
      "*, bool zero_centered_weight=False) -> Tensor",
      tags);
  m.def(
      "rms_norm.out(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, "
      "float? eps=None, *, bool zero_centered_weight=False, Tensor(a!) out) -> ()",
      tags);
  m.def(
      "rms_norm_fwd(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, "
      "float? eps=None, *, bool zero_centered_weight=False) -> (Tensor out, Tensor rstd)",
      tags);
  m.def(
      "rms_norm_bwd(Tensor grad_out, Tensor input, SymInt[] normalized_shape, Tensor rstd, "
      "Tensor? weight, bool zero_centered_weight, bool[2] output_mask, "
      "Tensor? grad_residual=None) -> (Tensor grad_input, Tensor grad_weight)",
      tags);

  // Fused residual add (the pre-norm transformer step): residual_out = input + residual (rounded
  // to their dtype, like torch's add), out = norm(residual_out), in one pass over memory.
  // Backward: the *_bwd ops above with grad_residual = the gradient of residual_out; the gradient
  // of input and of residual is then their grad_input.
  m.def(
      "add_layer_norm(Tensor input, Tensor residual, SymInt[] normalized_shape, "
      "Tensor? weight=None, Tensor? bias=None, float eps=1e-05, *, "
      "bool zero_centered_weight=False) -> (Tensor out, Tensor residual_out)",
      tags);
  m.def(
      "add_layer_norm_fwd(Tensor input, Tensor residual, SymInt[] normalized_shape, "
      "Tensor? weight=None, Tensor? bias=None, float eps=1e-05, *, "
      "bool zero_centered_weight=False) "
      "-> (Tensor out, Tensor residual_out, Tensor mean, Tensor rstd)",
      tags);
  // Inference form: residual is updated in place (residual += input), out receives the norm;
  // out may be input itself.
  m.def(
      "add_layer_norm_inplace(Tensor input, Tensor(a!) residual, SymInt[] normalized_shape, "
      "Tensor? weight=None, Tensor? bias=None, float eps=1e-05, *, "
      "bool zero_centered_weight=False, Tensor(b!) out) -> ()",
      tags);
  m.def(
      "add_rms_norm(Tensor input, Tensor residual, SymInt[] normalized_shape, "
      "Tensor? weight=None, float? eps=None, *, bool zero_centered_weight=False) "
      "-> (Tensor out, Tensor residual_out)",
      tags);
  m.def(
      "add_rms_norm_fwd(Tensor input, Tensor residual, SymInt[] normalized_shape, "
      "Tensor? weight=None, float? eps=None, *, bool zero_centered_weight=False) "
      "-> (Tensor out, Tensor residual_out, Tensor rstd)",
      tags);
  m.def(
      "add_rms_norm_inplace(Tensor input, Tensor(a!) residual, SymInt[] normalized_shape, "
      "Tensor? weight=None, float? eps=None, *, bool zero_centered_weight=False, "
      "Tensor(b!) out) -> ()",
      tags);

  // CPU kernel selection (see cpu/isa.h).
  m.def("cpu_capability() -> str", [] { return cpu::capability(); });
  m.def("available_cpu_capabilities() -> str[]", [] { return cpu::available_capabilities(); });
  m.def("set_cpu_capability(str name) -> str",
        [](const std::string& name) { return cpu::set_capability(name); });
  // Non-temporal output stores (see cpu/stream_policy.h).
  m.def("cpu_stream_policy() -> str", [] { return cpu::stream_policy_name(); });
  m.def("set_cpu_stream_policy(str name) -> str",
        [](const std::string& name) { return cpu::set_stream_policy(name); });
  m.def("cpu_stream_min_bytes() -> int", [] { return cpu::stream_min_bytes(); });
  m.def("set_cpu_stream_min_bytes(int? bytes) -> int?",
        [](std::optional<int64_t> bytes) { return cpu::set_stream_min_bytes(bytes); });
}

}  // namespace layernorm_ext
