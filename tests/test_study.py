"""The study's bookkeeping (benchmarks/study.py), without training anything: finished cells
are skipped, final cells wait for their budget's tuning grid and then take its best
validation HPs, the compute-saved factor and its bootstrap interval on synthetic inputs,
and the summary / report only from the cells that exist."""

import importlib.util
import math
import os

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "study", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "study.py"))
study = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(study)


@pytest.fixture(autouse=True)
def _private_runs(tmp_path, monkeypatch):
    """Run directories and cell claims of these tests live in tmp, never in the repository's runs/."""
    monkeypatch.setattr(study, "RUNS", str(tmp_path / "runs"))


def _finish_tuning(results, method, images, best=(64, 2e-3)):
    for batch in study.GRID_BATCH:
        for lr in study.GRID_LR:
            acc = 0.8 if (batch, lr) == best else 0.5 + 0.01 * study.GRID_LR.index(lr)
            study.write_result(study.tune_cell(method, images, batch, lr), {"knn_acc": acc, "steps": 1}, results)


def test_finished_cells_are_skipped_and_runs_resume_in_order(tmp_path, monkeypatch):
    results = str(tmp_path / "results")
    cells = study.plan("mocov3", results)
    todo = study.pending(cells, results)
    assert todo[0]["kind"] == "reference" and todo[1]["kind"] == "tune"
    assert len({study.cell_id(c) for c in cells}) == len(cells)  # every cell has its own id / directory
    study.write_result(todo[1], {"knn_acc": 0.7, "steps": 1500}, results)
    assert study.load_result(todo[1], results)["knn_acc"] == 0.7
    assert study.cell_id(todo[1]) not in {study.cell_id(c) for c in study.pending(study.plan("mocov3", results),
                                                                                   results)}
    ran = []
    monkeypatch.setattr(study, "run_cell", lambda cell: ran.append(study.cell_id(cell)) or {"knn_acc": 0.1,
                                                                                            "steps": 1})
    assert study.main(["run", "--results", results, "--stage", "tune", "--max-cells", "2"]) == 0
    assert ran == [study.cell_id(c) for c in todo[2:4]]  # the next two, the finished one skipped
    ran.clear()
    assert study.main(["run", "--results", results, "--stage", "tune", "--max-cells", "2"]) == 0
    assert ran == [study.cell_id(c) for c in todo[4:6]]  # a second invocation continues


def test_final_cells_wait_for_tuning_and_take_the_best_validation_hps(tmp_path):
    results = str(tmp_path)
    first = study.ANCHOR_IMAGES
    blocked = [c for c in study.plan("mocov3", results) if c["kind"] == "final" and c["images"] == first]
    assert blocked and all(c.get("blocked") == "tuning" for c in blocked)
    assert study.pending(blocked, results) == []
    _finish_tuning(results, "mocov3", first, best=(64, 2e-3))
    assert study.tuned_hp("mocov3", first, results) == (64, 2e-3)
    finals = [c for c in study.plan("mocov3", results) if c["kind"] == "final" and c["images"] == first]
    assert all("blocked" not in c and (c["batch"], c["lr"]) == (64, 2e-3) and c["split"] == "test" for c in finals)
    assert {c["schedule"] for c in finals} == set(study.schedules_for("mocov3"))
    assert {c["seed"] for c in finals} == set(study.SEEDS)
    # the other budgets stay blocked (their tuning has not run); tuning never uses the test split
    later = [c for c in study.plan("mocov3", results) if c["kind"] == "final" and c["images"] != first]
    assert all(c.get("blocked") == "tuning" for c in later)
    assert all(c["split"] == "val" for c in study.plan("mocov3", results) if c["kind"] == "tune")
    # the compressed schedules only at the smaller budgets
    assert {c["images"] for c in study.plan("mocov3", results) if c["kind"] == "final"
            and c["schedule"] != "none"} == set(study.COMPRESSED_BUDGETS)


def test_other_budgets_tune_the_cross_through_the_anchor_budgets_winner(tmp_path):
    results = str(tmp_path)
    first, second = study.ANCHOR_IMAGES, max(study.BUDGET_IMAGES)
    tunes = [c for c in study.plan("mocov3", results) if c["kind"] == "tune" and c["images"] == second]
    assert len(tunes) == len(study.GRID_BATCH) * len(study.GRID_LR)
    assert all(c.get("blocked") == "tuning" for c in tunes)  # the cross is not known yet
    _finish_tuning(results, "mocov3", first, best=(64, 2e-3))
    tunes = [c for c in study.plan("mocov3", results) if c["kind"] == "tune" and c["images"] == second]
    assert all("blocked" not in c for c in tunes)
    cross = {(c["batch"], c["lr"]) for c in tunes}
    assert cross == {(64, lr) for lr in study.GRID_LR} | {(b, 2e-3) for b in study.GRID_BATCH}
    assert len(cross) == len(study.GRID_LR) + len(study.GRID_BATCH) - 1
    # the winner among the cross only: an off-cross cell, however good, is not a candidate
    for batch, lr in cross:
        acc = 0.9 if (batch, lr) == (64, 2e-3) else 0.6
        study.write_result(study.tune_cell("mocov3", second, batch, lr), {"knn_acc": acc, "steps": 1}, results)
    study.write_result(study.tune_cell("mocov3", second, 128, 1e-3), {"knn_acc": 0.99, "steps": 1}, results)
    assert study.tuned_hp("mocov3", second, results) == (64, 2e-3)
    # a budget too small for batch 128 to take MIN_STEPS steps tunes batch 64 only
    small = min(study.BUDGET_IMAGES)
    assert small // 128 < study.MIN_STEPS <= small // 64
    assert {(c["batch"], c["lr"]) for c in study.plan("mocov3", results)
            if c["kind"] == "tune" and c["images"] == small} == {(64, lr) for lr in study.GRID_LR} | {(32, 2e-3)}
    # the anchor is planned (and so run) first
    assert next(c for c in study.plan("mocov3", results) if c["kind"] == "tune")["images"] == first


