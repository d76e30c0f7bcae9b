// Operator schemas of the sqplus library. Device implementations live beside their kernels:
//   csrc/cpu/*.cpp   TORCH_LIBRARY_IMPL(sqplus, CPU, m)
//   csrc/cuda/*.cu   TORCH_LIBRARY_IMPL(sqplus, CUDA, m)
// Python registers the fake (meta) implementations (vllm_sqplus/kernels/ops.py).
//
// Contract shared by every device:
//   w4a16_pack(q uint8 [N,K], scales [N,K/g], zeros uint8 [N,K/g], group_size)
//       -> [qweight, scales_p, zeros_p] in that device's packed layout; scales_p has shape [K/g, N]
//          on every device (so shape inference needs no layout knowledge).
//   w4a16_gemm(x [..., K], qweight, scales_p, zeros_p, group_size, bias?) -> [..., N] in x.dtype,
//          computing x @ ((q - zeros) * scales).T + bias with fp32 accumulation.
#include <Python.h>
#include <torch/library.h>

// `import vllm_sqplus._C` loads this library and so runs the registrations below; the module itself
// is empty (pytorch/extension-cpp's pattern: ops are reached as torch.ops.sqplus.*).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(sqplus, m) {
  m.def("w4a16_pack(Tensor q, Tensor scales, Tensor zeros, int group_size) -> Tensor[]");
  m.def("w4a16_gemm(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, "
        "Tensor? bias=None) -> Tensor");
}
