"""The interpreter suite needs triton >= 3.7: triton 3.6's interpreter cannot use a
scalar loaded from memory as a loop bound (``for i in range(0, tl.load(p), B)`` raises
"only 0-dimensional arrays can be converted to Python scalars"), which every effkern
kernel does with its sequence or token count.  The compiled kernels are not affected:
the H200 run of 2026-12-04 used triton 3.6.0 (benchmarks/results/gpu_h200.md)."""

from __future__ import annotations

import pytest

try:
    import triton

    INTERPRETER_OK = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7)
except ImportError:  # no triton: the modules skip themselves
    INTERPRETER_OK = True


def pytest_collection_modifyitems(config, items):
    if INTERPRETER_OK:
        return
    skip = pytest.mark.skip(reason=f"triton {triton.__version__}'s interpreter cannot loop to a loaded "
                                   "bound (needs >= 3.7; compiled kernels work on 3.6)")
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)
