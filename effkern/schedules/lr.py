"""Learning-rate and momentum schedules as functions of progress (budget spent / budget)."""

from __future__ import annotations

import math

__all__ = ["lr_at", "momentum_at"]


def _clip(p: float) -> float:
    return min(max(float(p), 0.0), 1.0)


def lr_at(progress: float, base_lr: float, warmup: float = 0.05, min_lr: float = 0.0,
          kind: str = "cosine") -> float:
    """Linear warmup from 0 to base_lr over the first `warmup` fraction of progress, then
    decay to min_lr over the rest: "cosine" (half cosine) or "poly" (alpha 2:
    min_lr + (base_lr - min_lr) * (1 - t)^2), t = (progress - warmup) / (1 - warmup)."""
    if kind not in ("cosine", "poly"):
        raise ValueError(f"unknown lr schedule kind {kind!r}; valid: cosine, poly")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be in [0, 1), got {warmup}")
    p = _clip(progress)
    if p < warmup:
        return base_lr * p / warmup
    t = (p - warmup) / (1.0 - warmup)
    if kind == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        f = (1.0 - t) ** 2
    return min_lr + (base_lr - min_lr) * f


def weight_decay_at(progress: float, start: float, end: float) -> float:
    """Cosine ramp of the weight decay from `start` to `end` (DINO: 0.04 -> 0.4)."""
    return momentum_at(progress, start, end)


def momentum_at(progress: float, start: float, end: float = 1.0) -> float:
    """Cosine ramp from `start` (progress 0) to `end` (progress 1), as MoCo v3 / BYOL / DINO:
    end - (end - start) * (cos(pi * p) + 1) / 2."""
    p = _clip(progress)
    return end - (end - start) * (math.cos(math.pi * p) + 1.0) / 2.0
