"""The effkern.timm compatibility matrix: the ViT family of the installed timm, as
small randomly initialised models (depth 1, 32..64 px), and what effkern does with
each.  tests/test_timm_matrix.py runs every entry; ``markdown()`` renders the table
that docs/timm.md carries (a test checks that the doc is up to date).

    python tests/timm_compat_matrix.py      # print the table
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SMALL = {"depth": 1, "embed_dim": 64, "num_heads": 2, "num_classes": 5}


@dataclass
class Entry:
    id: str
    arch: str                       # timm model name
    kwargs: dict                    # timm.create_model overrides (on top of SMALL unless own_dims)
    how: str                        # supported: what the packed path does / unsupported: why not
    img: tuple = (48, 48)           # native image size (H, W)
    other: Optional[tuple] = ((64, 32), 8)   # (image size, patch size) for the second packed case
    supported: bool = True
    own_dims: bool = False          # kwargs set embed_dim / num_heads themselves
    error: str = ""                 # unsupported: text of the ValueError

    def create_kwargs(self) -> dict:
        base = {"pretrained": False, "img_size": self.img}
        base.update({k: v for k, v in SMALL.items() if not (self.own_dims and k in ("embed_dim", "num_heads"))})
        base.update(self.kwargs)
        return base


def _swiglu():
    import torch.nn as nn
    from timm.layers import SwiGLU, SwiGLUPacked

    return SwiGLU, SwiGLUPacked, nn.SiLU


def entries() -> list:
    from timm.layers import RmsNorm

    SwiGLU, SwiGLUPacked, SiLU = _swiglu()
    E = Entry
    return [
        E("vit", "vit_tiny_patch16_224", {}, "fused patch embed (any patch size), class-token head"),
        E("vit_reg4", "vit_small_patch16_224", {"reg_tokens": 4}, "register tokens as prefix tokens"),
        E("vit_reg_noembcls", "vit_small_patch16_224", {"reg_tokens": 2, "no_embed_class": True},
          "prefix tokens without position embedding"),
        E("vit_nocls_avg", "vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"},
          "ragged mean over each sample's kept tokens, fc_norm"),
        E("vit_max_fcnorm", "vit_tiny_patch16_224", {"global_pool": "max", "fc_norm": True},
          "ragged max (scatter_reduce amax), fc_norm"),
        E("vit_avgmax_prefix", "vit_tiny_patch16_224",
          {"global_pool": "avgmax", "pool_include_prefix": True, "reg_tokens": 1}, "ragged avg + max incl. prefix"),
        E("vit_nopool", "vit_tiny_patch16_224", {"global_pool": ""}, "per-token head on packed tokens"),
        E("vit_qknorm_ls", "vit_tiny_patch16_224", {"qk_norm": True, "init_values": 0.1},
          "timm q_norm/k_norm and LayerScale on packed tokens"),
        E("vit_scalenorm_prenorm", "vit_tiny_patch16_224", {"scale_attn_norm": True, "pre_norm": True},
          "scale_attn_norm, pre_norm (CLIP-style, no patch bias)"),
        E("vit_swiglu", "vit_tiny_patch16_224", {"mlp_layer": SwiGLUPacked, "act_layer": SiLU},
          "SwiGLUPacked MLP (token-wise)"),
        E("vit_eva_style", "vit_tiny_patch16_224",
          {"class_token": False, "reg_tokens": 1, "global_pool": "avg", "no_embed_class": True,
           "norm_layer": RmsNorm, "mlp_layer": SwiGLU, "act_layer": SiLU, "qk_norm": True, "init_values": 1e-5},
          "EVA-style recipe on VisionTransformer: RmsNorm, SwiGLU, qk_norm, LayerScale, reg token, avg"),
        E("vit_nopos", "vit_tiny_patch16_224", {"pos_embed": "none", "global_pool": "avg"}, "no position embedding"),
        E("vit_embed_norm", "vit_tiny_patch16_224", {"embed_norm_layer": "layernorm"},
          "fused embed, then the embed norm, then the position embedding"),
        E("deit", "deit_tiny_patch16_224", {}, "plain VisionTransformer"),
        E("deit_distilled", "deit_tiny_distilled_patch16_224", {},
          "VisionTransformerDistilled: class + distillation prefix tokens, its own two-token head"),
        E("siglip_map", "vit_base_patch16_siglip_224", {},
          "global_pool='map': ragged latent attention pooling over each sample's kept tokens (segment softmax)"),
        E("vit_prr", "vit_tiny_patch16_224", {"global_pool": "prr"},
          "global_pool='prr': ragged self-attention (varlen_attention) then token pool"),
        E("hybrid_r_s16_p8", "vit_tiny_r_s16_p8_224", {"depth": 1, "num_classes": 5},
          "HybridEmbed: the CNN stem embeds densely, keep applies to its output tokens; "
          "patch_size= other than the stem's stride raises ValueError", img=(64, 64), other=((64, 96), None),
          own_dims=True),
        E("vit_dynamic", "vit_tiny_patch16_224", {"dynamic_img_size": True},
          "dynamic_img_size: any image size, position embedding resampled per view"),
        E("vit_dynamic_pad", "vit_tiny_patch16_224", {"dynamic_img_size": True, "dynamic_img_pad": True},
          "dynamic_img_pad: zero pad to a multiple of the patch size, then packed", other=((40, 56), 16)),
        E("vit_nonsquare_grid", "vit_tiny_patch16_224", {}, "non-square native grid (pos embed 2 x 4)",
          img=(32, 64), other=((48, 24), 8)),
        E("vit_nonsquare_patch", "vit_tiny_patch16_224", {"patch_size": (16, 8)},
          "non-square patch conv: timm's conv embeds, keep applies; patch_size= cannot change",
          img=(32, 32), other=((48, 32), None)),
        E("vit_head_dim8", "vit_tiny_patch16_224", {"embed_dim": 48, "num_heads": 6}, "head_dim 8", own_dims=True),
        E("vit_head_dim16", "vit_tiny_patch16_224", {"embed_dim": 64, "num_heads": 4}, "head_dim 16", own_dims=True),
        E("vit_head_dim48", "vit_tiny_patch16_224", {"embed_dim": 96, "num_heads": 2}, "head_dim 48", own_dims=True),
        E("vit_head_dim256", "vit_tiny_patch16_224", {"embed_dim": 256, "num_heads": 1}, "head_dim 256",
          own_dims=True),
        E("vit_patch_drop", "vit_tiny_patch16_224", {"patch_drop_rate": 0.5},
          "patch_drop_rate composes with keep in training (max(1, int(k * (1 - rate))) of the k kept)"),
        E("vit_attn_drop", "vit_tiny_patch16_224", {"attn_drop_rate": 0.1},
          "attention dropout in training: PyTorch fallback (timm's non-fused math, global RNG)"),
        # ---- not supported (patch() raises ValueError naming the feature)
        E("vit_diff_attn", "vit_tiny_patch16_224", {"attn_layer": "diff"},
          "DiffAttention (two softmax maps per head) has no packed kernel", supported=False, error="DiffAttention"),
        E("vit_parallel_blocks", "vit_small_patch16_18x2_224", {},
          "ParallelThingsBlock: not timm's pre-norm Block", supported=False, error="ParallelThingsBlock"),
        E("vit_respost", "vit_tiny_patch16_224", {"block_fn": "ResPostBlock"},
          "ResPostBlock (post-norm): not timm's pre-norm Block", supported=False, error="ResPostBlock"),
        E("eva02", "eva02_tiny_patch14_224", {}, "Eva is its own class (rotary embeddings), not a VisionTransformer",
          supported=False, error="not a timm VisionTransformer", img=(28, 28)),
        E("vit_relpos", "vit_relpos_small_patch16_224", {},
          "VisionTransformerRelPos (relative position bias) is not a VisionTransformer",
          supported=False, error="not a timm VisionTransformer"),
    ]


def create(entry: Entry):
    import timm
    from timm.models import vision_transformer as vt

    kw = entry.create_kwargs()
    if isinstance(kw.get("block_fn"), str):
        kw["block_fn"] = getattr(vt, kw["block_fn"])
    return timm.create_model(entry.arch, **kw)


def markdown() -> str:
    rows = ["| entry | timm model | overrides | status | how / why not |", "|---|---|---|---|---|"]
    for e in entries():
        kw = ", ".join(f"{k}={getattr(v, '__name__', v)!r}".replace("'", "") for k, v in e.kwargs.items()
                       if k not in ("depth", "num_classes"))
        rows.append(f"| {e.id} | `{e.arch}` | {kw or '-'} | {'supported' if e.supported else 'ValueError'} "
                    f"| {e.how} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
