"""effkern.ops.patch_embed against the timm composition in float64:

    F.conv2d(x, timm.layers.resample_patch_embed(w, (p, p)), b, stride=p)
    + timm.layers.resample_abs_pos_embed(pos, grid, num_prefix_tokens=0)
    -> gather of the kept patches (PatchDropout-style).

timm computes the PI-resize in float32 (``DTYPE_INTERMEDIATE``) and the pos
resample in float32 (``posemb.float()``); the float64 oracle patches the former
to float64 and runs the latter's F.interpolate call in float64, and separate
fp32 tests check our resizes against the unmodified timm functions.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="effkern: the compiled extension")

import timm.layers.patch_embed as timm_patch_embed  # noqa: E402
from timm.layers import resample_abs_pos_embed, resample_patch_embed  # noqa: E402

from effkern.ops import patch_embed, sample_keep  # noqa: E402
from effkern.reference import patch_embed as ref  # noqa: E402
from conftest import DEVICES  # noqa: E402
from oracles import rel_err  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def timm64(monkeypatch):
    monkeypatch.setattr(timm_patch_embed, "DTYPE_INTERMEDIATE", torch.float64)


def pos_resample64(pos, grid):
    """timm.layers.resample_abs_pos_embed's body (num_prefix_tokens=0) without its float32 cast."""
    L, D = pos.shape[1], pos.shape[2]
    g0 = int(round(L ** 0.5))
    if grid[0] * grid[1] == L and grid[0] == grid[1]:
        return pos
    x = pos.reshape(1, g0, g0, D).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=grid, mode="bicubic", align_corners=None, antialias=True)
    return x.permute(0, 2, 3, 1).reshape(1, -1, D)


def oracle(images, weight, bias, p, pos=None, keep_idx=None, cu_seqlens=None):
    """The timm composition (call inside the timm64 fixture for float64)."""
    w = resample_patch_embed(weight, [p, p])
    y = F.conv2d(images, w, bias, stride=p).flatten(2).transpose(1, 2)
    gh, gw = images.shape[2] // p, images.shape[3] // p
    if pos is not None:
        y = y + pos_resample64(pos, (gh, gw))
    if keep_idx is not None:
        b = torch.repeat_interleave(torch.arange(images.shape[0]), cu_seqlens.diff().long())
        y = y[b, keep_idx.long()]
    return y


def ragged_keep(B, N, gen):
    counts = torch.randint(1, N + 1, (B,), generator=gen)
    counts[0] = 1
    if B > 1:
        counts[-1] = N
    return sample_keep(B, N, counts, generator=gen)


