"""Smoke test of an INSTALLED effkern, run by ``./dev package-test`` in a fresh venv from
outside the source tree (not collected by pytest):

  python package_smoke.py [--torch VERSION] [--train]

Checks: torch is still VERSION (what the extension was built against: installing an
extra must not have upgraded it); the compiled CPU kernels load; fft_crop, varlen_attention and patch_embed on
their compiled / default paths agree with the PyTorch reference backend; the timm
patch keeps timm's native forward and runs the packed one; with --train (the
``train`` extra installed), a 10-step ``effkern train`` through the console script.
Prints one line per check; exit status 0 only if all pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile


def check_ops() -> None:
    import torch

    import effkern
    from effkern.bench.common import rel_err

    info = effkern.build_info()
    assert info["cpu_kernels"] and info["load_error"] is None, info
    print(f"effkern {info['version']} from {os.path.dirname(effkern.__file__)}, torch {info['torch']}, "
          f"cpu_isa {info['cpu_isa']}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 24, 20, generator=g, dtype=torch.float64)
    with effkern.use_backend("reference"):
        ref = effkern.ops.fft_crop(x, (12, 10))
    err = rel_err(effkern.ops.fft_crop(x, (12, 10)), ref)
    assert err < 1e-12, err
    print(f"ok fft_crop (C++ kernel vs reference): rel err {err:.1e}")
    q, k, v = (torch.randn(7, 2, 32, generator=g) for _ in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    out = effkern.ops.varlen_attention(q, k, v, cu, 4)
    dense = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)).transpose(0, 1)
        for s, e in ((0, 3), (3, 7))])
    err = rel_err(out, dense)
    assert err < 1e-5, err
    print(f"ok varlen_attention vs per-sequence SDPA: rel err {err:.1e}")


def check_timm_patch() -> None:
    import copy

    import timm
    import torch

    import effkern

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2,
                              num_classes=10).eval()
    control = copy.deepcopy(model)
    effkern.timm.patch(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        native, packed = model(x), model(x, keep=0.5)
        assert torch.equal(native, control(x)), "patched native forward differs from timm"
        feats = model.forward_views([x, x[:, :, :16, :16]], patch_sizes=[4, 4], keeps=[0.5, None])
    assert packed.shape == (2, 10) and [tuple(f.shape) for f in feats] == [(2, 192), (2, 192)]
    print("ok timm patch: native forward identical to timm, keep=0.5 and forward_views run")


def check_train() -> None:
    with tempfile.TemporaryDirectory() as out:
        # 320 images / batch 32 = 10 steps of the uncompressed baseline
        script = os.path.join(os.path.dirname(sys.executable), "effkern")  # the installed console script
        cmd = [script, "train", "--data", "digits", "--base-size", "16", "--limit-train", "320",
               "--limit-test", "64", "--batch-size", "32", "--epochs-equivalent", "1", "--no-progress",
               "--model-arg", "depth=1", "--method-arg", "mlp_dim=64", "--method-arg", "out_dim=32",
               "--out", out]
        run = subprocess.run(cmd, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.load(open(os.path.join(out, "summary.json")))
        assert summary["steps"] == 10 and os.path.exists(os.path.join(out, "training.png")), summary
    print(f"ok effkern train: {summary['steps']} steps, kNN top-1 {100 * summary['knn_acc']:.1f}%")


if __name__ == "__main__":
    if "--torch" in sys.argv:
        import torch

        want = sys.argv[sys.argv.index("--torch") + 1]
        assert torch.__version__.split("+")[0] == want, f"torch {torch.__version__}, built against {want}"
    check_ops()
    check_timm_patch()
    if "--train" in sys.argv[1:]:
        check_train()
    print("package smoke test passed")
