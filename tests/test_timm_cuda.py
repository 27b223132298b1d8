"""The timm drop-in on a GPU (`./dev gpu` runs it): a patched ViT-S/16 with ragged token
dropout on CUDA -- Triton attention and patch embedding -- against timm's own modules
one sample at a time in float64 on the CPU (tests/test_timm.py's reference), in fp32
and under bf16 autocast (what `effkern train` uses), forward and parameter gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import requires_cuda

timm = pytest.importorskip("timm")

import effkern.timm as et  # noqa: E402
from effkern.ops import sample_keep  # noqa: E402
from oracles import rel_err  # noqa: E402
from test_timm import timm_reference  # noqa: E402  (the per-sample timm reference)


def _model():
    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, depth=4).eval()
    with torch.no_grad():  # timm initialises these near 0: make the prefix and positions matter
        m.cls_token.normal_(0, 0.5)
        m.pos_embed.normal_(0, 0.5)
    return m


@requires_cuda
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_patched_vit_token_dropout_matches_timm_per_sample(autocast):
    ref = _model()
    m = et.patch(copy.deepcopy(ref)).cuda()
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    keep_idx, cu = sample_keep(4, 196, torch.tensor([49, 196, 1, 120]))
    per = [keep_idx[cu[b]:cu[b + 1]] for b in range(4)]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = m(x.cuda(), keep=(keep_idx.cuda(), cu.cuda()))
    ref64 = copy.deepcopy(ref).double()
    x64 = x.double().requires_grad_(False)
    want = timm_reference(ref64, x64, keep_idx=per)
    assert rel_err(out, want) < (3e-2 if autocast else 1e-4)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out.float() * g.cuda().float()).sum().backward()
    (want * g).sum().backward()
    for (name, p64), (_, p) in zip(ref64.named_parameters(), m.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "pos_embed"):
            assert rel_err(p.grad, p64.grad) < (5e-2 if autocast else 1e-3), name
