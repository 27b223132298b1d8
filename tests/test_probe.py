"""The linear probe (effkern.train.probe): exact on separable data, sensible on raw digits,
deterministic, clear errors; and the trainer's --linear-probe summary entry."""

import pytest
import torch

from effkern.train.data import MEAN, STD, load_dataset
from effkern.train.probe import fit_linear_probe, linear_probe_accuracy, predict


def test_separable_blobs_are_classified_exactly():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 7, generator=g) * 10
    labels = torch.arange(4).repeat_interleave(50)
    feats = centres[labels] + torch.randn(200, 7, generator=g)
    W, b, mu, sigma = fit_linear_probe(feats, labels, 4)
    assert W.shape == (7, 4) and b.shape == (4,)
    assert torch.equal(predict(W, b, mu, sigma, feats), labels)


def test_raw_digits_pixels_are_linearly_separable_enough():
    data = load_dataset("digits", 8, seed=0)
    acc = linear_probe_accuracy(lambda x: x.flatten(1), data, MEAN, STD, "cpu")
    assert acc > 0.9  # logistic regression on 8x8 digits: ~0.95


def test_deterministic():
    data = load_dataset("digits", 8, limit_train=300, limit_test=100, seed=0)
    a = linear_probe_accuracy(lambda x: x.flatten(1), data, MEAN, STD, "cpu")
    b = linear_probe_accuracy(lambda x: x.flatten(1), data, MEAN, STD, "cpu")
    assert a == b


@pytest.mark.parametrize("kwargs, match", [
    ({"feats": torch.zeros(0, 3), "labels": torch.zeros(0, dtype=torch.long), "num_classes": 2}, "feats"),
    ({"feats": torch.zeros(4, 3), "labels": torch.zeros(3, dtype=torch.long), "num_classes": 2}, "labels"),
    ({"feats": torch.zeros(4, 3), "labels": torch.zeros(4, dtype=torch.long), "num_classes": 1}, "num_classes"),
    ({"feats": torch.zeros(4, 3), "labels": torch.zeros(4, dtype=torch.long), "num_classes": 2,
      "weight_decay": -1.0}, "weight_decay"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_linear_probe(**kwargs)
