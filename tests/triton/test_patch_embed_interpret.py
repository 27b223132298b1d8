"""The real Triton kernels of patch_embed (forward gather-GEMM and dW) run in
the interpreter on tiny shapes, against the float64 PyTorch reference.

Run in its own process:
    TRITON_INTERPRET=1 EFFKERN_BACKEND=triton python -m pytest tests/triton/test_patch_embed_interpret.py
"""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="effkern: the compiled extension")

import effkern  # noqa: E402
import effkern.backend  # noqa: E402

pytestmark = pytest.mark.skipif(not effkern.backend.triton_interpret(),
                                reason="needs TRITON_INTERPRET=1 set before import (separate pytest process)")

if effkern.backend.triton_interpret():
    from effkern.kernels import patch_embed as kern
from effkern.ops import patch_embed, sample_keep  # noqa: E402
from effkern.reference import patch_embed as ref  # noqa: E402
from oracles import rel_err  # noqa: E402


TOL = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 1e-2}


@pytest.fixture
def poison(monkeypatch):
    def nan_empty(shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(kern, "_empty", nan_empty)


# (B, C, H, W, p, D, index): index None = every patch; else counts per image
SHAPES = [
    (2, 3, 16, 24, 8, 20, None),
    (3, 1, 12, 12, 4, 17, [1, 9, 4]),
    (2, 3, 24, 16, 8, 33, [6, 1]),
    (4, 2, 20, 20, 2, 16, [100, 1, 37, 100]),  # T > 64: the split-M dW path
    (1, 3, 6, 9, 3, 5, [6]),
]


def _inputs(shape, dtype, seed):
    B, C, H, W, p, D, counts = shape
    gen = torch.Generator().manual_seed(seed)
    N = (H // p) * (W // p)
    x = torch.randn(B, C, H, W, generator=gen).to(dtype)
    w = torch.randn(D, C * p * p, generator=gen).to(dtype)
    b = torch.randn(D, generator=gen).to(dtype)
    pos = torch.randn(N, D, generator=gen).to(dtype)
    index = None
    if counts is not None:
        keep_idx, cu = sample_keep(B, N, torch.tensor(counts), generator=gen)
        index = ref.flat_index(keep_idx, cu, N)
    return x, w, b, pos, index


def shape_id(s):
    return "x".join(map(str, s[:6])) + ("-all" if s[6] is None else "-kept")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_kernel(poison, shape, dtype):
    x, w, b, pos, index = _inputs(shape, dtype, 0)
    p = shape[4]
    for bias, ps in ((b, pos), (None, None), (b, None)):
        out = kern.patch_embed_fwd(x, w, bias, ps, index, p)
        exp = ref.patch_embed_fwd(x.double(), w.double(), None if bias is None else bias.double(),
                                  None if ps is None else ps.double(), index, p)
        assert out.dtype == dtype and out.shape == exp.shape
        assert torch.isfinite(out).all()
        assert rel_err(out, exp) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_dw_kernel(poison, shape, dtype):
    x, w, b, pos, index = _inputs(shape, dtype, 1)
    p = shape[4]
    T = x.shape[0] * (x.shape[2] // p) * (x.shape[3] // p) if index is None else index.shape[0]
    g = torch.randn(T, w.shape[0], generator=torch.Generator().manual_seed(2)).to(dtype)
    dw = kern.patch_embed_bwd_weight(g, x, index, p)
    exp = ref.patch_embed_bwd_weight(g.double(), x.double(), index, p)
    assert dw.dtype == dtype and dw.shape == exp.shape
    assert torch.isfinite(dw).all()
    assert rel_err(dw, exp) < TOL[dtype]


def test_strided_images():
    x = torch.randn(2, 16, 16, 3, dtype=torch.float64).permute(0, 3, 1, 2)  # channels-last strides
    w = torch.randn(7, 3 * 16, dtype=torch.float64)
    index = torch.tensor([0, 5, 9, 17, 31])
    out = kern.patch_embed_fwd(x, w, None, None, index, 4)
    assert rel_err(out, ref.patch_embed_fwd(x.contiguous(), w, None, None, index, 4)) < 1e-13
    g = torch.randn(5, 7, dtype=torch.float64)
    dw = kern.patch_embed_bwd_weight(g, x, index, 4)
    assert rel_err(dw, ref.patch_embed_bwd_weight(g, x.contiguous(), index, 4)) < 1e-13


def test_public_op_uses_triton_and_grads(poison):
    """End to end through effkern.ops.patch_embed (backend triton): values and all gradients."""
    assert effkern.get_backend() == "triton"
    gen = torch.Generator().manual_seed(3)
    dt = torch.float64
    x = torch.randn(2, 3, 24, 16, dtype=dt, generator=gen, requires_grad=True)
    w = torch.randn(18, 3, 16, 16, dtype=dt, generator=gen, requires_grad=True)
    b = torch.randn(18, dtype=dt, generator=gen, requires_grad=True)
    pos = torch.randn(1, 9, 18, dtype=dt, generator=gen, requires_grad=True)
    keep_idx, cu = sample_keep(2, 6, torch.tensor([1, 6]), generator=gen)
    calls = []
    real = kern.patch_embed_fwd
    kern_fwd = lambda *a: calls.append(1) or real(*a)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kern, "patch_embed_fwd", kern_fwd)
        out = patch_embed(x, w, b, 8, pos, keep_idx, cu)
    assert calls, "the Triton launcher was not used"
    g = torch.randn(out.shape, dtype=dt, generator=gen)
    got = torch.autograd.grad(out, [x, w, b, pos], g)
    with effkern.use_backend("reference"):
        exp = patch_embed(x, w, b, 8, pos, keep_idx, cu)
    want = torch.autograd.grad(exp, [x, w, b, pos], g)
    assert rel_err(out, exp) < 1e-13
    for a, e in zip(got, want):
        assert rel_err(a, e) < 1e-13


@pytest.mark.parametrize("with_index", [False, True])
def test_opcheck_triton_backend(with_index):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 8, 8, generator=gen, requires_grad=True)
    w = torch.randn(5, 3 * 4 * 4, generator=gen, requires_grad=True)
    b = torch.randn(5, generator=gen, requires_grad=True)
    pos = torch.randn(4, 5, generator=gen, requires_grad=True)
    index = torch.tensor([0, 3, 5, 6, 7]) if with_index else None
    torch.library.opcheck(torch.ops.effkern.patch_embed_fwd.default, (x, w, b, pos, index, 4))
    g = torch.randn(5 if with_index else 8, 5, generator=gen)
    torch.library.opcheck(torch.ops.effkern.patch_embed_bwd_weight.default, (g, x.detach(), index, 4))
