"""The AAIP schedule search against the trainer: load checkpoints into a Run, estimate the
CA-MSE of every candidate stage with effkern.schedules.search, pick a monotone schedule,
write tables, heatmaps and the schedule JSON.  See docs/schedules_search.md.

``search(run_factory, checkpoints, candidates, ...) -> Schedule`` (or {n: Schedule} for
several n from one estimation); ``make_grad_fn`` turns a
loaded Run into the ``grad_fn`` the estimator samples; ``param_groups`` names the slices of
the flat gradient.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import numbers
import os
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from effkern.schedules.search import estimate, grad_seed, monotone_choice, rescore, stage_label
from effkern.schedules.stage import Schedule, Stage
from effkern.train import checkpoint as ckpt
from effkern.train.data import make_loader

__all__ = ["search", "check_ns", "n_dir", "make_grad_fn", "param_groups"]


def param_groups(named_params: Sequence[tuple[str, Tensor]]) -> dict[str, slice]:
    """name -> slice of the flat gradient, grouped by top-level module ("encoder.blocks",
    "encoder.patch_embed", "projector", ...): two name components under "encoder", else one.
    Parameters of a group must be contiguous in ``named_params`` (true for module order)."""
    groups: dict[str, list[int]] = {}
    offset = 0
    for name, p in named_params:
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "encoder" and len(parts) > 2 else parts[0]
        span = groups.setdefault(key, [offset, offset])
        if span[1] != offset:
            raise ValueError(f"parameters of group {key!r} are not contiguous")
        span[1] = offset + p.numel()
        offset += p.numel()
    return {k: slice(a, b) for k, (a, b) in groups.items()}


def make_grad_fn(run, progress: float, n_batches: int, seed: int, ref_stage: Stage):
    """(grad_fn, groups, n_batches) for one loaded Run: batches of epoch 0 (cached, made with
    the reference stage's RandAugment magnitude), one forward/backward per call, the
    method's buffers (BN statistics, DINO center, ...) and the global RNG restored after it."""
    run.randaug.set(ref_stage.randaug_magnitude)
    loader = make_loader(run.dataset, run.local_batch, 0, seed)
    batches = list(itertools.islice(iter(loader), n_batches))
    named = run.method.trainable_named_parameters()
    params = [p for _, p in named]
    groups = param_groups(named)

    def grad_fn(stage, b, r, generator):
        views, labels = batches[b]
        method = run.method
        was_training = method.training
        method.train(True)
        buffers = {k: v.detach().clone() for k, v in method.named_buffers()}
        attrs = {k: v for k, v in vars(method).items() if isinstance(v, (int, float)) and k != "training"}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(grad_seed(seed, b, r) % (1 << 62))
            method.zero_grad(set_to_none=True)
            x = run._prepare(views, stage)
            loss, _ = method.training_step(x, labels.to(run.device), stage, progress, generator=generator)
            loss.backward()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                          for p in params]).cpu()
        method.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, v in method.named_buffers():
                v.copy_(buffers[k])
        vars(method).update(attrs)
        method.train(was_training)
        return flat

    return grad_fn, groups, len(batches)


