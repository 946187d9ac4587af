// The Python module layernorm_ext._C: its init (importing it runs the op registrations of this
// shared library) and the eager fast entries of the functional API.
//
// layernorm_ext._C.layer_norm(input, normalized_shape, weight, bias, eps, zero_centered_weight,
// out) layernorm_ext._C.rms_norm(input, normalized_shape, weight, eps, zero_centered_weight, out)
// layernorm_ext._C.add_layer_norm(input, residual, normalized_shape, weight, bias, eps,
//                                 zero_centered_weight, out)
// layernorm_ext._C.add_rms_norm(input, residual, normalized_shape, weight, eps,
//                               zero_centered_weight, out)
//
// out=None selects the op returning fresh outputs; a tensor selects the form writing into it
// (layer_norm.out, rms_norm.out, add_*_norm_inplace), and the entry returns it. For add_*_norm,
// out=... (Ellipsis) selects the in-place form writing into a fresh contiguous tensor like input,
// allocated here (torch.empty_like from Python cost ~1 us per call); off the lean path that form
// returns NotImplemented, and the caller allocates the tensor itself. They call the same dispatcher
// op as torch.ops.layernorm_ext.<op>.default (so autograd,
// __torch_dispatch__ modes, profiling and tracing all apply), but parse their arguments directly
// instead of through the OpOverload's generic binding (schema-driven IValue conversion, a stack,
// boxed dispatch), which costs ~1.5 us per call: at (1, 768) more than the kernel. Whatever the
// lean parser does not take (Tensor subclasses, which may override __torch_function__; an active
// torch-function mode; SymInts, non-float eps, non-bool zero_centered_weight, ...) goes to the
// OpOverload with the same arguments, so behaviour and error messages are the op's. The
// functional API and the modules use these entries only outside torch.compile, which traces the
// OpOverload.

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/ops/empty_like.h>
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "cpu/pages.h"
#include "ops.h"

namespace layernorm_ext {
namespace {

using OptTensor = std::optional<at::Tensor>;

// The fresh output of the fused add's in-place form (out=...): contiguous, like input; on CPU a
// large one is advised onto huge pages as the ops' own outputs are (cpu/pages.h).
at::Tensor fresh_output_like(const at::Tensor& input) {
  at::Tensor out = at::empty_like(input, at::MemoryFormat::Contiguous);
  if (out.is_cpu()) {
    cpu::advise_huge_pages(out.mutable_data_ptr(), static_cast<int64_t>(out.nbytes()));
  }
  return out;
}

// Releases the GIL for the op call (as torch's bindings do); re-acquired on exit or unwind.
class GilRelease {
 public:
  GilRelease() : state_(PyEval_SaveThread()) {}
  ~GilRelease() { PyEval_RestoreThread(state_); }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* state_;
};

// A torch.Tensor or nn.Parameter, not a subclass (which may override __torch_function__).
bool plain_tensor(PyObject* obj) { return THPVariable_CheckExact(obj); }

bool tensor_or_none(PyObject* obj, OptTensor& out) {
  if (obj == Py_None) return true;
  if (!plain_tensor(obj)) return false;
  out = THPVariable_Unpack(obj);
  return true;
}

// A tuple or list of non-negative Python ints (torch.Size included).
bool int_list(PyObject* obj, c10::SmallVector<c10::SymInt, 4>& out) {
  if (!PyTuple_Check(obj) && !PyList_Check(obj)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
  PyObject** items = PySequence_Fast_ITEMS(obj);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!PyLong_CheckExact(items[i])) return false;
    const long long v = PyLong_AsLongLong(items[i]);
    if (v < 0) {  // negative, or overflow (-1 with an error set): the op reports it
      PyErr_Clear();
      return false;
    }
    out.emplace_back(static_cast<int64_t>(v));
  }
  return true;
}

// An OpOverload torch.ops.layernorm_ext.<name>.<overload>, looked up on first use (new
// reference kept for the life of the process).
struct OpRef {
  const char* name;
  const char* overload;
  PyObject* obj = nullptr;