def test_a_winner_on_the_grids_edge_extends_the_grid_past_it_before_the_finals_run(tmp_path):
    results = str(tmp_path)
    anchor = study.ANCHOR_IMAGES
    _finish_tuning(results, "mocov3", anchor, best=(64, 4e-3))  # the largest LR of its row
    tunes = lambda: {(c["batch"], c["lr"]) for c in study.plan("mocov3", results)  # noqa: E731
                     if c["kind"] == "tune" and c["images"] == anchor}
    assert tunes() == {(b, lr) for b in study.GRID_BATCH for lr in study.GRID_LR} | {(64, 8e-3)}
    assert study.tuned_hp("mocov3", anchor, results) is None  # the finals wait for the edge step
    assert all(c.get("blocked") for c in study.plan("mocov3", results) if c["kind"] == "final"
               and c["images"] == anchor)
    # the step wins on the new edge (its column holds one batch size: no batch step): the row steps once more
    study.write_result(study.tune_cell("mocov3", anchor, 64, 8e-3), {"knn_acc": 0.85, "steps": 1}, results)
    assert tunes() - {(b, lr) for b in study.GRID_BATCH for lr in study.GRID_LR} == {(64, 8e-3), (64, 1.6e-2)}
    study.write_result(study.tune_cell("mocov3", anchor, 64, 1.6e-2), {"knn_acc": 0.86, "steps": 1}, results)
    # (64, 1.6e-2) sits on the edge again, but MAX_EDGE_STEPS = 2 steps were taken: the grid stops there
    assert study.MAX_EDGE_STEPS == 2 and study.tuned_hp("mocov3", anchor, results) == (64, 1.6e-2)
    assert len(tunes()) == 9 + 2
    # the other budgets cross through the off-grid winner: its batch at every LR, its LR at every batch
    cross = {(c["batch"], c["lr"]) for c in study.plan("mocov3", results)
             if c["kind"] == "tune" and c["images"] == max(study.BUDGET_IMAGES)}
    assert cross == {(64, lr) for lr in (*study.GRID_LR, 1.6e-2)} | {(b, 1.6e-2) for b in study.GRID_BATCH}
    # the batch axis: the smallest batch of its column halves; a doubled batch with too few steps is not taken
    full = [(b, lr) for b in study.GRID_BATCH for lr in study.GRID_LR]
    assert study._edge_steps(full, (32, 2e-3), anchor) == [(16, 2e-3)]
    assert anchor // 256 < study.MIN_STEPS and study._edge_steps(full, (128, 2e-3), anchor) == []
    # a winner inside its row and column adds nothing; batch steps that leave too few steps are not taken
    small = min(study.BUDGET_IMAGES)
    assert study._edge_steps([(64, 1e-3), (64, 2e-3), (64, 4e-3), (32, 2e-3)], (64, 2e-3), small) == []
    assert small // 128 < study.MIN_STEPS


def test_finals_at_hps_a_later_tune_cell_beat_are_superseded(tmp_path):
    results = str(tmp_path)
    images = study.ANCHOR_IMAGES
    study.write_result(study.tune_cell("mocov3", images, 64, 2e-3), {"knn_acc": 0.70, "steps": 1}, results)
    final = {"kind": "final", "method": "mocov3", "schedule": "none", "images": images, "batch": 64, "lr": 2e-3,
             "seed": 0, "split": "test"}
    study.write_result(final, {"knn_acc": 0.71, "steps": 1}, results)
    entry = study.summarize(results)["methods"]["mocov3"]
    assert entry["schedules"]["none"][str(images)]["knn"]["mean"] == 0.71 and entry["superseded_finals"] == []
    study.write_result(study.tune_cell("mocov3", images, 32, 2e-3), {"knn_acc": 0.72, "steps": 1}, results)
    entry = study.summarize(results)["methods"]["mocov3"]
    assert "none" not in entry["schedules"] and entry["superseded_finals"] == [study.cell_id(final)]


def test_only_runs_an_explicitly_named_tune_cell_before_its_budgets_cross_is_known(tmp_path, monkeypatch):
    results = str(tmp_path)
    cell = study.tune_cell("mocov3", max(study.BUDGET_IMAGES), 64, 2e-3)
    assert any(study.cell_id(c) == study.cell_id(cell) and c.get("blocked") for c in study.plan("mocov3", results))
    ran = []
    monkeypatch.setattr(study, "run_cell", lambda c: ran.append(study.cell_id(c)) or {"knn_acc": 0.1, "steps": 1})
    assert study.main(["run", "--results", results, "--only", study.cell_id(cell)]) == 0
    assert ran == [study.cell_id(cell)]
    assert study.main(["run", "--results", results, "--only", study.cell_id(cell)]) == 0
    assert ran == [study.cell_id(cell)]  # finished: not run again
    final = next(c for c in study.plan("mocov3", results) if c["kind"] == "final")
    assert study.main(["run", "--results", results, "--only", study.cell_id(final)]) == 0
    assert ran == [study.cell_id(cell)]  # a blocked final cell has no HPs yet: never run