def search(run_factory: Callable[[], Any], checkpoints: Sequence[tuple[float, str | None]],
           candidates: Sequence[Stage], n_batches: int = 4, repeats: int = 4, seed: int = 0,
           out_dir: str = "search", ref_stage: Stage | None = None, n: float | Sequence[float] = 1.0,
           name: str = "aaip", plots: bool = True) -> Schedule | dict[float, Schedule]:
    """AAIP search: CA-MSE of every candidate at every checkpoint -> a monotone schedule.

    checkpoints: [(progress, path or None)], path a checkpoint file (or a run directory
    holding checkpoint.pt) whose "method" state_dict is loaded; None = the fresh init.
    Writes schedule.json, search.csv, search.md, search.json and (``plots``) heatmap_<k>.png
    per checkpoint into out_dir; returns the Schedule (stage k starts at the midpoint
    between checkpoint k-1 and k; consecutive equal choices are merged).  ``n`` a sequence
    of values: the gradients are estimated once and each n's table, choice and files go to
    ``out_dir/n<n>/``; returns {n: Schedule}.
    """
    if not checkpoints or not candidates:
        raise ValueError("need at least one checkpoint and one candidate")
    several = not isinstance(n, numbers.Real)  # a number (numpy's too) or a sequence of them
    ns = check_ns(n if several else [n])
    ref_stage = ref_stage if ref_stage is not None else Stage(name="ref")
    checkpoints = sorted(((float(p), c) for p, c in checkpoints), key=lambda t: t[0])
    os.makedirs(out_dir, exist_ok=True)
    run = run_factory()
    init_state = copy.deepcopy(run.method.state_dict())
    ref_cost = run.step_cost(ref_stage)
    labels = [c.name or stage_label(c) for c in candidates]
    if len(set(labels)) != len(labels):
        raise ValueError(f"candidate names must be unique, got {labels}")
    strategies = {lab: (c, run.step_cost(c) / ref_cost) for lab, c in zip(labels, candidates)}
    tables = []
    for progress, path in checkpoints:
        if path is None:
            state = init_state
        else:
            file = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
            state = ckpt.read(file, map_location=run.device)["method"]  # CheckpointError naming a bad file
        run.method.load_state_dict(state)
        grad_fn, groups, nb = make_grad_fn(run, progress, n_batches, seed, ref_stage)
        rows = estimate(grad_fn, strategies, ref_stage, nb, repeats, seed, n=ns[0], groups=groups)
        for r in rows:
            r.update(progress=progress, checkpoint=path)
        tables.append(rows)
    settings = {"ref_stage": ref_stage.to_dict(), "n_batches": n_batches, "repeats": repeats, "seed": seed}
    schedules = {}
    for v in ns:
        where = n_dir(out_dir, v) if several else out_dir
        schedules[v] = _choose(tables if v == ns[0] else [rescore(rows, v) for rows in tables], checkpoints,
                               run.model_cfg.patch_size, name, where, plots, {**settings, "n": v})
    return schedules if several else schedules[ns[0]]


def check_ns(ns: Sequence[float], what: str = "n") -> list[float]:
    """``ns`` as floats; ValueError naming ``what`` unless they are one or more distinct values > 0."""
    values = [float(v) for v in ns]
    if not values or any(not v > 0 for v in values) or len(set(values)) != len(values):
        raise ValueError(f"{what} must be one or more distinct values > 0, got {' '.join(f'{v:g}' for v in values)}")
    return values


def n_dir(out_dir: str, n: float) -> str:
    """Where a search over several n writes the files of one n: ``out_dir/n<n>``."""
    return os.path.join(out_dir, f"n{n:g}")


def _choose(tables: list[list[dict]], checkpoints: Sequence[tuple[float, str | None]], native: int, name: str,
            out_dir: str, plots: bool, settings: dict) -> Schedule:
    """The monotone schedule of one n's tables; writes its files into out_dir."""
    chosen = monotone_choice(tables)
    for rows, pick in zip(tables, chosen):
        for r in rows:
            r["chosen"] = r is pick or r["name"] == pick["name"]
        r_min = min(rows, key=lambda r: r["camse"])
        for r in rows:
            r["argmin"] = r is r_min
    stages: list[tuple[float, Stage]] = []
    prev = None
    for k, ((progress, _), pick) in enumerate(zip(checkpoints, chosen)):
        start = 0.0 if k == 0 else (checkpoints[k - 1][0] + progress) / 2
        stage = _portable(pick["stage"], native)
        if stage != prev:
            stages.append((start, stage))
            prev = stage
    schedule = Schedule(name, stages)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "schedule.json"), "w") as f:
        f.write(schedule.to_json())
    from effkern.schedules.search_plot import write_heatmaps, write_tables

    write_tables(tables, out_dir)
    if plots:
        write_heatmaps(tables, out_dir)
    with open(os.path.join(out_dir, "search.json"), "w") as f:
        json.dump({"ref_stage": settings["ref_stage"], "n": settings["n"], "n_batches": settings["n_batches"],
                   "repeats": settings["repeats"], "seed": settings["seed"],
                   "schedule": json.loads(schedule.to_json()),
                   "rows": [[_jsonable(r) for r in rows] for rows in tables]}, f, indent=1)
    return schedule


def _portable(stage: Stage, native_patch: int) -> Stage:
    """``stage`` with a patch size equal to the searched model's native one written as None
    (native): the schedule then means "the model's own patch size" on any model, not, say,
    patch 4 on a patch-16 model at 224 px (49x the tokens).  Other patch sizes stay absolute."""
    if stage.patch_size != native_patch:
        return stage
    native = dataclasses.replace(stage, patch_size=None)
    return dataclasses.replace(native, name=stage_label(native))


def _jsonable(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k != "stage"}
    out["stage"] = row["stage"].to_dict() if isinstance(row["stage"], Stage) else repr(row["stage"])
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
