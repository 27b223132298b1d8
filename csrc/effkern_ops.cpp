// effkern_ops.cpp -- the effkern operator library: every C++-backed op schema,
// declared once, here.  Kernels register with TORCH_LIBRARY_IMPL next to their
// code (csrc/cpu/, csrc/cuda/).  Python-only ops (Triton + PyTorch) add their
// schemas to the same namespace from effkern/ops/.
#include <torch/library.h>

TORCH_LIBRARY(effkern, m) {
  m.def("fft_crop(Tensor x, int[2] size, Tensor? mean=None, Tensor? std=None) -> Tensor");
  m.def("fft_crop_backward(Tensor grad, int[2] input_size, Tensor? std=None) -> Tensor");
}
