"""pytest-benchmark microbenchmarks of effkern.ops.patch_embed vs the timm
composition (conv2d + PI-resized weight + pos resample + PatchDropout gather).

    python -m pytest benchmarks/test_bench_patch_embed.py --benchmark-only

CPU cases are small (they run anywhere); CUDA cases (ViT-B, batch 256, bf16)
skip without a GPU and synchronize inside the timed call.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="effkern: the compiled extension")

from effkern.ops import patch_embed, sample_keep  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _setup(device, dtype, B, img, p, D, keep):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, img, img, generator=gen).to(device, dtype)
    w = (torch.randn(D, 3, 16, 16, generator=gen) * 0.02).to(device, dtype)
    b = torch.randn(D, generator=gen).to(device, dtype)
    pos = torch.randn(1, 196, D, generator=gen).to(device, dtype)
    N = (img // p) ** 2
    keep_idx, cu = sample_keep(B, N, keep, generator=gen)
    return x, w, b, pos, keep_idx.to(device), cu.to(device)


def _timm_fn(x, w, b, pos, p, keep_idx, B):
    from timm.layers import resample_abs_pos_embed
    from timm.layers.patch_embed import PatchEmbedResamplerFixedOrigSize

    resampler = PatchEmbedResamplerFixedOrigSize((16, 16))
    g = x.shape[-1] // p
    idx = keep_idx.reshape(B, -1)

    def f():
        wp = resampler(w, [p, p]) if p != 16 else w
        y = F.conv2d(x, wp, b, stride=p).flatten(2).transpose(1, 2)
        y = y + resample_abs_pos_embed(pos, [g, g], num_prefix_tokens=0)
        return torch.gather(y, 1, idx.unsqueeze(-1).expand(-1, -1, y.shape[-1]))

    return f


def _sync(device, f):
    if device.type != "cuda":
        return f

    def g():
        out = f()
        torch.cuda.synchronize()
        return out

    return g


CPU_CASES = [(2, 96, 16, 192, 0.5), (2, 96, 24, 192, 0.5), (2, 96, 32, 192, 1.0)]
GPU_CASES = [(256, 224, 16, 768, 0.5), (256, 240, 24, 768, 0.5), (256, 224, 32, 768, 1.0)]


@pytest.mark.parametrize("impl", ["effkern", "timm"])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"B{c[0]}-{c[1]}px-p{c[2]}-D{c[3]}-keep{c[4]}")
def test_cpu(benchmark, case, impl):
    B, img, p, D, keep = case
    x, w, b, pos, keep_idx, cu = _setup(torch.device("cpu"), torch.float32, B, img, p, D, keep)
    if impl == "effkern":
        fn = lambda: patch_embed(x, w, b, p, pos, keep_idx, cu)  # noqa: E731
    else:
        fn = _timm_fn(x, w, b, pos, p, keep_idx, B)
    with torch.no_grad():
        out = benchmark(fn)
    assert out.shape[-1] == D


@cuda
@pytest.mark.parametrize("impl", ["effkern", "timm"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"B{c[0]}-{c[1]}px-p{c[2]}-D{c[3]}-keep{c[4]}")
def test_cuda_bf16(benchmark, case, impl):
    B, img, p, D, keep = case
    dev = torch.device("cuda")
    x, w, b, pos, keep_idx, cu = _setup(dev, torch.bfloat16, B, img, p, D, keep)
    if impl == "effkern":
        fn = lambda: patch_embed(x, w, b, p, pos, keep_idx, cu)  # noqa: E731
    else:
        fn = _timm_fn(x, w, b, pos, p, keep_idx, B)
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        out = benchmark(_sync(dev, fn))
    assert out.shape[-1] == D
