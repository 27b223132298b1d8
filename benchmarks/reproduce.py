"""Reproduction study: accuracy vs compute for baseline, constant compression, the
AAIP schedule and EfficientTrain++, per method, at three budgets, on Fashion-MNIST.

    python benchmarks/reproduce.py --quick            # CPU, minutes: tiny ViT, small subsets
    python benchmarks/reproduce.py --device cuda      # the full study (needs a GPU)

Every run is an ``effkern train`` run (same code path as the CLI).  For each
method the script writes the kNN top-1 of every (schedule, budget) run and
``docs/results.md``: a table, a plot of kNN accuracy vs budget per method, and
the compute saved at equal accuracy -- for each compressed run, the budget the
baseline needs (linear interpolation of its accuracy-vs-budget curve) to reach
the same accuracy, divided by the budget the compressed run used.  The papers'
claims (ImageNet, ViT-B, hundreds of epochs: MoCo v3 4x, SimCLR 3.3x, DINO 2.5x)
are not what a few CPU minutes on 28 px images can test: this is a small-scale
check of the same shape, and it says so in its output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

METHODS = ("mocov3", "simclr", "dino")
QUICK = dict(model_kwargs={"depth": 2, "patch_size": 4, "embed_dim": 96, "num_heads": 3}, base_size=32,
             limit_train=4000, limit_test=1000, batch_size=128, budgets=(0.25, 0.5, 1.0))
FULL = dict(model_kwargs={"depth": 12, "patch_size": 4}, base_size=32, limit_train=None, limit_test=None,
            batch_size=256, budgets=(10.0, 20.0, 40.0))
METHOD_KWARGS = {"quick": {"mocov3": {"mlp_dim": 256, "out_dim": 64}, "simclr": {"hidden_dim": 256, "out_dim": 64},
                           "dino": {"out_dim": 1024, "hidden_dim": 256, "bottleneck_dim": 64, "n_local": 4}},
                 "full": {"mocov3": {}, "simclr": {}, "dino": {"out_dim": 8192}}}


def schedules_for(method: str) -> list[str]:
    from effkern.schedules import PRESETS

    names = ["none", "const:keep=0.5"]
    if f"aaip-{method}" in PRESETS:
        names.append(f"aaip-{method}")
    names.append("efficienttrain++")
    return names


def run_one(method, schedule, epochs, setting, kind, device, out_root) -> dict:
    from effkern.train.config import TrainConfig
    from effkern.train.loop import train

    out_dir = os.path.join(out_root, method, schedule.replace(":", "_").replace("=", "").replace(",", "_"),
                           f"e{epochs}")
    summary_path = os.path.join(out_dir, "summary.json")
    if os.path.exists(summary_path):  # resumable study: finished runs are kept
        with open(summary_path) as f:
            return json.load(f)
    cfg = TrainConfig(method=method, model_kwargs=dict(setting["model_kwargs"]),
                      method_kwargs=dict(METHOD_KWARGS[kind][method]), data="fashion-mnist",
                      base_size=setting["base_size"], limit_train=setting["limit_train"],
                      limit_test=setting["limit_test"], epochs_equivalent=epochs, schedule=schedule,
                      batch_size=setting["batch_size"], lr=1.5e-3, device=device, out_dir=out_dir,
                      progress_bar=False, log_every=50)
    return train(cfg)


def budget_to_reach(curve: list[tuple[float, float]], acc: float) -> str:
    """The baseline budget needed for accuracy ``acc``, read off the baseline's best-so-far
    curve (the highest accuracy reached at or below each budget: noisy short runs make the
    raw curve non-monotone), linearly interpolated.  "<= b0" below the smallest run,
    "> b_max" when ``acc`` beats every baseline run."""
    curve = sorted(curve)
    envelope, best = [], float("-inf")
    for b, a in curve:
        best = max(best, a)
        envelope.append((b, best))
    if acc <= envelope[0][1]:
        return f"<= {envelope[0][0]:g}"
    for (b0, a0), (b1, a1) in zip(envelope, envelope[1:]):
        if a0 < acc <= a1:
            return f"{b0 + (acc - a0) * (b1 - b0) / (a1 - a0):.2f}"
    return f"> {envelope[-1][0]:g}"


def compute_saved(need: str, budget: float) -> str:
    if need.startswith("<="):
        return f"<= {float(need[2:]) / budget:.2f}x"
    if need.startswith(">"):
        return f"> {float(need[1:]) / budget:.2f}x"
    return f"{float(need) / budget:.2f}x"


def write_report(results: dict, setting: dict, kind: str, device: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path), exist_ok=True)
    wall = sum(r["wall_s"] for runs in results.values() for r in runs)
    lines = ["# Reproduction study (small scale)", "",
             f"`python benchmarks/reproduce.py {'--quick' if kind == 'quick' else ''} --device {device}`, "
             f"{time.strftime('%Y-%m-%d')}, {wall / 60:.1f} min of training steps in all.  Fashion-MNIST "
             f"({setting['limit_train'] or 60000} training images at {setting['base_size']} px), ViT "
             f"{setting['model_kwargs']}, kNN (k=20, T=0.07) top-1 on {setting['limit_test'] or 10000} test images.",
             "Budgets are in epochs-equivalent of each method's uncompressed baseline.  \"Baseline budget for "
             "the same accuracy\" reads the baseline's best-so-far accuracy curve; \"compute saved\" is that "
             "budget over the run's own.  images/s was measured while other jobs shared the 2 CPU cores: "
             "compare it only within one table, roughly.", "",
             "**Scale:** the papers' claims (ImageNet, ViT-B, 100-300 epochs: MoCo v3 4x, SimCLR 3.3x, DINO "
             "2.5x less compute at equal accuracy) cannot be tested by minutes of CPU training on 28 px images; "
             "this is a check of the same shape, not a reproduction of the numbers.", ""]
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (method, runs) in zip(axes[0], results.items()):
        lines += [f"## {method}", "", "| schedule | budget (epochs-eq.) | steps | images/s | kNN top-1 | "
                  "baseline budget for the same accuracy | compute saved |", "|---|---|---|---|---|---|---|"]
        baseline = [(r["epochs"], r["knn_acc"]) for r in runs if r["schedule"] == "none"]
        for schedule in dict.fromkeys(r["schedule"] for r in runs):
            pts = sorted((r["epochs"], r["knn_acc"]) for r in runs if r["schedule"] == schedule)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=schedule)
            for r in (r for r in runs if r["schedule"] == schedule):
                need = budget_to_reach(baseline, r["knn_acc"])
                saved = compute_saved(need, r["epochs"]) if schedule != "none" else "-"
                lines.append(f"| {schedule} | {r['epochs']} | {r['steps']} | {r['images_per_s']:.0f} | "
                             f"{100 * r['knn_acc']:.2f}% | {need} | {saved} |")
        lines.append("")
        ax.set(title=method, xlabel="budget (epochs-equivalent of the baseline)", ylabel="kNN top-1 (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(os.path.dirname(path), "results_knn_vs_budget.png")
    fig.savefig(png, dpi=90)
    lines += [f"![kNN accuracy vs budget]({os.path.basename(png)})", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the CPU-sized study (minutes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--report", default="docs/results.md")
    args = p.parse_args(argv)
    kind = "quick" if args.quick else "full"
    setting = QUICK if args.quick else FULL
    results: dict = {}
    for method in args.methods:
        for schedule in schedules_for(method):
            for epochs in setting["budgets"]:
                summary = run_one(method, schedule, epochs, setting, kind, args.device, args.out)
                results.setdefault(method, []).append({**summary, "schedule": schedule, "epochs": epochs})
                print(f"{method:8s} {schedule:24s} {epochs:5} epochs-eq  steps {summary['steps']:5d}  "
                      f"kNN {100 * summary['knn_acc']:.2f}%", flush=True)
    write_report(results, setting, kind, args.device, args.report)
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
