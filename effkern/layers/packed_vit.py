"""Packed (ragged) forward functions for timm ViT ``Block`` / ``Attention`` modules.

Tokens of all sequences are concatenated on dim 0: ``x`` is (total, D) and
``cu_seqlens`` int32 (B+1,) marks the sequence boundaries (docs/architecture.md).
These functions reuse the parameters of live timm modules; they own no state.
Everything except attention is token-wise, so the timm sub-modules (norms, Mlp,
LayerScale, Linear, SwiGLU) are called directly on the packed (total, D) tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effkern.backend import get_backend
from effkern.layers.attention_dropout import varlen_attention_dropout
from effkern.ops import varlen_attention_qkvpacked


def equal_length(total: int, cu_seqlens: torch.Tensor, max_seqlen: int) -> bool:
    """Every packed sequence has ``max_seqlen`` tokens (keep None or a ratio; views of one
    size).  total == max_seqlen x sequences decides it from host ints when max_seqlen bounds
    every length (the packer's exact maximum always does); in eager mode the boundaries are
    read too (CPU only: free there), so a ``max_seqlen`` below the longest sequence goes to
    the varlen op, which rejects it.  While torch.compile traces, the values are data."""
    n = cu_seqlens.shape[0] - 1
    if max_seqlen <= 0 or total != max_seqlen * n or cu_seqlens.device.type != "cpu":
        return False
    return torch.compiler.is_compiling() or bool((cu_seqlens.diff() == max_seqlen).all())


def dense_attention(qkv: torch.Tensor, length: int, scale: float) -> torch.Tensor:
    """Equal-length packed sequences on the CPU: (total, 3, H, D) -> (total, H, D) by torch's
    scaled_dot_product_attention on the zero-copy (n, H, L, D) views, exactly as timm's
    ``Attention`` calls it.  The same ATen kernel the varlen op's CPU path runs, without the
    custom op's dispatch, checks and gradient copies: about 1.3 ms less per block forward +
    backward at ViT-Ti/16 batch 8 on 2 cores (interleaved, medians; 9.3 vs 10.6 ms with the qkv
    Linear), which was the whole gap of the patched model to timm at keep 1.  Packs of
    several lengths stay on the varlen op: SDPA per run of equal length plus the
    concatenation measured no faster there (MoCo keeps 0.5/0.25 0.99x, DINO 2x224 + 8x96
    0.99x of the op, batch 32)."""
    total, _, heads, head_dim = qkv.shape
    q, k, v = qkv.reshape(total // length, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(total, heads, head_dim)


def packed_attention(attn, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """timm ``Attention.forward`` on packed tokens: (total, D) -> (total, D).

    Attention dropout in training (``attn.attn_drop.p > 0``) runs the PyTorch
    fallback effkern.layers.attention_dropout (the varlen kernels have no dropout).
    On the CPU with the ``auto`` backend, equal-length sequences run
    :func:`dense_attention` (torch's SDPA, as timm); everything else the varlen op."""
    total = x.shape[0]
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(total, 3, attn.num_heads, attn.head_dim)
    if not isinstance(attn.q_norm, torch.nn.Identity) or not isinstance(attn.k_norm, torch.nn.Identity):
        q, k, v = qkv.unbind(1)
        qkv = torch.stack((attn.q_norm(q), attn.k_norm(k), v), dim=1)
    drop = float(attn.attn_drop.p) if attn.training else 0.0
    if drop > 0.0:
        out = varlen_attention_dropout(qkv, cu_seqlens, attn.scale, drop)
    elif x.device.type == "cpu" and get_backend() == "auto" and equal_length(total, cu_seqlens, max_seqlen):
        out = dense_attention(qkv, max_seqlen, attn.scale)
    else:
        out = varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, scale=attn.scale)
    out = attn.norm(out.reshape(total, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def packed_drop_path(x: torch.Tensor, drop_path, seqlens: torch.Tensor, training: bool) -> torch.Tensor:
    """timm ``DropPath`` per *sequence* (not per row) of packed ``x`` (total, D).

    seqlens (B,) int64 on x's device; one Bernoulli draw per sequence, expanded
    to its tokens.  Identity modules and eval mode pass x through.
    """
    p = float(getattr(drop_path, "drop_prob", 0.0) or 0.0)
    if p == 0.0 or not training:
        return x
    keep_prob = 1.0 - p
    mask = x.new_empty(seqlens.shape[0]).bernoulli_(keep_prob)
    if keep_prob > 0.0 and getattr(drop_path, "scale_by_keep", True):
        mask.div_(keep_prob)
    mask = mask.repeat_interleave(seqlens, output_size=x.shape[0])
    return x * mask[:, None]


def packed_block(block, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                 seqlens: torch.Tensor) -> torch.Tensor:
    """timm ``Block.forward`` (pre-norm residual) on packed tokens (total, D)."""
    y = block.ls1(packed_attention(block.attn, block.norm1(x), cu_seqlens, max_seqlen))
    x = x + packed_drop_path(y, block.drop_path1, seqlens, block.training)
    y = block.ls2(block.mlp(block.norm2(x)))
    return x + packed_drop_path(y, block.drop_path2, seqlens, block.training)
