"""effkern.ops.varlen_attention / varlen_attention_qkvpacked against a float64 oracle.

CPU tests run the PyTorch path; the Triton kernels are tested under the interpreter
in tests/triton/test_varlen_attention_interpret.py and on a GPU by the cuda tests below.
"""

from __future__ import annotations

import pytest
import torch

import effkern
from effkern.ops import varlen_attention, varlen_attention_qkvpacked
from oracles import rel_err
from oracles_attention import make_cu_seqlens, varlen_attention_oracle

HEAD_DIMS = (32, 64, 80, 96, 128)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(lengths, heads, head_dim, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = make_cu_seqlens(lengths, device)
    total = int(sum(lengths))
    qkv = [torch.randn(total, heads, head_dim, generator=g, dtype=torch.float64).to(device, dtype)
           .requires_grad_() for _ in range(3)]
    return (*qkv, cu, max(lengths, default=0))


def _check_against_oracle(q, k, v, cu, max_seqlen, scale=None, tol=None):
    tol = TOL[q.dtype] if tol is None else tol
    out = varlen_attention(q, k, v, cu, max_seqlen, scale)
    ref = varlen_attention_oracle(q, k, v, cu.cpu(), scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < tol
    grad = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad.to(out.device, out.dtype))
    want = torch.autograd.grad(ref, (q, k, v), grad.to(ref.device))
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        assert rel_err(a, b) < tol, f"d{name}: {rel_err(a, b)}"
    return out, got


@pytest.fixture
def triton_backend():
    """The CUDA tests here check the Triton kernels: ``auto`` would pick FlashAttention-2
    for fp16/bf16 (tested in tests/test_varlen_attn_torch.py)."""
    with effkern.use_backend("triton"):
        yield


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs are allocated NaN-filled (EFFKERN_DEBUG=1): an unwritten element shows."""
    monkeypatch.setenv("EFFKERN_DEBUG", "1")


# ---------------------------------------------------------------- correctness

@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_oracle(head_dim, dtype, poisoned):
    lengths = [5, 0, 1, 23, 7, 0, 16, 2]
    _check_against_oracle(*_inputs(lengths, 3, head_dim, dtype, seed=head_dim))


@pytest.mark.parametrize("head_dim", [8, 12, 16, 48, 72, 256])
def test_other_head_dims_match_oracle(head_dim):
    """Every head_dim in 8..256 is accepted (timm ViTs use 8..256)."""
    lengths = [5, 0, 1, 23, 7, 0, 16, 2]
    _check_against_oracle(*_inputs(lengths, 3, head_dim, torch.float32, seed=head_dim))


@pytest.mark.parametrize("lengths", [[1], [37], [0, 9, 0], [1, 1, 1, 1], [0, 0, 3]],
                         ids=["len1", "single", "empty-around", "all-len1", "leading-empty"])
def test_ragged_edge_cases(lengths, poisoned):
    _check_against_oracle(*_inputs(lengths, 2, 32))


RUN_LAYOUTS = {  # lengths -> contiguous_runs (first token, sequences, length), None = gather path
    "equal": ([7, 7, 7, 7, 7], [(0, 5, 7)]),
    "view-major": ([9, 9, 9, 4, 4, 4], [(0, 3, 9), (27, 3, 4)]),
    "empties-inside": ([6, 0, 6, 6, 0, 3, 3], [(0, 3, 6), (18, 2, 3)]),
    "length-repeats": ([5, 3, 5], None),
    "all-distinct": ([4, 6, 3], [(0, 1, 4), (4, 1, 6), (10, 1, 3)]),
}


@pytest.mark.parametrize("layout", list(RUN_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_copy_runs_and_gather_path_match_oracle(layout, dtype, poisoned):
    """CPU path: each distinct length forming one contiguous run of sequences runs on
    strided views (no gather); otherwise sequences are gathered by length.  Both match
    the oracle, unpacked and qkv-packed, forward and backward."""
    from effkern.reference.varlen_attention import contiguous_runs

    lengths, runs = RUN_LAYOUTS[layout]
    q, k, v, cu, m = _inputs(lengths, 3, 32, dtype, seed=len(lengths))
    assert contiguous_runs(cu) == (None if runs is None else tuple(runs))
    _check_against_oracle(q, k, v, cu, m)
    qkv = torch.stack([q, k, v], 1).detach().requires_grad_()
    out = varlen_attention_qkvpacked(qkv, cu, m)
    ref = varlen_attention_oracle(q, k, v, cu)
    assert rel_err(out, ref) < TOL[dtype]
    g = torch.randn(out.shape, dtype=torch.float64)
    (dqkv,) = torch.autograd.grad(out, qkv, g.to(dtype))
    want = torch.stack(torch.autograd.grad(ref, (q, k, v), g), 1)
    assert rel_err(dqkv, want) < TOL[dtype]


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_input_on_run_path_follows_math_path(where, value):
    """inf / NaN inputs on equal-length (zero-copy) layouts: the output's NaN pattern is
    the oracle's (ATen's fused kernel alone would zero a query row holding a NaN), the
    other sequence stays exact; unpacked and packed; backward for NaN inputs."""
    q, k, v, cu, m = _inputs([6, 6], 2, 32, seed=11)
    with torch.no_grad():
        {"q": q, "k": k, "v": v}[where][2, 1, 5] = value
    out = varlen_attention(q, k, v, cu, m)
    want = varlen_attention_oracle(q, k, v, cu)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert not torch.isfinite(out[:6]).all()
    assert rel_err(out[6:], want[6:]) < 1e-5
    packed = varlen_attention_qkvpacked(torch.stack([q, k, v], 1), cu, m)
    assert torch.equal(torch.isnan(packed), torch.isnan(want))
    if value == value:  # not NaN: the backward is checked for NaN only (with inf, the math
        return          # path's and the oracle's autograd formulas differ between inf and NaN)
    dout = torch.randn(packed.shape, generator=torch.Generator().manual_seed(1))
    dout[7, 0, 0] = value  # a non-finite output gradient in the clean sequence
    qkv = torch.stack([q, k, v], 1).detach().requires_grad_()
    ref = torch.stack([t.detach().double().requires_grad_() for t in (q, k, v)], 1)
    (got,) = torch.autograd.grad(varlen_attention_qkvpacked(qkv, cu, m), qkv, dout)
    want_out = varlen_attention_oracle(*ref.unbind(1), cu)
    (want_g,) = torch.autograd.grad(want_out, ref, dout.double())
    assert torch.equal(torch.isnan(got), torch.isnan(want_g))


@pytest.mark.parametrize("where", ["q", "k", "v", "out", "dout"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_fused_cpu_backward_propagates_like_the_math_path(where, value):
    """The claim that lets the CPU backward skip any finiteness test: given the same out
    and lse, ATen's fused backward puts NaN exactly where the plain-matmul backward does."""
    from effkern.reference import varlen_attention as ref

    if ref._flash_cpu(torch.zeros(1)) is None:
        pytest.skip("this torch has no fused CPU attention")
    g = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(2, 3, 7, 16, generator=g, dtype=torch.float64) for _ in range(4))
    if where in "qkv":
        {"q": q, "k": k, "v": v}[where][1, 2, 3, 4] = value
    out, lse = ref._group_forward(q, k, v, 0.25, fused=False)
    if where == "out":
        out[1, 2, 3, 4] = value
    if where == "dout":
        dout[1, 2, 3, 4] = value
    math_grads = ref._group_backward(dout, q, k, v, out, lse, 0.25, fused=False)
    fused_grads = ref._group_backward(dout, q, k, v, out, lse, 0.25, fused=True)
    for a, b in zip(math_grads, fused_grads):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        finite = torch.isfinite(a) & torch.isfinite(b)
        assert rel_err(b[finite], a[finite]) < 1e-10


