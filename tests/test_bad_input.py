"""Bad input, in one place: every public op and CLI command with its invalid-argument
cases, and the trainer's checkpoints damaged with real files.

The contract everywhere: a ValueError or TypeError whose message names the argument
(a wrong *type* raises effkern.ops._checks.ArgumentTypeError, both at once), or for
the CLI exit code 2 with exactly one line on stderr -- never a crash, a hang, a
silent wrong answer or a traceback from inside torch.

The op cases (OP_CASES) run here on the CPU backends ("auto": the C++ kernel for
fft_crop, the PyTorch path for the others; "reference") and on the Triton kernels
under the interpreter in tests/triton/test_bad_input_interpret.py, which imports
this table.  Edge cases that must *work* (non-contiguous index tensors, a huge
max_seqlen, an empty batch, meta tensors, NaN propagation) are checked against the
float64 oracles.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import effkern
from effkern.ops import _checks, fft_crop, patch_embed, sample_keep, varlen_attention, varlen_attention_qkvpacked
from oracles_attention import make_cu_seqlens, varlen_attention_oracle
from oracles import rel_err

BACKENDS = ["auto", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with effkern.use_backend(request.param):
        yield request.param


# ---------------------------------------------------------------------------- op cases
# (id, call, exception, message fragment).  Each call changes ONE argument of a valid call.

def _img(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _fft(**change):
    kw = dict(x=_img(2, 3, 8, 8), size=4)
    kw.update(change)
    return lambda: fft_crop(**kw)


def _fft_norm(**change):
    kw = dict(x=torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8), size=4, mean=[0.4, 0.5, 0.6],
              std=[0.2, 0.25, 0.3])
    kw.update(change)
    return lambda: fft_crop(**kw)


def _pe(**change):
    kw = dict(images=_img(2, 3, 32, 32), weight=_img(8, 3, 16, 16), bias=_img(8), patch_size=8,
              pos_embed=_img(1, 4, 8), keep_idx=torch.tensor([0, 3, 1]),
              cu_seqlens=torch.tensor([0, 2, 3], dtype=torch.int32))
    kw.update(change)
    return lambda: patch_embed(**kw)


def _sk(**change):
    kw = dict(batch=2, num_patches=16, keep=0.5)
    kw.update(change)
    return lambda: sample_keep(**kw)


def _va(**change):
    q = _img(10, 2, 32)
    kw = dict(q=q, k=q.clone(), v=q.clone(), cu_seqlens=make_cu_seqlens([4, 6]), max_seqlen=6)
    kw.update(change)
    return lambda: varlen_attention(**kw)


def _vp(**change):
    kw = dict(qkv=_img(10, 3, 2, 32), cu_seqlens=make_cu_seqlens([4, 6]), max_seqlen=6)
    kw.update(change)
    return lambda: varlen_attention_qkvpacked(**kw)


T = _checks.ArgumentTypeError  # a TypeError that is also a ValueError
V = ValueError

OP_CASES = [
    # fft_crop(x, size, mean=None, std=None)
    ("fft_crop-x-not-tensor", _fft(x="image"), T, "x must be a torch.Tensor"),
    ("fft_crop-x-3d", _fft(x=_img(3, 8, 8)), V, "x must be 4-D"),
    ("fft_crop-x-complex", _fft(x=_img(1, 1, 8, 8, dtype=torch.complex64)), V, "x has dtype"),
    ("fft_crop-x-uint8-no-norm", _fft(x=torch.zeros(1, 3, 8, 8, dtype=torch.uint8)), V, "integer dtype"),
    ("fft_crop-size-bool", _fft(size=True), T, "size must be an int"),
    ("fft_crop-size-bool-in-pair", _fft(size=(4, True)), T, r"size\[1\]"),
    ("fft_crop-size-float", _fft(size=4.0), T, "size must be an int"),
    ("fft_crop-size-str", _fft(size="4"), T, "size must be an int"),
    ("fft_crop-size-zero", _fft(size=0), V, "size must be >= 1"),
    ("fft_crop-size-too-big", _fft(size=(4, 9)), V, "must not exceed"),
    ("fft_crop-size-triple", _fft(size=(2, 2, 2)), V, "pair"),
    ("fft_crop-mean-without-std", _fft_norm(std=None), V, "mean and std must be given together"),
    ("fft_crop-mean-length", _fft_norm(mean=[0.1, 0.2]), V, "mean must have one value per channel"),
    ("fft_crop-std-zero-list", _fft_norm(std=[0.2, 0.0, 0.3]), V, "std must be non-zero"),
    ("fft_crop-std-zero-tensor", _fft_norm(std=torch.tensor([0.2, 0.0, 0.3])), V, "std must be non-zero"),
    ("fft_crop-std-nan", _fft_norm(std=[0.2, float("nan"), 0.3]), V, "std must be finite"),
    ("fft_crop-mean-inf", _fft_norm(mean=[0.0, float("inf"), 0.0]), V, "mean must be finite"),
    ("fft_crop-std-strings", _fft_norm(std=["a", "b", "c"]), T, r"std\[0\] must be a real number"),
    ("fft_crop-std-string", _fft_norm(std="abc"), T, "std must be a sequence of numbers"),
    ("fft_crop-std-bool-item", _fft_norm(std=[0.2, True, 0.3]), T, r"std\[1\]"),
    ("fft_crop-std-int-tensor", _fft_norm(std=torch.tensor([1, 2, 3])), V, "std has dtype"),
    ("fft_crop-std-2d", _fft_norm(std=torch.ones(1, 3)), V, "std must be 1-D"),
    ("fft_crop-std-other-device", _fft_norm(std=torch.ones(3, device="meta")), V, "std is on meta"),
    # patch_embed(images, weight, bias, patch_size, pos_embed=None, keep_idx=None, cu_seqlens=None)
    ("patch_embed-images-not-tensor", _pe(images=[[1.0]]), T, "images must be a torch.Tensor"),
    ("patch_embed-images-3d", _pe(images=_img(3, 32, 32)), V, "images must be 4-D"),
    ("patch_embed-images-int", _pe(images=torch.zeros(2, 3, 32, 32, dtype=torch.int64)), V, "images has dtype"),
    ("patch_embed-images-0x0", _pe(images=_img(2, 3, 0, 0), keep_idx=None, cu_seqlens=None), V,
     "images has spatial size"),
    ("patch_embed-images-0xW", _pe(images=_img(2, 3, 0, 32), keep_idx=None, cu_seqlens=None), V,
     "images has spatial size"),
    ("patch_embed-patch-bool", _pe(patch_size=True), T, "patch_size must be an int"),
    ("patch_embed-patch-float", _pe(patch_size=8.0), T, "patch_size must be an int"),
    ("patch_embed-patch-zero", _pe(patch_size=0), V, "patch_size must be >= 1"),
    ("patch_embed-patch-not-dividing", _pe(patch_size=12), V, "patch_size 12 must divide"),
    ("patch_embed-weight-channels", _pe(weight=_img(8, 1, 16, 16)), V, "weight has 1 input channels"),
    ("patch_embed-weight-not-square", _pe(weight=_img(8, 3, 16, 8)), V, "weight must be a square"),
    ("patch_embed-weight-dtype", _pe(weight=_img(8, 3, 16, 16, dtype=torch.float64)), V, "weight has dtype"),
    ("patch_embed-bias-shape", _pe(bias=_img(7)), V, "bias must have shape"),
    ("patch_embed-pos-not-square", _pe(pos_embed=_img(1, 5, 8)), V, "pos_embed must have shape"),
    ("patch_embed-keep-float", _pe(keep_idx=torch.tensor([0.0, 3.0, 1.0])), V, "keep_idx has dtype"),
    ("patch_embed-keep-2d", _pe(keep_idx=torch.tensor([[0, 3, 1]])), V, "keep_idx must be 1-D"),
    ("patch_embed-keep-range", _pe(keep_idx=torch.tensor([0, 16, 1])), V, "keep_idx has values outside"),
    ("patch_embed-keep-unsorted", _pe(keep_idx=torch.tensor([3, 0, 1])), V, "strictly increasing"),
    ("patch_embed-keep-alone", _pe(cu_seqlens=None), V, "keep_idx and cu_seqlens"),
    ("patch_embed-keep-other-device", _pe(keep_idx=torch.tensor([0, 3, 1], device="meta")), V,
     "keep_idx is on meta"),
    ("patch_embed-cu-length", _pe(cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)), V, "B\\+1"),
    ("patch_embed-cu-start", _pe(cu_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32)), V, r"cu_seqlens\[0\]"),
    ("patch_embed-cu-decreasing", _pe(cu_seqlens=torch.tensor([0, 3, 2], dtype=torch.int32)), V,
     "non-decreasing"),
    ("patch_embed-cu-float", _pe(cu_seqlens=torch.tensor([0.0, 2.0, 3.0])), V, "cu_seqlens has dtype"),
    # sample_keep(batch, num_patches, keep, generator=None, device=None)
    ("sample_keep-batch-bool", _sk(batch=True), T, "batch must be an int"),
    ("sample_keep-batch-zero", _sk(batch=0), V, "batch must be >= 1"),
    ("sample_keep-batch-float", _sk(batch=2.0), T, "batch must be an int"),
    ("sample_keep-patches-bool", _sk(num_patches=True), T, "num_patches must be an int"),
    ("sample_keep-keep-bool", _sk(keep=True), T, "keep must be a ratio"),
    ("sample_keep-keep-str", _sk(keep="half"), T, "keep must be a ratio"),
    ("sample_keep-keep-zero", _sk(keep=0.0), V, "keep ratio must be in"),
    ("sample_keep-keep-nan", _sk(keep=float("nan")), V, "keep ratio must be in"),
    ("sample_keep-keep-above-one", _sk(keep=1.5), V, "keep ratio must be in"),
    ("sample_keep-counts-float", _sk(keep=torch.tensor([1.0, 2.0])), V, "keep counts must be an integer"),
    ("sample_keep-counts-range", _sk(keep=torch.tensor([0, 3])), V, "keep counts must lie in"),
    ("sample_keep-counts-shape", _sk(keep=torch.tensor([3, 3, 3])), V, "keep counts must have shape"),
    ("sample_keep-generator-int", _sk(generator=5), T, "generator must be a torch.Generator"),
    ("sample_keep-generator-str", _sk(generator="seed"), T, "generator must be a torch.Generator"),
    ("sample_keep-device-bad", _sk(device="gpu0"), V, "device 'gpu0' is not a device"),
    ("sample_keep-device-bool", _sk(device=True), T, "device must be a torch.device"),
    # varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None)
    ("varlen-q-not-tensor", _va(q=[1.0]), T, "q must be a torch.Tensor"),
    ("varlen-q-int", _va(q=torch.zeros(10, 2, 32, dtype=torch.int32)), V, "q has dtype"),
    ("varlen-k-shape", _va(k=_img(10, 2, 64)), V, "k has shape"),
    ("varlen-v-dtype", _va(v=_img(10, 2, 32, dtype=torch.float64)), V, "v has dtype"),
    ("varlen-heads-zero", _va(q=_img(10, 0, 32), k=_img(10, 0, 32), v=_img(10, 0, 32)), V, "q has 0 heads"),
    ("varlen-head-dim", _va(q=_img(10, 2, 4), k=_img(10, 2, 4), v=_img(10, 2, 4)), V, "head_dim"),
    ("varlen-cu-int64", _va(cu_seqlens=make_cu_seqlens([4, 6]).long()), V, "cu_seqlens has dtype"),
    ("varlen-cu-2d", _va(cu_seqlens=make_cu_seqlens([4, 6])[None]), V, "cu_seqlens must be 1-D"),
    ("varlen-cu-empty", _va(cu_seqlens=torch.zeros(0, dtype=torch.int32)), V, "cu_seqlens must have B\\+1"),
    ("varlen-cu-start", _va(cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32)), V, r"cu_seqlens\[0\]"),
    ("varlen-cu-decreasing", _va(cu_seqlens=torch.tensor([0, 7, 4, 10], dtype=torch.int32)), V,
     "non-decreasing"),
    ("varlen-cu-last", _va(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), V, r"cu_seqlens\[-1\]"),
    ("varlen-cu-other-device", _va(cu_seqlens=make_cu_seqlens([4, 6], "meta")), V, "cu_seqlens is on meta"),
    ("varlen-max-seqlen-bool", _va(max_seqlen=True), T, "max_seqlen must be an int"),
    ("varlen-max-seqlen-float", _va(max_seqlen=6.5), T, "max_seqlen must be an int"),
    ("varlen-max-seqlen-negative", _va(max_seqlen=-1), V, "max_seqlen must be >= 0"),
    ("varlen-max-seqlen-small", _va(max_seqlen=5), V, "max_seqlen"),
    ("varlen-scale-nan", _va(scale=float("nan")), V, "scale must be a finite"),
    ("varlen-scale-bool", _va(scale=True), T, "scale must be a finite"),
    ("varlen-scale-str", _va(scale="0.1"), T, "scale must be a finite"),
    # varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, scale=None)
    ("qkvpacked-not-3", _vp(qkv=_img(10, 2, 2, 32)), V, "qkv must be"),
    ("qkvpacked-heads-zero", _vp(qkv=_img(10, 3, 0, 32)), V, "qkv has 0 heads"),
    ("qkvpacked-max-seqlen-small", _vp(max_seqlen=4), V, "max_seqlen"),
    ("qkvpacked-cu-bool", _vp(cu_seqlens=torch.tensor([True, False])), V, "cu_seqlens has dtype"),
]


@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_rejects(case, backend):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call()


def test_argument_type_error_is_both():
    assert issubclass(_checks.ArgumentTypeError, TypeError) and issubclass(_checks.ArgumentTypeError, ValueError)
    with pytest.raises(TypeError):
        _checks.positive_int("n", False)


# ---------------------------------------------------------------------------- edge cases that must work

def _attention_inputs(lengths, heads=2, head_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    return [torch.randn(total, heads, head_dim, generator=g) for _ in range(3)]


def check_noncontiguous_cu_seqlens():
    """cu_seqlens as a strided view (every other element of a longer tensor): the kernels
    must see the logical values, via the public op and via torch.ops directly."""
    lengths = [5, 0, 9, 3]
    q, k, v = _attention_inputs(lengths)
    cu = make_cu_seqlens(lengths)
    strided = torch.stack([cu, torch.full_like(cu, 10 ** 6)], 1).reshape(-1)[::2]  # garbage in between
    assert not strided.is_contiguous() and torch.equal(strided, cu)
    want = varlen_attention_oracle(q, k, v, cu)
    assert rel_err(varlen_attention(q, k, v, strided, 9), want) < 1e-5
    out, _ = torch.ops.effkern.varlen_attention_fwd(q, k, v, strided, 9, 32 ** -0.5)
    assert rel_err(out, want) < 1e-5


def check_huge_max_seqlen():
    """max_seqlen far beyond the token count is clamped on the host: same result, no huge grid."""
    lengths = [7, 1, 12]
    q, k, v = (t.requires_grad_() for t in _attention_inputs(lengths, seed=1))
    cu = make_cu_seqlens(lengths)
    out = varlen_attention(q, k, v, cu, 2 ** 40)
    assert rel_err(out, varlen_attention_oracle(q, k, v, cu)) < 1e-5
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    raw, _ = torch.ops.effkern.varlen_attention_fwd(q.detach(), k.detach(), v.detach(), cu, 2 ** 40, 32 ** -0.5)
    assert torch.equal(raw, out.detach())


def check_nan_propagates():
    """NaN follows torch's math path on every backend: a NaN in q[t] poisons row t only, a
    NaN in k[s] every row of s's sequence, a NaN in v[s, h, d] column d of head h of that
    sequence; other sequences are exact."""
    lengths = [4, 6, 3]
    cu = make_cu_seqlens(lengths)
    for name, pos in (("q", (5, 1, 3)), ("k", (5, 0, 0)), ("v", (5, 1, 7))):
        q, k, v = _attention_inputs(lengths, seed=2)
        {"q": q, "k": k, "v": v}[name][pos] = float("nan")
        out = varlen_attention(q, k, v, cu, 6)
        want = varlen_attention_oracle(q, k, v, cu)
        assert torch.equal(torch.isnan(out), torch.isnan(want)), name
        assert torch.isnan(out).any(), name
        finite = ~torch.isnan(want)
        assert rel_err(out[finite], want[finite]) < 1e-5, name
        assert not torch.isnan(out[:4]).any() and not torch.isnan(out[10:]).any(), name


def check_empty_batch_and_meta_patch_embed():
    w, b, pos = _img(8, 3, 4, 4), _img(8), _img(1, 4, 8)
    x = torch.zeros(0, 3, 8, 8, requires_grad=True)
    out = patch_embed(x, w, b, 2, pos)
    assert out.shape == (0, 16, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape
    meta = [t.to("meta") for t in (_img(2, 3, 8, 8), w, b, pos)]
    assert patch_embed(meta[0], meta[1], meta[2], 2, meta[3]).shape == (2, 16, 8)
    keep = torch.tensor([0, 5, 2], device="meta")
    cu = torch.tensor([0, 2, 3], dtype=torch.int32, device="meta")
    out = patch_embed(meta[0], meta[1], meta[2], 4, meta[3], keep, cu)
    assert out.device.type == "meta" and out.shape == (3, 8)


def check_noncontiguous_keep_idx():
    """keep_idx / cu_seqlens as strided views give the same tokens as contiguous ones; the raw
    op rejects an index the kernels cannot read (int32) instead of reading it as int64."""
    images, w = _img(2, 3, 16, 16), _img(8, 3, 4, 4)
    keep = torch.tensor([0, 9, 3, 9, 15, 9, 2, 9, 7, 9])[::2]  # [0, 3, 15, 2, 7]
    cu = torch.tensor([0, 0, 3, 0, 5, 0], dtype=torch.int32)[::2]  # [0, 3, 5]
    assert not keep.is_contiguous() and not cu.is_contiguous()
    got = patch_embed(images, w, None, 4, keep_idx=keep, cu_seqlens=cu)
    want = patch_embed(images, w, None, 4, keep_idx=keep.contiguous(), cu_seqlens=cu.contiguous())
    assert torch.equal(got, want)
    full = patch_embed(images, w, None, 4)  # another GEMM shape: equal up to rounding only
    assert rel_err(got, torch.cat([full[0, [0, 3, 15]], full[1, [2, 7]]])) < 1e-6
    index = torch.tensor([0, 3, 15, 18, 23])
    w2d = w.reshape(8, -1)
    with pytest.raises(ValueError, match="index has dtype"):
        torch.ops.effkern.patch_embed_fwd(images, w2d, None, None, index.int(), 4)
    strided = torch.stack([index, index], 1).reshape(-1)[::2]
    assert torch.equal(torch.ops.effkern.patch_embed_fwd(images, w2d, None, None, strided, 4), got)


EDGE_CASES = [check_noncontiguous_cu_seqlens, check_huge_max_seqlen, check_nan_propagates,
              check_empty_batch_and_meta_patch_embed, check_noncontiguous_keep_idx]


@pytest.mark.parametrize("check", EDGE_CASES, ids=[c.__name__ for c in EDGE_CASES])
def test_edge_case_works(check, backend):
    check()


def test_nan_backward_stays_in_its_sequence():
    """Backward with a NaN in one sequence: the other sequences' gradients equal a clean run's."""
    lengths = [4, 6]
    cu = make_cu_seqlens(lengths)
    clean = [t.requires_grad_() for t in _attention_inputs(lengths, seed=3)]
    dirty = [t.detach().clone().requires_grad_() for t in clean]
    with torch.no_grad():
        dirty[0][1, 0, 0] = float("nan")
    g = torch.randn(10, 2, 32, generator=torch.Generator().manual_seed(4))
    grads_clean = torch.autograd.grad(varlen_attention(*clean, cu, 6), clean, g)
    grads_dirty = torch.autograd.grad(varlen_attention(*dirty, cu, 6), dirty, g)
    for a, b in zip(grads_clean, grads_dirty):
        assert torch.isnan(b[:4]).any()
        assert rel_err(b[4:], a[4:]) < 1e-5


# ---------------------------------------------------------------------------- CLI

TINY = ["--data", "digits", "--base-size", "16", "--limit-train", "256", "--limit-test", "64", "--batch-size", "32",
        "--model", "vit_tiny_patch16_224", "--model-arg", "depth=1", "--model-arg", "patch_size=4",
        "--model-arg", "embed_dim=64", "--model-arg", "num_heads=2", "--method-arg", "mlp_dim=32",
        "--method-arg", "out_dim=16", "--no-progress", "--log-every", "1"]


def _schedule_files(tmp):
    files = {"malformed": "{\"stages\": [", "list": "[1, 2]", "no-start": '{"stages": [{"stage": {}}]}',
             "wrong-type": '{"stages": [{"start": "x", "stage": {}}]}',
             "bool-patch": '{"stages": [{"start": 0, "stage": {"patch_size": true}}]}'}
    for name, text in files.items():
        (tmp / f"{name}.json").write_text(text)
    (tmp / "dir.json").mkdir()
    (tmp / "garbage.pt").write_bytes(b"\x80\x04not a checkpoint" * 10)
    return tmp


def run_cli(argv, capsys) -> str:
    """effkern ARGV in-process: must exit 2 with one line on stderr; returns that line."""
    from effkern.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


CLI_CASES = [
    (["train", "--method", "byol"], "unknown method 'byol'"),
    (["train", "--schedule", "fastest"], "unknown schedule"),
    (["train", "--data", "imagenet-not-here"], "unknown dataset"),
    (["train", "--budget", "0"], "--budget must be > 0"),
    (["train", "--budget", "inf"], "--budget must be a finite number"),
    (["train", "--lr", "nan"], "--lr must be a finite number"),
    (["train", "--warmup", "2"], "--warmup must be a fraction"),
    (["train", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["train", "--batch-size", "True"], "argument --batch-size: invalid int value"),
    (["train", "--base-size", "-1"], "--base-size must be >= 1"),
    (["train", "--workers", "-1"], "--workers must be >= 0"),
    (["train", "--device", "cuda:99"], "--device cuda:99"),
    (["train", "--device", "gpu"], "--device 'gpu' is not a device"),
    (["train", "--model-arg", "patch_size=true"], "--model-arg patch_size must be an int"),
    (["train", "--model-arg", "depth=2.5"], "--model-arg depth must be an int"),
    (["train", "--model-arg", "colour=1"], "--model-arg colour: not a timm VisionTransformer argument"),
    (["train", "--method-arg", "mlp_dim=true"], "--method-arg mlp_dim must be an int"),
    (["train", "--method-arg", "nope=1"], "--method-arg nope: not a mocov3 method argument"),
    (["train", "--schedule", "file:{tmp}/missing.json"], "missing.json' does not exist"),
    (["train", "--schedule", "file:{tmp}/dir.json"], "dir.json' is a directory"),
    (["train", "--schedule", "file:{tmp}/malformed.json"], "malformed.json' is not valid JSON"),
    (["train", "--schedule", "file:{tmp}/list.json"], "list.json' is not a valid schedule"),
    (["train", "--schedule", "file:{tmp}/no-start.json"], "no-start.json': a stage entry lacks the key 'start'"),
    (["train", "--schedule", "file:{tmp}/wrong-type.json"], "wrong-type.json' is not a valid schedule"),
    (["train", "--schedule", "file:{tmp}/bool-patch.json"], "patch_size must be an int"),
    (["train", "--resume", "--out", "{tmp}/empty-run"], "--resume: no checkpoint in"),
    (["schedule", "show", "file:{tmp}/missing.json"], "missing.json' does not exist"),
    (["schedule", "show", "file:{tmp}/malformed.json"], "malformed.json' is not valid JSON"),
    (["schedule", "show", "file:{tmp}/dir.json"], "dir.json' is a directory"),
    (["schedule", "show", "const:patch=5", "--base-size", "32"], "patch size 5 (stage at progress 0) does not divide"),
    (["schedule", "show", "none", "--base-size", "0"], "--base-size must be >= 1"),
    (["schedule", "show", "none", "--model-arg", "depth=true"], "--model-arg depth must be an int"),
    (["schedule", "show", "bogus"], "unknown schedule"),
    (["schedule", "show", "none", "--model", "vit_bogus"], "--model 'vit_bogus': not a timm model name"),
    (["schedule", "show", "none", "--method", "byol"], "unknown method 'byol'"),
    (["train", "--model", "vit_bogus"], "--model 'vit_bogus': not a timm model name"),
    (["train", "--model-arg", "depth"], "--model-arg expects KEY=VALUE, got 'depth'"),
    (["schedule", "calibrate", "--device", "cuda:99"], "--device cuda:99"),
    (["schedule", "calibrate", "--batch", "0"], "--batch must be >= 1"),
    (["schedule", "calibrate", "--model-arg", "depth=yes"], "--model-arg depth must be an int"),
    (["schedule", "search", *TINY, "--checkpoints", "0.5:{tmp}/garbage.pt", "--out", "{tmp}/search"],
     "garbage.pt is not a readable effkern checkpoint"),
    (["schedule", "search", *TINY, "--checkpoints", "0.5:{tmp}/none.pt", "--out", "{tmp}/search"],
     "none.pt does not exist"),
    (["demo", "--device", "cuda:99"], "--device cuda:99"),
    (["demo", "--steps", "0"], "--steps must be >= 1"),
    (["demo", "--accelerated", "bogus"], "unknown schedule"),
]


@pytest.mark.parametrize("argv, match", CLI_CASES, ids=[" ".join(a)[:60] for a, _ in CLI_CASES])
def test_cli_rejects(argv, match, tmp_path, capsys):
    _schedule_files(tmp_path)
    argv = [a.format(tmp=tmp_path) for a in argv]
    if argv[0] == "train" and "--data" not in argv:
        argv = argv[:1] + TINY + argv[1:]  # later options win
    line = run_cli(argv, capsys)
    assert match in line, line


def test_cli_search_rejects_a_patch_size_not_tiling_the_images_before_training(tmp_path, capsys):
    # patch 6 at 16 px would tile no view: its candidates would silently equal the native
    # patch's (the trainer keeps the native patch on views a stage's patch does not tile)
    out = tmp_path / "search"
    line = run_cli(["schedule", "search", *TINY, "--patch-sizes", "4", "6", "--out", str(out)], capsys)
    assert "--patch-sizes: patch size 6 does not divide the 16 px images" in line, line
    assert not (out / "reference" / "checkpoint.pt").exists()  # rejected before the reference run


def test_search_default_patch_sizes_tile_the_images():
    from effkern.cli_train import default_search_patch_sizes

    assert default_search_patch_sizes(16, 224) == [16, 32]
    assert default_search_patch_sizes(4, 28) == [4, 7]     # 8 does not divide 28
    assert default_search_patch_sizes(4, 32) == [4, 8]
    assert default_search_patch_sizes(5, 5) == [5]         # nothing coarser tiles a 5 px image


def test_cli_patch_not_dividing_the_image_is_an_error(tmp_path, capsys):
    line = run_cli(["train", *TINY, "--schedule", "const:patch=3", "--out", str(tmp_path / "run")], capsys)
    assert "patch size 3" in line and "does not divide the 16 px images" in line


BENCH_CASES = [
    ([], "the following arguments are required: name"),
    (["nope", "--batch", "3"], "unknown benchmark 'nope'; available: attention, fft_crop, patch_embed"),
    (["vit", "--repeat", "0"], "argument --repeat: must be >= 1, got 0"),
    (["vit", "--threads", "x"], "argument --threads: 'x' is not an int"),
    (["vit", "--device", "gpu"], "--device 'gpu' is not a device"),
    (["vit", "--device", "cuda:99"], "--device cuda:99"),
    (["vit", "--out", "{tmp}/no/such/dir/x"], "the directory {tmp}/no/such/dir does not exist"),
    (["vit", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["vit", "--img", "-3"], "argument --img: must be >= 1, got -3"),
    (["vit", "--keeps", "1,2"], "argument --keeps: '2' (in '1,2') is not a keep ratio in (0, 1]"),
    (["vit", "--keeps", "nan"], "argument --keeps: 'nan' is not a keep ratio in (0, 1]"),
    (["vit", "--models", "vit_q"],
     "argument --models: 'vit_q' is not one of vit_s16, vit_b16, vit_ti16_d6, vit_ti16_d2"),
    (["vit", "--patches", "32,"], "argument --patches: '' (in '32,') is not a patch size >= 1"),
    (["attention", "--modes", "bwd"], "argument --modes: 'bwd' is not fwd or fwdbwd"),
    (["attention", "--peers", "sdpa,cudnn"], "argument --peers: 'cudnn' (in 'sdpa,cudnn') is not one of sdpa,"),
    (["attention", "--models", "vit-q"], "argument --models: 'vit-q' is not one of vit-s, vit-b, vit-l, vit-h"),
    (["attention", "--keeps", "0"], "argument --keeps: '0' is not a keep ratio in (0, 1]"),
    (["patch_embed", "--configs", "224x16,224x15"], "argument --configs: '224x15' (in '224x16,224x15') is not IMGxP"),
    (["patch_embed", "--configs", "abc"], "argument --configs: 'abc' is not IMGxP with P >= 1 dividing IMG"),
    (["patch_embed", "--dim", "0"], "argument --dim: must be >= 1, got 0"),
    (["fft_crop", "--dtypes", "int3"], "argument --dtypes: invalid choice: 'int3'"),
    (["fft_crop", "--sizes", "96", "0"], "argument --sizes: must be >= 1, got 0"),
    (["fft_crop", "--res", "x"], "argument --res: 'x' is not an int"),
    # a combination only the op can judge: its one-line ValueError (a 16 px input, nothing timed)
    (["fft_crop", "--device", "cpu", "--batch", "1", "--res", "16", "--sizes", "32", "--repeat", "1"],
     "size (32, 32) must not exceed the input's spatial size (16, 16)"),
]


@pytest.mark.parametrize("argv, match", BENCH_CASES, ids=[" ".join(a)[:60] for a, _ in BENCH_CASES])
def test_cli_bench_rejects(argv, match, tmp_path, capsys):
    line = run_cli(["bench", *(a.format(tmp=tmp_path) for a in argv)], capsys)
    assert line.startswith("effkern bench: error: ") and match.format(tmp=tmp_path) in line, line


class _Parsed(Exception):
    pass


BENCH_VALID = [["vit", "--models", "vit_b16", "--keeps", "1,0.5", "--patches", "32", "--no-multiview"],
               ["patch_embed", "--configs", "240x24", "--keeps", "0.5", "--modes", "fwd"],
               ["attention", "--device", "cpu", "--peers", "sdpa", "--keeps", "1,0.5"],
               ["fft_crop", "--device", "cpu", "--threads", "1", "--sizes", "160", "--dtypes", "float32", "bfloat16"],
               ["vit"]]


@pytest.mark.parametrize("argv", BENCH_VALID, ids=lambda a: " ".join(a)[:40])
def test_cli_bench_accepts_the_documented_options(argv, monkeypatch):
    """The checked options still parse (defaults included) and reach the benchmark unchanged."""
    from effkern import bench
    from effkern.cli import main

    module = bench.load(argv[0])

    def fake_run(args):
        raise _Parsed(args)

    monkeypatch.setattr(module, "run", fake_run)
    with pytest.raises(_Parsed) as parsed:
        main(["bench", *argv])
    args = parsed.value.args[0]
    for option, value in zip(argv[1::2], argv[2::2]):
        if option.startswith("--") and option not in ("--device", "--threads", "--sizes", "--dtypes"):
            assert getattr(args, option[2:].replace("-", "_")) == value


def test_cli_cuda_without_gpu_one_line_in_a_real_process():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = subprocess.run([sys.executable, "-m", "effkern", "train", "--device", "cuda"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "effkern train: error: --device cuda: no CUDA GPU is available to torch on this machine "
        "(torch.cuda.is_available() is False); use --device cpu (see effkern train --help)"]


# ---------------------------------------------------------------------------- checkpoints (real files)

from effkern.train import checkpoint as ckpt  # noqa: E402
from effkern.train.config import TrainConfig  # noqa: E402


def tiny_cfg(out_dir, **overrides) -> TrainConfig:
    cfg = TrainConfig(method="mocov3", model="vit_tiny_patch16_224",
                      model_kwargs={"depth": 1, "patch_size": 4, "embed_dim": 64, "num_heads": 2},
                      method_kwargs={"mlp_dim": 32, "out_dim": 16}, data="digits", base_size=16,
                      limit_train=256, limit_test=64, epochs_equivalent=1.0, batch_size=32, lr=1e-3,
                      out_dir=str(out_dir), progress_bar=False, log_every=1)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def step_losses(out_dir) -> dict:
    """step -> loss from metrics.jsonl (a resumed run re-logs the steps after its checkpoint)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after 4 of its 8 steps with --ckpt-every 3: checkpoint.pt is step 4,
    checkpoint.prev.pt step 3; plus the uninterrupted run for comparison."""
    from effkern.train.loop import train

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ckpt")
    full = tiny_cfg(root / "full")
    train(full)
    assert train(tiny_cfg(root / "stopped", ckpt_every=3, stop_after_steps=4))["stopped_early"]
    return root


def _copy_run(stopped_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(stopped_run / "stopped", dst)
    return dst


class _Foreign:
    """Stands for another program's object in a pickle."""


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero-bytes":
        path.write_bytes(b"")
    elif how == "random-bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(5),
                                       dtype=torch.uint8).numpy().tobytes())
    elif how == "foreign-pickle":
        path.write_bytes(pickle.dumps({"weights": _Foreign(), "epoch": 3}))
    elif how == "foreign-torch-dict":
        torch.save({"model": {"w": torch.zeros(3)}, "epoch": 3}, path)
    elif how == "directory":
        path.unlink()
        path.mkdir()
    elif how == "missing":
        path.unlink()
    else:
        raise AssertionError(how)


