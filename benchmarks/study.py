"""The small-scale study: how much compute do the schedules save at equal accuracy?

    python benchmarks/study.py plan    [--method mocov3]           # every cell and its status
    python benchmarks/study.py run     [--method mocov3 ...] [--stage tune] [--max-cells N] [--only ID]
    python benchmarks/study.py summarize                            # summary.json, PNG, docs/results.md

Design (one cell = one ``effkern train`` run directory + one JSON in ``RESULTS``):

* Data: Fashion-MNIST, the full 60k / 10k split, 28 px, the small-image model preset
  (patch 4, 4 blocks, width 128) and augmentation preset (``effkern.train.config`` /
  ``effkern.train.augment``).
* ``reference`` cells: kNN and linear probe of raw pixels and of the randomly initialised
  network, on the validation split and on the test split.
* ``tune`` cells: the uncompressed baseline at every budget, one seed, trained on 55k images
  and evaluated on a 5k validation split carved from the training set with a fixed seed.
  The anchor budget (``ANCHOR_IMAGES``, 192k, run first) runs the whole batch size x LR
  grid; every other budget runs the cross through the anchor's winner (its batch size at
  every LR + its LR at every batch size: 5 of the 9 cells), which saves ~3 CPU-hours per
  large budget.  Batch 32 joined the grid after batch 64 won at 192k on the grid's edge
  (a compressed schedule takes more, smaller steps: a baseline held to too large a batch
  would look worse than it is).  That rule is now automatic: once a budget's grid is
  finished, a winner on the edge of its row (LR) or column (batch size) adds the next point
  past that edge (LR x2 / /2, batch x2 / /2; ``MAX_EDGE_STEPS`` = 2 at most), and the final
  cells wait for it.  An explicit ``run --only ID`` also runs a tune cell whose
  budget's cross is not known yet (its batch size and LR are in its ID).  Grid points that
  give the baseline fewer than ``MIN_STEPS`` = 1500 optimizer steps are left out (at 96k:
  batch 128).  The best validation kNN (supervised: its classifier's top-1) picks each
  budget's batch size and LR.  The test
  split is never looked at.
* ``final`` cells: the baseline at every budget, the compressed schedules at the two smaller
  budgets (96k, 192k: chosen so that their accuracy can fall inside the baseline's 96k-384k
  curve, where the factor is a point estimate rather than a bound; a schedule at 192k that
  beats the 384k baseline gets only a lower bound, >= 2x), ``SEEDS`` seeds each,
  trained on all 60k, evaluated on the 10k test split, with the tuned batch size and LR of
  that budget (the compressed schedules reuse the baseline's;
  they are not tuned separately).  A final cell waits until the tuning of its budget is done.
  A schedule whose stages train exactly as an earlier one's (``same_as``: e.g. a package
  preset that is one constant keep 0.5, or keep 1 at the native patch size = the baseline)
  gets no cells; the report gives it that schedule's rows.
* ``timing`` cells: baseline and compressed steps alternating in one process (so machine
  load hits both alike) -> seconds per unit of budget of each schedule.

Budgets are counted in images the baseline would see (``BUDGET_IMAGES``; 1500 / 3000 / 6000
optimizer steps at batch 64) and converted to the cost model's units, so a compressed
schedule gets the same compute and more steps.

Bookkeeping: a cell whose JSON exists is finished and skipped; an interrupted cell resumes
from its last checkpoint (``CKPT_EVERY`` steps; the resumed run is bit-for-bit the
uninterrupted one).  Several ``run`` processes can share the grid: each claims a cell
(an exclusive file under ``runs/study/.claims/``) before running it.  ``summarize`` reads
only the JSONs, so it can run at any time: cells that are missing are reported as missing,
never filled in.

Compute saved at equal accuracy (per schedule and budget b): the baseline's mean kNN vs
log2(budget) curve, made monotone (best so far), is inverted at the schedule's mean kNN ->
the baseline budget B needed; factor = B / b.  Outside the baseline's range the factor is
censored (``<`` the smallest / ``>`` the largest budget's ratio), and an interval end that a
censored bootstrap draw sets is printed open (``[>= 2.00, inf)``).  A baseline budget enters
the curve once it has ``MIN_CURVE_SEEDS`` seeds.  The 90 % interval is a percentile bootstrap
over seeds (each cell's seeds resampled with replacement, ``N_BOOT`` times); with 3 seeds a
cell has 10 distinct resamples, so it under-covers: read it as the seeds' spread carried
through the inversion, not as a calibrated confidence interval.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "study")
SEARCH_RESULTS = os.path.join(REPO, "benchmarks", "results", "aaip_search")  # benchmarks/derive_aaip_presets.sh
RUNS = os.path.join(REPO, "runs", "study")
REPORT = os.path.join(REPO, "docs", "results.md")

DATA = "fashion-mnist"
BASE_SIZE = 28
TRAIN_IMAGES = 60000
VAL_SPLIT = 5000
# baseline images seen: 1.6 / 3.2 / 6.4 epochs of 60k.  A 768k budget was planned and dropped before any of
# its cells ran: ~14 CPU-hours (5 tune + 3 final cells of ~100 min at one thread) for MoCo alone, and it
# would only turn the 192k compressed cells' lower bounds into point estimates.
BUDGET_IMAGES = (96_000, 192_000, 384_000)
ANCHOR_IMAGES = 192_000                         # tuned on the whole grid (and run first); the others tune its cross
COMPRESSED_BUDGETS = (96_000, 192_000)          # the compressed schedules run at the smaller budgets
MIN_STEPS = 1500                                # grid points giving the baseline fewer optimizer steps are left out
MAX_EDGE_STEPS = 2                              # a winner on a grid edge extends the grid past it, at most this often
GRID_BATCH = (128, 64, 32)                      # 32: the 192k winner sat on the grid's small-batch edge
GRID_LR = (2e-3, 1e-3, 4e-3)                    # --lr per 256 images, sqrt rule (peak 1.4e-3 at 128 for 2e-3)
SEEDS = (0, 1, 2)
CKPT_EVERY = 100
N_BOOT = 2000
MIN_CURVE_SEEDS = 2                             # a baseline budget with fewer seeds stays off the curve
METHODS = ("mocov3", "simclr", "dino", "supervised")
METHOD_KWARGS = {"mocov3": {"mlp_dim": 512, "out_dim": 128},
                 "simclr": {"hidden_dim": 512, "out_dim": 128},
                 # DINO with its 2 global crops only (no multi-crop, as small-image DINO recipes such as
                 # solo-learn's CIFAR one): on the val split at 96k images it scored as 4 local crops of 12 px
                 # did (kNN / probe 61.10 / 71.46 vs 60.68 / 69.40, one seed) at 24% less compute per image;
                 # BatchNorm in the head (DINO's ResNet option) is what makes it learn here: 69.66 / 74.34
                 "dino": {"out_dim": 4096, "hidden_dim": 512, "bottleneck_dim": 128, "n_local": 0,
                          "use_bn_in_head": True},
                 "supervised": {}}
PAPERS = {"mocov3": "4x (AAIP, MoCo v3)", "simclr": "3.3x (AAIP, SimCLR)", "dino": "2.5x (AAIP, DINO)",
          "supervised": "1.5-3x (EfficientTrain++, supervised)"}


# what ranks a budget's tuning grid on the validation split: a supervised run by its own classifier's
# top-1 (its training objective, and EfficientTrain++'s metric), the self-supervised methods by kNN
TUNE_METRIC = {"supervised": "classifier_acc"}


def tune_metric(method: str) -> str:
    """The result key (``knn_acc`` / ``classifier_acc``) that ranks ``method``'s tune cells."""
    return TUNE_METRIC.get(method, "knn_acc")


def paper_claim(method: str, schedule: str) -> str:
    """The published factor a schedule's result compares with (each paper's own setting, ImageNet)."""
    if schedule.startswith("efficienttrain++"):
        return "1.5-3x (EfficientTrain++, supervised and MAE" + ("" if method == "supervised" else
                                                                 f"; no claim for {method}") + ")"
    if schedule.startswith("const"):
        return "none (a fixed-keep control, no paper's schedule)"
    return PAPERS[method]


