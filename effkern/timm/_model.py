"""The patched class: ``PackedVisionTransformer`` and the per-class subclasses that
``patch()`` swaps in.

``patch(model)`` sets ``model.__class__`` to ``Packed<Original>``, a subclass of
(PackedVisionTransformer, Original) generated once per original class: the MRO
puts the effkern methods first and the original class (with its own overrides,
e.g. the distilled DeiT's head) right behind, so ``super()`` is the original code.
No instance attribute is added; parameters, buffers and state_dict keys are the
original's.  ``unpatch(model)`` sets the class back.

Native call path (no effkern argument, an image size timm accepts): the methods
call ``super()`` first thing, so eager, torch.jit.trace and torch.fx see timm's
code (FX proxies are never inspected).  TorchScript: ``__prepare_scriptable__``
hands torch.jit.script an unpatched shallow view (same parameters) -- the scripted
module IS timm's, and effkern arguments are rejected by TorchScript's own
signature check.  Pickle / deepcopy / torch.save rebuild the generated class from
the original one (``__reduce_ex__``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer

from effkern.layers.packed_vit import packed_block
from effkern.layers.ragged_pool import Segments, attention_pool_latent, attention_pool_prr, pool_tokens
from effkern.timm import _embed

from torch.fx import _symbolic_trace as _fx

# torch >= 2.9 splits fx.symbolic_trace from torch.export tracing; older torch has one flag
is_fx_tracing = getattr(_fx, "is_fx_symbolic_tracing", None) or _fx.is_fx_tracing


# ------------------------------------------------------------------ packed trunk + head

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
    ckpt = model.grad_checkpointing and torch.is_grad_enabled()
    for blk in model.blocks:
        if ckpt:
            x = torch.utils.checkpoint.checkpoint(packed_block, blk, x, cu, max_seqlen, seqlens,
                                                  use_reentrant=False)
        else:
            x = packed_block(blk, x, cu, max_seqlen, seqlens)
    return model.norm(x)


def _features_out(x: torch.Tensor, lens: Sequence[int], ragged: bool):
    if ragged:
        return x, _cu(lens, x.device)
    return x.reshape(len(lens), lens[0], x.shape[-1])


def _ragged_pool(model, x: torch.Tensor, segs: Segments) -> torch.Tensor:
    """timm ``VisionTransformer.pool`` per packed sequence: (total, D) -> (B, D)."""
    P = model.num_prefix_tokens
    pool = model.attn_pool
    if pool is not None:
        if type(pool).__name__ == "AttentionPoolPrr":
            return attention_pool_prr(pool, x, segs)  # prr pools over every token, prefix included
        if not model.pool_include_prefix:
            x, _, segs = segs.drop_prefix(x, P)
        return attention_pool_latent(pool, x, segs)
    return pool_tokens(x, segs, model.global_pool, P, model.pool_include_prefix)


def _head(model, x, lens, ragged, pre_logits: bool):
    """timm forward_head per sample.  Equal lengths: the class's own forward_head on
    (B, L, D) (exact timm, any pool).  Ragged: 'token' pooling reads only the prefix
    tokens, so the class's forward_head runs on them (B, P, D) -- the distilled DeiT's
    two-token head included; other pools run ragged (effkern.layers.ragged_pool)."""
    if not ragged:
        return model.forward_head(x.reshape(len(lens), lens[0], x.shape[-1]), pre_logits=pre_logits)
    segs = Segments(lens, x.device)
    if model.global_pool == "token" and model.attn_pool is None:
        return model.forward_head(segs.first(x, model.num_prefix_tokens), pre_logits=pre_logits)
    if not model.global_pool:  # no pooling: per-token head, same contract as forward_features
        x = model.head_drop(model.fc_norm(x))
        return _features_out(x if pre_logits else model.head(x), lens, ragged)
    x = model.head_drop(model.fc_norm(_ragged_pool(model, x, segs)))
    return x if pre_logits else model.head(x)


def _packed_features(model, x, patch_size, keep, generator):
    tokens, lens, ragged = _embed.embed(model, x, patch_size, keep, generator)
    return _trunk(model, tokens, lens), lens, ragged


def _effkern_args(patch_size, keep, generator) -> bool:
    return patch_size is not None or keep is not None or generator is not None


# ------------------------------------------------------------------ the class

class PackedVisionTransformer(VisionTransformer):
    """Mixin base of the classes ``effkern.timm.patch`` generates (never built directly).

    Adds ``patch_size=``, ``keep=`` and ``generator=`` to ``forward`` and
    ``forward_features`` and the ragged multi-view ``forward_views``.  See
    docs/timm.md for the return contract."""

    _effkern_base: type = VisionTransformer

    def _use_native(self, x, patch_size, keep, generator) -> bool:
        if is_fx_tracing() or not isinstance(x, torch.Tensor):
            # fx makes placeholders (Proxies) of the keyword arguments too: only real
            # values (concrete_args) are effkern arguments
            if any(a is not None and not isinstance(a, torch.fx.Proxy) for a in (patch_size, keep, generator)):
                raise ValueError("effkern.timm: patch_size= / keep= / generator= are not supported "
                                 "under torch.fx symbolic tracing (the native path traces as timm's)")
            return True
        if torch.jit.is_tracing() and not _effkern_args(patch_size, keep, generator):
            return True  # torch.jit.trace: timm's code, as timm would trace it
        if not _effkern_args(patch_size, keep, generator) and x.dim() == 4 \
                and _embed.is_native(self, x, _embed.native_patch(self), None):
            return True
        p = _embed.resolve_patch(self, x, patch_size)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        return _embed.is_native(self, x, p, keep)

    def forward_features(self, x, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False, *,
                         patch_size=None, keep=None, generator=None):
        """timm forward_features with ``patch_size=`` and ``keep=`` (see docs/timm.md for
        the return contract).  Native patch size, an image size timm takes and keep None
        run the original timm code.  ``generator`` (a torch.Generator) draws the kept
        patches when ``keep`` is a ratio or a count tensor (default: the global RNG)."""
        if self._use_native(x, patch_size, keep, generator):
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask / is_causal are not supported with patch_size= or keep=")
        p = _embed.resolve_patch(self, x, patch_size)
        feats, lens, ragged = _packed_features(self, x, p, keep, generator)
        return _features_out(feats, lens, ragged)

    def forward(self, x, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False, *,
                patch_size=None, keep=None, generator=None):
        """timm forward with ``patch_size=`` and ``keep=``: pooling is per sample over its
        own tokens, then fc_norm, head_drop, head.  ``generator``: as in forward_features."""
        if self._use_native(x, patch_size, keep, generator):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask / is_causal are not supported with patch_size= or keep=")
        p = _embed.resolve_patch(self, x, patch_size)
        feats, lens, ragged = _packed_features(self, x, p, keep, generator)
        return _head(self, feats, lens, ragged, pre_logits=False)

    def forward_views(self, views, patch_sizes=None, keeps=None, generator=None):
        """Run several views (same batch size, any resolutions) as ONE packed batch.

        views: list of (B, C, H_v, W_v) tensors; patch_sizes / keeps: None or lists of
        the same length (entries as for ``forward``).  Tokens are packed view-major
        (all samples of view 0, then view 1, ...) and go through the blocks once.
        Returns a list with, per view, timm's ``forward_head(pre_logits=True)``
        features: pool + fc_norm (+ head_drop), (B, D).  ``generator`` (one
        torch.Generator for all views, drawn in view order) samples the ratio / count keeps.
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
        ps = [_embed.resolve_patch(self, v, p) for v, p in zip(views, patch_sizes)]
        B = views[0].shape[0]
        if any(v.shape[0] != B for v in views):
            raise ValueError(f"all views must have the same batch size, got {[v.shape[0] for v in views]}")
        embedded = [_embed.embed(self, v, p, k, generator) for v, p, k in zip(views, ps, keeps)]
        lens = [n for _, lv, _ in embedded for n in lv]
        x = _trunk(self, torch.cat([t for t, _, _ in embedded], dim=0), lens)
        # one split, not a slice per view: a slice's backward zero-fills a (total, D) gradient
        # for every view and autograd adds the V of them up; split's backward is one cat
        chunks = torch.split(x, [sum(lv) for _, lv, _ in embedded])
        return [_head(self, c, lv, ragged, pre_logits=True) for c, (_, lv, ragged) in zip(chunks, embedded)]

    # ---- TorchScript, pickle

    def _effkern_native_view(self):
        base = type(self)._effkern_base
        native = base.__new__(base)
        native.__dict__.update(self.__dict__)  # shallow: the same parameters and submodules
        return native

    def __prepare_scriptable__(self):
        """torch.jit.script scripts timm's own class (the native path)."""
        return self._effkern_native_view()

    def __reduce_ex__(self, protocol):
        return _rebuild, (type(self)._effkern_base,), self.__getstate__()


_CLASSES: dict = {}


def packed_class(base: type) -> type:
    """``Packed<base>``: (PackedVisionTransformer, base), generated once per class."""
    cls = _CLASSES.get(base)
    if cls is None:
        name = f"Packed{base.__name__}"
        cls = type(name, (PackedVisionTransformer, base),
                   {"_effkern_base": base, "__module__": __name__, "__qualname__": name,
                    "__doc__": f"{base.__name__} patched by effkern.timm (see PackedVisionTransformer)."})
        _CLASSES[base] = cls
    return cls


def _rebuild(base: type):
    """Unpickling: an empty instance of the generated class (state set by __setstate__)."""
    cls = packed_class(base)
    return cls.__new__(cls)
