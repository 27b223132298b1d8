"""effkern.ops.sample_keep: random token-dropout indices in the packed layout
that ``effkern.ops.patch_embed`` consumes.

Per image, draw uniform scores for the L patches, keep the ``count`` patches
with the largest scores, sort the kept indices (row-major patch order) and pack
all images one after the other:

    keep_idx   (total,) int64   patch indices, sorted within each image
    cu_seqlens (B+1,)  int32    cu_seqlens[b] = start of image b in keep_idx

Ratio ``keep`` (float): the same count for every image, ``max(1, int(L*keep))``
(as timm's PatchDropout); everything stays on the device (topk + sort), no host
sync on CUDA.  Count tensor ``keep`` (B,): ragged; the output length total =
sum(counts) must be known on the host to allocate keep_idx, so the counts are
read once on the host (free for CPU counts; one device->host sync for CUDA
counts -- pass the counts on CPU to avoid it; they are checked to lie in 1..L).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from effkern.ops import _checks


def _device(device, generator: Optional[torch.Generator], keep) -> torch.device:
    if device is not None:
        return _checks.device("device", device)
    if generator is not None:
        return torch.device(generator.device)
    if isinstance(keep, torch.Tensor):
        return keep.device
    return torch.device("cpu")


def sample_keep(batch: int, num_patches: int, keep: Union[float, torch.Tensor],
                generator: Optional[torch.Generator] = None,
                device: Optional[Union[str, torch.device]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random kept-patch indices for ``batch`` images of ``num_patches`` patches.

    keep: a ratio in (0, 1] (max(1, int(num_patches*keep)) per image) or a (batch,)
    integer tensor of per-image counts in 1..num_patches.  Returns (keep_idx int64
    (total,), cu_seqlens int32 (batch+1,)) on ``device`` (default: the generator's
    device, else the counts' device, else CPU).  Reproducible with ``generator``.
    """
    B = _checks.positive_int("batch", batch)
    L = _checks.positive_int("num_patches", num_patches)
    generator = _checks.generator("generator", generator)
    dev = _device(device, generator, keep)
    if generator is not None and torch.device(generator.device).type != dev.type:
        raise ValueError(f"generator is on {generator.device} but device is {dev}")
    # no generator= kwarg when None: torch.rand(..., generator=None) does not trace with
    # symbolic sizes under torch.compile(dynamic=True)
    scores = (torch.rand((B, L), device=dev) if generator is None
              else torch.rand((B, L), generator=generator, device=dev))

    if not isinstance(keep, torch.Tensor):
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise _checks.ArgumentTypeError(f"keep must be a ratio in (0, 1] or a (batch,) tensor of counts, "
                                            f"got {keep!r}")
        keep = float(keep)
        if not (0.0 < keep <= 1.0):
            raise ValueError(f"keep ratio must be in (0, 1], got {keep}")
        count = max(1, int(L * keep))
        if count == L:
            idx = torch.arange(L, device=dev, dtype=torch.int64).expand(B, L)
        else:
            idx = scores.topk(count, dim=1, sorted=False).indices.sort(dim=1).values
        cu = torch.arange(0, B + 1, device=dev, dtype=torch.int32) * count
        return idx.reshape(-1).contiguous(), cu

    counts = keep
    if counts.dim() != 1 or counts.shape[0] != B:
        raise ValueError(f"keep counts must have shape ({B},), got {tuple(counts.shape)}")
    if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise ValueError(f"keep counts must be an integer tensor, got dtype {counts.dtype}")
    counts_host = counts.to("cpu", torch.int64)  # one sync for CUDA counts (total sizes the output)
    if bool(((counts_host < 1) | (counts_host > L)).any()):
        raise ValueError(f"keep counts must lie in 1..{L} (num_patches), got min {int(counts_host.min())} "
                         f"and max {int(counts_host.max())}")
    total = int(counts_host.sum())
    counts_dev = counts_host.to(dev, non_blocking=True)
    # rank of each patch among its image's scores (0 = largest); keep rank < count
    order = scores.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(L, device=dev, dtype=order.dtype).expand(B, L))
    mask = rank < counts_dev[:, None]
    if dev.type == "cuda" and hasattr(torch, "nonzero_static"):
        flat = torch.nonzero_static(mask.reshape(-1), size=total).reshape(-1)
    else:
        flat = mask.reshape(-1).nonzero().reshape(-1)
    keep_idx = flat % L
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = counts_host.cumsum(0)
    return keep_idx, cu.to(dev, non_blocking=True)
