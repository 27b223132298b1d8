"""Data parallelism (effkern/train/dist.py) on 2 gloo processes: parameters start as
rank 0's whatever each rank's seed (DDP and FSDP2), FSDP2 training (stopped and
resumed half-way) reproduces the single-process losses and weights, the methods'
training steps read nothing back to the host, and a checkpoint fallback is announced
by rank 0 alone.  (2-process DDP vs one process: tests/test_train_loop.py.)"""

import gc
import json
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

from effkern.train import dist
from effkern.train.config import TrainConfig
from effkern.train.loop import train
from test_train_loop import _free_port, losses, tiny_cfg


def _tiny_method(name="mocov3"):
    import effkern.timm
    from effkern.train.methods import build_method

    encoder = effkern.timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4,
                                        depth=1, embed_dim=64, num_heads=2, num_classes=10)
    hp = {"mocov3": dict(mlp_dim=32, out_dim=16, sync_bn=False),
          "simclr": dict(hidden_dim=32, out_dim=16, sync_bn=False),
          "dino": dict(out_dim=40, hidden_dim=32, bottleneck_dim=16, n_local=2, local_size=8),
          "supervised": {}}[name]
    return build_method(name, encoder, **hp)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([dist.full_tensor(t.detach()).reshape(-1).float() for t in tensors])


def _start_worker(rank, world, port, result_path):
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    result = {}
    try:
        for mode in dist.MODES:
            torch.manual_seed(1000 + rank)  # a different initialisation on every rank
            method = _tiny_method()
            before = _flat([*method.parameters(), *method.buffers()])
            step = dist.wrap_step(method, torch.device("cpu"), mode)
            after = _flat([*method.parameters(), *method.buffers()])  # FSDP2: gathered from the shards
            gathered = [torch.empty_like(after) for _ in range(world)]
            tdist.all_gather(gathered, after)
            rank0_before = before.clone()
            tdist.broadcast(rank0_before, src=0)
            result[mode] = {"type": type(step).__name__,
                            "differed_before": bool(tdist.get_rank() == 1 and not torch.equal(before, rank0_before)),
                            "equal_across_ranks": all(torch.equal(g, gathered[0]) for g in gathered),
                            "equal_to_rank0_init": torch.equal(after, rank0_before),
                            "sharded": dist.is_sharded(method)}
            del step, method
        tdist.barrier()
    finally:
        gc.collect()  # the DDP / FSDP objects go before their process group
        tdist.destroy_process_group()
    with open(f"{result_path}.{rank}", "w") as f:
        json.dump(result, f)


