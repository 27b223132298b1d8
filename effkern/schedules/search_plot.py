"""Outputs of effkern.schedules.search: search.csv, search.md and per-checkpoint heatmaps
(CA-MSE, bias2, cost-adjusted variance over keep x patch size)."""

from __future__ import annotations

import csv
import math
import os
from typing import Sequence

from effkern.schedules.stage import Stage

COLUMNS = ("progress", "checkpoint", "name", "patch_size", "keep", "cost", "bias2", "bias2_raw", "var", "cav",
           "camse", "argmin", "chosen")
METRICS = (("camse", "CA-MSE"), ("bias2", "bias$^2$"), ("cav", "cost-adjusted variance"))


def _keep_str(stage) -> str:
    if not isinstance(stage, Stage) or not stage.keep:
        return "1"
    vals = {v for _, v in stage.keep}
    if len(vals) == 1:
        return f"{next(iter(vals)):g}"
    return "/".join(f"{b}{v:g}" for b, v in stage.keep)


def _patch_str(stage) -> str:
    p = getattr(stage, "patch_size", None)
    return "native" if p is None else str(p)


def flat_rows(tables: Sequence[Sequence[dict]]) -> tuple[list[str], list[dict]]:
    groups = sorted({g for rows in tables for r in rows for g in r.get("groups", {})})
    cols = list(COLUMNS) + [f"{m}[{g}]" for g in groups for m in ("bias2", "var", "cav", "camse")]
    out = []
    for rows in tables:
        for r in rows:
            d = {"progress": r.get("progress"), "checkpoint": r.get("checkpoint") or "init", "name": r["name"],
                 "patch_size": _patch_str(r["stage"]), "keep": _keep_str(r["stage"]),
                 **{k: r.get(k) for k in ("cost", "bias2", "bias2_raw", "var", "cav", "camse", "argmin", "chosen")}}
            for g, st in r.get("groups", {}).items():
                for m in ("bias2", "var", "cav", "camse"):
                    d[f"{m}[{g}]"] = st[m]
            out.append(d)
    return cols, out


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_tables(tables: Sequence[Sequence[dict]], out_dir: str) -> None:
    """search.csv (every column, per-group included) and search.md (the totals)."""
    cols, rows = flat_rows(tables)
    with open(os.path.join(out_dir, "search.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    md_cols = [c for c in COLUMNS if c != "checkpoint"]
    lines = ["| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in md_cols) + " |" for r in rows]
    with open(os.path.join(out_dir, "search.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_heatmaps(tables: Sequence[Sequence[dict]], out_dir: str) -> list[str]:
    """heatmap_<k>.png per checkpoint: one panel per metric, rows keep, columns patch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    for k, rows in enumerate(tables):
        patches = list(dict.fromkeys(_patch_str(r["stage"]) for r in rows))
        keeps = list(dict.fromkeys(_keep_str(r["stage"]) for r in rows))
        fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 0.6 * len(keeps) + 2.2))
        for ax, (key, title) in zip(axes, METRICS):
            grid = np.full((len(keeps), len(patches)), np.nan)
            for r in rows:
                v = r[key]
                grid[keeps.index(_keep_str(r["stage"])), patches.index(_patch_str(r["stage"]))] = \
                    v if v is not None and math.isfinite(v) else np.nan
            im = ax.imshow(grid, cmap="viridis", aspect="auto")
            for i in range(len(keeps)):
                for j in range(len(patches)):
                    if np.isfinite(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", color="w", fontsize=8)
            for r in rows:
                if r.get("chosen"):
                    ax.add_patch(plt.Rectangle((patches.index(_patch_str(r["stage"])) - 0.5,
                                                keeps.index(_keep_str(r["stage"])) - 0.5), 1, 1, fill=False,
                                               edgecolor="red", linewidth=2))
            ax.set_xticks(range(len(patches)), patches)
            ax.set_yticks(range(len(keeps)), keeps)
            ax.set_xlabel("patch size")
            ax.set_ylabel("keep")
            ax.set_title(title)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(f"checkpoint {k}: progress {rows[0].get('progress', float('nan')):.3g} (red: chosen)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"heatmap_{k}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
