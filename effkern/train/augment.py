"""Per-view augmentations on uint8 (C, H, W) tensors, driven by an explicit ``torch.Generator``.

Every callable has the signature ``fn(img, generator) -> uint8 (C, size, size)`` and draws
*all* of its random numbers from ``generator`` (never the global RNG), so a sample's views
are a pure function of the generator's seed (see ``MultiViewDataset``).  The callables are
small picklable objects, so DataLoader workers may be forked or spawned.

Recipes (following the official repositories):

=========  =======================  =====================================================
method     view                     pipeline
=========  =======================  =====================================================
mocov3     global #1                RRC(0.08, 1) flip jitter(0.4,0.4,0.2,0.1)@0.8 gray@0.2 blur@1.0
           global #2                ... blur@0.1 solarize@0.2
simclr     every global view        RRC(0.08, 1) flip jitter(0.8,0.8,0.8,0.2)@0.8 gray@0.2 blur@0.5
dino       global #1                RRC(0.4, 1)  flip jitter(0.4,0.4,0.2,0.1)@0.8 gray@0.2 blur@1.0
           global #2                ... blur@0.1 solarize@0.2
           local                    RRC(0.05, 0.4) flip jitter gray blur@0.5
supervised every view               RRC(0.08, 1) flip [+ RandAugment(2, m, mstd=0.5)]
=========  =======================  =====================================================

Global views after the first two (mocov3/dino) use the recipe of the first; local views
of mocov3/simclr use DINO's local recipe.  SimCLR's jitter is its official strength-1.0
setting (0.8, 0.8, 0.8, 0.2).

Gaussian blur: sigma ~ U(0.1, 2.0) pixels *at 224 px*; for smaller views the range is scaled
by ``size / 224`` (a 2-px blur on a 32-px view would erase it), the kernel covers +-3 sigma.

Resolution-aware presets (``augment_preset``): the table above is the ``"paper"`` preset,
written for 224 px photographs.  On small images it mostly destroys the signal: a crop of
8 % of a 28 px image is a 8x8 px patch of texture, solarize on a grayscale garment inverts
it, blur with sigma < 0.3 px does nothing, and colour jitter's saturation / hue and the
grayscale op are no-ops on one-channel data.  The ``"small"`` preset (chosen by ``"auto"``
for base sizes up to ``SMALL_MAX`` = 64 px) therefore uses

=====================  ==================  ==================================================
knob                   paper               small (<= 64 px)
=====================  ==================  ==================================================
global crop scale      (0.08, 1)           (0.3, 1)  (DINO keeps its (0.4, 1))
local crop scale       (0.05, 0.4)         (0.1, 0.4)
solarize               0.2 on view 2       off
blur                   as the table        off
colour jitter          (0.4,0.4,0.2,0.1)   same on RGB; brightness / contrast only on 1 channel
grayscale              0.2                 same on RGB; off on 1 channel
supervised crop scale  (0.08, 1)           (0.3, 1)
=====================  ==================  ==================================================

The one-channel rule depends on the *dataset's* channel count (``ImageData.channels``), not
on the 3-channel replica the model sees.  Every op still draws its random numbers when it is
switched off, so a preset changes the augmentations, never the random stream's layout.
"""
from __future__ import annotations

import math
import multiprocessing
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

METHODS = ("mocov3", "simclr", "dino", "supervised")
PRESETS = ("auto", "small", "paper")
SMALL_MAX = 64  # base sizes up to this many pixels get the "small" preset under "auto"


@dataclass(frozen=True)
class AugmentPreset:
    """The resolution- and channel-dependent knobs of the recipes (module docstring)."""
    name: str
    global_scale: tuple | None   # None: each method's paper scale
    local_scale: tuple
    solarize: bool
    blur: bool
    color: bool                  # saturation / hue jitter and the grayscale op (RGB data only)
    supervised_scale: tuple


def augment_preset(name: str = "auto", base_size: int = 224, channels: int = 3) -> AugmentPreset:
    """``"paper"``, ``"small"``, or ``"auto"`` = small for base_size <= SMALL_MAX, else paper;
    ``channels`` (of the dataset) switches the colour ops off for one-channel data."""
    if name not in PRESETS:
        raise ValueError(f"augment preset must be one of {', '.join(PRESETS)}, got {name!r}")
    if int(channels) not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if name == "auto":
        name = "small" if int(base_size) <= SMALL_MAX else "paper"
    color = int(channels) == 3
    if name == "paper":
        return AugmentPreset("paper", None, (0.05, 0.4), True, True, color, (0.08, 1.0))
    return AugmentPreset("small", (0.3, 1.0), (0.1, 0.4), False, False, color, (0.3, 1.0))


