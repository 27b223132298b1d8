"""MoCo v3 (Chen, Xie, He 2021; facebookresearch/moco-v3, ViT recipe).

base encoder + projector (3-layer MLP, last BN affine=False) + predictor (2-layer MLP,
last BN affine=False); momentum encoder = EMA copy of encoder + projector.  Loss
ctr(q1, k2) + ctr(q2, k1), ctr = InfoNCE against the keys gathered over ranks, scaled
by 2T.  As the official code, the projector / predictor run on each view separately
(BatchNorm statistics per view) and ``stop_grad_conv1`` freezes the patch embedding
(``freeze_patch_embed=True``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import dist
from .base import (Method, ViewPlan, cosine_momentum, ema_update_, frozen_copy, keep_arg, patch_for,
                   run_momentum_start, stage_keep)


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """moco-v3 ``_build_mlp``: Linear(no bias)-BN-ReLU ... Linear(no bias)[-BN(affine=False)]."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d1 = input_dim if i == 0 else mlp_dim
        d2 = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d1, d2, bias=False))
        if i < num_layers - 1:
            layers.append(nn.BatchNorm1d(d2))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(d2, affine=False))
    return nn.Sequential(*layers)


def contrastive_loss(q: Tensor, k: Tensor, T: float) -> Tensor:
    """moco-v3 ctr: normalize; logits = q @ all_gather(k).T / T; labels = arange(N) + N*rank;
    CE * 2T.  ``k`` carries no gradient."""
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)
    k_all = torch.cat(dist.all_gather(k.detach()), dim=0)
    logits = q @ k_all.t() / T
    N = logits.shape[0]
    labels = torch.arange(N, device=logits.device) + N * dist.rank()
    return F.cross_entropy(logits.float(), labels) * (2 * T)


class MoCoV3(Method):
    name = "mocov3"
    DEFAULTS = dict(
        mlp_dim=4096,            # hidden dim of projector and predictor
        out_dim=256,             # moco "dim"
        temperature=0.2,         # ViT recipe
        momentum_start=0.99,     # ViT recipe, cosine to 1
        ema_horizon=0.05,        # cap: the EMA averages over at most this fraction of the run's steps
        freeze_patch_embed=True,  # official stop_grad_conv1 for ViT
        sync_bn=True,            # convert BN to SyncBatchNorm when torch.distributed is initialised
    )

    def __init__(self, encoder: nn.Module, **hparams):
        super().__init__(encoder, **hparams)
        hp = self.hp
        if hp["freeze_patch_embed"]:
            for p in encoder.patch_embed.parameters():
                p.requires_grad_(False)
        D = encoder.num_features
        self.projector = build_mlp(3, D, hp["mlp_dim"], hp["out_dim"], last_bn=True)
        self.predictor = build_mlp(2, hp["out_dim"], hp["mlp_dim"], hp["out_dim"], last_bn=True)
        if hp["sync_bn"] and dist.is_dist():
            self.projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.projector)
            self.predictor = nn.SyncBatchNorm.convert_sync_batchnorm(self.predictor)
        self.momentum_encoder = frozen_copy(encoder)
        self.momentum_projector = frozen_copy(self.projector)
        self.momentum = cosine_momentum(hp["momentum_start"], 0.0)

    def momentum_at(self, progress: float) -> float:
        return cosine_momentum(self.momentum_start(), progress)

    def momentum_start(self) -> float:
        """The recipe's momentum_start, capped by ema_horizon (a fraction of the run's steps)."""
        return run_momentum_start(self.hp["momentum_start"], self.total_steps, self.hp["ema_horizon"])

    def head_flops(self, grad: bool) -> float:
        from effkern.schedules.cost import linear_flops

        return linear_flops(self.projector) + linear_flops(self.predictor) if grad else linear_flops(self.projector)

    def view_plan(self, base_size: int) -> list[ViewPlan]:
        return [ViewPlan("global", base_size, "q"), ViewPlan("global", base_size, "q")]

    def cost_views(self, base_size, stage):
        p = patch_for(stage, base_size)
        kq, kk = stage_keep(stage, "q"), stage_keep(stage, "k")
        return [(base_size, p, kq, True)] * 2 + [(base_size, p, kk, False)] * 2

    def training_step(self, views, labels, stage, progress, generator=None):
        self._check_views(views, 2)
        self.enter_step(progress)
        x1, x2 = views
        p = patch_for(stage, x1.shape[-1])
        kq, kk = keep_arg(stage_keep(stage, "q")), keep_arg(stage_keep(stage, "k"))
        f1, f2 = self.encoder.forward_views([x1, x2], patch_sizes=[p, p], keeps=[kq, kq], generator=generator)
        q1 = self.predictor(self.projector(f1))
        q2 = self.predictor(self.projector(f2))
        with torch.no_grad():
            g1, g2 = self.momentum_encoder.forward_views([x1, x2], patch_sizes=[p, p], keeps=[kk, kk],
                                                         generator=generator)
            k1 = self.momentum_projector(g1)
            k2 = self.momentum_projector(g2)
        T = self.hp["temperature"]
        loss = contrastive_loss(q1, k2, T) + contrastive_loss(q2, k1, T)
        return loss, {"loss": loss.detach()}

    def progress_metrics(self, progress: float) -> dict:
        return {"momentum": self.momentum_at(progress)}

    def on_step_end(self, progress: float) -> None:
        m = self.momentum_at(progress)
        ema_update_(list(self.momentum_encoder.parameters()) + list(self.momentum_projector.parameters()),
                    list(self.encoder.parameters()) + list(self.projector.parameters()), m)
        self.momentum = m

    def trainable_named_parameters(self):
        skip = ("momentum_encoder.", "momentum_projector.")
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith(skip)]
