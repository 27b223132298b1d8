"""effkern.timm over the compatibility matrix (tests/timm_compat_matrix.py): for every
supported entry -- native equality with timm, the packed path (ragged keep, another
patch / image size, forward_views) against an UNPATCHED per-sample timm reference,
backward, TorchScript / jit.trace / fx against timm, pickle; every unsupported entry
raises a ValueError that names it.  float64, depth-1 models: fast on 2 cores.
"""

import copy
import pickle

import pytest
import torch

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")

import effkern.timm as et  # noqa: E402
from effkern.ops import sample_keep  # noqa: E402
from effkern.timm import _embed  # noqa: E402
from oracles import rel_err  # noqa: E402
from timm_compat_matrix import create, entries, markdown  # noqa: E402

SUPPORTED = [e for e in entries() if e.supported]
UNSUPPORTED = [e for e in entries() if not e.supported]
_MODELS = {}


def model(entry):
    """(timm model, patched deepcopy), float64 eval, prefix / pos tokens made large."""
    if entry.id not in _MODELS:
        torch.manual_seed(0)
        m = create(entry).double().eval()
        with torch.no_grad():  # timm inits these to ~0: make them matter
            for name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
                t = getattr(m, name, None)
                if t is not None:
                    t.normal_(0, 0.5)
            if m.attn_pool is not None and hasattr(m.attn_pool, "latent"):
                m.attn_pool.latent.normal_(0, 1.0)
        _MODELS[entry.id] = m
    ref = _MODELS[entry.id]
    return ref, et.patch(copy.deepcopy(ref))


