"""timm drop-in: a live ``timm`` VisionTransformer with flexible patch size, token
dropout and a ragged multi-view forward, on effkern's packed kernels.

    import effkern.timm
    model = effkern.timm.create_model("vit_small_patch16_224", pretrained=False)
    # or: model = effkern.timm.patch(timm.create_model(...))
    logits = model(x, patch_size=8, keep=0.5)
    f1, f2 = model.forward_views([x224, x96], patch_sizes=[16, 8], keeps=[0.5, None])

``patch`` binds new methods on the *instance* (parameters and state_dict keys are
untouched; other instances of the class are not affected).  With no new keyword
(or patch_size equal to the native one, keep None and the native image size) the
original timm code runs, so outputs match timm exactly.  Otherwise tokens take the
packed path: effkern.ops.patch_embed (kept patches only, weight/pos resampled to
the patch size) -> prefix tokens -> blocks on packed (total, D) tokens with
effkern.ops.varlen_attention_qkvpacked -> norm -> per-sample pooling.

Return contract of the packed ``forward_features`` (and of ``forward``/
``forward_views`` when global_pool == ''): when every sample has the same length
by construction (keep None or a float ratio) a (B, L, D) tensor; when ragged by
construction (keep a (B,) count tensor or an explicit (keep_idx, cu_seqlens)
tuple) a tuple (packed (total, D), cu_seqlens int32 (B+1,)).  The type depends
only on the kind of ``keep``, never on its values.
"""

from __future__ import annotations

import numbers
import types
from typing import Optional, Sequence

import torch
import torch.nn as nn

from effkern.layers.packed_vit import packed_block
from effkern.ops import patch_embed as _patch_embed
from effkern.ops import sample_keep
from effkern.ops.varlen_attention import HEAD_DIM_RANGE

__all__ = ["patch", "create_model", "is_patched"]

_POOLS = ("token", "avg", "max", "avgmax", "")
_FLAG = "_effkern_patched"


# ------------------------------------------------------------------ patching

def _unsupported(what: str) -> ValueError:
    return ValueError(f"effkern.timm.patch: unsupported model: {what}")


def _check_model(model) -> None:
    from timm.layers import Attention, PatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise _unsupported(f"{type(model).__name__} is not a timm VisionTransformer")
    for name in ("forward_features", "forward_head", "forward", "pool", "_pos_embed"):
        if getattr(type(model), name) is not getattr(VisionTransformer, name):
            raise _unsupported(f"{type(model).__name__} overrides VisionTransformer.{name}")
    if model.attn_pool is not None:
        raise _unsupported(f"global_pool={model.global_pool!r} (attention pooling)")
    if model.global_pool not in _POOLS:
        raise _unsupported(f"global_pool={model.global_pool!r}")
    if model.dynamic_img_size:
        raise _unsupported("dynamic_img_size=True")
    pe = model.patch_embed
    if type(pe) is not PatchEmbed:
        raise _unsupported(f"patch embed layer {type(pe).__name__} (only timm.layers.PatchEmbed)")
    if getattr(pe, "dynamic_img_pad", False):
        raise _unsupported("dynamic_img_pad=True")
    if not isinstance(pe.norm, nn.Identity):
        raise _unsupported("a norm layer inside the patch embedding (embed_norm_layer)")
    proj = pe.proj
    if (type(proj) is not nn.Conv2d or proj.kernel_size[0] != proj.kernel_size[1]
            or tuple(proj.stride) != tuple(proj.kernel_size) or tuple(proj.padding) != (0, 0)
            or tuple(proj.dilation) != (1, 1) or proj.groups != 1 or proj.padding_mode != "zeros"):
        raise _unsupported("patch embedding must be a square, non-overlapping Conv2d (kernel == stride)")
    if model.pos_embed is not None and pe.grid_size[0] != pe.grid_size[1]:
        raise _unsupported(f"non-square position-embedding grid {tuple(pe.grid_size)}")
    if not isinstance(model.patch_drop, nn.Identity):
        raise _unsupported("patch_drop_rate > 0 (timm PatchDropout); use keep= instead")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise _unsupported(f"blocks[{i}] is {type(blk).__name__} (only timm's pre-norm Block)")
        if type(blk.attn) is not Attention:
            raise _unsupported(f"blocks[{i}].attn is {type(blk.attn).__name__} (only timm.layers.Attention)")
        if not HEAD_DIM_RANGE[0] <= blk.attn.head_dim <= HEAD_DIM_RANGE[1]:
            raise _unsupported(f"head_dim {blk.attn.head_dim} (supported: {HEAD_DIM_RANGE[0]} to {HEAD_DIM_RANGE[1]})")


