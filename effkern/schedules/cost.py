"""Analytic FLOP cost model for a ViT training step, in "units".

One unit = one forward pass of one image at the model's native image size, native patch
size, keep 1.0.  Counted (multiply-add = 2 FLOPs), per image, n kept patches,
L = n + num_prefix_tokens tokens, hidden H = mlp_ratio * D:

  patch embedding        2 n C p^2 D          (kept patches only; prefix tokens are free)
  per block:  qkv        2 L D (3 D)
              scores+AV  2 * 2 L^2 D
              proj       2 L D D
              mlp        2 * 2 L D H

plus the heads the method runs on the view's pooled feature (``ViewSpec.head_flops``: the
MoCo v3 projector + predictor, the SimCLR projector, the DINO head, the classifier; 2 in out
per Linear layer, counted by the method).  They do not shrink with the schedule: with the
papers' 4096-wide MLPs on a short sequence they are a large part of the step (MoCo v3's
projector + predictor at D 192: 41 MFLOPs per view; ViT-Tiny on 64 patches: 730 MFLOPs
with 12 blocks, 244 with 4, so a keep of 0.25 leaves the heads at a quarter of the step).

Ignored: LayerNorm, BatchNorm, softmax, GELU, biases, residual adds, position embedding,
the final norm and pooling (all O(L D) or batch-size-only terms, a few % at most).  The
backward pass is taken as 2x the forward, so a trained view costs 3x its forward (heads
included), a forward-only (momentum / teacher) view 1x.

`calibrate` times real forward+backward steps and returns measured / predicted ratios,
for devices where the analytic model is off (small models, fixed per-step costs).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from effkern.schedules.stage import Schedule, Stage

__all__ = ["ModelCfg", "ViewSpec", "tokens", "forward_flops", "linear_flops", "unit_flops", "view_cost",
           "step_cost", "predicted_speedup", "describe", "default_views_fn", "Calibration",
           "calibrate"]


def _first(x) -> int:
    return int(x[0]) if isinstance(x, (tuple, list)) else int(x)


@dataclass(frozen=True)
class ModelCfg:
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_prefix_tokens: int = 1
    in_chans: int = 3

    @classmethod
    def from_timm(cls, model) -> "ModelCfg":
        """Read a timm VisionTransformer (patched or not)."""
        pe = model.patch_embed
        D = int(model.embed_dim)
        blk = model.blocks[0]
        return cls(img_size=_first(pe.img_size), patch_size=_first(pe.patch_size), embed_dim=D,
                   depth=len(model.blocks), num_heads=int(blk.attn.num_heads),
                   mlp_ratio=blk.mlp.fc1.out_features / D,
                   num_prefix_tokens=int(model.num_prefix_tokens),
                   in_chans=int(pe.proj.in_channels))


@dataclass(frozen=True)
class ViewSpec:
    """One view of a training step: image size, patch size, keep ratio, and whether it is
    backpropagated (grad=True: forward + backward of a trained encoder; False: forward only)."""

    resolution: int
    patch_size: int
    keep: float
    grad: bool
    head_flops: float = 0.0  # forward FLOPs per image of the heads run on this view's feature


def tokens(cfg: ModelCfg, resolution: int, patch_size: int, keep: float) -> int:
    """Kept patch tokens + prefix tokens: max(1, int(N * keep)) + prefix, N = (res // p)^2
    (the rule of timm PatchDropout and effkern.ops.sample_keep)."""
    n = (int(resolution) // int(patch_size)) ** 2
    return max(1, int(n * keep)) + cfg.num_prefix_tokens


def forward_flops(cfg: ModelCfg, resolution: int, patch_size: int, keep: float) -> float:
    """Forward FLOPs of one image (see the module docstring for what is counted)."""
    L = tokens(cfg, resolution, patch_size, keep)
    n = L - cfg.num_prefix_tokens
    D, p = cfg.embed_dim, int(patch_size)
    H = cfg.mlp_ratio * D
    embed = 2.0 * n * cfg.in_chans * p * p * D
    block = 2.0 * L * D * 3 * D + 2 * 2.0 * L * L * D + 2.0 * L * D * D + 2 * 2.0 * L * D * H
    return embed + cfg.depth * block


def linear_flops(module) -> float:
    """Forward FLOPs per sample of every Linear layer in ``module`` (2 in out each; a layer
    with a ``weight_v`` (weight-normalised) counts by that matrix), e.g. a projection head."""
    total = 0.0
    for m in module.modules():
        w = getattr(m, "weight_v", None)
        if w is None and type(m).__name__ == "Linear":
            w = m.weight
        if w is not None:
            total += 2.0 * w.shape[0] * w.shape[1]
    return total


def unit_flops(cfg: ModelCfg) -> float:
    """FLOPs of one unit: one forward of one image at cfg.img_size, cfg.patch_size, keep 1."""
    return forward_flops(cfg, cfg.img_size, cfg.patch_size, 1.0)


def view_cost(cfg: ModelCfg, view: ViewSpec) -> float:
    """Cost of one image of `view` in units, encoder and heads (x3 when backpropagated)."""
    f = (forward_flops(cfg, view.resolution, view.patch_size, view.keep) + view.head_flops) / unit_flops(cfg)
    return f * (3.0 if view.grad else 1.0)


def step_cost(cfg: ModelCfg, views: Sequence[ViewSpec], batch: int) -> float:
    """Cost of a step of `batch` images, each seen through `views`, in units."""
    return batch * sum(view_cost(cfg, v) for v in views)


ViewsFn = Callable[[Stage], list[ViewSpec]]


def default_views_fn(cfg: ModelCfg, branch: str = "default", grad: bool = True) -> ViewsFn:
    """A views_fn for one trained view (supervised): the image at the stage's global size
    (img * resolution in whole patches, Stage.global_size, as the trainer crops), the
    stage's patch size (else native) and the stage's keep for `branch`."""

    def views_fn(stage: Stage) -> list[ViewSpec]:
        return [ViewSpec(resolution=stage.global_size(cfg.img_size, cfg.patch_size),
                         patch_size=stage.patch_size or cfg.patch_size,
                         keep=stage.keep_for(branch), grad=grad)]

    return views_fn


def _schedule_cost(cfg: ModelCfg, schedule: Schedule, views_fn: ViewsFn, batch: int) -> float:
    return sum((end - start) * step_cost(cfg, views_fn(stage), batch)
               for start, end, stage in schedule.intervals())


def predicted_speedup(cfg: ModelCfg, schedule: Schedule, views_fn: ViewsFn | None = None,
                      batch: int = 1) -> float:
    """Baseline cost (views_fn(Stage()): all native) over the schedule's progress-averaged
    cost.  Progress is budget spent / budget; with an equal number of steps this is the
    FLOP speedup of the schedule over its all-native baseline."""
    views_fn = views_fn or default_views_fn(cfg)
    base = step_cost(cfg, views_fn(Stage()), batch)
    return base / _schedule_cost(cfg, schedule, views_fn, batch)


def _fmt_keep(stage: Stage) -> str:
    return ",".join(f"{b}={r:g}" for b, r in stage.keep) or "1"


def describe(schedule: Schedule, cfg: ModelCfg, views_fn: ViewsFn | None = None) -> str:
    """A text table of the schedule's stages with their per-image cost and the total
    predicted speedup (used by `effkern schedule show NAME`)."""
    views_fn = views_fn or default_views_fn(cfg)
    base = step_cost(cfg, views_fn(Stage()), 1)
    head = ("start", "end", "patch", "keep", "resolution", "randaug m", "cost/img", "vs native")
    rows = []
    for start, end, st in schedule.intervals():
        c = step_cost(cfg, views_fn(st), 1)
        res = f"{st.resolution:.4g} ({st.global_size(cfg.img_size, cfg.patch_size)}px)"
        rows.append((f"{start:.3g}", f"{end:.3g}", str(st.patch_size or cfg.patch_size), _fmt_keep(st),
                     res, "-" if st.randaug_magnitude is None else str(st.randaug_magnitude),
                     f"{c:.3f}", f"{base / c:.2f}x"))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(s.ljust(w) for s, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [f"schedule {schedule.name!r}: {cfg.img_size}px, native patch {cfg.patch_size}, "
           f"D={cfg.embed_dim}, depth {cfg.depth}; cost in units (1 = one native forward of one image)",
           line(head), line(tuple("-" * w for w in widths))]
    out += [line(r) for r in rows]
    out.append(f"baseline (all native) cost/img {base:.3f}; schedule average "
               f"{_schedule_cost(cfg, schedule, views_fn, 1):.3f}; predicted speedup "
               f"{predicted_speedup(cfg, schedule, views_fn):.2f}x (FLOPs; no LayerNorm/softmax)")
    return "\n".join(out)


# ----------------------------------------------------------------------------- calibration

def _key(resolution: int, patch_size: int, keep: float) -> str:
    return f"r{int(resolution)}_p{int(patch_size)}_k{float(keep):g}"


@dataclass
class Calibration:
    """Per-device measured / predicted time ratios per (resolution, patch, keep) setting,
    relative to the native setting (ratio 1.0 there)."""

    device: str = ""
    factors: dict[str, float] = field(default_factory=dict)

    def factor(self, resolution: int, patch_size: int, keep: float) -> float:
        return self.factors.get(_key(resolution, patch_size, keep), 1.0)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"device": self.device, "factors": self.factors}, f, indent=2)

    @classmethod
    def load(cls, path: str) -> "Calibration":
        with open(path) as f:
            d = json.load(f)
        return cls(device=d.get("device", ""), factors={k: float(v) for k, v in d["factors"].items()})


def calibrate(model, device, settings: Sequence[tuple[int, int, float]], repeat: int = 3,
              batch: int = 2) -> dict[str, float]:
    """Time forward+backward of an effkern-patched timm ViT at each (resolution, patch,
    keep) setting and return {key: (t / t_native) / (cost / cost_native)}.

    The native setting (cfg.img_size, cfg.patch_size, 1.0) is timed first as the
    reference.  Use `Calibration(device, calibrate(...))` to keep and save the result.
    """
    import torch

    cfg = ModelCfg.from_timm(model)
    model = model.to(device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def timed(res: int, p: int, k: float) -> float:
        x = torch.randn(batch, cfg.in_chans, res, res, device=device)
        kw = {} if (res, p, k) == (cfg.img_size, cfg.patch_size, 1.0) else {"patch_size": p, "keep": k}
        best = float("inf")
        for i in range(repeat + 1):  # first call is warm-up
            model.zero_grad(set_to_none=True)
            sync()
            t0 = time.perf_counter()
            model(x, **kw).float().sum().backward()
            sync()
            if i:
                best = min(best, time.perf_counter() - t0)
        return best

    native = (cfg.img_size, cfg.patch_size, 1.0)
    t0 = timed(*native)
    c0 = forward_flops(cfg, *native)
    out = {}
    for res, p, k in settings:
        t = t0 if (res, p, k) == native else timed(res, p, k)
        out[_key(res, p, k)] = (t / t0) / (forward_flops(cfg, res, p, k) / c0)
    return out
