"""Named schedules: `get_schedule(spec)`.

  none                     one stage, everything native
  const:patch=P,keep=R[,keep_<branch>=R][,res=B][,m=M]
                           one stage; every parameter optional
  efficienttrain++         the EfficientTrain++ curriculum (Wang et al., TPAMI 2024):
                           bandwidth B = 96/224 (progress < 0.2), 160/224 (< 0.6), then 1.0;
                           RandAugment magnitude m = floor(10 * progress) clipped to 0..9
                           (num_ops 2, mstd 0.5: applied by the trainer)
  file:PATH                Schedule.from_json(open(PATH).read()); a missing, unreadable or
                           malformed file is a ValueError naming the file

A stage's patch size must divide the images the global views are trained at:
``check_patch_sizes(schedule, image_size)`` (the trainer calls it) raises a ValueError
otherwise, instead of training those views at the native patch size unannounced.
"""

from __future__ import annotations

import json
import math
import os

from effkern.schedules.stage import Schedule, Stage

__all__ = ["PRESETS", "get_schedule", "efficienttrain_pp", "check_patch_sizes"]

# AAIP schedules derived by `effkern schedule search` (docs/schedules.md: procedure and values;
# effkern's own derivation on Fashion-MNIST -- the paper's exact schedules are unpublished).
AAIP_DIR = os.path.join(os.path.dirname(__file__), "aaip")
AAIP_PRESETS: tuple[str, ...] = tuple(sorted(f[:-5] for f in os.listdir(AAIP_DIR) if f.endswith(".json"))) \
    if os.path.isdir(AAIP_DIR) else ()

PRESETS: tuple[str, ...] = ("none", "const:...", "efficienttrain++") + AAIP_PRESETS + ("file:PATH",)

# EfficientTrain++: low-pass bandwidth B (px at a 224 base) by progress.
ETPP_BANDWIDTH: tuple[tuple[float, int], ...] = ((0.0, 96), (0.2, 160), (0.6, 224))
ETPP_BASE = 224
ETPP_RANDAUG_MSTD = 0.5


def _unknown(spec: str) -> ValueError:
    aaip = "".join(f"{name}, " for name in AAIP_PRESETS)
    return ValueError(f"unknown schedule {spec!r}; valid: none, "
                      f"const:patch=P,keep=R[,keep_<branch>=R][,res=B][,m=M], efficienttrain++, {aaip}file:PATH")


def efficienttrain_pp() -> Schedule:
    """Ten stages at progress 0.0, 0.1, ..., 0.9 combining the ET++ bandwidth and magnitude rules."""
    stages = []
    for i in range(10):
        start = i / 10
        px = [b for s, b in ETPP_BANDWIDTH if s <= start][-1]
        stages.append((start, Stage(resolution=1.0 if px == ETPP_BASE else px / ETPP_BASE,
                                    randaug_magnitude=i, name=f"B={px} m={i}")))
    return Schedule("efficienttrain++", stages)


def _unit_fraction(key: str, value: str) -> float:
    """A const-schedule value in (0, 1] (keep ratio, resolution), else a ValueError naming key."""
    try:
        fraction = float(value)
    except ValueError:
        fraction = float("nan")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"const schedule: {key} must be in (0, 1], got {value!r}")
    return fraction


def _parse_const(spec: str, body: str) -> Schedule:
    patch = None
    keep: dict[str, float] = {}
    resolution = 1.0
    m = None
    for item in filter(None, (s.strip() for s in body.split(","))):
        if "=" not in item:
            raise ValueError(f"const schedule parameter {item!r} needs a value (name=value)")
        key, value = (s.strip() for s in item.split("=", 1))
        if key == "patch":
            try:
                patch = int(value)
            except ValueError:
                raise ValueError(f"const schedule: patch must be an int >= 1, got {value!r}") from None
            if patch < 1:
                raise ValueError(f"const schedule: patch must be an int >= 1, got {value!r}")
        elif key == "keep" or key.startswith("keep_"):
            branch = "default" if key == "keep" else key[len("keep_"):]
            if not branch:
                raise ValueError(f"const schedule: {key!r} needs a branch name (keep_q=...)")
            keep[branch] = _unit_fraction(key, value)
        elif key in ("res", "resolution"):
            resolution = _unit_fraction(key, value)
        elif key == "m":
            try:
                m = int(value)
            except ValueError:
                m = -1
            if m < 0:
                raise ValueError(f"const schedule: m must be an int >= 0, got {value!r}")
        else:
            raise ValueError(f"const schedule: unknown parameter {key!r} "
                             "(valid: patch, keep, keep_<branch>, res, m)")
    stage = Stage(patch_size=patch, keep=tuple(keep.items()), resolution=resolution,
                  randaug_magnitude=m, name="const")
    return Schedule(spec, [(0.0, stage)])


def get_schedule(spec: str) -> Schedule:
    """The schedule named by `spec` (see the module docstring); ValueError otherwise."""
    spec = spec.strip()
    if spec == "none":
        return Schedule("none", [(0.0, Stage(name="native"))])
    if spec == "const" or spec.startswith("const:"):
        return _parse_const(spec, spec[len("const:"):] if ":" in spec else "")
    if spec.lower() in ("efficienttrain++", "et++", "etpp"):
        return efficienttrain_pp()
    if spec in AAIP_PRESETS:
        with open(os.path.join(AAIP_DIR, spec + ".json")) as f:
            return Schedule.from_json(f.read())
    if spec.startswith("file:"):
        path = spec[len("file:"):]
        if not path:
            raise ValueError("file: schedule needs a path (file:PATH)")
        return _from_file(path)
    raise _unknown(spec)


_FILE_FORMAT = '{"name": ..., "stages": [{"start": 0.0, "stage": {"patch_size": ..., "keep": {...}, ...}}, ...]}'


def _from_file(path: str) -> Schedule:
    """Schedule.from_json of the file at ``path``; every failure is one ValueError naming the file."""
    where = f"schedule file {path!r}"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{where} is a directory, not a JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return Schedule.from_json(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except KeyError as exc:
        raise ValueError(f"{where}: a stage entry lacks the key {exc}; expected {_FILE_FORMAT}") from None
    except ValueError as exc:
        raise ValueError(f"{where} is not a valid schedule: {exc}") from None
    except (TypeError, AttributeError) as exc:
        raise ValueError(f"{where} is not a valid schedule ({exc}); expected {_FILE_FORMAT}") from None


def check_patch_sizes(schedule: Schedule, image_size: int) -> None:
    """ValueError when a stage's patch size does not divide ``image_size`` (the global
    views' size): those views would silently keep the native patch size.  Views of
    other sizes (e.g. DINO's local crops) still fall back to the native patch."""
    for start, stage in schedule.stages:
        if stage.patch_size is not None:
            check_patch_size(stage.patch_size, image_size,
                             f"schedule {schedule.name!r}: patch size {stage.patch_size} (stage at progress {start:g})")


def check_patch_size(p: int, image_size: int, what: str) -> None:
    """ValueError naming ``what`` when patch size ``p`` does not tile ``image_size`` px."""
    if p < 1 or image_size % p:
        divisors = [d for d in range(1, image_size + 1) if image_size % d == 0]
        raise ValueError(f"{what} does not divide the {image_size} px images; use one of {divisors}")


def etpp_magnitude(progress: float) -> int:
    """The ET++ rule itself, m = floor(10 * progress) clipped to 0..9 (for checks)."""
    return min(max(math.floor(10 * progress), 0), 9)
