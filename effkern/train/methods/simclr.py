"""SimCLR (Chen et al. 2020): encoder + projection head Linear-BN-ReLU-Linear, NT-Xent
over the 2N views with the negatives gathered over ranks (gradients flow through the
gather).  Both views go through the encoder and the head as one batch (BatchNorm over
2N, as the official code).  The loss is the mean over the 2N anchors (the paper's
1/2N sum; the official TF code sums the two directions, i.e. 2x this)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import dist
from .base import Method, ViewPlan

_LARGE = 1e9


def nt_xent(za: Tensor, zb: Tensor, temperature: float) -> Tensor:
    """NT-Xent for local embeddings za, zb (N, d) of the two views; negatives from every rank."""
    za = F.normalize(za.float(), dim=1)
    zb = F.normalize(zb.float(), dim=1)
    za_all = torch.cat(dist.all_gather_with_grad(za), dim=0)
    zb_all = torch.cat(dist.all_gather_with_grad(zb), dim=0)
    N, M = za.shape[0], za_all.shape[0]
    labels = torch.arange(N, device=za.device) + N * dist.rank()
    self_mask = F.one_hot(labels, M).to(za.dtype) * _LARGE
    logits_aa = za @ za_all.t() / temperature - self_mask
    logits_bb = zb @ zb_all.t() / temperature - self_mask
    logits_ab = za @ zb_all.t() / temperature
    logits_ba = zb @ za_all.t() / temperature
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), labels)
    return (loss_a + loss_b) / 2


class SimCLR(Method):
    name = "simclr"
    DEFAULTS = dict(hidden_dim=2048, out_dim=128, temperature=0.1, sync_bn=True)

    def __init__(self, encoder: nn.Module, **hparams):
        super().__init__(encoder, **hparams)
        D, h, o = encoder.num_features, self.hp["hidden_dim"], self.hp["out_dim"]
        self.projector = nn.Sequential(nn.Linear(D, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Linear(h, o))
        if self.hp["sync_bn"] and dist.is_dist():
            self.projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.projector)

    def head_flops(self, grad: bool) -> float:
        from effkern.schedules.cost import linear_flops

        return linear_flops(self.projector) if grad else 0.0

    def view_plan(self, base_size: int) -> list[ViewPlan]:
        return [ViewPlan("global", base_size, "a"), ViewPlan("global", base_size, "b")]

    def training_step(self, views, labels, stage, progress, generator=None):
        self._check_views(views, 2)
        self.enter_step(progress)
        fa, fb = self._run(self.encoder, views, stage, ["a", "b"], generator)
        z = self.projector(torch.cat([fa, fb], dim=0))
        za, zb = z.chunk(2, dim=0)
        loss = nt_xent(za, zb, self.hp["temperature"])
        return loss, {"loss": loss.detach()}
