"""Stage and Schedule: what the trainer does at a given point of its budget.

A *stage* fixes the per-step knobs the cheap-pretraining methods vary: the patch size,
per-branch token keep ratios, the ET++ low-pass bandwidth (as a fraction of the base
resolution) and the ET++ RandAugment magnitude.  A *schedule* maps training progress
(budget spent / budget, in [0, 1]) to a stage: a sorted list of (start, stage) pairs,
the first starting at 0.0; stage i holds on [start_i, start_{i+1}).
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Stage", "Schedule"]


def _check_ratio(name: str, value: float) -> float:
    value = float(value)
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


@dataclass(frozen=True)
class Stage:
    """The knobs of one stage.

    patch_size: patch size of the encoder (None = the model's native patch size).
    keep: per-branch keep ratios, e.g. (("q", 0.5), ("k", 0.25)); the branch "default"
        applies to any branch not listed; empty = keep everything (1.0).
    resolution: ET++ bandwidth B as a fraction of the base resolution (1.0 = full); the
        trainer low-pass crops global views to :meth:`global_size` px (base * resolution
        in whole patches) with effkern.ops.fft_crop.
    randaug_magnitude: ET++ RandAugment magnitude m (None = no RandAugment).
    name: a label for tables and logs.
    """

    patch_size: int | None = None
    keep: tuple[tuple[str, float], ...] = ()
    resolution: float = 1.0
    randaug_magnitude: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.patch_size is not None:
            if isinstance(self.patch_size, bool) or int(self.patch_size) != self.patch_size \
                    or self.patch_size < 1:
                raise ValueError(f"patch_size must be an int >= 1 or None, got {self.patch_size!r}")
            object.__setattr__(self, "patch_size", int(self.patch_size))
        keep = self.keep.items() if isinstance(self.keep, dict) else self.keep
        pairs = []
        seen = set()
        for pair in keep:
            branch, ratio = pair
            branch = str(branch)
            if branch in seen:
                raise ValueError(f"keep lists branch {branch!r} twice")
            seen.add(branch)
            pairs.append((branch, _check_ratio(f"keep[{branch!r}]", ratio)))
        object.__setattr__(self, "keep", tuple(pairs))
        object.__setattr__(self, "resolution", _check_ratio("resolution", self.resolution))
        if self.randaug_magnitude is not None:
            m = self.randaug_magnitude
            if isinstance(m, bool) or int(m) != m or m < 0:
                raise ValueError(f"randaug_magnitude must be an int >= 0 or None, got {m!r}")
            object.__setattr__(self, "randaug_magnitude", int(m))

    def global_size(self, base_size: int, native_patch: int) -> int:
        """Side of a global view at this stage: ``base_size * resolution`` rounded to whole
        patches of this stage's patch size (else ``native_patch``), at least one patch;
        ``base_size`` itself at full resolution.  The one rule the trainer, its cost model
        and ``effkern schedule show`` all use."""
        if self.resolution >= 1.0:
            return base_size
        p = self.patch_size or native_patch
        return max(p, round(base_size * self.resolution / p) * p)

    def keep_for(self, branch: str) -> float:
        """The keep ratio of `branch`, else the "default" branch's, else 1.0."""
        d = dict(self.keep)
        if branch in d:
            return d[branch]
        return d.get("default", 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, "keep": dict(self.keep),
                "resolution": self.resolution, "randaug_magnitude": self.randaug_magnitude,
                "name": self.name}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Stage":
        unknown = set(d) - {"patch_size", "keep", "resolution", "randaug_magnitude", "name"}
        if unknown:
            raise ValueError(f"unknown Stage fields {sorted(unknown)}")
        keep = d.get("keep") or ()
        keep = tuple(keep.items()) if isinstance(keep, dict) else tuple(tuple(p) for p in keep)
        return cls(patch_size=d.get("patch_size"), keep=keep,
                   resolution=d.get("resolution", 1.0),
                   randaug_magnitude=d.get("randaug_magnitude"), name=d.get("name", ""))


class Schedule:
    """A piecewise-constant map from progress in [0, 1] to a Stage.

    stages: [(start, stage), ...] with strictly increasing starts in [0, 1), the first 0.0.
    """

    def __init__(self, name: str, stages: list[tuple[float, Stage]]):
        if not stages:
            raise ValueError("a schedule needs at least one stage")
        stages = [(float(s), st) for s, st in stages]
        starts = [s for s, _ in stages]
        if starts[0] != 0.0:
            raise ValueError(f"the first stage must start at 0.0, got {starts[0]}")
        for a, b in zip(starts, starts[1:]):
            if not b > a:
                raise ValueError(f"stage starts must be strictly increasing, got {starts}")
        if starts[-1] >= 1.0:
            raise ValueError(f"stage starts must be < 1.0, got {starts[-1]}")
        for _, st in stages:
            if not isinstance(st, Stage):
                raise TypeError(f"expected Stage, got {type(st).__name__}")
        self.name = str(name)
        self.stages = stages
        self._starts = starts

    def at(self, progress: float) -> Stage:
        """The stage at `progress` (budget spent / budget), clipped to [0, 1]."""
        p = min(max(float(progress), 0.0), 1.0)
        return self.stages[bisect.bisect_right(self._starts, p) - 1][1]

    def intervals(self) -> list[tuple[float, float, Stage]]:
        """[(start, end, stage), ...], the last ending at 1.0."""
        ends = self._starts[1:] + [1.0]
        return [(s, e, st) for (s, st), e in zip(self.stages, ends)]

    def to_json(self) -> str:
        return json.dumps({"name": self.name,
                           "stages": [{"start": s, "stage": st.to_dict()} for s, st in self.stages]},
                          indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        d = json.loads(text)
        if not isinstance(d, dict) or "stages" not in d:
            raise ValueError('schedule JSON must be {"name": ..., "stages": [{"start": ..., "stage": {...}}, ...]}')
        return cls(d.get("name", ""), [(e["start"], Stage.from_dict(e["stage"])) for e in d["stages"]])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.name == other.name and self.stages == other.stages

    def __repr__(self) -> str:
        return f"Schedule({self.name!r}, {self.stages!r})"
