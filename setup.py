"""Build effkern._C against the installed torch: the only thing this file does.

The package metadata, dependencies, extras and console script are in pyproject.toml.

  pip install --no-build-isolation -e .      (or without -e; torch installed first)

C++ CPU kernels are always built.  CUDA kernels (csrc/cuda/) are built when
nvcc is found, or FORCE_CUDA=1, or TORCH_CUDA_ARCH_LIST is set -- never by
querying a GPU, so a CPU-only machine compiles them too.  EFFKERN_CUDA=0 skips
them.  The architecture list defaults to "9.0" (H100); wheels use "8.0;9.0".
The source list is the csrc/ tree itself (globbed here and in CMakeLists.txt),
so there is no second list to drift.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    scope: dict = {}
    with open(os.path.join(ROOT, "effkern", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _sources(*patterns: str) -> list[str]:
    found: list[str] = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join("csrc", pattern), recursive=True))
    return found


def _find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc")


def _want_cuda() -> bool:
    flag = os.environ.get("EFFKERN_CUDA")
    if flag is not None and flag.strip() in ("0", "false", "no", "off"):
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1" or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return True
    return _find_nvcc() is not None


def _pip_cuda_include_dirs() -> list[str]:
    """CUDA library headers (cublas, cusparse, ...) shipped by the pip nvidia-* wheels."""
    dirs = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include", "nvidia/cublas/include",
                    "nvidia/cusparse/include", "nvidia/cusolver/include", "nvidia/cufft/include",
                    "nvidia/curand/include"):
            path = os.path.join(entry, sub)
            if os.path.isdir(path) and path not in dirs:
                dirs.append(path)
    return dirs


def _extensions():
    import torch
    from torch.utils import cpp_extension

    cpu_sources = _sources("*.cpp", "cpu/**/*.cpp")
    cxx_flags = ["-O3", "-fopenmp", "-DEFFKERN_WITH_CPU=1"]
    nvcc_flags = ["-O3", "-lineinfo"]
    define_macros = [("EFFKERN_VERSION", f'"{_version()}"')]
    include_dirs = [os.path.join(ROOT, "csrc")]
    link_args = ["-fopenmp"]

    with_cuda = _want_cuda()
    if with_cuda:
        nvcc = _find_nvcc()
        if nvcc is None:
            raise RuntimeError("effkern: CUDA build requested (FORCE_CUDA/TORCH_CUDA_ARCH_LIST) "
                               "but nvcc was not found; set CUDA_HOME or EFFKERN_CUDA=0")
        os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(nvcc)))
        # Never query a GPU for the architecture list.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        include_dirs += _pip_cuda_include_dirs()
        sources = cpu_sources + _sources("cuda/**/*.cpp", "cuda/**/*.cu")
        cxx_flags.append("-DEFFKERN_WITH_CUDA=1")
        nvcc_flags.append("-DEFFKERN_WITH_CUDA=1")
        define_macros.append(("EFFKERN_CUDA_ARCH_LIST", f'"{os.environ["TORCH_CUDA_ARCH_LIST"]}"'))
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
    else:
        sources = cpu_sources
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
    print(f"effkern: building _C with torch {torch.__version__}, CUDA kernels: {with_cuda}, "
          f"{len(sources)} sources", flush=True)
    return [
        ext_cls(
            name="effkern._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=link_args,
        )
    ], cpp_extension.BuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = _extensions()

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