REDERIVED = "aaip-rederived-n1"  # the AAIP search re-run at this scale (n = 1), when its output is committed


def rederived_schedule_file(method: str) -> str:
    return os.path.join(SEARCH_RESULTS, method, "n1", "schedule.json")


def search_reference_config(method: str, searches: str | None = None) -> dict | None:
    """The trainer config of the AAIP search's reference run (kept by benchmarks/derive_aaip_presets.sh),
    or None when the search has not run or did not record it."""
    path = os.path.join(searches or SEARCH_RESULTS, method, "reference_config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def rederived_is_current(method: str, results: str = RESULTS) -> bool:
    """The re-derived schedule's cells run only when its search's reference run is the method's own tuned
    baseline at the anchor budget (same batch size and LR): a search that ran before the method's tuning
    finished, at other settings, has to be re-run first (benchmarks/derive_aaip_presets.sh)."""
    cfg, tuned = search_reference_config(method), tuned_hp(method, ANCHOR_IMAGES, results)
    if cfg is None or tuned is None or (cfg["batch_size"], cfg["lr"]) != tuned:
        return False
    # the method's heads too (a search whose reference run had other heads, or DINO's multi-crop, is not the
    # study's baseline); a config recorded without them (mocov3's, written by hand after its search) is taken
    # as the script's arguments of that time, which were the study's
    return cfg.get("method_kwargs", METHOD_KWARGS[method]) == METHOD_KWARGS[method]


def schedules_for(method: str) -> list[str]:
    """The baseline first, then the compressed schedules of the method: const keep 0.5, the
    package's aaip preset, the AAIP search re-run at this scale (``REDERIVED``, once
    benchmarks/derive_aaip_presets.sh has written it), efficienttrain++."""
    if method == "supervised":
        return ["none", "efficienttrain++"]
    from effkern.schedules import PRESETS

    names = ["none", "const:keep=0.5"]
    if f"aaip-{method}" in PRESETS:
        names.append(f"aaip-{method}")
    if os.path.exists(rederived_schedule_file(method)):
        names.append(REDERIVED)
    return names + ["efficienttrain++"]


def trainer_schedule(method: str, schedule: str) -> str:
    """The --schedule value of a study schedule name (``REDERIVED`` -> its file)."""
    return f"file:{rederived_schedule_file(method)}" if schedule == REDERIVED else schedule


def training_stages(method: str, schedule: str) -> tuple:
    """What ``schedule`` trains with, its labels left out: (start, patch size, default keep, other
    branches' keeps, resolution, RandAugment magnitude) per stage, with the model's native patch size
    filled in and a stage equal to the one before merged into it.  Two schedules with equal
    ``training_stages`` train identically."""
    from effkern.schedules import get_schedule
    from effkern.train.config import model_for

    native = model_for(None, BASE_SIZE)[1].get("patch_size")
    out: list = []
    for start, st in get_schedule(trainer_schedule(method, schedule)).stages:
        keep = dict(st.keep)
        default = keep.pop("default", 1.0)
        key = (st.patch_size or native, default, tuple(sorted((b, r) for b, r in keep.items() if r != default)),
               st.resolution, st.randaug_magnitude)
        if not out or out[-1][1] != key:
            out.append((start, key))
    return tuple(out)


def same_as(method: str) -> dict[str, str]:
    """{schedule: the earlier schedule of ``schedules_for(method)`` it trains identically to}: such a
    schedule (e.g. a package preset that is one constant keep, or a search result that never compresses)
    gets no cells of its own; the report gives it the earlier schedule's numbers."""
    first: dict = {}
    out = {}
    for schedule in schedules_for(method):
        key = training_stages(method, schedule)
        if key in first:
            out[schedule] = first[key]
        else:
            first[key] = schedule
    return out


# ----------------------------------------------------------------------------- cells
def slug(schedule: str) -> str:
    return schedule.replace(":", "_").replace("=", "").replace(",", "_").replace("+", "p")


def cell_id(cell: dict) -> str:
    if cell["kind"] == "reference":
        return f"{cell['method']}/reference/{cell['split']}_s{cell['seed']}"
    if cell["kind"] == "timing":
        return f"{cell['method']}/timing/{slug(cell['schedule'])}_bs{cell['batch']}"
    hp = f"bs{cell['batch']}_lr{cell['lr']:g}"
    return f"{cell['method']}/{cell['kind']}/{slug(cell['schedule'])}/i{cell['images'] // 1000}k/{hp}/s{cell['seed']}"


def result_path(cell: dict, results: str = RESULTS) -> str:
    return os.path.join(results, cell_id(cell).replace("/", "__") + ".json")


def load_result(cell: dict, results: str = RESULTS) -> dict | None:
    path = result_path(cell, results)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_result(cell: dict, result: dict, results: str = RESULTS) -> str:
    """Atomically write the cell's JSON (the marker that the cell is finished)."""
    os.makedirs(results, exist_ok=True)
    path = result_path(cell, results)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"cell": cell, "id": cell_id(cell), **result}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def tune_grid(method: str, images: int, results: str = RESULTS) -> list[tuple[int, float]] | None:
    """The (batch, lr) pairs tuned at budget ``images``: the whole grid at ``ANCHOR_IMAGES``;
    at any other budget the cross through the anchor's winner (that batch size at every LR,
    that LR at every batch size); None while the anchor is not tuned yet.  Pairs that give
    the baseline fewer than ``MIN_STEPS`` optimizer steps are left out.  Once the grid is
    finished, a winner on an edge of its row (LR) or column (batch size) adds the next point
    past that edge (LR x2 or /2, batch x2 or /2), up to ``MAX_EDGE_STEPS`` times."""
    if images == ANCHOR_IMAGES:
        grid = [(b, lr) for b in GRID_BATCH for lr in GRID_LR]
    else:
        anchor = tuned_hp(method, ANCHOR_IMAGES, results)
        if anchor is None:
            return None
        batch, lr = anchor  # may lie off the base grid (an edge step of the anchor)
        grid = list(dict.fromkeys([(batch, x) for x in sorted({*GRID_LR, lr})]
                                  + [(b, lr) for b in sorted({*GRID_BATCH, batch}, reverse=True)]))
    grid = [(b, lr) for b, lr in grid if images // b >= MIN_STEPS]
    for _ in range(MAX_EDGE_STEPS):
        winner = _grid_winner(method, images, grid, results)
        step = _edge_steps(grid, winner, images) if winner else []
        if not step:
            break
        grid += step
    return grid


def _grid_winner(method: str, images: int, grid: list, results: str) -> tuple[int, float] | None:
    """(batch, lr) of the best validation accuracy (``tune_metric``) over ``grid``; None while a cell is missing."""
    best = None
    for batch, lr in grid:
        r = load_result(tune_cell(method, images, batch, lr), results)
        if r is None:
            return None
        if best is None or r[tune_metric(method)] > best[0]:
            best = (r[tune_metric(method)], batch, lr)
    return best[1], best[2]


def _edge_steps(grid: list, winner: tuple[int, float], images: int) -> list[tuple[int, float]]:
    """The points one step past the edges ``winner`` sits on: along its row (the LRs tried at its batch
    size) and its column (the batch sizes tried at its LR), each with >= 2 points."""
    batch, lr = winner
    lrs = sorted(x for b, x in grid if b == batch)
    batches = sorted(b for b, x in grid if x == lr)
    out = []
    if len(lrs) >= 2 and lr in (lrs[0], lrs[-1]):
        out.append((batch, lr * 2 if lr == lrs[-1] else lr / 2))
    if len(batches) >= 2 and batch in (batches[0], batches[-1]):
        out.append((batch // 2 if batch == batches[0] else batch * 2, lr))
    return [(b, x) for b, x in out if (b, x) not in grid and b >= 1 and images // b >= MIN_STEPS]


def tuned_hp(method: str, images: int, results: str = RESULTS) -> tuple[int, float] | None:
    """(batch, lr) with the best validation accuracy (``tune_metric``) among the tune cells of
    this budget's grid (edge steps included), or None while any cell of the grid is missing."""
    grid = tune_grid(method, images, results)
    return None if grid is None else _grid_winner(method, images, grid, results)


def tune_cell(method: str, images: int, batch: int, lr: float) -> dict:
    return {"kind": "tune", "method": method, "schedule": "none", "images": images, "batch": batch, "lr": lr,
            "seed": 0, "split": "val"}


def plan(method: str, results: str = RESULTS) -> list[dict]:
    """Every cell of ``method`` in run order; final cells of an untuned budget carry
    ``"blocked": "tuning"`` (their batch size and LR are not known yet); the ``REDERIVED`` cells carry
    ``"blocked": "search"`` until the search's reference run is the method's tuned anchor baseline."""
    cells = [{"kind": "reference", "method": method, "split": "val", "seed": 0}]
    order = [ANCHOR_IMAGES] + [b for b in BUDGET_IMAGES if b != ANCHOR_IMAGES]
    aliases = same_as(method)
    schedules = [s for s in schedules_for(method) if s not in aliases]  # one set of cells per training
    search_current = REDERIVED in schedules and rederived_is_current(method, results)
    for images in order:  # budget by budget (the anchor first): its tuning grid, then its final cells
        anchor = images == ANCHOR_IMAGES
        grid = tune_grid(method, images, results)
        if grid is None:  # the cross is not known yet: the whole grid, blocked
            cells += [{**tune_cell(method, images, b, lr), "blocked": "tuning"} for b in GRID_BATCH for lr in GRID_LR
                      if images // b >= MIN_STEPS]
        else:
            cells += [tune_cell(method, images, b, lr) for b, lr in grid]
        if anchor:  # the test split's reference points, before the first test-split cell
            cells += [{"kind": "reference", "method": method, "split": "test", "seed": seed} for seed in SEEDS]
        hp = tuned_hp(method, images, results)
        for schedule in schedules:
            if schedule != "none" and images not in COMPRESSED_BUDGETS:
                continue
            for seed in SEEDS:
                cell = {"kind": "final", "method": method, "schedule": schedule, "images": images,
                        "batch": hp[0] if hp else 0, "lr": hp[1] if hp else 0.0, "seed": seed, "split": "test"}
                if hp is None:
                    cell["blocked"] = "tuning"
                elif schedule == REDERIVED and not search_current:
                    cell["blocked"] = "search"
                cells.append(cell)
        if anchor:  # step times at the anchor budget's tuned batch size
            for schedule in schedules[1:]:
                cell = {"kind": "timing", "method": method, "schedule": schedule, "batch": hp[0] if hp else 0}
                if hp is None:
                    cell["blocked"] = "tuning"
                elif schedule == REDERIVED and not search_current:
                    cell["blocked"] = "search"
                cells.append(cell)
    return cells


def pending(cells: list[dict], results: str = RESULTS) -> list[dict]:
    """The cells still to run, in order (finished and blocked cells left out)."""
    return [c for c in cells if "blocked" not in c and load_result(c, results) is None]


# ----------------------------------------------------------------------------- claims
# Several ``run`` processes may share one machine (one torch thread each): a process claims a cell by
# creating its claim file exclusively (O_EXCL) before running it, so two runners never train the same cell.
# A claim whose process is gone (killed, machine restarted) is stale and taken over.
def _claim_path(cell: dict) -> str:
    return os.path.join(RUNS, ".claims", cell_id(cell).replace("/", "__"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim_owner(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None


def claim(cell: dict) -> bool:
    """True when this process now holds the cell (claim file created; a stale one is taken over)."""
    path = _claim_path(cell)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _claim_owner(path)
            if owner == os.getpid():
                return True
            if owner and _alive(owner):
                return False
            try:  # stale (its process is gone): take it over
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release(cell: dict) -> None:
    path = _claim_path(cell)
    if _claim_owner(path) == os.getpid():
        os.remove(path)


def others_running(method: str) -> bool:
    """Whether another live process holds a claim on a cell of ``method`` (its result may unblock cells)."""
    folder = os.path.join(RUNS, ".claims")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return any(n.startswith(f"{method}__") and (owner := _claim_owner(os.path.join(folder, n)))
               and owner != os.getpid() and _alive(owner) for n in names)


# ----------------------------------------------------------------------------- running
def units_per_image(method: str) -> float:
    """Cost-model units of one image of the uncompressed baseline (encoder + heads, all passes)."""
    import effkern.timm
    from effkern.schedules import ModelCfg, Stage, view_cost
    from effkern.train.config import model_for
    from effkern.train.methods import build_method

    name, kwargs = model_for(None, BASE_SIZE)
    encoder = effkern.timm.create_model(name, pretrained=False, img_size=BASE_SIZE, num_classes=10, **kwargs)
    m = build_method(method, encoder, **METHOD_KWARGS[method])
    cfg = ModelCfg.from_timm(encoder)
    return sum(view_cost(cfg, v) for v in m.view_specs(BASE_SIZE, Stage(), cfg.patch_size))


def train_config(cell: dict, runs: str = RUNS):
    from effkern.train.config import TrainConfig

    from effkern.train import checkpoint

    val = cell["split"] == "val"
    out_dir = os.path.join(runs, cell_id(cell))
    return TrainConfig(method=cell["method"], method_kwargs=dict(METHOD_KWARGS[cell["method"]]), data=DATA,
                       base_size=BASE_SIZE, val_split=VAL_SPLIT if val else 0,
                       budget=cell["images"] * units_per_image(cell["method"]) / 1e6,
                       schedule=trainer_schedule(cell["method"], cell["schedule"]),
                       batch_size=cell["batch"], lr=cell["lr"], seed=cell["seed"],
                       out_dir=out_dir, ckpt_every=CKPT_EVERY, log_every=50, linear_probe=True,
                       progress_bar=False, resume=bool(checkpoint.available(out_dir)))  # resume an interrupted cell


def run_train_cell(cell: dict, runs: str = RUNS) -> dict:
    from effkern.schedules import get_schedule
    from effkern.train.loop import train

    cfg = train_config(cell, runs)
    t0 = time.time()
    summary = train(cfg)
    # the stages the schedule's name stood for when the cell ran (a preset can be re-derived later)
    stages = json.loads(get_schedule(cfg.schedule).to_json())["stages"]
    return {**summary, "budget_images": cell["images"], "epochs_equivalent": cell["images"] / TRAIN_IMAGES,
            "config": cfg.to_dict(), "schedule_stages": stages, "process_wall_s": time.time() - t0}


def run_reference_cell(cell: dict) -> dict:
    """kNN / linear probe of raw pixels and of the randomly initialised encoder (seeded)."""
    import torch

    from effkern.train.config import TrainConfig
    from effkern.train.knn import knn_accuracy
    from effkern.train.loop import MEAN, STD, Run
    from effkern.train.probe import linear_probe_accuracy

    val = cell["split"] == "val"
    cfg = TrainConfig(method=cell["method"], method_kwargs=dict(METHOD_KWARGS[cell["method"]]), data=DATA,
                      base_size=BASE_SIZE, val_split=VAL_SPLIT if val else 0, epochs_equivalent=1.0,
                      seed=cell["seed"], out_dir=os.path.join(RUNS, cell_id(cell)), progress_bar=False)
    run = Run(cfg)
    scores = run.evaluate(probe=True)
    out = {"random_init_knn": scores["knn_acc"], "random_init_probe": scores["probe_acc"]}
    if cell["seed"] == 0:
        pixels = lambda x: x.flatten(1)  # noqa: E731
        with torch.no_grad():
            out["pixels_knn"] = knn_accuracy(pixels, run.data, MEAN, STD, torch.device("cpu"))
            out["pixels_probe"] = linear_probe_accuracy(pixels, run.data, MEAN, STD, torch.device("cpu"))
    return out


def run_timing_cell(cell: dict, repeats: int = 12, warmup: int = 2) -> dict:
    """Baseline and compressed steps alternating in one process (effkern.train.timing) at the
    anchor budget and its tuned batch size -> seconds per unit of budget of each."""
    import dataclasses

    from effkern.train.loop import Run
    from effkern.train.timing import interleaved_wall_clock

    base_cfg = train_config({**cell, "kind": "final", "schedule": "none", "images": ANCHOR_IMAGES, "lr": 2e-3,
                             "seed": 0, "split": "test"})
    base_cfg = dataclasses.replace(base_cfg, linear_probe=False, resume=False, out_dir=os.path.join(RUNS, "timing"))
    runs = {"none": Run(base_cfg), cell["schedule"]: Run(dataclasses.replace(
        base_cfg, schedule=trainer_schedule(cell["method"], cell["schedule"])))}
    out = interleaved_wall_clock(runs, repeats=repeats, warmup=warmup)
    out["time_per_unit_ratio"] = out["none"]["seconds_per_unit"] / out[cell["schedule"]]["seconds_per_unit"]
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def run_cell(cell: dict) -> dict:
    if cell["kind"] == "reference":
        return run_reference_cell(cell)
    if cell["kind"] == "timing":
        return run_timing_cell(cell)
    return run_train_cell(cell)


# ----------------------------------------------------------------------------- analysis
def _envelope(curve: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(log2 budget, best accuracy so far) of a (budget, accuracy) curve, sorted by budget."""
    out, best = [], float("-inf")
    for b, a in sorted(curve):
        best = max(best, a)
        out.append((math.log2(b), best))
    return out


def budget_needed(curve: list[tuple[float, float]], acc: float) -> tuple[float, str]:
    """The baseline budget that reaches ``acc`` on its monotone curve, interpolated linearly in
    log2(budget): (budget, "=") inside the curve, (smallest budget, "<=") when the smallest
    baseline already reaches it, (largest budget, ">") when no baseline budget does."""
    env = _envelope(curve)
    if not env:
        raise ValueError("budget_needed: empty baseline curve")
    budgets = sorted(b for b, _ in curve)  # the bounds exactly (2 ** log2(b) need not give b back)
    if acc <= env[0][1]:
        return budgets[0], "<="
    for (x0, a0), (x1, a1) in zip(env, env[1:]):
        if a0 < acc <= a1:
            return 2 ** (x0 + (acc - a0) * (x1 - x0) / (a1 - a0)), "="
    return budgets[-1], ">"


def compute_saved(baseline: dict[float, list[float]], schedule: list[float], budget: float,
                  n_boot: int = N_BOOT, seed: int = 0, level: float = 0.9) -> dict:
    """Factor = baseline budget needed for the schedule's mean accuracy / ``budget``, with a
    bootstrap ``level`` interval over seeds.  ``baseline``: {budget: [accuracy per seed]};
    ``schedule``: [accuracy per seed] at ``budget``.  Censored bootstrap draws count at their
    bound (so an interval touching a bound says "at least" / "at most")."""
    if not schedule or not baseline or any(not v for v in baseline.values()):
        raise ValueError("compute_saved needs at least one seed per cell")
    mean = lambda v: sum(v) / len(v)  # noqa: E731

    def factor(base_means: dict, acc: float) -> tuple[float, str]:
        need, how = budget_needed(list(base_means.items()), acc)
        return need / budget, how

    point, how = factor({b: mean(v) for b, v in baseline.items()}, mean(schedule))
    rng = random.Random(seed)
    draws = []
    for _ in range(n_boot):
        base = {b: mean([rng.choice(v) for _ in v]) for b, v in baseline.items()}
        draws.append(factor(base, mean([rng.choice(schedule) for _ in schedule])))
    draws.sort(key=lambda d: d[0])
    lo = draws[int(math.floor((1 - level) / 2 * (n_boot - 1)))]
    hi = draws[int(math.ceil((1 + level) / 2 * (n_boot - 1)))]
    return {"factor": point, "bound": how, "interval": [lo[0], hi[0]],
            # how each end was drawn: "=" inside the curve, ">" / "<=" a censored draw (that end is open)
            "interval_bounds": [lo[1], hi[1]], "level": level, "n_boot": n_boot,
            "censored_fraction": sum(h != "=" for _, h in draws) / n_boot}


def _stats(values: list[float]) -> dict:
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return {"mean": m, "std": sd, "n": n}


def summarize(results: str = RESULTS) -> dict:
    """summary.json from the finished cells' JSONs only."""
    rows = []
    for name in sorted(os.listdir(results)) if os.path.isdir(results) else []:
        if name.endswith(".json") and name != "summary.json":
            with open(os.path.join(results, name)) as f:
                rows.append(json.load(f))
    summary: dict = {"cells_finished": len(rows), "methods": {}}
    for method in METHODS:
        mine = [r for r in rows if r["cell"]["method"] == method]
        if not mine:
            continue
        entry: dict = {"reference": {}, "tune": [], "schedules": {}, "timing": {}}
        for r in mine:
            c = r["cell"]
            if c["kind"] == "reference":
                ref = entry["reference"].setdefault(c["split"], {})
                for key in ("random_init_knn", "random_init_probe", "pixels_knn", "pixels_probe"):
                    if key in r:
                        ref.setdefault(key, []).append(r[key])
            elif c["kind"] == "tune":
                entry["tune"].append({"images": c["images"], "batch": c["batch"], "lr": c["lr"],
                                      "steps": r["steps"], "val_knn": r["knn_acc"], "val_probe": r.get("probe_acc"),
                                      "val_classifier": r.get("classifier_acc")})
            elif c["kind"] == "timing":
                t = {k: r[k] for k in ("time_per_unit_ratio",) if k in r}
                if "none" in r and c["schedule"] in r:  # predicted whole-budget training seconds and steps
                    t.update(baseline_seconds=r["none"]["seconds"], baseline_steps=r["none"]["steps"],
                             seconds=r[c["schedule"]]["seconds"], steps=r[c["schedule"]]["steps"])
                entry["timing"][c["schedule"]] = t
        for split, ref in entry["reference"].items():
            entry["reference"][split] = {k: _stats(v) for k, v in ref.items()}
        # final cells run with HPs that a later tune cell beat (e.g. a batch size added to the grid)
        # are superseded: only the finals at each budget's best finished tune cell count
        # (the winner of the budget's grid, as the final cells were given it; while a grid is incomplete,
        # the best finished tune cell)
        best: dict = {}
        rank = {"knn_acc": "val_knn", "classifier_acc": "val_classifier"}[tune_metric(method)]
        for t in entry["tune"]:
            if t["images"] not in best or t[rank] > best[t["images"]][0]:
                best[t["images"]] = (t[rank], t["batch"], t["lr"])
        for images in best:
            hp = tuned_hp(method, images, results)
            if hp is not None:
                best[images] = (None, *hp)
        finals, superseded = [], []
        for r in (r for r in mine if r["cell"]["kind"] == "final"):
            b = best.get(r["cell"]["images"])
            ok = b is None or b[1:] == (r["cell"]["batch"], r["cell"]["lr"])
            (finals if ok else superseded).append(r)
        entry["superseded_finals"] = sorted(cell_id(r["cell"]) for r in superseded)
        for schedule in dict.fromkeys(r["cell"]["schedule"] for r in finals):
            cells = {}
            for r in (r for r in finals if r["cell"]["schedule"] == schedule):
                cells.setdefault(r["cell"]["images"], []).append(r)
            entry["schedules"][schedule] = {
                f"{images}": {"images": images, "epochs_equivalent": images / TRAIN_IMAGES,
                              "batch": rs[0]["cell"]["batch"], "lr": rs[0]["cell"]["lr"],
                              "seeds": sorted(r["cell"]["seed"] for r in rs),
                              "steps": sorted({r["steps"] for r in rs}),
                              "knn": _stats([r["knn_acc"] for r in rs]),
                              "probe": _stats([r["probe_acc"] for r in rs if "probe_acc" in r]) if any(
                                  "probe_acc" in r for r in rs) else None,
                              # supervised: the trained head's top-1 (EfficientTrain++'s metric), shown beside
                              # the kNN that the study's factors use for every method
                              "classifier": _stats([r["classifier_acc"] for r in rs if "classifier_acc" in r])
                              if any("classifier_acc" in r for r in rs) else None,
                              "knn_per_seed": [r["knn_acc"] for r in sorted(rs, key=lambda r: r["cell"]["seed"])],
                              "probe_per_seed": [r["probe_acc"] for r in sorted(rs, key=lambda r: r["cell"]["seed"])]
                              if all("probe_acc" in r for r in rs) else None,
                              "classifier_per_seed": [r["classifier_acc"] for r in
                                                      sorted(rs, key=lambda r: r["cell"]["seed"])]
                              if all("classifier_acc" in r for r in rs) else None}
                for images, rs in sorted(cells.items())}
        aaip = [r for r in finals if r["cell"]["schedule"] == f"aaip-{method}" and "schedule_stages" in r]
        if aaip:
            entry["aaip_stages"] = aaip[0]["schedule_stages"]
        # a schedule that trains as an earlier one does is that schedule's rows; cells it ran anyway
        # (before the plan knew) are compared with that schedule's, seed by seed
        from effkern.schedules import get_schedule

        entry["same_as"] = {}
        for alias, canonical in same_as(method).items():
            ran = entry["schedules"].pop(alias, {})
            entry["timing"].pop(alias, None)
            checks = []
            for images, v in ran.items():
                other = entry["schedules"].get(canonical, {}).get(images)
                common = sorted(set(v["seeds"]) & set(other["seeds"])) if other else []
                if common:
                    mine_knn, theirs = dict(zip(v["seeds"], v["knn_per_seed"])), dict(zip(other["seeds"],
                                                                                      other["knn_per_seed"]))
                    checks.append({"images": v["images"], "seeds": common,
                                   "max_abs_knn_diff": max(abs(mine_knn[s] - theirs[s]) for s in common)})
            stages = json.loads(get_schedule(trainer_schedule(method, alias)).to_json())["stages"]
            entry["same_as"][alias] = {"schedule": canonical, "stages": stages, "ran_anyway": checks}
        base = entry["schedules"].get("none", {})
        # the baseline curve: budgets with MIN_CURVE_SEEDS seeds (one seed would enter the bootstrap with no spread)
        base_curve = {v["images"]: v["knn_per_seed"] for v in base.values()
                      if len(v["knn_per_seed"]) >= MIN_CURVE_SEEDS}
        entry["baseline_curve_budgets"] = sorted(base_curve)
        means = [sum(base_curve[b]) / len(base_curve[b]) for b in sorted(base_curve)]
        entry["baseline_monotone"] = all(a < b for a, b in zip(means, means[1:]))
        for schedule, per_budget in entry["schedules"].items():
            if schedule == "none":
                continue
            for v in per_budget.values():
                if len(base_curve) >= 2 and len(v["knn_per_seed"]) >= 2:
                    v["compute_saved"] = compute_saved(base_curve, v["knn_per_seed"], v["images"])
                    ratio = entry["timing"].get(schedule, {}).get("time_per_unit_ratio")
                    if ratio is not None:  # the step-time ratio of the timing cell (a point value, no interval)
                        v["wall_clock_saved"] = v["compute_saved"]["factor"] * ratio
                        v["wall_clock_interval"] = [f * ratio for f in v["compute_saved"]["interval"]]
                    # the same inversion on the linear probe's curve (a check that the factor is not a kNN
                    # artefact) and, for a supervised run, on its classifier's top-1 (EfficientTrain++'s metric)
                    for key in ("probe", "classifier"):
                        curve = {b["images"]: b[f"{key}_per_seed"] for b in base.values()
                                 if b["images"] in base_curve and b.get(f"{key}_per_seed")}
                        if len(curve) == len(base_curve) and len(v.get(f"{key}_per_seed") or []) >= 2:
                            v[f"compute_saved_{key}"] = compute_saved(curve, v[f"{key}_per_seed"], v["images"])
                else:
                    v["compute_saved"] = None  # needs >= 2 baseline budgets and >= 2 seeds
        summary["methods"][method] = entry
    return summary


def write_plot(summary: dict, path: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m, e in summary["methods"].items() if e["schedules"]]
    if not methods:
        return None
    fig, axes = plt.subplots(2, len(methods), figsize=(5 * len(methods), 7), squeeze=False)
    for col, method in enumerate(methods):
        entry = summary["methods"][method]
        for row, key in enumerate(("knn", "probe")):
            ax = axes[row][col]
            for schedule, per_budget in entry["schedules"].items():
                pts = [(v["epochs_equivalent"], v[key]) for v in per_budget.values() if v.get(key)]
                if not pts:
                    continue
                ax.errorbar([p[0] for p in pts], [100 * p[1]["mean"] for p in pts],
                            yerr=[100 * (p[1]["std"] if p[1]["n"] > 1 else 0.0) for p in pts],
                            marker="o", capsize=3, label=schedule)
            ref = entry["reference"].get("test", {})
            for k, style in ((f"random_init_{key}", ":"), (f"pixels_{key}", "--")):
                if k in ref:
                    ax.axhline(100 * ref[k]["mean"], ls=style, color="grey", label=k.replace("_", " "))
            ax.set_xscale("log", base=2)
            ax.set_xticks([b / TRAIN_IMAGES for b in BUDGET_IMAGES],
                          [f"{b / TRAIN_IMAGES:.1f}\n({b // 1000}k)" for b in BUDGET_IMAGES])
            ax.minorticks_off()
            ax.set(title=f"{method}: {'kNN' if key == 'knn' else 'linear probe'} (test)",
                   xlabel="budget (epochs-equivalent of the baseline, 60k images)", ylabel="top-1 (%)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _pct(stats: dict | None) -> str:
    if not stats:
        return "-"
    if stats["n"] > 1:
        return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f} (n={stats['n']})"
    return f"{100 * stats['mean']:.2f} (n=1)"


def _shown(summary: dict) -> list[str]:
    """Plain statements of what the finished cells show (and do not)."""
    out = []
    for method in METHODS:
        entry = summary["methods"].get(method)
        if entry is None:
            out.append(f"{method}: no finished cell; nothing is shown (the papers' claim: {PAPERS[method]}).")
            continue
        base = entry["schedules"].get("none", {})
        ref = entry["reference"].get("test", {}).get("random_init_knn")
        if base and ref:
            best = max(v["knn"]["mean"] for v in base.values())
            out.append(f"{method}: the baseline's best test kNN {100 * best:.2f}% vs the random network's "
                       f"{100 * ref['mean']:.2f}% ({'above' if best > ref['mean'] else 'NOT above'} it).")
        curve = entry.get("baseline_curve_budgets", [])
        if len(curve) >= 2 and not entry.get("baseline_monotone", True):
            out.append(f"{method}: the baseline's mean kNN does not rise with every budget on its curve "
                       f"({', '.join(f'{b // 1000}k' for b in curve)}); the curve is flattened to the best so far, "
                       "so a factor read past the dip rests on seed noise.")
        factors = [(s, v) for s, per in entry["schedules"].items() if s != "none" for v in per.values()
                   if v.get("compute_saved")]
        for schedule, v in factors:
            cs = v["compute_saved"]
            where = f"{method} {schedule} at {v['epochs_equivalent']:.1f} epochs-eq."
            if _beyond_curve(cs):
                out.append(f"{where}: its kNN is above the baseline's at every budget on the curve, none of them "
                           f"larger than its own: no factor yet (needs a larger baseline budget with "
                           f">= {MIN_CURVE_SEEDS} seeds).")
                continue
            if cs["bound"] == ">":  # above the largest baseline budget's kNN: only a lower bound
                out.append(f"{where}: its kNN is above the baseline's at {max(curve) // 1000}k, the largest budget "
                           f"on the curve, so the factor is only bounded: >= {cs['factor']:.2f}x "
                           f"({100 * cs['censored_fraction']:.0f}% of the bootstrap draws censored; over "
                           f"{v['knn']['n']} seeds; paper: {paper_claim(method, schedule)}).")
                continue
            if cs["bound"] == "<=":  # the smallest baseline budget already matches it
                out.append(f"{where}: the baseline's smallest budget already matches it: factor <= "
                           f"{cs['factor']:.2f}x over {v['knn']['n']} seeds (paper: {paper_claim(method, schedule)}).")
                continue
            verdict = ("saves compute" if cs["interval"][0] > 1 else "costs compute" if cs["interval"][1] < 1
                       else "is not distinguishable from the baseline")
            probe, top1 = v.get("compute_saved_probe"), v.get("compute_saved_classifier")
            out.append(f"{where}: factor {cs['factor']:.2f}x, 90% bootstrap interval {_interval_text(cs)} over "
                       f"{v['knn']['n']} seeds ({100 * cs['censored_fraction']:.0f}% of the draws censored): it "
                       f"{verdict} at this scale (paper: {paper_claim(method, schedule)})"
                       + (f"; by the linear probe {_factor_text(probe)}" if probe else "")
                       + (f"; by the classifier's top-1 {_factor_text(top1)}" if top1 else "") + ".")
        for alias, same in entry.get("same_as", {}).items():
            out.append(f"{method} {alias}: {_same_as_text(alias, same)}")
        if not factors:
            out.append(f"{method}: no compute-saved factor yet (it needs the baseline at >= 2 budgets and the "
                       f"compressed schedule, >= 2 seeds each, on the test split); no saving is claimed.")
    return out


BOUND_PREFIX = {"=": "", "<=": "<= ", ">": ">= "}


def _beyond_curve(cs: dict) -> bool:
    """A lower bound of at most 1x: the schedule beats every baseline budget on the curve, none larger
    than its own budget, so the bound says nothing."""
    return cs["bound"] == ">" and cs["factor"] <= 1 + 1e-9


def _interval_text(cs: dict, scale: float = 1.0) -> str:
    """'[lo, hi]' of a compute_saved interval; an end set by a censored draw is open: '>= lo' /
    'inf)' above the curve, '<= ' below it."""
    (lo, hi), (blo, bhi) = cs["interval"], cs.get("interval_bounds", ["=", "="])
    left = BOUND_PREFIX[blo] + f"{scale * lo:.2f}"
    right = "inf)" if bhi == ">" else BOUND_PREFIX[bhi] + f"{scale * hi:.2f}]"
    return f"[{left}, {right}"


def _factor_text(cs: dict | None) -> str:
    """'2.97x [2.76, 3.16]' / '>= 2.00x [>= 2.00, inf)' of a compute_saved result; '-' for none."""
    if not cs:
        return "-"
    if _beyond_curve(cs):
        return "not yet"
    return f"{BOUND_PREFIX[cs['bound']]}{cs['factor']:.2f}x {_interval_text(cs)}"


def _stages_text(stages: list[dict]) -> str:
    """``[{"start": 0.0, "stage": {...}}, ...]`` -> '0: patch 4 keep 0.25; 0.625: patch 4 keep 1'."""
    parts = []
    for s in stages:
        st = s["stage"]
        keep = st.get("keep", {}).get("default", 1.0) if isinstance(st.get("keep"), dict) else st.get("keep")
        patch = f"patch {st['patch_size']}" if st.get("patch_size") else "native patch"
        parts.append(f"{s['start']:g}: {patch} keep {keep:g}")
    return "; ".join(parts)


def _same_as_text(alias: str, same: dict) -> str:
    """One sentence: ``alias`` trains as ``same["schedule"]`` does, and what its cells that ran anyway showed."""
    canonical = same["schedule"]
    text = (f"the same training as `{canonical}` (stages {_stages_text(same['stages'])}), so it has no cells of "
            "its own: " + ("its factor is 1 by construction." if canonical == "none"
                           else f"its numbers and factors are `{canonical}`'s rows."))
    for c in same.get("ran_anyway", []):
        diff = c["max_abs_knn_diff"]
        text += (f"  Its {c['images'] / TRAIN_IMAGES:.1f} epochs-eq. cells ran before the study checked this; over "
                 f"{len(c['seeds'])} seeds their test kNN " + ("equals" if diff == 0 else
                                                               f"differs by up to {100 * diff:.2f} points from")
                 + f" `{canonical}`'s, seed for seed.")
    return text


def _search_reference_text(method: str, searches: str, results: str) -> str:
    """What the search's reference run was (``<method>/reference_config.json``, the trainer config the
    derive script keeps) and whether its batch size / LR are the method's own tuned 192k winner."""
    cfg = search_reference_config(method, searches)
    if cfg is None:
        return f"the {method} baseline, its settings not recorded"
    batch, lr = cfg["batch_size"], cfg["lr"]
    text = (f"the {method} baseline of {cfg['epochs_equivalent']:g} epochs-equivalent, batch {batch}, "
            f"--lr {lr:g} per 256 images")
    tuned = tuned_hp(method, ANCHOR_IMAGES, results)
    if tuned is None:
        return text + (f" (whether these are {method}'s own best is not known yet: its tuning grid at "
                       f"{ANCHOR_IMAGES // 1000}k has not finished)")
    if (tuned[0], tuned[1]) == (batch, lr):
        return text + f" ({method}'s own tuned {ANCHOR_IMAGES // 1000}k batch size and LR)"
    return text + (f" (not {method}'s own tuned {ANCHOR_IMAGES // 1000}k values, batch {tuned[0]} / "
                   f"--lr {tuned[1]:g}: its `{REDERIVED}` cells wait until the search is re-run at those)")


def _search_section(method: str, entry: dict, searches: str = SEARCH_RESULTS, results: str = RESULTS) -> list[str]:
    """The AAIP search re-run at the study's scale (benchmarks/derive_aaip_presets.sh ->
    benchmarks/results/aaip_search/<method>/n<N>/), beside the stages the study's aaip cells ran."""
    base = os.path.join(searches, method)
    runs = []
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        path = os.path.join(base, name, "search.json")
        if os.path.exists(path):
            with open(path) as f:
                runs.append((name, json.load(f)))
    if not runs:
        return []
    runs.sort(key=lambda r: r[1]["n"])
    L = [f"AAIP search re-run at this scale (`benchmarks/derive_aaip_presets.sh`; reference run: "
         f"{_search_reference_text(method, searches, results)}, seed 0, checkpoints at 0 / 25 "
         "/ 50 / 75 / 100 % of it; CA-MSE = bias^2 + cost * Var / n of every patch x keep candidate; the "
         "monotone-decompression rule):", "",
         "| n | minibatches x draws | stages chosen (progress: stage) |", "|---|---|---|"]
    for name, d in runs:
        L.append(f"| {d['n']:g} | {d['n_batches']} x {d['repeats']} | {_stages_text(d['schedule']['stages'])} |")
    for _, d in runs:
        points = [rows[0]["progress"] for rows in d["rows"]]
        ref_best = [rows[0]["progress"] for rows in d["rows"]
                    if any(r.get("argmin") and abs(r.get("cost", 0.0) - 1.0) < 1e-9 for r in rows)]
        L.append("")
        L.append(f"At n = {d['n']:g} the uncompressed candidate (cost 1) has the lowest CA-MSE at progress "
                 f"{', '.join(f'{p:g}' for p in ref_best) or 'none'} (checkpoints: "
                 f"{', '.join(f'{p:g}' for p in points)}).")
        uncompressed = {r.get("name") for rows in d["rows"] for r in rows if abs(r.get("cost", 0.0) - 1.0) < 1e-9}
        if all(st["stage"].get("name") in uncompressed for st in d["schedule"]["stages"]):
            L.append(f"So the n = {d['n']:g} search's schedule is the uncompressed baseline itself: by this "
                     "criterion no compression pays at this scale, and its factor is 1 by construction (not run).")
    if any(d["n"] == 1 for _, d in runs):
        L += ["", f"The study's `{REDERIVED}` cells run the n = 1 schedule."]
    used = entry.get("aaip_stages")
    if used and f"aaip-{method}" not in entry.get("same_as", {}):  # an alias's stages are stated with it
        L += ["", f"The study's `aaip-{method}` cells ran the package preset: {_stages_text(used)}."]
    rel = os.path.relpath(base, os.path.dirname(REPORT))
    name = runs[0][0]
    L += ["", f"CA-MSE, bias^2 and cost-adjusted variance per checkpoint (n = {runs[0][1]['n']:g}): "
          + ", ".join(f"[progress {p:g}]({rel}/{name}/heatmap_{k}.png)"
                      for k, p in enumerate(r[0]["progress"] for r in runs[0][1]["rows"]))
          + f"; full tables in `{rel}/n<n>/search.md`.", ""]
    return L


def write_report(summary: dict, cells_total: dict, path: str = REPORT) -> None:
    """docs/results.md from summary.json: only what the finished cells show."""
    L = ["# Results: compute saved at equal accuracy (small-scale study)", "",
         "Generated by `python benchmarks/study.py summarize` from the finished cells in "
         "`benchmarks/results/study/` (one JSON per cell, `summary.json`).  The study and its method are "
         "described in `benchmarks/study.py`; this page states only what the finished cells show.", "",
         "**Setting.** Fashion-MNIST, 60k training / 10k test images at 28 px; a ViT with 4 px patches, 4 "
         "blocks, width 128 (the small-image preset), randomly initialised; the small-image augmentation "
         "preset; AdamW, peak LR by the square-root rule, 10 % warm-up, cosine decay; budgets of "
         f"{', '.join(f'{b // 1000}k' for b in BUDGET_IMAGES)} baseline images "
         f"({', '.join(f'{b / TRAIN_IMAGES:.1f}' for b in BUDGET_IMAGES)} epochs-equivalent; a 768k budget "
         "was dropped before it ran, for its ~14 CPU-hours: a compressed schedule that beats the largest "
         "baseline budget gets a lower bound, not a point estimate).  "
         f"Hyper-parameters (batch size {' / '.join(map(str, GRID_BATCH))} x LR "
         f"{' / '.join(f'{lr:g}' for lr in sorted(GRID_LR))} per 256 images) are chosen per "
         "budget on a 5k validation split carved from the training set, by the validation kNN (supervised: by "
         "its classifier's top-1): the whole grid at 192k; at the other budgets the cross through the 192k "
         "winner, 5 of the 9 cells, minus points with fewer than 1500 optimizer steps; a winner on the edge of "
         f"its row or column adds the next point past it (LR or batch x2 / /2, {MAX_EDGE_STEPS} times at most).  "
         "The test split "
         "is only used by the final cells.  kNN: k=20, T=0.07, cosine, on the "
         "CLS feature; linear probe: L-BFGS logistic regression on standardised frozen features.", "",
         "**Scale.** The papers' claims (ImageNet, ViT-B, 100-300 epochs: AAIP 4x / 3.3x / 2.5x less compute "
         "for MoCo v3 / SimCLR / DINO; EfficientTrain++ 1.5-3x) are about a scale this study does not reach. "
         "A factor measured here says what the schedules do on a 28 px, 4-block ViT trained for a few epochs "
         "on 2 CPU cores, nothing more.", ""]
    L += ["## Status", "", "| method | cells finished | cells planned |", "|---|---|---|"]
    for method, (done, total) in cells_total.items():
        L.append(f"| {method} | {done} | {total} |")
    L.append("")
    L += ["## What is shown and what is not", ""] + [f"- {line}" for line in _shown(summary)] + [""]
    L += ["## Continuing the study", "",
          "The grid takes many CPU-hours; it runs in resumable pieces.  `python benchmarks/study.py plan` lists "
          "every cell as done / todo / blocked (final cells wait for their budget's tuning grid; the "
          f"`{REDERIVED}` cells also wait until the AAIP search has been re-run on the method's own tuned "
          "192k baseline: `benchmarks/derive_aaip_presets.sh` takes those settings from `python "
          "benchmarks/study.py tuned --method <method>`); "
          "`nice -n 15 python benchmarks/study.py run --method mocov3 --threads 1` runs the next cells in order "
          "(finished cells are skipped, an interrupted training cell resumes from its last checkpoint in "
          "`runs/study/`).  On a machine with N cores, start N such runners: each claims a cell before it "
          "runs it (`runs/study/.claims/`), so no two train the same cell.  Several methods (`--method "
          "supervised mocov3`) are a priority order: a runner whose first method's remaining cells wait for "
          "another runner's results takes the next method's cell meanwhile, and polls only when no listed "
          "method has a runnable cell.  Commit the new JSONs in "
          "`benchmarks/results/study/` and regenerate this page with `python benchmarks/study.py summarize`.", ""]
    for method, entry in summary["methods"].items():
        L += [f"## {method}", ""]
        if entry["reference"]:
            L += ["Reference points (no training):", "", "| split | raw pixels kNN | random-init kNN | "
                  "raw pixels probe | random-init probe |", "|---|---|---|---|---|"]
            for split, ref in sorted(entry["reference"].items()):
                L.append(f"| {split} | {_pct(ref.get('pixels_knn'))} | {_pct(ref.get('random_init_knn'))} | "
                         f"{_pct(ref.get('pixels_probe'))} | {_pct(ref.get('random_init_probe'))} |")
            L.append("")
        if entry["tune"]:
            has_top1 = any(t.get("val_classifier") is not None for t in entry["tune"])
            ranked = "classifier top-1" if tune_metric(method) == "classifier_acc" else "kNN"
            L += [f"Tuning of the baseline (validation split, seed 0; each budget's winner: the best val {ranked}):",
                  "", "| budget (images) | batch | --lr (per 256, sqrt rule) | steps | val kNN | val probe |"
                  + (" val classifier top-1 |" if has_top1 else ""),
                  "|---|---|---|---|---|---|" + ("---|" if has_top1 else "")]
            for t in sorted(entry["tune"], key=lambda t: (t["images"], t["batch"], t["lr"])):
                probe = f"{100 * t['val_probe']:.2f}" if t.get("val_probe") is not None else "-"
                top1 = (f" {100 * t['val_classifier']:.2f} |" if t.get("val_classifier") is not None else " - |") \
                    if has_top1 else ""
                L.append(f"| {t['images'] // 1000}k | {t['batch']} | {t['lr']:g} | {t['steps']} | "
                         f"{100 * t['val_knn']:.2f} | {probe} |{top1}")
            L.append("")
        if entry["schedules"]:
            top1 = any(v.get("classifier") for per in entry["schedules"].values() for v in per.values())
            L += ["Final cells (test split):", "",
                  "| schedule | budget (epochs-eq.) | batch | lr | steps | kNN % (mean ± std over seeds) | "
                  "probe % | " + ("classifier top-1 % | " if top1 else "")
                  + "compute saved (kNN) [90% bootstrap] | wall-clock saved | compute saved (probe) |"
                  + (" compute saved (classifier top-1) |" if top1 else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|" if top1 else "") + "---|---|"
                  + ("---|" if top1 else "")]
            for schedule, per_budget in entry["schedules"].items():
                for v in per_budget.values():
                    cs = v.get("compute_saved")
                    wall = "-"
                    if cs and _beyond_curve(cs):
                        saved = "not yet (above the baseline at every budget on its curve, none larger)"
                    elif cs:
                        saved = _factor_text(cs)
                        if "wall_clock_saved" in v:  # the compute factor times the step-time ratio: same bounds
                            ratio = v["wall_clock_saved"] / cs["factor"]
                            wall = (f"{BOUND_PREFIX[cs['bound']]}{v['wall_clock_saved']:.2f}x "
                                    f"{_interval_text(cs, ratio)}")
                    else:
                        saved = "-" if schedule == "none" else (
                            f"not yet ({v['knn']['n']} seed; needs 2)" if v["knn"]["n"] < 2 else
                            f"not yet (needs 2 baseline budgets with {MIN_CURVE_SEEDS}+ seeds)")
                    cls = f"{_pct(v.get('classifier'))} | " if top1 else ""
                    L.append(f"| {schedule} | {v['epochs_equivalent']:.1f} | {v['batch']} | {v['lr']:g} | "
                             f"{'/'.join(map(str, v['steps']))} | {_pct(v['knn'])} | {_pct(v['probe'])} | "
                             f"{cls}{saved} | {wall} | {_factor_text(v.get('compute_saved_probe'))} |"
                             + (f" {_factor_text(v.get('compute_saved_classifier'))} |" if top1 else ""))
            curve = entry.get("baseline_curve_budgets", [])
            L += ["", "Compute saved: the baseline budget whose kNN the schedule's mean kNN matches (linear in "
                  "log2 budget on the baseline's mean curve, flattened to the best so far) / the schedule's "
                  f"budget.  Baseline budgets on the curve ({MIN_CURVE_SEEDS}+ seeds): "
                  f"{', '.join(f'{b // 1000}k' for b in curve) or 'none yet'}.  '>= x' is a lower bound (the "
                  "schedule beats the largest budget on the curve); an interval end written '>= x' or 'inf)' "
                  "comes from censored bootstrap draws.  The interval is a percentile bootstrap over seeds "
                  "(every cell's seeds resampled independently, 2000 draws); with 3 seeds per cell it has few "
                  "distinct resamples and under-covers: read it as the seeds' spread carried through the "
                  "inversion, not as a calibrated 90% confidence interval.  Wall-clock saved = compute saved x "
                  "the step-time ratio of the timing table below (one interleaved measurement, no interval of "
                  "its own).  'compute saved (probe)' inverts the linear probe's curve the same way: a check that "
                  "the factor is not an artefact of the kNN"
                  + ("; 'compute saved (classifier top-1)' inverts the curve of the trained classifier's own "
                     "top-1, the metric EfficientTrain++ reports." if top1 else "."), ""]
        for alias, same in entry.get("same_as", {}).items():
            L += [f"`{alias}`: {_same_as_text(alias, same)}", ""]
        if entry.get("superseded_finals"):
            L += [f"Superseded final cells (run at a batch size / LR that a later tune cell beat; not counted): "
                  f"{', '.join(f'`{c}`' for c in entry['superseded_finals'])}.", ""]
        if entry["timing"]:
            L += ["Step times, measured interleaved (baseline and schedule steps alternating in one process, "
                  "medians per stage; training steps only, data loading excluded) at the 192k budget and its "
                  "tuned batch size, turned into the whole budget's training time:", "",
                  "| schedule | steps (baseline) | predicted training s (baseline) | time per unit of budget, "
                  "baseline / schedule |", "|---|---|---|---|"]
            for schedule, t in sorted(entry["timing"].items()):
                if "seconds" in t:
                    L.append(f"| {schedule} | {t['steps']} ({t['baseline_steps']}) | {t['seconds']:.0f} "
                             f"({t['baseline_seconds']:.0f}) | {t['time_per_unit_ratio']:.2f}x |")
                elif "time_per_unit_ratio" in t:
                    L.append(f"| {schedule} | - | - | {t['time_per_unit_ratio']:.2f}x |")
            L += ["", "Below 1x the schedule turns a unit of compute into more seconds than the baseline does "
                  "(per-step work outside the FLOP model, paid on more, smaller steps).", ""]
        if not entry["schedules"]:
            L += ["No final (test-split) cell has finished: **nothing about compute saved is shown yet** for "
                  f"{method}.  The papers' factor to compare with: {PAPERS[method]}.", ""]
        L += _search_section(method, entry)
    if os.path.exists(os.path.join(os.path.dirname(path), "results_knn_vs_budget.png")) and any(
            e["schedules"] for e in summary["methods"].values()):
        L += ["![kNN and linear probe vs budget, seed error bars](results_knn_vs_budget.png)", ""]
    with open(path, "w") as f:
        f.write("\n".join(L))


def _runnable(method: str, args) -> list[dict]:
    """``method``'s cells that can run now, in plan order, restricted to ``args.stage`` and ``args.only``."""
    todo = [c for c in pending(plan(method, args.results), args.results) if c["kind"] in args.stage
            and (args.only is None or cell_id(c) == args.only)]
    if not todo and args.only is not None:  # a tune cell named explicitly: its HPs are in its id
        todo = [c for c in plan(method, args.results) if c["kind"] == "tune" and c["kind"] in args.stage
                and cell_id(c) == args.only and load_result(c, args.results) is None]
    return todo


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cmd", choices=("plan", "run", "summarize", "tuned", "method-args"),
                   help="tuned: print the first --method's tuned batch size and LR at the 192k anchor budget; "
                   "method-args: print its method hyper-parameters as `effkern` --method-arg KEY=VALUE words")
    p.add_argument("--method", nargs="+", default=["mocov3"], choices=METHODS,
                   help="methods in priority order: a runner takes the first one's next runnable cell, else the "
                   "next method's")
    p.add_argument("--stage", nargs="+", default=["reference", "tune", "final", "timing"],
                   choices=("reference", "tune", "final", "timing"))
    p.add_argument("--max-cells", type=int, default=None, help="stop after this many cells")
    p.add_argument("--only", default=None, help="run only the cell with this id (see plan)")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--poll", type=float, default=30.0, help="seconds between looks for work while other "
                   "runners hold every runnable cell (several runners may share the grid: cells are claimed)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (on a machine shared with "
                   "other jobs, 1 is several times faster than 2: OpenMP waits at every op)")
    args = p.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.cmd == "summarize":
        summary = summarize(args.results)
        os.makedirs(args.results, exist_ok=True)
        with open(os.path.join(args.results, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
        write_plot(summary, os.path.join(os.path.dirname(REPORT), "results_knn_vs_budget.png"))
        totals = {}
        for method in METHODS:
            cells = plan(method, args.results)
            done = sum(load_result(c, args.results) is not None for c in cells)
            totals[method] = (done, len(cells))
        write_report(summary, totals, REPORT)
        print(f"wrote {args.results}/summary.json and {REPORT}")
        return 0
    if args.cmd == "tuned":
        hp = tuned_hp(args.method[0], ANCHOR_IMAGES, args.results)
        if hp is None:
            print(f"study.py: {args.method[0]}'s tuning grid at {ANCHOR_IMAGES // 1000}k has not finished",
                  file=sys.stderr)
            return 1
        print(f"{hp[0]} {hp[1]:g}")
        return 0
    if args.cmd == "method-args":
        print(" ".join(f"{k}={json.dumps(v)}" for k, v in METHOD_KWARGS[args.method[0]].items()))
        return 0
    if args.cmd == "plan":
        for method in args.method:
            for c in (c for c in plan(method, args.results) if c["kind"] in args.stage):
                status = "done" if load_result(c, args.results) else ("blocked" if "blocked" in c else "todo")
                why = f"  (waits for: {c['blocked']})" if status == "blocked" else ""
                print(f"{status:8s} {cell_id(c)}{why}")
        return 0
    ran = 0
    while args.max_cells is None or ran < args.max_cells:
        # the methods are a priority order: the first one's next runnable cell, else the next
        # method's (a core is never left idle while another runner finishes the cell that
        # unblocks the first method's finals); re-planned after every cell
        cell = next((c for method in args.method for c in _runnable(method, args) if claim(c)), None)
        if cell is None:
            if args.only is None and any(others_running(m) for m in args.method):
                # the other runners' cells are running, or their results will unblock final cells
                time.sleep(args.poll)
                continue
            break
        try:
            if load_result(cell, args.results) is not None:  # finished by another runner meanwhile
                continue
            print(f"== {cell_id(cell)}  ({time.strftime('%H:%M:%S')})", flush=True)
            t0 = time.time()
            result = run_cell(cell)
            result.setdefault("process_wall_s", time.time() - t0)
            result["threads"] = _threads()
            print(f"   -> {write_result(cell, result, args.results)}", flush=True)
            ran += 1
        finally:
            release(cell)
    return 0


if __name__ == "__main__":
    sys.exit(main())
