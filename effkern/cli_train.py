"""``effkern train``, ``effkern schedule`` and ``effkern demo``: argument parsing only.

    effkern train --method mocov3 --data fashion-mnist --budget 2.0 --schedule const:keep=0.5
    torchrun --nproc_per_node 2 -m effkern train ...        (data parallel; gloo on CPU, NCCL on GPU)
    effkern schedule show efficienttrain++ [--model ...]
    effkern demo                                             (baseline vs accelerated, same budget)
"""

from __future__ import annotations

import argparse
import json
import os

# The CPU demo: the small-image model preset (effkern.train.config) at 28 px, small MoCo v3
# heads, batch 128 (the default sqrt LR rule gives a peak of 1.4e-3).
DEMO_METHOD_KWARGS = {"mlp_dim": 512, "out_dim": 128}
DEMO_BATCH = 128


def _kv(items: list[str], what: str) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{what} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr, ``PROG: error: MESSAGE (see PROG --help)``,
    exit code 2 (argparse's own usage block is left out)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())} (see {self.prog} --help)\n")


def _check_device(option: str, value: str) -> None:
    """--device names cpu or an available CUDA device (checked here: torch would fail with a
    driver traceback deep inside the run)."""
    import torch

    from effkern.ops import _checks

    device = _checks.device(option, value)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {value}: no CUDA GPU is available to torch on this machine "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {value}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise ValueError(f"{option} {value}: only cpu and cuda devices are supported")


def _check_kwargs(option: str, kwargs: dict, defaults: dict, what: str) -> None:
    """KEY=VALUE pairs: known keys, values of their default's kind (true is not an int)."""
    from effkern.ops import _checks

    for key, value in kwargs.items():
        if key not in defaults:
            raise ValueError(f"{option} {key}: not a {what} argument; valid: {', '.join(sorted(defaults))}")
        _checks.like_default(f"{option} {key}", value, defaults[key])


def _model_defaults() -> dict:
    import inspect

    import timm
    from timm.models.vision_transformer import VisionTransformer

    params = dict(inspect.signature(VisionTransformer.__init__).parameters)
    params.update(inspect.signature(timm.create_model).parameters)
    return {k: p.default for k, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD or p.kind == p.KEYWORD_ONLY
            if k not in ("self", "model_name")}


def _check_model(option: str, name: str | None) -> None:
    """A timm model name (timm would raise a RuntimeError traceback); None: the preset."""
    import timm

    if name is not None and not timm.is_model(name):
        raise ValueError(f"{option} {name!r}: not a timm model name (see timm.list_models('vit_*'))")


def _check_args(args) -> None:
    """What argparse cannot express: ranges, finite numbers, the device, --model-arg and
    --method-arg keys and types, --resume with a checkpoint in --out.  ValueError naming the option."""
    import math

    from effkern.train import checkpoint as ckpt
    from effkern.train.methods import _REGISTRY

    for option, minimum in (("base_size", 1), ("batch_size", 1), ("limit_train", 1), ("limit_test", 1),
                            ("workers", 0), ("ckpt_every", 0), ("eval_every", 0), ("log_every", 1)):
        value = getattr(args, option, None)
        if value is not None and value < minimum:
            raise ValueError(f"--{option.replace('_', '-')} must be >= {minimum}, got {value}")
    for option in ("budget", "epochs_equivalent", "lr", "weight_decay", "weight_decay_end", "clip_grad", "warmup"):
        value = getattr(args, option, None)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{option.replace('_', '-')} must be a finite number, got {value}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0.0 <= args.warmup <= 1.0:
        raise ValueError(f"--warmup must be a fraction in [0, 1], got {args.warmup}")
    _check_device("--device", args.device)
    _check_model("--model", args.model)
    _check_kwargs("--model-arg", _kv(args.model_arg, "--model-arg"), _model_defaults(), "timm VisionTransformer")
    method = _REGISTRY[str(args.method).lower().replace("-", "").replace("_", "")]
    _check_kwargs("--method-arg", _kv(args.method_arg, "--method-arg"), method.DEFAULTS, f"{args.method} method")
    if args.resume:
        ckpt.require(args.out)
    elif getattr(args, "auto_resume", False):
        args.resume = bool(ckpt.available(args.out))


def train_parser(prog: str = "effkern train", add_help: bool = True) -> argparse.ArgumentParser:
    from effkern.schedules import PRESETS
    from effkern.train.catalog import METHODS

    p = _Parser(prog=prog, add_help=add_help, description="Train a ViT (MoCo v3 / SimCLR / DINO "
                                "/ supervised) under a compute budget with scheduled input compression.")
    p.add_argument("--method", default="mocov3", help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--model", default=None, help="timm ViT name (randomly initialised); default: a preset by "
                   "--base-size (<= 64 px: patch 4, 4 blocks, width 128; larger: vit_tiny_patch16_224)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="extra timm.create_model kwarg")
    p.add_argument("--method-arg", action="append", metavar="KEY=VALUE", help="method hyper-parameter")
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist, digits, or a path to an ImageFolder tree")
    p.add_argument("--base-size", type=int, default=32, help="image size the data is resized to")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--val-split", type=int, default=0, help="hold out this many training images (fixed seed) "
                   "and evaluate on them instead of the test split: for choosing hyper-parameters")
    p.add_argument("--augment", choices=("auto", "small", "paper"), default="auto",
                   help="augmentation preset: auto = small (<= 64 px: crop scale 0.3-1, no solarize/blur) "
                        "or paper (the official recipes), by --base-size; colour ops off for 1-channel data")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget", type=float, default=None, help="millions of units (one unit = one forward "
                        "of one image at the base size, native patch, no dropout)")
    budget.add_argument("--epochs-equivalent", type=float, default=None,
                        help="budget = this many epochs of the uncompressed baseline (default 1)")
    p.add_argument("--schedule", default="none", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--et-crop", choices=("fft", "resize"), default="fft",
                   help="ET++ low-frequency crop: effkern.ops.fft_crop on the device, or down-sampling")
    p.add_argument("--batch-size", type=int, default=128, help="global batch")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate per 256 images, scaled to the batch "
                   "by --lr-rule (default: peak 1.4e-3 at batch 128)")
    p.add_argument("--lr-rule", choices=("sqrt", "linear", "none"), default="sqrt",
                   help="peak LR = lr*sqrt(batch/256) (AdamW at small batches), lr*batch/256 (the papers' "
                        "large-batch recipes) or lr itself")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--weight-decay-end", type=float, default=None,
                   help="cosine ramp of the weight decay to this value over the run (DINO: 0.04 -> 0.4)")
    p.add_argument("--clip-grad", type=float, default=None,
                   help="clip the global gradient norm to this value (DINO: 3.0); default: no clipping")
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up: this fraction of the run's optimizer steps")
    p.add_argument("--lr-schedule", choices=("cosine", "poly"), default="cosine")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--out", default="runs/effkern", help="run directory (metrics.jsonl, checkpoint.pt, plots)")
    p.add_argument("--ckpt-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between kNN evaluations (0: at the end)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--linear-probe", action="store_true",
                   help="at the end, also fit a linear probe on frozen features (docs/trainer.md)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly (an error when "
                   "--out holds no checkpoint; falls back to checkpoint.prev.pt if checkpoint.pt is damaged)")
    p.add_argument("--auto-resume", action="store_true", help="resume when --out holds a checkpoint, else start "
                   "a fresh run there")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and "
                   "optimizer state over the ranks (FSDP2) instead of replicating them (DDP)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--calibration", default=None, help="JSON from `effkern schedule calibrate`: charge measured "
                   "instead of FLOP-predicted cost ratios")
    return p