def test_budget_needed_interpolates_in_log_budget_on_the_monotone_curve():
    curve = [(1.0, 0.5), (2.0, 0.6), (4.0, 0.7)]
    assert study.budget_needed(curve, 0.6) == (pytest.approx(2.0), "=")
    assert study.budget_needed(curve, 0.65) == (pytest.approx(2 ** 1.5), "=")
    assert study.budget_needed(curve, 0.4) == (1.0, "<=")
    assert study.budget_needed(curve, 0.9) == (4.0, ">")
    # a noisy dip is flattened to the best so far
    assert study.budget_needed([(1.0, 0.5), (2.0, 0.45), (4.0, 0.7)], 0.6)[0] == pytest.approx(2 ** 1.5)
    with pytest.raises(ValueError):
        study.budget_needed([], 0.5)


def test_compute_saved_exact_and_bootstrap_interval_on_synthetic_seeds():
    baseline = {1.0: [0.5, 0.5, 0.5], 2.0: [0.6, 0.6, 0.6], 4.0: [0.7, 0.7, 0.7]}
    exact = study.compute_saved(baseline, [0.6, 0.6, 0.6], 1.0, n_boot=200)
    assert exact["factor"] == pytest.approx(2.0) and exact["interval"] == [pytest.approx(2.0)] * 2
    assert exact["bound"] == "=" and exact["censored_fraction"] == 0.0
    worse = study.compute_saved(baseline, [0.45, 0.45], 2.0, n_boot=50)
    assert worse["factor"] == pytest.approx(0.5) and worse["bound"] == "<="  # a factor below 1 is reported
    noisy = study.compute_saved({1.0: [0.49, 0.5, 0.51], 2.0: [0.58, 0.6, 0.62], 4.0: [0.7, 0.69, 0.71]},
                                [0.63, 0.65, 0.67], 1.0, n_boot=500, seed=1)
    lo, hi = noisy["interval"]
    assert lo < noisy["factor"] < hi and hi / lo > 1.1
    assert noisy["factor"] == pytest.approx(2 ** 1.5)  # the means sit exactly on the curve
    # deterministic for a seed, and the interval narrows when the seeds agree more
    assert study.compute_saved(baseline, [0.6, 0.62, 0.58], 1.0, n_boot=300, seed=3) == \
        study.compute_saved(baseline, [0.6, 0.62, 0.58], 1.0, n_boot=300, seed=3)
    tight = study.compute_saved(baseline, [0.6, 0.605, 0.595], 1.0, n_boot=300, seed=3)["interval"]
    loose = study.compute_saved(baseline, [0.6, 0.64, 0.56], 1.0, n_boot=300, seed=3)["interval"]
    assert tight[1] - tight[0] < loose[1] - loose[0]


def test_summary_and_report_only_from_finished_cells(tmp_path):
    results = str(tmp_path / "results")
    B = study.BUDGET_IMAGES
    accs = {B[0]: 0.70, B[1]: 0.74, B[2]: 0.78}
    for images, acc in accs.items():
        for seed in study.SEEDS:
            cell = {"kind": "final", "method": "mocov3", "schedule": "none", "images": images, "batch": 128,
                    "lr": 2e-3, "seed": seed, "split": "test"}
            study.write_result(cell, {"knn_acc": acc + 0.002 * seed, "probe_acc": acc + 0.05, "steps": 10}, results)
    for seed in study.SEEDS[:2]:
        cell = {"kind": "final", "method": "mocov3", "schedule": "const:keep=0.5", "images": B[0], "batch": 128,
                "lr": 2e-3, "seed": seed, "split": "test"}
        study.write_result(cell, {"knn_acc": 0.742, "probe_acc": 0.8, "steps": 20}, results)
    study.write_result({"kind": "timing", "method": "mocov3", "schedule": "const:keep=0.5", "batch": 128},
                       {"time_per_unit_ratio": 0.9, "none": {"seconds": 90.0, "steps": 10},
                        "const:keep=0.5": {"seconds": 100.0, "steps": 20}}, results)
    summary = study.summarize(results)
    m = summary["methods"]["mocov3"]
    base = m["schedules"]["none"][str(B[0])]
    assert base["seeds"] == [0, 1, 2] and base["knn"]["mean"] == pytest.approx(0.702)
    const = m["schedules"]["const:keep=0.5"][str(B[0])]
    assert const["knn"]["n"] == 2 and const["compute_saved"]["factor"] == pytest.approx(2.0, rel=0.02)
    assert const["wall_clock_saved"] == pytest.approx(0.9 * const["compute_saved"]["factor"])
    # the same inversion on the probe's curve (0.75 / 0.79 / 0.83): 0.8 sits a quarter of the way up to 384k
    assert const["compute_saved_probe"]["factor"] == pytest.approx(2 * 2 ** 0.25)
    report = str(tmp_path / "results.md")
    study.write_report(summary, {"mocov3": (12, 99)}, report)
    text = open(report).read()
    assert "| mocov3 | 12 | 99 |" in text and "simclr: no finished cell; nothing is shown" in text
    assert f"mocov3 const:keep=0.5 at {B[0] / study.TRAIN_IMAGES:.1f} epochs-eq.: factor 2.0" in text
    assert "(paper: none (a fixed-keep control" in text  # each schedule is set beside its own paper's claim
    assert study.paper_claim("mocov3", "efficienttrain++") == \
        "1.5-3x (EfficientTrain++, supervised and MAE; no claim for mocov3)"
    assert study.paper_claim("supervised", "efficienttrain++") == "1.5-3x (EfficientTrain++, supervised and MAE)"
    assert study.paper_claim("dino", "aaip-dino") == study.PAPERS["dino"]
    assert "| const:keep=0.5 | 20 (10) | 100 (90) | 0.90x |" in text  # the interleaved timing table
    assert f"| {2 * 2 ** 0.25:.2f}x [" in text  # the probe's factor, last column
    assert "## simclr" not in text  # no section for a method without cells
    assert "classifier top-1" not in text  # self-supervised cells have no classifier
    # a schedule above the largest baseline budget gets a lower bound, never a verdict
    for seed in study.SEEDS[:2]:
        cell = {"kind": "final", "method": "mocov3", "schedule": "efficienttrain++", "images": B[1], "batch": 128,
                "lr": 2e-3, "seed": seed, "split": "test"}
        study.write_result(cell, {"knn_acc": 0.9, "steps": 20}, results)
    study.write_result({"kind": "timing", "method": "mocov3", "schedule": "efficienttrain++", "batch": 128},
                       {"time_per_unit_ratio": 0.9}, results)
    summary = study.summarize(results)
    et = summary["methods"]["mocov3"]["schedules"]["efficienttrain++"][str(B[1])]["compute_saved"]
    assert "compute_saved_probe" not in summary["methods"]["mocov3"]["schedules"]["efficienttrain++"][str(B[1])]
    assert et["bound"] == ">" and et["factor"] == B[-1] / B[1] and et["censored_fraction"] == 1.0
    study.write_report(summary, {"mocov3": (14, 99)}, report)
    text = open(report).read()
    assert f"so the factor is only bounded: >= {B[-1] / B[1]:.2f}x (100% of the bootstrap draws censored" in text
    assert "efficienttrain++ at" in text and "costs compute" not in text
    f = B[-1] / B[1]
    assert f"at {B[-1] // 1000}k, the largest budget on the curve" in text
    # every draw censored above: both interval ends open; the wall-clock factor carries the same bounds
    assert et["interval_bounds"] == [">", ">"]
    assert f"| >= {f:.2f}x [>= {f:.2f}, inf) | >= {0.9 * f:.2f}x [>= {0.9 * f:.2f}, inf) |" in text
    assert math.isnan(study._stats([0.5])["std"])


