"""Loads the compiled extension ``effkern._C`` (C++ CPU and CUDA kernels).

If it cannot load, ``import effkern`` still works: a single warning names the
reason and every op uses its PyTorch reference (or Triton) path instead.
"""

from __future__ import annotations

import warnings

import torch  # noqa: F401  (the extension links against libtorch: load it first)

_C = None
LOAD_ERROR: str | None = None

try:
    import importlib

    _C = importlib.import_module("effkern._C")
except Exception as exc:  # ImportError, OSError (undefined symbol), ...
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "effkern: the compiled extension effkern._C could not be loaded "
        f"({LOAD_ERROR}); ops fall back to their PyTorch reference / Triton paths. "
        "Rebuild with `pip install --no-build-isolation -e .` (see docs/install.md).",
        RuntimeWarning,
        stacklevel=2,
    )


# Read once: the ops consult these on every call (also while torch.compile traces).
_INFO = dict(_C.build_info()) if _C is not None else {}
_HAS_CPU = bool(_INFO.get("cpu_kernels", False))
_HAS_CUDA = bool(_INFO.get("cuda_kernels", False))


def has_cpu_kernels() -> bool:
    return _HAS_CPU


def has_cuda_kernels() -> bool:
    return _HAS_CUDA


def native_build_info() -> dict:
    if _C is None:
        return {"cpu_kernels": False, "cuda_kernels": False, "cuda_arch_list": "", "compiler": "", "cpu_isa": None,
                "load_error": LOAD_ERROR}
    info = dict(_INFO)
    info["load_error"] = None
    return info
