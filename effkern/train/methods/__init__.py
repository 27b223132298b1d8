"""Self-supervised / supervised training methods around a patched timm ViT.

``build_method(name, encoder, **hparams)`` -> :class:`~effkern.train.methods.base.Method`.
"""
from __future__ import annotations

from effkern.train.catalog import METHODS, method_key

from .base import Method, ViewPlan
from .dino import DINO
from .mocov3 import MoCoV3
from .simclr import SimCLR
from .supervised import Supervised

_REGISTRY = {"mocov3": MoCoV3, "simclr": SimCLR, "dino": DINO, "supervised": Supervised}


def build_method(name: str, encoder, **hparams) -> Method:
    """Build the method ``name`` (one of :data:`METHODS`) around ``encoder`` (a patched
    timm ViT); ``hparams`` override the recipe defaults.  Unknown name -> ValueError."""
    return _REGISTRY[method_key(name)](encoder, **hparams)


__all__ = ["METHODS", "Method", "ViewPlan", "build_method", "MoCoV3", "SimCLR", "DINO", "Supervised"]
