// The Python module layernorm_ext._C: its init (importing it runs the op registrations of this
// shared library) and the eager fast entries of the two hot ops.
//
// layernorm_ext._C.layer_norm(input, normalized_shape, weight, bias, eps, zero_centered_weight)
// layernorm_ext._C.rms_norm(input, normalized_shape, weight, eps, zero_centered_weight)
//
// They call the same dispatcher op as torch.ops.layernorm_ext.<op>.default (so autograd,
// __torch_dispatch__ modes, profiling and tracing all apply), but parse their arguments directly
// instead of through the OpOverload's generic binding (schema-driven IValue conversion, a stack,
// boxed dispatch), which costs ~1.5 us per call: at (1, 768) more than the kernel. Whatever the
// lean parser does not take (Tensor subclasses, which may override __torch_function__; an active
// torch-function mode; SymInts, non-float eps, non-bool zero_centered_weight, ...) goes to the
// OpOverload with the same arguments, so behaviour and error messages are the op's. The
// functional API and the modules use these entries only outside torch.compile, which traces the
// OpOverload.

#include <ATen/PythonTorchFunctionTLS.h>
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>

#include "ops.h"

namespace layernorm_ext {
namespace {

using OptTensor = std::optional<at::Tensor>;

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

// The OpOverload torch.ops.layernorm_ext.<name>.default, looked up on first use (new reference
// kept for the life of the process).
PyObject* op_overload(const char* name) {
  PyObject* obj = PyImport_ImportModule("torch");
  for (const char* attr : {"ops", "layernorm_ext", name, "default"}) {
    if (obj == nullptr) return nullptr;
    PyObject* next = PyObject_GetAttrString(obj, attr);
    Py_DECREF(obj);
    obj = next;
  }
  return obj;
}

// Calls the OpOverload with the entry's arguments: the first `npos` positionally, then
// zero_centered_weight= as a bool (the functional API's truthiness rule).
PyObject* fallback(PyObject*& op, const char* name, PyObject* const* args, Py_ssize_t nargs,
                   Py_ssize_t npos) {
  if (op == nullptr && (op = op_overload(name)) == nullptr) return nullptr;
  if (nargs != npos + 1) return PyObject_Vectorcall(op, args, nargs, nullptr);
  static PyObject* kwnames = Py_BuildValue("(s)", "zero_centered_weight");
  if (kwnames == nullptr) return nullptr;
  const int zero_centered = PyObject_IsTrue(args[npos]);
  if (zero_centered < 0) return nullptr;
  PyObject* call_args[6];
  for (Py_ssize_t i = 0; i < npos; ++i) call_args[i] = args[i];
  call_args[npos] = zero_centered ? Py_True : Py_False;
  return PyObject_Vectorcall(op, call_args, npos, kwnames);
}

PyObject* layer_norm_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static PyObject* op = nullptr;
  OptTensor weight, bias;
  c10::SmallVector<c10::SymInt, 4> shape;
  if (nargs != 6 || at::impl::torch_function_mode_enabled() || !plain_tensor(args[0]) ||
      !int_list(args[1], shape) || !tensor_or_none(args[2], weight) ||
      !tensor_or_none(args[3], bias) || !PyFloat_CheckExact(args[4]) || !PyBool_Check(args[5])) {
    return fallback(op, "layer_norm", args, nargs, 5);
  }
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const double eps = PyFloat_AS_DOUBLE(args[4]);
  const bool zero_centered_weight = args[5] == Py_True;
  at::Tensor out;
  {
    GilRelease no_gil;
    out = ops::layer_norm().call(input, shape, weight, bias, eps, zero_centered_weight);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* rms_norm_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static PyObject* op = nullptr;
  OptTensor weight;
  c10::SmallVector<c10::SymInt, 4> shape;
  if (nargs != 5 || at::impl::torch_function_mode_enabled() || !plain_tensor(args[0]) ||
      !int_list(args[1], shape) || !tensor_or_none(args[2], weight) ||
      !(args[3] == Py_None || PyFloat_CheckExact(args[3])) || !PyBool_Check(args[4])) {
    return fallback(op, "rms_norm", args, nargs, 4);
  }
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const std::optional<double> eps =
      args[3] == Py_None ? std::nullopt : std::optional<double>(PyFloat_AS_DOUBLE(args[3]));
  const bool zero_centered_weight = args[4] == Py_True;
  at::Tensor out;
  {
    GilRelease no_gil;
    out = ops::rms_norm().call(input, shape, weight, eps, zero_centered_weight);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"layer_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&layer_norm_entry)),
     METH_FASTCALL,
     "layer_norm(input, normalized_shape, weight, bias, eps, zero_centered_weight): "
     "torch.ops.layernorm_ext.layer_norm with a lean argument parser (eager only)."},
    {"rms_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&rms_norm_entry)),
     METH_FASTCALL,
     "rms_norm(input, normalized_shape, weight, eps, zero_centered_weight): "
     "torch.ops.layernorm_ext.rms_norm with a lean argument parser (eager only)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace layernorm_ext

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "layernorm_ext kernels (ops are in torch.ops.layernorm_ext) and the eager fast entries of "
      "layer_norm and rms_norm",
      -1, layernorm_ext::methods};
  return PyModule_Create(&module_def);
}
}
