"""Packed path, step 1: images -> kept tokens (total, D) with the prefix tokens in front.

Two ways to embed, chosen per model:

- fused (timm PatchEmbed with a square, non-overlapping Conv2d): effkern.ops.patch_embed
  embeds only the kept patches at any patch size (weight PI-resized, position
  embedding resampled and added in the same op when the native grid is square);
- module (HybridEmbed's CNN stem, non-square or overlapping patch convs): timm's own
  modules embed every patch densely, then the kept tokens are gathered.  Token
  dropout and the keep ratio apply to the stem's output tokens; the patch size is
  the stem's and cannot change.

Kept patches: ``keep`` None, a ratio, a (B,) count tensor or an explicit
(keep_idx, cu_seqlens) tuple (effkern.ops.sample_keep's layout).  timm's
PatchDropout (``patch_drop_rate``, training only) COMPOSES with it: of the k
patches ``keep`` gives an image, max(1, int(k * (1 - patch_drop_rate))) stay, a
uniform random subset -- exactly timm's PatchDropout count on those tokens.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from effkern.ops import patch_embed as _patch_embed
from effkern.ops import sample_keep
from effkern.ops.resize_pos_embed import resize_pos_embed
from effkern.timm._support import is_distilled


# ------------------------------------------------------------------ patch size

def fused_embed(model) -> bool:
    """timm PatchEmbed whose proj is a square, non-overlapping, unpadded Conv2d."""
    from timm.layers import PatchEmbed

    pe = model.patch_embed
    proj = pe.proj
    return (type(pe) is PatchEmbed and proj.kernel_size[0] == proj.kernel_size[1]
            and tuple(proj.stride) == tuple(proj.kernel_size) and tuple(proj.padding) == (0, 0)
            and tuple(proj.dilation) == (1, 1) and proj.groups == 1 and proj.padding_mode == "zeros")


def native_patch(model) -> int:
    """Pixels per token side: the patch conv's kernel (fused) or the stem's total stride."""
    pe = model.patch_embed
    if fused_embed(model):
        return int(pe.proj.kernel_size[0])
    return int(pe.feat_ratio()) if hasattr(pe, "feat_ratio") else int(max(pe.patch_size))


def resolve_patch(model, x, patch_size) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    p0 = native_patch(model)
    p = p0 if patch_size is None else patch_size
    if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    p = int(p)
    if p != p0 and not fused_embed(model):
        raise ValueError(f"patch_size={p}: this model's patch embedding ({type(model.patch_embed).__name__}, "
                         f"kernel {tuple(model.patch_embed.proj.kernel_size)}) cannot change its patch size "
                         f"(only a square, non-overlapping patch conv can); use patch_size=None or {p0}")
    if fused_embed(model) and not model.patch_embed.dynamic_img_pad:
        H, W = x.shape[-2:]
        if H % p or W % p:
            raise ValueError(f"patch_size {p} must divide the image size (H, W) = {(H, W)}")
    return p


def is_native(model, x, p: int, keep) -> bool:
    """Run timm's own code?  Native patch size, no keep, and an image size timm takes."""
    if keep is not None or p != native_patch(model):
        return False
    return model.dynamic_img_size or tuple(x.shape[-2:]) == tuple(model.patch_embed.img_size)


# ------------------------------------------------------------------ kept patches

def _patch_drop_prob(model) -> float:
    from timm.layers import PatchDropout

    pd = model.patch_drop
    return float(pd.prob) if isinstance(pd, PatchDropout) and pd.training else 0.0


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


def _count_ratio(count: int, n: int) -> float:
    """A ratio r with sample_keep's max(1, int(n * r)) == count."""
    return 1.0 if count >= n else (count + 0.5) / n


