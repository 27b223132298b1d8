"""What a run trains, described without torch or timm: the method names, the timm ViTs
known by name, and the shapes the cost model needs (the encoder's ``ModelCfg``, each
method's encoder passes and the FLOPs of its heads).  ``effkern schedule show`` prints
from it in a fraction of a second; the trainer builds the real modules instead.

It describes the models and methods with their defaults only (``model_cfg`` returns None
for a model it does not know; the caller then builds the model).  Every entry is
checked against the real thing in tests/test_catalog.py: ``ModelCfg.from_timm`` of the
timm model (built on the meta device), the methods' ``view_specs`` and the ``DEFAULTS``
of their classes, so the two descriptions cannot drift apart.

Head FLOPs are 2 in out per Linear layer (as ``effkern.schedules.cost.linear_flops``):

  mocov3      projector D -> mlp -> mlp -> out, predictor out -> mlp -> out
              (trained pass: both; momentum pass: the projector)
  simclr      projector D -> hidden -> out (trained passes only)
  dino        head D -> hidden (-> hidden) x (nlayers - 2) -> bottleneck -> out
              (student and teacher passes alike)
  supervised  the timm classifier D -> num_classes (timm's default 1000 classes)
"""

from __future__ import annotations

from effkern.schedules import ModelCfg, Stage, ViewSpec
from effkern.train.config import model_for

__all__ = ["METHODS", "method_key", "VIT_ARCHS", "model_cfg", "COST_HPARAMS", "head_flops", "view_specs"]

METHODS = ("mocov3", "simclr", "dino", "supervised")


def method_key(name: str) -> str:
    """The registry key of a method name ("MoCo-v3" -> "mocov3"); ValueError when unknown."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return key


# timm name -> (patch_size, embed_dim, depth, num_heads), timm's own model_args; every one
# has mlp_ratio 4, a class token and 3 input channels.  The image size is the run's.
VIT_ARCHS: dict[str, tuple[int, int, int, int]] = {
    "vit_tiny_patch16_224": (16, 192, 12, 3), "vit_tiny_patch16_384": (16, 192, 12, 3),
    "vit_small_patch8_224": (8, 384, 12, 6), "vit_small_patch16_224": (16, 384, 12, 6),
    "vit_small_patch16_384": (16, 384, 12, 6), "vit_small_patch32_224": (32, 384, 12, 6),
    "vit_small_patch32_384": (32, 384, 12, 6),
    "vit_base_patch8_224": (8, 768, 12, 12), "vit_base_patch16_224": (16, 768, 12, 12),
    "vit_base_patch16_384": (16, 768, 12, 12), "vit_base_patch32_224": (32, 768, 12, 12),
    "vit_base_patch32_384": (32, 768, 12, 12),
    "vit_large_patch14_224": (14, 1024, 24, 16), "vit_large_patch16_224": (16, 1024, 24, 16),
    "vit_large_patch16_384": (16, 1024, 24, 16), "vit_large_patch32_224": (32, 1024, 24, 16),
    "vit_large_patch32_384": (32, 1024, 24, 16),
    "vit_huge_patch14_224": (14, 1280, 32, 16),
    "deit_tiny_patch16_224": (16, 192, 12, 3), "deit_small_patch16_224": (16, 384, 12, 6),
    "deit_base_patch16_224": (16, 768, 12, 12),
}
_ARCH_KEYS = ("patch_size", "embed_dim", "depth", "num_heads")


def model_cfg(model: str | None, base_size: int) -> ModelCfg | None:
    """``ModelCfg.from_timm`` of the encoder a run builds for ``model`` (None: the preset of
    ``base_size``, ``model_for``) at ``base_size`` px with no extra kwargs; None when the
    timm name is not in ``VIT_ARCHS``."""
    name, kwargs = model_for(model, base_size)
    if name not in VIT_ARCHS:
        return None
    arch = {**dict(zip(_ARCH_KEYS, VIT_ARCHS[name])), **kwargs}
    return ModelCfg(img_size=int(base_size), patch_size=arch["patch_size"], embed_dim=arch["embed_dim"],
                    depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=4.0, num_prefix_tokens=1,
                    in_chans=3)


# the methods' hyper-parameters that shape their cost, at the classes' DEFAULTS
COST_HPARAMS: dict[str, dict] = {
    "mocov3": dict(mlp_dim=4096, out_dim=256),
    "simclr": dict(hidden_dim=2048, out_dim=128),
    "dino": dict(out_dim=65536, hidden_dim=2048, bottleneck_dim=256, nlayers=3, n_local=8, local_size=None,
                 teacher_branch=None),
    "supervised": {},
}
SUPERVISED_CLASSES = 1000  # timm's num_classes default (schedule show builds no dataset)


def _mlp(*dims: int) -> float:
    return sum(2.0 * a * b for a, b in zip(dims, dims[1:]))


def head_flops(method: str, embed_dim: int, grad: bool) -> float:
    """Forward FLOPs per image of the heads ``method`` runs on one pass's feature (the
    trained pass for ``grad``, else the momentum / teacher pass), at the default hparams."""
    key, D = method_key(method), int(embed_dim)
    hp = COST_HPARAMS[key]
    if key == "mocov3":
        projector = _mlp(D, hp["mlp_dim"], hp["mlp_dim"], hp["out_dim"])
        return projector + _mlp(hp["out_dim"], hp["mlp_dim"], hp["out_dim"]) if grad else projector
    if key == "simclr":
        return _mlp(D, hp["hidden_dim"], hp["out_dim"]) if grad else 0.0
    if key == "dino":
        n, h = max(hp["nlayers"], 1), hp["hidden_dim"]
        mlp = _mlp(D, hp["bottleneck_dim"]) if n == 1 else _mlp(D, *([h] * (n - 1)), hp["bottleneck_dim"])
        return mlp + _mlp(hp["bottleneck_dim"], hp["out_dim"])
    return _mlp(D, SUPERVISED_CLASSES)


def _keep(stage: Stage, branch: str | None) -> float:
    return 1.0 if branch is None else float(stage.keep_for(branch))


def _patch(stage: Stage, size: int, native: int) -> int:
    """The stage's patch size where it divides the view, else the native one."""
    p = stage.patch_size
    return p if p is not None and size % p == 0 else native