def test_parameters_start_as_rank0s_with_different_seeds(tmp_path):
    path = str(tmp_path / "start")
    mp.spawn(_start_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    results = [json.load(open(f"{path}.{r}")) for r in range(2)]
    assert results[1]["ddp"]["differed_before"] and results[1]["fsdp"]["differed_before"]  # the test can fail
    for res in results:
        assert res["ddp"]["type"] == "DistributedDataParallel" and not res["ddp"]["sharded"]
        assert res["fsdp"]["sharded"] and res["fsdp"]["type"].startswith("FSDP")
        for mode in dist.MODES:
            assert res[mode]["equal_across_ranks"] and res[mode]["equal_to_rank0_init"], (mode, res)


def _fallback_worker(rank, world, port, run_dir, result_path):
    import warnings

    import torch.distributed as tdist

    from effkern.train import checkpoint as ckpt

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            saved, path = ckpt.load_for_resume(run_dir)
    finally:
        tdist.destroy_process_group()
    with open(f"{result_path}.{rank}", "w") as f:
        json.dump({"path": path, "step": saved["state"]["step"],
                   "fallback_warnings": [str(w.message) for w in caught
                                         if issubclass(w.category, ckpt.CheckpointFallbackWarning)]}, f)


def test_checkpoint_fallback_warning_only_on_rank0(tmp_path):
    """Every rank resumes from checkpoint.prev.pt when checkpoint.pt is damaged; only rank 0 says so."""
    from effkern.train import checkpoint as ckpt

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt.save_atomic({"cfg": {}, "state": {"step": 3}, "method": {}, "optimizer": {}, "rng": ckpt.rng_state(),
                      "history": []}, str(run_dir), name=ckpt.PREVIOUS)
    (run_dir / ckpt.CHECKPOINT).write_bytes(b"")  # a save killed mid-write
    path = str(tmp_path / "fallback")
    mp.spawn(_fallback_worker, args=(2, _free_port(), str(run_dir), path), nprocs=2, join=True)
    results = [json.load(open(f"{path}.{r}")) for r in range(2)]
    for res in results:
        assert res["path"] == str(run_dir / ckpt.PREVIOUS) and res["step"] == 3, res
    assert len(results[0]["fallback_warnings"]) == 1 and "resuming from" in results[0]["fallback_warnings"][0]
    assert results[1]["fallback_warnings"] == []


def _train_worker(rank, world, port, cfg_dict):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(TrainConfig.from_dict(cfg_dict))


def test_fsdp2_on_two_gloo_processes_matches_one_process_also_across_a_resume(tmp_path):
    # DINO: sharded student, head and teacher copies (the EMA runs shard by shard), the centre
    # all-reduced over ranks; its head has no BatchNorm, so each rank's loss is its shard's
    overrides = dict(method="dino", method_kwargs={"out_dim": 40, "hidden_dim": 32, "bottleneck_dim": 16,
                                                   "n_local": 2, "local_size": 8}, limit_train=128,
                     model_kwargs={"depth": 1, "patch_size": 4, "embed_dim": 64, "num_heads": 2,
                                   "drop_path_rate": 0.0})
    single = tiny_cfg(tmp_path, "single", **overrides)
    train(single)
    multi = tiny_cfg(tmp_path, "fsdp", fsdp=True, **overrides)
    # stopped after 2 steps and resumed: the sharded state goes through a checkpoint on the way
    mp.spawn(_train_worker, args=(2, _free_port(), {**multi.to_dict(), "stop_after_steps": 2}), nprocs=2, join=True)
    mp.spawn(_train_worker, args=(2, _free_port(), {**multi.to_dict(), "resume": True}), nprocs=2, join=True)
    assert len(losses(multi.out_dir)) == len(losses(single.out_dir)) >= 4
    assert losses(multi.out_dir) == pytest.approx(losses(single.out_dir), rel=1e-4, abs=1e-6)
    # the checkpoint holds whole tensors under the single-process keys, equal to one process's weights
    # (to 1e-4: the attention key bias, whose exact gradient is zero, moves on rounding noise that
    # Adam's normalisation amplifies to ~2e-5 here)
    one = torch.load(os.path.join(single.out_dir, "checkpoint.pt"), weights_only=False)["method"]
    two = torch.load(os.path.join(multi.out_dir, "checkpoint.pt"), weights_only=False)["method"]
    assert sorted(one) == sorted(two)
    for key in one:
        assert type(two[key]) is torch.Tensor and two[key].shape == one[key].shape, key
        assert torch.allclose(two[key].float(), one[key].float(), rtol=1e-3, atol=1e-4), key


_SYNCS = ("__float__", "__int__", "__bool__", "item", "tolist")


@pytest.mark.parametrize("name", ["mocov3", "simclr", "dino", "supervised"])
def test_training_step_reads_nothing_back_to_the_host(name, monkeypatch):
    from effkern.schedules import Stage

    method = _tiny_method(name)
    views = [torch.randn(4, 3, v.size, v.size) for v in method.view_plan(16)]
    labels = torch.randint(0, 10, (4,))
    method.training_step(views, labels, Stage(), 0.5)  # warm-up: first-call set-up may read shapes

    def guarded(attr):
        real = getattr(torch.Tensor, attr)

        def read_back(self, *args):
            caller = sys._getframe(1).f_code.co_filename
            if os.sep.join(("effkern", "train", "methods")) in caller:
                raise AssertionError(f"Tensor.{attr} in {caller}: a read-back to the host in training_step")
            return real(self, *args)  # the ops' own argument checks are not the methods' business

        return read_back

    for attr in _SYNCS:
        monkeypatch.setattr(torch.Tensor, attr, guarded(attr))
    loss, metrics = method.training_step(views, labels, Stage(), 0.5)
    monkeypatch.undo()
    assert isinstance(loss, torch.Tensor) and isinstance(metrics["loss"], torch.Tensor)
    assert not metrics["loss"].requires_grad and torch.isfinite(loss)


def test_sync_batchnorm_on_cpu_is_a_clear_error(monkeypatch):
    method = _tiny_method("simclr")
    method.projector = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method.projector)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="sync_bn=false"):
        dist.wrap_step(method, torch.device("cpu"))
    with pytest.raises(ValueError, match="mode"):
        dist.wrap_step(method, torch.device("cpu"), "zero3")
