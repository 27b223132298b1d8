"""The training loop: budget accounting and stop, exact resume (also after kill -9),
2-process gloo data parallelism equal to one process, CLI errors.

Runs on scikit-learn's digits (8x8, resized to 16 px) with a one-block ViT so the
whole file takes well under a minute on 2 cores."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from effkern.train.config import TrainConfig
from effkern.train.data import make_loader
from effkern.train.loop import Run, train


def tiny_cfg(tmp_path, name="run", **overrides) -> TrainConfig:
    cfg = TrainConfig(method="mocov3", model="vit_tiny_patch16_224",
                      model_kwargs={"depth": 1, "patch_size": 4, "embed_dim": 64, "num_heads": 2},
                      method_kwargs={"mlp_dim": 32, "out_dim": 16}, data="digits", base_size=16,
                      limit_train=256, limit_test=128, epochs_equivalent=1.0, batch_size=32, lr=1e-3,
                      out_dir=str(tmp_path / name), progress_bar=False, log_every=1)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def losses(out_dir) -> list[float]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_budget_is_charged_and_never_exceeded(tmp_path):
    cfg = tiny_cfg(tmp_path)
    summary = train(cfg)
    assert summary["steps"] == 256 // 32  # one epoch-equivalent of the baseline = one epoch of steps
    assert summary["budget_used"] == pytest.approx(1.0, rel=1e-9)
    assert 0.0 <= summary["knn_acc"] <= 1.0
    assert os.path.exists(os.path.join(cfg.out_dir, "training.png"))


def test_compressed_schedule_takes_more_steps_for_the_same_budget(tmp_path):
    base = train(tiny_cfg(tmp_path, "base"))
    fast = train(tiny_cfg(tmp_path, "fast", schedule="const:keep=0.5"))
    assert fast["steps"] > base["steps"]
    assert fast["spent_units"] <= fast["budget_units"] * (1 + 1e-9)


def test_budget_in_units_matches_the_cost_model(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs_equivalent=None, budget=1e-3)  # 1000 units
    run = Run(cfg)
    per_step = run.step_cost(run.schedule.at(0.0))
    # MoCo v3: 2 views through the base encoder (fwd+bwd = 3 units) + 2 momentum forwards (1 unit),
    # each with its heads (projector + predictor / momentum projector) in units of the encoder forward
    from effkern.schedules import unit_flops

    hq, hk = (run.method.head_flops(g) / unit_flops(run.model_cfg) for g in (True, False))
    assert hq > hk > 0
    assert per_step == pytest.approx(32 * (2 * 3 * (1 + hq) + 2 * (1 + hk)), rel=1e-6)
    summary = run.train()
    assert summary["steps"] == int(1000 // per_step)


def test_resume_equals_uninterrupted(tmp_path):
    full = tiny_cfg(tmp_path, "full")
    train(full)
    part = tiny_cfg(tmp_path, "part", stop_after_steps=3)
    assert train(part)["stopped_early"]
    resumed = tiny_cfg(tmp_path, "part", resume=True)
    train(resumed)
    assert losses(resumed.out_dir) == pytest.approx(losses(full.out_dir), rel=1e-6, abs=1e-7)


def _cli(args, out_dir, **kw):
    cmd = [sys.executable, "-m", "effkern", "train", "--method", "mocov3", "--data", "digits", "--base-size", "16",
           "--limit-train", "256", "--limit-test", "64", "--batch-size", "32", "--epochs-equivalent", "2",
           "--model-arg", "depth=1", "--model-arg", "patch_size=4", "--model-arg", "embed_dim=64",
           "--model-arg", "num_heads=2", "--method-arg", "mlp_dim=32", "--method-arg", "out_dim=16",
           "--log-every", "1", "--no-progress", "--out", str(out_dir)] + args
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_kill_9_then_resume_finishes_like_an_uninterrupted_run(tmp_path):
    ref = _cli([], tmp_path / "ref")
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    victim = _cli(["--ckpt-every", "2"], tmp_path / "victim")
    ckpt = tmp_path / "victim" / "checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    saved = torch.load(ckpt, weights_only=False)
    assert saved["state"]["step"] >= 2
    resumed = _cli(["--ckpt-every", "2", "--resume"], tmp_path / "victim")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    ref_summary = json.load(open(tmp_path / "ref" / "summary.json"))
    new_summary = json.load(open(tmp_path / "victim" / "summary.json"))
    assert new_summary["steps"] == ref_summary["steps"]
    # the steps after the checkpoint are recomputed with the same data and randomness
    assert losses(tmp_path / "victim")[-1] == pytest.approx(losses(tmp_path / "ref")[-1], rel=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_dict, result_path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    summary = train(TrainConfig.from_dict(cfg_dict))
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(summary, f)


def test_two_process_gloo_matches_one_process_on_the_same_global_batch(tmp_path):
    import torch.multiprocessing as mp

    overrides = dict(method="supervised", method_kwargs={}, model_kwargs={"depth": 1, "patch_size": 4,
                     "embed_dim": 64, "num_heads": 2, "drop_path_rate": 0.0})
    single = tiny_cfg(tmp_path, "single", **overrides)
    train(single)
    multi = tiny_cfg(tmp_path, "multi", **overrides)
    mp.spawn(_ddp_worker, args=(2, _free_port(), multi.to_dict(), str(tmp_path / "ddp.json")), nprocs=2, join=True)
    assert losses(multi.out_dir) == pytest.approx(losses(single.out_dir), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("args, match", [
    (["--method", "byol"], "mocov3"),
    (["--schedule", "fastest"], "efficienttrain"),
    (["--data", "imagenet-not-here"], "fashion-mnist"),
    (["--budget", "0"], "budget"),
    (["--budget", "-1"], "budget"),
])
def test_cli_errors_are_clear(args, match):
    out = subprocess.run([sys.executable, "-m", "effkern", "train", *args], capture_output=True, text=True)
    assert out.returncode == 2
    assert match in out.stderr


@pytest.mark.parametrize("method, schedule, et_crop", [
    ("simclr", "efficienttrain++", "fft"),
    ("dino", "const:keep=0.5", "fft"),
    ("supervised", "efficienttrain++", "resize"),
    ("mocov3", "const:patch=8,keep_q=0.5,keep_k=0.75", "fft"),
])
def test_every_method_trains_under_a_schedule(tmp_path, method, schedule, et_crop):
    kwargs = {"mocov3": {"mlp_dim": 32, "out_dim": 16}, "simclr": {"hidden_dim": 32, "out_dim": 16}}.get(method, {})
    if method == "dino":
        kwargs = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "n_local": 2}
    cfg = tiny_cfg(tmp_path, method=method, method_kwargs=kwargs, schedule=schedule, et_crop=et_crop,
                   epochs_equivalent=0.5)
    summary = train(cfg)
    assert summary["steps"] >= 4 and math.isfinite(summary["knn_acc"])
    assert all(math.isfinite(x) for x in losses(cfg.out_dir))


def test_calibration_scales_the_charged_cost(tmp_path):
    from effkern.schedules import Calibration
    from effkern.schedules.cost import _key

    path = str(tmp_path / "cal.json")
    Calibration(device="cpu", factors={_key(16, 4, 1.0): 2.0}).save(path)
    plain = Run(tiny_cfg(tmp_path, "plain"))
    calibrated = Run(tiny_cfg(tmp_path, "cal", calibration=path))
    stage = plain.schedule.at(0.0)
    assert calibrated.step_cost(stage) == pytest.approx(2 * plain.step_cost(stage))


def test_gradient_clipping_bounds_the_applied_gradient(tmp_path):
    run = Run(tiny_cfg(tmp_path, clip_grad=1e-3))
    views, labels = next(iter(make_loader(
        run.dataset, run.local_batch, 0, 0)))
    record = run.train_step(views, labels)
    assert record["grad_norm"] > 1e-3  # the norm before clipping is logged
    grads = [p.grad for p in run.method.parameters() if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert float(total) <= 1e-3 * (1 + 1e-5)


def test_weight_decay_schedule_ramps_only_decaying_groups(tmp_path):
    cfg = tiny_cfg(tmp_path, weight_decay=0.04, weight_decay_end=0.4)
    summary = train(cfg)
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        wds = [r["wd"] for r in map(json.loads, f) if "wd" in r]
    assert wds[0] == pytest.approx(0.04, abs=1e-3) and wds == sorted(wds) and wds[-1] < 0.4
    run = Run(tiny_cfg(tmp_path, "check", weight_decay=0.04, weight_decay_end=0.4))
    run.state["spent"] = run.budget  # progress 1
    run.state["step"] = run.total_steps  # the weight-decay ramp follows the fraction of steps done
    views, labels = next(iter(make_loader(
        run.dataset, run.local_batch, 0, 0)))
    run.train_step(views, labels)
    by_name = {g["name"]: g["weight_decay"] for g in run.optimizer.param_groups}
    assert by_name["decay"] == pytest.approx(0.4) and by_name["no_decay"] == 0.0
    assert summary["steps"] > 0


@pytest.mark.parametrize("overrides, match", [({"clip_grad": 0.0}, "clip_grad"),
                                              ({"weight_decay_end": -1.0}, "weight_decay_end")])
def test_bad_optimisation_knobs(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        Run(tiny_cfg(tmp_path, **overrides))


def test_linear_probe_in_the_summary(tmp_path):
    summary = train(tiny_cfg(tmp_path, linear_probe=True, epochs_equivalent=0.25))
    assert 0.0 <= summary["probe_acc"] <= 1.0


def test_evaluate_extracts_the_features_once_and_matches_knn_and_the_probe(tmp_path, monkeypatch):
    """The end-of-run evaluation: the same kNN and probe accuracies as the separate
    evaluations (each extracting its own features), from half the feature extractions."""
    import effkern.train.knn as knn_mod

    run = Run(tiny_cfg(tmp_path, limit_train=None, limit_test=None))
    calls = []
    real = knn_mod.extract_features
    monkeypatch.setattr(knn_mod, "extract_features", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    both = run.evaluate(probe=True)
    assert len(calls) == 2
    # the separate paths: two extractions each (probe.py imported extract_features under its own name)
    import effkern.train.probe as probe_mod

    monkeypatch.setattr(probe_mod, "extract_features", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    separate = {"knn_acc": run.knn(), "probe_acc": run.linear_probe()}
    assert len(calls) == 6
    assert both == separate
    assert 0.2 < both["knn_acc"] < 1.0 and both["knn_acc"] != both["probe_acc"]
    assert run.evaluate(probe=False) == {"knn_acc": both["knn_acc"]}


def test_supervised_reports_its_classifiers_top1(tmp_path):
    """classifier_acc = top-1 of the trained head on the eval split: the head's logits on the
    evaluation's features equal timm's own forward on the normalised test images, and the
    reported accuracy is theirs; self-supervised runs report none."""
    from effkern.train.knn import extract_features
    from effkern.train.loop import MEAN, STD

    cfg = tiny_cfg(tmp_path, method="supervised", method_kwargs={}, epochs_equivalent=2.0, lr=4e-3)
    summary = train(cfg)
    run = Run(tiny_cfg(tmp_path, method="supervised", method_kwargs={}, epochs_equivalent=2.0, lr=4e-3, resume=True))
    model = run.method.encoder.eval()
    x = run.data.test_images.float().div(255.0)
    x = (x - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)
    with torch.no_grad():
        want = model(x)
        feats = extract_features(lambda v: model.forward_views([v])[0], run.data.test_images, 64, MEAN, STD, "cpu",
                                 normalize=False)
        got = run.method.classify(feats)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert want.argmax(1).unique().numel() > 1  # not a constant prediction
    acc = (want.argmax(1) == run.data.test_labels).float().mean().item()
    assert abs(summary["classifier_acc"] - acc) <= 1.0 / len(run.data.test_labels) + 1e-9
    assert "classifier_acc" not in train(tiny_cfg(tmp_path, "moco", epochs_equivalent=0.25))


def test_compiled_training_step_matches_eager(tmp_path):
    """--compile (inductor) through an ET++ schedule, whose image size changes during
    the run: same steps and, up to float reordering, the same losses as eager."""
    eager = train(tiny_cfg(tmp_path, "eager", schedule="efficienttrain++", epochs_equivalent=0.5))
    comp = train(tiny_cfg(tmp_path, "comp", schedule="efficienttrain++", epochs_equivalent=0.5, compile=True))
    assert comp["steps"] == eager["steps"]
    le, lc = losses(tmp_path / "eager"), losses(tmp_path / "comp")
    assert len(le) == len(lc) and all(abs(a - b) <= 1e-3 * abs(a) + 1e-5 for a, b in zip(le, lc)), (le, lc)


def test_schedule_show_charges_what_the_trainer_charges(tmp_path):
    """`effkern schedule show` prices the views the trainer runs at every ET++ stage, also
    at a base size whose scaled crops are not whole patches (16 px, patch 4: 16 * 0.6 =
    9.6 px is cropped to 8, not 10).  (The method's heads differ here: show builds the
    default projector, the run a small one.)"""
    import argparse

    from effkern.cli_train import _show_shapes

    cfg = tiny_cfg(tmp_path, schedule="efficienttrain++")
    run = Run(cfg)
    args = argparse.Namespace(name="efficienttrain++", method="mocov3", model=cfg.model, base_size=16,
                              model_arg=[f"{k}={v}" for k, v in cfg.model_kwargs.items()])
    _, views_fn = _show_shapes(args)
    stages = [st for _, _, st in run.schedule.intervals()]
    assert any(round(16 * st.resolution) % 4 for st in stages)  # the case the rounding decides
    key = lambda views: [(v.resolution, v.patch_size, v.keep, v.grad) for v in views]  # noqa: E731
    for st in stages:
        assert run.global_size(16, st) % 4 == 0
        trained = run.method.view_specs(run.global_size(16, st), st, run.model_cfg.patch_size)
        assert key(views_fn(st)) == key(trained), st
