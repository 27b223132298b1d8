"""DINO (Caron et al. 2021; facebookresearch/dino defaults).

student = encoder + DINOHead (MLP D -> hidden -> hidden -> bottleneck with GELU,
l2-normalised bottleneck, weight-normalised last layer bottleneck -> out_dim, weight_g
fixed to 1 with ``norm_last_layer``); teacher = EMA copy (momentum 0.996 -> 1, cosine),
kept in eval mode (no drop path, as the official teacher built without it), full
tokens unless ``teacher_branch`` names a schedule branch.  With ``use_bn_in_head`` the
teacher head's BatchNorm layers normalise by the teacher batch's own statistics while
training (the official teacher is never put in eval mode; the EMA averages parameters,
not running statistics), and under torch.distributed the head's BN is SyncBatchNorm
(``sync_bn``), as the official ``convert_sync_batchnorm``.  Multi-crop: 2 global views
(base_size) + ``n_local`` local views (round(96/224 * base_size)); the teacher sees the
2 global views.  Loss: mean over (teacher global i, student view j != i) of
CE(softmax((t_i - center) / tt), log_softmax(s_j / ts)); center EMA (0.9) of the
all-reduced teacher batch mean; tt warms up linearly 0.04 -> 0.07 over the first
``warmup_teacher_temp`` fraction of progress.  The last layer is frozen while
progress < ``freeze_last_layer`` (official ``cancel_gradients_last_layer``): its
gradient is exactly zero (not None, so DDP needs no ``find_unused_parameters`` and
its parameters keep ``requires_grad``); with AdamW the update stays 0 (moments start at
0) and weight decay on ``weight_v`` does not change the weight-normalised layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import dist
from .base import (Method, ViewPlan, cosine_momentum, ema_update_, frozen_copy, patch_for, run_momentum_start,
                   stage_keep)


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight = g * v / ||v|| (per output row), as
    ``nn.utils.weight_norm(nn.Linear(in, out, bias=False))`` (dim=0); g starts at 1 and
    is frozen when ``fixed_g`` (DINO ``norm_last_layer=True``)."""

    def __init__(self, in_dim: int, out_dim: int, fixed_g: bool = True):
        super().__init__()
        w = torch.empty(out_dim, in_dim)
        nn.init.kaiming_uniform_(w, a=5 ** 0.5)  # nn.Linear's init
        self.weight_v = nn.Parameter(w)
        self.weight_g = nn.Parameter(torch.ones(out_dim), requires_grad=not fixed_g)
        self.grad_frozen = False  # True: forward as usual, zero gradient to v and g

    @property
    def weight(self) -> Tensor:
        v, g = self.weight_v, self.weight_g
        if self.grad_frozen:
            v, g = v.detach() + 0 * v, g.detach() + 0 * g
        return g[:, None] * v / v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_g=norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


def teacher_temp_at(progress: float, start: float, end: float, warmup: float) -> float:
    """Linear start -> end over progress in [0, warmup], then end."""
    if warmup <= 0:
        return end
    f = min(max(float(progress) / warmup, 0.0), 1.0)
    return start + (end - start) * f


def dino_loss(student_out: list[Tensor], teacher_out: list[Tensor], center: Tensor,
              teacher_temp: float | Tensor, student_temp: float) -> Tensor:
    """Mean over pairs (i, j), i != j, of mean_batch sum_k -softmax((t_i - c)/tt)_k log_softmax(s_j/ts)_k.
    student_out: one (B, K) tensor per view (globals first); teacher_out: one per global view."""
    t = [F.softmax((ti.float() - center) / teacher_temp, dim=-1).detach() for ti in teacher_out]
    s = [F.log_softmax(sj.float() / student_temp, dim=-1) for sj in student_out]
    total, n = 0.0, 0
    for i, ti in enumerate(t):
        for j, sj in enumerate(s):
            if i == j:
                continue
            total = total + torch.sum(-ti * sj, dim=-1).mean()
            n += 1
    return total / n


