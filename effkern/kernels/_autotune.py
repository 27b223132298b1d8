"""The one autotune helper of effkern's Triton kernels: per-architecture config lists.

Why
---
The right tiles depend on the GPU: on Hopper (sm_90) a 16-bit ``tl.dot`` runs on
wgmma only when its M dimension is a multiple of 64 (a 32-row tile falls back
to Ampere's mma.sync), while on Ampere (sm_80) 32-row tiles are fine and keep
more programs in flight for short ViT sequences.  The tiles also depend on the
launch: a head_dim of 256 needs smaller tiles than 64 to stay under the
255-register cap without spilling, and IEEE fp32 dots (CUDA cores) need
smaller tiles than tensor-core dots.  ``triton.autotune`` takes one fixed list,
so a kernel file declares a *function* instead:

    configs(arch, args) -> list[triton.Config]

``arch`` is the compute capability (90 for H100/H200, 80 for A100, 89 for
L4/4090, ...) of the launch's device and ``args`` the launch's named arguments
(tensors, ints and constexprs such as HEAD_DIM, BLOCK_D, DOT_PREC).  The choice may
depend on the architecture, the keyword arguments and the tensors' dtypes only (not
on positional integers such as a token count): it is cached per launch on those.  The helper
keeps one real ``triton.autotune`` per distinct candidate list (so the tuning
cache of each works as usual, keyed by ``key`` plus the argument dtypes) and
launches through it.  Under ``TRITON_INTERPRET=1`` every kernel uses its one
small ``interpret`` config (autotuning in the interpreter is slow and meaningless).

The same ``configs`` function is what ``effkern.tools.gpu_compile`` compiles for
sm_90 and sm_80 (``Tuned.candidates``), so the lists that ship are the lists that
are checked for spills, shared memory and wgmma/mma lowering.
"""

from __future__ import annotations

from typing import Callable, Sequence

import triton

from effkern.backend import triton_interpret

ConfigFn = Callable[[int, dict], "list[triton.Config]"]


def config(num_warps: int = 4, num_stages: int = 2, **blocks) -> triton.Config:
    """``triton.Config`` with the block sizes as keyword arguments."""
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages)


def device_arch(args) -> int:
    """Compute capability (major*10 + minor) of the first CUDA tensor among ``args``."""
    import torch

    for value in args:
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(value.device)
            return 10 * major + minor
    raise ValueError("effkern Triton kernel launched without a CUDA tensor argument")


class Tuned:
    """A Triton kernel with per-architecture autotune candidates; ``kernel[grid](...)``."""

    def __init__(self, fn, configs: ConfigFn, key: Sequence[str], interpret: triton.Config):
        self.fn = fn
        self.configs = configs
        self.key = list(key)
        self.interpret = interpret
        self.arg_names = list(fn.arg_names)
        self._tuners: dict[tuple, object] = {}
        self._by_launch: dict[tuple, object] = {}  # (arch, kwargs, dtypes) -> tuner

    def candidates(self, arch: int, args: dict) -> list:
        """The configs a launch with named ``args`` tries on compute capability ``arch``."""
        if triton_interpret():
            return [self.interpret]
        found = list(self.configs(arch, args))
        if not found:
            raise ValueError(f"{self.fn.__name__}: no autotune config for sm_{arch} with "
                             f"{ {k: v for k, v in args.items() if k.isupper()} }")
        return found

    def tuner(self, candidates: list):
        ident = tuple(str(c) for c in candidates)
        tuner = self._tuners.get(ident)
        if tuner is None:
            tuner = self._tuners[ident] = triton.autotune(candidates, key=self.key)(self.fn)
        return tuner

    def best_configs(self) -> dict:
        """{tuning key: chosen config} over every candidate list tuned so far in this process."""
        chosen = {}
        for tuner in self._tuners.values():
            chosen.update({k: str(v) for k, v in getattr(tuner, "cache", {}).items()})
        return chosen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            arch = 0 if triton_interpret() else device_arch(args)
            ident = (arch, tuple(kwargs.items()), tuple(getattr(a, "dtype", None) for a in args))
            tuner = self._by_launch.get(ident)
            if tuner is None:
                named = {**dict(zip(self.arg_names, args)), **kwargs}
                tuner = self._by_launch[ident] = self.tuner(self.candidates(arch, named))
            return tuner[grid](*args, **kwargs)

        return launch


def autotune(configs: ConfigFn, key: Sequence[str], interpret: triton.Config):
    """Decorator for a ``@triton.jit`` kernel: ``@autotune(configs_fn, key=[...], interpret=config(...))``."""
    return lambda fn: Tuned(fn, configs, key, interpret)
