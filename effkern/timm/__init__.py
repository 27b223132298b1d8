"""timm drop-in: a live ``timm`` VisionTransformer with flexible patch size, token
dropout and a ragged multi-view forward, on effkern's packed kernels.

    import effkern.timm
    model = effkern.timm.create_model("vit_small_patch16_224", pretrained=False)
    # or: model = effkern.timm.patch(timm.create_model(...))
    logits = model(x, patch_size=8, keep=0.5)
    f1, f2 = model.forward_views([x224, x96], patch_sizes=[16, 8], keeps=[0.5, None])
    effkern.timm.unpatch(model)          # back to the original class

``patch`` swaps the model's class for a generated subclass of its own class
(``PackedVisionTransformer``; parameters and state_dict keys are untouched).  With no
new keyword and an image size timm accepts, the original timm code runs, so outputs
match timm exactly (eager, torch.jit.script / trace, torch.fx).  Otherwise tokens take
the packed path: kept patches only (effkern.ops.patch_embed at any patch size, or the
model's own stem) -> prefix tokens -> blocks on packed (total, D) tokens with
effkern.ops.varlen_attention_qkvpacked -> norm -> per-sample pooling
(effkern.layers.ragged_pool).

Return contract of the packed ``forward_features`` (and of ``forward``/
``forward_views`` when global_pool == ''): when every sample has the same length
by construction (keep None or a float ratio) a (B, L, D) tensor; when ragged by
construction (keep a (B,) count tensor or an explicit (keep_idx, cu_seqlens)
tuple) a tuple (packed (total, D), cu_seqlens int32 (B+1,)).  The type depends
only on the kind of ``keep``, never on its values.  docs/timm.md has the rest.
"""

from __future__ import annotations

from effkern.timm._model import PackedVisionTransformer, packed_class
from effkern.timm._support import SUPPORTED, check_model

__all__ = ["patch", "unpatch", "create_model", "is_patched", "PackedVisionTransformer", "SUPPORTED"]


def is_patched(model) -> bool:
    return isinstance(model, PackedVisionTransformer)


def patch(model):
    """Patch a live timm ``VisionTransformer`` in place and return it.

    Sets ``model.__class__`` to ``Packed<its class>`` (a subclass: isinstance checks,
    the class's own methods and state_dict keys are kept), which adds
    ``forward_features(x, ..., patch_size=None, keep=None, generator=None)``,
    ``forward(x, ..., patch_size=None, keep=None, generator=None)`` and
    ``forward_views(views, patch_sizes=None, keeps=None, generator=None)``.
    Raises ValueError naming the unsupported feature (and listing the supported
    ones).  Idempotent.
    """
    if is_patched(model):
        return model
    check_model(model)
    model.__class__ = packed_class(type(model))
    return model


def unpatch(model):
    """Undo :func:`patch` in place (the original class again) and return the model.
    A model that is not patched is returned unchanged."""
    if is_patched(model):
        model.__class__ = type(model)._effkern_base
    return model


def create_model(model_name: str, **kwargs):
    """``timm.create_model(model_name, **kwargs)`` followed by :func:`patch`."""
    import timm

    return patch(timm.create_model(model_name, **kwargs))