def _final(results, schedule, images, seed, knn):
    cell = {"kind": "final", "method": "mocov3", "schedule": schedule, "images": images, "batch": 128,
            "lr": 2e-3, "seed": seed, "split": "test"}
    study.write_result(cell, {"knn_acc": knn, "steps": 10}, results)


def test_a_baseline_budget_joins_the_curve_only_with_enough_seeds(tmp_path):
    results = str(tmp_path)
    B = study.BUDGET_IMAGES
    for seed in study.SEEDS:
        _final(results, "none", B[0], seed, 0.70 + 0.002 * seed)
        _final(results, "none", B[1], seed, 0.74 + 0.002 * seed)
        _final(results, "aaip-mocov3", B[0], seed, 0.76)
        _final(results, "aaip-mocov3", B[1], seed, 0.80)
    _final(results, "none", B[2], 0, 0.78)  # one seed of the largest budget: kept off the curve
    m = study.summarize(results)["methods"]["mocov3"]
    assert m["baseline_curve_budgets"] == [B[0], B[1]]
    at_small = m["schedules"]["aaip-mocov3"][str(B[0])]["compute_saved"]
    at_mid = m["schedules"]["aaip-mocov3"][str(B[1])]["compute_saved"]
    assert at_small["bound"] == ">" and at_small["factor"] == B[1] / B[0]
    assert at_mid["bound"] == ">" and at_mid["factor"] == 1.0  # beats every budget on the curve, none larger
    report = str(tmp_path / "results.md")
    study.write_report(study.summarize(results), {"mocov3": (1, 1)}, report)
    text = open(report).read()
    assert "no factor yet (needs a larger baseline budget" in text and ">= 1.00x" not in text
    assert "not yet (above the baseline at every budget on its curve, none larger)" in text
    _final(results, "none", B[2], 1, 0.78)  # a second seed: the point estimate appears
    m = study.summarize(results)["methods"]["mocov3"]
    at_small = m["schedules"]["aaip-mocov3"][str(B[0])]["compute_saved"]
    assert m["baseline_curve_budgets"] == list(B) and at_small["bound"] == "="
    assert at_small["factor"] == pytest.approx(2 * 2 ** ((0.76 - 0.742) / (0.78 - 0.742)))


def test_a_baseline_that_dips_with_budget_is_flagged(tmp_path):
    results = str(tmp_path)
    B = study.BUDGET_IMAGES
    for seed in study.SEEDS[:2]:
        for images, acc in zip(B, (0.70, 0.75, 0.74)):
            _final(results, "none", images, seed, acc)
        _final(results, "const:keep=0.5", B[0], seed, 0.72)
    summary = study.summarize(results)
    assert summary["methods"]["mocov3"]["baseline_monotone"] is False
    report = str(tmp_path / "results.md")
    study.write_report(summary, {"mocov3": (1, 1)}, report)
    assert "does not rise with every budget on its curve (96k, 192k, 384k)" in open(report).read()


def test_interval_ends_set_by_censored_draws_are_printed_open():
    curve = {1.0: [0.5, 0.5], 2.0: [0.6, 0.6]}
    mixed = study.compute_saved(curve, [0.54, 0.64], 1.0, n_boot=400, seed=0)  # some draws above the curve
    assert mixed["bound"] == "=" and 0 < mixed["censored_fraction"] < 1
    assert mixed["interval_bounds"] == ["=", ">"] and study._interval_text(mixed).endswith(", inf)")
    below = study.compute_saved(curve, [0.45, 0.55], 1.0, n_boot=400, seed=0)
    assert below["interval_bounds"][0] == "<=" and study._interval_text(below).startswith("[<= 1.00, ")
    inside = study.compute_saved(curve, [0.55, 0.56], 1.0, n_boot=50)
    assert inside["interval_bounds"] == ["=", "="]
    assert study._interval_text(inside) == f"[{inside['interval'][0]:.2f}, {inside['interval'][1]:.2f}]"


