"""effkern.ops.fft_crop against the float64 torch.fft oracle, on every CPU path
(C++ kernel, PyTorch reference), with autograd, opcheck, torch.compile and bad input."""

import importlib
import re

import pytest
import torch

import effkern
from effkern import _native
from effkern.ops import fft_crop
from conftest import DEVICES
from oracles import fft_crop_oracle, rel_err

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CPU_BACKENDS = ["cpu", "reference"] if _native.has_cpu_kernels() else ["reference"]

SHAPES = [  # (N, C, H, W, h, w)
    (2, 3, 32, 32, 16, 16),
    (3, 2, 17, 23, 9, 12),   # H != W, odd H, odd h
    (1, 1, 8, 10, 1, 1),     # h = w = 1: the mean
    (2, 3, 12, 9, 12, 9),    # h = H: identity
    (2, 1, 15, 16, 14, 7),
    (0, 3, 16, 16, 8, 8),    # empty batch
    (1, 3, 224, 224, 160, 160),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_fft_oracle(backend, shape, dtype):
    n, c, H, W, h, w = shape
    x = torch.randn(n, c, H, W, dtype=dtype)
    with effkern.use_backend(backend):
        y = fft_crop(x, (h, w))
    assert y.shape == (n, c, h, w) and y.dtype == dtype
    assert torch.isfinite(y).all()
    if n:
        assert rel_err(y, fft_crop_oracle(x, (h, w))) < (1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_random_shapes(backend):
    gen = torch.Generator().manual_seed(1234)
    for _ in range(12):
        H, W = (int(v) for v in torch.randint(1, 40, (2,), generator=gen))
        h = int(torch.randint(1, H + 1, (1,), generator=gen))
        w = int(torch.randint(1, W + 1, (1,), generator=gen))
        x = torch.randn(2, 2, H, W, dtype=torch.float64, generator=gen)
        with effkern.use_backend(backend):
            y = fft_crop(x, (h, w))
        assert rel_err(y, fft_crop_oracle(x, (h, w))) < 1e-12, (H, W, h, w)


def test_identity_and_constant():
    x = torch.randn(2, 3, 11, 14, dtype=torch.float64)
    assert rel_err(fft_crop(x, (11, 14)), x) < 1e-13
    const = torch.full((1, 1, 20, 20), 3.5, dtype=torch.float64)
    assert torch.allclose(fft_crop(const, 7), torch.full((1, 1, 7, 7), 3.5, dtype=torch.float64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_uint8_with_normalisation(backend):
    x = torch.randint(0, 256, (3, 3, 31, 28), dtype=torch.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    with effkern.use_backend(backend):
        y = fft_crop(x, (16, 13), mean=mean, std=std)
    assert y.dtype == torch.float32
    ref = fft_crop_oracle(x, (16, 13), torch.tensor(mean), torch.tensor(std))
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float_with_normalisation_equals_normalise_then_crop(backend):
    x = torch.rand(2, 3, 20, 18, dtype=torch.float64)
    mean, std = torch.tensor([0.5, 0.4, 0.3], dtype=torch.float64), torch.tensor([0.2, 0.3, 0.4], dtype=torch.float64)
    with effkern.use_backend(backend):
        y = fft_crop(x, (10, 9), mean=mean, std=std)
    ref = fft_crop_oracle((x - mean.view(3, 1, 1)) / std.view(3, 1, 1), (10, 9))
    assert rel_err(y, ref) < 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    x = torch.randn(2, 3, 24, 20).to(dtype)
    with effkern.use_backend(backend):
        y = fft_crop(x, (12, 10))
    assert y.dtype == dtype
    assert rel_err(y, fft_crop_oracle(x.double(), (12, 10))) < 1e-2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("size", [(4, 3), (5, 6), (7, 7)])
def test_gradcheck(backend, size):
    x = torch.randn(2, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    mean = torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True)
    std = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    with effkern.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: fft_crop(t, size), (x,))
        assert torch.autograd.gradgradcheck(lambda t: fft_crop(t, size), (x,))
        assert torch.autograd.gradcheck(lambda t, m, s: fft_crop(t, size, m, s), (x, mean, std))


def test_backward_is_adjoint_of_oracle():
    x = torch.randn(2, 3, 13, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    (dx,) = torch.autograd.grad(fft_crop(x, (6, 8)), x, g)
    x2 = x.detach().clone().requires_grad_(True)
    (dx_ref,) = torch.autograd.grad(fft_crop_oracle(x2, (6, 8)), x2, g)
    assert rel_err(dx, dx_ref) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(2, 3, 9, 10, device=device, requires_grad=True)
    mean, std = torch.tensor([0.1, 0.2, 0.3], device=device), torch.tensor([1.0, 2.0, 3.0], device=device)
    torch.library.opcheck(torch.ops.effkern.fft_crop.default, (x, [5, 6]))
    torch.library.opcheck(torch.ops.effkern.fft_crop.default, (x, [4, 4], mean, std))
    xu8 = torch.randint(0, 255, (2, 3, 9, 10), dtype=torch.uint8, device=device)
    torch.library.opcheck(torch.ops.effkern.fft_crop.default, (xu8, [5, 5], mean, std))
    g = torch.randn(2, 3, 5, 6, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.effkern.fft_crop_backward.default, (g, [9, 10]))


def test_torch_compile_fullgraph():
    x = torch.randn(2, 3, 16, 18, requires_grad=True)

    def f(t):
        return fft_crop(t, (8, 9)).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (dx,) = torch.autograd.grad(out, x)
    x2 = x.detach().clone().requires_grad_(True)
    ref = f(x2)
    (dx2,) = torch.autograd.grad(ref, x2)
    assert rel_err(out, ref) < 1e-6 and rel_err(dx, dx2) < 1e-6


def test_size_may_change_every_call():
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for s in (8, 31, 16, 1, 32, 9):
        assert rel_err(fft_crop(x, s), fft_crop_oracle(x, (s, s))) < 1e-12


def test_python_schema_copy_matches_cpp():
    fft_crop_module = importlib.import_module("effkern.ops.fft_crop")
    for name, schema in fft_crop_module.SCHEMAS.items():
        registered = str(getattr(torch.ops.effkern, name).default._schema)
        assert registered == "effkern::" + schema


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.randn(3, 8, 8), 4), {}, "x must be 4-D"),
        ((torch.randn(1, 1, 8, 8), 9), {}, "size"),
        ((torch.randn(1, 1, 8, 8), (4, 9)), {}, "size"),
        ((torch.randn(1, 1, 8, 8), 0), {}, "size"),
        ((torch.randn(1, 1, 8, 8), (2, 2, 2)), {}, "size"),
        ((torch.randn(1, 1, 8, 8, dtype=torch.complex64), 4), {}, "x has dtype"),
        ((torch.randint(0, 9, (1, 3, 8, 8), dtype=torch.uint8), 4), {}, "integer dtype"),
        ((torch.randn(1, 3, 8, 8), 4), {"mean": [0.1, 0.2], "std": [1.0, 1.0]}, "mean must have one value per channel"),
        ((torch.randn(1, 3, 8, 8), 4), {"mean": [0.1, 0.2, 0.3]}, "mean and std must be given together"),
        (("not a tensor", 4), {}, "x must be a torch.Tensor"),
    ],
)
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match) if " " in match else match):
        fft_crop(*args, **kwargs)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_matches_oracle(dtype, shape):
    n, c, H, W, h, w = shape
    x = torch.randn(n, c, H, W, device="cuda").to(dtype)
    y = fft_crop(x, (h, w))
    assert y.shape == (n, c, h, w) and y.dtype == dtype and y.is_cuda
    if n:
        tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 1e-2)
        assert rel_err(y, fft_crop_oracle(x.double().cpu(), (h, w))) < tol


@requires_cuda
def test_cuda_uint8_and_backward():
    x = torch.randint(0, 256, (4, 3, 64, 48), dtype=torch.uint8, device="cuda")
    mean, std = torch.tensor([0.4, 0.5, 0.6], device="cuda"), torch.tensor([0.2, 0.25, 0.3], device="cuda")
    y = fft_crop(x, (32, 40), mean, std)
    assert rel_err(y, fft_crop_oracle(x.cpu(), (32, 40), mean.cpu(), std.cpu())) < 1e-5
    xf = torch.randn(2, 3, 30, 34, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fft_crop(t, (15, 16)), (xf,))
