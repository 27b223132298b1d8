"""``effkern bench step``: whole ``effkern train`` steps -- data loading and augmentation,
the method's encoders, backward, optimizer -- of several schedules, interleaved.

Each schedule is one ``effkern.train.loop.Run`` (same config but the schedule; its own
data, model and optimizer, the weights really train).  A round takes one step of every
run in turn: the next batch from the run's loader (augmentation of the multi-crop
views in this process: ``--workers 0``, so on a CPU the data cost is counted where it is
paid, not hidden in worker processes that share the same cores), then
``Run.train_step`` at the schedule's stage at ``--at`` (fraction of the budget spent).
Medians over ``--repeat`` rounds after 2 warm-up rounds; ``ms min``/``ms max`` give the
spread.

Columns: ms = data + step; ``data_ms``, ``step_ms`` their medians; ``vs baseline`` = the
first schedule's ms / this one's (the measured speedup; column ``vs baseline``); ``predicted_speedup`` = the
cost model's units per step of the first schedule / this one's (``Run.step_cost``:
encoder views + method heads, what the budget is charged); ``measured/predicted``.
With ``--breakdown``, one extra profiled step per schedule splits its time into
embed / attention / matmul / norm_act / gather / optimizer / other (effkern.bench._profile)
plus the data time; ``peak_mem_mib`` is CUDA's peak or, on CPU, the saved activations.

Defaults: MoCo v3, Fashion-MNIST resized to 224 px (``--limit-train`` images), the
trainer's 224 px model preset (ViT-Ti/16) at depth 6 on CPU (12 on CUDA), batch 32,
schedules none, const:keep=0.5, const:keep=0.25.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from effkern.bench.common import Row, int_at_least
from effkern.train.timing import BatchFeed, interleaved_step_times, sync

BREAKDOWN = ("t_data", "t_embed", "t_attention", "t_matmul", "t_norm_act", "t_gather", "t_optimizer", "t_other")
TABLE_EXTRA = ("data_ms", "step_ms", "ms_min", "ms_max", "images_per_s", "predicted_speedup",
               "measured/predicted", "peak_mem_mib") + BREAKDOWN


def _progress(text: str) -> float:
    """argparse type of --at: a budget progress in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="mocov3", help="mocov3, simclr, dino or supervised")
    parser.add_argument("--schedules", default="none,const:keep=0.5,const:keep=0.25",
                        help="semicolon- or comma-separated schedules; the first is the baseline")
    parser.add_argument("--batch", type=int_at_least(1), default=32, help="global batch")
    parser.add_argument("--size", type=int_at_least(8), default=224, help="base image size")
    parser.add_argument("--depth", type=int_at_least(1), default=None,
                        help="encoder blocks (above 64 px: CPU 6, CUDA 12; else the small-image preset's)")
    parser.add_argument("--model", default=None, help="timm name (default: the trainer's preset of --size)")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--limit-train", type=int_at_least(1), default=1024, help="training images loaded")
    parser.add_argument("--at", type=_progress, default=0.0, help="budget progress whose stage is timed, in [0, 1)")
    parser.add_argument("--breakdown", action="store_true", help="profile one more step per schedule")
    parser.add_argument("--seed", type=int, default=0)


def split_schedules(text: str) -> list[str]:
    """``none,const:keep=0.5`` -> ['none', 'const:keep=0.5']; a ``const:`` spec with several
    settings (``const:keep=0.5,patch=32``) keeps its commas when the list uses ';'."""
    parts = [s.strip() for s in (text.split(";") if ";" in text else text.split(","))]
    if not parts or not all(parts):
        raise ValueError(f"--schedules: an empty entry in {text!r}")
    return parts


def _runs(args, device):
    from effkern.train.config import TrainConfig
    from effkern.train.loop import Run

    depth = args.depth or (None if args.size <= 64 else 12 if device.type == "cuda" else 6)
    out = tempfile.mkdtemp(prefix="effkern-bench-step-")
    runs = {}
    for schedule in split_schedules(args.schedules):
        model_kwargs = {} if depth is None else {"depth": depth}
        cfg = TrainConfig(method=args.method, model=args.model, model_kwargs=model_kwargs,
                          data=args.data, base_size=args.size, limit_train=args.limit_train,
                          limit_test=max(args.batch, 64), epochs_equivalent=1000.0, schedule=schedule,
                          batch_size=args.batch, device=str(device), seed=args.seed,
                          out_dir=os.path.join(out, str(len(runs))),
                          progress_bar=False)
        runs[schedule] = Run(cfg)
    return runs


def run(args) -> list[Row]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    runs = _runs(args, device)
    slots = [(name, args.at) for name in runs]
    times = {name: t for (name, _), t in interleaved_step_times(runs, args.repeat, 2, slots).items()}
    rows, base = [], None
    for name, r in runs.items():
        totals = [d + s for d, s in times[name]]
        ms = statistics.median(totals) * 1e3
        stage = r.schedule.at(args.at)
        cost = r.step_cost(stage)
        extra = {"data_ms": statistics.median(d for d, _ in times[name]) * 1e3,
                 "step_ms": statistics.median(s for _, s in times[name]) * 1e3,
                 "ms_min": min(totals) * 1e3, "ms_max": max(totals) * 1e3,
                 "images_per_s": args.batch / (ms * 1e-3), "stage": stage.name, "units_per_step": cost}
        if base is None:
            base = (ms, cost)
        else:
            extra["predicted_speedup"] = base[1] / cost
            extra["measured/predicted"] = (base[0] / ms) / (base[1] / cost)
        if args.breakdown:
            extra.update(_breakdown(r, BatchFeed(r), args.at, device))
        rows.append(Row("train_step", f"{args.method} b{args.batch} {args.size}px {name}", "effkern",
                        "bf16" if device.type == "cuda" else "float32", ms,
                        ratios={"baseline": base[0] / ms} if rows else {}, extra=extra))
    return rows


def _breakdown(run, feed, at, device) -> dict:
    from effkern.bench import _profile

    t0 = time.perf_counter()
    views, labels = feed.next()
    data = time.perf_counter() - t0

    def step():
        run.state["spent"] = at * run.budget
        run.train_step(views, labels)
        sync(device)

    parts = _profile.breakdown(step)
    mem, _what = _profile.peak_memory_mib(step, device, params=list(run.method.parameters()))
    return {"t_data": data * 1e3, **{f"t_{k}": v for k, v in parts.items()}, "peak_mem_mib": mem}