DAMAGE = ["truncated", "zero-bytes", "random-bytes", "foreign-pickle", "foreign-torch-dict", "directory"]


def test_read_names_the_file(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="missing.pt does not exist"):
        ckpt.read(str(tmp_path / "missing.pt"))
    (tmp_path / "list.pt").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ckpt.CheckpointError, match="list.pt is not an effkern training checkpoint"):
        ckpt.read(str(tmp_path / "list.pt"))


def test_save_keeps_the_previous_checkpoint(stopped_run):
    run = stopped_run / "stopped"
    latest, prev = ckpt.load(str(run)), ckpt.load(str(run), ckpt.PREVIOUS)
    assert (latest["state"]["step"], prev["state"]["step"]) == (4, 3)
    assert not list(run.glob(".checkpoint.pt.*.tmp"))


@pytest.mark.parametrize("how", DAMAGE + ["missing"])
def test_resume_falls_back_to_the_previous_checkpoint(stopped_run, tmp_path, how):
    from effkern.train.loop import Run

    run_dir = _copy_run(stopped_run, tmp_path)
    _damage(run_dir / ckpt.CHECKPOINT, how)
    with pytest.warns(ckpt.CheckpointFallbackWarning, match="resuming from .*checkpoint.prev.pt"):
        run = Run(tiny_cfg(run_dir, resume=True))
    assert run.state["step"] == 3


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_checkpoints_fail_with_one_line_naming_the_file(stopped_run, tmp_path, how):
    from effkern.train.loop import Run

    run_dir = _copy_run(stopped_run, tmp_path)
    _damage(run_dir / ckpt.CHECKPOINT, how)
    _damage(run_dir / ckpt.PREVIOUS, "zero-bytes")
    with pytest.raises(ckpt.CheckpointError) as info:
        Run(tiny_cfg(run_dir, resume=True))
    message = str(info.value)
    assert str(run_dir / ckpt.CHECKPOINT) in message and "\n" not in message