def test_many_random_sequences(poisoned):
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 40, (60,), generator=g).tolist()
    _check_against_oracle(*_inputs(lengths, 2, 64))


def test_long_sequence_and_loose_max_seqlen():
    q, k, v, cu, _ = _inputs([600, 3], 1, 32, seed=5)
    _check_against_oracle(q, k, v, cu, 4096)  # max_seqlen may exceed the longest sequence


def test_custom_scale():
    q, k, v, cu, m = _inputs([4, 9], 2, 32)
    _check_against_oracle(q, k, v, cu, m, scale=0.37)


def test_no_tokens():
    for lengths in ([], [0, 0]):
        q, k, v, cu, m = _inputs(lengths, 2, 32)
        out = varlen_attention(q, k, v, cu, m)
        assert out.shape == (0, 2, 32)
        out.sum().backward()
        assert q.grad.shape == q.shape


def test_noncontiguous_inputs():
    q, k, v, cu, m = _inputs([6, 0, 11], 4, 32)
    # (total, D, H) storage viewed as (total, H, D): head_dim is not the unit-stride dim
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    assert not qt.is_contiguous()
    _check_against_oracle(qt, kt, vt, cu, m)


def test_deterministic():
    q, k, v, cu, m = _inputs([13, 4, 29], 2, 80)
    grads = []
    for _ in range(2):
        out = varlen_attention(q, k, v, cu, m)
        grads.append((out,) + torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_reference_backend_matches_default():
    q, k, v, cu, m = _inputs([3, 8], 2, 32)
    out = varlen_attention(q, k, v, cu, m)
    with effkern.backend.use_backend("reference"):
        assert rel_err(out, varlen_attention(q, k, v, cu, m)) < 1e-6


# ---------------------------------------------------------------- qkv packed

def test_qkvpacked_matches_unpacked(poisoned):
    lengths, heads, head_dim = [7, 0, 1, 12], 3, 80
    total = sum(lengths)
    cu = make_cu_seqlens(lengths)
    x = torch.randn(total, 48, dtype=torch.float64)
    lin = torch.nn.Linear(48, 3 * heads * head_dim, dtype=torch.float64)
    qkv = lin(x).reshape(total, 3, heads, head_dim)          # timm's layout
    qkv_leaf = qkv.detach().requires_grad_()
    out = varlen_attention_qkvpacked(qkv_leaf, cu, max(lengths))
    q, k, v = (t.detach().requires_grad_() for t in qkv_leaf.unbind(1))
    ref = varlen_attention(q, k, v, cu, max(lengths))
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv_leaf, g)
    assert dqkv.shape == qkv.shape and torch.isfinite(dqkv).all()
    assert torch.equal(dqkv, torch.stack(torch.autograd.grad(ref, (q, k, v), g), dim=1))
    # gradient flows through the Linear as well
    out2 = varlen_attention_qkvpacked(qkv, cu, max(lengths))
    out2.backward(g)
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