def _subsample(keep_idx, cu, lens, new_lens, device, generator):
    """Uniform random subset of new_lens[b] of the lens[b] kept indices of each image,
    order kept.  (keep_idx, cu) -> (keep_idx', cu')."""
    B, total = len(lens), sum(lens)
    seg = torch.repeat_interleave(torch.arange(B), torch.tensor(lens), output_size=total)
    scores = (torch.rand(total, dtype=torch.float64) if generator is None
              else torch.rand(total, dtype=torch.float64, generator=generator,
                              device=generator.device).cpu())
    order = torch.argsort(seg.double() + scores)          # grouped by image, random inside
    starts = torch.tensor([0] + lens[:-1]).cumsum(0)
    seg_o = seg[order]
    rank = torch.arange(total) - starts[seg_o]
    chosen = order[rank < torch.tensor(new_lens)[seg_o]].sort().values
    new_cu = torch.zeros(B + 1, dtype=torch.int32)
    new_cu[1:] = torch.tensor(new_lens).cumsum(0)
    return keep_idx.index_select(0, chosen.to(keep_idx.device)), new_cu.to(device)


def resolve_keep(model, keep, B: int, n: int, device, generator=None):
    """-> (keep_idx, cu_seqlens int32, host lengths list, ragged: bool)."""
    prob = _patch_drop_prob(model)
    if keep is None or (isinstance(keep, numbers.Real) and not isinstance(keep, bool)):
        ratio = 1.0 if keep is None else float(keep)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"keep ratio must be in (0, 1], got {keep!r}")
        count = max(1, int(n * ratio))
        if prob:
            count = max(1, int(count * (1.0 - prob)))
            ratio = _count_ratio(count, n)
        idx, cu = _sample(B, n, ratio, device, generator)
        return idx, cu, [count] * B, False
    if isinstance(keep, torch.Tensor):
        counts = keep
        if prob:
            counts = torch.tensor([max(1, int(k * (1.0 - prob))) for k in keep.tolist()], dtype=torch.int64)
        idx, cu = _sample(B, n, counts, device, generator)
        return idx, cu, counts.to("cpu", torch.int64).tolist(), True
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
        if prob:
            new_lens = [max(1, int(k * (1.0 - prob))) for k in lens]
            idx, cu = _subsample(idx, cu, lens, new_lens, device, generator)
            lens = new_lens
        return idx.to(device), cu.to(device, torch.int32), lens, True
    raise ValueError("keep must be None, a ratio in (0, 1], a (B,) tensor of counts or a "
                     f"(keep_idx, cu_seqlens) tuple, got {type(keep).__name__}")


# ------------------------------------------------------------------ position embedding

def _pos_parts(model):
    """-> (pos of the patch grid (1, N0, D) or None, pos of the prefix tokens (P, D) or None)."""
    pos = model.pos_embed
    P = model.num_prefix_tokens
    if pos is None:
        return None, None
    if model.no_embed_class or P == 0:
        return pos, None
    return pos[:, P:], pos[0, :P]


def _pos_grid(model, pos, grid) -> torch.Tensor:
    """The patch position embedding resampled to ``grid`` (gh, gw): (gh*gw, D)."""
    from timm.layers import resample_abs_pos_embed

    g0 = tuple(model.patch_embed.grid_size)
    if g0[0] == g0[1]:
        return resize_pos_embed(pos, tuple(grid))  # effkern's op: traceable at symbolic sizes
    if g0 == tuple(grid):
        return pos[0]
    return resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(g0), num_prefix_tokens=0)[0]


def prefix_tokens(model) -> Optional[torch.Tensor]:
    """(P, D): class, register (or distillation) tokens, plus their position embedding."""
    if is_distilled(model):
        parts = [model.cls_token[0], model.dist_token[0]]
    else:
        parts = [t[0] for t in (model.cls_token, model.reg_token) if t is not None]
    if not parts:
        return None
    prefix = torch.cat(parts, dim=0)
    _, pos_prefix = _pos_parts(model)
    return prefix if pos_prefix is None else prefix + pos_prefix


# ------------------------------------------------------------------ embedding

def _pad(x, ph: int, pw: int):
    """timm's dynamic_img_pad: zeros on the bottom / right up to a multiple of the patch."""
    H, W = x.shape[-2:]
    return F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))


