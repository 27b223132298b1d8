"""Data parallelism for ``torchrun -m effkern train``: process-group set-up from the
torchrun environment (NCCL on GPU, gloo on CPU) and gradient averaging.

Each rank computes its loss on its shard of the global batch (the methods gather
negatives / keys / the DINO centre across ranks themselves); averaging the
gradients over ranks then gives exactly the single-process gradient of the mean
loss over the global batch, which is what DistributedDataParallel computes."""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist


def init_from_env(device: str) -> bool:
    """Initialise the default process group when launched by torchrun; True if it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or tdist.is_initialized():
        return False
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend=backend)
    return True


def destroy() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


@torch.no_grad()
def all_reduce_grads_(params) -> None:
    """Average .grad over ranks (one flat buffer per dtype); no-op on one process."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    by_dtype: dict = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    world = tdist.get_world_size()
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        tdist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over ranks (for logging the global-batch loss)."""
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        value = value.detach().clone().float()
        tdist.all_reduce(value)
        value /= tdist.get_world_size()
    return float(value)