# ---------------------------------------------------------------- torch.library integration

def test_gradcheck():
    q, k, v, cu, m = _inputs([3, 0, 1, 2], 2, 32, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: varlen_attention(a, b, c, cu, m), (q, k, v))
    qkv = torch.stack([q, k, v], 1).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: varlen_attention_qkvpacked(t, cu, m), (qkv,), fast_mode=True)


@pytest.mark.parametrize("device,dtype", [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=cuda),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=cuda)])
def test_opcheck(device, dtype):
    """Schema, fake kernel, autograd registration and AOT dispatch against the kernels
    of the device (CPU reference path; on CUDA the backend auto picks)."""
    q, k, v, cu, m = _inputs([4, 0, 1, 6], 2, 32, dtype, device)
    scale = 32 ** -0.5
    ops = torch.ops.effkern
    torch.library.opcheck(ops.varlen_attention_fwd, (q, k, v, cu, m, scale))
    out, lse = ops.varlen_attention_fwd(q, k, v, cu, m, scale)
    dout = torch.randn_like(out)
    torch.library.opcheck(ops.varlen_attention_bwd, (dout, q.detach(), k.detach(), v.detach(),
                                                     out.detach(), lse, cu, m, scale))
    qkv = torch.stack([q, k, v], 1).detach().requires_grad_()
    torch.library.opcheck(ops.varlen_attention_qkvpacked_fwd, (qkv, cu, m, scale))
    torch.library.opcheck(ops.varlen_attention_qkvpacked_bwd, (dout, qkv.detach(), out.detach(), lse,
                                                               cu, m, scale))


def test_lse_output():
    q, k, v, cu, m = _inputs([5, 0, 3], 2, 32, torch.float64)
    out, lse = torch.ops.effkern.varlen_attention_fwd(q, k, v, cu, m, 0.5)
    assert lse.shape == (2, 8) and lse.dtype == torch.float64 and not lse.requires_grad
    s = torch.einsum("thd,shd->hts", q[:5], k[:5]) * 0.5
    torch.testing.assert_close(lse[:, :5], torch.logsumexp(s, -1))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    q, k, v, cu, m = _inputs([6, 0, 1, 9], 2, 64)

    def f(q, k, v):
        return varlen_attention(q, k, v, cu, m).square().sum()

    loss = torch.compile(f, backend=backend, fullgraph=True)(q, k, v)
    got = torch.autograd.grad(loss, (q, k, v))
    want_loss = f(q, k, v)
    want = torch.autograd.grad(want_loss, (q, k, v))
    torch.testing.assert_close(loss, want_loss)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- bad inputs

def _bad_cases():
    q = torch.randn(10, 2, 32)
    cu = make_cu_seqlens([4, 6])
    return q, cu


