"""TrainConfig: every knob of ``effkern train`` in one dataclass (the CLI fills it),
and the model preset for small images (``model_for``).

Model preset: with ``model=None`` the encoder follows the base size.  Up to
``SMALL_IMAGE_MAX`` px (Fashion-MNIST, CIFAR-sized data) it is ``SMALL_IMAGE_MODEL``:
ViT-Tiny's layout cut to 4 blocks of width 128 (2 heads of 64) with 4 px patches, i.e.
49-256 patch tokens at 28-64 px, the size the small-scale study trains on 2 CPU cores
(a 16 px patch would leave 4 tokens at 32 px).  Larger images get
``vit_tiny_patch16_224`` unchanged.  Naming a model (``--model``) switches the preset off;
``--model-arg`` overrides single keys of either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SMALL_IMAGE_MAX = 64
SMALL_IMAGE_MODEL = ("vit_tiny_patch16_224", {"patch_size": 4, "depth": 4, "embed_dim": 128, "num_heads": 2})
LARGE_IMAGE_MODEL = ("vit_tiny_patch16_224", {})


def model_for(model: str | None, base_size: int, model_kwargs: dict | None = None) -> tuple[str, dict]:
    """(timm name, create_model kwargs) of a run: the named ``model`` with ``model_kwargs``,
    or, for ``model=None``, the preset of ``base_size`` updated with ``model_kwargs``."""
    if model is not None:
        return model, dict(model_kwargs or {})
    if int(base_size) < 1:
        raise ValueError(f"base_size must be >= 1, got {base_size}")
    name, kwargs = SMALL_IMAGE_MODEL if base_size <= SMALL_IMAGE_MAX else LARGE_IMAGE_MODEL
    return name, {**kwargs, **(model_kwargs or {})}


@dataclass
class TrainConfig:
    # what to train
    method: str = "mocov3"
    model: str | None = None         # timm name; None: the preset of base_size (model_for)
    model_kwargs: dict = field(default_factory=dict)   # extra timm.create_model kwargs (depth, patch_size, ...)
    method_kwargs: dict = field(default_factory=dict)  # method hparams (mlp_dim, out_dim, temperature, ...)
    data: str = "fashion-mnist"
    base_size: int = 32              # images are resized to base_size x base_size
    limit_train: int | None = None
    limit_test: int | None = None
    val_split: int = 0               # > 0: hold out this many training images and evaluate on them
                                     # instead of the test split (hyper-parameter selection)
    augment: str = "auto"            # augmentation preset: auto (by base size and channels) | small | paper
    # how much: the budget in units (one forward of one image at base size / native patch / no dropout)
    budget: float | None = None      # millions of units
    epochs_equivalent: float | None = None  # budget = this many epochs of the uncompressed baseline
    schedule: str = "none"
    et_crop: str = "fft"             # ET++ low-frequency crop on the device ("fft") or by down-sampling ("resize")
    calibration: str | None = None   # JSON of `effkern schedule calibrate`: measured cost ratios per setting
    # optimisation
    batch_size: int = 128            # global batch (split over ranks)
    lr: float = 2e-3                 # per 256 images, scaled to the global batch by lr_rule
    lr_rule: str = "sqrt"            # sqrt: lr*sqrt(B/256) | linear: lr*B/256 (papers) | none: lr is the peak
    min_lr: float = 0.0
    weight_decay: float = 0.1
    weight_decay_end: float | None = None  # cosine ramp weight_decay -> this over the run (DINO: 0.04 -> 0.4)
    clip_grad: float | None = None   # clip the global gradient norm to this (DINO: 3.0); None: no clipping
    warmup: float = 0.1              # fraction of the run's optimizer steps
    lr_schedule: str = "cosine"      # cosine | poly
    # run
    device: str = "cpu"
    seed: int = 0
    workers: int = 0
    out_dir: str = "runs/effkern"
    ckpt_every: int = 0              # steps; 0: only at the end
    eval_every: int = 0              # steps; 0: only at the end
    log_every: int = 10
    knn_k: int = 20
    knn_t: float = 0.07
    linear_probe: bool = False       # also fit a linear probe on frozen features at the end
    compile: bool = False
    fsdp: bool = False               # several ranks: FSDP2 fully_shard instead of DDP (train/dist.py)
    resume: bool = False
    progress_bar: bool = True
    stop_after_steps: int | None = None  # stop early (tests of resume); the budget is unchanged

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
