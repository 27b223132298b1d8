"""The two algorithms of the C++ CPU fft_crop kernel (fft: lane-vectorised
mixed-radix FFTs; gemm: even/odd-split crop matrices), each forced with
EFFKERN_FFT_CROP_CPU, and every instruction-set build of the FFT kernels
(EFFKERN_CPU_ISA, read once per process: run in subprocesses), against the
float64 torch.fft oracle."""

import json
import os
import subprocess
import sys

import pytest
import torch

import effkern
from effkern import _native
from oracles import fft_crop_oracle, rel_err

pytestmark = pytest.mark.skipif(not _native.has_cpu_kernels(), reason="needs the compiled CPU kernels")

ALGORITHMS = ["fft", "gemm"]

SHAPES = [  # (N, C, H, W, h, w): radices 8/4/2/3/5/7, generic primes, identity axes, odd counts
    (1, 3, 224, 224, 160, 160),   # 8*4*7 -> 8*4*5; 3 slices: one pair and a lone slice
    (2, 3, 224, 224, 96, 192),
    (1, 2, 224, 224, 224, 112),   # identity rows, cropped columns
    (1, 2, 100, 224, 70, 224),    # cropped rows, identity columns
    (2, 1, 64, 48, 63, 47),       # odd kept sizes next to even inputs
    (1, 1, 1, 1, 1, 1),
    (1, 2, 7, 1, 3, 1),
    (1, 3, 26, 22, 13, 11),
    (1, 2, 223, 97, 111, 50),     # primes 223, 97, 37: the generic radix
    (1, 1, 121, 169, 77, 143),    # 11^2, 13^2, 7*11, 11*13
    (2, 2, 130, 68, 129, 67),     # lane blocks that do not fill 64 lanes
    (1, 1, 5, 200, 4, 2),
]


def _ids(shape):
    return "x".join(map(str, shape))