def view_specs(method: str, cfg: ModelCfg, size: int, stage: Stage) -> list[ViewSpec]:
    """The method's ``view_specs(size, stage, cfg.patch_size)`` after ``view_plan(cfg.img_size)``
    (as the trainer calls them): one ViewSpec per encoder pass per image, global views at
    ``size`` px (the stage-scaled base size), heads attached."""
    key, p = method_key(method), cfg.patch_size
    heads = {True: head_flops(key, cfg.embed_dim, True), False: head_flops(key, cfg.embed_dim, False)}
    pg = _patch(stage, size, p)
    if key == "mocov3":
        passes = [(size, pg, _keep(stage, "q"), True)] * 2 + [(size, pg, _keep(stage, "k"), False)] * 2
    elif key == "simclr":
        passes = [(size, pg, _keep(stage, "a"), True), (size, pg, _keep(stage, "b"), True)]
    elif key == "dino":
        hp = COST_HPARAMS["dino"]
        local = (int(hp["local_size"]) if hp["local_size"] is not None
                 else max(p, int(round(96 / 224 * cfg.img_size / p)) * p))
        passes = ([(size, pg, _keep(stage, "global"), True)] * 2
                  + [(local, _patch(stage, local, p), _keep(stage, "local"), True)] * hp["n_local"]
                  + [(size, pg, _keep(stage, hp["teacher_branch"]), False)] * 2)
    else:
        passes = [(size, pg, _keep(stage, "default"), True)]
    return [ViewSpec(res, patch, keep, grad, heads[grad]) for res, patch, keep, grad in passes]