def images(shape, B=2, seed=0):
    return torch.randn(B, 3, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


_REFS = {}


def _sized(ref, H, W, patch_size):
    """An unpatched copy at image size (H, W) and patch size: timm's set_input_size
    resamples the patch weight and the position embedding (cached per size)."""
    key = (id(ref), H, W, patch_size)
    if key not in _REFS:
        r = ref
        if patch_size is not None and patch_size != _embed.native_patch(ref):
            r = copy.deepcopy(ref)
            r.set_input_size(img_size=(H, W), patch_size=(patch_size, patch_size))
        elif not ref.dynamic_img_size and (H, W) != tuple(ref.patch_embed.img_size):
            r = copy.deepcopy(ref)
            r.set_input_size(img_size=(H, W))
        _REFS[key] = r
    return _REFS[key]


def reference(ref, x, patch_size=None, keep_idx=None):
    """timm's own modules, unpatched, one sample at a time: timm patch_embed + _pos_embed
    at the right size, then the kept patch tokens after the prefix, blocks, norm.
    Returns a function pre_logits -> forward_head rows."""
    r = _sized(ref, *x.shape[-2:], patch_size)
    P = r.num_prefix_tokens
    feats = []
    for b in range(x.shape[0]):
        t = r._pos_embed(r.patch_embed(x[b:b + 1]))
        if keep_idx is not None:
            t = torch.cat([t[:, :P], t[:, P:][:, keep_idx[b]]], dim=1)
        feats.append(r.norm(r.blocks(r.norm_pre(t))))
    return lambda pre_logits=False: torch.cat(
        [r.forward_head(t, pre_logits=pre_logits).flatten(0, -2) for t in feats], 0)


def flat(out):
    """Packed-path output as rows: (B, C), or the tokens of global_pool='' models."""
    if isinstance(out, tuple):
        return out[0]
    return out.flatten(0, -2)


def _num_patches(m, x, p):
    H, W = x.shape[-2:]
    if _embed.fused_embed(m):
        return -(-H // p) * -(-W // p)
    return _embed._dense_tokens(m, x[:1])[0].shape[1]


@pytest.mark.parametrize("entry", SUPPORTED, ids=lambda e: e.id)
def test_native_path_is_timm(entry):
    ref, m = model(entry)
    assert isinstance(m, type(ref)) and type(m).__name__ == "Packed" + type(ref).__name__
    x = images(entry.img)
    assert torch.equal(m(x), ref(x))
    assert torch.equal(m.forward_features(x), ref.forward_features(x))
    assert list(m.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("entry", SUPPORTED, ids=lambda e: e.id)
def test_packed_matches_per_sample_timm(entry):
    """Ragged explicit keep at the native size; another image / patch size with a ratio
    keep; both views at once through forward_views (one packed batch)."""
    ref, m = model(entry)
    x = images(entry.img)
    n = _num_patches(m, x, _embed.native_patch(m))
    counts = torch.tensor([max(1, n // 3), n])
    keep_idx, cu = sample_keep(2, n, counts, generator=torch.Generator().manual_seed(1))
    per = [keep_idx[cu[b]:cu[b + 1]] for b in range(2)]
    ref1 = reference(ref, x, keep_idx=per)
    assert rel_err(flat(m(x, keep=(keep_idx, cu))), ref1()) < 1e-5

    (H2, W2), p2 = entry.other
    x2 = images((H2, W2), seed=2)
    n2 = _num_patches(m, x2, p2 or _embed.native_patch(m))
    k2, _ = sample_keep(2, n2, 0.5, generator=torch.Generator().manual_seed(3))
    ref2 = reference(ref, x2, patch_size=p2, keep_idx=k2.view(2, -1))
    out2 = m(x2, patch_size=p2, keep=0.5, generator=torch.Generator().manual_seed(3))
    assert rel_err(flat(out2), ref2()) < 1e-5

    views = m.forward_views([x, x2], patch_sizes=[None, p2], keeps=[(keep_idx, cu), 0.5],
                            generator=torch.Generator().manual_seed(3))
    assert rel_err(flat(views[0]), ref1(pre_logits=True)) < 1e-5
    assert rel_err(flat(views[1]), ref2(pre_logits=True)) < 1e-5


@pytest.mark.parametrize("entry", SUPPORTED, ids=lambda e: e.id)
def test_backward_matches_timm(entry):
    ref, m = model(entry)
    ref, m = copy.deepcopy(ref), copy.deepcopy(m)
    x = images(entry.img)
    out_ref = ref(x)
    g = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (out_ref * g).sum().backward()
    (m(x, keep=1.0) * g).sum().backward()  # keep given: the packed path
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), m.named_parameters()):
        if p_ref.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        assert p.grad is not None, name
        assert (p.grad - p_ref.grad).norm() <= 1e-7 * p_ref.grad.norm() + 1e-12, name


def _same_as_control(make, run, x, want):
    """make(model) -> compiled; the patched model must do what the control does."""
    try:
        control = run(make("control"), x)
    except Exception as e:  # timm itself cannot: the patched model fails the same way
        with pytest.raises(type(e)):
            make("patched")
        return
    assert torch.equal(control, want)
    assert torch.equal(run(make("patched"), x), want)


@pytest.mark.parametrize("entry", SUPPORTED, ids=lambda e: e.id)
def test_script_trace_fx_as_timm(entry):
    ref, m = model(entry)
    x = images(entry.img)
    want = ref(x)
    pick = {"control": ref, "patched": m}
    _same_as_control(lambda k: torch.jit.script(pick[k]), lambda s, a: s(a), x, want)
    _same_as_control(lambda k: torch.jit.trace(pick[k], x, check_trace=False), lambda s, a: s(a), x, want)
    _same_as_control(lambda k: torch.fx.symbolic_trace(pick[k]), lambda s, a: s(a), x, want)


@pytest.mark.parametrize("entry", SUPPORTED, ids=lambda e: e.id)
def test_pickle_round_trip(entry):
    _, m = model(entry)
    x = images(entry.img)
    m2 = pickle.loads(pickle.dumps(m))
    assert type(m2) is type(m) and et.is_patched(m2)
    assert torch.equal(m2(x), m(x))
    assert torch.equal(m2(x, keep=0.5, generator=torch.Generator().manual_seed(5)),
                       m(x, keep=0.5, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("entry", UNSUPPORTED, ids=lambda e: e.id)
def test_unsupported_raises_naming_it(entry):
    m = create(entry)
    with pytest.raises(ValueError, match=entry.error) as err:
        et.patch(m)
    assert "Supported:" in str(err.value)
    assert not et.is_patched(m)


def test_docs_table_is_current():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "timm.md").read_text()
    assert markdown() in doc, "docs/timm.md: regenerate the table with python tests/timm_compat_matrix.py"
