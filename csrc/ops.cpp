// The one registration file of dcal._C: every C++/CUDA entry point is a `dcal::` op.
// Schemas are defined here; CPU and CUDA implementations are registered below. Fake (meta)
// implementations and autograd live on the Python side (dcal/ops/_cpp_*.py).
#include <Python.h>
#include <torch/library.h>

#include "dcal.h"

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
}

TORCH_LIBRARY_IMPL(dcal, CPU, m) {
  // --- registration: CPU ---
}

#ifdef DCAL_WITH_CUDA
TORCH_LIBRARY_IMPL(dcal, CUDA, m) {
  // --- registration: CUDA ---
}
#endif

}  // namespace dcal

// A plain Python module, so `import dcal._C` loads the library and runs the registrations above.
static PyObject* dcal_built_with_cuda(PyObject*, PyObject*) {
  if (dcal::built_with_cuda()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}
static PyMethodDef dcal_methods[] = {
    {"built_with_cuda", dcal_built_with_cuda, METH_NOARGS, "True when the CUDA kernels are compiled in."},
    {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef dcal_module = {PyModuleDef_HEAD_INIT, "_C", "dcal C++/CUDA kernels", -1, dcal_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dcal_module); }
