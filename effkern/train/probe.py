"""Linear probe on frozen features: the standard accuracy of self-supervised encoders
next to the kNN monitor (effkern.train.knn).

Protocol (deterministic, full batch, no augmentation): features of the eval encoder
(un-normalised), standardised with the training split's per-dimension mean and standard
deviation (the role of the parameter-free BatchNorm that MoCo v3 / MAE put before the
linear layer); a multinomial logistic regression fitted by L-BFGS (strong Wolfe line
search) on cross-entropy + ``weight_decay/2 * ||W||^2``; top-1 accuracy on the test split.
This is a cheaper stand-in for the papers' 90-epoch SGD/LARS probe with augmentation, so
its numbers are comparable across effkern runs, not with published linear-probe tables.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from effkern.train.data import ImageData
from effkern.train.knn import eval_split, extract_features

__all__ = ["fit_linear_probe", "linear_probe_accuracy", "linear_probe_accuracy_from_features"]


def fit_linear_probe(feats: Tensor, labels: Tensor, num_classes: int, weight_decay: float = 1e-4,
                     max_iter: int = 300) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fit on (N, D) features: returns (W (D, C), b (C,), mu (D,), sigma (D,)) with
    logits = ((x - mu) / sigma) @ W + b."""
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(f"feats must be (N, D) with N >= 1, got {tuple(feats.shape)}")
    if labels.shape != (feats.shape[0],):
        raise ValueError(f"labels must be ({feats.shape[0]},), got {tuple(labels.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    x = feats.double()
    mu = x.mean(0)
    sigma = x.std(0, unbiased=False).clamp_min(1e-6)
    x = (x - mu) / sigma
    y = labels.to(x.device).long()
    W = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + 0.5 * weight_decay * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach().float(), b.detach().float(), mu.float(), sigma.float()


def predict(W: Tensor, b: Tensor, mu: Tensor, sigma: Tensor, feats: Tensor) -> Tensor:
    return (((feats.float() - mu) / sigma) @ W + b).argmax(dim=1)


@torch.no_grad()
def linear_probe_accuracy(model_fn: Callable[[Tensor], Tensor], data: ImageData, mean, std, device,
                          batch_size: int = 256, weight_decay: float = 1e-4, max_iter: int = 300,
                          limit_train: int | None = None, limit_test: int | None = None) -> float:
    """Top-1 linear-probe accuracy in [0, 1] of ``model_fn``'s features on ``data``."""
    tr_x, tr_y, te_x, te_y = eval_split(data, limit_train, limit_test, (13, 14), "the linear probe")
    train_feats = extract_features(model_fn, tr_x, batch_size, mean, std, device, normalize=False)
    test_feats = extract_features(model_fn, te_x, batch_size, mean, std, device, normalize=False)
    return linear_probe_accuracy_from_features(train_feats, tr_y, test_feats, te_y, data.num_classes,
                                               weight_decay, max_iter)


def linear_probe_accuracy_from_features(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor,
                                        test_labels: Tensor, num_classes: int, weight_decay: float = 1e-4,
                                        max_iter: int = 300) -> float:
    """Top-1 linear-probe accuracy in [0, 1] from raw features (fit on train, score on test)."""
    W, b, mu, sigma = fit_linear_probe(train_feats, train_labels, num_classes, weight_decay, max_iter)
    pred = predict(W, b, mu, sigma, test_feats)
    return (pred.cpu() == test_labels.cpu()).float().mean().item()