def config_from_args(args):
    from effkern.schedules import get_schedule
    from effkern.train.config import TrainConfig
    from effkern.train.data import DATASETS
    from effkern.train.methods import METHODS

    if args.method not in METHODS:
        raise ValueError(f"unknown method {args.method!r}; valid: {', '.join(METHODS)}")
    get_schedule(args.schedule)  # raises ValueError listing the valid names
    _check_args(args)
    if args.data not in DATASETS and not os.path.exists(args.data):
        raise ValueError(f"unknown dataset {args.data!r}: not one of {', '.join(DATASETS)} and no such path")
    if args.budget is not None and not args.budget > 0:
        raise ValueError(f"--budget must be > 0, got {args.budget}")
    if args.epochs_equivalent is not None and not args.epochs_equivalent > 0:
        raise ValueError(f"--epochs-equivalent must be > 0, got {args.epochs_equivalent}")
    epochs = args.epochs_equivalent if (args.budget is not None or args.epochs_equivalent is not None) else 1.0
    return TrainConfig(
        method=args.method, model=args.model, model_kwargs=_kv(args.model_arg, "--model-arg"),
        method_kwargs=_kv(args.method_arg, "--method-arg"), data=args.data, base_size=args.base_size,
        limit_train=args.limit_train, limit_test=args.limit_test, val_split=args.val_split, augment=args.augment,
        lr_rule=args.lr_rule, budget=args.budget,
        epochs_equivalent=None if args.budget is not None else epochs, schedule=args.schedule,
        et_crop=args.et_crop, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        weight_decay_end=args.weight_decay_end, clip_grad=args.clip_grad,
        warmup=args.warmup, lr_schedule=args.lr_schedule, device=args.device, seed=args.seed,
        workers=args.workers, out_dir=args.out, ckpt_every=args.ckpt_every, eval_every=args.eval_every,
        log_every=args.log_every, linear_probe=args.linear_probe, resume=args.resume, compile=args.compile,
        fsdp=args.fsdp, progress_bar=not args.no_progress, calibration=args.calibration)


