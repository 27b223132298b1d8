"""Checkpoints that survive a kill at any moment, and the RNG state needed to resume
a run exactly.

Files in the run directory:

    checkpoint.pt       the latest complete checkpoint
    checkpoint.prev.pt  the one before it

``save_atomic`` writes the new checkpoint to a temporary file in the same directory,
fsyncs it, *verifies* it by loading it back, then renames ``checkpoint.pt`` to
``checkpoint.prev.pt`` and the temporary file to ``checkpoint.pt`` (both renames
atomic, the directory fsynced).  A run killed at any moment therefore leaves a
complete ``checkpoint.pt``, or -- killed between the two renames -- a complete
``checkpoint.prev.pt``; a stray temporary file (``.checkpoint.pt.*.tmp``) is never
read and is removed by the next save.

``load_for_resume`` reads ``checkpoint.pt``; if that file is missing or unreadable
(truncated, empty, garbage, another program's pickle) it falls back to
``checkpoint.prev.pt`` with a :class:`CheckpointFallbackWarning` (on rank 0 only
under torchrun: every rank reads the same files and falls back alike).  When no usable
checkpoint is left, or the checkpoint belongs to another run configuration
(method, model, model/method arguments, image size), it raises
:class:`CheckpointError` (a ValueError): one line naming the file and the reason.

Checkpoints hold only tensors and plain Python values (the numpy RNG state is
stored as a tensor), so they are loaded with ``torch.load(weights_only=True)``: a
foreign pickle is rejected, never executed.
"""

from __future__ import annotations

import glob
import os
import random
import tempfile
import warnings

import numpy as np
import torch

from effkern.train import dist

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
REQUIRED_KEYS = ("cfg", "state", "method", "optimizer", "rng", "history")
# run settings that shape the saved tensors: a checkpoint is resumable only when they match
IDENTITY_KEYS = ("method", "model", "model_kwargs", "method_kwargs", "base_size")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (the message names the file)."""


class CheckpointFallbackWarning(UserWarning):
    """checkpoint.pt was unusable and the run resumes from checkpoint.prev.pt."""


# ------------------------------------------------------------------ RNG state

def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.random.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.random.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """random.setstate wants the tuples random.getstate gave (a loader may return lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ------------------------------------------------------------------ writing

def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def read(path: str, map_location="cpu") -> dict:
    """torch.load a checkpoint and check its top-level layout; CheckpointError naming
    ``path`` otherwise."""
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign pickle: the error below says it all
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a checkpoint file") from None
    except Exception as exc:  # noqa: BLE001 -- any failure to deserialise means a damaged/foreign file
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        what = "empty" if size == 0 else f"{size} bytes"
        raise CheckpointError(f"{path} is not a readable effkern checkpoint ({what}; truncated, corrupt or "
                              f"written by another program): {_first_line(exc)}") from None
    if not isinstance(saved, dict) or any(k not in saved for k in REQUIRED_KEYS):
        found = sorted(saved)[:8] if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"{path} is not an effkern training checkpoint (expected keys "
                              f"{', '.join(REQUIRED_KEYS)}; found {found})")
    return saved


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def save_atomic(state: dict, directory: str, name: str = CHECKPOINT) -> str:
    """Write ``state`` as ``directory/name``, keeping the previous one as checkpoint.prev.pt
    (for the default name); see the module docstring for the protocol."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    for stale in glob.glob(os.path.join(glob.escape(directory), f".{name}.*.tmp")):
        os.unlink(stale)  # left by a run killed while writing
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        read(tmp)  # verify: complete and loadable the way --resume loads it
        if name == CHECKPOINT and os.path.exists(path):
            os.replace(path, os.path.join(directory, PREVIOUS))
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ------------------------------------------------------------------ reading

def available(directory: str) -> list[str]:
    """The checkpoint files present in ``directory``, newest first."""
    return [p for p in (os.path.join(directory, CHECKPOINT), os.path.join(directory, PREVIOUS))
            if os.path.lexists(p)]


def require(directory: str) -> list[str]:
    """:func:`available`, or CheckpointError when ``directory`` holds no checkpoint (a
    resume that would silently start a fresh run)."""
    files = available(directory)
    if not files:
        raise CheckpointError(f"--resume: no checkpoint in {directory} (no {CHECKPOINT} or {PREVIOUS}); "
                              "start without --resume, or pass --auto-resume to start fresh when none exists")
    return files


def check_compatible(saved: dict, cfg: dict, path: str) -> None:
    """CheckpointError when ``saved`` was written by a run whose model/method differ from ``cfg``."""
    theirs = saved.get("cfg") or {}
    diffs = [f"{k}: checkpoint {theirs.get(k)!r} vs this run {cfg.get(k)!r}"
             for k in IDENTITY_KEYS if k in cfg and theirs.get(k) != cfg.get(k)]
    if diffs:
        raise CheckpointError(f"{path} belongs to a different run ({'; '.join(diffs)}); "
                              "resume with the same settings or use another --out")


def load_for_resume(directory: str, cfg: dict | None = None, map_location="cpu") -> tuple[dict, str]:
    """(checkpoint dict, path) of the newest usable checkpoint in ``directory``.

    Falls back from checkpoint.pt to checkpoint.prev.pt (CheckpointFallbackWarning, on rank 0
    only) when the former is missing or unreadable; CheckpointError when none is usable or the
    checkpoint belongs to another configuration (``cfg``: the run's TrainConfig dict).
    """
    files = require(directory)
    errors = []
    for path in files:
        try:
            saved = read(path, map_location)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if cfg is not None:
            check_compatible(saved, cfg, path)
        latest = os.path.join(directory, CHECKPOINT)
        if path != latest and dist.rank() == 0:  # one warning per run, not one per rank
            reason = errors[0] if errors else f"{latest} is missing (a save was interrupted)"
            warnings.warn(f"{reason}; resuming from {path} (step {saved['state'].get('step')})",
                          CheckpointFallbackWarning, stacklevel=2)
        return saved, path
    raise CheckpointError(errors[0] if len(errors) == 1 else
                          f"{errors[0]}; the previous checkpoint is unusable too: {errors[1]}")


def load(directory: str, name: str = CHECKPOINT, map_location="cpu") -> dict | None:
    """``directory/name`` read and checked (CheckpointError naming the file if damaged), or
    None when it does not exist."""
    path = os.path.join(directory, name)
    if not os.path.lexists(path):
        return None
    return read(path, map_location)
