"""AAIP-style schedule search: pick, per training stage, the compression strategy whose
minibatch gradient has the lowest cost-adjusted MSE (CA-MSE).  See docs/schedules_search.md.

Estimator (model-agnostic, memory O(P) in the number of gradient coordinates P):

* ``GradientMoments``: Welford running mean / sum of squared deviations of flat gradients,
  optionally per named parameter group (name -> slice of the flat vector).
* ``camse(ref_mean, moments, cost, n)``: bias2 = ||E[g_s] - g*||^2, var = tr Var[g_s],
  cav = cost * var / n, camse = bias2 + cav (total and per group).
* ``estimate(grad_fn, strategies, ref_stage, n_batches, repeats, seed)``: the table.
* ``rescore(rows, n)``: the same table at another n (only cav and camse depend on n, so one
  estimation serves every n).

Candidates and the schedule rule: ``candidate_grid(patch_sizes, keeps, branches, tied=True)``,
``monotone_choice(tables)``.  The search against the trainer (``search``) lives one layer
up, in ``effkern.train.schedule_search``: this module knows nothing of the trainer.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from effkern._seeding import mix_seed
from effkern.schedules.stage import Stage

__all__ = ["GradientMoments", "camse", "estimate", "rescore", "grad_seed", "candidate_grid", "stage_label",
           "monotone_choice"]

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


def rescore(rows: Sequence[Mapping[str, Any]], n: float) -> list[dict[str, Any]]:
    """Copies of ``estimate``'s rows with cav = cost * var / n and camse = bias2 + cav at
    another ``n`` (totals and groups); bias2 and var do not depend on n, so the result equals
    an estimation run at that n with the same seeds."""
    if not n > 0:
        raise ValueError(f"n must be > 0, got {n}")

    def at_n(stats: Mapping[str, Any], cost: float) -> dict[str, Any]:
        cav = cost * stats["var"] / n
        return {**stats, "cav": cav, "camse": stats["bias2"] + cav}

    return [{**at_n(r, r["cost"]), "groups": {g: at_n(v, r["cost"]) for g, v in r["groups"].items()}}
            for r in rows]


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