def train_main(argv: list[str]) -> int:
    parser = train_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    from effkern.train.loop import train
    from effkern.train.report import summary_table

    try:
        summary = train(cfg)
    except (ValueError, OSError) as exc:  # effkern's argument/file checks (CheckpointError is a ValueError)
        parser.error(str(exc))
    if summary.get("stopped_early"):
        return 0
    print(summary_table([{"run": os.path.basename(os.path.normpath(cfg.out_dir)), **summary}]))
    return 0


def schedule_main(argv: list[str]) -> int:
    p = _Parser(prog="effkern schedule", description="Inspect compression schedules.")
    sub = p.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="stages, their cost per image and the predicted speedup")
    show.add_argument("name")
    show.add_argument("--method", default="mocov3")
    show.add_argument("--model", default=None, help="timm ViT name; default: the preset of --base-size, as "
                      "effkern train (<= 64 px: patch 4, 4 blocks, width 128; larger: vit_tiny_patch16_224)")
    show.add_argument("--base-size", type=int, default=224)
    show.add_argument("--model-arg", action="append", metavar="KEY=VALUE")
    cal = sub.add_parser("calibrate", help="measure this device's time per cost unit for patch sizes x keeps "
                         "(a JSON file for effkern train --calibration)")
    cal.add_argument("--model", default="vit_tiny_patch16_224")
    cal.add_argument("--base-size", type=int, default=224)
    cal.add_argument("--model-arg", action="append", metavar="KEY=VALUE")
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--batch", type=int, default=8)
    cal.add_argument("--repeat", type=int, default=3)
    cal.add_argument("--out", default="calibration.json")
    srch = sub.add_parser("search", parents=[train_parser(add_help=False)], conflict_handler="resolve",
                          help="AAIP: CA-MSE of candidate compressions at checkpoints of a reference run "
                               "-> a schedule JSON (docs/schedules_search.md)")
    srch.add_argument("--checkpoints", default="0,0.25,0.5,0.75,1",
                      help="progress points; the reference run (schedule none, same budget) is trained "
                           "and checkpointed there (a rerun with the same settings and --out reuses the points "
                           "an interrupted one reached), or give PROGRESS:PATH pairs of existing checkpoints")
    srch.add_argument("--patch-sizes", type=int, nargs="+", default=None,
                      help="default: native and 2x native, or the next larger size that divides --base-size")
    srch.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25],
                      help="keep ratios tried (one keep for every branch)")
    srch.add_argument("--n-batches", type=int, default=4, help="minibatches per candidate and checkpoint")
    srch.add_argument("--repeats", type=int, default=3, help="gradient draws per minibatch")
    srch.add_argument("--name", default=None, help="schedule name (default aaip-METHOD)")
    srch.add_argument("--n", type=float, nargs="+", default=[1.0],
                      help="CA-MSE = bias^2 + cost * Var / n: the number of baseline minibatches the comparison "
                           "is made at (larger n favours unbiased strategies); several values share one gradient "
                           "estimation and write each n's results to OUT/n<n>/")
    args = p.parse_args(argv)
    if args.cmd == "calibrate":
        try:
            _check_device("--device", args.device)
            _check_model("--model", args.model)
            _check_kwargs("--model-arg", _kv(args.model_arg, "--model-arg"), _model_defaults(),
                          "timm VisionTransformer")
            for option in ("base_size", "batch", "repeat"):
                if getattr(args, option) < 1:
                    raise ValueError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
        except ValueError as exc:
            cal.error(str(exc))
        return _calibrate(args)
    if args.cmd == "search":
        try:
            return _search(args)
        except (ValueError, FileNotFoundError) as exc:
            srch.error(str(exc))
    from effkern.schedules import describe, get_schedule
    from effkern.schedules.presets import check_patch_sizes

    try:
        schedule = get_schedule(args.name)
        if args.base_size < 1:
            raise ValueError(f"--base-size must be >= 1, got {args.base_size}")
        check_patch_sizes(schedule, args.base_size)
        cfg, views_fn = _show_shapes(args)
    except ValueError as exc:
        p.error(str(exc))
    print(describe(schedule, cfg, views_fn))
    return 0


