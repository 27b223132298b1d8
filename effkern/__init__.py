"""effkern: kernels, timm drop-ins and a thin trainer for cheap ViT pretraining.

Layers (each calls only the one below): cli -> train -> schedules -> timm ->
layers -> ops -> kernels / csrc.  See docs/ and DESIGN.md.
"""

from __future__ import annotations

from effkern._version import __version__
from effkern import _native
from effkern.backend import get_backend, set_backend, use_backend
from effkern import ops

__all__ = ["__version__", "build_info", "get_backend", "set_backend", "use_backend", "ops"]


def build_info() -> dict:
    """What this install of effkern was built with and can run.

    Keys: version, torch, torch_cuda, cpu_kernels, cpu_isa (the instruction set
    the CPU FFT kernels run with: avx512, avx2 or baseline), cuda_kernels,
    cuda_arch_list, compiler, triton (version or None), triton_interpret, backend, load_error.
    """
    import torch

    from effkern.backend import triton_interpret

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
