"""effkern.train.catalog (the torch-free description ``effkern schedule show`` prints from)
against the real thing: ModelCfg.from_timm of every timm ViT it names and of the
small-image preset (built on the meta device), the methods' DEFAULTS, head FLOPs and
view_specs for every schedule preset, and the CLI's two paths printing the same table."""

import argparse
import subprocess
import sys

import pytest
import torch

import effkern.timm
from effkern.cli_train import _built_shapes, _show_shapes
from effkern.schedules import ModelCfg, Stage, describe, get_schedule
from effkern.schedules.presets import AAIP_PRESETS
from effkern.train import catalog
from effkern.train.config import SMALL_IMAGE_MAX, model_for
from effkern.train.methods import _REGISTRY, METHODS, build_method

# (model, base size): every named ViT at 224 and at a size its patch does not divide,
# and the presets (model None) on both sides of SMALL_IMAGE_MAX
MODELS = ([(name, 224) for name in catalog.VIT_ARCHS] + [(name, 100) for name in catalog.VIT_ARCHS]
          + [(None, size) for size in (8, 28, 32, SMALL_IMAGE_MAX, SMALL_IMAGE_MAX + 1, 96, 224)])

SCHEDULES = (["none", "efficienttrain++", "const:patch=8,keep=0.5", "const:patch=32,keep_q=0.25,keep_k=0.75",
              "const:keep_global=0.5,keep_local=0.25,res=0.5", "const:keep_a=0.3,keep_b=0.6,m=4",
              "const:patch=2,keep=0.25"] + list(AAIP_PRESETS))


def build(model, base_size, method=None):
    name, kwargs = model_for(model, base_size)
    with torch.device("meta"):
        encoder = effkern.timm.create_model(name, pretrained=False, img_size=base_size, **kwargs)
        return encoder, (build_method(method, encoder) if method else None)


@pytest.mark.parametrize("model, base_size", MODELS, ids=[f"{m}-{s}" for m, s in MODELS])
def test_model_cfg_is_timms(model, base_size):
    encoder, _ = build(model, base_size)
    assert catalog.model_cfg(model, base_size) == ModelCfg.from_timm(encoder)


def test_unknown_models_are_not_guessed():
    assert catalog.model_cfg("vit_small_patch16_18x2_224", 224) is None  # a timm ViT the catalog lacks
    assert catalog.model_cfg("vit_base_patch16_siglip_224", 224) is None


@pytest.mark.parametrize("method", METHODS)
def test_cost_hparams_are_the_method_defaults(method):
    defaults = _REGISTRY[method].DEFAULTS
    assert {k: defaults[k] for k in catalog.COST_HPARAMS[method]} == catalog.COST_HPARAMS[method]


@pytest.mark.parametrize("model, base_size", [(None, 28), (None, 32), (None, 96), ("vit_tiny_patch16_224", 224),
                                              ("vit_small_patch16_224", 224), ("vit_base_patch32_224", 160)])
@pytest.mark.parametrize("method", METHODS)
def test_heads_and_views_are_the_methods(method, model, base_size):
    """Head FLOPs from the real modules and the passes of view_specs after view_plan (the
    trainer's calls), at every stage of every schedule preset and its scaled sizes."""
    encoder, real = build(model, base_size, method)
    cfg = catalog.model_cfg(model, base_size)
    for grad in (True, False):
        assert catalog.head_flops(method, cfg.embed_dim, grad) == real.head_flops(grad), grad
    real.view_plan(base_size)
    stages = [Stage()] + [st for name in SCHEDULES for _, st in get_schedule(name).stages]
    for stage in stages:
        for size in {base_size, max(1, round(base_size * stage.resolution)), base_size // 2}:
            assert catalog.view_specs(method, cfg, size, stage) == real.view_specs(size, stage, cfg.patch_size), \
                (stage, size)


def test_method_names_are_checked_alike():
    assert catalog.method_key("MoCo-v3") == "mocov3" and catalog.method_key("Super_vised") == "supervised"
    with pytest.raises(ValueError, match="unknown method 'byol'; valid methods: mocov3, simclr, dino, supervised"):
        catalog.method_key("byol")


def _args(name, method, model, base_size, model_arg=None):
    return argparse.Namespace(name=name, method=method, model=model, base_size=base_size, model_arg=model_arg)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model, base_size", [(None, 32), (None, 224), ("vit_small_patch16_224", 224)])
def test_cli_fast_path_prints_the_built_models_table(method, model, base_size):
    for name in ("none", "efficienttrain++", "const:keep_q=0.5,keep=0.25") + AAIP_PRESETS:
        args = _args(name, method, model, base_size)
        schedule = get_schedule(name)
        assert describe(schedule, *_show_shapes(args)) == describe(schedule, *_built_shapes(args)), name


def test_cli_model_arg_takes_the_built_path():
    args = _args("efficienttrain++", "mocov3", None, 224, ["depth=6"])
    cfg, _ = _show_shapes(args)
    assert cfg.depth == 6 and cfg.embed_dim == 192


def test_schedule_show_imports_neither_torch_nor_timm():
    code = ("import sys; from effkern.cli import main; "
            "rc = main(['schedule', 'show', 'efficienttrain++', '--method', 'dino']); "
            "heavy = sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules); "
            "print('HEAVY', heavy); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "predicted speedup" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []", out.stdout
