"""The bad-input table of tests/test_bad_input.py on the real Triton kernels, under
TRITON_INTERPRET=1 on CPU tensors: every invalid argument is rejected before a
launcher runs, and the edge cases that must work (non-contiguous cu_seqlens and
keep_idx, a huge max_seqlen, NaN propagation, an empty batch, meta tensors) give the
float64 oracle's answer on the Triton path too.

Run in its own process:  TRITON_INTERPRET=1 EFFKERN_BACKEND=triton pytest tests/triton/
"""

from __future__ import annotations

import importlib

import pytest

import effkern
from test_bad_input import EDGE_CASES, OP_CASES

pytestmark = pytest.mark.skipif(
    not (effkern.backend.triton_interpret() and effkern.backend.get_backend() == "triton"),
    reason="needs TRITON_INTERPRET=1 and EFFKERN_BACKEND=triton set before import")


@pytest.fixture
def launches(monkeypatch):
    """Counts the Triton launcher calls, to prove the cases below reach (or never reach) them."""
    calls = []
    for name in ("effkern.kernels.varlen_attention", "effkern.kernels.patch_embed"):
        module = importlib.import_module(name)
        for fn in ("forward", "backward", "patch_embed_fwd", "patch_embed_bwd_weight"):
            if hasattr(module, fn):
                real = getattr(module, fn)

                def counted(*args, _real=real, _fn=fn, **kwargs):
                    calls.append(_fn)
                    return _real(*args, **kwargs)

                monkeypatch.setattr(module, fn, counted)
    return calls


# the ops whose kernels are Triton (fft_crop has none: its cases run in tests/test_bad_input.py)
TRITON_CASES = [c for c in OP_CASES if not c[0].startswith("fft_crop")]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_op_rejects_before_any_launch(case, launches):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call()
    assert launches == []


@pytest.mark.parametrize("check", EDGE_CASES, ids=[c.__name__ for c in EDGE_CASES])
def test_edge_case_works_on_triton(check, launches):
    check()
    if check.__name__ != "check_empty_batch_and_meta_patch_embed":  # nothing to launch for 0 tokens / meta
        assert launches, "the Triton kernels did not run"
