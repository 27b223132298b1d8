"""Backend switch: which implementation an op uses for a tensor on a device.

Backends
--------
``auto``       the native kernel of the tensor's device when one was compiled
               (C++ on CPU, CUDA C++ on CUDA), else ``flash`` on CUDA where the op
               has it and FlashAttention-2 can run the tensor, else Triton on CUDA,
               else the PyTorch reference.
``triton``     the op's Triton kernel, also on CPU tensors when
               ``TRITON_INTERPRET=1`` was set before ``import effkern`` (CI runs
               the real kernel code this way).
``cuda``       the CUDA C++ kernel (CUDA tensors).
``flash``      PyTorch's FlashAttention-2 (``torch.nn.attention.varlen``, torch >= 2.10)
               for ``varlen_attention`` on CUDA fp16/bf16, sm_80+, head_dim % 8 == 0
               (elsewhere: Triton).  The ``auto`` choice there since the first H200
               measurement (docs/ops_attention.md); ``triton`` for bitwise-reproducible
               backward passes.
``cpu``        the C++ CPU kernel (CPU tensors).
``reference``  the plain PyTorch implementation (any device).

A forced backend is used wherever the op has it and it can run on the
tensor's device; elsewhere the op falls back to ``auto``.  ``reference`` can
always run.  Set it with the ``EFFKERN_BACKEND`` environment variable (read at
import) or :func:`set_backend` / :func:`use_backend`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference", "flash")

_state = {"backend": "auto"}


def _check(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: str) -> None:
    """Select the backend for all effkern ops (process-wide)."""
    _state["backend"] = _check(name)


def get_backend() -> str:
    return _state["backend"]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily select a backend: ``with effkern.use_backend("reference"): ...``."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


# Triton decides at decoration time whether a kernel is interpreted, so the
# environment is read once, at import, like Triton itself does.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
try:
    import triton  # noqa: F401

    _TRITON_AVAILABLE = True
except Exception:  # pragma: no cover - depends on the install
    _TRITON_AVAILABLE = False


def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors)."""
    return _TRITON_INTERPRET


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def select(device: torch.device, available: Iterable[str]) -> str:
    """Pick the implementation for a tensor on ``device``.

    ``available`` names what the op has *in this process*: a subset of
    ("triton", "cuda", "cpu", "reference", "flash"); the caller includes "cuda"/"cpu"
    only when the compiled extension provides that kernel.
    """
    available = set(available)
    kind = device.type
    forced = get_backend()
    can_triton = "triton" in available and (kind == "cuda" or (kind == "cpu" and triton_interpret()))
    if forced == "triton" and can_triton:
        return "triton"
    if forced == "cuda" and "cuda" in available and kind == "cuda":
        return "cuda"
    if forced == "flash" and "flash" in available and kind == "cuda":
        return "flash"
    if forced == "cpu" and "cpu" in available and kind == "cpu":
        return "cpu"
    if forced == "reference":
        return "reference"
    # auto
    if kind == "cuda":
        if "cuda" in available:
            return "cuda"
        if "flash" in available:  # the op checks that FlashAttention-2 can run the tensor
            return "flash"
        if "triton" in available and triton_available():
            return "triton"
    if kind == "cpu" and "cpu" in available:
        return "cpu"
    return "reference"


set_backend(os.environ.get("EFFKERN_BACKEND", "auto") or "auto")