def _show_shapes(args):
    """(ModelCfg, views_fn) for ``schedule show``: from effkern.train.catalog, without torch,
    for a timm ViT it knows and no --model-arg; else from the model and method built (on
    the meta device: shapes only, no memory).  ValueError naming the bad argument."""
    from effkern.train import catalog

    cfg = None if args.model_arg else catalog.model_cfg(args.model, args.base_size)
    if cfg is not None:
        method = catalog.method_key(args.method)
        return cfg, lambda stage: catalog.view_specs(method, cfg, stage.global_size(args.base_size, cfg.patch_size),
                                                      stage)
    return _built_shapes(args)


def _built_shapes(args):
    """``_show_shapes`` from the real encoder and method (the trainer's calls: view_plan at the
    base size, then view_specs at each stage's size)."""
    import torch

    import effkern.timm
    from effkern.schedules import ModelCfg
    from effkern.train.config import model_for
    from effkern.train.methods import build_method

    model_kwargs = _kv(args.model_arg, "--model-arg")
    _check_model("--model", args.model)
    _check_kwargs("--model-arg", model_kwargs, _model_defaults(), "timm VisionTransformer")
    name, kwargs = model_for(args.model, args.base_size, model_kwargs)
    with torch.device("meta"):
        encoder = effkern.timm.create_model(name, **{"pretrained": False, "img_size": args.base_size, **kwargs})
        method = build_method(args.method, encoder)
    cfg = ModelCfg.from_timm(encoder)
    method.view_plan(args.base_size)
    return cfg, lambda stage: method.view_specs(stage.global_size(args.base_size, cfg.patch_size), stage,
                                               cfg.patch_size)


def default_search_patch_sizes(patch: int, base_size: int) -> list[int]:
    """The native patch and the next coarser one that tiles the images: 2x native when it
    divides ``base_size`` (224 px, 16 -> 32), else the smallest larger divisor (28 px, 4 -> 7)."""
    if base_size % (2 * patch) == 0:
        return [patch, 2 * patch]
    return [patch] + [d for d in range(patch + 1, base_size + 1) if base_size % d == 0][:1]


def _reference_checkpoint_reusable(path: str, ref, step: int) -> bool:
    """An interrupted search left ``path`` (a progress-point checkpoint of its reference run): reused when
    the same reference run wrote it (every setting equal but how far one piece trains) at ``step``."""
    from effkern.train import checkpoint as ckpt

    if not os.path.isfile(path):
        return False
    try:
        saved = ckpt.read(path)
    except ckpt.CheckpointError:
        return False

    def settings(cfg: dict) -> str:  # tuples and lists alike, as the checkpoint may hold either
        return json.dumps({k: v for k, v in cfg.items() if k not in ("stop_after_steps", "resume")},
                          sort_keys=True, default=str)

    return settings(saved["cfg"]) == settings(ref.to_dict()) and saved["state"].get("step") == step