def test_supervised_finals_show_the_classifiers_top1_beside_the_knn(tmp_path):
    results = str(tmp_path / "results")
    for seed, (knn, top1) in enumerate([(0.70, 0.81), (0.72, 0.85)]):
        cell = {"kind": "final", "method": "supervised", "schedule": "none", "images": study.BUDGET_IMAGES[0],
                "batch": 64, "lr": 2e-3, "seed": seed, "split": "test"}
        study.write_result(cell, {"knn_acc": knn, "classifier_acc": top1, "steps": 10}, results)
    summary = study.summarize(results)
    v = summary["methods"]["supervised"]["schedules"]["none"][str(study.BUDGET_IMAGES[0])]
    assert v["knn"]["mean"] == pytest.approx(0.71) and v["classifier"]["mean"] == pytest.approx(0.83)
    report = str(tmp_path / "results.md")
    study.write_report(summary, {"supervised": (2, 56)}, report)
    text = open(report).read()
    assert "classifier top-1 % |" in text and "| 83.00 ± 2.83 (n=2) |" in text


def test_supervised_tuning_ranks_by_the_classifier_and_its_factor_inverts_the_classifier_curve(tmp_path):
    results = str(tmp_path / "results")
    anchor = study.ANCHOR_IMAGES
    for batch, lr in [(b, lr) for b in study.GRID_BATCH for lr in study.GRID_LR] + [(16, 4e-3), (32, 8e-3)]:
        knn = 0.9 if (batch, lr) == (64, 2e-3) else 0.6  # kNN favours the centre, the classifier a corner
        top1 = 0.95 if (batch, lr) == (32, 4e-3) else 0.7
        study.write_result(study.tune_cell("supervised", anchor, batch, lr),
                           {"knn_acc": knn, "classifier_acc": top1, "steps": 1}, results)
        study.write_result(study.tune_cell("mocov3", anchor, batch, lr), {"knn_acc": knn, "steps": 1}, results)
    assert study.tuned_hp("supervised", anchor, results) == (32, 4e-3)  # its two edge steps lost
    assert study.tuned_hp("mocov3", anchor, results) == (64, 2e-3)  # self-supervised: still by kNN
    small, large = study.BUDGET_IMAGES[0], study.BUDGET_IMAGES[-1]
    for seed in study.SEEDS:  # the baseline: top-1 0.80 at the smallest budget, 0.88 at the largest (4x)
        for images, knn, top1 in ((small, 0.70, 0.80), (large, 0.78, 0.88)):
            study.write_result({"kind": "final", "method": "supervised", "schedule": "none", "images": images,
                                "batch": 32, "lr": 4e-3, "seed": seed, "split": "test"},
                               {"knn_acc": knn + 0.001 * seed, "classifier_acc": top1 + 0.001 * seed, "steps": 9},
                               results)
        study.write_result({"kind": "final", "method": "supervised", "schedule": "efficienttrain++",
                            "images": small, "batch": 32, "lr": 4e-3, "seed": seed, "split": "test"},
                           {"knn_acc": 0.74 + 0.001 * seed, "classifier_acc": 0.86 + 0.001 * seed, "steps": 9},
                           results)
    summary = study.summarize(results)
    v = summary["methods"]["supervised"]["schedules"]["efficienttrain++"][str(small)]
    # kNN 0.741 sits half-way between 0.701 and 0.781 (2x in log budget); top-1 0.861 three quarters (2 ** 1.5)
    assert v["compute_saved"]["factor"] == pytest.approx(2.0, rel=1e-6)
    assert v["compute_saved_classifier"]["factor"] == pytest.approx(2 ** 1.5, rel=1e-6)
    report = str(tmp_path / "results.md")
    study.write_report(summary, {"supervised": (30, 44)}, report)
    text = open(report).read()
    assert "the best val classifier top-1" in text and "compute saved (classifier top-1) |" in text
    assert "by the classifier's top-1 2.83x" in text


def test_interleaved_timing_alternates_runs_and_counts_the_planned_steps(tmp_path):
    from effkern.train.config import TrainConfig
    from effkern.train.loop import Run
    from effkern.train.timing import interleaved_wall_clock, steps_per_stage

    def run(schedule):
        return Run(TrainConfig(method="mocov3", model_kwargs={"depth": 1, "embed_dim": 64, "num_heads": 2},
                               method_kwargs={"mlp_dim": 32, "out_dim": 16}, data="digits", base_size=16,
                               limit_train=128, limit_test=32, epochs_equivalent=1.0, schedule=schedule,
                               batch_size=32, out_dir=str(tmp_path / schedule.replace(":", "_")),
                               progress_bar=False))

    runs = {"none": run("none"), "half": run("const:keep=0.5")}
    for r in runs.values():
        assert sum(steps_per_stage(r).values()) == r.total_steps
    order = []
    for name, r in runs.items():
        step = r.train_step
        r.train_step = lambda v, y, name=name, step=step: order.append(name) or step(v, y)
    out = interleaved_wall_clock(runs, repeats=2, warmup=1)
    assert order == ["none", "half"] * 3  # one step of each in turn, every round
    assert out["none"]["steps"] == runs["none"].total_steps and out["half"]["steps"] == runs["half"].total_steps
    assert out["half"]["steps"] > out["none"]["steps"] and out["none"]["seconds"] > 0


def test_a_cell_resumes_only_when_its_run_directory_holds_a_checkpoint(tmp_path):
    cell = study.tune_cell("mocov3", study.BUDGET_IMAGES[0], 128, 2e-3)
    cfg = study.train_config(cell, str(tmp_path))
    assert not cfg.resume and cfg.val_split == study.VAL_SPLIT and cfg.out_dir.startswith(str(tmp_path))
    os.makedirs(cfg.out_dir)
    open(os.path.join(cfg.out_dir, "checkpoint.pt"), "wb").close()
    assert study.train_config(cell, str(tmp_path)).resume


