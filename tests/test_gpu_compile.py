"""The GPU compile check without a GPU (effkern.tools.gpu_compile, `effkern doctor
--compile-gpu`): one representative config per kernel per architecture compiles for
sm_90 and sm_80 through Triton + ptxas with no spill, within shared memory and on
tensor cores (wgmma on sm_90); the check catches a mma.sync tile on Hopper and a
spilling tile; every per-architecture autotune list is non-empty and wgmma-shaped.

The full sweep (every config x workload) is `effkern doctor --compile-gpu --scope full`;
its table is committed under benchmarks/results/gpu_compile_full.md.
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")

from effkern.backend import triton_interpret  # noqa: E402

pytestmark = pytest.mark.skipif(triton_interpret(), reason="the interpreter does not compile (unset TRITON_INTERPRET)")


def _ptxas_present() -> bool:
    try:
        from triton import knobs

        return os.path.exists(knobs.nvidia.ptxas.path)
    except Exception:
        return False


needs_ptxas = pytest.mark.skipif(not _ptxas_present(), reason="triton's bundled ptxas is missing")


@pytest.fixture(scope="module")
def gc():
    from effkern.tools import gpu_compile

    return gpu_compile


@pytest.fixture(scope="module")
def ci_results(gc):
    return gc.sweep("ci", archs=(90, 80))


@needs_ptxas
def test_ci_scope_compiles_every_kernel_for_both_archs(gc, ci_results):
    kernels = set(gc.discover())
    assert {"varlen_attention._fwd_kernel", "varlen_attention._bwd_dkdv_kernel", "varlen_attention._bwd_dq_kernel",
            "varlen_attention._bwd_preprocess_kernel", "patch_embed._patch_embed_fwd_kernel",
            "patch_embed._patch_embed_dw_kernel"} <= kernels
    assert {(r.kernel, r.arch) for r in ci_results} == {(k, a) for k in kernels for a in (90, 80)}
    failed = [(r.kernel, r.arch, r.config, r.problems, r.error) for r in ci_results if not r.passed]
    assert not failed
    for r in ci_results:
        assert r.registers and r.registers <= 255 and r.spill_bytes == 0
        assert 0 <= r.shared_bytes <= gc.ARCHS[r.arch]["shared_limit"]


@needs_ptxas
def test_ci_scope_lowering_is_wgmma_on_hopper_and_mma_on_ampere(ci_results):
    by = {(r.kernel.split(".")[-1], r.arch): r for r in ci_results}
    # tl.dot calls in each kernel's source; the compiler may duplicate a dot (Triton 3.8
    # pipelines the patch-embedding K loop for sm_80 into 4 copies), never drop one,
    # and every copy must be on the architecture's tensor-core instruction
    dots = {"_fwd_kernel": 2, "_bwd_dkdv_kernel": 4, "_bwd_dq_kernel": 3,
            "_patch_embed_fwd_kernel": 1, "_patch_embed_dw_kernel": 1}
    for name, n in dots.items():
        for arch, kind in ((90, "wgmma"), (80, "mma.sync")):
            r = by[(name, arch)]
            assert set(r.dots) == {kind} and r.dots[kind] >= n, (arch, r.dot_detail)
        assert by[(name, 90)].ptx["wgmma.mma_async"] > 0 and by[(name, 80)].ptx["mma.sync"] > 0
    assert by[("_bwd_preprocess_kernel", 90)].dots == {}


@needs_ptxas
def test_check_flags_a_mma_sync_tile_on_hopper_and_a_spilling_tile(gc):
    from effkern.kernels._autotune import config

    launches = gc.record_launches(gc.discover(), "ci")  # bf16, head_dim 64, ViT-B lengths
    fwd = next(x for x in launches if x.kernel == "varlen_attention._fwd_kernel")
    small = gc.compile_one(fwd, config(num_warps=4, num_stages=2, BLOCK_M=32, BLOCK_N=32), 90)
    assert small.ok and not small.passed and small.dots == {"mma.sync": 2}
    assert any("not wgmma" in p for p in small.problems)
    assert gc.compile_one(fwd, config(num_warps=4, num_stages=2, BLOCK_M=32, BLOCK_N=32), 80).passed
    dkdv = next(x for x in launches if x.kernel == "varlen_attention._bwd_dkdv_kernel")
    spills = gc.compile_one(dkdv, config(num_warps=4, num_stages=2, BLOCK_M=64, BLOCK_N=128), 90)
    assert spills.ok and spills.spill_bytes > 0 and any(p.startswith("spills") for p in spills.problems)


def test_autotune_lists_cover_every_head_dim_and_are_wgmma_shaped_on_hopper():
    import torch

    from effkern.kernels import patch_embed as pe
    from effkern.kernels import varlen_attention as va

    for arch in (90, 80, 89):
        for prec in (None, "ieee"):
            for d in sorted({va.block_d(h) for h in va.SUPPORTED_HEAD_DIMS}):
                args = {"BLOCK_D": d, "DOT_PREC": prec}
                for kernel, row in ((va._fwd_kernel, "BLOCK_M"), (va._bwd_dq_kernel, "BLOCK_M"),
                                    (va._bwd_dkdv_kernel, "BLOCK_N")):
                    found = kernel.candidates(arch, args)
                    assert found, (kernel.fn.__name__, arch, prec, d)
                    if arch == 90 and prec is None:  # the dot's M dimension: a wgmma needs >= 64
                        assert all(c.kwargs[row] >= 64 for c in found), (kernel.fn.__name__, d)
        for dtype, precision in ((torch.bfloat16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32")):
            args = {"img_ptr": torch.empty(0, dtype=dtype), "PRECISION": precision}
            fwd = pe._patch_embed_fwd_kernel.candidates(arch, args)
            dw = pe._patch_embed_dw_kernel.candidates(arch, args)
            assert fwd and dw
            if arch == 90 and (dtype != torch.float32 or precision == "tf32"):
                assert all(c.kwargs["BLOCK_M"] >= 64 for c in fwd) and all(c.kwargs["BLOCK_N"] >= 64 for c in dw)


def test_doctor_rejects_an_unknown_arch_or_kernel_with_exit_2(capsys):
    from effkern.cli import main

    assert main(["doctor", "--compile-gpu", "--arch", "70", "--quiet"]) == 2
    assert "--arch" in capsys.readouterr().err
    assert main(["doctor", "--compile-gpu", "--kernels", "_no_such_kernel", "--quiet"]) == 2
    assert "--kernels" in capsys.readouterr().err
