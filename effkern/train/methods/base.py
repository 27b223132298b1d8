"""Method interface shared by the training methods.

A :class:`Method` owns the trained encoder (a patched timm ViT, see ``effkern.timm``),
its heads and, where the recipe has one, a momentum / teacher copy.  The loop asks it
for the views it needs (:meth:`Method.view_plan`), calls :meth:`Method.training_step`
once per batch, then :meth:`Method.on_step_end` after the optimizer step.

``stage`` (``effkern.schedules.Stage``) is duck-typed: ``stage.patch_size`` (int or
None = native) and ``stage.keep_for(branch) -> float in (0, 1]``; ``stage=None`` means
native patch size and no token dropout.  A keep of 1.0 is passed to ``forward_views``
as ``None`` (the full-token path).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ViewPlan:
    """One view of a step, as the data pipeline must produce it.

    kind: "global" or "local" (augmentation family); size: pixel size (square);
    branch: which schedule keep applies to the trained encoder's pass of this view
    (mocov3 "q" (its momentum pass uses "k"), simclr "a"/"b", dino "global"/"local",
    supervised "default").
    """

    kind: str
    size: int
    branch: str


# ----------------------------------------------------------------------------- helpers

def stage_patch(stage) -> Optional[int]:
    """Patch size of ``stage`` (None = the encoder's native patch size)."""
    return None if stage is None else getattr(stage, "patch_size", None)


def patch_for(stage, size: int) -> Optional[int]:
    """The stage's patch size for a view of ``size`` pixels: it applies to the views it
    tiles; a view it does not divide (e.g. a small DINO local crop) keeps the native patch."""
    p = stage_patch(stage)
    return p if p is None or size % p == 0 else None


def stage_keep(stage, branch: Optional[str]) -> float:
    """Keep ratio of ``branch`` in ``stage`` as a float in (0, 1] (1.0 when no stage/branch)."""
    if stage is None or branch is None:
        return 1.0
    k = float(stage.keep_for(branch))
    if not 0.0 < k <= 1.0:
        raise ValueError(f"keep for branch {branch!r} must be in (0, 1], got {k}")
    return k


def keep_arg(keep: float) -> Optional[float]:
    """forward_views argument for a keep ratio: None for 1.0 (full tokens)."""
    return None if keep >= 1.0 else float(keep)


def cosine_momentum(m0: float, progress: float) -> float:
    """m0 -> 1 by half cosine over progress in [0, 1]: 1 - (1 - m0) (cos(pi p) + 1) / 2."""
    p = min(max(float(progress), 0.0), 1.0)
    return 1.0 - (1.0 - m0) * (math.cos(math.pi * p) + 1.0) / 2.0


def run_momentum_start(m0: float, total_steps: int | None, horizon: float | None) -> float:
    """The EMA's starting momentum for a run of ``total_steps`` optimizer steps: ``m0`` (the
    recipe's), capped so that the EMA's averaging horizon 1 / (1 - m) spans at most the
    fraction ``horizon`` of the run's steps (and at least one step): min(m0, 1 - 1 / max(1,
    horizon * total_steps)).  At the papers' scale (10^5 steps) the cap never binds; on a run
    of 1500 steps MoCo v3's 0.99 (a 100-step horizon) becomes 1 - 1/75 = 0.987 (horizon 0.05).
    ``horizon`` or ``total_steps`` None: ``m0``."""
    if horizon is None or total_steps is None:
        return float(m0)
    if not horizon > 0:
        raise ValueError(f"ema_horizon must be > 0 (or None), got {horizon}")
    return min(float(m0), 1.0 - 1.0 / max(1.0, horizon * int(total_steps)))


@torch.no_grad()
def ema_update_(target: Iterable[Tensor], source: Iterable[Tensor], m: float) -> None:
    """target <- m * target + (1 - m) * source, parameter by parameter."""
    t = [p.data if isinstance(p, nn.Parameter) else p for p in target]
    s = [p.detach() for p in source]
    if len(t) != len(s):
        raise ValueError(f"EMA over {len(t)} target vs {len(s)} source tensors")
    if not t:
        return
    torch._foreach_mul_(t, m)
    torch._foreach_add_(t, s, alpha=1.0 - m)


def frozen_copy(module: nn.Module) -> nn.Module:
    """deepcopy of ``module`` with every parameter requires_grad=False (a patched
    ViT stays patched: its bound methods are rebound to the copy)."""
    c = copy.deepcopy(module)
    for p in c.parameters():
        p.requires_grad_(False)
    return c


_NO_WD_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token", "mask_token")


def split_decay(named_params: Iterable[tuple[str, Tensor]], weight_decay: float,
                extra_no_wd: Iterable[str] = ()) -> list[dict]:
    """Two param groups: weight decay for matrices / convs; none for biases, norm
    weights (every tensor with ndim <= 1), position embeddings and class / register tokens."""
    no_wd_names = tuple(_NO_WD_NAMES) + tuple(extra_no_wd)
    decay, no_decay, seen = [], [], set()
    for name, p in named_params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or leaf in no_wd_names or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay), "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


# ----------------------------------------------------------------------------- Method

