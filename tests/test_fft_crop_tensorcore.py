"""The fused tensor-core fft_crop CUDA kernel (csrc/cuda/fft_crop_tc_kernel.cu).

Without a GPU the strongest evidence is (1) that nvcc compiles it for sm_90 and
sm_80 onto tensor cores without spills (csrc/cuda/check_compile.py) and (2) that
its exact arithmetic -- operand rounding to tf32/fp16/bf16, fp32 accumulation per
tensor-core instruction, the split-TF32 pass order -- emulated on the CPU
(effkern/reference/fft_crop_tensorcore.py) meets the float64 oracle at the op's
tolerances.  The GPU tests at the end compare the kernel with that emulation and
the oracle; they skip here.  Their first run (H200, 2026-12-04) showed the tensor
cores' fp32 accumulation between round-to-nearest and round-toward-zero, so the
kernel is checked against the bracket the two emulated roundings give
(``_distance_and_bound``).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effkern.reference import fft_crop_tensorcore as tc
from effkern.reference.fft_crop_tensorcore import (
    FUSED_MAX_ROWS,
    fft_crop_backward_tensorcore,
    fft_crop_tensorcore,
    round_tf32,
)
from oracles import fft_crop_oracle, rel_err

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "csrc" / "cuda" / "check_compile.py"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (N, C, H, W, h, w): rank-one term (h, w even), odd sizes, h = 1, h = H (identity),
# several 64-column blocks (w > 64), H not a multiple of 32, and the fused limit H = 256.
SHAPES = [
    (2, 3, 64, 48, 32, 40),
    (2, 3, 31, 37, 15, 21),
    (1, 2, 20, 30, 1, 1),
    (2, 2, 33, 40, 33, 40),
    (1, 2, 96, 150, 64, 130),
    (1, 1, FUSED_MAX_ROWS, 40, 200, 18),
]
# The op's tolerances (tests/test_fft_crop.py: fp32 < 1e-5, half precision < 1e-2).
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _x(shape, dtype, seed):
    n, c, H, W = shape[:4]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, H, W, generator=g).to(dtype)


def test_round_tf32_rounds_to_nearest_ties_away():
    one = 1.0
    cases = {
        one + 2.0 ** -11: one + 2.0 ** -10,  # tie: away from zero
        -(one + 2.0 ** -11): -(one + 2.0 ** -10),
        one + 2.0 ** -12: one,  # below half an ulp
        one + 3 * 2.0 ** -12: one + 2.0 ** -10,
        one + 2.0 ** -10 + 2.0 ** -11: one + 2.0 ** -9,  # tie at an odd mantissa: away, not to even
        0.0: 0.0,
    }
    got = round_tf32(torch.tensor(list(cases), dtype=torch.float32))
    assert got.tolist() == list(cases.values())
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    r = round_tf32(x)
    assert (r.view(torch.int32) & 0x1FFF).eq(0).all()  # 10 explicit mantissa bits left
    assert ((r - x).abs() <= x.abs() * 2.0 ** -11).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_kernel_matches_oracle(shape, dtype):
    x = _x(shape, dtype, seed=sum(shape))
    h, w = shape[4:]
    y = fft_crop_tensorcore(x, (h, w))
    assert y.shape == (*x.shape[:2], h, w) and y.dtype == dtype
    assert rel_err(y, fft_crop_oracle(x, (h, w))) < TOL[dtype]


def test_single_pass_tf32_is_the_documented_tf32_accuracy():
    # One TF32 pass (torch's CUDA matmul precision "tf32") must be visibly worse than three split passes:
    # this also shows the emulation really rounds the operands.
    x = _x((2, 3, 64, 48), torch.float32, seed=3)
    ref = fft_crop_oracle(x, (32, 40))
    e3 = rel_err(fft_crop_tensorcore(x, (32, 40)), ref)
    e1 = rel_err(fft_crop_tensorcore(x, (32, 40), tf32_single_pass=True), ref)
    assert e3 < 1e-6
    assert 1e-5 < e1 < 2e-3


def test_uint8_with_fused_normalisation():
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (4, 3, 64, 48), dtype=torch.uint8, generator=g)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    y = fft_crop_tensorcore(x, (32, 40), mean, std)
    assert y.dtype == torch.float32
    assert rel_err(y, fft_crop_oracle(x, (32, 40), mean, std)) < 1e-5
    y1 = fft_crop_tensorcore(x, (32, 40), mean, std, tf32_single_pass=True)
    assert rel_err(y1, fft_crop_oracle(x, (32, 40), mean, std)) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_normalisation(dtype):
    x = _x((2, 3, 40, 36), dtype, seed=5)
    mean, std = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0.5, 1.5, 2.0])
    y = fft_crop_tensorcore(x, (20, 18), mean, std)
    assert y.dtype == dtype
    assert rel_err(y, fft_crop_oracle(x, (20, 18), mean, std)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", [((30, 34), (16, 20)), ((31, 37), (15, 21))], ids=["even", "odd"])
def test_emulated_backward_is_the_oracles_adjoint(sizes, dtype):
    (H, W), (h, w) = sizes
    g = torch.Generator().manual_seed(6)
    grad = torch.randn(2, 3, h, w, generator=g).to(dtype)
    std = torch.tensor([0.5, 1.0, 2.0])
    x = torch.zeros(2, 3, H, W, dtype=torch.float64, requires_grad=True)
    y = fft_crop_oracle(x, (h, w), torch.zeros(3), std)
    (ref,) = torch.autograd.grad(y, x, grad.double())
    dx = fft_crop_backward_tensorcore(grad, (H, W), std)
    assert dx.shape == (2, 3, H, W) and dx.dtype == dtype
    assert rel_err(dx, ref) < TOL[dtype]


# (N, C, H, W, h, w, dtype, tf32_single_pass, adjoint): several 64-column blocks with a
# partial last fragment (w = 130), H not a multiple of 32, rank-one terms, affine.
WALKS = [
    (1, 2, 40, 36, 20, 18, torch.float32, False, False),
    (1, 1, 72, 150, 40, 130, torch.float32, False, False),
    (1, 1, 72, 150, 40, 130, torch.float32, True, False),
    (1, 2, 31, 37, 16, 20, torch.uint8, False, False),
    (1, 2, 31, 37, 16, 20, torch.uint8, True, False),
    (2, 1, 33, 70, 17, 66, torch.float16, False, False),
    (1, 2, 40, 36, 20, 18, torch.bfloat16, False, False),
    (1, 2, 30, 34, 16, 20, torch.float32, False, True),
]


@pytest.mark.parametrize("walk", WALKS, ids=lambda w: "x".join(map(str, w[:6])) + f"-{w[6]}-{w[7]}-{w[8]}")
def test_kernel_walk_equals_the_emulation_bit_for_bit(walk):
    # The literal block/warp/fragment walk of the kernel (NaN-filled shared memory,
    # the kernel's offsets and bounds) against the vectorised emulation.
    n, c, H, W, h, w, dtype, single, adjoint = walk
    g = torch.Generator().manual_seed(H * W)
    x = torch.randn(n, c, *((h, w) if adjoint else (H, W)), generator=g)
    x = (x * 40 + 128).clamp(0, 255).to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    if adjoint:  # the backward: grad (h, w) -> (H, W) through the transposed crop matrices
        rows, cols = tc._axis32(H, h, True), tc._axis32(W, w, True)
    else:
        rows, cols = tc._axis32(H, h, False), tc._axis32(W, w, False)
    scale, shift = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    out = torch.float32 if dtype == torch.uint8 else dtype
    emulated = tc.apply_tensorcore(x, rows, cols, scale, shift, out, single)
    walked = tc.kernel_walk(x, rows, cols, scale, shift, out, single)
    assert not walked.isnan().any()
    assert torch.equal(walked, emulated)


def test_outside_the_fused_limits_is_refused():
    x = torch.zeros(1, 1, FUSED_MAX_ROWS + 1, 8)
    with pytest.raises(ValueError, match="x: H=257"):
        fft_crop_tensorcore(x, (8, 8))
    with pytest.raises(TypeError, match="x: "):
        fft_crop_tensorcore(torch.zeros(1, 1, 8, 8, dtype=torch.float64), (4, 4))


# ---- compile check (nvcc + cuobjdump, no GPU) ----

def _load_check_compile():
    spec = importlib.util.spec_from_file_location("check_compile", CHECK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tools_present() -> bool:
    if not CHECK.exists():  # e.g. an sdist: MANIFEST.in ships only the sources of csrc/
        return False
    mod = _load_check_compile()
    return mod.find_tool("nvcc") is not None and mod.find_tool("cuobjdump") is not None


needs_nvcc = pytest.mark.skipif(not _tools_present(), reason="needs nvcc and cuobjdump")


@needs_nvcc
def test_cuda_kernels_compile_onto_tensor_cores_without_spills(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(CHECK), "--arch", "90", "80", "--build-dir", str(tmp_path),
                           "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    tc = [r for r in rows if r["source"] == "fft_crop_tc_kernel.cu"]
    # 6 instantiations (fp32 1/3 TF32 passes, uint8 fp16-split/1 TF32 pass, fp16, bf16) per architecture
    assert sorted({r["arch"] for r in tc}) == [80, 90] and len(tc) == 12
    assert all(r["hmma"] > 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in tc)
    # __launch_bounds__(256, 2): two blocks per SM need <= 128 registers
    assert all(r["registers"] <= 128 for r in tc)
    simt = [r for r in rows if r["source"] == "fft_crop_kernel.cu"]
    assert simt and all(r["ok"] for r in simt)


@pytest.mark.skipif(not CHECK.exists(), reason="csrc/cuda/check_compile.py not in this tree")
def test_check_compile_parsers_on_recorded_output():
    mod = _load_check_compile()
    log = (
        "ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kPf\n"
        "    8 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 48 registers, used 1 barriers, 8704 bytes smem\n"
    )
    assert mod.parse_ptxas(log) == {"_Z1kPf": {"registers": 48, "stack": 8, "spill_stores": 8,
                                               "spill_loads": 12, "smem": 8704}}
    sass = (
        "\tFunction : _Z1kPf\n"
        "        /*0100*/                   HMMA.16816.F32.BF16 R16, R4, R8, R16 ;  /* 0x... */\n"
        "        /*0110*/              @P0 HMMA.1684.F32.TF32 R20, R4, R8, R20 ;\n"
        "        /*0120*/                   FFMA R1, R2, R3, R1 ;\n"
    )
    assert mod.count_tensor_core_ops(sass) == {"_Z1kPf": {"HGMMA": 0, "HMMA": 2}}


def test_toward_zero_rounding_and_its_bracket():
    x = torch.tensor([1.0 + 2.0 ** -30, -(1.0 + 2.0 ** -30), 1.0 - 2.0 ** -40, 3.0], dtype=torch.float64)
    got = tc.to_float32_toward_zero(x)
    assert got.tolist() == [1.0, -1.0, 1.0 - 2.0 ** -24, 3.0]  # nearest would give 1, -1, 1, 3
    xs = _x((2, 3, 64, 48), torch.float32, seed=8)
    nearest = fft_crop_tensorcore(xs, (32, 40))
    toward_zero = fft_crop_tensorcore(xs, (32, 40), accumulate="toward_zero")
    ref = fft_crop_oracle(xs, (32, 40))
    # truncation biases every accumulation step: clearly further from the oracle than nearest
    assert rel_err(toward_zero, ref) > 3 * rel_err(nearest, ref)
    assert rel_err(toward_zero, ref) < TOL[torch.float32]
    with pytest.raises(ValueError, match="accumulate"):
        fft_crop_tensorcore(xs, (32, 40), accumulate="up")


def _distance_and_bound(y, emulate):
    """(distance of the kernel's output y from the round-to-nearest emulation, its bound).
    On the H200 that distance was 0.7-1.0x the round-toward-zero emulation's distance from
    round-to-nearest (1.4e-6..1.2e-5); bound = max(1e-6, 1.5x it).  A wrong tile, pass
    order or operand split is off by orders of magnitude more."""
    nearest, toward_zero = emulate("nearest"), emulate("toward_zero")
    return rel_err(y, nearest), max(1e-6, 1.5 * rel_err(toward_zero, nearest))


# ---- on a GPU (skip here) ----

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_kernel_matches_emulation_and_oracle(shape, dtype):
    from effkern.ops import fft_crop

    x = _x(shape, dtype, seed=sum(shape))
    h, w = shape[4:]
    y = fft_crop(x.cuda(), (h, w)).cpu()
    assert rel_err(y, fft_crop_oracle(x, (h, w))) < TOL[dtype]
    # the kernel and its emulation differ only by the hardware's accumulation rounding
    if dtype == torch.float32:
        distance, bound = _distance_and_bound(y, lambda acc: fft_crop_tensorcore(x, (h, w), accumulate=acc))
        assert distance < bound, (distance, bound)
    else:
        assert rel_err(y, fft_crop_tensorcore(x, (h, w))) < 5e-3


@requires_cuda
def test_cuda_large_call_falls_back_and_uint8_fuses():
    from effkern.ops import fft_crop

    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 2, FUSED_MAX_ROWS + 44, 64, generator=g)  # H > 256: SIMT fallback
    assert rel_err(fft_crop(x.cuda(), (160, 48)).cpu(), fft_crop_oracle(x, (160, 48))) < 1e-5
    xu = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8, generator=g)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    y = fft_crop(xu.cuda(), (160, 160), mean.cuda(), std.cuda()).cpu()
    assert rel_err(y, fft_crop_oracle(xu, (160, 160), mean, std)) < 1e-5
    distance, bound = _distance_and_bound(
        y[:1], lambda acc: fft_crop_tensorcore(xu[:1], (160, 160), mean, std, accumulate=acc))
    assert distance < bound, (distance, bound)


@requires_cuda
def test_cuda_tf32_precision_selects_one_pass():
    from effkern.ops import fft_crop

    x = _x((2, 3, 64, 48), torch.float32, seed=8)
    ref = fft_crop_oracle(x, (32, 40))
    saved = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        y1 = fft_crop(x.cuda(), (32, 40)).cpu()
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved
    assert 1e-5 < rel_err(y1, ref) < 2e-3
    distance, bound = _distance_and_bound(
        y1, lambda acc: fft_crop_tensorcore(x, (32, 40), tf32_single_pass=True, accumulate=acc))
    assert distance < bound, (distance, bound)
