"""Data layer: dataset loading, multi-view determinism, loader sharding/resume, augmentations, kNN."""
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from effkern.train.augment import METHODS, RandAugmentMagnitude, rand_augment, view_transforms
from effkern.train.data import (DATASETS, FASHION_MNIST_DIR, MEAN, STD, ImageData, MultiViewDataset,
                                collate_views, load_dataset, make_loader)
from effkern.train.knn import extract_features, knn_accuracy, knn_classify

_HAS_FMNIST = os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))


def _view(kind, size):
    return SimpleNamespace(kind=kind, size=size)


PLANS = {
    "mocov3": [_view("global", 24), _view("global", 24)],
    "simclr": [_view("global", 24), _view("global", 24)],
    "dino": [_view("global", 24), _view("global", 24), _view("local", 12), _view("local", 12)],
    "supervised": [_view("global", 24)],
}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", 16)


# ----------------------------------------------------------------------------- loading
@pytest.mark.skipif(not _HAS_FMNIST, reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR}")
def test_fashion_mnist_loads():
    d = load_dataset("fashion-mnist", 20, limit_train=300, limit_test=100, seed=3)
    assert isinstance(d, ImageData) and d.name == "fashion-mnist" and d.num_classes == 10
    assert d.train_images.shape == (300, 3, 20, 20) and d.test_images.shape == (100, 3, 20, 20)
    assert d.train_images.dtype == torch.uint8 and d.train_labels.dtype == torch.int64
    assert 0 <= int(d.train_labels.min()) and int(d.train_labels.max()) <= 9
    assert len(d.train_labels.unique()) == 10  # 300 random samples hit every class
    assert torch.equal(d.train_images[:, 0], d.train_images[:, 2])  # grayscale replicated
    assert d.train_images.float().std() > 20  # real images, not blank
    again = load_dataset("fashion-mnist", 20, limit_train=300, limit_test=100, seed=3)
    assert torch.equal(d.train_images, again.train_images) and torch.equal(d.test_labels, again.test_labels)
    other = load_dataset("fashion-mnist", 20, limit_train=300, limit_test=100, seed=4)
    assert not torch.equal(d.train_labels, other.train_labels)
    full = load_dataset("fashion-mnist", 28, limit_train=10)  # native size: pixels untouched
    assert full.test_images.shape == (10000, 3, 28, 28)
    assert torch.bincount(full.test_labels).tolist() == [1000] * 10


def test_fashion_mnist_missing(tmp_path):
    import effkern.train.data as data

    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data._load_fashion_mnist(str(tmp_path))


def test_digits_loads(digits):
    assert DATASETS == ("fashion-mnist", "digits")
    assert digits.train_images.shape == (1438, 3, 16, 16) and digits.test_images.shape == (359, 3, 16, 16)
    assert digits.train_images.dtype == torch.uint8 and digits.num_classes == 10
    assert int(digits.train_images.max()) > 200  # 0..16 scaled to 0..255
    d8 = load_dataset("digits", 8, limit_train=100, limit_test=50, seed=1)
    assert d8.train_images.shape == (100, 3, 8, 8) and d8.test_labels.shape == (50,)


def _write_tree(root, classes, per_class, size=(20, 14)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for k in range(per_class):
            arr = np.full((size[1], size[0], 3), 40 * c, dtype=np.uint8)
            arr[..., c % 3] = rng.integers(0, 255)
            Image.fromarray(arr).save(root / name / f"{k}.png")


def test_image_folder_split(tmp_path):
    _write_tree(tmp_path, ["cat", "dog", "eel"], 10)
    d = load_dataset(str(tmp_path), 8, seed=0)
    assert d.num_classes == 3 and d.classes == ("cat", "dog", "eel")
    assert d.train_images.shape == (27, 3, 8, 8) and d.test_images.shape == (3, 3, 8, 8)
    assert d.train_images.dtype == torch.uint8
    # class c images have grey level 40 c in the channels not overwritten
    for x, y in zip(d.train_images, d.train_labels):
        other = [ch for ch in range(3) if ch != int(y) % 3]
        assert int(x[other[0], 4, 4]) == 40 * int(y)


def test_image_folder_train_val(tmp_path):
    _write_tree(tmp_path / "train", ["a", "b", "c"], 4)
    _write_tree(tmp_path / "val", ["b", "c"], 2)  # val lacks "a": labels still follow train's indices
    d = load_dataset(str(tmp_path), 6, limit_train=5)
    assert d.train_images.shape == (5, 3, 6, 6) and d.test_images.shape == (4, 3, 6, 6)
    assert sorted(d.test_labels.tolist()) == [1, 1, 2, 2]


def test_bad_name():
    with pytest.raises(ValueError, match="fashion-mnist, digits, or a path to an ImageFolder tree"):
        load_dataset("imagenet-not-here", 32)


# ----------------------------------------------------------------------------- multi-view dataset
def test_multiview_determinism_and_global_rng(digits):
    tfs = view_transforms("dino", PLANS["dino"])
    ds = MultiViewDataset(digits.train_images, digits.train_labels, tfs, seed=5)
    state = torch.random.get_rng_state()
    ds.set_epoch(3)
    a, la = ds[7]
    b, lb = ds[7]
    ds.set_epoch(4)
    c, _ = ds[7]
    ds.set_epoch(3)
    d, _ = ds[7]
    assert torch.equal(state, torch.random.get_rng_state())
    assert la == lb == int(digits.train_labels[7])
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a, d))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert [tuple(x.shape) for x in a] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 2
    fresh = MultiViewDataset(digits.train_images, digits.train_labels, tfs, seed=5)
    fresh.set_epoch(3)
    assert all(torch.equal(x, y) for x, y in zip(a, fresh[7][0]))
    other_seed = MultiViewDataset(digits.train_images, digits.train_labels, tfs, seed=6)
    other_seed.set_epoch(3)
    assert not all(torch.equal(x, y) for x, y in zip(a, other_seed[7][0]))


