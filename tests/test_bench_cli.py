"""``effkern bench vit`` and ``effkern bench step`` end to end at toy sizes: every setting
is timed, the peers and predictions are attached, the breakdown adds up."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("timm")

from effkern.cli import main  # noqa: E402


def _table(capsys) -> list[list[str]]:
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_bench_vit_interleaved_rows(tmp_path, capsys):
    out = tmp_path / "vit"
    assert main(["bench", "vit", "--device", "cpu", "--models", "vit_ti16_d2", "--img", "32", "--batch", "2",
                 "--keeps", "1,0.5", "--patches", "32", "--combos", "16:0.25", "--repeat", "2", "--breakdown",
                 "--out", str(out)]) == 0
    import json

    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    shapes = [r["shape"] for r in rows]
    assert any("moco" in s and "one 2B batch" in s for s in shapes)
    assert any("dino" in s and "global keep0.5" in s for s in shapes)
    for r in rows:
        assert math.isfinite(r["ms"]) and r["ms"] > 0, r
        assert r["extra"]["ms_min"] <= r["ms"] <= r["extra"]["ms_max"]
        assert r["extra"]["peak_mem_mib"] > 0
        parts = [r["extra"][k] for k in ("t_embed", "t_attention", "t_matmul", "t_norm_act", "t_gather", "t_other")]
        assert all(p >= 0 for p in parts) and sum(parts) > 0
        if r["impl"] == "effkern":  # every effkern setting has its timm peer and a FLOP prediction
            assert r["ratios"]["timm"] > 0 and r["extra"]["predicted_speedup"] >= 1.0
            assert r["extra"]["measured/predicted"] == pytest.approx(
                r["ratios"]["timm"] / r["extra"]["predicted_speedup"])
    singles = [r for r in rows if r["impl"] == "effkern" and "moco" not in r["shape"] and "dino" not in r["shape"]]
    for r in singles:  # timm doing the same token work (PatchDropout / built at the patch) beside it
        assert ("timm same tokens" in r["ratios"]) == (not r["shape"].endswith("p16 keep1")), r["shape"]
    assert any(r["shape"].endswith("p16 keep0.5 timm PatchDropout") for r in rows)
    assert any(r["shape"].endswith("p32 keep1 timm at this patch") for r in rows)
    keep = {r["shape"].split()[-1]: r for r in singles if " p16 " in r["shape"] + " "}
    assert keep["keep0.5"]["extra"]["predicted_speedup"] > keep["keep1"]["extra"]["predicted_speedup"]
    assert (out.with_suffix(".md")).read_text().count("| vit_ti16_d2") == len(rows)


def test_bench_step_schedules_interleaved(capsys):
    assert main(["bench", "step", "--device", "cpu", "--data", "digits", "--size", "16", "--batch", "8",
                 "--limit-train", "128", "--schedules", "none;const:keep=0.5", "--repeat", "1", "--breakdown"]) == 0
    rows = _table(capsys)
    header, body = rows[0], rows[1:]
    assert len(body) == 2 and body[0][0].endswith("none") and body[1][0].endswith("const:keep=0.5")
    col = {name: i for i, name in enumerate(header)}
    assert body[0][col["vs baseline"]] == "" and body[1][col["vs baseline"]].endswith("x")
    assert float(body[1][col["predicted_speedup"]]) > 1.2  # keep 0.5 of 16 tokens per view, heads included
    for row in body:
        assert float(row[col["ms"]]) > 0 and float(row[col["data_ms"]]) > 0 and float(row[col["t_optimizer"]]) > 0


def test_docs_benchmark_tables_are_current():
    """The bench vit / bench step tables of docs/timm.md and docs/benchmarks.md are the
    committed JSON results, and the check can fail."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "doc_tables.py"
    spec = importlib.util.spec_from_file_location("doc_tables", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    timm_doc, bench_doc = (doc.read_text() for doc in mod.DOCS)
    assert timm_doc.count("<!-- table:") == 3 and bench_doc.count("<!-- table:") == 2  # + the H200 vit table
    for text in (timm_doc, bench_doc):
        assert mod.render(text) == text, "run python benchmarks/doc_tables.py"
    stale = bench_doc.replace("| const:keep=0.25 |", "| const:keep=0.25 | 1 |", 1)
    assert stale != bench_doc and mod.render(stale) != stale


def test_a_benchmark_cut_short_keeps_its_finished_rows(tmp_path, monkeypatch):
    """report_partial: rows handed over before a benchmark dies are already in --out."""
    import types

    from effkern import bench
    from effkern.bench.common import Row, report_partial

    def run(args):
        report_partial(args, [Row("op", "first workload", "effkern", "float32", 1.5)])
        raise KeyboardInterrupt  # what a time limit does to the process, in effect

    fake = types.SimpleNamespace(add_arguments=lambda parser: None, run=run)
    monkeypatch.setattr(bench, "load", lambda name: fake)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "attention", "--device", "cpu", "--out", str(out)])
    text = (tmp_path / "cut.md").read_text()
    assert "(partial: run in progress)" in text and "| first workload | effkern |" in text
