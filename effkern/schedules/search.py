"""AAIP-style schedule search: pick, per training stage, the compression strategy whose
minibatch gradient has the lowest cost-adjusted MSE (CA-MSE).  See docs/schedules_search.md.

Estimator (model-agnostic, memory O(P) in the number of gradient coordinates P):

* ``GradientMoments``: Welford running mean / sum of squared deviations of flat gradients,
  optionally per named parameter group (name -> slice of the flat vector).
* ``camse(ref_mean, moments, cost, n)``: bias2 = ||E[g_s] - g*||^2, var = tr Var[g_s],
  cav = cost * var / n, camse = bias2 + cav (total and per group).
* ``estimate(grad_fn, strategies, ref_stage, n_batches, repeats, seed)``: the table.

Against the trainer: ``search(run_factory, checkpoints, candidates, ...) -> Schedule`` and
``candidate_grid(patch_sizes, keeps, branches, tied=True)``.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from effkern._seeding import mix_seed
from effkern.schedules.stage import Schedule, Stage

__all__ = ["GradientMoments", "camse", "estimate", "grad_seed", "candidate_grid", "param_groups",
           "make_grad_fn", "monotone_choice", "search"]

def grad_seed(seed: int, batch_index: int, repeat: int) -> int:
    """The 63-bit generator seed of draw ``repeat`` on batch ``batch_index`` (shared by all
    strategies: common random numbers make the comparison between strategies less noisy)."""
    return mix_seed(seed, batch_index, int(repeat) + 0x5EED)


# ----------------------------------------------------------------------------- moments

class GradientMoments:
    """Running mean and sum of squared deviations (Welford) of flat gradient vectors.

    Holds two float64 vectors of the gradient's length (mean, m2), whatever the number of
    updates; per-sample gradients are never stored.  ``groups``: name -> slice of the flat
    vector (e.g. from :func:`param_groups`) for the per-group statistics.
    """

    def __init__(self, groups: Mapping[str, slice] | None = None, dtype: torch.dtype = torch.float64):
        self.groups: dict[str, slice] = dict(groups or {})
        self.dtype = dtype
        self.count = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None

    def update(self, g: Tensor) -> None:
        g = g.detach().reshape(-1).to(self.dtype)
        if self._mean is None:
            for name, sl in self.groups.items():
                if not isinstance(sl, slice) or len(range(g.numel())[sl]) == 0:
                    raise ValueError(f"group {name!r}: {sl!r} selects nothing of a {g.numel()}-vector")
            self._mean = torch.zeros_like(g)
            self._m2 = torch.zeros_like(g)
        elif g.numel() != self._mean.numel():
            raise ValueError(f"gradient of {g.numel()} coordinates, expected {self._mean.numel()}")
        self.count += 1
        delta = g - self._mean
        self._mean.add_(delta, alpha=1.0 / self.count)
        self._m2.addcmul_(delta, g - self._mean)

    def _need(self) -> None:
        if self._mean is None:
            raise ValueError("no gradient seen yet")

    @property
    def mean(self) -> Tensor:
        self._need()
        return self._mean

    @property
    def m2(self) -> Tensor:
        """Per-coordinate sum of squared deviations from the running mean."""
        self._need()
        return self._m2

    @property
    def var(self) -> Tensor:
        """Per-coordinate unbiased variance (NaN with fewer than 2 updates)."""
        self._need()
        return self._m2 / (self.count - 1) if self.count > 1 else torch.full_like(self._m2, math.nan)

    @property
    def var_trace(self) -> float:
        """Sum over coordinates of the unbiased variance (NaN with fewer than 2 updates)."""
        self._need()
        return float(self._m2.sum()) / (self.count - 1) if self.count > 1 else math.nan

    def group_mean(self) -> dict[str, Tensor]:
        return {name: self.mean[sl] for name, sl in self.groups.items()}

    def group_var_trace(self) -> dict[str, float]:
        self._need()
        return {name: (float(self._m2[sl].sum()) / (self.count - 1) if self.count > 1 else math.nan)
                for name, sl in self.groups.items()}

    @property
    def nbytes(self) -> int:
        return 0 if self._mean is None else 2 * self._mean.numel() * self._mean.element_size()


# ----------------------------------------------------------------------------- CA-MSE

def _stats(diff: Tensor, var_sum: float, noise: float, count: int, cost: float, n: float) -> dict[str, float]:
    bias2_raw = float(diff.pow(2).sum())
    bias2 = bias2_raw - noise
    var = var_sum / (count - 1) if count > 1 else math.nan
    cav = cost * var / n
    return {"bias2": bias2, "bias2_raw": bias2_raw, "var": var, "cav": cav, "camse": bias2 + cav}


def camse(ref_mean: Tensor, moments: GradientMoments, cost: float, n: float = 1.0,
          mean_noise: Tensor | None = None) -> dict[str, Any]:
    """Cost-adjusted MSE of strategy s against the reference gradient g* (``ref_mean``).

    bias2 = ||E[g_s] - g*||^2 (E[g_s] = moments.mean), var = tr Var[g_s] (moments.var_trace),
    cav = cost * var / n, camse = bias2 + cav; n = the number of baseline minibatches of the
    budget the comparison is made at (equal compute: c_s per sample buys 1/c_s as many
    samples, so the averaged gradient's variance is c_s Var_s / n).  ``mean_noise``: optional
    per-coordinate variance of moments.mean as an estimate of E[g_s] (its sum is subtracted
    from bias2, which is then unbiased and may be slightly negative; bias2_raw keeps the
    plain value).  Returns the totals plus ``groups``: {name: the same keys} per group.
    """
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    mean = moments.mean
    ref = ref_mean.detach().reshape(-1).to(mean.dtype)
    if ref.numel() != mean.numel():
        raise ValueError(f"ref_mean has {ref.numel()} coordinates, moments {mean.numel()}")
    diff = mean - ref
    noise = mean_noise.to(mean.dtype) if mean_noise is not None else torch.zeros_like(mean)
    out: dict[str, Any] = _stats(diff, float(moments.m2.sum()), float(noise.sum()), moments.count, cost, n)
    out.update(cost=float(cost), count=moments.count)
    out["groups"] = {name: _stats(diff[sl], float(moments.m2[sl].sum()), float(noise[sl].sum()),
                                  moments.count, cost, n)
                     for name, sl in moments.groups.items()}
    return out


def estimate(grad_fn: Callable[[Any, int, int, torch.Generator], Tensor],
             strategies: Mapping[str, tuple[Any, float]], ref_stage: Any, n_batches: int, repeats: int,
             seed: int = 0, n: float = 1.0, groups: Mapping[str, slice] | None = None,
             debias: bool = True) -> list[dict[str, Any]]:
    """The CA-MSE table of ``strategies`` ({name: (stage, cost)}).

    grad_fn(stage, batch_index, repeat, generator) -> flat gradient of the minibatch loss.
    g* = mean over the n_batches batches of the reference gradient (repeat 0).  For each
    strategy, every batch gets ``repeats`` draws with fresh randomness (generators seeded by
    :func:`grad_seed`, the same images), all accumulated in one GradientMoments: its mean
    estimates E[g_s] and its variance the total variance of one compressed minibatch gradient
    (data sampling + compression).  With ``debias`` (and repeats >= 2) the compression noise of
    the paired estimate of the bias, mean_b sigma_b^2 / (n_batches * repeats), estimated from
    the pooled within-batch variance, is subtracted from bias2 (assumes a deterministic
    reference).  Rows: {name, stage, cost, count, bias2, bias2_raw, var, cav, camse, groups}.
    """
    if n_batches < 1 or repeats < 1:
        raise ValueError(f"need n_batches >= 1 and repeats >= 1, got {n_batches}, {repeats}")

    def gen(b: int, r: int) -> torch.Generator:
        return torch.Generator().manual_seed(grad_seed(seed, b, r))

    ref = GradientMoments(groups)
    for b in range(n_batches):
        ref.update(grad_fn(ref_stage, b, 0, gen(b, 0)))
    ref_mean = ref.mean.clone()
    del ref
    rows = []
    for name, (stage, cost) in strategies.items():
        total = GradientMoments(groups)
        within_m2 = None
        for b in range(n_batches):
            per_batch = GradientMoments()
            for r in range(repeats):
                g = grad_fn(stage, b, r, gen(b, r))
                total.update(g)
                per_batch.update(g)
            within_m2 = per_batch.m2.clone() if within_m2 is None else within_m2.add_(per_batch.m2)
        noise = None
        if debias and repeats > 1:
            noise = within_m2 / (n_batches * (repeats - 1)) / (n_batches * repeats)
        rows.append({"name": str(name), "stage": stage, **camse(ref_mean, total, cost, n, noise)})
    return rows


# ----------------------------------------------------------------------------- candidates

def _keep_label(keep: Iterable[tuple[str, float]]) -> str:
    keep = tuple(keep)
    vals = {v for _, v in keep}
    if len(vals) == 1:
        return f"{vals.pop():g}"
    return "/".join(f"{b}{v:g}" for b, v in keep)


def stage_label(stage: Stage) -> str:
    return f"p{stage.patch_size if stage.patch_size is not None else 'native'}_k{_keep_label(stage.keep) or '1'}"


def candidate_grid(patch_sizes: Sequence[int | None], keeps: Sequence[float],
                   branches: Sequence[str] = ("default",), tied: bool = True) -> list[Stage]:
    """Stages for every patch size x keep: ``tied`` gives every branch the same keep ratio,
    otherwise every combination of per-branch keeps (len(keeps) ** len(branches) per patch)."""
    if not patch_sizes or not keeps or not branches:
        raise ValueError("patch_sizes, keeps and branches must be non-empty")
    combos = ([tuple((b, k) for b in branches) for k in keeps] if tied else
              [tuple(zip(branches, ks)) for ks in itertools.product(keeps, repeat=len(branches))])
    out = []
    for p in patch_sizes:
        for keep in combos:
            st = Stage(patch_size=p, keep=keep)
            out.append(Stage(patch_size=p, keep=keep, name=stage_label(st)))
    return out


# ----------------------------------------------------------------------------- trainer glue

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
    from effkern.train.data import make_loader

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


def monotone_choice(tables: Sequence[Sequence[dict]]) -> list[dict]:
    """Per checkpoint (in progress order) the chosen row under the decompression constraint:
    the cost per image never decreases.  Rule (constrained greedy): at checkpoint k pick the
    lowest-CA-MSE strategy among those costing at least the previous choice; if none does,
    keep the previous choice."""
    chosen: list[dict] = []
    for rows in tables:
        ok = [r for r in rows if math.isfinite(r["camse"])] or list(rows)
        if chosen:
            floor = chosen[-1]["cost"] * (1 - 1e-9)
            ok = [r for r in ok if r["cost"] >= floor]
            if not ok:
                chosen.append(chosen[-1])
                continue
        chosen.append(min(ok, key=lambda r: (r["camse"], -r["cost"])))
    return chosen


def search(run_factory: Callable[[], Any], checkpoints: Sequence[tuple[float, str | None]],
           candidates: Sequence[Stage], n_batches: int = 4, repeats: int = 4, seed: int = 0,
           out_dir: str = "search", ref_stage: Stage | None = None, n: float = 1.0,
           name: str = "aaip", plots: bool = True) -> Schedule:
    """AAIP search: CA-MSE of every candidate at every checkpoint -> a monotone schedule.

    checkpoints: [(progress, path or None)], path a checkpoint file (or a run directory
    holding checkpoint.pt) whose "method" state_dict is loaded; None = the fresh init.
    Writes schedule.json, search.csv, search.md, search.json and (``plots``) heatmap_<k>.png
    per checkpoint into out_dir; returns the Schedule (stage k starts at the midpoint
    between checkpoint k-1 and k; consecutive equal choices are merged).
    """
    if not checkpoints or not candidates:
        raise ValueError("need at least one checkpoint and one candidate")
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
            state = torch.load(file, map_location=run.device, weights_only=False)["method"]
        run.method.load_state_dict(state)
        grad_fn, groups, nb = make_grad_fn(run, progress, n_batches, seed, ref_stage)
        rows = estimate(grad_fn, strategies, ref_stage, nb, repeats, seed, n=n, groups=groups)
        for r in rows:
            r.update(progress=progress, checkpoint=path)
        tables.append(rows)
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
        if pick["stage"] != prev:
            stages.append((start, pick["stage"]))
            prev = pick["stage"]
    schedule = Schedule(name, stages)
    with open(os.path.join(out_dir, "schedule.json"), "w") as f:
        f.write(schedule.to_json())
    from effkern.schedules.search_plot import write_heatmaps, write_tables

    write_tables(tables, out_dir)
    if plots:
        write_heatmaps(tables, out_dir)
    with open(os.path.join(out_dir, "search.json"), "w") as f:
        json.dump({"ref_stage": ref_stage.to_dict(), "n": n, "n_batches": n_batches, "repeats": repeats,
                   "seed": seed, "schedule": json.loads(schedule.to_json()),
                   "rows": [[_jsonable(r) for r in rows] for rows in tables]}, f, indent=1)
    return schedule


def _jsonable(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k != "stage"}
    out["stage"] = row["stage"].to_dict() if isinstance(row["stage"], Stage) else repr(row["stage"])
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
