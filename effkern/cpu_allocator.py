"""Keep large CPU tensors out of fresh pages: glibc ``mallopt`` for training on the CPU.

PyTorch's CPU allocator calls ``posix_memalign`` / ``free`` for every tensor.  glibc
serves blocks above its mmap threshold (128 KiB, raised dynamically up to 32 MiB) with
a fresh ``mmap`` and returns them with ``munmap``, and trims the heap top back to the
OS: the next tensor of that size page-faults in every 4 KiB page and the kernel zeroes
it.  A training step allocates and frees the same multi-MiB activations again and
again, so on 2 cores these faults showed up as GELU and copies running 2-3x slower
inside a ViT step than alone (a packed multi-crop batch is one large tensor where timm
has several smaller ones; measured with torch.profiler, ViT-Ti/16, DINO 2x224 + 8x96,
batch 8 and 32, fp32: a 68 MB GELU output took 21 ms to allocate and fill against 4.5
ms from reused heap memory).  Here mmap is switched off (``M_MMAP_MAX`` 0: every block
comes from the heap, whatever its size; the threshold is also fixed at its 32 MiB
maximum) and the heap is not trimmed, so freed blocks are reused and the faults
disappear.  The cost: the process keeps its peak heap, as the CUDA caching allocator
keeps its peak.

``tune_cpu_allocator()`` sets that once per process.  ``effkern train`` (CPU runs) and
``effkern bench`` call it, for every implementation alike; library users may call it
themselves.  It does nothing when the user already chose (``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_`` set, or jemalloc / tcmalloc / mimalloc in
``LD_PRELOAD``), with ``EFFKERN_CPU_ALLOCATOR=0``, and off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4   # glibc's mallopt parameters
MMAP_THRESHOLD = 32 * 2**20      # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
MMAP_MAX = 0                     # no mmap at all: larger blocks come from the heap too
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 * 2**20

_state: dict = {}


def _skip_reason() -> str | None:
    if os.environ.get("EFFKERN_CPU_ALLOCATOR", "1") == "0":
        return "EFFKERN_CPU_ALLOCATOR=0"
    chosen = [v for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_") if v in os.environ]
    if chosen:
        return f"{chosen[0]} is set"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return f"{name} is preloaded"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    return None


def tune_cpu_allocator() -> dict:
    """Apply the settings above once; returns {"applied": bool, "reason": str}."""
    if _state:
        return dict(_state)
    reason = _skip_reason()
    if reason is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = all(libc.mallopt(param, value) == 1 for param, value in
                     ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_MMAP_MAX, MMAP_MAX), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                      (M_TOP_PAD, TOP_PAD)))
            reason = "mallopt" if ok else "mallopt refused a setting"
        except (OSError, AttributeError) as exc:
            ok, reason = False, f"no mallopt: {exc}"
    else:
        ok = False
    _state.update(applied=ok, reason=reason)
    return dict(_state)


def status() -> dict:
    """What ``tune_cpu_allocator`` did in this process ({} when it was not called)."""
    return dict(_state)
