"""Wall-clock of schedules measured interleaved: steps of several runs alternate in one process.

Two runs timed one after the other see different machine load (other jobs, thermal state,
caches), which can fake a speedup either way.  Here every round takes one training step of
every (run, stage) slot in turn, so load changes hit all slots alike; the median step time
per slot, weighted by how many steps the run spends in each stage (the loop's stopping rule
replayed on its schedule), gives the run's predicted wall-clock and its seconds per unit of
budget.  The steps really train (the weights move), which does not change their cost.
"""
from __future__ import annotations

import statistics
import time

__all__ = ["steps_per_stage", "interleaved_step_times", "interleaved_wall_clock"]


def steps_per_stage(run) -> dict[float, int]:
    """{stage start: optimizer steps the run takes in that stage} for a ``Run``."""
    intervals = list(run.schedule.intervals())
    out: dict[float, int] = {}
    spent = 0.0
    while True:
        p = min(1.0, spent / run.budget)
        cost = run.step_cost(run.schedule.at(p))
        if spent + cost > run.budget * (1 + 1e-9):
            return out
        start = [s for s, _end, _stage in intervals if s <= p][-1]
        out[start] = out.get(start, 0) + 1
        spent += cost


def interleaved_step_times(runs: dict, repeats: int = 10, warmup: int = 2) -> dict[tuple[str, float], list[float]]:
    """{(run name, stage start): step seconds} of ``repeats`` rounds (after ``warmup``
    untimed rounds); a round takes one step of every stage of every run, in turn."""
    from effkern.train.data import make_loader

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    slots = [(name, start) for name, run in runs.items() for start, _end, _stage in run.schedule.intervals()]
    times: dict[tuple[str, float], list[float]] = {slot: [] for slot in slots}
    epoch = 0
    batches: dict[str, object] = {}
    for rnd in range(warmup + repeats):
        for name, start in slots:
            run = runs[name]
            if name not in batches:
                batches[name] = iter(make_loader(run.dataset, run.local_batch, epoch, run.cfg.seed))
            try:
                views, labels = next(batches[name])
            except StopIteration:
                epoch += 1
                batches[name] = iter(make_loader(run.dataset, run.local_batch, epoch, run.cfg.seed))
                views, labels = next(batches[name])
            run.state["spent"] = start * run.budget  # this step runs at the slot's stage
            sync = run.device.type == "cuda"
            if sync:
                import torch

                torch.cuda.synchronize(run.device)
            t0 = time.perf_counter()
            run.train_step(views, labels)
            if sync:
                torch.cuda.synchronize(run.device)
            if rnd >= warmup:
                times[(name, start)].append(time.perf_counter() - t0)
    return times


def interleaved_wall_clock(runs: dict, repeats: int = 10, warmup: int = 2) -> dict[str, dict]:
    """Per run: predicted wall-clock seconds of its whole budget from interleaved median step
    times, seconds per unit of budget, steps, and the median step time per stage."""
    plans = {name: steps_per_stage(run) for name, run in runs.items()}  # before timing moves the state
    times = interleaved_step_times(runs, repeats, warmup)
    out = {}
    for name, run in runs.items():
        med = {start: statistics.median(times[(name, start)]) for start in plans[name]}
        seconds = sum(n * med[start] for start, n in plans[name].items())
        spent = sum(n * run.step_cost(run.schedule.at(start)) for start, n in plans[name].items())
        out[name] = {"seconds": seconds, "seconds_per_unit": seconds / spent, "steps": sum(plans[name].values()),
                     "median_step_s": {f"{s:g}": v for s, v in med.items()}}
    return out