def test_report_lists_the_search_rerun_beside_the_stages_the_aaip_cells_ran(tmp_path):
    import json

    stage = {"patch_size": 4, "keep": {"default": 0.25}, "resolution": 1.0, "randaug_magnitude": None, "name": "a"}
    full = dict(stage, keep={"default": 1.0}, name="b")
    for n in (4, 1, 16):
        os.makedirs(tmp_path / "mocov3" / f"n{n}")
        stages = [{"start": 0.0, "stage": stage}] + ([{"start": 0.125, "stage": full}] if n == 4 else [])
        if n == 16:  # the search picks the uncompressed candidate everywhere: the baseline itself
            stages = [{"start": 0.0, "stage": full}]
        rows = [[{"progress": p, "cost": 1.0, "argmin": p > 0, "name": "b"},
                 {"progress": p, "cost": 0.3, "argmin": p == 0, "name": "a"}] for p in (0.0, 0.5)]
        with open(tmp_path / "mocov3" / f"n{n}" / "search.json", "w") as f:
            json.dump({"n": n, "n_batches": 8, "repeats": 4, "schedule": {"stages": stages}, "rows": rows}, f)
    lines = study._search_section("mocov3", {"aaip_stages": [{"start": 0.0, "stage": stage}]}, str(tmp_path))
    table = [line for line in lines if line.startswith("| 1") or line.startswith("| 4 ")]
    assert table == ["| 1 | 8 x 4 | 0: patch 4 keep 0.25 |",
                     "| 4 | 8 x 4 | 0: patch 4 keep 0.25; 0.125: patch 4 keep 1 |",
                     "| 16 | 8 x 4 | 0: patch 4 keep 1 |"]  # sorted by n
    baseline_itself = [line for line in lines if "schedule is the uncompressed baseline itself" in line]
    assert len(baseline_itself) == 1 and baseline_itself[0].startswith("So the n = 16 search's")
    assert f"The study's `{study.REDERIVED}` cells run the n = 1 schedule." in lines
    assert any("ran the package preset: 0: patch 4 keep 0.25." in line for line in lines)
    aliased = {"aaip_stages": [{"start": 0.0, "stage": stage}], "same_as": {"aaip-mocov3": {"schedule": "x"}}}
    assert not any("package preset" in line for line in study._search_section("mocov3", aliased, str(tmp_path)))
    assert any("has the lowest CA-MSE at progress 0.5 (checkpoints: 0, 0.5)" in line for line in lines)
    assert any("n1/heatmap_1.png" in line and "progress 0.5" in line for line in lines)
    assert study._search_section("simclr", {}, str(tmp_path)) == []  # no search: no section


def test_report_names_the_searchs_reference_settings_and_checks_them_against_the_methods_tuning(tmp_path):
    import json

    searches, results = tmp_path / "search", str(tmp_path / "results")
    os.makedirs(searches / "simclr" / "n1")
    with open(searches / "simclr" / "n1" / "search.json", "w") as f:
        json.dump({"n": 1, "n_batches": 8, "repeats": 4, "schedule": {"stages": []}, "rows": []}, f)

    def first_line():
        return study._search_section("simclr", {}, str(searches), results)[0]

    assert "settings not recorded" in first_line()
    def reference(batch, lr):
        with open(searches / "simclr" / "reference_config.json", "w") as f:
            json.dump({"batch_size": batch, "lr": lr, "epochs_equivalent": 3.2}, f)

    reference(128, 1e-3)
    assert "3.2 epochs-equivalent, batch 128, --lr 0.001 per 256" in first_line()
    assert "not known yet" in first_line()  # simclr's own grid has not run
    _finish_tuning(results, "simclr", study.ANCHOR_IMAGES, best=(64, 2e-3))
    assert "not simclr's own tuned 192k values, batch 64 / --lr 0.002" in first_line()
    reference(64, 2e-3)
    assert "(simclr's own tuned 192k batch size and LR)" in first_line()


@pytest.mark.parametrize("method", ["mocov3", "simclr", "dino"])
def test_method_args_print_the_studys_heads_as_the_trainers_method_arg_words(method, capsys):
    # benchmarks/derive_aaip_presets.sh passes these to `effkern schedule search`: the search's reference
    # run must train the study's own model and heads (DINO: its 2 global crops and BN head)
    from effkern.cli_train import _kv

    assert study.main(["method-args", "--method", method]) == 0
    words = capsys.readouterr().out.split()
    assert _kv(words, "--method-arg") == study.METHOD_KWARGS[method]


def test_the_rederived_schedule_joins_the_study_once_its_file_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "SEARCH_RESULTS", str(tmp_path))
    assert study.REDERIVED not in study.schedules_for("mocov3")
    path = tmp_path / "mocov3" / "n1" / "schedule.json"
    os.makedirs(path.parent)
    path.write_text('{"name": "aaip-mocov3", "stages": [{"start": 0.0, "stage": {"keep": {"default": 0.25}}}]}')
    names = study.schedules_for("mocov3")
    assert names[0] == "none" and study.REDERIVED in names
    assert study.trainer_schedule("mocov3", study.REDERIVED) == f"file:{path}"
    assert study.trainer_schedule("mocov3", "aaip-mocov3") == "aaip-mocov3"
    cell = {"kind": "final", "method": "mocov3", "schedule": study.REDERIVED, "images": study.BUDGET_IMAGES[0],
            "batch": 64, "lr": 2e-3, "seed": 0, "split": "test"}
    from effkern.schedules import get_schedule

    cfg = study.train_config(cell, str(tmp_path / "runs"))
    assert dict(get_schedule(cfg.schedule).at(0.0).keep) == {"default": 0.25}
    assert "/" not in study.cell_id(cell).split("/final/")[1].split("/")[0]  # one directory level per part