def is_patched(model) -> bool:
    return bool(getattr(model, _FLAG, False))


def patch(model):
    """Patch a live timm ``VisionTransformer`` in place and return it.

    Adds ``forward_features(x, patch_size=None, keep=None, generator=None)``,
    ``forward(x, patch_size=None, keep=None, generator=None)`` and
    ``forward_views(views, patch_sizes=None, keeps=None, generator=None)`` on this
    instance only.
    Raises ValueError naming the first unsupported feature.  Idempotent.
    """
    if is_patched(model):
        return model
    _check_model(model)
    model.forward_features = types.MethodType(_forward_features, model)
    model.forward = types.MethodType(_forward, model)
    model.forward_views = types.MethodType(_forward_views, model)
    setattr(model, _FLAG, True)
    return model


def create_model(model_name: str, **kwargs):
    """``timm.create_model(model_name, **kwargs)`` followed by :func:`patch`."""
    import timm

    return patch(timm.create_model(model_name, **kwargs))


# ------------------------------------------------------------------ embedding

def _native_patch(model) -> int:
    return int(model.patch_embed.proj.kernel_size[0])


def _resolve_patch(model, x, patch_size) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    p = _native_patch(model) if patch_size is None else patch_size
    if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    p = int(p)
    H, W = x.shape[-2:]
    if H % p or W % p:
        raise ValueError(f"patch_size {p} must divide the image size (H, W) = {(H, W)}")
    return p


def _is_native(model, x, p: int, keep) -> bool:
    return (keep is None and p == _native_patch(model)
            and tuple(x.shape[-2:]) == tuple(model.patch_embed.img_size))


def _sample(B: int, n: int, keep, device, generator):
    """effkern.ops.sample_keep on ``device``; with a generator on another device (e.g. a
    CPU generator for CUDA images) the indices are drawn there and moved."""
    if generator is None:
        return sample_keep(B, n, keep, device=device)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gdev = torch.device(generator.device)
    if isinstance(keep, torch.Tensor):
        keep = keep.to(gdev)
    idx, cu = sample_keep(B, n, keep, generator=generator, device=gdev)
    return idx.to(device), cu.to(device)


def _resolve_keep(keep, B: int, n: int, device, generator=None):
    """-> (keep_idx, cu_seqlens int32, host lengths list, ragged: bool)."""
    if keep is None or (isinstance(keep, numbers.Real) and not isinstance(keep, bool)):
        ratio = 1.0 if keep is None else float(keep)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"keep ratio must be in (0, 1], got {keep!r}")
        idx, cu = _sample(B, n, ratio, device, generator)
        return idx, cu, [max(1, int(n * ratio))] * B, False
    if isinstance(keep, torch.Tensor):
        idx, cu = _sample(B, n, keep, device, generator)
        return idx, cu, keep.to("cpu", torch.int64).tolist(), True
    if isinstance(keep, (tuple, list)) and len(keep) == 2 and all(isinstance(t, torch.Tensor) for t in keep):
        idx, cu = keep
        if cu.dim() != 1 or cu.shape[0] != B + 1:
            raise ValueError(f"keep cu_seqlens must have shape ({B + 1},), got {tuple(cu.shape)}")
        if idx.dim() != 1:
            raise ValueError(f"keep_idx must be 1-D, got shape {tuple(idx.shape)}")
        cu_host = cu.to("cpu", torch.int64)
        lens = (cu_host[1:] - cu_host[:-1]).tolist()
        if cu_host[0].item() != 0 or min(lens) < 1 or cu_host[-1].item() != idx.shape[0]:
            raise ValueError("keep cu_seqlens must start at 0, end at len(keep_idx) and give every "
                             "image at least one patch")
        return idx.to(device), cu.to(device, torch.int32), lens, True
    raise ValueError("keep must be None, a ratio in (0, 1], a (B,) tensor of counts or a "
                     f"(keep_idx, cu_seqlens) tuple, got {type(keep).__name__}")


def _split_pos(model):
    """-> (pos for patches (1, g0*g0, D) or None, pos for prefix tokens (P, D) or None)."""
    pos = model.pos_embed
    P = model.num_prefix_tokens
    if pos is None:
        return None, None
    if model.no_embed_class or P == 0:
        return pos, None
    return pos[:, P:], pos[0, :P]


