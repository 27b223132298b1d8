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

__all__ = ["BatchFeed", "sync", "time_step", "steps_per_stage", "interleaved_step_times", "interleaved_wall_clock"]


class BatchFeed:
    """Endless batches of one ``Run``: its seeded loader, the next epoch when one ends."""

    def __init__(self, run):
        self.run, self.epoch, self.it = run, 0, None

    def next(self):
        from effkern.train.data import make_loader

        for _ in range(2):
            if self.it is None:
                self.it = iter(make_loader(self.run.dataset, self.run.local_batch, self.epoch, self.run.cfg.seed))
            try:
                return next(self.it)
            except StopIteration:
                self.it, self.epoch = None, self.epoch + 1
        raise RuntimeError("the loader yields no batch")


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def time_step(run, feed: BatchFeed, progress: float) -> tuple[float, float]:
    """(data seconds, step seconds) of one training step of ``run`` at budget ``progress``
    (the stage the schedule has there): the next batch from ``feed`` (loading and
    augmentation in this process), then ``Run.train_step``, the device synchronised."""
    t0 = time.perf_counter()
    views, labels = feed.next()
    t1 = time.perf_counter()
    run.state["spent"] = progress * run.budget
    sync(run.device)
    t2 = time.perf_counter()
    run.train_step(views, labels)
    sync(run.device)
    return t1 - t0, time.perf_counter() - t2


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


def interleaved_step_times(runs: dict, repeats: int = 10, warmup: int = 2,
                           slots: list | None = None) -> dict[tuple[str, float], list[tuple[float, float]]]:
    """{(run name, progress): [(data s, step s), ...]} of ``repeats`` rounds (after
    ``warmup`` untimed rounds); a round takes one step of every slot in turn.  ``slots``:
    (run name, budget progress) pairs; default every stage start of every run."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if slots is None:
        slots = [(name, start) for name, run in runs.items() for start, _end, _stage in run.schedule.intervals()]
    feeds = {name: BatchFeed(run) for name, run in runs.items()}
    times: dict[tuple[str, float], list[tuple[float, float]]] = {slot: [] for slot in slots}
    for rnd in range(warmup + repeats):
        for name, progress in slots:
            t = time_step(runs[name], feeds[name], progress)
            if rnd >= warmup:
                times[(name, progress)].append(t)
    return times


def interleaved_wall_clock(runs: dict, repeats: int = 10, warmup: int = 2) -> dict[str, dict]:
    """Per run: predicted wall-clock seconds of its whole budget from interleaved median step
    times (the train step, data loading excluded), seconds per unit of budget, steps, and the
    median step time per stage."""
    plans = {name: steps_per_stage(run) for name, run in runs.items()}  # before timing moves the state
    times = interleaved_step_times(runs, repeats, warmup)
    out = {}
    for name, run in runs.items():
        med = {start: statistics.median(step for _data, step in times[(name, start)]) for start in plans[name]}
        seconds = sum(n * med[start] for start, n in plans[name].items())
        spent = sum(n * run.step_cost(run.schedule.at(start)) for start, n in plans[name].items())
        out[name] = {"seconds": seconds, "seconds_per_unit": seconds / spent, "steps": sum(plans[name].values()),
                     "median_step_s": {f"{s:g}": v for s, v in med.items()}}
    return out
