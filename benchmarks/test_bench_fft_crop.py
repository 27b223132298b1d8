"""pytest-benchmark: fft_crop and its peers (torch.fft rfft2/crop/irfft2,
F.interpolate antialias) on the same inputs.  CPU shapes always; the GPU shapes
(256, 3, 224, 224) -> {96, 128, 160, 192} in fp32/bf16 skip without CUDA.
GPU timings synchronize around each call (benchmark.pedantic with a sync).
Speed targets are read off these numbers, never asserted here."""

import pytest
import torch

from effkern.bench.fft_crop import interpolate_crop, torch_fft_crop
from effkern.ops import fft_crop

IMPLS = {
    "effkern": lambda x, s: fft_crop(x, s),
    "torch.fft": lambda x, s: torch_fft_crop(x, s, s),
    "interpolate": lambda x, s: interpolate_crop(x, s, s),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("size", [96, 160])
def test_cpu(benchmark, impl, size):
    x = torch.randn(16, 3, 224, 224)
    benchmark.group = f"fft_crop cpu (16,3,224,224)->{size}"
    out = benchmark(IMPLS[impl], x, size)
    assert out.shape == (16, 3, size, size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("size", [96, 128, 160, 192])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda(benchmark, impl, size, dtype):
    x = torch.randn(256, 3, 224, 224, device="cuda").to(dtype)
    fn = IMPLS[impl]

    def call():
        fn(x, size)
        torch.cuda.synchronize()

    call()
    benchmark.group = f"fft_crop cuda {dtype} (256,3,224,224)->{size}"
    benchmark.pedantic(call, rounds=20, warmup_rounds=3)