def test_rederived_cells_wait_until_the_search_ran_on_the_methods_own_tuned_baseline(tmp_path, monkeypatch, capsys):
    import json

    searches, results = tmp_path / "search", str(tmp_path / "results")
    monkeypatch.setattr(study, "SEARCH_RESULTS", str(searches))
    os.makedirs(searches / "simclr" / "n1")
    (searches / "simclr" / "n1" / "schedule.json").write_text(  # not const:keep=0.5's training (see same_as)
        '{"name": "x", "stages": [{"start": 0.0, "stage": {"keep": {"default": 0.5}}},'
        ' {"start": 0.5, "stage": {"keep": {"default": 1.0}}}]}')
    assert study.main(["tuned", "--method", "simclr", "--results", results]) == 1  # no tuning yet
    _finish_tuning(results, "simclr", study.ANCHOR_IMAGES, best=(64, 2e-3))
    capsys.readouterr()
    assert study.main(["tuned", "--method", "simclr", "--results", results]) == 0
    assert capsys.readouterr().out.strip() == "64 0.002"

    def rederived():
        return [c for c in study.plan("simclr", results) if c.get("schedule") == study.REDERIVED]

    def write_reference(batch, lr, **extra):
        with open(searches / "simclr" / "reference_config.json", "w") as f:
            json.dump({"batch_size": batch, "lr": lr, "epochs_equivalent": 3.2, **extra}, f)

    anchor_cells = [c for c in rederived() if c.get("images") == study.ANCHOR_IMAGES or c["kind"] == "timing"]
    assert len(anchor_cells) == len(study.SEEDS) + 1 and all(c["blocked"] == "search" for c in anchor_cells)
    write_reference(128, 2e-3)  # a search at other settings than the tuned winner
    assert all("blocked" in c for c in rederived())
    # the right batch size and LR, but the search's reference run had other heads than the study's
    write_reference(64, 2e-3, method_kwargs={**study.METHOD_KWARGS["simclr"], "out_dim": 256})
    assert all("blocked" in c for c in rederived())
    write_reference(64, 2e-3, method_kwargs=study.METHOD_KWARGS["simclr"])
    now = [c for c in rederived() if c.get("images") == study.ANCHOR_IMAGES or c["kind"] == "timing"]
    assert now and not any("blocked" in c for c in now)
    others = [c for c in study.plan("simclr", results) if c.get("schedule") == "const:keep=0.5"]
    assert not any(c.get("blocked") == "search" for c in others)


def test_finals_count_at_their_grids_winner_even_beside_a_better_off_grid_tune_cell(tmp_path):
    results = str(tmp_path)
    _finish_tuning(results, "mocov3", study.ANCHOR_IMAGES, best=(64, 2e-3))
    small = min(study.BUDGET_IMAGES)
    for batch, lr in study.tune_grid("mocov3", small, results):
        acc = 0.7 if (batch, lr) == (64, 2e-3) else 0.6
        study.write_result(study.tune_cell("mocov3", small, batch, lr), {"knn_acc": acc, "steps": 1}, results)
    assert study.tuned_hp("mocov3", small, results) == (64, 2e-3)
    # a cell off the cross (run by hand with --only) scores higher; it is not part of the grid
    study.write_result(study.tune_cell("mocov3", small, 32, 4e-3), {"knn_acc": 0.75, "steps": 1}, results)
    final = {"kind": "final", "method": "mocov3", "schedule": "none", "images": small, "batch": 64, "lr": 2e-3,
             "seed": 0, "split": "test"}
    study.write_result(final, {"knn_acc": 0.71, "steps": 1}, results)
    entry = study.summarize(results)["methods"]["mocov3"]
    assert entry["superseded_finals"] == [] and entry["schedules"]["none"][str(small)]["knn"]["mean"] == 0.71


def test_a_cell_claimed_by_a_live_runner_is_left_to_it_and_a_stale_claim_is_taken_over(tmp_path, monkeypatch):
    import subprocess
    import sys

    results = str(tmp_path / "results")
    todo = study.pending(study.plan("mocov3", results), results)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = study._claim_path(todo[0])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(str(other.pid))  # another runner holds the first cell
        assert not study.claim(todo[0]) and study.others_running("mocov3")
        ran = []
        monkeypatch.setattr(study, "run_cell", lambda c: ran.append(study.cell_id(c)) or {"knn_acc": 0.1, "steps": 1})
        assert study.main(["run", "--results", results, "--max-cells", "1"]) == 0
        assert ran == [study.cell_id(todo[1])] and not os.path.exists(study._claim_path(todo[1]))  # released
        assert study.load_result(todo[0], results) is None
    finally:
        other.kill()
        other.wait()
    assert not study.others_running("mocov3")  # its process is gone: the claim is stale
    assert study.claim(todo[0]) and study._claim_owner(path) == os.getpid()
    study.release(todo[0])
    assert not os.path.exists(path)


def test_a_runner_waits_while_another_holds_the_last_runnable_cells(tmp_path, monkeypatch):
    results = str(tmp_path / "results")
    todo = study.pending(study.plan("mocov3", results), results)
    held = {study.cell_id(c) for c in todo}  # another runner holds every runnable cell, then finishes one
    monkeypatch.setattr(study, "claim", lambda c: study.cell_id(c) not in held)
    polls = []

    def poll(seconds):
        polls.append(seconds)
        held.discard(study.cell_id(todo[0]))

    monkeypatch.setattr(study, "others_running", lambda method: bool(held))
    monkeypatch.setattr(study.time, "sleep", poll)
    ran = []
    monkeypatch.setattr(study, "run_cell", lambda c: ran.append(study.cell_id(c)) or {"knn_acc": 0.1, "steps": 1})
    assert study.main(["run", "--results", results, "--max-cells", "1", "--poll", "7"]) == 0
    assert polls == [7.0] and ran == [study.cell_id(todo[0])]


