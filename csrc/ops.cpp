// The one registration file of dcal._C: every C++/CUDA entry point is a `dcal::` op.
// Schemas are defined here; CPU and CUDA implementations are registered below. Fake (meta)
// implementations and autograd live on the Python side (dcal/ops/_cpp_*.py).
#include <Python.h>
#include <torch/library.h>

#include "cpu_peak.h"
#include "dcal.h"
#include "mkv.h"
#include "na2d.h"
#include "rollout.h"

namespace dcal {

bool built_with_cuda() {
#ifdef DCAL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(dcal, m) {
  // --- registration: schemas ---
  m.def("mkv_fwd(Tensor q, Tensor k1, Tensor v1, Tensor? k2, Tensor? v2, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "mkv_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k1, Tensor v1, Tensor? k2, Tensor? v2, Tensor out, Tensor "
      "lse, float scale) -> Tensor[]");
  m.def(
      "na2d_fwd(Tensor q, Tensor k, Tensor v, Tensor? rpb, int kernel_size, int border, float scale, int dilation=1) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "na2d_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? rpb, Tensor out, Tensor lse, int kernel_size, int "
      "border, float scale, int dilation=1) -> (Tensor dq, Tensor dk, Tensor dv, Tensor drpb)");
  m.def("rollout(Tensor[] qs, Tensor[] ks, Tensor[] lses, float scale, float residual) -> Tensor");
  // Private: na2d_fwd / na2d_bwd on CPU always on the per-window kernels (tests, bench).
  m.def(
      "_na2d_fwd_window(Tensor q, Tensor k, Tensor v, Tensor? rpb, int kernel_size, int border, float scale, int "
      "dilation=1) -> (Tensor out, Tensor lse)");
  m.def(
      "_na2d_bwd_window(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? rpb, Tensor out, Tensor lse, int "
      "kernel_size, int border, float scale, int dilation=1) -> (Tensor dq, Tensor dk, Tensor dv, Tensor drpb)");
}

TORCH_LIBRARY_IMPL(dcal, CPU, m) {
  // --- registration: CPU ---
  m.impl("mkv_fwd", &mkv_fwd_cpu);
  m.impl("mkv_bwd", &mkv_bwd_cpu);
  m.impl("na2d_fwd", &na2d_fwd_cpu);
  m.impl("na2d_bwd", &na2d_bwd_cpu);
  m.impl("_na2d_fwd_window", &na2d_fwd_window_cpu);
  m.impl("_na2d_bwd_window", &na2d_bwd_window_cpu);
  m.impl("rollout", &rollout_cpu);
}

#ifdef DCAL_WITH_CUDA
TORCH_LIBRARY_IMPL(dcal, CUDA, m) {
  // --- registration: CUDA ---
  m.impl("na2d_fwd", &na2d_fwd_cuda);
  m.impl("na2d_bwd", &na2d_bwd_cuda);
}
#endif

}  // namespace dcal

// A plain Python module, so `import dcal._C` loads the library and runs the registrations above.
static PyObject* dcal_built_with_cuda(PyObject*, PyObject*) {
  if (dcal::built_with_cuda()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}
// cpu_peak(kind, M, N, K, seconds) -> GFLOP/s over the intra-op threads (csrc/cpu_peak.h).
static PyObject* dcal_cpu_peak(PyObject*, PyObject* args) {
  const char* kind;
  long long M, N, K;
  double seconds;
  if (!PyArg_ParseTuple(args, "sLLLd", &kind, &M, &N, &K, &seconds)) return nullptr;
  double r;
  try {
    r = dcal::cpu_peak(kind, M, N, K, seconds);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  return PyFloat_FromDouble(r);
}
static PyObject* dcal_cpu_fma_lanes(PyObject*, PyObject*) { return PyLong_FromLong(dcal::cpu_fma_lanes()); }
static PyMethodDef dcal_methods[] = {
    {"built_with_cuda", dcal_built_with_cuda, METH_NOARGS, "True when the CUDA kernels are compiled in."},
    {"cpu_peak", dcal_cpu_peak, METH_VARARGS,
     "cpu_peak(kind, M, N, K, seconds): GFLOP/s of 'brgemm' / 'sgemm' [M,K]@[K,N] or 'fma' on all intra-op threads."},
    {"cpu_fma_lanes", dcal_cpu_fma_lanes, METH_NOARGS, "fp32 lanes of the widest FMA (16, 8 or 0)."},
    {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef dcal_module = {PyModuleDef_HEAD_INIT, "_C", "dcal C++/CUDA kernels", -1, dcal_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dcal_module); }
