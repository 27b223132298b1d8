"""Learning-rate, momentum and weight-decay schedules.

Two rules live here:

* ``peak_lr(lr, batch_size, rule)`` turns the ``--lr`` of a recipe into the peak learning
  rate of a run.  ``"linear"`` is the papers' rule (lr x batch / 256: MoCo v3, DINO, MAE at
  batch 1024-4096); ``"sqrt"`` (lr x sqrt(batch / 256)) is the square-root rule derived for
  adaptive optimisers (Malladi et al., "On the SDEs and Scaling Rules for Adaptive Gradient
  Algorithms", 2022) and keeps a sensible peak at the small batches of a CPU run (64-256);
  ``"none"`` takes ``--lr`` as the peak itself.
* ``lr_at_step(step, total_steps, ...)``: linear warm-up over the first ``warmup`` fraction of
  the run's optimizer *steps* (step 0 already trains, at base_lr / warmup_steps), then a
  half-cosine (or poly) decay to ``min_lr`` over the remaining steps.

``momentum_at`` / ``weight_decay_at`` are cosine ramps over a fraction in [0, 1] (the loop
passes the fraction of the run's steps done).
"""

from __future__ import annotations

import math

__all__ = ["LR_RULES", "peak_lr", "lr_at", "lr_at_step", "momentum_at", "weight_decay_at"]

LR_RULES = ("sqrt", "linear", "none")


def _clip(p: float) -> float:
    return min(max(float(p), 0.0), 1.0)


def peak_lr(lr: float, batch_size: int, rule: str = "sqrt") -> float:
    """The peak learning rate of a run: ``lr`` given per 256 images, scaled to ``batch_size``
    by ``rule`` ("sqrt": lr * sqrt(B/256), "linear": lr * B/256, "none": lr)."""
    if rule not in LR_RULES:
        raise ValueError(f"unknown lr rule {rule!r}; valid: {', '.join(LR_RULES)}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if rule == "linear":
        return lr * batch_size / 256
    if rule == "sqrt":
        return lr * math.sqrt(batch_size / 256)
    return float(lr)


def _decay(t: float, base_lr: float, min_lr: float, kind: str) -> float:
    f = 0.5 * (1.0 + math.cos(math.pi * t)) if kind == "cosine" else (1.0 - t) ** 2
    return min_lr + (base_lr - min_lr) * f


def _check_kind_warmup(kind: str, warmup: float) -> None:
    if kind not in ("cosine", "poly"):
        raise ValueError(f"unknown lr schedule kind {kind!r}; valid: cosine, poly")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be in [0, 1), got {warmup}")


def lr_at(progress: float, base_lr: float, warmup: float = 0.05, min_lr: float = 0.0,
          kind: str = "cosine") -> float:
    """The same shape over a continuous fraction ``progress`` in [0, 1]: linear warm-up from 0
    over the first ``warmup``, then decay ("cosine": half cosine, "poly": (1 - t)^2) to min_lr,
    t = (progress - warmup) / (1 - warmup).  Plots and analysis; the loop uses ``lr_at_step``."""
    _check_kind_warmup(kind, warmup)
    p = _clip(progress)
    if p < warmup:
        return base_lr * p / warmup
    return _decay((p - warmup) / (1.0 - warmup), base_lr, min_lr, kind)


def warmup_steps(total_steps: int, warmup: float) -> int:
    """Steps of linear warm-up: round(warmup * total_steps), at least 1 when warmup > 0."""
    if warmup <= 0:
        return 0
    return max(1, int(round(warmup * total_steps)))


def lr_at_step(step: int, total_steps: int, base_lr: float, warmup: float = 0.1, min_lr: float = 0.0,
               kind: str = "cosine") -> float:
    """LR of optimizer step ``step`` (0-based) of a run of ``total_steps``: linear warm-up
    base_lr * (step + 1) / W over the first W = warmup_steps(total_steps, warmup) steps (the
    first step is not wasted at LR 0), then decay to min_lr, reaching it at step total_steps - 1.
    Steps past ``total_steps - 1`` stay at min_lr."""
    _check_kind_warmup(kind, warmup)
    if int(total_steps) < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    w = warmup_steps(total_steps, warmup)
    if step < w:
        return base_lr * (step + 1) / w
    span = total_steps - 1 - w
    t = 1.0 if span <= 0 else _clip((step - w) / span)
    return _decay(t, base_lr, min_lr, kind)


def weight_decay_at(progress: float, start: float, end: float) -> float:
    """Cosine ramp of the weight decay from `start` to `end` (DINO: 0.04 -> 0.4)."""
    return momentum_at(progress, start, end)


def momentum_at(progress: float, start: float, end: float = 1.0) -> float:
    """Cosine ramp from `start` (progress 0) to `end` (progress 1), as MoCo v3 / BYOL / DINO:
    end - (end - start) * (cos(pi * p) + 1) / 2."""
    p = _clip(progress)
    return end - (end - start) * (math.cos(math.pi * p) + 1.0) / 2.0
