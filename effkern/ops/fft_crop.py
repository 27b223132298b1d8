"""effkern.ops.fft_crop: EfficientTrain++'s Fourier low-frequency crop, batched.

    y = Re(ifft2_{h,w}(crop_{h,w}(fft2(x)))) * (h*w)/(H*W)

keeping the frequencies -floor(h/2) .. ceil(h/2)-1 (same for w), optionally fused
with the input normalisation (x/255 - mean)/std for uint8 images, or
(x - mean)/std for float images.  The map is linear, so its backward is its
adjoint (``fft_crop_backward``).  Math and conventions: docs/ops.md.

Schema: declared once in csrc/effkern_ops.cpp (TORCH_LIBRARY); the copy below is
used only when the compiled extension is missing; tests check that both are
identical and carry the pt2_compliant_tag.  Kernels: csrc/cpu/fft_crop_cpu.cpp,
csrc/cuda/fft_crop_*.{cpp,cu}; PyTorch reference: effkern/reference/fft_crop.py.
"""

from __future__ import annotations

import torch

from effkern import _native
from effkern.backend import select
from effkern.ops import _checks
from effkern.ops._registration import PT2_COMPLIANT
from effkern.reference import fft_crop as _ref

SCHEMAS = {
    "fft_crop": "fft_crop(Tensor x, int[2] size, Tensor? mean=None, Tensor? std=None) -> Tensor",
    "fft_crop_backward": "fft_crop_backward(Tensor grad, int[2] input_size, Tensor? std=None) -> Tensor",
}

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INPUT_DTYPES = FLOAT_DTYPES + (torch.uint8,)

_lib = torch.library.Library("effkern", "FRAGMENT")
if _native._C is None:
    for _schema in SCHEMAS.values():
        _lib.define(_schema, tags=PT2_COMPLIANT)
if not _native.has_cpu_kernels():
    _lib.impl("fft_crop", _ref.fft_crop, "CPU")
    _lib.impl("fft_crop_backward", _ref.fft_crop_backward, "CPU")
if not _native.has_cuda_kernels():
    _lib.impl("fft_crop", _ref.fft_crop, "CUDA")
    _lib.impl("fft_crop_backward", _ref.fft_crop_backward, "CUDA")


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype.is_floating_point else torch.float32


@torch.library.register_fake("effkern::fft_crop")
def _fft_crop_fake(x, size, mean=None, std=None):
    return x.new_empty((x.shape[0], x.shape[1], size[0], size[1]), dtype=_out_dtype(x))


@torch.library.register_fake("effkern::fft_crop_backward")
def _fft_crop_backward_fake(grad, input_size, std=None):
    return grad.new_empty((grad.shape[0], grad.shape[1], input_size[0], input_size[1]))


def _setup_context(ctx, inputs, output):
    x, size, mean, std = inputs
    ctx.input_size = (x.shape[-2], x.shape[-1])
    ctx.size = tuple(size)
    ctx.x_float = x.dtype.is_floating_point
    ctx.save_for_backward(std, output if (mean is not None and (mean.requires_grad or std.requires_grad)) else None)


def _backward(ctx, grad):
    std, output = ctx.saved_tensors
    needs = list(ctx.needs_input_grad) + [False] * (4 - len(ctx.needs_input_grad))  # mean/std may be omitted
    grad_x = grad_mean = grad_std = None
    if ctx.x_float and needs[0]:
        grad_x = torch.ops.effkern.fft_crop_backward(grad, ctx.input_size, std)
    if needs[2] or needs[3]:
        # y = (crop(x)*base - mean)/std  =>  dy/dmean = -1/std,  dy/dstd = -y/std
        g = grad.to(std.dtype)
        if needs[2]:
            grad_mean = -(g.sum(dim=(0, 2, 3)) / std)
        if needs[3]:
            grad_std = -((g * output.to(std.dtype)).sum(dim=(0, 2, 3)) / std)
    return (grad_x, None, grad_mean, grad_std)[: len(ctx.needs_input_grad)]


def _backward_setup_context(ctx, inputs, output):
    grad, input_size, std = inputs
    ctx.size = (grad.shape[-2], grad.shape[-1])
    ctx.save_for_backward(std)


def _backward_backward(ctx, grad_grad):
    (std,) = ctx.saved_tensors
    gg = torch.ops.effkern.fft_crop(grad_grad, ctx.size)
    if std is not None:
        gg = gg / std.to(gg.dtype).reshape(-1, 1, 1)
    return (gg, None, None)[: len(ctx.needs_input_grad)]


torch.library.register_autograd("effkern::fft_crop", _backward, setup_context=_setup_context)
torch.library.register_autograd("effkern::fft_crop_backward", _backward_backward,
                                setup_context=_backward_setup_context)


def _validate(x, size, mean, std):
    _checks.tensor("x", x, ndim=4, dtypes=INPUT_DTYPES)
    h, w = _checks.pair("size", size)
    H, W = x.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"size {(h, w)} must not exceed the input's spatial size {(H, W)}")
    if (mean is None) != (std is None):
        raise ValueError("mean and std must be given together (per-channel normalisation)")
    if not x.dtype.is_floating_point and mean is None:
        raise ValueError(f"x has integer dtype {x.dtype}; pass mean= and std= to normalise it "
                         "(x/255 - mean)/std, or convert x to float first")
    if mean is not None:
        for name, t in (("mean", mean), ("std", std)):
            _checks.tensor(name, t, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
            if t.shape[0] != x.shape[1]:
                raise ValueError(f"{name} must have one value per channel ({x.shape[1]}), got {t.shape[0]}")
        _checks.finite_values("mean", mean)
        _checks.finite_values("std", std, nonzero=True)
    return h, w


def _as_tensor(name, v, device):
    """mean/std given as a Python sequence -> float32 tensor on x's device (values are
    checked in _validate: a sequence is converted on the CPU first when x is elsewhere)."""
    if v is None or isinstance(v, torch.Tensor):
        return v
    host = _checks.float_vector(name, v, "cpu")
    _checks.finite_values(name, host, nonzero=name == "std")
    return host if device is None else host.to(device)


def fft_crop(x: torch.Tensor, size, mean=None, std=None) -> torch.Tensor:
    """Low-frequency crop of a batch of images to ``size`` (int or (h, w)).

    x: (N, C, H, W) float32/float64/float16/bfloat16, or uint8 with ``mean``
    and ``std`` (per-channel sequences or 1-D tensors).  Returns (N, C, h, w) in
    x's dtype (float32 for uint8).  Differentiable in x (and mean/std).  mean must
    be finite and std finite and non-zero: checked for Python sequences and CPU
    tensors; CUDA tensors are not read (no device sync).
    """
    device = x.device if isinstance(x, torch.Tensor) else None
    mean, std = _as_tensor("mean", mean, device), _as_tensor("std", std, device)
    h, w = _validate(x, size, mean, std)
    available = {"reference"}
    if _native.has_cpu_kernels():
        available.add("cpu")
    if _native.has_cuda_kernels():
        available.add("cuda")
    if select(x.device, available) == "reference":
        return _ref.fft_crop(x, (h, w), mean, std)
    return torch.ops.effkern.fft_crop(x, [h, w], mean, std)
