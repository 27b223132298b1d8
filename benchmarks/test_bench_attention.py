"""pytest-benchmark microbenchmarks for effkern.ops.varlen_attention.

    pytest benchmarks/test_bench_attention.py --benchmark-only

CPU cases are small (the PyTorch path); GPU cases (ViT-B heads, batch 256 of
token-dropped 197-token sequences, bf16) skip without CUDA and synchronize inside
the timed call.  The peer tables live in ``effkern bench attention``.
"""

from __future__ import annotations

import pytest
import torch

from effkern.bench.attention import dino_lengths, dropout_lengths
from effkern.ops import varlen_attention

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _setup(lengths, heads, head_dim, dtype, device):
    g = torch.Generator().manual_seed(0)
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q, k, v = (torch.randn(total, heads, head_dim, generator=g).to(device, dtype).requires_grad_()
               for _ in range(3))
    return q, k, v, cu, max(lengths)


def _bench(benchmark, lengths, heads, head_dim, dtype, device, mode):
    q, k, v, cu, m = _setup(lengths, heads, head_dim, dtype, device)
    grad = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            varlen_attention(q, k, v, cu, m)
        if device == "cuda":
            torch.cuda.synchronize()

    def fwdbwd():
        out = varlen_attention(q, k, v, cu, m)
        torch.autograd.grad(out, (q, k, v), grad)
        if device == "cuda":
            torch.cuda.synchronize()

    fn = fwd if mode == "fwd" else fwdbwd
    fn()  # warm-up (autotuning on CUDA)
    benchmark(fn)


CPU_CASES = {
    "vit-s-keep0.5-b4": (dropout_lengths(4, 0.5, torch.Generator().manual_seed(0)), 6, 64),
    "vit-h-keep1-b2": ([197] * 2, 16, 80),
    "vit-s-dino-b1": (dino_lengths(1), 6, 64),
}


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("case", sorted(CPU_CASES))
def test_cpu(benchmark, case, mode):
    lengths, heads, head_dim = CPU_CASES[case]
    _bench(benchmark, lengths, heads, head_dim, torch.float32, "cpu", mode)


@cuda
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("keep", [1.0, 0.5, 0.25])
def test_cuda_vit_b(benchmark, keep, mode):
    lengths = dropout_lengths(256, keep, torch.Generator().manual_seed(0))
    _bench(benchmark, lengths, 12, 64, torch.bfloat16, "cuda", mode)


@cuda
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_cuda_dino_vit_b(benchmark, mode):
    _bench(benchmark, dino_lengths(256), 12, 64, torch.bfloat16, "cuda", mode)