# ----------------------------------------------------------------------------- random helpers
def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _bernoulli(g: torch.Generator, p: float) -> bool:
    # always draw, so the stream does not depend on p being 0 or 1
    return torch.rand((), generator=g).item() < p


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Integer in [lo, hi)."""
    return int(torch.randint(lo, hi, (), generator=g).item())


# ----------------------------------------------------------------------------- magnitude
class RandAugmentMagnitude:
    """RandAugment magnitude shared with DataLoader workers (``multiprocessing.Value('d')``).

    The loop ``set``s it as the schedule advances, the workers' transforms ``get`` it per
    sample.  ``None`` (stored as NaN) disables RandAugment.  Share it by inheritance (create
    it before the DataLoader starts its workers, which ``make_loader`` does every epoch).
    """

    def __init__(self, magnitude: float | None = None):
        self._value = multiprocessing.Value("d", float("nan"), lock=False)
        self.set(magnitude)

    def set(self, magnitude: float | None) -> None:
        if magnitude is not None and not math.isfinite(float(magnitude)):
            raise ValueError(f"magnitude must be finite or None, got {magnitude}")
        self._value.value = float("nan") if magnitude is None else float(magnitude)

    def get(self) -> float | None:
        v = self._value.value
        return None if math.isnan(v) else v

    def __repr__(self) -> str:
        return f"RandAugmentMagnitude({self.get()})"


# ----------------------------------------------------------------------------- ops
@dataclass
class RandomResizedCrop:
    size: int
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)

    def params(self, h: int, w: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params, with ``g``."""
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(g, *self.scale)
            aspect = math.exp(_uniform(g, *log_ratio))
            cw = int(round(math.sqrt(target * aspect)))
            ch = int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                return _randint(g, 0, h - ch + 1), _randint(g, 0, w - cw + 1), ch, cw
        in_ratio = w / h  # fallback: central crop
        if in_ratio < min(self.ratio):
            cw, ch = w, int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            ch, cw = h, int(round(h * max(self.ratio)))
        else:
            cw, ch = w, h
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def __call__(self, img: Tensor, g: torch.Generator) -> Tensor:
        i, j, ch, cw = self.params(img.shape[-2], img.shape[-1], g)
        return TF.resized_crop(img, i, j, ch, cw, [self.size, self.size],
                               interpolation=InterpolationMode.BILINEAR, antialias=True)


def _flip(img: Tensor, g: torch.Generator, p: float = 0.5) -> Tensor:
    return TF.horizontal_flip(img) if _bernoulli(g, p) else img


def _color_jitter(img: Tensor, g: torch.Generator, b: float, c: float, s: float, h: float) -> Tensor:
    """torchvision ColorJitter: factors and the order of the four ops drawn from ``g``."""
    order = torch.randperm(4, generator=g).tolist()
    fb = _uniform(g, max(0.0, 1 - b), 1 + b)
    fc = _uniform(g, max(0.0, 1 - c), 1 + c)
    fs = _uniform(g, max(0.0, 1 - s), 1 + s)
    fh = _uniform(g, -h, h)
    for k in order:
        if k == 0 and b > 0:
            img = TF.adjust_brightness(img, fb)
        elif k == 1 and c > 0:
            img = TF.adjust_contrast(img, fc)
        elif k == 2 and s > 0 and img.shape[0] == 3:
            img = TF.adjust_saturation(img, fs)
        elif k == 3 and h > 0 and img.shape[0] == 3:
            img = TF.adjust_hue(img, fh)
    return img