def _prefix(model) -> Optional[torch.Tensor]:
    parts = [t[0] for t in (model.cls_token, model.reg_token) if t is not None]
    if not parts:
        return None
    prefix = torch.cat(parts, dim=0)  # (P, D)
    _, pos_prefix = _split_pos(model)
    return prefix if pos_prefix is None else prefix + pos_prefix


def _embed(model, x, p: int, keep, generator=None):
    """One view -> (tokens (total, D) with prefix tokens, per-sample lengths, ragged)."""
    B, _, H, W = x.shape
    n = (H // p) * (W // p)
    keep_idx, cu, lens, ragged = _resolve_keep(keep, B, n, x.device, generator)
    proj = model.patch_embed.proj
    pos_patch, _ = _split_pos(model)
    tokens = _patch_embed(x, proj.weight, proj.bias, p, pos_patch, keep_idx, cu)
    prefix = _prefix(model)
    if prefix is None:
        return tokens, lens, ragged
    P, D = prefix.shape
    B_P = B * P
    lens_out = [n_b + P for n_b in lens]
    dev = tokens.device
    # gather index: output row -> row of cat([prefix repeated B times, tokens])
    lo = torch.tensor(lens_out, device=dev, dtype=torch.int64)
    cu_out = torch.zeros(B + 1, device=dev, dtype=torch.int64)
    cu_out[1:] = lo.cumsum(0)
    total = sum(lens_out)
    seg = torch.repeat_interleave(torch.arange(B, device=dev), lo, output_size=total)
    r = torch.arange(total, device=dev) - cu_out[seg]
    cu_in = cu.to(torch.int64)
    g = torch.where(r < P, seg * P + r, B_P + cu_in[seg] + r - P)
    src = torch.cat([prefix.to(tokens.dtype).expand(B, P, D).reshape(B_P, D), tokens], dim=0)
    return src.index_select(0, g), lens_out, ragged


# ------------------------------------------------------------------ packed trunk

def _cu(lens: Sequence[int], device) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(list(lens), dtype=torch.int64).cumsum(0)
    return cu.to(device)


def _trunk(model, x: torch.Tensor, lens: Sequence[int]) -> torch.Tensor:
    """pos_drop -> norm_pre -> blocks -> norm on packed tokens (total, D)."""
    cu = _cu(lens, x.device)
    max_seqlen = max(lens)
    seqlens = torch.tensor(list(lens), dtype=torch.int64).to(x.device)
    x = model.norm_pre(model.pos_drop(x))
    ckpt = model.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
    for blk in model.blocks:
        if ckpt:
            x = torch.utils.checkpoint.checkpoint(packed_block, blk, x, cu, max_seqlen, seqlens,
                                                  use_reentrant=False)
        else:
            x = packed_block(blk, x, cu, max_seqlen, seqlens)
    return model.norm(x)


def _pool(model, x: torch.Tensor, lens: Sequence[int]) -> torch.Tensor:
    """timm ``VisionTransformer.pool`` per packed sequence: (total, D) -> (B, D)."""
    pool_type = model.global_pool
    P = model.num_prefix_tokens
    B = len(lens)
    dev = x.device
    lo = torch.tensor(list(lens), device=dev, dtype=torch.int64)
    starts = torch.zeros(B, device=dev, dtype=torch.int64)
    starts[1:] = lo.cumsum(0)[:-1]
    if pool_type == "token":
        return x.index_select(0, starts)
    skip = 0 if model.pool_include_prefix else P
    total = x.shape[0]
    seg = torch.repeat_interleave(torch.arange(B, device=dev), lo, output_size=total)
    r = torch.arange(total, device=dev) - starts[seg]
    rows = (r >= skip).nonzero().reshape(-1) if skip else None
    xs = x if rows is None else x.index_select(0, rows)
    sg = seg if rows is None else seg.index_select(0, rows)
    counts = (lo - skip).clamp_min(1).to(x.dtype)
    if pool_type in ("avg", "avgmax"):
        mean = x.new_zeros(B, x.shape[1]).index_add(0, sg, xs) / counts[:, None]
    if pool_type in ("max", "avgmax"):
        idx = sg[:, None].expand(-1, x.shape[1])
        amax = x.new_zeros(B, x.shape[1]).scatter_reduce(0, idx, xs, "amax", include_self=False)
    if pool_type == "avg":
        return mean
    if pool_type == "max":
        return amax
    return 0.5 * (amax + mean)


def _features_out(x: torch.Tensor, lens: Sequence[int], ragged: bool):
    if ragged:
        return x, _cu(lens, x.device)
    return x.reshape(len(lens), lens[0], x.shape[-1])


def _head(model, x, lens, ragged, pre_logits: bool):
    if not model.global_pool:  # no pooling: per-token head, same contract as forward_features
        x = model.head_drop(model.fc_norm(x))
        return _features_out(x if pre_logits else model.head(x), lens, ragged)
    x = model.head_drop(model.fc_norm(_pool(model, x, lens)))
    return x if pre_logits else model.head(x)


# ------------------------------------------------------------------ bound methods

def _forward_features(self, x, patch_size=None, keep=None, attn_mask=None, is_causal=False, generator=None):
    """timm forward_features with ``patch_size=`` and ``keep=`` (see the module docstring
    for the return contract).  Native patch size, native image size and keep None
    run the original timm code.  ``generator`` (a torch.Generator) draws the kept
    patches when ``keep`` is a ratio or a count tensor (default: the global RNG)."""
    from timm.models.vision_transformer import VisionTransformer

    p = _resolve_patch(self, x, patch_size)
    if _is_native(self, x, p, keep):
        return VisionTransformer.forward_features(self, x, attn_mask=attn_mask, is_causal=is_causal)
    if attn_mask is not None or is_causal:
        raise ValueError("attn_mask / is_causal are not supported with patch_size= or keep=")
    tokens, lens, ragged = _embed(self, x, p, keep, generator)
    return _features_out(_trunk(self, tokens, lens), lens, ragged)


def _forward(self, x, patch_size=None, keep=None, attn_mask=None, is_causal=False, generator=None):
    """timm forward with ``patch_size=`` and ``keep=``: pooling is per sample over its
    own tokens, then fc_norm, head_drop, head.  ``generator``: as in forward_features."""
    from timm.models.vision_transformer import VisionTransformer

    p = _resolve_patch(self, x, patch_size)
    if _is_native(self, x, p, keep):
        return VisionTransformer.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    if attn_mask is not None or is_causal:
        raise ValueError("attn_mask / is_causal are not supported with patch_size= or keep=")
    tokens, lens, ragged = _embed(self, x, p, keep, generator)
    return _head(self, _trunk(self, tokens, lens), lens, ragged, pre_logits=False)


def _forward_views(self, views, patch_sizes=None, keeps=None, generator=None):
    """Run several views (same batch size, any resolutions) as ONE packed batch.

    views: list of (B, C, H_v, W_v) tensors; patch_sizes / keeps: None or lists of
    the same length (entries as for ``forward``).  Tokens are packed view-major
    (all samples of view 0, then view 1, ...) and go through the blocks once.
    Returns a list with, per view, timm's ``forward_head(pre_logits=True)``
    features: pool + fc_norm (+ head_drop), (B, D).  ``generator`` (one torch.Generator
    for all views, drawn in view order) samples the ratio / count keeps.
    """
    if isinstance(views, torch.Tensor) or not isinstance(views, (list, tuple)) or not views:
        raise ValueError("views must be a non-empty list of (B, C, H, W) tensors")
    V = len(views)
    patch_sizes = [None] * V if patch_sizes is None else list(patch_sizes)
    keeps = [None] * V if keeps is None else list(keeps)
    if len(patch_sizes) != V:
        raise ValueError(f"patch_sizes has {len(patch_sizes)} entries for {V} views")
    if len(keeps) != V:
        raise ValueError(f"keeps has {len(keeps)} entries for {V} views")
    ps = [_resolve_patch(self, v, p) for v, p in zip(views, patch_sizes)]
    B = views[0].shape[0]
    if any(v.shape[0] != B for v in views):
        raise ValueError(f"all views must have the same batch size, got {[v.shape[0] for v in views]}")
    embedded = [_embed(self, v, p, k, generator) for v, p, k in zip(views, ps, keeps)]
    lens = [n for _, lv, _ in embedded for n in lv]
    x = _trunk(self, torch.cat([t for t, _, _ in embedded], dim=0), lens)
    out, start = [], 0
    for t, lv, ragged in embedded:
        n = sum(lv)
        out.append(_head(self, x[start:start + n], lv, ragged, pre_logits=True))
        start += n
    return out
