"""Checkpoints written atomically (temp file + rename) and the RNG state needed to
resume a run exactly.  A run killed at any moment leaves either the previous or
the new checkpoint, never a torn one."""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict:
    state = {"torch": torch.random.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.random.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(state: dict, directory: str, name: str = CHECKPOINT) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(directory: str, name: str = CHECKPOINT, map_location="cpu") -> dict | None:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location=map_location, weights_only=False)
