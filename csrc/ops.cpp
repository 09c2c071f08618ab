// Operator schemas of fastdistill._C (the `fastdistill` dispatcher namespace).
//
// Implementations register per device in csrc/cpu/<op>.cpp and csrc/cuda/<op>_glue.cpp (the
// CUDA-only ops declared here have no CPU kernel: on CPU they run their references); fake
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
  // K batched linear layers (+ ReLU), CUDA kernels only (csrc/cuda/linear_relu_tangent*):
  // h [K, F_in, n], W [K, F_out, F_in], b [K, F_out] -> relu(W h + b) [K, F_out, n].
  m.def("linear_relu(Tensor h, Tensor W, Tensor b, bool relu) -> Tensor");
  // ... and the R-op tangent (V h + W ḣ + ḃ) · [out > 0] (hd like h, V like W, bd like b).
  m.def("linear_relu_tangent(Tensor h, Tensor hd, Tensor W, Tensor V, Tensor b, Tensor bd, "
        "bool relu) -> (Tensor, Tensor)");
  // Softmax cross-entropy head, CUDA kernels only (csrc/cuda/ce_head*): z [K, O, n], Y [K or 1,
  // O, n], scale 0-d (z's dtype) -> (loss [K], dz [K, O, n]).
  m.def("ce_head(Tensor z, Tensor Y, Tensor scale) -> (Tensor, Tensor)");
  // ... and the tangents along zd [K, O, n]: (loss, dz, dzd, dY).
  m.def("ce_head_tangent(Tensor z, Tensor Y, Tensor scale, Tensor zd) -> (Tensor, Tensor, Tensor, Tensor)");
}
