"""TrainConfig: every knob of ``effkern train`` in one dataclass (the CLI fills it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TrainConfig:
    # what to train
    method: str = "mocov3"
    model: str = "vit_tiny_patch16_224"
    model_kwargs: dict = field(default_factory=dict)   # extra timm.create_model kwargs (depth, patch_size, ...)
    method_kwargs: dict = field(default_factory=dict)  # method hparams (mlp_dim, out_dim, temperature, ...)
    data: str = "fashion-mnist"
    base_size: int = 32              # images are resized to base_size x base_size
    limit_train: int | None = None
    limit_test: int | None = None
    # how much: the budget in units (one forward of one image at base size / native patch / no dropout)
    budget: float | None = None      # millions of units
    epochs_equivalent: float | None = None  # budget = this many epochs of the uncompressed baseline
    schedule: str = "none"
    et_crop: str = "fft"             # ET++ low-frequency crop on the device ("fft") or by down-sampling ("resize")
    calibration: str | None = None   # JSON of `effkern schedule calibrate`: measured cost ratios per setting
    # optimisation
    batch_size: int = 64             # global batch (split over ranks)
    lr: float = 1.5e-4               # per 256 images (scaled linearly with the global batch)
    min_lr: float = 0.0
    weight_decay: float = 0.1
    weight_decay_end: float | None = None  # cosine ramp weight_decay -> this over the run (DINO: 0.04 -> 0.4)
    clip_grad: float | None = None   # clip the global gradient norm to this (DINO: 3.0); None: no clipping
    warmup: float = 0.1              # fraction of the budget
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