def test_collate_views(digits):
    ds = MultiViewDataset(digits.train_images, digits.train_labels, view_transforms("mocov3", PLANS["mocov3"]))
    views, labels = collate_views([ds[i] for i in range(5)])
    assert len(views) == 2 and views[0].shape == (5, 3, 24, 24) and views[0].dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == digits.train_labels[:5].tolist()


# ----------------------------------------------------------------------------- loader
class _IndexDataset(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n, self.epoch = n, None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return [torch.tensor([i])], i


def _labels(loader):
    return [labels.tolist() for _, labels in loader]


def test_loader_sharding_and_resume():
    ds = _IndexDataset(103)
    state = torch.random.get_rng_state()
    r0 = _labels(make_loader(ds, 10, epoch=2, seed=1, rank=0, world_size=2))
    assert ds.epoch == 2
    r1 = _labels(make_loader(ds, 10, epoch=2, seed=1, rank=1, world_size=2))
    assert len(r0) == len(r1) == 5  # 103 // 2 = 51 per rank -> 5 full batches
    flat0, flat1 = sum(r0, []), sum(r1, [])
    assert not set(flat0) & set(flat1) and len(set(flat0 + flat1)) == 100
    assert _labels(make_loader(ds, 10, epoch=2, seed=1, rank=0, world_size=2)) == r0  # deterministic
    assert _labels(make_loader(ds, 10, epoch=3, seed=1, rank=0, world_size=2)) != r0  # reshuffled
    assert _labels(make_loader(ds, 10, epoch=2, seed=1, rank=0, world_size=2, start_batch=3)) == r0[3:]
    assert _labels(make_loader(ds, 10, epoch=2, seed=1, start_batch=99)) == []
    single = _labels(make_loader(ds, 10, epoch=2, seed=1))
    assert len(single) == 10 and len(set(sum(single, []))) == 100
    assert torch.equal(state, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="no full batch"):
        make_loader(ds, 60, epoch=0, seed=0, world_size=2)


def test_loader_views_match_dataset_and_workers(digits):
    ds = MultiViewDataset(digits.train_images[:64], digits.train_labels[:64],
                          view_transforms("simclr", PLANS["simclr"]), seed=2)
    batches = list(make_loader(ds, 16, epoch=1, seed=2))
    resumed = list(make_loader(ds, 16, epoch=1, seed=2, num_workers=2, start_batch=2))
    assert len(resumed) == 2
    for (va, la), (vb, lb) in zip(batches[2:], resumed):
        assert torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(va, vb))


# ----------------------------------------------------------------------------- augmentations
@pytest.mark.parametrize("method", METHODS)
def test_augment_shapes(method, digits):
    ra = RandAugmentMagnitude(9.0)
    tfs = view_transforms(method, PLANS[method], randaug=ra)
    assert len(tfs) == len(PLANS[method])
    g = torch.Generator().manual_seed(0)
    for img in (digits.train_images[0], torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)):
        for _ in range(8):
            for fn, plan in zip(tfs, PLANS[method]):
                out = fn(img, g)
                assert out.dtype == torch.uint8 and out.shape == (3, plan.size, plan.size)


def test_augment_unknown_method():
    with pytest.raises(ValueError, match="no augmentation recipe"):
        view_transforms("byol-x", PLANS["mocov3"])


def test_rand_augment_magnitude():
    ra = RandAugmentMagnitude()
    assert ra.get() is None
    ra.set(7.5)
    assert ra.get() == 7.5
    ra.set(None)
    assert ra.get() is None
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = [rand_augment(img, g1, 10.0) for _ in range(20)]
    b = [rand_augment(img, g2, 10.0) for _ in range(20)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, img) for x in a)
    # supervised without a magnitude = crop + flip only (equal to an explicit None)
    tf_none = view_transforms("supervised", PLANS["supervised"], randaug=RandAugmentMagnitude())[0]
    tf_off = view_transforms("supervised", PLANS["supervised"], randaug=None)[0]
    assert torch.equal(tf_none(img, torch.Generator().manual_seed(3)), tf_off(img, torch.Generator().manual_seed(3)))


