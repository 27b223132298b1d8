"""Data parallelism for ``torchrun -m effkern train`` on torch's own engine, and the
collectives the methods need; everything degrades to a no-op on one process.

Process group: set up from the torchrun environment (NCCL on GPU, gloo on CPU).

Gradients: :func:`wrap_step` puts the method's training step -- the trained encoder
and its heads; the momentum / teacher copies carry no gradient -- under

- ``DistributedDataParallel`` (default): parameters and buffers broadcast from rank 0
  when it is built (so every rank starts from rank 0's weights whatever its seed), and
  gradients averaged by bucketed all-reduces that run while the backward is still
  computing the remaining gradients;
- ``fully_shard`` (FSDP2, ``--fsdp``) for ViTs that do not fit replicated: every
  parameter, gradient and optimizer state is sharded over the ranks and gathered per
  unit (each block's qkv / proj Linear and MLP, the heads, the rest of each encoder)
  just before it is used.  The momentum / teacher copies are sharded the same way, so
  the EMA update runs shard by shard.

Each rank computes the loss on its shard of the global batch; averaging the gradients
then gives the single-process gradient of the mean loss over the global batch.  The
methods gather what the loss needs from the other ranks themselves
(:func:`all_gather` for MoCo's keys, :func:`all_gather_with_grad` for SimCLR's
negatives, :func:`all_reduce_mean_` for DINO's centre).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as _dist
from torch import nn

MODES = ("ddp", "fsdp")


# ----------------------------------------------------------------------------- process group

def init_from_env(device: str) -> bool:
    """Initialise the default process group when launched by torchrun; True if it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _dist.is_initialized():
        return False
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _dist.init_process_group(backend=backend)
    return True


def destroy() -> None:
    if _dist.is_initialized():
        _dist.destroy_process_group()


def is_dist() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    return _dist.is_available() and _dist.is_initialized()


def rank() -> int:
    return _dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return _dist.get_world_size() if is_dist() else 1


# ----------------------------------------------------------------------------- collectives

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


@torch.no_grad()
def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor of values (one all-reduce; the tensor stays on its
    device, nothing is read back to the host).  Single process: ``values`` itself."""
    if world_size() == 1:
        return values
    return all_reduce_mean_(values.detach().clone().float())


# ----------------------------------------------------------------------------- wrapping the step

class TrainingStep(nn.Module):
    """A module whose forward is ``method.training_step``: what DDP / FSDP2 wrap (their
    hooks run in the module's forward).  The method itself stays unwrapped, so its
    state_dict keys are the same on one process and on many."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, *args, **kwargs):
        return self.method.training_step(*args, **kwargs)


def wrap_step(method: nn.Module, device: torch.device, mode: str = "ddp"):
    """The callable the loop runs a step with: ``method.training_step`` on one process;
    on several, the step under DistributedDataParallel (``mode="ddp"``) or with every
    parameter sharded by FSDP2's ``fully_shard`` (``mode="fsdp"``)."""
    if mode not in MODES:
        raise ValueError(f"data-parallel mode must be one of {MODES}, got {mode!r}")
    if world_size() == 1:
        return method.training_step
    if device.type != "cuda" and any(isinstance(m, nn.SyncBatchNorm) for m in method.modules()):
        raise ValueError("sync_bn: SyncBatchNorm runs on GPUs only; on CPU pass --method-arg sync_bn=false "
                         "(each rank's BatchNorm then normalises over its own shard of the batch)")
    step = TrainingStep(method)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: a self-supervised method never uses the encoder's classifier head
        ids = None
        if device.type == "cuda":  # "cuda" without an index: the rank's device (init_from_env set it)
            ids = [device.index if device.index is not None else torch.cuda.current_device()]
        return DistributedDataParallel(step, device_ids=ids, find_unused_parameters=True)
    broadcast_from_rank0_(step)  # fully_shard keeps each rank's own values: start from rank 0's
    return _fully_shard(step, device)


@torch.no_grad()
def broadcast_from_rank0_(module: nn.Module) -> None:
    """Every parameter and buffer of ``module`` set to rank 0's value (DDP does this itself)."""
    for t in [*module.parameters(), *module.buffers()]:
        _dist.broadcast(t.data, src=0)


def _fully_shard(step: TrainingStep, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world_size(),))
    encoders = [m for m in step.modules() if hasattr(m, "forward_views")]
    for encoder in encoders:
        # the packed forward calls these modules, not Block.forward: they are the units
        for blk in encoder.blocks:
            for unit in (blk.attn.qkv, blk.attn.proj, blk.mlp):
                fully_shard(unit, mesh=mesh)
        fully_shard(encoder, mesh=mesh)
        register_fsdp_forward_method(encoder, "forward_views")  # unshard for forward_views too
    for child in step.method.children():  # the heads and their momentum / teacher copies
        if child not in encoders and any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    return fully_shard(step, mesh=mesh)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_tensor(t):
    """The whole value of a possibly sharded tensor (a DTensor is gathered); others as given."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ----------------------------------------------------------------------------- checkpoints

def full_state(method: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model state_dict, optimizer state_dict) as whole tensors with the single-process
    keys.  Sharded (FSDP2): gathered to rank 0 on the CPU -- a collective, call it on every
    rank; the other ranks get empty dicts."""
    if not is_sharded(method):
        return method.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(method, options=options),
            get_optimizer_state_dict(method, optimizer, options=options))


def load_full_state(method: nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load what :func:`full_state` returned (every rank passes the whole state)."""
    if not is_sharded(method):
        method.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    set_model_state_dict(method, model_state, options=StateDictOptions(full_state_dict=True))
    # strict=False: parameters that never had a gradient (a self-supervised method's unused
    # classifier head) have no AdamW state, as in optimizer.state_dict() on one process
    set_optimizer_state_dict(method, optimizer, optimizer_state,
                             options=StateDictOptions(full_state_dict=True, strict=False))
