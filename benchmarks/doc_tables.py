"""Rewrite the benchmark tables of docs/timm.md and docs/benchmarks.md from the committed JSON.

    python benchmarks/doc_tables.py            # rewrite the docs in place
    python benchmarks/doc_tables.py --check    # exit 1 if a table is out of date

Each table sits between ``<!-- table:NAME:KIND -->`` and ``<!-- end table -->``, where NAME
is a result file in benchmarks/results/ (without .json) and KIND is ``steps`` (`effkern
bench vit`: ms per step, speedups, FLOP prediction), ``breakdown`` (`bench vit`: ms per
category, saved activations) or ``train`` (`effkern bench step`: whole train steps with
the data time, the cost model's prediction and the breakdown).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "docs" / "timm.md", ROOT / "docs" / "benchmarks.md")
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w.-]+):(?P<kind>steps|breakdown|train) -->\n)(?P<body>.*?)"
                   r"(<!-- end table -->)", re.S)


def _setting(row) -> str:
    """'vit_ti16_d6 b32 p16 keep1' -> 'p16 keep1' (model and batch are in the prose)."""
    return " ".join(row["shape"].split()[2:])


def _ratio(row, peer: str) -> str:
    r = row["ratios"].get(peer)
    return "" if r is None else f"{r:.2f}x"


def steps_table(rows) -> str:
    out = ["| setting | impl | ms / step (min-max) | vs timm | vs timm same tokens | predicted "
           "| measured / predicted |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        ex = row["extra"]
        pred = ex.get("predicted_speedup")
        mp = ex.get("measured/predicted")
        out.append(f"| {_setting(row)} | {row['impl']} | {row['ms']:.0f} ({ex['ms_min']:.0f}-{ex['ms_max']:.0f}) | "
                   f"{_ratio(row, 'timm')} | {_ratio(row, 'timm same tokens')} | "
                   f"{'' if pred is None else f'{pred:.2f}'} | {'' if mp is None else f'**{mp:.2f}**'} |")
    return "\n".join(out) + "\n"


def breakdown_table(rows) -> str:
    cats = ("embed", "attention", "matmul", "norm_act", "gather", "other")
    out = ["| setting | impl | embed | attention | matmul | norm/act | gather | other | saved activations MiB |",
           "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ex = row["extra"]
        if f"t_{cats[0]}" not in ex:
            raise SystemExit(f"{row['shape']}: no breakdown in the results (run with --breakdown)")
        vals = " | ".join(f"{ex[f't_{c}']:.0f}" for c in cats)
        out.append(f"| {_setting(row)} | {row['impl']} | {vals} | {ex['peak_mem_mib']:.0f} |")
    return "\n".join(out) + "\n"


def train_table(rows) -> str:
    """`effkern bench step` rows: 'mocov3 b32 224px const:keep=0.25' -> schedule 'const:keep=0.25'."""
    cats = ("data", "embed", "attention", "matmul", "norm_act", "gather", "optimizer", "other")
    head = ("| schedule | ms / step (min-max) | data ms | model + optimizer ms | vs none | predicted "
            "| measured / predicted | " + " | ".join(c.replace("norm_act", "norm/act") for c in cats)
            + " | saved activations MiB |")
    out = [head, "|" + "---|" * (len(cats) + 8)]
    for row in rows:
        ex = row["extra"]
        pred, mp, vs = ex.get("predicted_speedup"), ex.get("measured/predicted"), row["ratios"].get("baseline")
        parts = " | ".join(f"{ex[f't_{c}']:.0f}" if f"t_{c}" in ex else "" for c in cats)
        out.append(f"| {row['shape'].split()[-1]} | {row['ms']:.0f} ({ex['ms_min']:.0f}-{ex['ms_max']:.0f}) | "
                   f"{ex['data_ms']:.0f} | {ex['step_ms']:.0f} | {'' if vs is None else f'{vs:.2f}x'} | "
                   f"{'' if pred is None else f'{pred:.2f}'} | {'' if mp is None else f'**{mp:.2f}**'} | "
                   f"{parts} | {ex['peak_mem_mib']:.0f} |")
    return "\n".join(out) + "\n"


TABLES = {"steps": steps_table, "breakdown": breakdown_table, "train": train_table}


def render(text: str) -> str:
    def one(m):
        rows = json.loads((ROOT / "benchmarks" / "results" / f"{m['name']}.json").read_text())["rows"]
        return m.group(1) + TABLES[m["kind"]](rows) + m.group(5)
    return BLOCK.sub(one, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report whether the docs are current")
    args = ap.parse_args(argv)
    stale = 0
    for doc in DOCS:
        text = doc.read_text()
        new = render(text)
        if new == text:
            continue
        if args.check:
            print(f"{doc.relative_to(ROOT)}: benchmark tables differ from benchmarks/results "
                  "(run python benchmarks/doc_tables.py)")
            stale = 1
        else:
            doc.write_text(new)
    return stale


if __name__ == "__main__":
    sys.exit(main())
