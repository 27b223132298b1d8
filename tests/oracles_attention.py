"""Float64 oracle for ragged attention, written independently of effkern:
one sequence at a time, softmax(q k^T * scale) v in float64."""

from __future__ import annotations

import torch


def varlen_attention_oracle(q, k, v, cu_seqlens, scale=None):
    """q, k, v (total, H, D) any float dtype -> float64 (total, H, D); differentiable."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    bounds = cu_seqlens.tolist()
    outs = [q.new_zeros((0,) + tuple(q.shape[1:]))]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        s = torch.einsum("thd,shd->hts", q[a:b], k[a:b]) * scale
        outs.append(torch.einsum("hts,shd->thd", torch.softmax(s, dim=-1), v[a:b]))
    return torch.cat(outs)


def make_cu_seqlens(lengths, device="cpu"):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)
