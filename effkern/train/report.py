"""End-of-run artefacts: PNG plots (loss and kNN accuracy vs budget spent, the
schedule's stages) and the summary table printed by ``effkern train``."""

from __future__ import annotations

import os


def write_plots(out_dir: str, history: list[dict], schedule, budget: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    losses = [(h["spent"] / budget * 100, h["loss"]) for h in history if "loss" in h]
    knn = [(h["spent"] / budget * 100, 100 * h["knn"]) for h in history if "knn" in h]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if losses:
        axes[0].plot(*zip(*losses), lw=1)
    axes[0].set(xlabel="budget spent (%)", ylabel="loss", title="training loss")
    if knn:
        axes[1].plot(*zip(*knn), marker="o")
    axes[1].set(xlabel="budget spent (%)", ylabel="kNN top-1 (%)", title="kNN accuracy")
    starts = [s for s, _ in schedule.stages] + [1.0]
    for (start, stage), end in zip(schedule.stages, starts[1:]):
        label = stage.name or f"p={stage.patch_size} res={stage.resolution:.2f}"
        axes[2].barh(0, (end - start) * 100, left=start * 100, height=0.5)
        axes[2].text((start + end) * 50, 0, label, ha="center", va="center", fontsize=7, rotation=90)
    axes[2].set(xlabel="budget spent (%)", yticks=[], title=f"schedule: {schedule.name}", xlim=(0, 100))
    fig.tight_layout()
    path = os.path.join(out_dir, "training.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)
    return paths


def summary_table(rows: list[dict]) -> str:
    """Markdown table of run summaries (one row per run)."""
    probe = any("probe_acc" in r for r in rows)
    header = ["run", "method", "schedule", "budget (M units)", "used", "steps", "wall (s)", "images/s", "kNN top-1"]
    header += ["linear probe top-1"] if probe else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.get("run", "-"), r["method"], r["schedule"], f"{r['budget_units'] / 1e6:.3f}",
                 f"{100 * r['budget_used']:.1f}%", str(r["steps"]), f"{r['wall_s']:.1f}", f"{r['images_per_s']:.0f}",
                 f"{100 * r['knn_acc']:.2f}%"]
        if probe:
            cells.append(f"{100 * r['probe_acc']:.2f}%" if "probe_acc" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
