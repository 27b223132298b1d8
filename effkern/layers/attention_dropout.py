"""Ragged self-attention WITH attention dropout, in plain PyTorch: the training-mode
fallback of the packed ViT when a timm ``Attention`` has ``attn_drop.p > 0``.

    out[t] = dropout(softmax(scale * q[t] . k[s]^T over tokens s of t's sequence)) v

Neither effkern.ops.varlen_attention's reference path nor its Triton kernels
draw a dropout mask, so this function takes over: sequences of equal length are
gathered into one dense (n, H, L, L) batch (no padding, no mask) and run timm's
own non-fused math -- ``q * scale @ k^T -> softmax -> F.dropout -> @ v``.  The
mask comes from the global torch RNG (``torch.manual_seed`` makes it
reproducible).  When every sequence has the same length (keep None or a ratio)
the draws are exactly those of timm's non-fused ``Attention`` on the (B, H, N, N)
batch: same seed, same mask, same output.  Autograd differentiates it.  Memory is
the dense score tensor of each length group (chunked), so this is a fallback for
training runs that ask for attention dropout, not the fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effkern.reference.varlen_attention import length_groups


def varlen_attention_dropout(qkv: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
                             dropout_p: float) -> torch.Tensor:
    """qkv (total, 3, H, D) (timm's ``qkv(x).reshape(total, 3, H, D)``, q_norm / k_norm
    already applied), cu_seqlens int32 (B+1,) -> (total, H, D).  ``dropout_p`` in
    [0, 1): dropout on the attention probabilities (training semantics, scaled by
    1 / (1 - p))."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    total, _, heads, head_dim = qkv.shape
    rows, outs = [], []
    for length, starts in length_groups(cu_seqlens, heads):
        idx = (starts[:, None] + torch.arange(length)[None, :]).to(qkv.device)   # (n, L)
        q, k, v = qkv[idx].permute(2, 0, 3, 1, 4).unbind(0)                       # (n, H, L, D)
        attn = (q * scale) @ k.transpose(-2, -1)
        attn = F.dropout(attn.softmax(dim=-1), dropout_p, training=True)
        outs.append((attn @ v).transpose(1, 2).reshape(-1, heads, head_dim))      # (n*L, H, D)
        rows.append(idx.reshape(-1))
    if not outs:
        return qkv.new_zeros(total, heads, head_dim)
    out = torch.cat(outs)
    return out.new_zeros(total, heads, head_dim).index_copy(0, torch.cat(rows), out)
