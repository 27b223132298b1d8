"""effkern.timm: patched timm VisionTransformer vs timm's own code.

Small randomly initialised models (depth 2, 64x64 images) keep this file fast on CPU.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import effkern.timm as et  # noqa: E402
from effkern.layers.packed_vit import packed_drop_path  # noqa: E402
from effkern.ops import sample_keep  # noqa: E402
from timm.layers import resample_abs_pos_embed, resample_patch_embed  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

IMG = 64

CONFIGS = {
    "tiny": ("vit_tiny_patch16_224", {}),
    "reg4": ("vit_small_patch16_224", {"reg_tokens": 4}),
    "reg4_noembcls": ("vit_small_patch16_224", {"reg_tokens": 2, "no_embed_class": True}),
    "nocls_avg": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
    "qknorm_ls_max": ("vit_tiny_patch16_224", {"qk_norm": True, "init_values": 0.1, "global_pool": "max",
                                               "no_embed_class": True}),
    "nopool": ("vit_tiny_patch16_224", {"global_pool": ""}),
    "misc": ("vit_tiny_patch16_224", {"scale_attn_norm": True, "pre_norm": True, "global_pool": "avgmax",
                                      "pool_include_prefix": True, "reg_tokens": 1}),
    "nopos": ("vit_tiny_patch16_224", {"pos_embed": "none", "global_pool": "avg"}),
}


def make(name="tiny", **extra):
    arch, kw = CONFIGS[name]
    kw = {"pretrained": False, "img_size": IMG, "depth": 2, "num_classes": 10, **kw, **extra}
    m = timm.create_model(arch, **kw).eval()
    with torch.no_grad():  # timm inits these to ~0 / tiny values: make prefix tokens matter
        for t in (m.cls_token, m.reg_token, m.pos_embed):
            if t is not None:
                t.normal_(0, 0.5)
    return m


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def timm_reference(m, x, patch_size=None, keep_idx=None, pre_logits=False):
    """timm's own modules, one sample at a time: resampled conv + resampled pos embed
    (timm.layers.resample_*), gather kept patches, prepend prefix tokens, blocks, norm, head."""
    p0 = m.patch_embed.proj.kernel_size[0]
    p = p0 if patch_size is None else patch_size
    w = m.patch_embed.proj.weight
    if p != p0:
        w = resample_patch_embed(w, [p, p])
    P = m.num_prefix_tokens
    gh, gw = x.shape[2] // p, x.shape[3] // p
    pos = m.pos_embed
    if pos is not None and (gh, gw) != tuple(m.patch_embed.grid_size):
        pos = resample_abs_pos_embed(pos, new_size=[gh, gw], num_prefix_tokens=0 if m.no_embed_class else P)
    pos_prefix, pos_patch = (None, pos) if (m.no_embed_class or P == 0) else (pos[:, :P], pos[:, P:])
    outs = []
    for b in range(x.shape[0]):
        tok = F.conv2d(x[b:b + 1], w, m.patch_embed.proj.bias, stride=p).flatten(2).transpose(1, 2)
        if pos_patch is not None:
            tok = tok + pos_patch
        if keep_idx is not None:
            tok = tok[:, keep_idx[b]]
        prefix = [t for t in (m.cls_token, m.reg_token) if t is not None]
        if prefix:
            pre = torch.cat(prefix, dim=1)
            if pos_prefix is not None:
                pre = pre + pos_prefix
            tok = torch.cat([pre, tok], dim=1)
        feats = m.norm(m.blocks(m.norm_pre(tok)))
        outs.append(VisionTransformer.forward_head(m, feats, pre_logits=pre_logits))
    return torch.cat(outs, 0)


# ------------------------------------------------------------------ untouched / exact timm path

def test_unpatched_untouched_and_no_kwargs_exact():
    a = make()
    b = copy.deepcopy(a)
    x = torch.randn(2, 3, IMG, IMG)
    before = a(x)
    et.patch(b)
    assert torch.equal(a(x), before)  # other instance untouched, bit for bit
    assert type(a).forward is VisionTransformer.forward and "forward" not in vars(a)
    assert torch.equal(b(x), before)  # patched, no kwargs: the timm path
    assert torch.equal(b(x, patch_size=16), before)
    assert torch.equal(b.forward_features(x), a.forward_features(x))
    assert et.patch(b) is b and et.is_patched(b) and not et.is_patched(a)


def test_create_model():
    m = et.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, depth=1, num_classes=3)
    assert et.is_patched(m)
    assert m(torch.randn(1, 3, IMG, IMG), keep=0.5).shape == (1, 3)


def test_state_dict_keys_and_round_trip():
    ref = make("reg4")
    m = et.patch(copy.deepcopy(ref))
    assert list(m.state_dict().keys()) == list(ref.state_dict().keys())
    fresh = et.patch(make("reg4"))
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(fresh(x, keep=1.0), m(x, keep=1.0), rtol=0, atol=0)


# ------------------------------------------------------------------ packed path vs timm

@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_native_matches_timm_outputs_and_grads(name):
    ref = make(name)
    m = et.patch(copy.deepcopy(ref))
    x = torch.randn(2, 3, IMG, IMG)
    out_ref = ref(x)
    out = m(x, keep=1.0)  # keep given: forces the packed path
    assert out.shape == out_ref.shape
    assert rel(out, out_ref) < 1e-5
    feats = m.forward_features(x, keep=1.0)
    assert feats.shape == (2, 16 + ref.num_prefix_tokens, ref.embed_dim)
    assert rel(feats, ref.forward_features(x)) < 1e-5

    g = torch.randn_like(out_ref)
    (out_ref * g).sum().backward()
    (out * g).sum().backward()
    for (n, p_ref), (_, p) in zip(ref.named_parameters(), m.named_parameters()):
        assert p.grad is not None, n
        # + atol: k_norm.bias has an exactly-zero true gradient (softmax shift invariance)
        assert (p.grad - p_ref.grad).norm() <= 1e-5 * p_ref.grad.norm() + 1e-8, n


@pytest.mark.parametrize("name", ["tiny", "reg4", "reg4_noembcls"])
def test_token_dropout_matches_timm_per_sample(name):
    m = et.patch(make(name))
    x = torch.randn(3, 3, IMG, IMG)
    keep_idx, cu = sample_keep(3, 16, torch.tensor([5, 16, 1]))
    per = [keep_idx[cu[b]:cu[b + 1]] for b in range(3)]
    out = m(x, keep=(keep_idx, cu))
    assert rel(out, timm_reference(m, x, keep_idx=per)) < 1e-5
    # ragged forward_features: (packed, cu_seqlens) with the prefix tokens counted
    packed, cu_out = m.forward_features(x, keep=(keep_idx, cu))
    P = m.num_prefix_tokens
    assert cu_out.tolist() == [0, 5 + P, 21 + 2 * P, 22 + 3 * P] and packed.shape[0] == 22 + 3 * P


def test_keep_ratio_and_counts():
    m = et.patch(make("reg4"))
    x = torch.randn(2, 3, IMG, IMG)
    torch.manual_seed(1)
    out = m.forward_features(x, keep=0.5)
    assert out.shape == (2, 8 + 5, m.embed_dim)
    torch.manual_seed(1)
    keep_idx, _ = sample_keep(2, 16, 0.5)
    per = keep_idx.view(2, 8)
    ref = timm_reference(m, x, keep_idx=per, pre_logits=True)
    torch.manual_seed(1)
    assert rel(m.forward_views([x], keeps=[0.5])[0], ref) < 1e-5
    packed, cu = m.forward_features(x, keep=torch.tensor([3, 7]))
    assert packed.shape == (3 + 7 + 10, m.embed_dim) and cu.tolist() == [0, 8, 20]


@pytest.mark.parametrize("p", [8, 32])
def test_patch_size_matches_timm_resample_float64(p):
    m = et.patch(make("reg4").double())
    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    out = m(x, patch_size=p)
    # timm resamples the weight / pos embed in float32 (its DTYPE_INTERMEDIATE), effkern in
    # float64 for float64 inputs: agreement is at float32 rounding of the resampled params
    assert rel(out, timm_reference(m, x, patch_size=p)) < 1e-5


def test_other_image_size_native_patch():
    m = et.patch(make("tiny"))
    x = torch.randn(2, 3, 96, 48)
    assert rel(m(x), timm_reference(m, x)) < 1e-5


# ------------------------------------------------------------------ forward_views

def test_forward_views_equals_separate_runs():
    m = et.patch(make("reg4"))
    xa, xb, xc = torch.randn(2, 3, IMG, IMG), torch.randn(2, 3, 96, 96), torch.randn(2, 3, 32, 64)
    kb, cub = sample_keep(2, 9, torch.tensor([4, 9]))
    outs = m.forward_views([xa, xb, xc], patch_sizes=[None, 32, 8], keeps=[None, (kb, cub), 0.25])
    assert [o.shape for o in outs] == [(2, m.embed_dim)] * 3
    # view 0 is native: timm's own forward_head(forward_features, pre_logits=True)
    assert rel(outs[0], m.forward_head(m.forward_features(xa), pre_logits=True)) < 1e-5
    per = [kb[cub[b]:cub[b + 1]] for b in range(2)]
    assert rel(outs[1], timm_reference(m, xb, patch_size=32, keep_idx=per, pre_logits=True)) < 1e-5
    # 0.25 of 32 patches: same ratio sampling as a separate run with the same seed
    torch.manual_seed(3)
    kc, _ = sample_keep(2, 32, 0.25)
    torch.manual_seed(3)
    outc = m.forward_views([xc], patch_sizes=[8], keeps=[0.25])[0]
    assert rel(outc, timm_reference(m, xc, patch_size=8, keep_idx=kc.view(2, 8), pre_logits=True)) < 1e-5


def test_forward_views_grads_flow():
    """Gradients reach every view, the patch weight and the class token, and for the
    undropped view they equal those of a single-view forward.  The loss is a fixed
    random projection of the features: the plain sum of LayerNorm outputs has a zero
    gradient in theory, so a test on it would pass or fail on rounding noise."""
    m = et.patch(make("tiny"))
    g = torch.Generator().manual_seed(1234)
    views = [torch.randn(2, 3, IMG, IMG, generator=g), torch.randn(2, 3, 32, 32, generator=g)]
    views = [v.requires_grad_() for v in views]
    proj = torch.randn(m.embed_dim, generator=g)
    outs = m.forward_views(views, patch_sizes=[16, 8], keeps=[0.5, None])
    sum((o * proj).sum() for o in outs).backward()
    for v in views:
        assert v.grad is not None and v.grad.norm() > 1e-2 * v.norm() / v.numel() ** 0.5
    assert m.patch_embed.proj.weight.grad.norm() > 0 and m.cls_token.grad.norm() > 0

    x2 = views[1].detach().clone().requires_grad_()
    single = m.forward_features(x2, patch_size=8)
    (m.forward_head(single, pre_logits=True) * proj).sum().backward()
    assert rel(views[1].grad, x2.grad) < 1e-5


# ------------------------------------------------------------------ training features

def test_grad_checkpointing_same_grads():
    a = et.patch(make("tiny"))
    b = et.patch(copy.deepcopy(a))
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, IMG, IMG)
    torch.manual_seed(0)
    oa = a(x, keep=0.75)
    torch.manual_seed(0)
    ob = b(x, keep=0.75)
    torch.testing.assert_close(oa, ob, rtol=0, atol=0)
    oa.sum().backward()
    ob.sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-6, atol=1e-7)


def test_drop_path_is_per_sequence():
    dp = timm.layers.DropPath(0.5)
    lens = torch.tensor([3, 5, 2, 4, 6, 1, 7, 2])
    x = torch.ones(int(lens.sum()), 4)
    y = packed_drop_path(x, dp, lens, training=True)
    for seg in y.split(lens.tolist()):
        assert seg.unique().numel() == 1 and seg[0, 0].item() in (0.0, 2.0)
    assert torch.equal(packed_drop_path(x, dp, lens, training=False), x)
    m = et.patch(make("tiny", drop_path_rate=0.5)).train()
    m(torch.randn(2, 3, IMG, IMG), keep=0.5).sum().backward()  # runs in training mode


# ------------------------------------------------------------------ errors

def test_bad_inputs():
    m = et.patch(make("tiny"))
    x = torch.randn(2, 3, IMG, IMG)
    with pytest.raises(ValueError, match="patch_size 24 must divide"):
        m(x, patch_size=24)
    with pytest.raises(ValueError, match="patch_size"):
        m(x, patch_size=0)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="keep ratio"):
            m(x, keep=bad)
    with pytest.raises(ValueError, match="keep"):
        m(x, keep="all")
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(x, keep=(torch.arange(4), torch.tensor([0, 4], dtype=torch.int32)))
    with pytest.raises(ValueError, match="same batch size"):
        m.forward_views([x, torch.randn(3, 3, IMG, IMG)])
    with pytest.raises(ValueError, match="patch_sizes has 1"):
        m.forward_views([x, x], patch_sizes=[16])
    with pytest.raises(ValueError, match="keeps has 3"):
        m.forward_views([x, x], keeps=[None, None, None])
    with pytest.raises(ValueError, match="views"):
        m.forward_views(x)


@pytest.mark.parametrize("kw, what", [
    ({"attn_layer": "diff"}, "DiffAttention"),
    ({"block_fn": timm.models.vision_transformer.ParallelScalingBlock}, "ParallelScalingBlock"),
])
def test_unsupported_models(kw, what):
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, depth=1, **kw)
    with pytest.raises(ValueError, match=what) as err:
        et.patch(m)
    assert "Supported:" in str(err.value)  # the error lists what is supported


def test_unsupported_modules():
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        et.patch(torch.nn.Linear(2, 2))

    class MyBlock(timm.models.vision_transformer.Block):
        pass

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, depth=1, block_fn=MyBlock)
    with pytest.raises(ValueError, match="MyBlock"):
        et.patch(m)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, depth=1,
                          block_fn=timm.models.vision_transformer.ResPostBlock)
    with pytest.raises(ValueError, match="ResPostBlock"):
        et.patch(m)


# ------------------------------------------------------------------ generator, torch.compile, autocast

def test_generator_reproducible_and_leaves_global_rng():
    m = et.patch(make("reg4"))
    x, x2 = torch.randn(2, 3, IMG, IMG), torch.randn(2, 3, 32, 32)
    state = torch.get_rng_state()
    a = m(x, keep=0.5, generator=torch.Generator().manual_seed(7))
    b = m(x, keep=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not consumed
    assert torch.equal(a, b)
    assert not torch.equal(a, m(x, keep=0.5, generator=torch.Generator().manual_seed(8)))
    # the same draws as sample_keep with that generator
    keep_idx, _ = sample_keep(2, 16, 0.5, generator=torch.Generator().manual_seed(7))
    assert rel(a, timm_reference(m, x, keep_idx=keep_idx.view(2, 8))) < 1e-5
    fa, cua = m.forward_features(x, keep=torch.tensor([3, 11]), generator=torch.Generator().manual_seed(1))
    fb, cub = m.forward_features(x, keep=torch.tensor([3, 11]), generator=torch.Generator().manual_seed(1))
    assert torch.equal(fa, fb) and torch.equal(cua, cub)
    va = m.forward_views([x, x2], patch_sizes=[16, 8], keeps=[0.5, 0.25], generator=torch.Generator().manual_seed(3))
    vb = m.forward_views([x, x2], patch_sizes=[16, 8], keeps=[0.5, 0.25], generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(p, q) for p, q in zip(va, vb))
    with pytest.raises(ValueError, match="generator"):
        m(x, keep=0.5, generator=7)


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)


def test_torch_compile_packed_path_fullgraph():
    """Ratio keep and forward_views trace as one graph (aot_eager: no C++ compiler needed);
    forward and backward match eager.  Shapes are static (dynamic=False): every
    (batch, image size, patch size, keep ratio) combination is its own graph."""
    m = et.patch(make("reg4"))
    x, x2 = torch.randn(2, 3, IMG, IMG), torch.randn(2, 3, 32, 32)

    def step(model, a, b):
        out = model(a, keep=0.5)
        v1, v2 = model.forward_views([a, b], patch_sizes=[16, 8], keeps=[0.75, None])
        return out, v1, v2

    c = _compiled(lambda a, b: step(m, a, b))
    for _ in range(2):  # second call: no retrace, fresh random keeps
        seed = torch.seed()
        eager = step(m, x, x2)
        torch.manual_seed(seed)
        comp = c(x, x2)
        for e, o in zip(eager, comp):
            assert o.shape == e.shape and rel(o, e) < 1e-5
    m.zero_grad()
    torch.manual_seed(0)
    sum(t.square().sum() for t in step(m, x, x2)).backward()
    ref_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    torch.manual_seed(0)
    sum(t.square().sum() for t in c(x, x2)).backward()
    for g_ref, p in zip(ref_grads, m.parameters()):
        assert (p.grad - g_ref).norm() <= 1e-5 * g_ref.norm() + 1e-8


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic_dynamic", "dynamic"])
def test_torch_compile_changing_image_size(dynamic):
    """Progressive-resolution training (ET++, AAIP) feeds new image sizes to one
    compiled model: with automatic dynamic shapes (the default) or dynamic=True the
    packed path traces with symbolic sizes (the pos_embed resize is an opaque op with
    its own backward) and matches eager, forward and backward, at every size."""
    m = et.patch(make("reg4"))
    torch._dynamo.reset()
    c = torch.compile(lambda a: m(a, keep=0.5), backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for size in (IMG, 32, 48, 32):
        x = torch.randn(2, 3, size, size)
        m.zero_grad()
        torch.manual_seed(size)
        eager = m(x, keep=0.5)
        eager.square().sum().backward()
        ref_grads = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        torch.manual_seed(size)
        out = c(x)
        out.square().sum().backward()
        assert out.shape == eager.shape and rel(out, eager) < 1e-5, size
        for g_ref, p in zip(ref_grads, m.parameters()):
            assert (p.grad - g_ref).norm() <= 1e-5 * g_ref.norm() + 1e-8, size


def test_torch_compile_ragged_keep_graph_breaks():
    """Count / explicit keeps read the sequence lengths on the host: not fullgraph,
    but fullgraph=False runs (graph breaks) and matches eager."""
    m = et.patch(make("tiny"))
    x = torch.randn(2, 3, IMG, IMG)
    keep_idx, cu = sample_keep(2, 16, torch.tensor([5, 9]))
    eager = m(x, keep=(keep_idx, cu))
    torch._dynamo.reset()
    out = torch.compile(lambda a, i, c: m(a, keep=(i, c)), backend="aot_eager", fullgraph=False)(x, keep_idx, cu)
    assert rel(out, eager) < 1e-5


def test_autocast_bf16_cpu_packed_path():
    m = et.patch(make("reg4"))
    x, x2 = torch.randn(2, 3, IMG, IMG), torch.randn(2, 3, 32, 32)
    keep_idx, cu = sample_keep(2, 16, torch.tensor([6, 16]))
    ref = m(x, keep=(keep_idx, cu))
    ref_views = m.forward_views([x, x2], patch_sizes=[8, 8], keeps=[(keep_idx, cu), None])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, keep=(keep_idx, cu))
        views = m.forward_views([x, x2], patch_sizes=[8, 8], keeps=[(keep_idx, cu), None])
    for o, r in zip([out, *views], [ref, *ref_views]):
        assert torch.isfinite(o).all() and rel(o.float(), r) < 5e-2
    out.float().sum().backward()  # backward under autocast-produced graph
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.patch_embed.proj.weight.grad is not None


def test_equal_length_packs_take_sdpa_on_cpu_and_ragged_ones_the_varlen_op(monkeypatch):
    """On the CPU with the auto backend, packs whose sequences all have the same length
    (keep None or a ratio, views of one size) run torch's SDPA like timm; ragged packs and a
    forced backend run the varlen op.  Both paths agree with timm (the tests above)."""
    import effkern
    import effkern.layers.packed_vit as pv

    calls = []
    real = pv.varlen_attention_qkvpacked
    monkeypatch.setattr(pv, "varlen_attention_qkvpacked", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = et.patch(make("tiny"))
    x = torch.randn(2, 3, IMG, IMG)
    m(x, keep=0.5)
    m.forward_views([x, x], keeps=[1.0, 1.0])
    assert calls == []
    m.forward_views([x, x], keeps=[1.0, 0.5])           # two lengths: ragged
    assert len(calls) == len(m.blocks)
    kb, cub = sample_keep(2, 16, torch.tensor([4, 9]))  # per-sample counts: ragged
    m(x, keep=(kb, cub))
    assert len(calls) == 2 * len(m.blocks)
    with effkern.use_backend("reference"):
        m(x, keep=0.5)
    assert len(calls) == 3 * len(m.blocks)
    assert pv.equal_length(12, torch.tensor([0, 4, 8, 12], dtype=torch.int32), 4)
    assert not pv.equal_length(12, torch.tensor([0, 4, 8, 12], dtype=torch.int32), 5)
    assert not pv.equal_length(0, torch.zeros(1, dtype=torch.int32), 0)
    # 12 tokens in 3 + 5 + 4 with a max_seqlen of 4 (below the longest): not equal, the op rejects it
    assert not pv.equal_length(12, torch.tensor([0, 3, 8, 12], dtype=torch.int32), 4)