  PyObject* get() {
    if (obj != nullptr) return obj;
    PyObject* o = PyImport_ImportModule("torch");
    for (const char* attr : {"ops", "layernorm_ext", name, overload}) {
      if (o == nullptr) return nullptr;
      PyObject* next = PyObject_GetAttrString(o, attr);
      Py_DECREF(o);
      o = next;
    }
    return obj = o;
  }
};

// Calls the OpOverload with an entry's arguments: the first `npos` positionally, then the
// keyword-only zero_centered_weight (as a bool: the functional API's truthiness rule) and, for
// the forms that write into `out`, out=. Those forms return `out` (the op returns nothing).
// With an unexpected argument count the op gets them as given, and reports the error.
PyObject* fallback(OpRef& op, PyObject* const* args, Py_ssize_t nargs, Py_ssize_t npos,
                   bool with_out) {
  PyObject* callable = op.get();
  if (callable == nullptr) return nullptr;
  const Py_ssize_t nkw = with_out ? 2 : 1;
  if (nargs != npos + nkw) return PyObject_Vectorcall(callable, args, nargs, nullptr);
  static PyObject* kw_zcw = Py_BuildValue("(s)", "zero_centered_weight");
  static PyObject* kw_zcw_out = Py_BuildValue("(ss)", "zero_centered_weight", "out");
  if (kw_zcw == nullptr || kw_zcw_out == nullptr) return nullptr;
  const int zero_centered = PyObject_IsTrue(args[npos]);
  if (zero_centered < 0) return nullptr;
  PyObject* call_args[10];
  for (Py_ssize_t i = 0; i < npos; ++i) call_args[i] = args[i];
  call_args[npos] = zero_centered ? Py_True : Py_False;
  if (with_out) call_args[npos + 1] = args[npos + 1];
  PyObject* result = PyObject_Vectorcall(callable, call_args, npos, with_out ? kw_zcw_out : kw_zcw);
  if (result == nullptr || !with_out) return result;
  Py_DECREF(result);
  Py_INCREF(args[npos + 1]);
  return args[npos + 1];
}

// The checks every entry makes before taking the lean path.
bool lean_ok(Py_ssize_t nargs, Py_ssize_t expected, PyObject* input) {
  return nargs == expected && !at::impl::torch_function_mode_enabled() && plain_tensor(input);
}
bool float_arg(PyObject* obj) { return PyFloat_CheckExact(obj); }
bool float_or_none(PyObject* obj) { return obj == Py_None || PyFloat_CheckExact(obj); }
std::optional<double> opt_float(PyObject* obj) {
  return obj == Py_None ? std::nullopt : std::optional<double>(PyFloat_AS_DOUBLE(obj));
}

PyObject* wrap(at::Tensor&& t) { return THPVariable_Wrap(std::move(t)); }
PyObject* wrap(std::tuple<at::Tensor, at::Tensor>&& pair) {
  PyObject* first = THPVariable_Wrap(std::move(std::get<0>(pair)));
  if (first == nullptr) return nullptr;
  PyObject* second = THPVariable_Wrap(std::move(std::get<1>(pair)));
  if (second == nullptr) {
    Py_DECREF(first);
    return nullptr;
  }
  PyObject* pair_obj = PyTuple_Pack(2, first, second);
  Py_DECREF(first);
  Py_DECREF(second);
  return pair_obj;
}

// A tensor argument the op writes into (schema Tensor(a!)).
at::Tensor& written(PyObject* obj) { return const_cast<at::Tensor&>(THPVariable_Unpack(obj)); }

// CPU inputs up to this many elements run with the GIL held: such a call takes a few
// microseconds, of which releasing and re-taking the GIL was a tenth, and nothing in it waits for
// another Python thread (intra-op threads that may share its rows never touch Python;
// Python kernels and hooks it may reach re-take the GIL themselves, which the thread holding it
// may do). CUDA calls always release it: a launch may block on a full queue, or on the device's
// lazy initialisation.
constexpr int64_t kHoldGilElements = 16384;

bool hold_gil(const at::Tensor& input) {
  return input.is_cpu() && input.numel() <= kHoldGilElements;
}

// Runs the op, with the GIL released (as torch's bindings do) unless the input is small;
// returns its outputs wrapped.
template <class Call>
PyObject* run(const at::Tensor& input, Call&& call) {
  decltype(call()) outputs;
  {
    std::optional<GilRelease> no_gil;
    if (!hold_gil(input)) no_gil.emplace();
    outputs = call();
  }
  return wrap(std::move(outputs));
}

// The same for the forms that write into an argument and return nothing: returns `result`.
template <class Call>
PyObject* run_into(const at::Tensor& input, PyObject* result, Call&& call) {
  {
    std::optional<GilRelease> no_gil;
    if (!hold_gil(input)) no_gil.emplace();
    call();
  }
  Py_INCREF(result);
  return result;
}

// layer_norm(input, normalized_shape, weight, bias, eps, zero_centered_weight, out)
PyObject* layer_norm_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static OpRef op{"layer_norm", "default"};
  static OpRef op_out{"layer_norm", "out"};
  const bool with_out = nargs == 7 && args[6] != Py_None;
  OptTensor weight, bias;
  c10::SmallVector<c10::SymInt, 4> shape;
  if (!lean_ok(nargs, 7, args[0]) || !int_list(args[1], shape) ||
      !tensor_or_none(args[2], weight) || !tensor_or_none(args[3], bias) || !float_arg(args[4]) ||
      !PyBool_Check(args[5]) || (with_out && !plain_tensor(args[6]))) {
    return with_out ? fallback(op_out, args, nargs, 5, true)
                    : fallback(op, args, std::min<Py_ssize_t>(nargs, 6), 5, false);
  }
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const double eps = PyFloat_AS_DOUBLE(args[4]);
  const bool zero_centered_weight = args[5] == Py_True;
  if (with_out) {
    return run_into(input, args[6], [&] {
      ops::layer_norm_out().call(input, shape, weight, bias, eps, zero_centered_weight,
                                 written(args[6]));
    });
  }
  return run(input, [&] {
    return ops::layer_norm().call(input, shape, weight, bias, eps, zero_centered_weight);
  });
  END_HANDLE_TH_ERRORS
}

