// Operator schemas of fastdistill._C (the `fastdistill` dispatcher namespace).
//
// Implementations register per device in csrc/cpu/<op>.cpp and csrc/cuda/<op>_glue.cpp; fake
// (meta) kernels and autograd formulas are registered from Python in fastdistill/ops/<op>.py.
// Every op is also reachable without this library through its pure-PyTorch reference.
#include <Python.h>
#include <torch/library.h>

// `import fastdistill._C` loads this shared library, whose static initialisers register the ops
// with the dispatcher; the Python module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fastdistill, m) {
  // θ' = θ − η·g, elementwise; η is a 0-d tensor. Same shape/dtype/device for θ and g.
  m.def("gd_update(Tensor theta, Tensor grad, Tensor lr) -> Tensor");
  // Writes θ − η·g into a preallocated `out` (may alias θ). Returns nothing: a custom op whose
  // output aliases an input cannot be functionalised (torch.compile, opcheck).
  m.def("gd_update_out(Tensor theta, Tensor grad, Tensor lr, Tensor(a!) out) -> ()");
}