@pytest.fixture(params=ALGORITHMS)
def algorithm(request, monkeypatch):
    monkeypatch.setenv("EFFKERN_FFT_CROP_CPU", request.param)
    return request.param


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_oracle(algorithm, shape, dtype):
    n, c, H, W, h, w = shape
    x = torch.randn(n, c, H, W, dtype=dtype)
    y = torch.ops.effkern.fft_crop(x, (h, w), None, None)
    assert y.shape == (n, c, h, w) and y.dtype == dtype
    assert rel_err(y, fft_crop_oracle(x, (h, w))) < (2e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_adjoint_matches_oracle_vjp(algorithm, shape):
    n, c, H, W, h, w = shape
    x = torch.randn(n, c, H, W, dtype=torch.float64, requires_grad=True)
    g = torch.randn(n, c, h, w, dtype=torch.float64)
    (expected,) = torch.autograd.grad(fft_crop_oracle(x, (h, w)), x, g)
    got = torch.ops.effkern.fft_crop_backward(g, (H, W), None)
    assert rel_err(got, expected) < 1e-12


def test_uint8_normalisation_and_half(algorithm):
    x = torch.randint(0, 256, (3, 3, 40, 56), dtype=torch.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    y = torch.ops.effkern.fft_crop(x, (24, 35), mean, std)
    assert y.dtype == torch.float32
    assert rel_err(y, fft_crop_oracle(x, (24, 35), mean, std)) < 2e-6
    xh = torch.randn(2, 3, 40, 56).to(torch.bfloat16)
    yh = torch.ops.effkern.fft_crop(xh, (24, 35), None, None)
    assert yh.dtype == torch.bfloat16 and rel_err(yh, fft_crop_oracle(xh, (24, 35))) < 1e-2


def test_every_output_element_is_written(algorithm):
    """Output memory is recycled NaN garbage: any element the kernel skips stays NaN."""
    x = torch.randn(5, 3, 48, 40)
    for _ in range(3):
        poison = torch.full((5 * 3 * 48 * 40,), float("nan"))
        del poison
        y = torch.ops.effkern.fft_crop(x, (30, 25), None, None)
        assert torch.isfinite(y).all()


def test_deterministic_and_thread_count_independent(algorithm):
    """The FFT path computes each pair of slices alone: bitwise the same on any
    thread count.  The GEMM path batches a thread's slices into one BLAS call, so
    its rounding may depend on the split (equal to float32 accuracy only)."""
    x = torch.randn(4, 3, 96, 80)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.effkern.fft_crop(x, (64, 50), None, None)
        torch.set_num_threads(max(2, threads))
        many = torch.ops.effkern.fft_crop(x, (64, 50), None, None)
    finally:
        torch.set_num_threads(threads)
    if algorithm == "fft":
        assert torch.equal(one, many)
    else:
        assert rel_err(one, many) < 1e-6


def test_algorithm_rule():
    algo = _native._C.fft_crop_cpu_algorithm
    assert algo(224, 224, 160, 160) == "fft"
    assert algo(28, 28, 14, 14) == "fft"
    assert algo(223, 223, 111, 111) == "gemm"  # prime sizes: the FFT degenerates to dense sums
    assert algo(131, 131, 100, 100) == "gemm"
    assert algo(224, 224, 221, 221) == "fft"   # 13 * 17: small primes, the FFT still wins


_ISA_SCRIPT = r"""
import json, torch, effkern, effkern.ops
from oracles import fft_crop_oracle, rel_err
errs = []
for (n, c, H, W, h, w) in {shapes!r}:
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(n, c, H, W, dtype=dtype)
        y = torch.ops.effkern.fft_crop(x, (h, w), None, None)
        errs.append(rel_err(y, fft_crop_oracle(x, (h, w))) / (2e-6 if dtype == torch.float32 else 1e-12))
        g = torch.randn(n, c, h, w, dtype=torch.float64)
        xd = x.double().requires_grad_()
        (ref,) = torch.autograd.grad(fft_crop_oracle(xd, (h, w)), xd, g)
        errs.append(rel_err(torch.ops.effkern.fft_crop_backward(g, (H, W), None), ref) / 1e-12)
print(json.dumps({{"isa": effkern.build_info()["cpu_isa"], "worst": max(errs)}}))
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_instruction_set_build(isa):
    shapes = [SHAPES[0], SHAPES[4], SHAPES[7], SHAPES[8], SHAPES[10]]
    # tests/ on PYTHONPATH for the oracles, as pytest's pythonpath setting does in this process
    env = dict(os.environ, EFFKERN_CPU_ISA=isa, EFFKERN_FFT_CROP_CPU="fft",
               PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")])))
    script = _ISA_SCRIPT.format(shapes=shapes)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    order = ["baseline", "avx2", "avx512"]
    best = effkern.build_info()["cpu_isa"]
    # the requested build, or the best one the CPU has when it asks for more
    assert result["isa"] == order[min(order.index(isa), order.index(best))]
    assert result["worst"] < 1.0, result


def test_slices_do_not_leak_into_each_other(algorithm):
    """Each slice is computed alone: a NaN, or a huge magnitude, in one image or
    channel does not reach another, and a slice's result does not depend on the batch."""
    x = torch.randn(3, 3, 64, 56)
    x[0, 0] *= 1e4
    x[0, 1] *= 1e-3
    y = torch.ops.effkern.fft_crop(x, (40, 30), None, None)
    for n in range(3):
        for c in range(3):
            assert rel_err(y[n, c], fft_crop_oracle(x[n:n + 1, c:c + 1], (40, 30))[0, 0]) < 2e-6, (n, c)
    if algorithm == "fft":
        assert torch.equal(torch.ops.effkern.fft_crop(x[1:2], (40, 30), None, None), y[1:2])
    x[1, 2, 5, 7] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    y = torch.ops.effkern.fft_crop(x, (40, 30), None, None)
    finite = torch.isfinite(y).flatten(2).all(-1)
    expected = torch.ones(3, 3, dtype=torch.bool)
    expected[1, 2] = expected[2, 0] = False
    assert torch.equal(finite, expected)
    g = torch.randn(3, 3, 40, 30, dtype=torch.float64)
    g[0, 0] *= 1e-5
    xd = torch.zeros(3, 3, 64, 56, dtype=torch.float64, requires_grad=True)
    (ref,) = torch.autograd.grad(fft_crop_oracle(xd, (40, 30)), xd, g)
    got = torch.ops.effkern.fft_crop_backward(g.float(), (64, 56), None)
    for n in range(3):
        for c in range(3):
            assert rel_err(got[n, c], ref[n, c]) < 2e-6, (n, c)


def test_backward_rejects_an_empty_grad():
    with pytest.raises(RuntimeError, match="spatial size"):
        torch.ops.effkern.fft_crop_backward(torch.randn(1, 1, 0, 4), [5, 4], None)


def test_scratch_reused_after_nan_input(algorithm):
    """The FFT path keeps its per-thread scratch between calls of the same shape:
    a NaN image leaves NaN in it, which must not reach the next call (odd sizes
    exercise the zero lanes of the half-slice layout)."""
    bad = torch.randn(1, 2, 37, 45)
    bad[0, 1, 3, 4] = float("nan")
    torch.ops.effkern.fft_crop(bad, (21, 33), None, None)
    x = torch.randn(2, 3, 37, 45)
    y = torch.ops.effkern.fft_crop(x, (21, 33), None, None)
    assert rel_err(y, fft_crop_oracle(x, (21, 33))) < 2e-6
    g = torch.randn(1, 2, 21, 33)
    g[0, 0, 1, 1] = float("nan")
    torch.ops.effkern.fft_crop_backward(g, (37, 45), None)
    g = torch.randn(2, 3, 21, 33, dtype=torch.float64)
    xd = torch.zeros(2, 3, 37, 45, dtype=torch.float64, requires_grad=True)
    (ref,) = torch.autograd.grad(fft_crop_oracle(xd, (21, 33)), xd, g)
    assert rel_err(torch.ops.effkern.fft_crop_backward(g.float(), (37, 45), None), ref) < 2e-6
