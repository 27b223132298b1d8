"""The training loop of ``effkern train``: budget-driven, schedule-driven, resumable.

One step: the schedule's stage at the current progress (budget spent / budget)
-> the views of the batch to the device, normalised (ET++: global views
low-pass cropped with effkern.ops.fft_crop, which fuses the normalisation) ->
``method.training_step`` (one packed forward per encoder) -> backward ->
gradients averaged over ranks -> optimiser step with the LR of this step ->
``method.on_step_end`` (EMA) -> the step's cost in units is charged.  The run
stops when the next step would exceed the budget (so spent <= budget, and the
summary reports spent / budget).

Two clocks: the schedule's stage follows budget progress (compute spent); the
LR warm-up and decay, the weight-decay ramp and the methods' momentum /
temperature schedules follow the fraction of the run's optimizer steps done
(``step / total_steps``; the number of steps is known in advance, ``planned_steps``).
For the uncompressed baseline the two clocks are the same.

Determinism: the data order (per-epoch seeded shuffle), the augmentations
(seeded per (epoch, index)), the token-dropout draws (a generator seeded per
step) and the global RNG state are all in the checkpoint, so ``--resume``
continues with exactly the losses an uninterrupted run would have produced.
``metrics.jsonl`` is the log of that one run: a fresh start empties it, a resume
cuts it back to the checkpoint's step.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
import torch.nn.functional as F

from effkern.schedules import Calibration, ModelCfg, get_schedule, view_cost, weight_decay_at
from effkern.schedules.lr import lr_at_step, peak_lr
from effkern.schedules.presets import check_patch_sizes
from effkern.train import checkpoint as ckpt
from effkern.train import dist
from effkern.train.config import TrainConfig

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class Run:
    """Everything a training run holds; built once, then ``train`` drives it."""

    def __init__(self, cfg: TrainConfig):
        import effkern.timm
        from effkern.train.augment import RandAugmentMagnitude, augment_preset, view_transforms
        from effkern.train.config import model_for
        from effkern.train.data import MultiViewDataset, load_dataset
        from effkern.train.methods import build_method

        self.cfg = cfg
        self.device = torch.device(cfg.device)
        if self.device.type == "cpu":
            from effkern.cpu_allocator import tune_cpu_allocator

            tune_cpu_allocator()  # no page faults on every large activation (effkern/cpu_allocator.py)
        self.rank, self.world = dist.rank(), dist.world_size()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of ranks {self.world}")
        self.local_batch = cfg.batch_size // self.world
        torch.manual_seed(cfg.seed)
        self.data = load_dataset(cfg.data, cfg.base_size, cfg.limit_train, cfg.limit_test, seed=cfg.seed,
                                 val_split=cfg.val_split)
        model_name, model_kwargs = model_for(cfg.model, cfg.base_size, cfg.model_kwargs)
        kwargs = dict(pretrained=False, img_size=cfg.base_size, num_classes=self.data.num_classes)
        kwargs.update(model_kwargs)
        encoder = effkern.timm.create_model(model_name, **kwargs)
        self.method = build_method(cfg.method, encoder, **cfg.method_kwargs).to(self.device)
        # several ranks: DDP or FSDP2 (dist.wrap_step) -- before the optimizer sees the parameters,
        # which fully_shard replaces by their shards
        self.step_fn = dist.wrap_step(self.method, self.device, "fsdp" if cfg.fsdp else "ddp")
        self.model_cfg = ModelCfg.from_timm(encoder)
        self.schedule = get_schedule(cfg.schedule)
        check_patch_sizes(self.schedule, cfg.base_size)
        self.calibration = Calibration.load(cfg.calibration) if cfg.calibration else Calibration()
        self.plan = self.method.view_plan(cfg.base_size)
        self.randaug = RandAugmentMagnitude()
        self.augment = augment_preset(cfg.augment, cfg.base_size, self.data.channels)
        self.dataset = MultiViewDataset(self.data.train_images, self.data.train_labels,
                                        view_transforms(cfg.method, self.plan, randaug=self.randaug,
                                                        preset=self.augment), seed=cfg.seed)
        if cfg.clip_grad is not None and not cfg.clip_grad > 0:
            raise ValueError(f"clip_grad must be > 0 (or None), got {cfg.clip_grad}")
        if cfg.weight_decay_end is not None and cfg.weight_decay_end < 0:
            raise ValueError(f"weight_decay_end must be >= 0 (or None), got {cfg.weight_decay_end}")
        groups = self.method.param_groups(cfg.weight_decay)
        for group in groups:  # the groups the weight-decay schedule drives
            group["decays"] = group["weight_decay"] > 0
        # the fused AdamW (one kernel over all parameters, CPU and CUDA): 2.5x faster than the
        # per-tensor loop for a ViT-Ti on 2 CPU cores; FSDP2's DTensor shards keep the default
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr,
                                           fused=not cfg.fsdp and self.device.type in ("cpu", "cuda"))
        self.base_lr = peak_lr(cfg.lr, cfg.batch_size, cfg.lr_rule)
        self.mean = torch.tensor(MEAN, device=self.device)
        self.std = torch.tensor(STD, device=self.device)
        self.budget = self._budget_units()
        self.total_steps = self.planned_steps()
        if self.total_steps < 1:
            raise ValueError(f"the budget ({self.budget / 1e6:.4g} M units) does not pay for one step "
                             f"({self.step_cost(self.schedule.at(0.0)) / 1e6:.4g} M units)")
        self.method.set_run_steps(self.total_steps)
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "spent": 0.0, "wall": 0.0, "images": 0}
        self.history: list[dict] = []
        if cfg.resume:
            self._load()
        if cfg.compile:
            self.step_fn = torch.compile(self.step_fn)

    # ------------------------------------------------------------ budget
    def global_size(self, size: int, stage) -> int:
        """The ET++ crop size of a global view (effkern.schedules.Stage.global_size)."""
        return stage.global_size(size, self.model_cfg.patch_size)

    def step_cost(self, stage) -> float:
        size = self.global_size(self.cfg.base_size, stage)
        views = self.method.view_specs(size, stage, self.model_cfg.patch_size)
        # FLOP-predicted cost per view, times the device's measured/predicted ratio when calibrated
        return self.cfg.batch_size * sum(view_cost(self.model_cfg, v)
                                         * self.calibration.factor(v.resolution, v.patch_size, v.keep)
                                         for v in views)

    def _budget_units(self) -> float:
        cfg = self.cfg
        if (cfg.budget is None) == (cfg.epochs_equivalent is None):
            raise ValueError("give exactly one of budget (millions of units) and epochs_equivalent")
        if cfg.budget is not None:
            if not cfg.budget > 0:
                raise ValueError(f"budget must be > 0, got {cfg.budget}")
            return cfg.budget * 1e6
        if not cfg.epochs_equivalent > 0:
            raise ValueError(f"epochs_equivalent must be > 0, got {cfg.epochs_equivalent}")
        baseline = get_schedule("none").at(0.0)
        steps_per_epoch = len(self.data.train_labels) // cfg.batch_size
        return cfg.epochs_equivalent * steps_per_epoch * self.step_cost(baseline)

    def planned_steps(self) -> int:
        """The run's number of optimizer steps: the loop's own stopping rule replayed on the
        schedule (a step is taken while its cost fits in what is left of the budget)."""
        spent, steps = 0.0, 0
        costs: dict = {}
        while True:
            stage = self.schedule.at(min(1.0, spent / self.budget))
            if stage not in costs:
                costs[stage] = self.step_cost(stage)
            cost = costs[stage]
            if spent + cost > self.budget * (1 + 1e-9):
                return steps
            spent += cost
            steps += 1

    @property
    def progress(self) -> float:
        return min(1.0, self.state["spent"] / self.budget)

    @property
    def step_fraction(self) -> float:
        """Fraction of the run's optimizer steps done, in [0, 1]."""
        return min(1.0, self.state["step"] / self.total_steps)

    # ------------------------------------------------------------ one step
    def _prepare(self, views: list[torch.Tensor], stage) -> list[torch.Tensor]:
        """uint8 views -> normalised float on the device; ET++ crops the global views."""
        out = []
        for view, plan in zip(views, self.plan):
            view = view.to(self.device, non_blocking=True)
            size = self.global_size(view.shape[-1], stage) if plan.kind == "global" else view.shape[-1]
            if size != view.shape[-1] and self.cfg.et_crop == "fft":
                out.append(_fft_crop_normalised(view, size, self.mean, self.std))
                continue
            x = (view.float() / 255.0 - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
            if size != view.shape[-1]:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out.append(x)
        return out

    def train_step(self, views, labels) -> dict:
        cfg, stage = self.cfg, self.schedule.at(self.progress)
        self.randaug.set(stage.randaug_magnitude)
        lr = lr_at_step(self.state["step"], self.total_steps, self.base_lr, warmup=cfg.warmup, min_lr=cfg.min_lr,
                        kind=cfg.lr_schedule)
        frac = self.step_fraction
        wd = (cfg.weight_decay if cfg.weight_decay_end is None
              else weight_decay_at(frac, cfg.weight_decay, cfg.weight_decay_end))
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if group.get("decays", False):
                group["weight_decay"] = wd
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed * 1_000_003 + self.state["step"] * 7919
                                                                   + self.rank)
        self.method.on_progress(frac)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else _null()
        with autocast:
            loss, metrics = self.step_fn(self._prepare(views, stage), labels.to(self.device), stage, frac,
                                         generator=generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        extra = {}
        if cfg.clip_grad is not None:  # on the all-reduced gradient: the same on every rank
            extra["grad_norm"] = dist.full_tensor(torch.nn.utils.clip_grad_norm_(
                [p for p in self.method.parameters() if p.grad is not None], cfg.clip_grad))  # before clipping
        self.optimizer.step()
        metrics = {**metrics, **self.method.progress_metrics(frac)}
        self.state["spent"] += self.step_cost(stage)
        self.state["step"] += 1
        self.method.on_step_end(self.step_fraction)
        # tensors stay on the device: _flush_metrics averages them over ranks and reads them back
        # at logging time (no host sync per step)
        return {**metrics, **extra, "loss": loss.detach(), "lr": lr, "wd": wd, "stage": stage.name}

    def _flush_metrics(self, pending: list[dict]) -> None:
        """The records of the steps since the last call: their tensor metrics averaged over
        ranks (one all-reduce: the global-batch loss) and read back together; images/s over
        the interval; the losses appended to the history.  Every rank calls it at the same steps."""
        if not pending:
            return
        t0 = time.perf_counter()
        keys = sorted({k for r in pending for k, v in r.items() if isinstance(v, torch.Tensor)})
        if keys:
            zero = torch.zeros((), device=self.device)
            values = torch.stack([torch.stack([r.get(k, zero).float().reshape(()) for k in keys]) for r in pending])
            for r, row in zip(pending, dist.mean_over_ranks(values).tolist()):
                r.update({k: v for k, v in zip(keys, row) if k in r})
        self.state["wall"] += time.perf_counter() - t0  # waiting for the device is part of the steps' time
        interval = sum(r.pop("dt") for r in pending) + time.perf_counter() - t0
        pending[-1]["images_per_s"] = len(pending) * self.cfg.batch_size / max(interval, 1e-9)
        self.history.extend({"step": r["step"], "spent": r["spent"], "loss": r["loss"]} for r in pending)
        pending.clear()

    # ------------------------------------------------------------ checkpoints
    def _save(self) -> None:
        method_state, optimizer_state = dist.full_state(self.method, self.optimizer)  # FSDP2: a collective
        if self.rank != 0:
            return
        ckpt.save_atomic({"cfg": self.cfg.to_dict(), "state": dict(self.state), "method": method_state,
                          "optimizer": optimizer_state, "rng": ckpt.rng_state(),
                          "history": self.history}, self.cfg.out_dir)

    def _load(self) -> None:
        saved, path = ckpt.load_for_resume(self.cfg.out_dir, self.cfg.to_dict(), map_location=self.device)
        try:
            dist.load_full_state(self.method, self.optimizer, saved["method"], saved["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:  # shapes/keys of another model or optimizer
            raise ckpt.CheckpointError(f"{path} does not fit this run's model/optimizer: "
                                       f"{str(exc).strip().splitlines()[0][:160]}") from None
        self.state.update(saved["state"])
        self.history = list(saved["history"])
        ckpt.set_rng_state(saved["rng"])

    # ------------------------------------------------------------ eval
    @torch.no_grad()
    def _evaluate(self, accuracy_fn, **kwargs):
        """accuracy_fn(features_fn, data, mean, std, device, **kwargs) with the eval encoder
        in eval mode (its training flag restored after)."""
        model = self.method.eval_encoder()
        was_training = model.training
        model.eval()
        try:
            return accuracy_fn(lambda x: model.forward_views([x])[0], self.data, MEAN, STD, self.device, **kwargs)
        finally:
            model.train(was_training)

    def linear_probe(self) -> float:
        from effkern.train.probe import linear_probe_accuracy

        return self._evaluate(linear_probe_accuracy)

    def knn(self) -> float:
        from effkern.train.knn import knn_accuracy

        return self._evaluate(knn_accuracy, k=self.cfg.knn_k, T=self.cfg.knn_t)

    def evaluate(self, probe: bool) -> dict:
        """{"knn_acc"} and, with ``probe``, {"probe_acc"}: the same values as ``knn()`` and
        ``linear_probe()``, from ONE extraction of the eval split's features (it is most of
        an evaluation's time); for a method that trains a classifier (supervised) also
        {"classifier_acc"}: the top-1 of its own head on the eval split."""
        from effkern.train.knn import eval_split, extract_features, knn_accuracy_from_features
        from effkern.train.probe import linear_probe_accuracy_from_features

        def both(model_fn, data, mean, std, device):
            tr_x, tr_y, te_x, te_y = eval_split(data, None, None, (11, 12), "kNN accuracy")
            tr = extract_features(model_fn, tr_x, 256, mean, std, device, normalize=False)
            te = extract_features(model_fn, te_x, 256, mean, std, device, normalize=False)
            out = {"knn_acc": knn_accuracy_from_features(tr, tr_y, te, te_y, data.num_classes,
                                                         k=self.cfg.knn_k, T=self.cfg.knn_t)}
            if probe:
                out["probe_acc"] = linear_probe_accuracy_from_features(tr, tr_y, te, te_y, data.num_classes)
            logits = self.method.classify(te)
            if logits is not None:
                out["classifier_acc"] = (logits.argmax(1).cpu() == te_y.cpu()).float().mean().item()
            return out

        return self._evaluate(both)

    # ------------------------------------------------------------ the loop
    def train(self) -> dict:
        from effkern.train.data import make_loader

        cfg = self.cfg
        metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        if self.rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=1)
            _trim_jsonl(metrics_path, self.state["step"])
        bar = _progress_bar(cfg.progress_bar and self.rank == 0, self.state["spent"] / self.budget)
        steps_this_process, done, pending = 0, False, []
        while not done:
            loader = make_loader(self.dataset, self.local_batch, self.state["epoch"], cfg.seed, self.rank,
                                 self.world, cfg.workers, start_batch=self.state["batch_in_epoch"])
            for views, labels in loader:
                stage = self.schedule.at(self.progress)
                if self.state["spent"] + self.step_cost(stage) > self.budget * (1 + 1e-9):
                    done = True
                    break
                t0 = time.perf_counter()
                record = self.train_step(views, labels)
                dt = time.perf_counter() - t0  # host time; the device catches up in _flush_metrics
                self.state["wall"] += dt
                self.state["images"] += cfg.batch_size
                self.state["batch_in_epoch"] += 1
                steps_this_process += 1
                record.update(step=self.state["step"], epoch=self.state["epoch"], progress=self.progress,
                              spent=self.state["spent"], dt=dt)
                pending.append(record)
                step = self.state["step"]
                stopping = cfg.stop_after_steps is not None and steps_this_process >= cfg.stop_after_steps
                if (step % max(1, cfg.log_every) == 0 or step == 1 or stopping
                        or (cfg.eval_every and step % cfg.eval_every == 0)
                        or (cfg.ckpt_every and step % cfg.ckpt_every == 0)):
                    self._flush_metrics(pending)
                    if self.rank == 0 and (step % max(1, cfg.log_every) == 0 or step == 1):
                        _append_jsonl(metrics_path, record)
                    bar(self.progress, record)
                else:
                    bar(self.progress, None)
                if cfg.eval_every and self.state["step"] % cfg.eval_every == 0:
                    acc = self.knn()
                    self.history.append({"step": self.state["step"], "spent": self.state["spent"], "knn": acc})
                    if self.rank == 0:
                        _append_jsonl(metrics_path, {"step": self.state["step"], "spent": self.state["spent"],
                                                     "progress": self.progress, "knn_acc": acc})
                if cfg.ckpt_every and self.state["step"] % cfg.ckpt_every == 0:
                    self._save()
                if stopping:
                    bar(None, None)
                    self._save()
                    return {"stopped_early": True, **self.state}
            else:
                self.state["epoch"] += 1
                self.state["batch_in_epoch"] = 0
        self._flush_metrics(pending)
        bar(None, None)
        scores = self.evaluate(probe=cfg.linear_probe)
        acc = scores["knn_acc"]
        self.history.append({"step": self.state["step"], "spent": self.state["spent"], "knn": acc})
        self._save()
        summary = {"method": cfg.method, "schedule": cfg.schedule, "budget_units": self.budget,
                   "spent_units": self.state["spent"], "budget_used": self.state["spent"] / self.budget,
                   "steps": self.state["step"], "planned_steps": self.total_steps, "wall_s": self.state["wall"],
                   "eval_split": "val" if cfg.val_split else "test", "peak_lr": self.base_lr,
                   "images_per_s": self.state["images"] / max(self.state["wall"], 1e-9), "knn_acc": acc}
        if cfg.linear_probe:
            summary["probe_acc"] = scores["probe_acc"]
        if "classifier_acc" in scores:
            summary["classifier_acc"] = scores["classifier_acc"]
        if self.rank == 0:
            _append_jsonl(metrics_path, {"final": True, **summary})
            with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
            from effkern.train.report import write_plots

            write_plots(cfg.out_dir, self.history, self.schedule, self.budget)
        return summary


def _fft_crop_normalised(view: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    from effkern.ops import fft_crop

    return fft_crop(view, size, mean=mean, std=std)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _trim_jsonl(path: str, step: int) -> None:
    """Make ``path`` the log of the steps this run starts after: a fresh run (step 0) starts
    an empty file (an earlier run in the same directory would otherwise mix in); a resumed
    run keeps the records up to its checkpoint's step and drops the later ones (re-logged
    as they are trained again) and the earlier final summary."""
    if not os.path.exists(path):
        return
    if step == 0:
        os.remove(path)
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when the process was killed
            continue
        if not record.get("final") and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                            for k, v in record.items()}) + "\n")


def _progress_bar(enabled: bool, start: float):
    """A tqdm bar over budget progress (0..100 %); images/s, stage and loss shown from the
    records passed at logging time (``record=None``: progress only, nothing read back)."""
    if not enabled:
        return lambda progress, record: None
    from tqdm import tqdm

    bar = tqdm(total=100.0, initial=round(100 * start, 2), unit="%", bar_format="{l_bar}{bar}| {n:.1f}/100% "
               "[{elapsed}<{remaining}{postfix}]")

    def update(progress, record):
        if progress is None:
            bar.close()
            return
        bar.update(round(100 * progress, 2) - bar.n)
        if record is None:
            return
        bar.set_postfix(loss=f"{record['loss']:.3f}", stage=record.get("stage") or "-",
                        img_s=f"{record['images_per_s']:.0f}")

    return update


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one training run; returns the summary."""
    started = dist.init_from_env(cfg.device)
    try:
        return Run(cfg).train()
    finally:
        if started:
            # the Run (its FSDP/DDP modules hold the process group) is unreachable by now: collect
            # it so the group's gloo threads are joined here, not in the interpreter's exit, where
            # a still-joinable thread aborts the process (SIGABRT after a finished run)
            import gc

            gc.collect()
            dist.destroy()
