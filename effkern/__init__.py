"""effkern: kernels, timm drop-ins and a thin trainer for cheap ViT pretraining.

Layers (each calls only the one below): cli -> train -> schedules -> timm ->
layers -> ops -> kernels / csrc.  See docs/architecture.md.

``import effkern`` is cheap: it imports neither torch nor the compiled extension.
The public names load their module on first use (module ``__getattr__``):
``effkern.ops`` (and with it ``torch.ops.effkern.*``), ``effkern.timm`` (needs
timm: ``pip install effkern[timm]``), the backend switch and ``build_info``.
"""

from __future__ import annotations

import importlib
import importlib.util

from effkern._version import __version__

__all__ = ["__version__", "build_info", "get_backend", "set_backend", "use_backend", "ops", "timm"]

# public name -> the module that defines it (None: the name is that submodule itself)
_LAZY = {
    "ops": None, "timm": None, "backend": None, "layers": None, "reference": None, "kernels": None,
    "schedules": None, "train": None, "bench": None,
    "get_backend": "effkern.backend", "set_backend": "effkern.backend", "use_backend": "effkern.backend",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'effkern' has no attribute {name!r}")
    if name == "timm" and not _installed("timm"):
        raise ImportError("effkern.timm needs the timm package, which is not installed: "
                          "pip install 'effkern[timm]'")
    owner = _LAZY[name]
    if owner is None:
        return importlib.import_module(f"effkern.{name}")  # the import also binds it on the package
    value = getattr(importlib.import_module(owner), name)
    globals()[name] = value
    return value


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (looked up, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None (import blocked)
        return False


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def build_info() -> dict:
    """What this install of effkern was built with and can run.

    Keys: version, torch, torch_cuda, cpu_kernels, cpu_isa (the instruction set
    the CPU FFT kernels run with: avx512, avx2 or baseline), cuda_kernels,
    cuda_arch_list, compiler, triton (version or None), triton_interpret, backend, load_error.
    """
    import torch

    from effkern import _native
    from effkern.backend import get_backend, triton_interpret

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - depends on the install
        triton_version = None
    native = _native.native_build_info()
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_kernels": native["cpu_kernels"],
        "cpu_isa": native.get("cpu_isa"),
        "cuda_kernels": native["cuda_kernels"],
        "cuda_arch_list": native["cuda_arch_list"],
        "compiler": native["compiler"],
        "triton": triton_version,
        "triton_interpret": triton_interpret(),
        "backend": get_backend(),
        "load_error": native["load_error"],
    }