// rms_norm(input, normalized_shape, weight, eps, zero_centered_weight, out)
PyObject* rms_norm_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static OpRef op{"rms_norm", "default"};
  static OpRef op_out{"rms_norm", "out"};
  const bool with_out = nargs == 6 && args[5] != Py_None;
  OptTensor weight;
  c10::SmallVector<c10::SymInt, 4> shape;
  if (!lean_ok(nargs, 6, args[0]) || !int_list(args[1], shape) ||
      !tensor_or_none(args[2], weight) || !float_or_none(args[3]) || !PyBool_Check(args[4]) ||
      (with_out && !plain_tensor(args[5]))) {
    return with_out ? fallback(op_out, args, nargs, 4, true)
                    : fallback(op, args, std::min<Py_ssize_t>(nargs, 5), 4, false);
  }
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const std::optional<double> eps = opt_float(args[3]);
  const bool zero_centered_weight = args[4] == Py_True;
  if (with_out) {
    return run_into(input, args[5], [&] {
      ops::rms_norm_out().call(input, shape, weight, eps, zero_centered_weight, written(args[5]));
    });
  }
  return run(input,
             [&] { return ops::rms_norm().call(input, shape, weight, eps, zero_centered_weight); });
  END_HANDLE_TH_ERRORS
}

// add_layer_norm(input, residual, normalized_shape, weight, bias, eps, zero_centered_weight,
// out): out None gives (out, residual_out); a tensor out selects the in-place form (residual
// += input, the norm into out) and returns out; out=... the in-place form into a fresh tensor.
PyObject* add_layer_norm_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static OpRef op{"add_layer_norm", "default"};
  static OpRef op_inplace{"add_layer_norm_inplace", "default"};
  const bool inplace = nargs == 8 && args[7] != Py_None;
  const bool fresh_out = inplace && args[7] == Py_Ellipsis;
  OptTensor weight, bias;
  c10::SmallVector<c10::SymInt, 4> shape;
  if (!lean_ok(nargs, 8, args[0]) || !plain_tensor(args[1]) || !int_list(args[2], shape) ||
      !tensor_or_none(args[3], weight) || !tensor_or_none(args[4], bias) || !float_arg(args[5]) ||
      !PyBool_Check(args[6]) || (inplace && !fresh_out && !plain_tensor(args[7]))) {
    if (fresh_out) Py_RETURN_NOTIMPLEMENTED;
    return inplace ? fallback(op_inplace, args, nargs, 6, true)
                   : fallback(op, args, std::min<Py_ssize_t>(nargs, 7), 6, false);
  }
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const double eps = PyFloat_AS_DOUBLE(args[5]);
  const bool zero_centered_weight = args[6] == Py_True;
  if (fresh_out) {
    return run(input, [&] {
      at::Tensor out = fresh_output_like(input);
      ops::add_layer_norm_inplace().call(input, written(args[1]), shape, weight, bias, eps,
                                         zero_centered_weight, out);
      return out;
    });
  }
  if (inplace) {
    return run_into(input, args[7], [&] {
      ops::add_layer_norm_inplace().call(input, written(args[1]), shape, weight, bias, eps,
                                         zero_centered_weight, written(args[7]));
    });
  }
  return run(input, [&] {
    return ops::add_layer_norm().call(input, THPVariable_Unpack(args[1]), shape, weight, bias, eps,
                                      zero_centered_weight);
  });
  END_HANDLE_TH_ERRORS
}

