// The shared operator schemas of the sqplus library (every device implements them) and the module
// init. Device implementations live beside their kernels, with the device-only extras they define
// as fragments:
//   csrc/cpu/*.cpp   TORCH_LIBRARY_IMPL(sqplus, CPU, m); fragment: w4a16_cpu_isa() -> int
//   csrc/cuda/*.cu   TORCH_LIBRARY_IMPL(sqplus, CUDA, m); fragment: w4a16_dequant (tests)
// Python registers the fake (meta) implementations (vllm_sqplus/kernels/ops.py).
//
// Contract shared by every device:
//   w4a16_pack(q uint8 [N,K], scales [N,K/g], zeros uint8 [N,K/g], group_size)
//       -> [qweight, scales_p, zeros_p] in that device's packed layout; scales_p has shape [K/g, N]
//          on every device (so shape inference needs no layout knowledge).
//   w4a16_gemm(x [..., K], qweight, scales_p, zeros_p, group_size, bias?, kernel=0) -> [..., N] in
//          x.dtype, computing x @ ((q - zeros) * scales).T + bias with fp32 accumulation.
//          `kernel` picks the device's code path, decided once by the caller (the Python backend
//          object), never from the environment here; 0 is always the device's own default:
//            CPU   0 best ISA this CPU has, 1 scalar, 2 AVX2+FMA, 3 AVX-512
//            CUDA  0 by rows (stream kernel below 17, dequantize + cuBLAS from 17), 1 stream,
//                  2 dequantize + cuBLAS
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
        "Tensor? bias=None, int kernel=0) -> Tensor");
}
