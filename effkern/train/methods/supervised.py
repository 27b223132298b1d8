"""Supervised baseline: the encoder's own timm classifier head on the pooled features,
cross-entropy with label smoothing 0.1 (one "global" view)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import Method, ViewPlan


class Supervised(Method):
    name = "supervised"
    DEFAULTS = dict(label_smoothing=0.1)

    def __init__(self, encoder: nn.Module, **hparams):
        super().__init__(encoder, **hparams)
        if not isinstance(getattr(encoder, "head", None), nn.Module) or isinstance(encoder.head, nn.Identity):
            raise ValueError("supervised: the encoder needs a classifier head (timm num_classes > 0)")

    def head_flops(self, grad: bool) -> float:
        from effkern.schedules.cost import linear_flops

        return linear_flops(self.encoder.head)

    def view_plan(self, base_size: int) -> list[ViewPlan]:
        return [ViewPlan("global", base_size, "default")]

    def classify(self, features):
        return self.encoder.head(features)

    def training_step(self, views, labels, stage, progress, generator=None):
        self._check_views(views, 1)
        if labels is None:
            raise ValueError("supervised: labels are required")
        self.enter_step(progress)
        (feat,) = self._run(self.encoder, views, stage, ["default"], generator)
        logits = self.encoder.head(feat)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.hp["label_smoothing"])
        hard = labels.argmax(-1) if labels.ndim == 2 else labels  # soft (mixup) targets work too
        acc = (logits.detach().argmax(-1) == hard).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc}