def _gaussian_blur(img: Tensor, g: torch.Generator, size: int, sigma_range=(0.1, 2.0)) -> Tensor:
    sigma = _uniform(g, *sigma_range) * min(1.0, size / 224)
    radius = max(1, math.ceil(3 * sigma))
    max_radius = max(1, (min(img.shape[-2:]) - 1) // 2)  # reflect padding needs pad < dim
    k = 2 * min(radius, max_radius) + 1
    if min(img.shape[-2:]) < 3:
        return img
    return separable_gaussian_blur(img, k, sigma)


def _blur_axis(x: Tensor, taps: list[float], dim: int) -> Tensor:
    """1-D blur of float (C, H, W) along ``dim`` (-1 rows, -2 columns) with reflect padding
    (torchvision's): the k taps as k shifted, scaled slices of one padded copy, summed in place."""
    r, n = len(taps) // 2, x.shape[dim]
    padded = torch.nn.functional.pad(x, (r, r) if dim == -1 else (0, 0, r, r), mode="reflect")
    out = padded.narrow(dim, 0, n) * taps[0]
    for j in range(1, len(taps)):
        out.add_(padded.narrow(dim, j, n), alpha=taps[j])
    return out


def separable_gaussian_blur(img: Tensor, k: int, sigma: float) -> Tensor:
    """torchvision's gaussian_blur (the same normalised k-tap kernel, reflect padding --
    needs k // 2 < H, W -- rounded back to uint8), separably: a row pass, then a column pass,
    each k shifted slices of one padded copy.  One thread, interleaved, medians of 40, on a
    loaded 2-core machine, one 224 px channel: 0.32 ms at k = 7 (0.46 at k = 13) against 0.59
    (0.87) for two dense (n, n) blur-matrix GEMMs (the previous implementation) and 1.0 ms
    for torchvision's two 1 x k convolutions; at 96 px 0.14 vs 0.19 / 0.24 ms.  The sum
    order differs from both, so a value can round to the neighbouring uint8 level (1 in
    ~10^4 pixels against torchvision)."""
    x = torch.linspace(-(k // 2), k // 2, k)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    taps = (w / w.sum()).tolist()
    out = _blur_axis(_blur_axis(img.to(torch.float32), taps, -1), taps, -2)
    return out.round_().clamp_(0, 255).to(torch.uint8)


@dataclass
class SSLView:
    """RRC + flip + colour jitter + grayscale + blur + solarize (BYOL/MoCo-v3/DINO/SimCLR style)."""
    size: int
    scale: tuple = (0.08, 1.0)
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)
    p_jitter: float = 0.8
    p_gray: float = 0.2
    p_blur: float = 1.0
    p_solarize: float = 0.0
    color: bool = True  # False: saturation / hue jitter and grayscale off (one-channel data)

    def __call__(self, img: Tensor, g: torch.Generator) -> Tensor:
        img = RandomResizedCrop(self.size, self.scale)(img, g)
        img = _flip(img, g)
        if _bernoulli(g, self.p_jitter):
            b, c, s, h = self.jitter
            img = _color_jitter(img, g, b, c, s if self.color else 0.0, h if self.color else 0.0)
        if _bernoulli(g, self.p_gray) and img.shape[0] == 3 and self.color:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if _bernoulli(g, self.p_blur):
            img = _gaussian_blur(img, g, self.size)
        if _bernoulli(g, self.p_solarize):
            img = TF.solarize(img, 128)
        return img.contiguous()


# RandAugment: timm's op set (rand-m*-mstd0.5, "increasing" variants), level in [0, 10],
# each chosen op applied with probability 0.5; geometric ops fill with grey (128).
_FILL = [128.0]


def _signed(level: float, scale: float, g: torch.Generator) -> float:
    v = level / 10.0 * scale
    return -v if _bernoulli(g, 0.5) else v


def _ra_op(name: str, img: Tensor, level: float, g: torch.Generator) -> Tensor:
    h, w = img.shape[-2:]
    fill = _FILL * img.shape[0]
    if name == "AutoContrast":
        return TF.autocontrast(img)
    if name == "Equalize":
        return TF.equalize(img)
    if name == "Invert":
        return TF.invert(img)
    if name == "Rotate":
        return TF.rotate(img, _signed(level, 30.0, g), interpolation=InterpolationMode.BILINEAR, fill=fill)
    if name == "Posterize":
        return TF.posterize(img, max(1, 8 - int(round(level / 10.0 * 4))))
    if name == "Solarize":
        return TF.solarize(img, max(0.0, 255.0 * (1.0 - level / 10.0)))
    if name == "SolarizeAdd":
        add = int(round(level / 10.0 * 110))
        added = (img.to(torch.int16) + add).clamp_(0, 255).to(torch.uint8)
        return torch.where(img < 128, added, img)
    if name == "Color":
        return TF.adjust_saturation(img, 1.0 + _signed(level, 0.9, g)) if img.shape[0] == 3 else img
    if name == "Contrast":
        return TF.adjust_contrast(img, 1.0 + _signed(level, 0.9, g))
    if name == "Brightness":
        return TF.adjust_brightness(img, 1.0 + _signed(level, 0.9, g))
    if name == "Sharpness":
        return TF.adjust_sharpness(img, 1.0 + _signed(level, 0.9, g))
    if name == "ShearX":
        s = math.degrees(math.atan(_signed(level, 0.3, g)))
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[s, 0.0],
                         interpolation=InterpolationMode.BILINEAR, fill=fill, center=[0, 0])
    if name == "ShearY":
        s = math.degrees(math.atan(_signed(level, 0.3, g)))
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, s],
                         interpolation=InterpolationMode.BILINEAR, fill=fill, center=[0, 0])
    if name == "TranslateXRel":
        t = int(round(_signed(level, 0.45, g) * w))
        return TF.affine(img, angle=0.0, translate=[t, 0], scale=1.0, shear=[0.0, 0.0],
                         interpolation=InterpolationMode.NEAREST, fill=fill)
    if name == "TranslateYRel":
        t = int(round(_signed(level, 0.45, g) * h))
        return TF.affine(img, angle=0.0, translate=[0, t], scale=1.0, shear=[0.0, 0.0],
                         interpolation=InterpolationMode.NEAREST, fill=fill)
    raise ValueError(f"unknown RandAugment op {name!r}")