# (D, p, (H, W), C, B, g0 of pos_embed or None, bias)
CASES = [
    (64, 8, (48, 48), 3, 3, 14, True),
    (64, 12, (48, 96), 1, 2, 7, True),
    (192, 16, (96, 96), 3, 2, 6, True),
    (192, 24, (48, 144), 3, 2, 14, False),
    (64, 32, (96, 96), 1, 3, None, True),
    (192, 48, (144, 96), 3, 2, 5, True),
    (768, 16, (48, 48), 3, 1, 14, True),
    (768, 24, (96, 48), 1, 1, 4, True),
    (768, 48, (96, 96), 3, 2, None, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"D{c[0]}-p{c[1]}-{c[2][0]}x{c[2][1]}-C{c[3]}")
@pytest.mark.parametrize("ragged", [False, True], ids=["all", "ragged"])
def test_matches_timm_float64(timm64, case, ragged):
    D, p, (H, W), C, B, g0, has_bias = case
    gen = torch.Generator().manual_seed(hash((case, ragged)) % 2**31)
    dt = torch.float64
    x = torch.randn(B, C, H, W, dtype=dt, generator=gen, requires_grad=True)
    w = (torch.randn(D, C, 16, 16, dtype=dt, generator=gen) * 0.05).requires_grad_()
    b = torch.randn(D, dtype=dt, generator=gen).requires_grad_() if has_bias else None
    pos = torch.randn(1, g0 * g0, D, dtype=dt, generator=gen).requires_grad_() if g0 else None
    N = (H // p) * (W // p)
    keep_idx, cu = ragged_keep(B, N, gen) if ragged else (None, None)

    out = patch_embed(x, w, b, p, pos, keep_idx, cu)
    exp = oracle(x, w, b, p, pos, keep_idx, cu)
    assert out.shape == exp.shape and out.dtype == dt
    assert rel_err(out, exp) < 1e-12

    g = torch.randn(out.shape, dtype=dt, generator=gen)
    params = [t for t in (x, w, b, pos) if t is not None]
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(exp, params, g)
    for name, a, e in zip(("images", "weight", "bias", "pos_embed"), got, want):
        assert rel_err(a, e) < 1e-11, name


def test_weight_resize_matches_timm_fp32():
    w = torch.randn(32, 3, 16, 16)
    for p in (8, 12, 16, 24, 32, 48):
        ours = ref.resize_weight(w, p).reshape(32, 3, p, p)
        assert rel_err(ours, resample_patch_embed(w, [p, p])) < 1e-5


def test_pos_resize_matches_timm_fp32():
    pos = torch.randn(1, 14 * 14, 48)
    for grid in ((7, 7), (14, 14), (9, 6), (21, 21), (2, 5)):
        ours = ref.resize_pos(pos, grid)
        theirs = resample_abs_pos_embed(pos, list(grid), num_prefix_tokens=0)
        assert rel_err(ours, theirs[0]) < 1e-6, grid


def test_resize_is_separable():
    """The shortcut resize_weight takes: the 2-D resize matrix is kron of the 1-D one."""
    for old, new in ((16, 32), (16, 24), (16, 8), (14, 20), (16, 48)):
        R1 = ref.resize_matrix1d64(old, new)
        assert rel_err(torch.kron(R1, R1), ref.resize_matrix64(old, new, new)) < 1e-14, (old, new)


def test_weight_resize_matches_full_pinv_float64():
    """Against FlexiViT's formula with the full (p0^2, p^2) pseudo-inverse, in float64."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 2, 16, 16, dtype=torch.float64, generator=gen)
    for p in (8, 12, 24, 32):
        full = torch.linalg.pinv(ref.resize_matrix64(16, p, p))
        assert rel_err(ref.resize_weight(w, p).reshape(10, p * p), w.reshape(10, 256) @ full) < 1e-12, p


def test_resize_matrix_cached():
    a = ref.resize_pinv(16, 24, torch.device("cpu"), torch.float32)
    assert ref.resize_pinv(16, 24, torch.device("cpu"), torch.float32) is a
    assert a.shape == (16, 24)
    assert ref.resize_pinv(16, 24, torch.device("cpu"), torch.bfloat16) is a  # fp32 intermediate
    assert ref.resize_pinv(16, 24, torch.device("cpu"), torch.float64).dtype == torch.float64


def test_fp32_close_to_timm():
    x, w, b = torch.randn(2, 3, 48, 48), torch.randn(64, 3, 16, 16) * 0.05, torch.randn(64)
    pos = torch.randn(1, 9, 64)
    keep_idx, cu = sample_keep(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    out = patch_embed(x, w, b, 12, pos, keep_idx, cu)
    w12 = resample_patch_embed(w, [12, 12])
    y = F.conv2d(x, w12, b, stride=12).flatten(2).transpose(1, 2)
    y = y + resample_abs_pos_embed(pos, [4, 4], num_prefix_tokens=0)
    y = y[torch.repeat_interleave(torch.arange(2), cu.diff().long()), keep_idx]
    assert out.dtype == torch.float32 and rel_err(out, y) < 1e-5


def test_dropped_patches_never_read():
    """Poison: NaN in every dropped patch must not reach the packed output or the gradients."""
    gen = torch.Generator().manual_seed(1)
    B, C, p, H, W, D = 2, 3, 8, 32, 24, 16
    N = (H // p) * (W // p)
    keep_idx, cu = sample_keep(B, N, torch.tensor([1, 5]), generator=gen)
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=gen)
    clean = x.clone()
    view = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, N, C, p, p)
    kept = torch.zeros(B, N, dtype=torch.bool)
    kept[torch.repeat_interleave(torch.arange(B), cu.diff().long()), keep_idx] = True
    view[~kept] = float("nan")
    w = torch.randn(D, C, 16, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    out = patch_embed(x, w, None, p, None, keep_idx, cu)
    assert torch.isfinite(out).all()
    assert rel_err(out, patch_embed(clean, w, None, p, None, keep_idx, cu)) < 1e-14
    (gw,) = torch.autograd.grad(out.sum(), [w])
    assert torch.isfinite(gw).all()


def test_image_grad_zero_on_dropped_patches():
    x = torch.randn(1, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    keep_idx, cu = torch.tensor([3]), torch.tensor([0, 1], dtype=torch.int32)
    (gx,) = torch.autograd.grad(patch_embed(x, w, None, 8, None, keep_idx, cu).sum(), [x])
    assert gx[..., :8, :].abs().sum() == 0 and gx[..., 8:, :8].abs().sum() == 0
    assert gx[..., 8:, 8:].abs().sum() > 0


def test_empty_segments_and_int32_index(timm64):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 16, 16, dtype=torch.float64, generator=gen)
    w = torch.randn(8, 2, 4, 4, dtype=torch.float64, generator=gen)
    keep_idx = torch.tensor([0, 5, 15, 2], dtype=torch.int32)
    cu = torch.tensor([0, 3, 3, 4], dtype=torch.int32)  # image 1 keeps nothing
    out = patch_embed(x, w, None, 4, None, keep_idx, cu)
    assert rel_err(out, oracle(x, w, None, 4, None, keep_idx, cu)) < 1e-13


def test_gradcheck():
    gen = torch.Generator().manual_seed(3)
    dt = torch.float64
    x = torch.randn(2, 2, 8, 12, dtype=dt, generator=gen, requires_grad=True)
    w = torch.randn(3, 2, 4, 4, dtype=dt, generator=gen, requires_grad=True)
    b = torch.randn(3, dtype=dt, generator=gen, requires_grad=True)
    pos = torch.randn(1, 9, 3, dtype=dt, generator=gen, requires_grad=True)
    keep_idx, cu = torch.tensor([0, 2, 5, 1]), torch.tensor([0, 3, 4], dtype=torch.int32)
    for p, k, c in ((2, None, None), (4, keep_idx, cu), (2, keep_idx, cu)):
        assert torch.autograd.gradcheck(lambda *a: patch_embed(a[0], a[1], a[2], p, a[3], k, c),
                                        (x, w, b, pos), eps=1e-6, atol=1e-6)


def _op_args(with_index: bool, device: str = "cpu"):
    gen = torch.Generator().manual_seed(4)
    shapes = [(2, 3, 8, 8), (5, 3 * 4 * 4), (5,), (4, 5)]
    x, w, b, pos = (torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes)
    index = torch.tensor([0, 3, 5, 6, 7], device=device) if with_index else None
    return x, w, b, pos, index


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_index", [False, True])
def test_opcheck(with_index, device):
    x, w, b, pos, index = _op_args(with_index, device)
    torch.library.opcheck(torch.ops.effkern.patch_embed_fwd.default, (x, w, b, pos, index, 4))
    torch.library.opcheck(torch.ops.effkern.patch_embed_fwd.default, (x, w, None, None, index, 4))
    T = 8 if index is None else index.shape[0]
    g = torch.randn(T, 5, device=device)
    torch.library.opcheck(torch.ops.effkern.patch_embed_bwd_weight.default, (g, x.detach(), index, 4))
    torch.library.opcheck(torch.ops.effkern.patch_embed_bwd_images.default,
                          (g, w.detach(), index, 4, [2, 3, 8, 8]))


def test_compile_fullgraph():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    w = torch.randn(16, 3, 16, 16, generator=gen, requires_grad=True)
    b = torch.randn(16, generator=gen, requires_grad=True)
    pos = torch.randn(1, 4, 16, generator=gen, requires_grad=True)
    keep_idx, cu = sample_keep(2, 16, 0.5, generator=gen)

    def f(x, w, b, pos, keep_idx, cu):
        return patch_embed(x, w, b, 8, pos, keep_idx, cu)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, b, pos, keep_idx, cu)
    exp = f(x, w, b, pos, keep_idx, cu)
    assert rel_err(out, exp) < 1e-6
    ga = torch.autograd.grad(out.square().sum(), [w, b, pos])
    ge = torch.autograd.grad(exp.square().sum(), [w, b, pos])
    for a, e in zip(ga, ge):
        assert rel_err(a, e) < 1e-5


def test_autocast_bf16_cpu():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 48, 48, generator=gen)
    w = (torch.randn(32, 3, 16, 16, generator=gen) * 0.05).requires_grad_()
    b = torch.randn(32, generator=gen, requires_grad=True)
    pos = torch.randn(1, 9, 32, generator=gen, requires_grad=True)
    keep_idx, cu = sample_keep(2, 16, 0.75, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = patch_embed(x, w, b, 12, pos, keep_idx, cu)
    assert out.dtype == torch.bfloat16
    exp = patch_embed(x, w, b, 12, pos, keep_idx, cu)
    assert rel_err(out, exp) < 2e-2
    gw, gb, gp = torch.autograd.grad(out.float().sum(), [w, b, pos])
    assert gw.dtype == gb.dtype == gp.dtype == torch.float32
    ew, eb, ep = torch.autograd.grad(exp.sum(), [w, b, pos])
    assert rel_err(gw, ew) < 2e-2 and rel_err(gb, eb) < 1e-6 and rel_err(gp, ep) < 1e-6


def _good():
    return dict(images=torch.randn(2, 3, 32, 32), weight=torch.randn(8, 3, 16, 16), bias=torch.randn(8),
                patch_size=8, pos_embed=torch.randn(1, 4, 8), keep_idx=torch.tensor([0, 3, 1]),
                cu_seqlens=torch.tensor([0, 2, 3], dtype=torch.int32))


BAD = [
    ("patch_size", dict(patch_size=12)),
    ("patch_size", dict(patch_size=0)),
    ("patch_size", dict(patch_size=-8)),
    ("patch_size", dict(patch_size=2.5)),
    ("images", dict(images=torch.randn(3, 32, 32))),
    ("images", dict(images=torch.randint(0, 255, (2, 3, 32, 32)))),
    ("weight", dict(weight=torch.randn(8, 3, 16))),
    ("weight", dict(weight=torch.randn(8, 3, 16, 8))),
    ("weight", dict(weight=torch.randn(8, 1, 16, 16))),
    ("weight", dict(weight=torch.randn(8, 3, 16, 16, dtype=torch.float64))),
    ("bias", dict(bias=torch.randn(7))),
    ("bias", dict(bias=torch.randn(1, 8))),
    ("bias", dict(bias=torch.randn(8, dtype=torch.float16))),
    ("pos_embed", dict(pos_embed=torch.randn(1, 5, 8))),
    ("pos_embed", dict(pos_embed=torch.randn(1, 4, 9))),
    ("pos_embed", dict(pos_embed=torch.randn(2, 4, 8))),
    ("pos_embed", dict(pos_embed=torch.randn(4, 8))),
    ("keep_idx", dict(keep_idx=torch.tensor([0, 16, 1]))),
    ("keep_idx", dict(keep_idx=torch.tensor([0, -1, 1]))),
    ("keep_idx", dict(keep_idx=torch.tensor([3, 0, 1]))),
    ("keep_idx", dict(keep_idx=torch.tensor([3, 3, 1]))),
    ("keep_idx", dict(keep_idx=torch.tensor([0.0, 3.0, 1.0]))),
    ("cu_seqlens", dict(cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32))),
    ("cu_seqlens", dict(cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))),
    ("cu_seqlens", dict(cu_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32))),
    ("cu_seqlens", dict(cu_seqlens=torch.tensor([0, 3, 2], dtype=torch.int32))),
    ("cu_seqlens", dict(cu_seqlens=None)),
]


@pytest.mark.parametrize("name,change", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_inputs(name, change):
    kw = _good()
    patch_embed(**kw)  # the good call works
    kw.update(change)
    with pytest.raises(ValueError, match=name):
        patch_embed(**kw)


def test_keep_idx_unsorted_across_images_is_fine():
    kw = _good()
    kw.update(keep_idx=torch.tensor([5, 7, 0]))  # image 0: [5, 7], image 1: [0]
    assert patch_embed(**kw).shape == (3, 8)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_oracle(timm64, dtype):
    gen = torch.Generator().manual_seed(7)
    B, C, H, W, D, p = 4, 3, 96, 144, 192, 24
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=gen, requires_grad=True)
    w = (torch.randn(D, C, 16, 16, dtype=torch.float64, generator=gen) * 0.05).requires_grad_()
    b = torch.randn(D, dtype=torch.float64, generator=gen, requires_grad=True)
    pos = torch.randn(1, 49, D, dtype=torch.float64, generator=gen, requires_grad=True)
    keep_idx, cu = ragged_keep(B, 24, gen)
    exp = oracle(x, w, b, p, pos, keep_idx, cu)
    g = torch.randn(exp.shape, dtype=torch.float64, generator=gen)
    want = torch.autograd.grad(exp, [x, w, b, pos], g)
    dev = [t.detach().to("cuda", dtype).requires_grad_() for t in (x, w, b, pos)]
    out = patch_embed(dev[0], dev[1], dev[2], p, dev[3], keep_idx.cuda(), cu.cuda())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out, exp) < tol
    got = torch.autograd.grad(out, dev, g.to("cuda", dtype))
    for a, e in zip(got, want):
        assert rel_err(a, e) < tol


def test_schemas():
    assert str(torch.ops.effkern.patch_embed_fwd.default._schema) == (
        "effkern::patch_embed_fwd(Tensor images, Tensor weight, Tensor? bias, Tensor? pos, Tensor? index, "
        "SymInt patch_size) -> Tensor")
    assert "effkern::patch_embed_bwd_weight" in str(torch.ops.effkern.patch_embed_bwd_weight.default._schema)
    assert "effkern::patch_embed_bwd_images" in str(torch.ops.effkern.patch_embed_bwd_images.default._schema)


@pytest.mark.parametrize("device", DEVICES)
def test_resize_pos_embed_opcheck(device):
    pos = torch.randn(1, 16, 8, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.effkern.resize_pos_embed.default, (pos, 6, 3))
    torch.library.opcheck(torch.ops.effkern.resize_pos_embed_backward.default,
                          (torch.randn(18, 8, device=device), pos.detach(), 6, 3))


def test_resize_pos_embed_op():
    """The opaque pos_embed resize: equals timm's resample, opcheck-clean (fake kernel,
    autograd registration), gradcheck in float64, identity grid is a plain reshape."""
    from effkern.ops.resize_pos_embed import resize_pos_embed

    pos = torch.randn(1, 16, 8)
    ours = resize_pos_embed(pos, (6, 3))
    theirs = resample_abs_pos_embed(pos, [6, 3], num_prefix_tokens=0)[0]
    assert ours.shape == (18, 8) and torch.allclose(ours, theirs, atol=1e-6)
    assert resize_pos_embed(pos, (4, 4)).data_ptr() == pos.data_ptr()
    pos64 = torch.randn(1, 9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: torch.ops.effkern.resize_pos_embed(p, 5, 2), (pos64,))
