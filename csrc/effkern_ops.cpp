// effkern_ops.cpp -- the effkern operator library: every C++-backed op schema,
// declared once, here.  Kernels register with TORCH_LIBRARY_IMPL next to their
// code (csrc/cpu/, csrc/cuda/).  Python-only ops (Triton + PyTorch) add their
// schemas to the same namespace from effkern/ops/.  Every schema carries
// pt2_compliant_tag, as the Python ones do: the ops pass torch.library.opcheck
// (tests/test_fft_crop.py), so torch.compile may trust them.
#include <torch/library.h>

TORCH_LIBRARY(effkern, m) {
  m.def("fft_crop(Tensor x, int[2] size, Tensor? mean=None, Tensor? std=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("fft_crop_backward(Tensor grad, int[2] input_size, Tensor? std=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}