RAND_AUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
                    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
                    "TranslateXRel", "TranslateYRel")


def rand_augment(img: Tensor, g: torch.Generator, magnitude: float, num_ops: int = 2, mstd: float = 0.5,
                 prob: float = 0.5) -> Tensor:
    """timm-style RandAugment: ``num_ops`` ops drawn with replacement, each applied with
    probability ``prob`` at magnitude ``clip(normal(magnitude, mstd), 0, 10)`` (drawn per op)."""
    for _ in range(num_ops):
        name = RAND_AUGMENT_OPS[_randint(g, 0, len(RAND_AUGMENT_OPS))]
        apply = _bernoulli(g, prob)
        level = magnitude + mstd * torch.randn((), generator=g).item() if mstd > 0 else magnitude
        level = min(10.0, max(0.0, level))
        if apply:
            img = _ra_op(name, img, level, g)
    return img


@dataclass
class SupervisedView:
    """RRC(0.08, 1) + flip [+ RandAugment(2, m, mstd=0.5) when a magnitude is set]."""
    size: int
    scale: tuple = (0.08, 1.0)
    randaug: object = None  # RandAugmentMagnitude, a float, or None
    num_ops: int = 2
    mstd: float = 0.5

    def magnitude(self) -> float | None:
        if self.randaug is None:
            return None
        if isinstance(self.randaug, (int, float)):
            return float(self.randaug)
        return self.randaug.get()

    def __call__(self, img: Tensor, g: torch.Generator) -> Tensor:
        img = RandomResizedCrop(self.size, self.scale)(img, g)
        img = _flip(img, g)
        m = self.magnitude()
        if m is not None:
            img = rand_augment(img, g, m, self.num_ops, self.mstd)
        return img.contiguous()


# ----------------------------------------------------------------------------- recipes
def _kind_size(view) -> tuple[str, int]:
    if isinstance(view, dict):
        kind, size = view["kind"], view["size"]
    else:
        kind, size = view.kind, view.size
    if kind not in ("global", "local"):
        raise ValueError(f"view kind must be 'global' or 'local', got {kind!r}")
    return kind, int(size)


def view_transforms(method: str, view_plan: list, randaug=None, preset: AugmentPreset | None = None) -> list:
    """One ``fn(img uint8 (C,H,W), generator) -> uint8 (C,size,size)`` per entry of ``view_plan``
    (objects with ``.kind`` in {"global", "local"} and ``.size`` in pixels).

    ``randaug`` (a ``RandAugmentMagnitude`` or a float) only affects ``supervised``;
    ``preset`` (``augment_preset``) defaults to the paper recipes.
    """
    key = method.lower().replace("-", "").replace("_", "")
    if key in ("mocov3", "moco"):
        key = "mocov3"
    if key not in METHODS:
        raise ValueError(f"no augmentation recipe for method {method!r}; known: {', '.join(METHODS)}")
    pr = preset or augment_preset("paper")
    blur = 1.0 if pr.blur else 0.0
    solarize = 0.2 if pr.solarize else 0.0
    out = []
    n_global = 0
    for view in view_plan:
        kind, size = _kind_size(view)
        if key == "supervised":
            out.append(SupervisedView(size, scale=pr.supervised_scale, randaug=randaug))
            continue
        if kind == "local":
            out.append(SSLView(size, scale=pr.local_scale, p_blur=0.5 * blur, color=pr.color))
            continue
        n_global += 1
        if key == "simclr":
            out.append(SSLView(size, scale=pr.global_scale or (0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2),
                               p_blur=0.5 * blur, color=pr.color))
        else:
            paper_scale = (0.08, 1.0) if key == "mocov3" else (0.4, 1.0)
            scale = paper_scale if pr.global_scale is None else (  # the larger lower bound (DINO keeps 0.4)
                max(paper_scale[0], pr.global_scale[0]), max(paper_scale[1], pr.global_scale[1]))
            if n_global == 2:
                out.append(SSLView(size, scale=scale, p_blur=0.1 * blur, p_solarize=solarize, color=pr.color))
            else:
                out.append(SSLView(size, scale=scale, p_blur=blur, color=pr.color))
    return out
