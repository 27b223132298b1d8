"""`effkern schedule search` end to end (reference run checkpointed by the command
itself) and the shipped aaip-* presets."""

import json
import subprocess
import sys

import pytest

from effkern.schedules import PRESETS, ModelCfg, get_schedule
from effkern.schedules.cost import default_views_fn, view_cost


def test_search_command_writes_a_schedule_train_can_use(tmp_path):
    out = tmp_path / "search"
    common = ["--data", "digits", "--base-size", "16", "--limit-train", "256", "--limit-test", "64",
              "--batch-size", "32", "--model-arg", "depth=1", "--model-arg", "patch_size=4",
              "--model-arg", "embed_dim=64", "--model-arg", "num_heads=2", "--method-arg", "mlp_dim=32",
              "--method-arg", "out_dim=16"]
    res = subprocess.run([sys.executable, "-m", "effkern", "schedule", "search", "--method", "mocov3", *common,
                          "--checkpoints", "0,0.5,1", "--keeps", "1", "0.5", "--n-batches", "2", "--repeats", "2",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    for name in ("schedule.json", "search.csv", "search.md", "heatmap_0.png", "heatmap_2.png"):
        assert (out / name).exists(), name
    assert (out / "reference" / "checkpoint_p0.5.pt").exists()
    schedule = get_schedule(f"file:{out / 'schedule.json'}")
    assert schedule.name == "aaip-mocov3"
    res = subprocess.run([sys.executable, "-m", "effkern", "train", "--method", "mocov3", *common,
                          "--epochs-equivalent", "0.5", "--schedule", f"file:{out / 'schedule.json'}", "--no-progress",
                          "--out", str(tmp_path / "train")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert json.load(open(tmp_path / "train" / "summary.json"))["steps"] >= 4


def test_a_rerun_search_reuses_the_reference_pieces_an_interrupted_one_finished(tmp_path):
    import torch

    out = tmp_path / "search"
    common = ["--data", "digits", "--base-size", "16", "--limit-train", "256", "--limit-test", "64",
              "--batch-size", "32", "--model-arg", "depth=1", "--model-arg", "patch_size=4",
              "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2", "--method-arg", "mlp_dim=32",
              "--method-arg", "out_dim=16", "--epochs-equivalent", "1.5", "--checkpoints", "0,0.5,0.52,1",
              "--keeps", "1", "0.5", "--n-batches", "1", "--repeats", "2", "--out", str(out)]

    def search(*extra):
        res = subprocess.run([sys.executable, "-m", "effkern", "schedule", "search", "--method", "mocov3",
                              *common, *extra], capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def weights(q):
        saved = torch.load(out / "reference" / f"checkpoint_p{q}.pt", weights_only=True)
        return saved["state"]["step"], saved["method"]

    first = search("--n", "1", "4")  # two n from one estimation: each n's files in n<n>/
    assert "earlier search" not in first and "## n = 1" in first and "## n = 4" in first
    for n in ("1", "4"):
        assert json.load(open(out / f"n{n}" / "search.json"))["n"] == float(n)
        assert (out / f"n{n}" / "heatmap_0.png").exists() and (out / f"n{n}" / "schedule.json").exists()
    step_half, _ = weights(0.5)
    step_end, end = weights(1)
    # the last point is the run's last step (12: 1.5 epochs of 8 batches; budget // step cost is 11.999..);
    # 0.52 rounds to 0.5's step, a copy of it
    assert step_end == 12 and weights(0.52)[0] == step_half == 6
    (out / "reference" / "checkpoint_p1.pt").unlink()  # killed in the second piece
    stdout = search()
    assert f"steps 1-{step_half} from the checkpoints an earlier search left" in stdout
    assert f"{step_end - step_half} steps trained now" in stdout
    step, again = weights(1)
    assert step == step_end and again.keys() == end.keys()
    assert all(torch.equal(again[k], end[k]) for k in end)  # exact resume: the same weights
    # other settings (another LR): nothing of the earlier run is reused
    assert "earlier search" not in search("--lr", "1e-3")


@pytest.mark.parametrize("bad, option", [(["--checkpoints", "0,1.5"], "--checkpoints"), (["--n", "0"], "--n"),
                                         (["--n", "4", "4"], "--n")])
def test_search_command_rejects_bad_settings_before_training(tmp_path, bad, option):
    res = subprocess.run([sys.executable, "-m", "effkern", "schedule", "search", "--data", "digits", *bad,
                          "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and option in res.stderr and len(res.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "s" / "reference").exists()


@pytest.mark.parametrize("name", ["aaip-mocov3", "aaip-simclr", "aaip-dino"])
def test_aaip_presets_ship_and_decompress_monotonically(name):
    assert name in PRESETS
    schedule = get_schedule(name)
    assert schedule.name == name and schedule.stages[0][0] == 0.0
    def cost(cfg, stage):
        return sum(view_cost(cfg, v) for v in default_views_fn(cfg)(stage))

    small = ModelCfg(img_size=32, patch_size=4, embed_dim=96, depth=2, num_heads=3)
    costs = [cost(small, stage) for _, stage in schedule.stages]
    assert costs == sorted(costs), costs  # never cheaper later: a monotone decompression
    # on a patch-16 model at 224 px no stage costs more than the native forward: the presets'
    # patch is the model's own (they were derived on a native-patch-4 model; a stored "patch 4"
    # meant 3136 tokens here instead of 196)
    big = ModelCfg(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3)
    native = cost(big, get_schedule("none").stages[0][1])
    for _, stage in schedule.stages:
        assert cost(big, stage) <= native * (1 + 1e-9), stage
