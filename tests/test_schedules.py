"""effkern.schedules: stages, presets, JSON, cost model, LR / momentum (CPU, fast)."""

import math

import pytest
import torch

from effkern.schedules import (PRESETS, Calibration, ModelCfg, Schedule, Stage, ViewSpec,
                               calibrate, default_views_fn, describe, forward_flops, get_schedule,
                               lr_at, momentum_at, predicted_speedup, step_cost, tokens,
                               unit_flops, view_cost)

# ---------------------------------------------------------------------------- Stage


def test_keep_for_rules():
    s = Stage(keep=(("q", 0.5), ("k", 0.25)))
    assert s.keep_for("q") == 0.5 and s.keep_for("k") == 0.25
    assert s.keep_for("student") == 1.0                      # no default: 1.0
    s = Stage(keep=(("q", 0.5), ("default", 0.75)))
    assert s.keep_for("q") == 0.5 and s.keep_for("k") == 0.75
    assert Stage().keep_for("anything") == 1.0


@pytest.mark.parametrize("kw", [{"keep": (("q", 0.0),)}, {"keep": (("q", 1.5),)}, {"patch_size": 0},
                                {"resolution": 0.0}, {"randaug_magnitude": -1},
                                {"keep": (("q", 0.5), ("q", 0.5))}])
def test_stage_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        Stage(**kw)


def test_schedule_validation_and_at():
    a, b = Stage(name="a"), Stage(patch_size=32, name="b")
    sch = Schedule("x", [(0.0, a), (0.5, b)])
    assert sch.at(-1) is a and sch.at(0.0) is a and sch.at(0.4999) is a
    assert sch.at(0.5) is b and sch.at(1.0) is b and sch.at(7) is b
    for bad in ([], [(0.1, a)], [(0.0, a), (0.0, b)], [(0.0, a), (1.0, b)], [(0.0, a), (0.6, b), (0.5, a)]):
        with pytest.raises(ValueError):
            Schedule("bad", bad)


# ---------------------------------------------------------------------------- presets


def test_none_and_const():
    st = get_schedule("none").at(0.3)
    assert (st.patch_size, st.keep, st.resolution, st.randaug_magnitude) == (None, (), 1.0, None)
    sch = get_schedule("const:patch=32,keep=0.5,keep_q=0.25,keep_k=0.75")
    assert len(sch.stages) == 1
    st = sch.at(0.9)
    assert st.patch_size == 32 and st.keep_for("q") == 0.25 and st.keep_for("k") == 0.75
    assert st.keep_for("teacher") == 0.5
    assert get_schedule("const:keep=0.5").at(0).patch_size is None
    assert get_schedule("const:patch=8").at(0).keep_for("q") == 1.0


# (progress, bandwidth px, magnitude), from the ET++ rules
ETPP = [(0.0, 96, 0), (0.099, 96, 0), (0.1, 96, 1), (0.199, 96, 1), (0.2, 160, 2), (0.59, 160, 5),
        (0.6, 224, 6), (0.95, 224, 9), (1.0, 224, 9)]


@pytest.mark.parametrize("p,px,m", ETPP)
def test_efficienttrain_pp(p, px, m):
    st = get_schedule("efficienttrain++").at(p)
    assert st.randaug_magnitude == m == min(max(math.floor(10 * p), 0), 9)
    assert st.resolution == pytest.approx(px / 224, abs=0)
    assert round(224 * st.resolution) == px
    assert st.patch_size is None and st.keep == ()


def test_efficienttrain_pp_stages():
    sch = get_schedule("efficienttrain++")
    assert [s for s, _ in sch.stages] == [i / 10 for i in range(10)]
    assert [st.randaug_magnitude for _, st in sch.stages] == list(range(10))
    assert [round(224 * st.resolution) for _, st in sch.stages] == [96] * 2 + [160] * 4 + [224] * 4


def test_json_round_trip_and_file(tmp_path):
    sch = Schedule("mine", [(0.0, Stage(patch_size=32, keep=(("q", 0.5), ("default", 0.25)),
                                        resolution=0.5, randaug_magnitude=3, name="s0")),
                            (0.25, Stage(name="s1"))])
    text = sch.to_json()
    back = Schedule.from_json(text)
    assert back == sch and back.to_json() == text
    assert back.at(0.1).keep_for("k") == 0.25
    path = tmp_path / "s.json"
    path.write_text(text)
    assert get_schedule(f"file:{path}") == sch
    etpp = get_schedule("efficienttrain++")
    assert Schedule.from_json(etpp.to_json()) == etpp


