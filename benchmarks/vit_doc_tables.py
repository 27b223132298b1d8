"""Rewrite the `effkern bench vit` tables of docs/timm.md from the committed JSON results.

    python benchmarks/vit_doc_tables.py            # rewrite docs/timm.md in place
    python benchmarks/vit_doc_tables.py --check    # exit 1 if docs/timm.md is out of date

Each table sits between ``<!-- table:NAME:KIND -->`` and ``<!-- end table -->``, where NAME
is a result file in benchmarks/results/ (without .json) and KIND is ``steps`` (ms per
step, speedups, FLOP prediction) or ``breakdown`` (ms per category, saved activations).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "timm.md"
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w.-]+):(?P<kind>steps|breakdown) -->\n)(?P<body>.*?)(<!-- end table -->)",
                   re.S)


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


def render(text: str) -> str:
    def one(m):
        rows = json.loads((ROOT / "benchmarks" / "results" / f"{m['name']}.json").read_text())["rows"]
        body = steps_table(rows) if m["kind"] == "steps" else breakdown_table(rows)
        return m.group(1) + body + m.group(5)
    return BLOCK.sub(one, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report whether docs/timm.md is current")
    args = ap.parse_args(argv)
    text = DOC.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("docs/timm.md: bench vit tables differ from benchmarks/results (run benchmarks/vit_doc_tables.py)")
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