@pytest.mark.parametrize("case, match", [
    ("k_shape", "k has shape"),
    ("v_dtype", "v has dtype"),
    ("q_ndim", "q must be 3-D"),
    ("q_int", "q has dtype"),
    ("head_dim", "head_dim"),
    ("cu_dtype", "cu_seqlens has dtype"),
    ("cu_ndim", "cu_seqlens must be 1-D"),
    ("cu_start", r"cu_seqlens\[0\]"),
    ("cu_decreasing", "cu_seqlens must be non-decreasing"),
    ("cu_last", r"cu_seqlens\[-1\]"),
    ("cu_empty", "cu_seqlens must have"),
    ("max_seqlen_small", "max_seqlen"),
    ("max_seqlen_type", "max_seqlen"),
    ("scale", "scale"),
])
def test_bad_inputs(case, match):
    q, cu = _bad_cases()
    k = v = q
    args = dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=6, scale=None)
    if case == "k_shape":
        args["k"] = torch.randn(10, 3, 32)
    elif case == "v_dtype":
        args["v"] = q.double()
    elif case == "q_ndim":
        args.update(q=q.reshape(10, 64), k=q.reshape(10, 64), v=q.reshape(10, 64))
    elif case == "q_int":
        args["q"] = q.int()
    elif case == "head_dim":
        x = torch.randn(10, 2, 4)
        args.update(q=x, k=x, v=x)
    elif case == "cu_dtype":
        args["cu_seqlens"] = cu.long()
    elif case == "cu_ndim":
        args["cu_seqlens"] = cu[None]
    elif case == "cu_start":
        args["cu_seqlens"] = torch.tensor([1, 4, 10], dtype=torch.int32)
    elif case == "cu_decreasing":
        args["cu_seqlens"] = torch.tensor([0, 7, 4, 10], dtype=torch.int32)
    elif case == "cu_last":
        args["cu_seqlens"] = torch.tensor([0, 4, 9], dtype=torch.int32)
    elif case == "cu_empty":
        args["cu_seqlens"] = torch.zeros(0, dtype=torch.int32)
    elif case == "max_seqlen_small":
        args["max_seqlen"] = 5
    elif case == "max_seqlen_type":
        args["max_seqlen"] = 6.5
    elif case == "scale":
        args["scale"] = float("nan")
    with pytest.raises(ValueError, match=match):
        varlen_attention(**args)


def test_bad_qkvpacked():
    cu = make_cu_seqlens([4, 6])
    with pytest.raises(ValueError, match="qkv must be"):
        varlen_attention_qkvpacked(torch.randn(10, 2, 2, 32), cu, 6)
    with pytest.raises(ValueError, match="max_seqlen"):
        varlen_attention_qkvpacked(torch.randn(10, 3, 2, 32), cu, 4)
    with pytest.raises(ValueError, match="head_dim"):
        varlen_attention_qkvpacked(torch.randn(10, 3, 2, 264), cu, 6)


@cuda
def test_cu_seqlens_on_other_device():
    q = torch.randn(10, 2, 32, device="cuda")
    with pytest.raises(ValueError, match="cu_seqlens is on"):
        varlen_attention(q, q, q, make_cu_seqlens([4, 6]), 6)


# ---------------------------------------------------------------- GPU (Triton)

@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_cuda_matches_oracle(dtype, head_dim, poisoned, triton_backend):
    lengths = [197, 0, 1, 148, 50, 99, 37, 3]
    _check_against_oracle(*_inputs(lengths, 4, head_dim, dtype, "cuda", seed=head_dim))


@cuda
def test_cuda_long_sequence(triton_backend):
    _check_against_oracle(*_inputs([4096, 5, 0], 2, 64, torch.bfloat16, "cuda"))


@cuda
def test_cuda_qkvpacked_and_deterministic(triton_backend):
    lengths = [97, 0, 1, 64, 33]
    cu = make_cu_seqlens(lengths, "cuda")
    qkv = torch.randn(sum(lengths), 3, 6, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    results = []
    for _ in range(2):
        out = varlen_attention_qkvpacked(qkv, cu, 97)
        results.append((out,) + torch.autograd.grad(out.float().square().sum(), qkv))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    ref = varlen_attention_oracle(*qkv.unbind(1), cu.cpu())
    assert rel_err(results[0][0], ref) < TOL[torch.float16]


@cuda
def test_cuda_compile_fullgraph(triton_backend):
    q, k, v, cu, m = _inputs([50, 0, 1, 197], 6, 64, torch.bfloat16, "cuda")
    f = torch.compile(lambda a, b, c: varlen_attention(a, b, c, cu, m), fullgraph=True)
    out = f(q, k, v)
    assert rel_err(out, varlen_attention_oracle(q, k, v, cu.cpu())) < TOL[torch.bfloat16]
    out.float().sum().backward()
    assert torch.isfinite(q.grad).all()


def test_matmul_fallback_path(monkeypatch):
    """The reference's plain-matmul path (used off-CPU, or without ATen's fused CPU op)."""
    import importlib

    ref = importlib.import_module("effkern.reference.varlen_attention")
    monkeypatch.setattr(ref, "_flash_cpu", lambda x: None)
    for dtype in (torch.float32, torch.float64):
        _check_against_oracle(*_inputs([5, 0, 1, 12], 2, 80, dtype, seed=9))
