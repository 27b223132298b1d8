"""torch.library.opcheck of every effkern op on CUDA tensors: the schema, the fake
kernel, the autograd registration and AOT dispatch checked against the CUDA kernels
(Triton attention and patch embedding, the C++/CUDA fft_crop), where the CPU tests
check them against the CPU kernels only.  Inputs mirror the CPU opcheck tests
(odd lengths, an empty sequence, a token index)."""

from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from oracles_attention import make_cu_seqlens

pytestmark = requires_cuda
ops = torch.ops.effkern


def _randn(*shape, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64).to("cuda", dtype)
    return t.requires_grad_(grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_opcheck_varlen_attention(dtype):
    lengths = [5, 0, 1, 17]
    cu = make_cu_seqlens(lengths, "cuda")
    total, m, scale = sum(lengths), max(lengths), 64 ** -0.5
    q, k, v = (_randn(total, 2, 64, dtype=dtype, grad=True, seed=s) for s in range(3))
    torch.library.opcheck(ops.varlen_attention_fwd, (q, k, v, cu, m, scale))
    out, lse = ops.varlen_attention_fwd(q, k, v, cu, m, scale)
    dout = _randn(*out.shape, dtype=dtype, seed=3)
    torch.library.opcheck(ops.varlen_attention_bwd, (dout, q.detach(), k.detach(), v.detach(),
                                                     out.detach(), lse, cu, m, scale))
    qkv = torch.stack([q, k, v], 1).detach().requires_grad_()
    torch.library.opcheck(ops.varlen_attention_qkvpacked_fwd, (qkv, cu, m, scale))
    torch.library.opcheck(ops.varlen_attention_qkvpacked_bwd, (dout, qkv.detach(), out.detach(), lse,
                                                               cu, m, scale))


@pytest.mark.parametrize("with_index", [False, True])
def test_cuda_opcheck_patch_embed(with_index):
    x = _randn(2, 3, 8, 8, grad=True, seed=0)
    w = _randn(5, 3 * 4 * 4, grad=True, seed=1)
    b = _randn(5, grad=True, seed=2)
    pos = _randn(4, 5, grad=True, seed=3)
    index = torch.tensor([0, 3, 5, 6, 7], device="cuda") if with_index else None
    torch.library.opcheck(ops.patch_embed_fwd.default, (x, w, b, pos, index, 4))
    torch.library.opcheck(ops.patch_embed_fwd.default, (x, w, None, None, index, 4))
    tokens = 8 if index is None else index.shape[0]
    g = _randn(tokens, 5, seed=4)
    torch.library.opcheck(ops.patch_embed_bwd_weight.default, (g, x.detach(), index, 4))
    torch.library.opcheck(ops.patch_embed_bwd_images.default, (g, w.detach(), index, 4, [2, 3, 8, 8]))


def test_cuda_opcheck_resize_pos_embed():
    pos = _randn(1, 16, 8, grad=True)
    torch.library.opcheck(ops.resize_pos_embed.default, (pos, 6, 3))
    torch.library.opcheck(ops.resize_pos_embed_backward.default, (_randn(18, 8, seed=1), pos.detach(), 6, 3))


def test_cuda_opcheck_fft_crop():
    x = _randn(2, 3, 9, 10, grad=True)
    mean = torch.tensor([0.1, 0.2, 0.3], device="cuda")
    std = torch.tensor([1.0, 2.0, 3.0], device="cuda")
    torch.library.opcheck(ops.fft_crop.default, (x, [5, 6]))
    torch.library.opcheck(ops.fft_crop.default, (x, [4, 4], mean, std))
    xu8 = torch.randint(0, 255, (2, 3, 9, 10), dtype=torch.uint8, device="cuda")
    torch.library.opcheck(ops.fft_crop.default, (xu8, [5, 5], mean, std))
    g = _randn(2, 3, 5, 6, grad=True, seed=1)
    torch.library.opcheck(ops.fft_crop_backward.default, (g, [9, 10]))
