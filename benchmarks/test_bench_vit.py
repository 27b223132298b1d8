"""pytest-benchmark: one ViT training step (forward + loss.backward(), no optimizer),
plain timm vs the effkern drop-in (effkern.timm.patch) with token dropout.

    python -m pytest benchmarks/test_bench_vit.py --benchmark-only

The CPU case is tiny (depth-2 ViT-Ti/16, 64 px, batch 2) so it runs anywhere in
seconds; the CUDA cases (ViT-B/16, batch 256, bf16 autocast, 224 px) skip without
a GPU and synchronize inside the timed call.  ``effkern bench vit`` has the full grid.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="effkern: the compiled extension")
timm = pytest.importorskip("timm")

import effkern.timm as et  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _models(arch, img, device, **kw):
    torch.manual_seed(0)
    base = timm.create_model(arch, pretrained=False, img_size=img, **kw).to(device).train()
    return base, et.patch(copy.deepcopy(base))


def _step(model, x, keep, amp_dtype):
    amp = (torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())

    def step():
        model.zero_grad(set_to_none=True)
        with amp:
            out = model(x) if keep is None else model(x, keep=keep)
        loss = out.float().square().mean()
        loss.backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    return step


@pytest.mark.parametrize("impl", ["timm", "effkern-keep0.5"])
def test_cpu_tiny_train_step(benchmark, impl):
    base, patched = _models("vit_tiny_patch16_224", 64, "cpu", depth=2)
    x = torch.randn(2, 3, 64, 64)
    step = _step(base, x, None, None) if impl == "timm" else _step(patched, x, 0.5, None)
    loss = benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    assert torch.isfinite(loss)


@cuda
@pytest.mark.parametrize("impl, keep", [("timm", None), ("effkern", 1.0), ("effkern", 0.5), ("effkern", 0.25)])
def test_cuda_vit_b16_bf16_train_step(benchmark, impl, keep):
    base, patched = _models("vit_base_patch16_224", 224, "cuda")
    x = torch.randn(256, 3, 224, 224, device="cuda")
    step = _step(base if impl == "timm" else patched, x, keep, torch.bfloat16)
    loss = benchmark.pedantic(step, rounds=10, warmup_rounds=3)
    assert torch.isfinite(loss)