def test_damaged_checkpoint_cli_exits_2_with_one_line(stopped_run, tmp_path, capsys):
    run_dir = _copy_run(stopped_run, tmp_path)
    _damage(run_dir / ckpt.CHECKPOINT, "truncated")
    _damage(run_dir / ckpt.PREVIOUS, "random-bytes")
    line = run_cli(["train", *TINY, "--resume", "--out", str(run_dir)], capsys)
    assert str(run_dir / ckpt.CHECKPOINT) in line and "not a readable effkern checkpoint" in line


@pytest.mark.parametrize("change, what", [({"method": "simclr", "method_kwargs": {}}, "method"),
                                          ({"model_kwargs": {"depth": 1, "patch_size": 4, "embed_dim": 32,
                                                             "num_heads": 2}}, "model_kwargs"),
                                          ({"base_size": 32}, "base_size")])
def test_checkpoint_of_another_run_is_refused(stopped_run, tmp_path, change, what):
    from effkern.train.loop import Run

    run_dir = _copy_run(stopped_run, tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=f"belongs to a different run .*{what}"):
        Run(tiny_cfg(run_dir, resume=True, **change))


def test_resume_without_checkpoint_is_refused_unless_auto(tmp_path, capsys):
    from effkern.train.loop import Run

    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in"):
        Run(tiny_cfg(tmp_path / "fresh", resume=True))
    from effkern.cli_train import config_from_args, train_parser

    args = train_parser().parse_args([*TINY, "--auto-resume", "--out", str(tmp_path / "fresh")])
    assert config_from_args(args).resume is False  # nothing to resume: a fresh run, as asked