class Method(nn.Module):
    """Base class.  Subclasses set ``name``, ``DEFAULTS`` (recipe hyper-parameters,
    overridable by keyword) and implement view_plan / training_step / cost_views."""

    name: str = "method"
    DEFAULTS: dict[str, Any] = {}

    total_steps: int | None = None  # the run's optimizer steps (set_run_steps); None: unknown

    def __init__(self, encoder: nn.Module, **hparams):
        super().__init__()
        unknown = sorted(set(hparams) - set(self.DEFAULTS))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown hparams {unknown}; "
                            f"valid: {sorted(self.DEFAULTS)}")
        self.hp: dict[str, Any] = {**self.DEFAULTS, **hparams}
        if not hasattr(encoder, "forward_views"):
            raise ValueError("encoder must be a patched timm ViT (effkern.timm.patch / create_model)")
        self.encoder = encoder

    # --- interface ---------------------------------------------------------------
    def view_plan(self, base_size: int) -> list[ViewPlan]:
        raise NotImplementedError

    def training_step(self, views: list[Tensor], labels: Optional[Tensor], stage,
                      progress: float, generator=None) -> tuple[Tensor, dict[str, Tensor | float]]:
        """(loss, metrics): metrics computed on the device are detached tensors, never read
        back here (a host sync each step, and a graph break under torch.compile); the loop
        reads them at logging time."""
        raise NotImplementedError

    def cost_views(self, base_size: int, stage) -> list[tuple[int, Optional[int], float, bool]]:
        """(resolution, patch_size or None, keep, grad) per encoder pass per image:
        the trained encoder's pass of every view (grad True), then the momentum /
        teacher pass of the views it sees (grad False)."""
        return [(v.size, patch_for(stage, v.size), stage_keep(stage, v.branch), True)
                for v in self.view_plan(base_size)]

    def set_run_steps(self, total_steps: int) -> None:
        """The number of optimizer steps of the run (the loop calls it before training), for
        schedules whose constants depend on the run's length (the EMA's starting momentum)."""
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = int(total_steps)

    def head_flops(self, grad: bool) -> float:
        """Forward FLOPs per image of the heads run on one encoder pass's feature: the trained
        encoder's pass (``grad=True``) or the momentum / teacher pass (``False``)."""
        return 0.0

    def view_specs(self, base_size: int, stage, native_patch: int) -> list:
        """``cost_views`` as ``effkern.schedules.ViewSpec`` objects for the cost model: the
        native patch filled in and the heads' FLOPs attached to each pass."""
        from effkern.schedules import ViewSpec

        heads = {True: self.head_flops(True), False: self.head_flops(False)}
        return [ViewSpec(res, patch or native_patch, keep, grad, heads[bool(grad)])
                for res, patch, keep, grad in self.cost_views(base_size, stage)]

    def on_step_end(self, progress: float) -> None:
        """After the optimizer step.  ``progress`` everywhere in a method is the fraction of the
        run's optimizer steps done (after the step here), in [0, 1]."""

    def on_progress(self, progress: float) -> None:
        """Before a step: the trainer calls it, and training_step calls it with its own
        progress when it runs eagerly.  Schedules that the step's arithmetic reads live in
        tensors set here, so that a torch.compile'd step neither reads nor specialises on
        the Python float ``progress`` (it would recompile every step)."""

    def enter_step(self, progress: float) -> None:
        """First line of every training_step: ``on_progress`` when running eagerly; inside
        a torch.compile'd step the trainer has already called it."""
        if not torch.compiler.is_compiling():
            self.on_progress(progress)

    def progress_metrics(self, progress: float) -> dict:
        """The method's schedule values at ``progress`` (EMA momentum, temperatures), logged
        beside the step's metrics; computed outside the step for the same reason."""
        return {}

    def eval_encoder(self) -> nn.Module:
        """Backbone for kNN evaluation (a patched timm ViT)."""
        return self.encoder

    def classify(self, features: Tensor) -> Tensor | None:
        """Class logits of ``eval_encoder`` features for methods that train a classifier
        (the end-of-run evaluation reports its top-1), None for self-supervised ones."""
        return None

    def trainable_named_parameters(self) -> list[tuple[str, Tensor]]:
        """(name, param) of everything the optimizer updates (never the momentum /
        teacher copy, nor parameters that are fixed by the recipe)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def param_groups(self, weight_decay: float) -> list[dict]:
        return split_decay(self.trainable_named_parameters(), weight_decay)

    # --- helpers -----------------------------------------------------------------
    def _check_views(self, views: list[Tensor], n: int) -> None:
        if len(views) != n:
            raise ValueError(f"{self.name}: expected {n} views, got {len(views)}")

    @staticmethod
    def _run(encoder: nn.Module, views: list[Tensor], stage, branches: list[Optional[str]],
             generator=None) -> list[Tensor]:
        """ONE forward_views call: patch size from the stage, keep per view from its branch."""
        patches = [patch_for(stage, v.shape[-1]) for v in views]
        keeps = [keep_arg(stage_keep(stage, b)) for b in branches]
        return encoder.forward_views(list(views), patch_sizes=patches, keeps=keeps,
                                     generator=generator)