def test_a_runner_fills_an_idle_core_with_the_next_methods_cell_before_it_waits(tmp_path, monkeypatch):
    results = str(tmp_path / "results")
    first = study.pending(study.plan("supervised", results), results)
    second = study.pending(study.plan("mocov3", results), results)
    held = {study.cell_id(c) for c in first}  # another runner holds every runnable supervised cell
    monkeypatch.setattr(study, "claim", lambda c: study.cell_id(c) not in held)
    monkeypatch.setattr(study, "others_running", lambda method: method == "supervised" and bool(held))

    def poll(seconds):
        raise AssertionError("waited although the next method had a runnable cell")

    monkeypatch.setattr(study.time, "sleep", poll)
    ran = []
    monkeypatch.setattr(study, "run_cell", lambda c: ran.append(study.cell_id(c)) or {"knn_acc": 0.1, "steps": 1})
    argv = ["run", "--results", results, "--method", "supervised", "mocov3", "--max-cells", "1"]
    assert study.main(argv) == 0
    assert ran == [study.cell_id(second[0])]
    held.clear()  # the first method's cells are free again: they come first
    ran.clear()
    assert study.main(argv) == 0
    assert ran == [study.cell_id(first[0])]


def test_a_schedule_that_trains_as_an_earlier_one_gets_no_cells_and_the_report_says_whose_rows_it_has(
        tmp_path, monkeypatch):
    searches, results = tmp_path / "search", str(tmp_path / "results")
    monkeypatch.setattr(study, "SEARCH_RESULTS", str(searches))
    os.makedirs(searches / "mocov3" / "n1")
    schedule_file = searches / "mocov3" / "n1" / "schedule.json"
    # const:keep=0.5 spelled another way: the native patch size named, a label, a second stage equal to the first
    schedule_file.write_text('{"name": "x", "stages": [{"start": 0.0, "stage": {"patch_size": 4, "keep": '
                             '{"default": 0.5}, "name": "a"}}, {"start": 0.5, "stage": {"keep": {"default": 0.5, '
                             '"q": 0.5}, "name": "b"}}]}')
    assert study.same_as("mocov3") == {study.REDERIVED: "const:keep=0.5"}
    _finish_tuning(results, "mocov3", study.ANCHOR_IMAGES, best=(128, 2e-3))
    cells = study.plan("mocov3", results)
    assert not any(c.get("schedule") == study.REDERIVED for c in cells)
    assert any(c.get("schedule") == "const:keep=0.5" and c["kind"] == "timing" for c in cells)
    # a different keep, patch size or start is a different training
    for other in ('{"start": 0.0, "stage": {"keep": {"default": 0.25}}}',
                  '{"start": 0.0, "stage": {"patch_size": 7, "keep": {"default": 0.5}}}',
                  '{"start": 0.0, "stage": {"keep": {"default": 0.5, "k": 1.0}}}',
                  '{"start": 0.0, "stage": {"keep": {"default": 0.5}}}, {"start": 0.5, "stage": {}}'):
        schedule_file.write_text('{"name": "x", "stages": [' + other + ']}')
        assert study.same_as("mocov3") == {}, other
    # uncompressed at the native patch size is the baseline: factor 1 by construction
    schedule_file.write_text('{"name": "x", "stages": [{"start": 0.0, "stage": {"patch_size": 4, "keep": '
                             '{"default": 1.0}}}]}')
    assert study.same_as("mocov3") == {study.REDERIVED: "none"}
    assert "1 by construction" in study._same_as_text(study.REDERIVED, {"schedule": "none", "stages": []})
    # cells that ran before the plan knew: left out of the rows, compared seed by seed with the canonical ones
    schedule_file.write_text('{"name": "x", "stages": [{"start": 0.0, "stage": {"keep": {"default": 0.5}}}]}')
    B = study.BUDGET_IMAGES
    for images, acc in ((B[1], 0.74), (B[2], 0.78)):
        for seed in study.SEEDS:
            _final(results, "none", images, seed, acc + 0.001 * seed)
    for seed in study.SEEDS:
        _final(results, "const:keep=0.5", B[1], seed, 0.76 + 0.001 * seed)
        _final(results, study.REDERIVED, B[1], seed, 0.76 + 0.001 * seed + (0.003 if seed == 2 else 0.0))
    summary = study.summarize(results)
    m = summary["methods"]["mocov3"]
    assert study.REDERIVED not in m["schedules"] and "const:keep=0.5" in m["schedules"]
    same = m["same_as"][study.REDERIVED]
    assert same["schedule"] == "const:keep=0.5" and same["stages"][0]["stage"]["keep"] == {"default": 0.5}
    (check,) = same["ran_anyway"]
    assert check["seeds"] == list(study.SEEDS) and check["max_abs_knn_diff"] == pytest.approx(0.003)
    report = str(tmp_path / "results.md")
    study.write_report(summary, {"mocov3": (1, 1)}, report)
    text = open(report).read()
    assert f"`{study.REDERIVED}`: the same training as `const:keep=0.5`" in text
    assert "differs by up to 0.30 points from `const:keep=0.5`'s, seed for seed" in text
    assert f"mocov3 {study.REDERIVED}: the same training" in text  # also in what is shown
