"""effkern.timm training features on the packed path: attention dropout (fallback,
seeded, timm's draws), patch_drop_rate composed with keep, hybrid / non-square patch
embeds refusing patch_size=, ragged attention pooling against timm per sample."""

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

import effkern.timm as et  # noqa: E402
from effkern.layers.attention_dropout import varlen_attention_dropout  # noqa: E402
from effkern.ops import sample_keep, varlen_attention_qkvpacked  # noqa: E402
from effkern.timm._embed import _count_ratio  # noqa: E402
from oracles import rel_err  # noqa: E402

IMG = 32


def make(**kw):
    kw = {"pretrained": False, "img_size": IMG, "depth": 2, "embed_dim": 64, "num_heads": 2,
          "num_classes": 3, **kw}
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **kw)


def test_attention_dropout_draws_as_timm_and_is_seeded():
    """Training, equal lengths: the fallback draws the same dropout mask as timm's
    non-fused Attention under the same seed, so outputs (and grads) agree."""
    ref = make(attn_drop_rate=0.3).train()
    for blk in ref.blocks:
        blk.attn.fused_attn = False  # timm's explicit softmax -> dropout path
    m = et.patch(copy.deepcopy(ref))
    x = torch.randn(2, 3, IMG, IMG)
    keep = (torch.arange(4).repeat(2), torch.tensor([0, 4, 8], dtype=torch.int32))  # all patches: no RNG
    torch.manual_seed(11)
    want = ref(x)
    torch.manual_seed(11)
    got = m(x, keep=keep)
    assert rel_err(got, want) < 1e-5
    torch.manual_seed(11)
    assert torch.equal(m(x, keep=keep), got)  # reproducible
    torch.manual_seed(12)
    assert not torch.equal(m(x, keep=keep), got)  # and really random
    assert rel_err(m.eval()(x, keep=keep), ref.eval()(x)) < 1e-5  # eval: no dropout


def test_attention_dropout_ragged_matches_oracle_and_expectation():
    cu = torch.tensor([0, 3, 10, 11, 18], dtype=torch.int32)
    qkv = torch.randn(18, 3, 2, 16, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    out = varlen_attention_dropout(qkv, cu, 0.25, 0.0)
    assert rel_err(out, varlen_attention_qkvpacked(qkv, cu, 7, scale=0.25)) < 1e-12
    # E[dropout] = no dropout: the mean over many draws converges to the plain attention
    torch.manual_seed(1)
    with torch.no_grad():
        mean = sum(varlen_attention_dropout(qkv, cu, 0.25, 0.5) for _ in range(100)) / 100
    assert rel_err(mean, out) < 0.2  # about 0.1 expected from 100 draws
    out.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()
    with pytest.raises(ValueError, match="dropout_p"):
        varlen_attention_dropout(qkv, cu, 0.25, 1.0)


def test_patch_drop_composes_with_keep():
    m = et.patch(make(patch_drop_rate=0.5, embed_dim=32))
    x = torch.randn(2, 3, 64, 64)  # 16 patches
    P = m.num_prefix_tokens
    m.eval()  # eval: PatchDropout is off
    assert m.forward_features(x, keep=0.5).shape[1] == P + 8
    m.train()
    assert m.forward_features(x, keep=0.5).shape[1] == P + 4        # 8 kept, then 0.5 of them
    assert m.forward_features(x, patch_size=8).shape[1] == P + 32   # keep None: 64 * 0.5
    feats, cu = m.forward_features(x, keep=torch.tensor([5, 16]))
    assert cu.tolist() == [0, 2 + P, 2 + P + 8 + P]
    idx = torch.cat([torch.tensor([0, 2, 5, 9, 11]), torch.tensor([1, 3, 4, 6, 7, 8, 10, 12, 13, 14, 15])])
    feats, cu = m.forward_features(x, keep=(idx, torch.tensor([0, 5, 16], dtype=torch.int32)))
    assert cu.tolist() == [0, 2 + P, 2 + P + 5 + P]
    # the composed draw is ONE sample_keep of the composed count (checked in eval-free form)
    for blk in m.blocks:
        blk.drop_path1 = blk.drop_path2 = torch.nn.Identity()
    got = m.forward_features(x, keep=0.5, generator=torch.Generator().manual_seed(5))
    kept, _ = sample_keep(2, 16, _count_ratio(4, 16), generator=torch.Generator().manual_seed(5))
    m.eval()
    want = m.forward_features(x, keep=(kept, torch.tensor([0, 4, 8], dtype=torch.int32)))[0]
    assert rel_err(got.reshape(-1, got.shape[-1]), want) < 1e-6


def test_module_path_embeds_refuse_patch_size():
    hybrid = et.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=64, depth=1,
                             num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="cannot change its patch size"):
        hybrid(x, patch_size=8)
    assert hybrid(x, keep=0.5).shape == (2, 3)
    rect = et.patch(make(patch_size=(16, 8)).eval())
    with pytest.raises(ValueError, match="cannot change its patch size"):
        rect(torch.randn(1, 3, IMG, IMG), patch_size=4)


def test_map_pool_is_ragged_not_padded():
    """SigLIP 'map' pooling of a ragged batch equals pooling each sample alone, and no
    sample's result depends on the others (no padding / mask leaks)."""
    m = et.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=IMG, depth=1,
                        embed_dim=64, num_heads=2, num_classes=3).eval()
    x = torch.randn(3, 3, IMG, IMG)
    idx, cu = sample_keep(3, 4, torch.tensor([1, 4, 2]))
    out = m(x, keep=(idx, cu))
    for b in range(3):
        one = m(x[b:b + 1], keep=(idx[cu[b]:cu[b + 1]], torch.tensor([0, int(cu[b + 1] - cu[b])],
                                                                         dtype=torch.int32)))
        assert rel_err(out[b:b + 1], one) < 1e-5