def _dense_tokens(model, x):
    """timm's embedding modules on every patch: (B, N, D) tokens and the grid (gh, gw)."""
    pe = model.patch_embed
    if hasattr(pe, "backbone"):
        x = pe.backbone(x)
        if isinstance(x, (list, tuple)):
            x = x[-1]
    if pe.dynamic_img_pad:
        x = _pad(x, int(pe.patch_size[0]), int(pe.patch_size[1]))
    x = pe.proj(x)
    grid = (int(x.shape[-2]), int(x.shape[-1]))
    x = x.flatten(2).transpose(1, 2)
    norm = getattr(pe, "norm", None)
    return (x if norm is None else norm(x)), grid


def _patch_tokens(model, x, p: int, keep, generator):
    """Kept patch tokens (total, D) with their position embedding, and the keep info."""
    pe = model.patch_embed
    B = x.shape[0]
    pos, _ = _pos_parts(model)
    if fused_embed(model):
        if pe.dynamic_img_pad:
            x = _pad(x, p, p)
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        idx, cu, lens, ragged = resolve_keep(model, keep, B, grid[0] * grid[1], x.device, generator)
        g0 = tuple(pe.grid_size)
        fuse_pos = pos is not None and g0[0] == g0[1] and isinstance(pe.norm, torch.nn.Identity)
        n = grid[0] * grid[1]
        if not ragged and lens[0] == n:  # every patch, in order (sample_keep's layout): the dense op
            tokens = _patch_embed(x, pe.proj.weight, pe.proj.bias, p, pos if fuse_pos else None)
            tokens = tokens.reshape(B * n, tokens.shape[-1])
        else:
            tokens = _patch_embed(x, pe.proj.weight, pe.proj.bias, p, pos if fuse_pos else None, idx, cu)
        tokens = pe.norm(tokens)
        if pos is not None and not fuse_pos:
            tokens = tokens + _pos_grid(model, pos, grid).to(tokens.dtype).index_select(0, idx)
        return tokens, cu, lens, ragged
    dense, grid = _dense_tokens(model, x)
    n = grid[0] * grid[1]
    idx, cu, lens, ragged = resolve_keep(model, keep, B, n, x.device, generator)
    flat = idx + torch.repeat_interleave(torch.arange(B, device=x.device) * n,
                                         torch.tensor(lens, device=x.device), output_size=idx.shape[0])
    tokens = dense.reshape(B * n, -1).index_select(0, flat)
    if pos is not None:
        tokens = tokens + _pos_grid(model, pos, grid).to(tokens.dtype).index_select(0, idx)
    return tokens, cu, lens, ragged


def embed(model, x, p: int, keep, generator=None):
    """One view -> (tokens (total, D) with prefix tokens first, per-sample lengths, ragged)."""
    tokens, cu, lens, ragged = _patch_tokens(model, x, p, keep, generator)
    prefix = prefix_tokens(model)
    if prefix is None:
        return tokens, lens, ragged
    B = len(lens)
    P, D = prefix.shape
    B_P = B * P
    lens_out = [n_b + P for n_b in lens]
    dev = tokens.device
    # gather index: output row -> row of cat([prefix repeated B times, tokens])
    lo = torch.tensor(lens_out, dtype=torch.int64).to(dev)
    cu_out = torch.zeros(B + 1, device=dev, dtype=torch.int64)
    cu_out[1:] = lo.cumsum(0)
    total = sum(lens_out)
    seg = torch.repeat_interleave(torch.arange(B, device=dev), lo, output_size=total)
    r = torch.arange(total, device=dev) - cu_out[seg]
    cu_in = cu.to(torch.int64)
    g = torch.where(r < P, seg * P + r, B_P + cu_in[seg] + r - P)
    src = torch.cat([prefix.to(tokens.dtype).expand(B, P, D).reshape(B_P, D), tokens], dim=0)
    return src.index_select(0, g), lens_out, ragged