# ----------------------------------------------------------------------------- kNN
def test_knn_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1) * 10
    labels = torch.arange(4).repeat_interleave(25)
    train = torch.nn.functional.normalize(centers[labels] + torch.randn(100, 16, generator=g), dim=1)
    test_labels = torch.arange(4).repeat(10)
    test = torch.nn.functional.normalize(centers[test_labels] + torch.randn(40, 16, generator=g), dim=1)
    pred = knn_classify(train, labels, test, 4, k=10, T=0.07, chunk=7)
    assert torch.equal(pred, test_labels)


def test_knn_weighted_vote_by_hand():
    # 2-d unit features; query at angle 0.  Neighbours: one class-0 sample very close,
    # two class-1 samples a bit further.  With k=3 the vote is
    #   class 0: exp(cos(0.1)/T);  class 1: exp(cos(0.5)/T) + exp(cos(0.6)/T)
    def unit(a):
        return torch.tensor([math.cos(a), math.sin(a)])

    train = torch.stack([unit(0.1), unit(0.5), unit(-0.6), unit(3.0)])
    labels = torch.tensor([0, 1, 1, 0])
    query = unit(0.0)[None]
    for T, expected in ((0.07, 0), (1.0, 1)):
        v0 = math.exp(math.cos(0.1) / T)
        v1 = math.exp(math.cos(0.5) / T) + math.exp(math.cos(0.6) / T)
        assert (v0 > v1) == (expected == 0)
        assert knn_classify(train, labels, query, 2, k=3, T=T).tolist() == [expected]
    # k=1: nearest neighbour only
    assert knn_classify(train, labels, query, 2, k=1, T=1.0).tolist() == [0]
    # k larger than the bank is clipped
    assert knn_classify(train, labels, query, 2, k=50, T=0.07).tolist() == [0]


def test_extract_features_normalised(digits):
    feats = extract_features(lambda x: x.flatten(1), digits.test_images[:10], 4, MEAN, STD, "cpu")
    assert feats.shape == (10, 3 * 16 * 16)
    assert torch.allclose(feats.norm(dim=1), torch.ones(10), atol=1e-5)


def test_knn_accuracy_digits_pixels(digits):
    acc = knn_accuracy(lambda x: x.flatten(1), digits, MEAN, STD, "cpu", k=20, T=0.07)
    assert acc > 0.8
    acc_small = knn_accuracy(lambda x: x.flatten(1), digits, MEAN, STD, "cpu", limit_train=500, limit_test=100)
    assert 0.0 <= acc_small <= 1.0


def test_separable_blur_matches_torchvision():
    """The row-then-column blur is torchvision's gaussian_blur up to one uint8 level of rounding."""
    import torchvision.transforms.v2.functional as TF

    from effkern.train.augment import separable_gaussian_blur

    g = torch.Generator().manual_seed(0)
    diffs = []
    for c, (h, w), sigma, k in [(1, (224, 200), 2.0, 13), (3, (96, 96), 0.7, 5), (3, (33, 17), 1.3, 9)]:
        img = torch.randint(0, 256, (c, h, w), generator=g, dtype=torch.uint8)
        got, want = separable_gaussian_blur(img, k, sigma), TF.gaussian_blur(img, [k, k], [sigma, sigma])
        assert got.dtype == torch.uint8 and got.shape == img.shape
        diffs.append((got.int() - want.int()).abs())
        assert (got.float() - img.float()).abs().mean() > 1.0  # it did blur
    assert max(int(d.max()) for d in diffs) <= 1
    assert max(float(d.float().mean()) for d in diffs) < 0.05


def test_grayscale_images_are_augmented_on_one_channel():
    """A one-channel image expanded to 3 channels gives the views its one channel gives,
    replicated -- from the same generator draws."""
    from effkern.train.augment import SSLView
    from effkern.train.data import MultiViewDataset

    g = torch.Generator().manual_seed(1)
    gray = torch.randint(0, 256, (4, 1, 40, 40), generator=g, dtype=torch.uint8)
    views = [SSLView(32, scale=(0.3, 1.0), color=False), SSLView(16, p_blur=0.5, color=False)]
    ds = MultiViewDataset(gray.expand(4, 3, 40, 40), torch.arange(4), views, seed=3)
    one = MultiViewDataset(gray, torch.arange(4), views, seed=3)
    for i in range(4):
        (got, _), (want, _) = ds[i], one[i]
        for a, b in zip(got, want):
            assert a.shape == (3, *b.shape[1:]) and torch.equal(a, b.expand_as(a))
