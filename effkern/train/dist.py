"""Small torch.distributed helpers that degrade to single-process no-ops."""
from __future__ import annotations

import torch
import torch.distributed as _dist


def is_dist() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    return _dist.is_available() and _dist.is_initialized()


def rank() -> int:
    return _dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return _dist.get_world_size() if is_dist() else 1


def all_gather_with_grad(x: torch.Tensor) -> list[torch.Tensor]:
    """Autograd-aware all_gather: a list of world_size tensors (rank order); gradients
    flow back to every rank's ``x`` (torch.distributed.nn.functional.all_gather).
    Single process: ``[x]``."""
    if world_size() == 1:
        return [x]
    from torch.distributed.nn.functional import all_gather

    return list(all_gather(x))


@torch.no_grad()
def all_gather(x: torch.Tensor) -> list[torch.Tensor]:
    """Plain (no-grad) all_gather: a list of world_size tensors.  Single process: ``[x]``."""
    if world_size() == 1:
        return [x]
    out = [torch.empty_like(x) for _ in range(world_size())]
    _dist.all_gather(out, x.contiguous())
    return out


@torch.no_grad()
def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (sum / world_size); returns ``t``.  No-op single process."""
    if world_size() > 1:
        _dist.all_reduce(t)
        t.div_(world_size())
    return t
