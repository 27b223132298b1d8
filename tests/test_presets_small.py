"""Defaults that learn at small scale: augmentation presets by resolution and channel count,
the LR rule, step-relative LR / momentum schedules, the small-image model preset, the
validation split, and the cost model's head FLOPs (checked against torch's FlopCounterMode)."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import effkern.timm
from effkern.schedules import ModelCfg, Stage, view_cost
from effkern.schedules.cost import linear_flops, unit_flops
from effkern.schedules.lr import lr_at_step, peak_lr, warmup_steps
from effkern.train.augment import SSLView, SupervisedView, augment_preset, view_transforms
from effkern.train.config import SMALL_IMAGE_MODEL, model_for
from effkern.train.data import carve_validation, load_dataset
from effkern.train.methods import build_method
from effkern.train.methods.base import ViewPlan, run_momentum_start


# ----------------------------------------------------------------------------- augmentation presets
def test_auto_preset_switches_by_base_size_and_channels():
    small = augment_preset("auto", 28, 1)
    assert small.name == "small" and small.global_scale == (0.3, 1.0)
    assert not small.solarize and not small.blur and not small.color
    assert augment_preset("auto", 64, 3).name == "small" and augment_preset("auto", 64, 3).color
    paper = augment_preset("auto", 65, 3)
    assert paper.name == "paper" and paper.solarize and paper.blur and paper.global_scale is None
    assert augment_preset("paper", 28, 1).name == "paper"
    with pytest.raises(ValueError, match="augment preset"):
        augment_preset("tiny", 28, 1)
    with pytest.raises(ValueError, match="channels"):
        augment_preset("auto", 28, 2)


def test_view_transforms_follow_the_preset():
    plan = [ViewPlan("global", 28, "q"), ViewPlan("global", 28, "q")]
    small = view_transforms("mocov3", plan, preset=augment_preset("auto", 28, 1))
    assert all(isinstance(t, SSLView) for t in small)
    assert [t.scale for t in small] == [(0.3, 1.0)] * 2
    assert [t.p_solarize for t in small] == [0.0, 0.0] and [t.p_blur for t in small] == [0.0, 0.0]
    paper = view_transforms("mocov3", plan)  # no preset: the official recipe
    assert [t.scale for t in paper] == [(0.08, 1.0)] * 2 and paper[1].p_solarize == 0.2
    dino = view_transforms("dino", plan + [ViewPlan("local", 12, "local")], preset=augment_preset("small"))
    assert dino[0].scale == (0.4, 1.0) and dino[2].scale == (0.1, 0.4)  # DINO keeps its larger global crop
    sup = view_transforms("supervised", plan[:1], preset=augment_preset("small"))
    assert isinstance(sup[0], SupervisedView) and sup[0].scale == (0.3, 1.0)


def test_one_channel_preset_never_touches_saturation_or_gray():
    """On replicated grayscale the colour-off view keeps the 3 channels equal and its
    random stream has the same layout as the colour-on view (same crop and flip)."""
    img = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8).expand(3, -1, -1).contiguous()
    on = SSLView(28, scale=(0.3, 1.0), p_jitter=1.0, p_gray=1.0, p_blur=0.0, color=True)
    off = SSLView(28, scale=(0.3, 1.0), p_jitter=1.0, p_gray=1.0, p_blur=0.0, color=False)
    a = off(img, torch.Generator().manual_seed(3))
    b = on(img, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], a[1]) and torch.equal(a[1], a[2])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    off(img, g1)
    on(img, g2)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))  # same draws consumed
    assert a.shape == b.shape == (3, 28, 28)


# ----------------------------------------------------------------------------- LR rule
def test_peak_lr_rules():
    assert peak_lr(2e-3, 256, "sqrt") == pytest.approx(2e-3)
    assert peak_lr(2e-3, 128, "sqrt") == pytest.approx(2e-3 / math.sqrt(2))
    assert peak_lr(2e-3, 64, "linear") == pytest.approx(5e-4)
    assert peak_lr(2e-3, 64, "none") == 2e-3
    # the default (lr 2e-3, sqrt) at batch 128 is the peak that trained MoCo v3 at 28 px (~1.5e-3)
    assert 1.2e-3 < peak_lr(2e-3, 128) < 1.6e-3
    for bad in (dict(rule="cube"), dict(lr=0.0), dict(batch_size=0)):
        kw = {"lr": 1e-3, "batch_size": 64, "rule": "sqrt", **bad}
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            peak_lr(**kw)


def test_lr_at_step_warmup_is_a_fraction_of_steps_and_never_zero():
    total = 200
    assert warmup_steps(total, 0.1) == 20 and warmup_steps(5, 0.1) == 1 and warmup_steps(100, 0.0) == 0
    lrs = [lr_at_step(s, total, 1.0, warmup=0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(1 / 20)  # the first step already trains
    assert lrs[19] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert all(b > a for a, b in zip(lrs[:20], lrs[1:20]))  # warm-up increasing
    assert all(b <= a for a, b in zip(lrs[20:], lrs[21:]))  # decay non-increasing
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    mid = 20 + (total - 1 - 20) / 2
    assert lr_at_step(int(mid), total, 1.0, warmup=0.1) == pytest.approx(0.5, abs=0.01)
    assert lr_at_step(total + 5, total, 1.0, warmup=0.1, min_lr=0.1) == pytest.approx(0.1)
    # the same fraction of a 10x longer run warms up over 10x the steps
    assert lr_at_step(99, 2000, 1.0, warmup=0.1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="total_steps"):
        lr_at_step(0, 0, 1.0)
    with pytest.raises(ValueError, match="warmup"):
        lr_at_step(0, 10, 1.0, warmup=1.0)


# ----------------------------------------------------------------------------- step-relative momentum
def test_ema_start_momentum_is_capped_by_the_run_length():
    assert run_momentum_start(0.99, 1500, 0.05) == pytest.approx(1 - 1 / 75)
    assert run_momentum_start(0.99, 100_000, 0.05) == 0.99  # the papers' runs: the cap never binds
    assert run_momentum_start(0.99, 10, 0.05) == 0.0          # horizon < 1 step: plain copy
    assert run_momentum_start(0.99, None, 0.05) == 0.99
    with pytest.raises(ValueError, match="ema_horizon"):
        run_momentum_start(0.99, 100, 0.0)


def test_method_momentum_follows_the_run_steps():
    enc = effkern.timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=1,
                                    embed_dim=64, num_heads=2)
    moco = build_method("mocov3", enc, mlp_dim=32, out_dim=16)
    assert moco.momentum_at(0.0) == pytest.approx(0.99)
    moco.set_run_steps(400)
    assert moco.momentum_at(0.0) == pytest.approx(1 - 1 / 20)
    assert moco.momentum_at(1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="total_steps"):
        moco.set_run_steps(0)


def test_loop_runs_its_planned_steps_and_uses_step_fractions(tmp_path):
    from effkern.train.config import TrainConfig
    from effkern.train.loop import Run

    cfg = TrainConfig(method="mocov3", model_kwargs={"depth": 1, "embed_dim": 64, "num_heads": 2},
                      method_kwargs={"mlp_dim": 32, "out_dim": 16}, data="digits", base_size=16, limit_train=256,
                      limit_test=64, epochs_equivalent=2.0, schedule="const:keep=0.5", batch_size=32,
                      out_dir=str(tmp_path / "r"), progress_bar=False)
    run = Run(cfg)
    assert run.model_cfg.patch_size == 4 and run.model_cfg.depth == 1  # preset, overridden by model_kwargs
    assert run.method.total_steps == run.total_steps > 16  # keep 0.5: more steps than 2 epochs of batches
    summary = run.train()
    assert summary["steps"] == summary["planned_steps"] == run.total_steps
    assert summary["peak_lr"] == pytest.approx(peak_lr(cfg.lr, 32))


# ----------------------------------------------------------------------------- model preset, validation split
def test_small_image_model_preset():
    assert model_for(None, 28) == SMALL_IMAGE_MODEL[0:1] + (SMALL_IMAGE_MODEL[1],)
    name, kw = model_for(None, 64, {"depth": 6})
    assert kw["patch_size"] == 4 and kw["depth"] == 6 and kw["embed_dim"] == 128
    assert model_for(None, 224) == ("vit_tiny_patch16_224", {})
    assert model_for("vit_small_patch16_224", 28, {"depth": 2}) == ("vit_small_patch16_224", {"depth": 2})
    enc = effkern.timm.create_model(name, pretrained=False, img_size=28, **model_for(None, 28)[1])
    assert ModelCfg.from_timm(enc).patch_size == 4 and (28 // 4) ** 2 == 49


def test_validation_split_is_carved_from_train_with_a_fixed_seed():
    val, rest = carve_validation(100, 10)
    assert len(val) == 10 and len(rest) == 90 and not set(val.tolist()) & set(rest.tolist())
    assert torch.equal(carve_validation(100, 10)[0], val)
    assert carve_validation(100, 0) is None
    with pytest.raises(ValueError, match="val_split"):
        carve_validation(100, 100)
    full = load_dataset("digits", 8, seed=0)
    d0 = load_dataset("digits", 8, seed=0, val_split=200)
    d1 = load_dataset("digits", 8, seed=0, val_split=200, limit_train=300)
    assert len(d0.test_labels) == 200 and len(d0.train_labels) == len(full.train_labels) - 200
    assert torch.equal(d0.test_images, d1.test_images)  # carved before limit_train: the same images
    val, rest = carve_validation(len(full.train_labels), 200)
    assert torch.equal(d0.test_images, full.train_images[val]) and torch.equal(d0.train_labels, full.train_labels[rest])
    assert d0.channels == 1 and d0.name.endswith("/val200")


# ----------------------------------------------------------------------------- head FLOPs
def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("method,kwargs", [("mocov3", {"mlp_dim": 96, "out_dim": 32}),
                                           ("simclr", {"hidden_dim": 96, "out_dim": 32}),
                                           ("dino", {"out_dim": 200, "hidden_dim": 96, "bottleneck_dim": 24,
                                                     "n_local": 2}),
                                           ("supervised", {})])
def test_head_flops_match_torch_flop_counter(method, kwargs):
    torch.manual_seed(0)
    enc = effkern.timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=1,
                                    embed_dim=64, num_heads=2, num_classes=10)
    m = build_method(method, enc, **kwargs).eval()
    B = 8
    f = torch.randn(B, 64)
    trained = {"mocov3": lambda: m.predictor(m.projector(f)), "simclr": lambda: m.projector(f),
               "dino": lambda: m.head(f), "supervised": lambda: enc.head(f)}[method]
    with torch.no_grad():
        assert m.head_flops(True) * B == _flops(trained)
        if method == "mocov3":
            assert m.head_flops(False) * B == _flops(lambda: m.momentum_projector(f))
        if method == "dino":
            assert m.head_flops(False) * B == _flops(lambda: m.teacher_head(f))


def test_cost_model_charges_the_heads():
    """MoCo v3 with the paper's 4096-wide heads on a 4-block ViT at 28 px: the heads are a
    visible part of a step, and token dropout cannot shrink them."""
    enc = effkern.timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, depth=4)
    moco = build_method("mocov3", enc)
    cfg = ModelCfg.from_timm(enc)
    full = sum(view_cost(cfg, v) for v in moco.view_specs(28, Stage(), cfg.patch_size))
    heads = (2 * 3 * moco.head_flops(True) + 2 * moco.head_flops(False)) / unit_flops(cfg)
    assert full == pytest.approx(2 * 3 + 2 + heads, rel=1e-12)
    assert heads / full > 0.1
    quarter = Stage(keep=(("default", 0.25),))
    cheap = sum(view_cost(cfg, v) for v in moco.view_specs(28, quarter, cfg.patch_size))
    encoder_only = sum(view_cost(cfg, v.__class__(v.resolution, v.patch_size, v.keep, v.grad))
                       for v in moco.view_specs(28, quarter, cfg.patch_size))
    assert cheap - encoder_only == pytest.approx(heads, rel=1e-12)
    assert full / cheap < (2 * 3 + 2) / encoder_only  # the heads cut the predicted speedup
    assert linear_flops(moco.projector) == 2 * (192 * 4096 + 4096 * 4096 + 4096 * 256)