class DINO(Method):
    name = "dino"
    DEFAULTS = dict(
        out_dim=65536, hidden_dim=2048, bottleneck_dim=256, nlayers=3, use_bn_in_head=False,
        norm_last_layer=True,
        momentum_start=0.996,
        ema_horizon=0.05,                      # cap: EMA over at most this fraction of the run's steps
        warmup_teacher_temp_start=0.04, teacher_temp=0.07, warmup_teacher_temp=0.3,  # fraction of progress
        student_temp=0.1, center_momentum=0.9,
        n_local=8, local_size=None,           # None -> 96/224 of base_size, rounded to whole patches
        freeze_last_layer=0.01,                # fraction of progress (official: 1 of 100 epochs)
        teacher_branch=None,                   # schedule branch for the teacher's keep; None -> full tokens
        eval_teacher=True,                     # kNN on the teacher backbone (official eval_knn default)
        sync_bn=True,                          # with use_bn_in_head: SyncBatchNorm when torch.distributed is up
    )

    def __init__(self, encoder: nn.Module, **hparams):
        super().__init__(encoder, **hparams)
        hp = self.hp
        self.head = DINOHead(encoder.num_features, hp["out_dim"], hp["hidden_dim"], hp["bottleneck_dim"],
                             hp["nlayers"], hp["use_bn_in_head"], hp["norm_last_layer"])
        if hp["use_bn_in_head"] and hp["sync_bn"] and dist.is_dist():
            self.head = nn.SyncBatchNorm.convert_sync_batchnorm(self.head)
        self.teacher = frozen_copy(encoder)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, hp["out_dim"]))
        # the teacher temperature of the current step, set by on_progress (a tensor: see Method.on_progress)
        self.register_buffer("teacher_temp_now", torch.tensor(float(hp["warmup_teacher_temp_start"])),
                             persistent=False)
        self.momentum = cosine_momentum(hp["momentum_start"], 0.0)
        self.on_progress(0.0)
        self.train(self.training)  # the teacher's modes (below), also for a loop that never calls train()

    def train(self, mode: bool = True):
        """The teacher backbone stays in eval mode (no drop path); the teacher head follows
        ``mode`` (its only mode-dependent layers are BatchNorm: batch statistics while
        training, as the official teacher)."""
        super().train(mode)
        self.teacher.eval()
        return self

    # --- schedules ---
    def momentum_at(self, progress: float) -> float:
        return cosine_momentum(self.momentum_start(), progress)

    def momentum_start(self) -> float:
        """The recipe's momentum_start, capped by ema_horizon (a fraction of the run's steps)."""
        return run_momentum_start(self.hp["momentum_start"], self.total_steps, self.hp["ema_horizon"])

    def teacher_temp_at(self, progress: float) -> float:
        hp = self.hp
        return teacher_temp_at(progress, hp["warmup_teacher_temp_start"], hp["teacher_temp"], hp["warmup_teacher_temp"])

    def last_layer_frozen(self, progress: float) -> bool:
        return float(progress) < self.hp["freeze_last_layer"]

    def on_progress(self, progress: float) -> None:
        self.head.last_layer.grad_frozen = self.last_layer_frozen(progress)
        self.teacher_temp_now.fill_(self.teacher_temp_at(progress))

    def progress_metrics(self, progress: float) -> dict:
        return {"teacher_temp": self.teacher_temp_at(progress), "momentum": self.momentum_at(progress)}

    def head_flops(self, grad: bool) -> float:
        from effkern.schedules.cost import linear_flops

        return linear_flops(self.head)  # the teacher head has the student's shape

    # --- views ---
    def local_size(self, base_size: int) -> int:
        ls = self.hp["local_size"]
        if ls is not None:
            return int(ls)
        # 96/224 of the base size (DINO's 96 px at 224), rounded to whole native patches
        p = self.encoder.patch_embed.patch_size[0]
        return max(p, int(round(96 / 224 * base_size / p)) * p)

    def view_plan(self, base_size: int) -> list[ViewPlan]:
        g = [ViewPlan("global", base_size, "global")] * 2
        self._plan_local_size = self.local_size(base_size)  # locals keep this size when globals shrink
        loc = [ViewPlan("local", self._plan_local_size, "local")] * self.hp["n_local"]
        return g + loc

    def cost_views(self, base_size, stage):
        """2 global at ``base_size`` (the loop passes the stage-scaled size) + the local
        views at the size of the last :meth:`view_plan` (the loop only shrinks global views;
        before any view_plan call: from ``base_size``) with grad, + 2 teacher passes."""
        ls = getattr(self, "_plan_local_size", None) or self.local_size(base_size)
        pg, pl = patch_for(stage, base_size), patch_for(stage, ls)
        student = ([(base_size, pg, stage_keep(stage, "global"), True)] * 2
                   + [(ls, pl, stage_keep(stage, "local"), True)] * self.hp["n_local"])
        kt = stage_keep(stage, self.hp["teacher_branch"])
        return student + [(base_size, pg, kt, False)] * 2

    # --- step ---
    def training_step(self, views, labels, stage, progress, generator=None):
        n = 2 + self.hp["n_local"]
        self._check_views(views, n)
        self.enter_step(progress)
        branches = ["global"] * 2 + ["local"] * self.hp["n_local"]
        feats = self._run(self.encoder, views, stage, branches, generator)
        B = feats[0].shape[0]
        s_all = self.head(torch.cat(feats, dim=0))
        student_out = list(s_all.split(B, dim=0))
        with torch.no_grad():
            tf = self._run(self.teacher, views[:2], stage, [self.hp["teacher_branch"]] * 2, generator)
            t_all = self.teacher_head(torch.cat(tf, dim=0))
        teacher_out = list(t_all.split(B, dim=0))
        loss = dino_loss(student_out, teacher_out, self.center, self.teacher_temp_now, self.hp["student_temp"])
        self.update_center(t_all)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        batch_center = teacher_output.float().mean(dim=0, keepdim=True)
        dist.all_reduce_mean_(batch_center)
        cm = self.hp["center_momentum"]
        self.center.mul_(cm).add_(batch_center, alpha=1 - cm)

    def on_step_end(self, progress: float) -> None:
        m = self.momentum_at(progress)
        ema_update_(list(self.teacher.parameters()) + list(self.teacher_head.parameters()),
                    list(self.encoder.parameters()) + list(self.head.parameters()), m)
        self.momentum = m

    def eval_encoder(self) -> nn.Module:
        return self.teacher if self.hp["eval_teacher"] else self.encoder

    def trainable_named_parameters(self):
        skip = ("teacher.", "teacher_head.")
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith(skip)]
