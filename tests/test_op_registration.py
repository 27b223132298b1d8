"""What every effkern op's torch.library registration must carry, checked over all ops
(docs/architecture.md, "How an op is registered"): the pt2_compliant_tag on every schema
(Python and C++), and a backward op without a derivative raises in a double backward
instead of returning a silently wrong second derivative.  The tag on fft_crop's Python
fallback schema (no extension) is checked in tests/test_package.py."""

from __future__ import annotations

import pytest
import torch

import effkern
from effkern.ops import patch_embed, varlen_attention, varlen_attention_qkvpacked
from effkern.ops.resize_pos_embed import resize_pos_embed
from oracles_attention import make_cu_seqlens


# every op in the effkern namespace: a new op must be added here (test_every_op_is_listed)
ALL_OPS = ["fft_crop", "fft_crop_backward",
           "patch_embed_fwd", "patch_embed_bwd_weight", "patch_embed_bwd_images",
           "resize_pos_embed", "resize_pos_embed_backward",
           "varlen_attention_fwd", "varlen_attention_bwd",
           "varlen_attention_qkvpacked_fwd", "varlen_attention_qkvpacked_bwd"]


def test_every_op_is_listed():
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("effkern::")}
    assert registered == set(ALL_OPS)


@pytest.mark.parametrize("name", ALL_OPS)
def test_pt2_compliant_tag(name):
    assert torch.Tag.pt2_compliant_tag in getattr(torch.ops.effkern, name).default.tags


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _patch_embed():
    x = torch.randn(2, 3, 8, 8, generator=_gen(1), requires_grad=True)
    w = torch.randn(5, 3, 4, 4, generator=_gen(2), requires_grad=True)
    return patch_embed(x, w, None, 4), (x, w)


def _resize_pos_embed():
    pos = torch.randn(1, 16, 8, generator=_gen(3), requires_grad=True)
    return resize_pos_embed(pos, (6, 3)), (pos,)


def _attention_qkv():
    return [torch.randn(9, 2, 16, generator=_gen(4 + i), requires_grad=True) for i in range(3)]


def _varlen_attention():
    q, k, v = _attention_qkv()
    return varlen_attention(q, k, v, make_cu_seqlens([4, 0, 5]), 5), (q, k, v)


def _varlen_attention_qkvpacked():
    qkv = torch.randn(9, 3, 2, 16, generator=_gen(7), requires_grad=True)
    return varlen_attention_qkvpacked(qkv, make_cu_seqlens([4, 0, 5]), 5), (qkv,)


# public op -> a forward through it (output, differentiable inputs).  Not fft_crop: its
# backward op has a derivative (the map is linear, the adjoint of fft_crop_backward is
# fft_crop), checked by gradgradcheck in tests/test_fft_crop.py.
WITHOUT_DOUBLE_BACKWARD = {
    "patch_embed": _patch_embed,
    "resize_pos_embed": _resize_pos_embed,
    "varlen_attention": _varlen_attention,
    "varlen_attention_qkvpacked": _varlen_attention_qkvpacked,
}


def _first_grads(run):
    out, inputs = run()
    grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    return grads, inputs


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name", sorted(WITHOUT_DOUBLE_BACKWARD))
def test_double_backward_raises(name, backend):
    public = "varlen_attention" if name.startswith("varlen_attention") else name
    with effkern.use_backend(backend):
        grads, inputs = _first_grads(WITHOUT_DOUBLE_BACKWARD[name])
        for g in grads:  # every backward op the first backward called
            assert g.requires_grad
            with pytest.raises(RuntimeError, match=f"double backward through effkern {public} is not supported"):
                torch.autograd.grad(g.square().sum(), inputs, allow_unused=True)

