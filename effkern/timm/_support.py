"""What the packed path of effkern.timm supports, checked once in ``patch()``.

``check_model`` raises one ValueError that names the unsupported feature and
lists what IS supported (``SUPPORTED``), so a user sees the whole contract.
"""

from __future__ import annotations

import torch.nn as nn

from effkern.ops.varlen_attention import HEAD_DIM_RANGE

POOLS = ("token", "avg", "max", "avgmax", "", "map", "prr")

SUPPORTED = (
    "timm VisionTransformer and VisionTransformerDistilled (deit_*_distilled_*); "
    "patch embeds: timm PatchEmbed (any patch conv; patch_size= changes need a square, "
    "non-overlapping conv), with or without embed_norm_layer, and HybridEmbed (CNN stem); "
    "H != W images and non-square grids, dynamic_img_size, dynamic_img_pad; "
    "timm Block with timm Attention (qkv bias, qk_norm, scale_attn_norm, gated), any token-wise MLP "
    "(Mlp, SwiGLU, SwiGLUPacked, GluMlp), LayerScale, drop path, attention dropout (PyTorch fallback), "
    f"head_dim {HEAD_DIM_RANGE[0]}..{HEAD_DIM_RANGE[1]}; class / register / distillation tokens, "
    "no_embed_class, pos_embed='none', pre_norm, fc_norm, patch_drop_rate; "
    f"global_pool in {', '.join(repr(p) for p in POOLS)}"
)

# methods the packed path re-implements: a subclass overriding one of them is supported
# only where the override is known (VisionTransformerDistilled's prefix tokens and head)
_REIMPLEMENTED = ("forward_features", "forward_head", "forward", "pool", "_pos_embed")


def unsupported(what: str) -> ValueError:
    return ValueError(f"effkern.timm.patch: unsupported model: {what}. Supported: {SUPPORTED}")


def is_distilled(model) -> bool:
    return getattr(model, "dist_token", None) is not None and hasattr(model, "head_dist")


def _known_overrides():
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    return {VisionTransformer: set(_REIMPLEMENTED),
            VisionTransformerDistilled: {"_pos_embed", "forward_head"}}


def _check_class(model) -> None:
    known = _known_overrides()
    for name in _REIMPLEMENTED:
        owner = next(c for c in type(model).__mro__ if name in vars(c))
        if name not in known.get(owner, ()):
            raise unsupported(f"{type(model).__name__} overrides VisionTransformer.{name} "
                              f"(in {owner.__name__})")


def _check_embed(model) -> None:
    from timm.layers import HybridEmbed, PatchEmbed

    pe = model.patch_embed
    if type(pe) not in (PatchEmbed, HybridEmbed):
        raise unsupported(f"patch embed layer {type(pe).__name__}")
    if not isinstance(pe.proj, nn.Conv2d):
        raise unsupported(f"patch embed projection {type(pe.proj).__name__} (not a Conv2d)")


def _check_blocks(model) -> None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    lo, hi = HEAD_DIM_RANGE
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise unsupported(f"blocks[{i}] is {type(blk).__name__} (only timm's pre-norm Block)")
        if type(blk.attn) is not Attention:
            raise unsupported(f"blocks[{i}].attn is {type(blk.attn).__name__} (only timm.layers.Attention)")
        if not lo <= blk.attn.head_dim <= hi:
            raise unsupported(f"head_dim {blk.attn.head_dim}")


def check_model(model) -> None:
    """Raise ValueError unless the packed path can run ``model`` exactly as timm does."""
    from timm.layers import AttentionPoolLatent, AttentionPoolPrr
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise unsupported(f"{type(model).__name__} is not a timm VisionTransformer")
    _check_class(model)
    if model.global_pool not in POOLS:
        raise unsupported(f"global_pool={model.global_pool!r}")
    pool = model.attn_pool
    if pool is not None:
        if type(pool) not in (AttentionPoolLatent, AttentionPoolPrr):
            raise unsupported(f"attention pool {type(pool).__name__}")
        if getattr(pool, "pos_embed", None) is not None:
            raise unsupported("AttentionPoolLatent with its own position embedding (pos_embed='abs')")
    if is_distilled(model) and model.reg_token is not None:
        raise unsupported("register tokens in the distilled DeiT (timm itself ignores them there)")
    _check_embed(model)
    _check_blocks(model)
