"""Per-sequence pooling of packed ViT tokens: timm ``VisionTransformer.pool`` on the
ragged layout, without padding or masks.

x is (total, D) with the tokens of B sequences concatenated (lengths ``lens``, a
host list); every sequence starts with ``num_prefix`` prefix tokens (class /
register / distillation tokens).  Each function returns (B, ...) and is
differentiable (index_add / scatter_reduce / segment softmax, all autograd ops).

- ``pool_tokens``: timm's ``global_pool_nlc``: 'token' (the first token), 'avg',
  'max', 'avgmax' over each sequence's non-prefix tokens (or all of them with
  ``include_prefix``).
- ``attention_pool_latent``: timm ``AttentionPoolLatent`` ('map', SigLIP): a learned
  latent query attends to each sequence's own tokens.  The softmax runs over each
  segment (segment max, exp, segment sum), so the work is the real tokens only.
- ``attention_pool_prr``: timm ``AttentionPoolPrr`` ('prr'): parameter-free
  self-attention inside each sequence (effkern.ops.varlen_attention), then the
  first token or the mean.
"""

from __future__ import annotations

from typing import Sequence

import torch

from effkern.ops import varlen_attention


class Segments:
    """Row bookkeeping of a packed batch: lengths, starts, segment id of each row."""

    def __init__(self, lens: Sequence[int], device: torch.device):
        self.lens = list(lens)
        self.B = len(self.lens)
        self.total = sum(self.lens)
        self.lo = torch.tensor(self.lens, dtype=torch.int64).to(device)
        self.starts = torch.zeros(self.B, dtype=torch.int64, device=device)
        self.starts[1:] = self.lo.cumsum(0)[:-1]
        self.seg = torch.repeat_interleave(torch.arange(self.B, device=device), self.lo,
                                           output_size=self.total)
        self.rank = torch.arange(self.total, device=device) - self.starts[self.seg]

    def cu_seqlens(self) -> torch.Tensor:
        cu = torch.zeros(self.B + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(self.lens, dtype=torch.int64).cumsum(0)
        return cu.to(self.lo.device)

    def drop_prefix(self, x: torch.Tensor, num_prefix: int):
        """-> (rows of x without the first num_prefix of each sequence, their
        segment ids, the new Segments)."""
        if num_prefix == 0:
            return x, self.seg, self
        rows = (self.rank >= num_prefix).nonzero().reshape(-1)
        return (x.index_select(0, rows), self.seg.index_select(0, rows),
                Segments([n - num_prefix for n in self.lens], x.device))

    def first(self, x: torch.Tensor, count: int = 1) -> torch.Tensor:
        """The first ``count`` rows of each sequence: (B, count, D)."""
        idx = self.starts[:, None] + torch.arange(count, device=x.device)[None, :]
        return x.index_select(0, idx.reshape(-1)).reshape(self.B, count, *x.shape[1:])


def _segment_mean(x, seg, B, counts):
    return x.new_zeros(B, *x.shape[1:]).index_add(0, seg, x) / counts.to(x.dtype).clamp_min(1)[:, None]


def _segment_amax(x, seg, B):
    idx = seg[:, None].expand(-1, x.shape[1])
    return x.new_zeros(B, x.shape[1]).scatter_reduce(0, idx, x, "amax", include_self=False)


def pool_tokens(x: torch.Tensor, segs: Segments, pool_type: str, num_prefix: int,
                include_prefix: bool) -> torch.Tensor:
    """timm ``global_pool_nlc`` per sequence: (total, D) -> (B, D)."""
    if pool_type == "token":
        return x.index_select(0, segs.starts)
    if pool_type not in ("avg", "max", "avgmax"):
        raise ValueError(f"pool_type must be 'token', 'avg', 'max' or 'avgmax', got {pool_type!r}")
    xs, sg, rest = segs.drop_prefix(x, 0 if include_prefix else num_prefix)
    if min(rest.lens) < 1:
        raise ValueError("every sequence needs at least one non-prefix token to pool")
    if pool_type == "avg":
        return _segment_mean(xs, sg, segs.B, rest.lo)
    if pool_type == "max":
        return _segment_amax(xs, sg, segs.B)
    return 0.5 * (_segment_amax(xs, sg, segs.B) + _segment_mean(xs, sg, segs.B, rest.lo))


def segment_softmax(scores: torch.Tensor, seg: torch.Tensor, B: int) -> torch.Tensor:
    """Softmax of scores (total, ...) over the rows of each segment."""
    flat = scores.reshape(scores.shape[0], -1)
    idx = seg[:, None].expand_as(flat)
    m = flat.new_full((B, flat.shape[1]), float("-inf")).scatter_reduce(
        0, idx, flat.detach(), "amax", include_self=True)
    e = torch.exp(flat - m.index_select(0, seg))
    den = e.new_zeros(B, flat.shape[1]).index_add(0, seg, e)
    return (e / den.index_select(0, seg)).reshape(scores.shape)


def attention_pool_latent(pool, x: torch.Tensor, segs: Segments) -> torch.Tensor:
    """timm ``AttentionPoolLatent.forward`` per sequence of packed x (total, C)."""
    if pool.pos_embed is not None:
        raise ValueError("AttentionPoolLatent with pos_embed='abs' (a fixed token grid) cannot pool "
                         "ragged sequences")
    H, hd, Lq = pool.num_heads, pool.head_dim, pool.latent_len
    total, C = x.shape
    q = pool.q(pool.latent).reshape(Lq, H, hd).transpose(0, 1)          # (H, Lq, hd)
    k, v = pool.kv(x).reshape(total, 2, H, hd).unbind(1)                # (total, H, hd)
    q, k = pool.q_norm(q), pool.k_norm(k)
    s = torch.einsum("thd,hqd->thq", k, q * pool.scale)                 # (total, H, Lq)
    w = segment_softmax(s, segs.seg, segs.B)
    out = torch.einsum("thq,thd->tqhd", w, v).reshape(total, Lq * H * hd)
    out = out.new_zeros(segs.B, Lq * H * hd).index_add(0, segs.seg, out).reshape(segs.B, Lq, C)
    out = pool.proj_drop(pool.proj(out))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    if pool.pool == "token":
        return out[:, 0]
    if pool.pool == "avg":
        return out.mean(1)
    return out


def attention_pool_prr(pool, x: torch.Tensor, segs: Segments) -> torch.Tensor:
    """timm ``AttentionPoolPrr.forward`` per sequence of packed x (total, C)."""
    total, C = x.shape
    x = pool.pre_norm(x)
    qkv = x.reshape(total, pool.num_heads, pool.head_dim)
    x = varlen_attention(qkv, qkv, qkv, segs.cu_seqlens(), max(segs.lens), scale=pool.scale)
    x = pool.post_norm(x.reshape(total, C))
    if pool.pool == "token":
        return x.index_select(0, segs.starts)
    return _segment_mean(x, segs.seg, segs.B, segs.lo)
