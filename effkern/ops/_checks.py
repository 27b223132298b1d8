"""Argument checks shared by the public ops and the CLI: each failure names the
argument (never a crash, a hang or a silent wrong answer).

A value of the wrong *type* raises :class:`ArgumentTypeError`, which is both a
TypeError (what it is) and a ValueError (so ``except ValueError`` -- the CLI's
handler, older callers -- still catches it); a value of the right type but out
of range raises ValueError.

Index tensors handed to a kernel (cu_seqlens, keep_idx, flat indices) go through
:func:`index_tensor`, which checks dtype, rank and device and returns a
contiguous tensor: every kernel reads them as dense arrays, whatever the
caller's strides.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Iterable

import torch


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (e.g. a bool where an int is expected)."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor(name: str, value, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None,
           device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(_dtype_name(d) for d in dtypes)
            raise ValueError(f"{name} has dtype {_dtype_name(value.dtype)}; supported: {names}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but must be on {device} (same device as the input)")
    return value


def index_tensor(name: str, value, *, dtypes: Iterable[torch.dtype], device: torch.device,
                 ndim: int = 1) -> torch.Tensor:
    """An index tensor a kernel will read: checked like :func:`tensor`, returned contiguous."""
    return tensor(name, value, ndim=ndim, dtypes=dtypes, device=device).contiguous()


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    """An int (or an object with ``__index__``, e.g. numpy ints) >= minimum; bools are rejected."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ArgumentTypeError(f"{name} must be an int, got the bool {value!r}")
    if not isinstance(value, int):
        try:
            value = operator.index(value)
        except TypeError:
            raise ArgumentTypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None
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


def real(name: str, value) -> float:
    """A finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def float_vector(name: str, value, device) -> torch.Tensor:
    """A Python sequence of real numbers -> float32 1-D tensor on ``device``; a tensor is
    returned as is (the caller checks it with :func:`tensor`)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ArgumentTypeError(f"{name} must be a sequence of numbers or a 1-D float tensor, "
                                f"got {type(value).__name__}")
    items = list(value)
    for i, v in enumerate(items):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ArgumentTypeError(f"{name}[{i}] must be a real number, got {v!r} ({type(v).__name__})")
    return torch.tensor([float(v) for v in items], dtype=torch.float32, device=device)


def finite_values(name: str, value: torch.Tensor, *, nonzero: bool = False) -> None:
    """Every value finite (and non-zero when ``nonzero``), checked only where reading the
    values is free: CPU tensors, outside torch.compile tracing.  CUDA tensors are not read
    (that would synchronise the device); meta tensors have no values."""
    if value.device.type != "cpu" or torch.compiler.is_compiling() or value.numel() == 0:
        return
    v = value.detach()
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} must be finite, got {v.tolist()}")
    if nonzero and bool((v == 0).any()):
        raise ValueError(f"{name} must be non-zero (it divides), got {v.tolist()}")


def like_default(name: str, value, default):
    """``value`` of the kind ``default`` has (a keyword argument checked against its default):
    a bool default takes a bool; an int default an int or a list of ints (never a bool);
    a float default a real number (not a bool); a str default a str.  Other defaults
    (None, classes) take anything."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok = is_int(value) or (isinstance(value, (list, tuple)) and len(value) > 0 and all(map(is_int, value)))
        kind = "an int"
    elif isinstance(default, float):
        ok, kind = isinstance(value, numbers.Real) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a string"
    else:
        return value
    if not ok:
        raise ArgumentTypeError(f"{name} must be {kind} (default {default!r}), got {value!r}")
    return value


def generator(name: str, value) -> torch.Generator | None:
    if value is not None and not isinstance(value, torch.Generator):
        raise ArgumentTypeError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")
    return value


def device(name: str, value) -> torch.device:
    """A torch.device, or a string/int naming one."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ArgumentTypeError(f"{name} must be a torch.device or a string such as 'cpu' or 'cuda', "
                                f"got {value!r}")
    try:
        return torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
