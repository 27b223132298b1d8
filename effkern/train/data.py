"""In-memory image datasets, multi-view sampling and a deterministic, resumable loader.

Everything is kept as ``uint8`` tensors in ``(N, C, H, W)`` layout, already resized to the
run's ``base_size``; augmentations (``effkern.train.augment``) run on uint8 too and the
conversion to normalised float happens on the device in the training loop.

Datasets
--------
``"fashion-mnist"``
    Read from the idx ``.gz`` files of the Debian package ``dataset-fashion-mnist``
    (``FASHION_MNIST_DIR``); nothing is downloaded.  60k/10k 28x28 grayscale, 10 classes.
``"digits"``
    ``sklearn.datasets.load_digits`` (1797 8x8 images, values 0..16 scaled to 0..255),
    split 80/20 with the seed.  Tiny; for smoke tests.
a filesystem path
    A ``torchvision.datasets.ImageFolder`` tree.  With ``train/`` and ``val/`` (or ``test/``)
    sub-folders those are the splits, otherwise a seeded 90/10 split of the whole tree.
    The short side is resized to ``base_size`` and the centre ``base_size`` square kept.

Validation split (``val_split=n``): ``n`` images are carved out of the training split with
a fixed seed (the same images for every run seed, before ``limit_train``) and take the
place of the test split; the test split is then not used at all.  Hyper-parameters are
chosen on it, never on the test split.

Grayscale datasets are replicated to 3 channels with ``expand`` (a stride-0 view: no extra
memory; call ``.contiguous()`` if a real copy is needed).

Determinism
-----------
``MultiViewDataset`` draws every random number of sample ``i`` in epoch ``e`` from a
``torch.Generator`` seeded from ``(seed, e, i)``: the views do not depend on the worker
count, the batch layout or the global RNG, so a run resumed mid-epoch sees the same views.
``make_loader`` shuffles with a generator seeded by ``seed + epoch``, shards like
``DistributedSampler(drop_last=True)`` and can skip the first ``start_batch`` batches.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from effkern._seeding import mix_seed

DATASETS = ("fashion-mnist", "digits")  # plus any filesystem path = an ImageFolder tree
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_VALID = "fashion-mnist, digits, or a path to an ImageFolder tree"

# Normalisation used by the loop and the kNN monitor: ImageNet defaults for every dataset
# (the models are trained from scratch, so the exact values matter little).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class ImageData:
    """In-memory uint8 images of one dataset (both splits)."""
    train_images: Tensor  # (N, 3, H, W) uint8
    train_labels: Tensor  # (N,) int64
    test_images: Tensor   # (M, 3, H, W) uint8
    test_labels: Tensor   # (M,) int64
    num_classes: int
    name: str
    classes: tuple | None = None  # class names where known
    channels: int = 3             # the dataset's own channel count (1: grayscale replicated to RGB)

    def __repr__(self) -> str:
        return (f"ImageData({self.name!r}, train={tuple(self.train_images.shape)}, "
                f"test={tuple(self.test_images.shape)}, num_classes={self.num_classes})")


# ----------------------------------------------------------------------------- helpers
def _seeded_subset(n: int, limit: int | None, seed: int, salt: int) -> Tensor | None:
    """Sorted indices of a deterministic random subset of size ``limit`` (None = all)."""
    if limit is None or limit >= n:
        return None
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + salt)
    return torch.randperm(n, generator=g)[:limit].sort().values


def _resize_uint8(images: Tensor, size: int, chunk: int = 2048) -> Tensor:
    """Bilinear (antialiased) resize of uint8 (N, C, H, W) to (N, C, size, size)."""
    if images.shape[-2:] == (size, size):
        return images.contiguous()
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for s in range(0, images.shape[0], chunk):
        x = images[s:s + chunk].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[s:s + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _to_rgb(images: Tensor) -> Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x00000801 labels / 0x00000803 images, dtype ubyte
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} values, found {data.size}")
    return data.reshape(dims)


VAL_SALT = 3  # the validation split's seed (fixed: independent of the run seed)


def carve_validation(n: int, val_split: int) -> tuple[Tensor, Tensor] | None:
    """(validation indices, remaining training indices), both sorted, of a training split of
    ``n`` items; None for ``val_split == 0``."""
    val_split = int(val_split)
    if val_split == 0:
        return None
    if not 0 < val_split < n:
        raise ValueError(f"val_split must be in [0, {n}) for a training split of {n} images, got {val_split}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SALT))
    return perm[:val_split].sort().values, perm[val_split:].sort().values


def _finish(name, tr_x, tr_y, te_x, te_y, num_classes, base_size, limit_train, limit_test, seed,
            classes=None, val_split: int = 0) -> ImageData:
    """Carve the validation split, apply limits (before resizing, to save time), resize,
    replicate to RGB."""
    carved = carve_validation(len(tr_y), val_split)
    if carved is not None:
        val, rest = carved
        tr_x, tr_y, te_x, te_y = tr_x[rest], tr_y[rest], tr_x[val], tr_y[val]
        name = f"{name}/val{int(val_split)}"
    idx = _seeded_subset(len(tr_y), limit_train, seed, 1)
    if idx is not None:
        tr_x, tr_y = tr_x[idx], tr_y[idx]
    idx = _seeded_subset(len(te_y), limit_test, seed, 2)
    if idx is not None:
        te_x, te_y = te_x[idx], te_y[idx]
    return ImageData(_to_rgb(_resize_uint8(tr_x, base_size)), tr_y.long().contiguous(),
                     _to_rgb(_resize_uint8(te_x, base_size)), te_y.long().contiguous(),
                     num_classes, name, tuple(classes) if classes is not None else None, int(tr_x.shape[1]))


# ----------------------------------------------------------------------------- loaders
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _load_fashion_mnist(directory: str = FASHION_MNIST_DIR):
    files = {k: os.path.join(directory, f"{k}.gz") for k in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: missing {', '.join(missing)}. Install it with "
            f"`apt-get install dataset-fashion-mnist` (./dev installs it).")
    tr_x = torch.from_numpy(_read_idx(files["train-images-idx3-ubyte"]).copy()).unsqueeze(1)
    tr_y = torch.from_numpy(_read_idx(files["train-labels-idx1-ubyte"]).astype(np.int64))
    te_x = torch.from_numpy(_read_idx(files["t10k-images-idx3-ubyte"]).copy()).unsqueeze(1)
    te_y = torch.from_numpy(_read_idx(files["t10k-labels-idx1-ubyte"]).astype(np.int64))
    return tr_x, tr_y, te_x, te_y


def _load_digits(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(int(seed)))
    n_train = int(round(0.8 * len(y)))
    tr, te = perm[:n_train].sort().values, perm[n_train:].sort().values
    return x[tr], y[tr], x[te], y[te]


def _pil_to_uint8(img, base_size: int) -> Tensor:
    """PIL image -> uint8 (3, base_size, base_size): short side resized, centre crop."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    scale = base_size / min(w, h)
    nw, nh = max(base_size, round(w * scale)), max(base_size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    left, top = (nw - base_size) // 2, (nh - base_size) // 2
    img = img.crop((left, top, left + base_size, top + base_size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _load_folder(samples: Sequence[tuple[str, int]], base_size: int) -> tuple[Tensor, Tensor]:
    from torchvision.datasets.folder import default_loader

    x = torch.empty((len(samples), 3, base_size, base_size), dtype=torch.uint8)
    for k, (path, _) in enumerate(samples):
        x[k] = _pil_to_uint8(default_loader(path), base_size)
    y = torch.tensor([t for _, t in samples], dtype=torch.int64)
    return x, y


def _load_image_folder(root: str, base_size: int, limit_train, limit_test, seed, val_split: int = 0) -> ImageData:
    from torchvision.datasets import ImageFolder

    name = os.path.basename(os.path.normpath(root)) or root
    train_dir = os.path.join(root, "train")
    eval_dir = next((os.path.join(root, s) for s in ("val", "test") if os.path.isdir(os.path.join(root, s))), None)
    if os.path.isdir(train_dir) and eval_dir is not None:
        tr = ImageFolder(train_dir)
        te = ImageFolder(eval_dir)
        unknown = sorted(set(te.classes) - set(tr.classes))
        if unknown:
            raise ValueError(f"{eval_dir}: classes {unknown} do not occur in {train_dir}")
        remap = {te.class_to_idx[c]: tr.class_to_idx[c] for c in te.classes}
        tr_samples = list(tr.samples)
        te_samples = [(p, remap[t]) for p, t in te.samples]
        classes = tr.classes
    else:
        full = ImageFolder(root)
        n = len(full.samples)
        if n < 2:
            raise ValueError(f"{root}: an ImageFolder tree needs at least 2 images, found {n}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
        n_test = max(1, int(round(0.1 * n)))
        te_idx, tr_idx = sorted(perm[:n_test]), sorted(perm[n_test:])
        tr_samples = [full.samples[i] for i in tr_idx]
        te_samples = [full.samples[i] for i in te_idx]
        classes = full.classes
    carved = carve_validation(len(tr_samples), val_split)
    if carved is not None:
        val, rest = carved
        tr_samples, te_samples = [tr_samples[i] for i in rest.tolist()], [tr_samples[i] for i in val.tolist()]
        name = f"{name}/val{int(val_split)}"
    # limits before decoding: only the chosen images are read
    idx = _seeded_subset(len(tr_samples), limit_train, seed, 1)
    if idx is not None:
        tr_samples = [tr_samples[i] for i in idx.tolist()]
    idx = _seeded_subset(len(te_samples), limit_test, seed, 2)
    if idx is not None:
        te_samples = [te_samples[i] for i in idx.tolist()]
    tr_x, tr_y = _load_folder(tr_samples, base_size)
    te_x, te_y = _load_folder(te_samples, base_size)
    return ImageData(tr_x, tr_y, te_x, te_y, len(classes), name, tuple(classes))


def load_dataset(name_or_path: str, base_size: int, limit_train: int | None = None,
                 limit_test: int | None = None, seed: int = 0, val_split: int = 0) -> ImageData:
    """Load a dataset into memory as uint8 (N, 3, base_size, base_size) tensors.

    ``limit_train``/``limit_test`` pick deterministic seeded subsets (kept in dataset order);
    ``val_split > 0`` evaluates on that many held-out training images instead of the test split.
    """
    base_size = int(base_size)
    if base_size < 1:
        raise ValueError(f"base_size must be >= 1, got {base_size}")
    key = str(name_or_path).strip().lower().replace("_", "-")
    if key in ("fashion-mnist", "fashionmnist", "fmnist"):
        tr_x, tr_y, te_x, te_y = _load_fashion_mnist()
        return _finish("fashion-mnist", tr_x, tr_y, te_x, te_y, 10, base_size, limit_train, limit_test, seed,
                       FASHION_MNIST_CLASSES, val_split)
    if key == "digits":
        tr_x, tr_y, te_x, te_y = _load_digits(seed)
        return _finish("digits", tr_x, tr_y, te_x, te_y, 10, base_size, limit_train, limit_test, seed,
                       [str(c) for c in range(10)], val_split)
    path = os.path.expanduser(str(name_or_path))
    if os.path.isdir(path):
        return _load_image_folder(path, base_size, limit_train, limit_test, seed, val_split)
    raise ValueError(f"unknown dataset {name_or_path!r}: expected {_VALID}")


# ----------------------------------------------------------------------------- multi-view dataset
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 63-bit generator seed of sample ``index`` in ``epoch`` (well mixed, collision-free in practice)."""
    return mix_seed(seed, epoch, index)


class MultiViewDataset(torch.utils.data.Dataset):
    """Sample ``i`` -> ``([view_0, ..., view_{V-1}], label)``, each view a uint8 (C, h, w) tensor.

    ``view_transforms[v](img, generator)`` makes view ``v``; all views of one sample share one
    generator seeded by ``sample_seed(seed, epoch, i)``, so ``(epoch, i)`` fixes the views.
    The epoch is set by ``set_epoch`` (``make_loader`` does it before the workers start).
    """

    def __init__(self, images: Tensor, labels: Tensor, view_transforms: list[Callable], seed: int = 0):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if not view_transforms:
            raise ValueError("need at least one view transform")
        self.images = images
        self.labels = labels.long()
        self.view_transforms = list(view_transforms)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))

    def __getitem__(self, index: int) -> tuple[list[Tensor], int]:
        index = int(index)
        g = self.generator(index)
        img = self.images[index]
        # a one-channel image replicated with expand (stride 0): augment the one channel
        # (a third of the work: blur, resize, jitter) and replicate each view again
        gray = img.shape[0] == 3 and img.stride(0) == 0
        views = [fn(img[:1] if gray else img, g) for fn in self.view_transforms]
        if gray:
            views = [v.expand(3, *v.shape[1:]) if v.shape[0] == 1 else v for v in views]
        return views, int(self.labels[index])


def collate_views(batch) -> tuple[list[Tensor], Tensor]:
    """``[(views, label), ...]`` -> (list of (B, C, h, w) uint8 per view, labels (B,) int64)."""
    n_views = len(batch[0][0])
    views = [torch.stack([item[0][v] for item in batch]) for v in range(n_views)]
    labels = torch.tensor([int(item[1]) for item in batch], dtype=torch.int64)
    return views, labels


# ----------------------------------------------------------------------------- loader
def epoch_indices(n: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This rank's sample order for ``epoch``: seeded permutation, tail dropped to a multiple of
    ``world_size``, then every ``world_size``-th index (as ``DistributedSampler(drop_last=True)``)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    g = torch.Generator().manual_seed(int(seed) + int(epoch))
    perm = torch.randperm(n, generator=g)
    per_rank = n // world_size
    return perm[: per_rank * world_size][rank::world_size].tolist()


def batches_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Full batches one rank gets per epoch (``batch_size`` is per rank)."""
    return (n // world_size) // batch_size


class _EpochBatchSampler(torch.utils.data.Sampler):
    def __init__(self, indices: list[int], batch_size: int, start_batch: int):
        self.batches = [indices[b * batch_size:(b + 1) * batch_size]
                        for b in range(start_batch, len(indices) // batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(dataset, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, start_batch: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A one-epoch loader: deterministic seeded shuffle, rank shard, full batches only
    (``batch_size`` is per rank), starting at batch ``start_batch`` of the epoch.

    Raises ValueError when an epoch would hold no batch at all (the loop would spin forever).
    Never touches the global RNG (the DataLoader gets its own generator for its base seed).
    """
    n = len(dataset)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = batches_per_epoch(n, batch_size, world_size)
    if total == 0:
        raise ValueError(f"dataset of {n} samples gives no full batch of {batch_size} per rank "
                         f"with {world_size} rank(s); lower the batch size or raise the limit")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    indices = epoch_indices(n, epoch, seed, rank, world_size)
    sampler = _EpochBatchSampler(indices, batch_size, min(start_batch, total))
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_views,
        pin_memory=pin_memory, persistent_workers=False,
        generator=torch.Generator().manual_seed(int(seed) + int(epoch)),
        prefetch_factor=4 if num_workers > 0 else None)