@pytest.mark.parametrize("spec", ["bogus", "efficienttrain", "", "fixed:patch=8"])
def test_unknown_spec_lists_valid_names(spec):
    with pytest.raises(ValueError) as e:
        get_schedule(spec)
    for name in ("none", "const:", "efficienttrain++", "aaip-mocov3", "aaip-simclr", "aaip-dino", "file:PATH"):
        assert name in str(e.value)
    assert PRESETS == ("none", "const:...", "efficienttrain++", "aaip-dino", "aaip-mocov3", "aaip-simclr",
                       "file:PATH")


@pytest.mark.parametrize("spec,param", [("const:keep=0", "keep"), ("const:keep=1.5", "keep"),
                                        ("const:keep=abc", "keep"), ("const:keep_q=0", "keep_q"),
                                        ("const:patch=0", "patch"), ("const:patch=1.5", "patch"),
                                        ("const:patch", "patch"), ("const:foo=1", "foo")])
def test_bad_const_params(spec, param):
    with pytest.raises(ValueError, match=param):
        get_schedule(spec)


# ---------------------------------------------------------------------------- cost model

TINY = ModelCfg(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=3.0,
                num_prefix_tokens=2, in_chans=3)


def _slow_count(cfg, res, p, keep):
    """Independent count: sum 2*m*k*n over every matmul of the forward."""
    n = max(1, int((res // p) ** 2 * keep))
    L, D = n + cfg.num_prefix_tokens, cfg.embed_dim
    hd = D // cfg.num_heads
    hidden = int(cfg.mlp_ratio * D)
    mm = lambda m, k, n_: 2 * m * k * n_  # noqa: E731
    total = mm(n, cfg.in_chans * p * p, D)                      # patch embedding as a matmul
    for _ in range(cfg.depth):
        total += mm(L, D, 3 * D)                                # qkv
        for _h in range(cfg.num_heads):
            total += mm(L, hd, L) + mm(L, L, hd)                # q k^T, attn v
        total += mm(L, D, D)                                    # proj
        total += mm(L, D, hidden) + mm(L, hidden, D)            # fc1, fc2
    return total


@pytest.mark.parametrize("res,p,keep", [(32, 8, 1.0), (32, 8, 0.5), (32, 4, 0.3), (24, 8, 1.0), (32, 16, 0.01)])
def test_forward_flops_vs_explicit_count(res, p, keep):
    assert forward_flops(TINY, res, p, keep) == _slow_count(TINY, res, p, keep)


def test_tokens_rule():
    assert tokens(TINY, 32, 8, 1.0) == 16 + 2
    assert tokens(TINY, 32, 8, 0.5) == 8 + 2
    assert tokens(TINY, 32, 8, 0.01) == 1 + 2                  # max(1, ...)
    assert tokens(TINY, 35, 8, 1.0) == 16 + 2                  # floor(res / p)


def test_forward_flops_vs_torch_flop_counter():
    timm = pytest.importorskip("timm")
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=1,
                              num_classes=0).eval()
    for blk in model.blocks:
        blk.attn.fused_attn = False                             # explicit q @ k^T, attn @ v: counted
    cfg = ModelCfg.from_timm(model)
    assert cfg == ModelCfg(64, 16, 192, 1, 3, 4.0, 1, 3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    measured = fc.get_total_flops() / 2
    assert measured == pytest.approx(forward_flops(cfg, 64, 16, 1.0), rel=0.05)
    assert unit_flops(cfg) == forward_flops(cfg, 64, 16, 1.0)


def test_view_and_step_cost():
    native = ViewSpec(32, 8, 1.0, grad=False)
    assert view_cost(TINY, native) == 1.0
    assert view_cost(TINY, ViewSpec(32, 8, 1.0, grad=True)) == 3.0
    assert view_cost(TINY, ViewSpec(32, 8, 0.5, grad=False)) < 1.0
    assert view_cost(TINY, ViewSpec(32, 16, 1.0, grad=False)) < 1.0
    v = ViewSpec(32, 8, 0.5, grad=True)
    assert view_cost(TINY, v) == pytest.approx(3 * view_cost(TINY, ViewSpec(32, 8, 0.5, grad=False)))
    assert step_cost(TINY, [v, native], batch=4) == pytest.approx(4 * (view_cost(TINY, v) + 1.0))


def test_predicted_speedup_and_describe():
    assert predicted_speedup(TINY, get_schedule("none")) == pytest.approx(1.0)
    half = get_schedule("const:keep=0.5")
    assert predicted_speedup(TINY, half) == pytest.approx(1 / view_cost(TINY, ViewSpec(32, 8, 0.5, False)))
    # integrating over progress: half the budget native, half at keep 0.5
    mix = Schedule("mix", [(0.0, Stage()), (0.5, Stage(keep=(("default", 0.5),)))])
    c = view_cost(TINY, ViewSpec(32, 8, 0.5, False))
    assert predicted_speedup(TINY, mix) == pytest.approx(1 / (0.5 + 0.5 * c))
    # a two-branch views_fn (MoCo-like: q trained, k momentum forward only)

    def moco(stage):
        p = stage.patch_size or TINY.patch_size
        return [ViewSpec(32, p, stage.keep_for("q"), True), ViewSpec(32, p, stage.keep_for("k"), False)]

    sch = get_schedule("const:keep_q=0.5,keep_k=0.25")
    expect = 4.0 / (3 * view_cost(TINY, ViewSpec(32, 8, 0.5, False)) + view_cost(TINY, ViewSpec(32, 8, 0.25, False)))
    assert predicted_speedup(TINY, sch, moco, batch=8) == pytest.approx(expect)
    text = describe(get_schedule("efficienttrain++"), ModelCfg(224, 16, 384, 12, 6), default_views_fn(
        ModelCfg(224, 16, 384, 12, 6)))
    assert "96px" in text and "160px" in text and "speedup" in text
    assert len([ln for ln in text.splitlines() if ln[:1].isdigit()]) == 10


def test_calibrate_tiny_cpu(tmp_path):
    timm = pytest.importorskip("timm")
    import effkern.timm as ek

    model = ek.patch(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1,
                                       num_classes=4))
    out = calibrate(model, "cpu", [(32, 16, 1.0), (32, 16, 0.5)], repeat=1, batch=2)
    assert out["r32_p16_k1"] == 1.0 and out["r32_p16_k0.5"] > 0
    cal = Calibration("cpu", out)
    cal.save(tmp_path / "cal.json")
    back = Calibration.load(tmp_path / "cal.json")
    assert back == cal and back.factor(32, 16, 0.5) == out["r32_p16_k0.5"] and back.factor(1, 1, 1) == 1.0


# ---------------------------------------------------------------------------- lr / momentum


def test_lr_warmup_cosine_poly():
    assert lr_at(0.0, 1.0, warmup=0.1) == 0.0
    assert lr_at(0.05, 1.0, warmup=0.1) == pytest.approx(0.5)
    assert lr_at(0.1, 1.0, warmup=0.1) == pytest.approx(1.0)
    assert lr_at(0.55, 1.0, warmup=0.1) == pytest.approx(0.5)            # cosine midpoint
    assert lr_at(1.0, 1.0, warmup=0.1, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(0.55, 2.0, warmup=0.1, min_lr=0.2) == pytest.approx(1.1)
    assert lr_at(0.25, 1.0, warmup=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(0.55, 1.0, warmup=0.1, kind="poly") == pytest.approx(0.25)
    assert lr_at(0.5, 1.0, warmup=0.0, min_lr=0.2, kind="poly") == pytest.approx(0.2 + 0.8 * 0.25)
    assert lr_at(1.0, 1.0, kind="poly") == 0.0
    assert lr_at(2.0, 1.0) == lr_at(1.0, 1.0) and lr_at(-1, 1.0) == 0.0
    with pytest.raises(ValueError, match="cosine"):
        lr_at(0.5, 1.0, kind="step")


def test_momentum_at():
    assert momentum_at(0.0, 0.99) == pytest.approx(0.99)
    assert momentum_at(1.0, 0.99) == pytest.approx(1.0)
    assert momentum_at(0.5, 0.99) == pytest.approx(0.995)
    assert momentum_at(1.0, 0.996, end=0.999) == pytest.approx(0.999)