def _replace_file(src: str, dst: str) -> None:
    """Copy ``src`` over ``dst`` atomically (a kill leaves the old or the new file, never half of one)."""
    import shutil

    tmp = f"{dst}.tmp{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _search(args) -> int:
    """Reference run checkpointed at the progress points (exact resume makes the pieces one
    run; the pieces an interrupted search of the same run finished are reused), then the CA-MSE
    search over the candidate grid at each checkpoint."""
    import dataclasses

    from effkern.schedules.presets import check_patch_size
    from effkern.schedules.search import candidate_grid
    from effkern.train.schedule_search import check_ns, n_dir, search
    from effkern.train.loop import Run, train

    args.schedule = "none"
    cfg = config_from_args(args)
    cfg.progress_bar = False
    out = args.out
    points, given = [], {}
    for item in args.checkpoints.split(","):
        prog, _, path = item.partition(":")
        points.append(float(prog))
        if path:
            given[float(prog)] = path
    if any(not 0.0 <= q <= 1.0 for q in points):
        raise ValueError(f"--checkpoints progress points must be in [0, 1], got {points}")
    check_ns(args.n, "--n")  # before the reference run
    checkpoints = []
    ref_dir = os.path.join(out, "reference")
    ref = dataclasses.replace(cfg, out_dir=ref_dir, eval_every=0)
    probe = Run(ref)
    patch = probe.model_cfg.patch_size
    patch_sizes = args.patch_sizes or default_search_patch_sizes(patch, cfg.base_size)
    for p in patch_sizes:  # before the reference run: a size that does not tile the views changes nothing
        check_patch_size(p, cfg.base_size, f"--patch-sizes: patch size {p}")
    total_steps = probe.total_steps  # the trainer's own count (budget // cost can be one short in floats)
    done = trained = reused = 0
    for q in sorted(points):
        if q in given:
            checkpoints.append((q, given[q]))
            continue
        if q == 0.0:
            checkpoints.append((0.0, None))
            continue
        target = max(1, round(q * total_steps))
        path = os.path.join(ref_dir, f"checkpoint_p{q:g}.pt")
        if target > done and trained == 0 and _reference_checkpoint_reusable(path, ref, target):
            _replace_file(path, os.path.join(ref_dir, "checkpoint.pt"))  # the next piece resumes from it
            done = reused = target
        else:
            if target > done:  # two points may round to one step: the second is a copy of the first
                train(dataclasses.replace(ref, stop_after_steps=target - done, resume=done > 0))
                trained, done = trained + target - done, target
            _replace_file(os.path.join(ref_dir, "checkpoint.pt"), path)
        checkpoints.append((q, path))
    if reused:
        print(f"reference run: steps 1-{reused} from the checkpoints an earlier search left in {ref_dir}; "
              f"{trained} steps trained now")
    # one keep ratio for every branch (views and momentum/teacher passes alike)
    candidates = candidate_grid(patch_sizes, args.keeps, branches=("default",), tied=True)
    several = len(args.n) > 1
    result = search(lambda: Run(dataclasses.replace(cfg, out_dir=os.path.join(out, "scratch"))), checkpoints,
                    candidates, n_batches=args.n_batches, repeats=args.repeats, seed=args.seed,
                    out_dir=out, name=args.name or f"aaip-{args.method}", n=args.n if several else args.n[0])
    for n, schedule in (result.items() if several else [(args.n[0], result)]):
        where = n_dir(out, n) if several else out
        print((f"## n = {n:g}\n\n" if several else "") + open(os.path.join(where, "search.md")).read())
        path = os.path.join(where, "schedule.json")
        print(f"schedule {schedule.name!r}: {path}  (use: effkern train --schedule file:{path})")
    return 0


def _calibrate(args) -> int:
    import torch

    import effkern.timm
    from effkern.schedules import Calibration, ModelCfg, calibrate

    model = effkern.timm.create_model(args.model, pretrained=False, img_size=args.base_size,
                                      **_kv(args.model_arg, "--model-arg")).to(args.device)
    cfg = ModelCfg.from_timm(model)
    p = cfg.patch_size
    settings = [(args.base_size, patch, keep) for patch in (p, 2 * p) if args.base_size % patch == 0
                for keep in (1.0, 0.5, 0.25)]
    factors = calibrate(model, torch.device(args.device), settings, repeat=args.repeat, batch=args.batch)
    Calibration(device=args.device, factors=factors).save(args.out)
    for key, value in factors.items():
        print(f"{key:>24}  measured/predicted {value:.3f}")
    print(f"wrote {args.out}")
    return 0


