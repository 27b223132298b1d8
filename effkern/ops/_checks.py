"""Argument checks shared by the public ops: each failure is a ValueError that
names the argument (never a crash or a silent wrong answer)."""

from __future__ import annotations

from typing import Iterable

import torch


def tensor(name: str, value, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None,
           device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name} has dtype {str(value.dtype).replace('torch.', '')}; supported: {names}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but must be on {device} (same device as the input)")
    return value


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import operator

            value = operator.index(value)
        except TypeError:
            raise ValueError(f"{name} must be an int, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def pair(name: str, value) -> tuple[int, int]:
    """An int or a pair of ints -> (int, int)."""
    if isinstance(value, (tuple, list, torch.Size)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
        return positive_int(f"{name}[0]", value[0]), positive_int(f"{name}[1]", value[1])
    v = positive_int(name, value)
    return v, v
