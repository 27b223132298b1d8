"""Weighted k-nearest-neighbour monitor (DINO's ``eval_knn``): cosine similarity between
L2-normalised features, the ``k`` most similar training samples vote for their class with
weight ``exp(sim / T)``, the class with the largest summed vote wins.

Normalisation: ``MEAN``/``STD`` are the ImageNet defaults, used for every dataset (the
models are trained from scratch, so matching the dataset statistics exactly is not needed;
the training loop normalises with the same values).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from effkern.train.data import MEAN, STD, ImageData, _seeded_subset

__all__ = ["MEAN", "STD", "eval_split", "extract_features", "knn_classify", "knn_accuracy",
           "knn_accuracy_from_features"]


@torch.no_grad()
def extract_features(model_fn: Callable[[Tensor], Tensor], images: Tensor, batch_size: int,
                     mean: Sequence[float], std: Sequence[float], device, normalize: bool = True) -> Tensor:
    """``model_fn`` on uint8 (N, C, H, W) images (scaled to [0, 1], normalised with mean/std,
    in batches on ``device``) -> (N, D) float32 features on ``device``, L2-normalised unless
    ``normalize=False``.  The caller puts the model in eval mode."""
    device = torch.device(device)
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    feats = []
    for b in range(0, images.shape[0], batch_size):
        x = images[b:b + batch_size].to(device, non_blocking=True).float().div_(255.0)
        x = (x - m) / s
        f = model_fn(x)
        if isinstance(f, (tuple, list)):
            f = f[0]
        f = f.float().flatten(1)
        feats.append(F.normalize(f, dim=1) if normalize else f)
    if not feats:
        raise ValueError("no images to extract features from")
    return torch.cat(feats)


@torch.no_grad()
def knn_classify(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, num_classes: int,
                 k: int = 20, T: float = 0.07, chunk: int = 1024) -> Tensor:
    """Predicted class (Ntest,) int64 of each test feature by DINO's weighted kNN vote.
    Features are expected L2-normalised (the dot product is the cosine similarity)."""
    if train_feats.shape[0] == 0:
        raise ValueError("kNN needs at least one training sample")
    k = min(int(k), train_feats.shape[0])
    device = train_feats.device
    train_labels = train_labels.to(device).long()
    test_feats = test_feats.to(device)
    preds = []
    for b in range(0, test_feats.shape[0], chunk):
        sim = test_feats[b:b + chunk] @ train_feats.T                    # (c, Ntrain)
        top_sim, top_idx = sim.topk(k, dim=1)                            # (c, k)
        weights = (top_sim / T).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    if not preds:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat(preds)


def eval_split(data: ImageData, limit_train: int | None, limit_test: int | None, seeds: tuple[int, int],
               what: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, train labels, test images, test labels), each split optionally cut
    to a fixed seeded subset (``seeds`` tell the evaluations' subsets apart)."""
    tr_x, tr_y, te_x, te_y = data.train_images, data.train_labels, data.test_images, data.test_labels
    idx = _seeded_subset(len(tr_y), limit_train, 0, seeds[0])
    if idx is not None:
        tr_x, tr_y = tr_x[idx], tr_y[idx]
    idx = _seeded_subset(len(te_y), limit_test, 0, seeds[1])
    if idx is not None:
        te_x, te_y = te_x[idx], te_y[idx]
    if len(te_y) == 0:
        raise ValueError(f"{what} needs at least one test sample")
    return tr_x, tr_y, te_x, te_y


@torch.no_grad()
def knn_accuracy(model_fn: Callable[[Tensor], Tensor], data: ImageData, mean, std, device, k: int = 20,
                 T: float = 0.07, batch_size: int = 256, limit_train: int | None = None,
                 limit_test: int | None = None) -> float:
    """Top-1 kNN accuracy in [0, 1] of ``model_fn``'s features on ``data`` (train = memory bank,
    test = queries); ``limit_*`` evaluate on fixed seeded subsets."""
    tr_x, tr_y, te_x, te_y = eval_split(data, limit_train, limit_test, (11, 12), "kNN accuracy")
    train_feats = extract_features(model_fn, tr_x, batch_size, mean, std, device, normalize=False)
    test_feats = extract_features(model_fn, te_x, batch_size, mean, std, device, normalize=False)
    return knn_accuracy_from_features(train_feats, tr_y, test_feats, te_y, data.num_classes, k=k, T=T)


@torch.no_grad()
def knn_accuracy_from_features(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor,
                               test_labels: Tensor, num_classes: int, k: int = 20, T: float = 0.07) -> float:
    """Top-1 kNN accuracy in [0, 1] from raw (un-normalised) features, so one extraction can
    serve the kNN and the linear probe (``F.normalize`` is row-wise: the same values as
    normalising batch by batch during the extraction)."""
    pred = knn_classify(F.normalize(train_feats, dim=1), train_labels, F.normalize(test_feats, dim=1),
                        num_classes, k=k, T=T)
    return (pred.cpu() == test_labels.cpu()).float().mean().item()