def demo_main(argv: list[str]) -> int:
    """MoCo v3 on Fashion-MNIST (28 px, the small-image presets): the uncompressed baseline and a
    compressed schedule trained with the same compute budget, both against the same network
    randomly initialised; their wall-clock compared from step times measured interleaved."""
    from effkern.schedules import get_schedule

    p = _Parser(prog="effkern demo", description=demo_main.__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of the baseline; the budget is their "
                   "compute (the compressed schedule gets the same and takes more, cheaper steps)")
    p.add_argument("--limit-train", type=int, default=10000)
    p.add_argument("--limit-test", type=int, default=2000)
    p.add_argument("--accelerated", default="const:keep=0.25", help="the schedule compared with the baseline")
    p.add_argument("--out", default="runs/demo")
    args = p.parse_args(argv)
    try:
        _check_device("--device", args.device)
        for option in ("steps", "limit_train", "limit_test"):
            if getattr(args, option) < 1:
                raise ValueError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
        if args.limit_train < DEMO_BATCH:
            raise ValueError(f"--limit-train must be >= the batch size {DEMO_BATCH}, got {args.limit_train}")
        get_schedule(args.accelerated)
    except ValueError as exc:
        p.error(str(exc))
    import dataclasses

    from effkern.train.config import TrainConfig
    from effkern.train.loop import Run
    from effkern.train.report import summary_table
    from effkern.train.timing import interleaved_wall_clock

    base = TrainConfig(method="mocov3", method_kwargs=dict(DEMO_METHOD_KWARGS), data="fashion-mnist", base_size=28,
                       limit_train=args.limit_train, limit_test=args.limit_test, device=args.device,
                       epochs_equivalent=1.0, batch_size=DEMO_BATCH, out_dir=os.path.join(args.out, "baseline"),
                       log_every=25)
    probe = Run(base)
    budget = args.steps * probe.step_cost(probe.schedule.at(0.0)) / 1e6
    base = dataclasses.replace(base, epochs_equivalent=None, budget=budget)
    configs = {"baseline": base, "accelerated": dataclasses.replace(
        base, schedule=args.accelerated, out_dir=os.path.join(args.out, "accelerated"))}
    print(f"effkern demo: MoCo v3, Fashion-MNIST {args.limit_train} training / {args.limit_test} test images at "
          f"28 px, a {probe.model_cfg.depth}-block ViT (width {probe.model_cfg.embed_dim}, patch "
          f"{probe.model_cfg.patch_size}).  Compared: schedule 'none' (the baseline, {args.steps} steps of "
          f"{DEMO_BATCH} images) and {args.accelerated!r} with the same compute budget ({budget:.3g} M units, "
          f"cost model incl. heads), each vs its random initialisation.", flush=True)
    rows, random_knn = [], None
    for name, cfg in configs.items():
        run = Run(cfg)
        if random_knn is None:  # the same seed initialises both runs identically
            random_knn = run.knn()
            print(f"\nrandomly initialised network: kNN top-1 {100 * random_knn:.2f}%", flush=True)
        print(f"\n== {name}: schedule {cfg.schedule}", flush=True)
        rows.append({"run": name, **run.train()})
    print("\n" + summary_table(rows))
    timing_runs = {name: Run(dataclasses.replace(cfg, out_dir=os.path.join(args.out, "timing")))
                   for name, cfg in configs.items()}
    clock = interleaved_wall_clock(timing_runs, repeats=5, warmup=1)
    b, a = rows
    print(f"\nLearned: the baseline's kNN is {100 * (b['knn_acc'] - random_knn):+.2f} points over the random "
          f"network's ({100 * random_knn:.2f}%); the accelerated run's {100 * (a['knn_acc'] - random_knn):+.2f}.")
    print(f"Same compute: {b['steps']} baseline steps vs {a['steps']} accelerated steps "
          f"({a['steps'] / max(b['steps'], 1):.2f}x the images seen); kNN {100 * b['knn_acc']:.2f}% vs "
          f"{100 * a['knn_acc']:.2f}% ({100 * (a['knn_acc'] - b['knn_acc']):+.2f} points).")
    cb, ca = clock["baseline"]["seconds"], clock["accelerated"]["seconds"]
    print(f"Wall-clock from step times measured interleaved (baseline and accelerated steps alternating in one "
          f"process, median of 5 rounds): baseline {cb:.0f} s, accelerated {ca:.0f} s for the whole budget "
          f"(baseline / accelerated {cb / ca:.2f}x; above 1: the schedule saves wall-clock).  The wall (s) "
          f"column above was measured run after run and is not a fair comparison on a shared machine.")
    print(f"\nOne seed and a few CPU minutes: this shows the mechanics (same compute, more steps, what each "
          f"learns), not the papers' accuracy-vs-compute claims; the study in docs/results.md measures those "
          f"with seeds and budgets.  Plots: {args.out}/*/training.png")
    return 0