// add_rms_norm(input, residual, normalized_shape, weight, eps, zero_centered_weight, out): as
// add_layer_norm.
PyObject* add_rms_norm_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static OpRef op{"add_rms_norm", "default"};
  static OpRef op_inplace{"add_rms_norm_inplace", "default"};
  const bool inplace = nargs == 7 && args[6] != Py_None;
  const bool fresh_out = inplace && args[6] == Py_Ellipsis;
  OptTensor weight;
  c10::SmallVector<c10::SymInt, 4> shape;
  if (!lean_ok(nargs, 7, args[0]) || !plain_tensor(args[1]) || !int_list(args[2], shape) ||
      !tensor_or_none(args[3], weight) || !float_or_none(args[4]) || !PyBool_Check(args[5]) ||
      (inplace && !fresh_out && !plain_tensor(args[6]))) {
    if (fresh_out) Py_RETURN_NOTIMPLEMENTED;
    return inplace ? fallback(op_inplace, args, nargs, 5, true)
                   : fallback(op, args, std::min<Py_ssize_t>(nargs, 6), 5, false);
  }
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const std::optional<double> eps = opt_float(args[4]);
  const bool zero_centered_weight = args[5] == Py_True;
  if (fresh_out) {
    return run(input, [&] {
      at::Tensor out = fresh_output_like(input);
      ops::add_rms_norm_inplace().call(input, written(args[1]), shape, weight, eps,
                                       zero_centered_weight, out);
      return out;
    });
  }
  if (inplace) {
    return run_into(input, args[6], [&] {
      ops::add_rms_norm_inplace().call(input, written(args[1]), shape, weight, eps,
                                       zero_centered_weight, written(args[6]));
    });
  }
  return run(input, [&] {
    return ops::add_rms_norm().call(input, THPVariable_Unpack(args[1]), shape, weight, eps,
                                    zero_centered_weight);
  });
  END_HANDLE_TH_ERRORS
}

template <auto Fn>
PyCFunction fastcall() {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(Fn));
}

PyMethodDef methods[] = {
    {"layer_norm", fastcall<&layer_norm_entry>(), METH_FASTCALL,
     "layer_norm(input, normalized_shape, weight, bias, eps, zero_centered_weight, out): "
     "torch.ops.layernorm_ext.layer_norm (out None) or layer_norm.out, with a lean argument "
     "parser (eager only); returns the output."},
    {"rms_norm", fastcall<&rms_norm_entry>(), METH_FASTCALL,
     "rms_norm(input, normalized_shape, weight, eps, zero_centered_weight, out): "
     "torch.ops.layernorm_ext.rms_norm (out None) or rms_norm.out, with a lean argument parser "
     "(eager only); returns the output."},
    {"add_layer_norm", fastcall<&add_layer_norm_entry>(), METH_FASTCALL,
     "add_layer_norm(input, residual, normalized_shape, weight, bias, eps, zero_centered_weight, "
     "out): torch.ops.layernorm_ext.add_layer_norm (out None: returns (out, residual_out)) or "
     "add_layer_norm_inplace (returns out), with a lean argument parser (eager only)."},
    {"add_rms_norm", fastcall<&add_rms_norm_entry>(), METH_FASTCALL,
     "add_rms_norm(input, residual, normalized_shape, weight, eps, zero_centered_weight, out): "
     "as add_layer_norm, for RMSNorm."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace layernorm_ext

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "layernorm_ext kernels (ops are in torch.ops.layernorm_ext) and the eager fast entries of "
      "the functional API",
      -1, layernorm_ext::methods};
  return PyModule_Create(&module_def);
}
}