def test_kill_during_a_save_resumes_from_the_last_complete_checkpoint(stopped_run, tmp_path, monkeypatch):
    """A save killed half-way (simulated: torch.save writes half the bytes, then the process
    'dies') leaves checkpoint.pt untouched; a run killed between the two renames leaves a
    partial temp file and only checkpoint.prev.pt -- resuming from it finishes exactly like
    the uninterrupted run."""
    from effkern.train.loop import Run, train

    run_dir = _copy_run(stopped_run, tmp_path)
    before = (run_dir / ckpt.CHECKPOINT).read_bytes()
    real_save = torch.save

    def dying_save(obj, f):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise KeyboardInterrupt  # the kill

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"state": {"step": 99}}, str(run_dir))
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert (run_dir / ckpt.CHECKPOINT).read_bytes() == before

    # killed between the renames: checkpoint.pt already moved to prev, the new one still a temp file
    os.replace(run_dir / ckpt.CHECKPOINT, run_dir / ckpt.PREVIOUS)
    (run_dir / ".checkpoint.pt.x1y2.tmp").write_bytes(before[: len(before) // 3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Run(tiny_cfg(run_dir, resume=True))
    assert any(issubclass(w.category, ckpt.CheckpointFallbackWarning) and "is missing" in str(w.message)
               for w in caught)
    with pytest.warns(ckpt.CheckpointFallbackWarning):
        summary = train(tiny_cfg(run_dir, resume=True))
    assert summary["steps"] == 8
    assert not list(run_dir.glob(".checkpoint.pt.*.tmp"))  # the next save removed the stray temp file
    resumed, full = step_losses(run_dir), step_losses(stopped_run / "full")
    assert sorted(resumed) == sorted(full)
    assert [resumed[s] for s in sorted(full)] == pytest.approx([full[s] for s in sorted(full)], rel=1e-6, abs=1e-7)


def _log(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_metrics_log_holds_the_one_run_in_its_directory(stopped_run, tmp_path):
    """A resume cuts metrics.jsonl back to its checkpoint's step (a later record, a line
    cut short by the kill and an old final summary go); a fresh start in the same directory
    starts a new log instead of appending to the old run's."""
    from effkern.train.loop import train

    run_dir = _copy_run(stopped_run, tmp_path)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "loss": 123.0}) + "\n" + json.dumps({"final": True, "steps": 7}) + "\n")
        f.write('{"step": 8, "lo')
    train(tiny_cfg(run_dir, resume=True))
    log = _log(run_dir)
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))
    assert [r["steps"] for r in log if r.get("final")] == [8]
    full = step_losses(stopped_run / "full")
    assert [r["loss"] for r in log if "loss" in r] == pytest.approx([full[s] for s in range(1, 9)], rel=1e-6)
    first_lr = log[-1]["peak_lr"]

    train(tiny_cfg(run_dir, lr=3e-3))  # not resumed: another run in the same directory
    log = _log(run_dir)
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))
    assert len([r for r in log if r.get("final")]) == 1 and log[-1]["peak_lr"] == pytest.approx(3 * first_lr)
