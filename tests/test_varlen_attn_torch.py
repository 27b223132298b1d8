"""The ``flash`` backend of varlen_attention (torch.nn.attention.varlen's FlashAttention-2
behind effkern's contract): the switch, the fallbacks, and on a GPU the results
against the float64 oracle (forward, lse, gradients, packed qkv)."""

from __future__ import annotations

import pytest
import torch

import effkern
from effkern.kernels import varlen_attn_torch as flash
from effkern.ops import varlen_attention, varlen_attention_qkvpacked
from oracles import rel_err
from oracles_attention import make_cu_seqlens, varlen_attention_oracle
from conftest import requires_cuda


def _inputs(lengths, heads, head_dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    qkv = [torch.randn(total, heads, head_dim, generator=g).to(device, dtype).requires_grad_() for _ in range(3)]
    return (*qkv, make_cu_seqlens(lengths, device), max(lengths))


def test_flash_is_a_backend_name():
    assert "flash" in effkern.backend.BACKENDS
    with effkern.use_backend("flash"):
        assert effkern.get_backend() == "flash"
        assert effkern.backend.select(torch.device("cpu"), {"flash", "reference"}) == "reference"


def test_flash_on_cpu_falls_back_to_the_reference_path():
    q, k, v, cu, m = _inputs([5, 0, 9], 2, 16, torch.float32, "cpu", seed=1)
    assert not flash.supports(q) and not flash.selected(q)
    with effkern.use_backend("flash"):
        out = varlen_attention(q, k, v, cu, m)
    assert rel_err(out, varlen_attention_oracle(q, k, v, cu)) < 1e-6


def test_supports_states_flash_attention_limits():
    meta = dict(device="meta")
    assert not flash.supports(torch.empty(4, 2, 64, dtype=torch.float16, **meta))  # not CUDA
    assert flash.torch_has_varlen() == (tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 10))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_cuda_flash_matches_oracle(dtype, head_dim):
    q, k, v, cu, m = _inputs([197, 1, 0, 37, 120], 3, head_dim, dtype, "cuda", seed=head_dim)
    if not flash.supports(q):
        pytest.skip("FlashAttention-2 varlen not available on this GPU/torch")
    with effkern.use_backend("flash"):
        assert flash.selected(q)
        out = varlen_attention(q, k, v, cu, m)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
        _, lse = torch.ops.effkern.varlen_attention_fwd(q, k, v, cu, m, head_dim ** -0.5)
    ref = varlen_attention_oracle(q, k, v, cu)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert rel_err(out, ref) < tol
    want = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in zip(grads, want):
        assert rel_err(a, b) < tol
    s = torch.einsum("thd,shd->hts", q[:197].double(), k[:197].double()) * head_dim ** -0.5
    assert rel_err(lse[:, :197], torch.logsumexp(s, -1)) < 1e-4


@requires_cuda
def test_cuda_flash_qkvpacked_writes_packed_grad():
    lengths = [50, 197, 3]
    cu = make_cu_seqlens(lengths, "cuda")
    qkv = torch.randn(sum(lengths), 3, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if not flash.supports(qkv[:, 0]):
        pytest.skip("FlashAttention-2 varlen not available on this GPU/torch")
    with effkern.use_backend("flash"):
        out = varlen_attention_qkvpacked(qkv, cu, 197)
        (dqkv,) = torch.autograd.grad(out.float().square().sum(), (qkv,))
    ref = varlen_attention_oracle(*qkv.unbind(1), cu)
    (want,) = torch.autograd.grad(ref.square().sum(), (qkv,))
    assert rel_err(out, ref) < 2e-2 and rel_err(dqkv, want) < 2e-2


@requires_cuda
def test_cuda_flash_unsupported_dtype_runs_triton():
    q, k, v, cu, m = _inputs([20, 7], 2, 64, torch.float32, "cuda", seed=3)
    with effkern.use_backend("flash"):
        assert not flash.selected(q)
        out = varlen_attention(q, k, v, cu, m)
    assert rel_err(out, varlen_attention_oracle(q, k, v, cu)) < 1e-5
