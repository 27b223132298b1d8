"""AAIP schedule search: the CA-MSE estimator against closed forms (linear regression with
feature dropout), determinism, bounded memory, and the search end to end on a tiny run."""

import itertools
import json
import math
import os

import pytest
import torch

from effkern.schedules import Stage, get_schedule
from effkern.schedules.search import GradientMoments, camse, candidate_grid, estimate, monotone_choice, rescore
from effkern.train.schedule_search import search

D_FEAT, M, N_BATCHES = 5, 32, 2


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(D_FEAT, generator=g, dtype=torch.float64)
    sigma = 0.5
    batches = []
    for _ in range(N_BATCHES):
        X = torch.randn(M, D_FEAT, generator=g, dtype=torch.float64)
        y = X @ w_star + sigma * torch.randn(M, generator=g, dtype=torch.float64)
        batches.append((X, y))
    w = 0.3 * torch.randn(D_FEAT, generator=g, dtype=torch.float64)  # the evaluation point
    return batches, w


def _grad(X, y, w, d):
    """grad_w of 1/2 ||y - X D w||^2 / m with D = diag(d): -(1/m) D X^T (y - X D w)."""
    return -(d * (X.T @ (y - X @ (d * w)))) / X.shape[0]


def _grad_fn(batches, w):
    def fn(stage, b, r, generator):
        X, y = batches[b]
        if stage is None:
            return _grad(X, y, w, torch.ones(D_FEAT, dtype=torch.float64))
        keep, scaled = stage
        mask = (torch.rand(D_FEAT, generator=generator, dtype=torch.float64) < keep).double()
        return _grad(X, y, w, mask / keep if scaled else mask)
    return fn


def _exact(batches, w, keep, scaled):
    """E[g_s] and Cov[g_s] per batch by summing over the 2^d dropout masks (exact), the mean
    also from the closed form E[g_s] = -(1/m) (E[D] X^T y - (A o E[d d^T]) w), A = X^T X."""
    masks = torch.tensor(list(itertools.product([0.0, 1.0], repeat=D_FEAT)), dtype=torch.float64)
    probs = torch.prod(masks * keep + (1 - masks) * (1 - keep), dim=1)
    scale = 1 / keep if scaled else 1.0
    out = []
    for X, y in batches:
        G = torch.stack([_grad(X, y, w, mk * scale) for mk in masks])
        mu = probs @ G
        cov = (G - mu).T @ ((G - mu) * probs[:, None])
        ed = keep * scale
        edd = torch.full((D_FEAT, D_FEAT), keep * keep * scale * scale, dtype=torch.float64)
        edd.fill_diagonal_(keep * scale * scale)
        A = X.T @ X
        mu_closed = -(ed * (X.T @ y) - (A * edd) @ w) / X.shape[0]
        torch.testing.assert_close(mu, mu_closed)
        out.append((mu, cov))
    return out


@pytest.mark.parametrize("scaled", [True, False])
def test_bias_and_variance_match_the_closed_form(scaled):
    batches, w = _problem()
    keep, R = 0.6, 1500
    fn = _grad_fn(batches, w)
    rows = estimate(fn, {"s": ((keep, scaled), 0.5)}, None, N_BATCHES, R, seed=1, n=4.0)
    row = rows[0]
    exact = _exact(batches, w, keep, scaled)
    g_ref = torch.stack([fn(None, b, 0, None) for b in range(N_BATCHES)]).mean(0)
    mu = torch.stack([m for m, _ in exact]).mean(0)
    bias = mu - g_ref
    bias2 = float(bias @ bias)
    if scaled:  # E[D] = I but E[D A D] = A + (1/r - 1) diag(A): bias (1/m) (1/r - 1) diag(A) w
        closed = torch.stack([torch.diagonal(X.T @ X) * (1 / keep - 1) * w / M for X, _ in batches]).mean(0)
        torch.testing.assert_close(bias, closed)
    assert bias2 > 1e-3
    # bias2 (debiased) vs exact: noise of the paired mean ~ N(0, S), S = sum_b Cov_b / (nb^2 R)
    S = sum(c for _, c in exact) / (N_BATCHES ** 2 * R)
    se = math.sqrt(4 * float(bias @ S @ bias) + 2 * float(torch.trace(S @ S)))
    assert abs(row["bias2"] - bias2) <= 5 * se + 1e-12
    assert row["bias2_raw"] - row["bias2"] == pytest.approx(float(torch.trace(S)), rel=0.15)
    # var: expected unbiased sample variance of the stratified draws (R per batch)
    N = N_BATCHES * R
    m2 = sum(R * (float(torch.trace(c)) + float((m - mu) @ (m - mu))) for m, c in exact) \
        - N * sum(R * float(torch.trace(c)) for _, c in exact) / N ** 2
    assert row["var"] == pytest.approx(m2 / (N - 1), rel=0.1)
    assert row["cav"] == pytest.approx(0.5 * row["var"] / 4.0)
    assert row["camse"] == pytest.approx(row["bias2"] + row["cav"])
    assert row["count"] == N


def test_variance_closed_form_at_w_zero():
    """At w = 0, g_s = D g0: E[g_s] = E[d] g0, Var = sum_i g0_i^2 Var(d_i) (one batch)."""
    batches, _ = _problem(3)
    batches = batches[:1]
    w = torch.zeros(D_FEAT, dtype=torch.float64)
    X, y = batches[0]
    g0 = -(X.T @ y) / M
    keep, R = 0.5, 4000
    rows = estimate(_grad_fn(batches, w), {"scaled": ((keep, True), 1.0), "plain": ((keep, False), 1.0)},
                    None, 1, R, seed=0)
    by = {r["name"]: r for r in rows}
    assert by["scaled"]["var"] == pytest.approx(float((g0 ** 2).sum()) * (1 - keep) / keep, rel=0.1)
    assert by["plain"]["var"] == pytest.approx(float((g0 ** 2).sum()) * keep * (1 - keep), rel=0.1)
    assert by["plain"]["bias2"] == pytest.approx(float((g0 ** 2).sum()) * (1 - keep) ** 2, rel=0.1)


def test_deterministic_under_the_seed_and_groups_add_up():
    batches, w = _problem()
    fn = _grad_fn(batches, w)
    groups = {"a": slice(0, 2), "b": slice(2, D_FEAT)}
    strategies = {"s": ((0.5, True), 0.4), "t": ((0.7, False), 0.8)}
    one = estimate(fn, strategies, None, N_BATCHES, 20, seed=7, groups=groups)
    two = estimate(fn, strategies, None, N_BATCHES, 20, seed=7, groups=groups)
    other = estimate(fn, strategies, None, N_BATCHES, 20, seed=8, groups=groups)
    assert one == two
    assert one[0]["var"] != other[0]["var"]
    for r in one:
        for key in ("bias2", "bias2_raw", "var", "cav", "camse"):
            assert sum(g[key] for g in r["groups"].values()) == pytest.approx(r[key])


def test_rescore_gives_the_table_an_estimation_at_that_n_gives():
    """Only cav and camse depend on n: rescoring one estimation equals estimating again at
    that n with the same seeds (exactly, totals and groups), and a large n can flip the
    choice from a cheap biased strategy to the unbiased one."""
    batches, w = _problem()
    fn = _grad_fn(batches, w)
    groups = {"a": slice(0, 2), "b": slice(2, D_FEAT)}
    strategies = {"cheap_biased": ((0.3, False), 0.3), "full": ((1.0, True), 1.0)}
    at_1 = estimate(fn, strategies, None, N_BATCHES, 8, seed=3, groups=groups)
    for n in (0.5, 4.0, 1e4):
        assert rescore(at_1, n) == estimate(fn, strategies, None, N_BATCHES, 8, seed=3, n=n, groups=groups)
    assert at_1 == estimate(fn, strategies, None, N_BATCHES, 8, seed=3, groups=groups)  # not modified
    best = [min(rescore(at_1, n), key=lambda r: r["camse"])["name"] for n in (1e-3, 1e4)]
    assert best == ["cheap_biased", "full"]
    with pytest.raises(ValueError, match="n must be > 0"):
        rescore(at_1, 0.0)


def test_moments_memory_is_bounded_and_welford_matches_torch():
    P = 1000
    xs = torch.randn(300, P, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m = GradientMoments({"x": slice(0, 10), "y": slice(10, P)})
    m.update(xs[0])
    size = m.nbytes
    for x in xs[1:]:
        m.update(x)
    assert m.nbytes == size == 2 * P * 8
    assert sum(t.numel() for t in vars(m).values() if isinstance(t, torch.Tensor)) == 2 * P
    torch.testing.assert_close(m.mean, xs.mean(0))
    assert m.var_trace == pytest.approx(float(xs.var(0).sum()))
    assert m.group_var_trace()["x"] == pytest.approx(float(xs[:, :10].var(0).sum()))
    assert m.count == 300
    r = camse(torch.zeros(P), m, cost=0.25, n=2.0)
    assert r["cav"] == pytest.approx(0.25 * m.var_trace / 2.0)
    assert r["bias2"] == pytest.approx(float(xs.mean(0).pow(2).sum()))


def test_candidate_grid_and_monotone_choice():
    tied = candidate_grid([4, 8], [1.0, 0.5], ("q", "k"))
    assert len(tied) == 4 and len({s.name for s in tied}) == 4
    assert tied[1].keep_for("q") == tied[1].keep_for("k") == 0.5
    assert len(candidate_grid([4, 8], [1.0, 0.5], ("q", "k"), tied=False)) == 8
    rows = lambda d: [{"name": k, "cost": c, "camse": v} for k, (c, v) in d.items()]  # noqa: E731
    picks = monotone_choice([rows({"cheap": (0.25, 1.0), "full": (1.0, 2.0)}),
                             rows({"cheap": (0.25, 1.0), "mid": (0.5, 3.0), "full": (1.0, 5.0)}),
                             rows({"cheap": (0.25, 0.3), "full": (1.0, 0.2)}),
                             rows({"cheap": (0.25, 0.0), "full": (1.0, 0.2)})])
    assert [p["name"] for p in picks] == ["cheap", "cheap", "full", "full"]
    picks = monotone_choice([rows({"cheap": (0.25, 2.0), "mid": (0.5, 1.0)}), rows({"cheap": (0.25, 0.0)})])
    assert [p["name"] for p in picks] == ["mid", "mid"]


def test_search_end_to_end_on_a_tiny_run(tmp_path):
    from effkern.train.config import TrainConfig
    from effkern.train.loop import Run, train

    def cfg(out_dir, **kw):
        return TrainConfig(method="mocov3", model="vit_tiny_patch16_224",
                           model_kwargs={"depth": 1, "patch_size": 4, "embed_dim": 64, "num_heads": 2},
                           method_kwargs={"mlp_dim": 32, "out_dim": 16}, data="digits", base_size=16,
                           limit_train=128, limit_test=64, epochs_equivalent=1.0, batch_size=32, lr=1e-3,
                           out_dir=str(out_dir), progress_bar=False, log_every=1, **kw)

    train(cfg(tmp_path / "train", stop_after_steps=2))
    ckpt = str(tmp_path / "train" / "checkpoint.pt")
    assert os.path.exists(ckpt)
    out = tmp_path / "search"
    candidates = candidate_grid([4, 8], [1.0, 0.5], ("q", "k"))
    schedule = search(lambda: Run(cfg(tmp_path / "unused")), [(0.0, None), (0.5, ckpt)], candidates,
                      n_batches=2, repeats=2, seed=0, out_dir=str(out))
    for name in ("schedule.json", "search.csv", "search.md", "search.json", "heatmap_0.png", "heatmap_1.png"):
        assert (out / name).exists(), name
    loaded = get_schedule("file:" + str(out / "schedule.json"))
    assert loaded == schedule
    run = Run(cfg(tmp_path / "unused"))
    costs = [run.step_cost(st) for _, st in loaded.stages]
    assert all(b >= a for a, b in zip(costs, costs[1:]))
    # the model's native patch (4) is written as "native", so the schedule ports to other models
    assert all(st.patch_size in (None, 8) for _, st in loaded.stages)
    rows = json.load(open(out / "search.json"))["rows"]
    assert len(rows) == 2 and all(len(r) == 4 for r in rows)
    for r in itertools.chain(*rows):
        assert math.isfinite(r["camse"]) and r["var"] > 0
        assert "encoder.blocks" in r["groups"] and "projector" in r["groups"]
    ref = [r for r in rows[0] if r["name"] == "p4_k1"][0]
    assert ref["cost"] == pytest.approx(1.0) and ref["bias2_raw"] == pytest.approx(0.0, abs=1e-12)

    # several n: one estimation, each n's files in n<n>/; n=1 repeats the run above exactly
    many = search(lambda: Run(cfg(tmp_path / "unused")), [(0.0, None), (0.5, ckpt)], candidates,
                  n_batches=2, repeats=2, seed=0, out_dir=str(tmp_path / "many"), n=[1, 64], plots=False)
    assert list(many) == [1.0, 64.0] and many[1.0] == schedule
    assert json.load(open(tmp_path / "many" / "n1" / "search.json")) == json.load(open(out / "search.json"))
    at_64 = json.load(open(tmp_path / "many" / "n64" / "search.json"))
    assert at_64["n"] == 64 and get_schedule("file:" + str(tmp_path / "many" / "n64" / "schedule.json")) == many[64.0]
    for r1, r64 in zip(itertools.chain(*rows), itertools.chain(*at_64["rows"])):
        assert (r64["name"], r64["bias2"], r64["var"]) == (r1["name"], r1["bias2"], r1["var"])
        assert r64["camse"] == pytest.approx(r1["bias2"] + r1["cost"] * r1["var"] / 64, rel=1e-12)
    assert not (tmp_path / "many" / "schedule.json").exists()
    with pytest.raises(ValueError, match="distinct values > 0"):
        search(lambda: Run(cfg(tmp_path / "unused")), [(0.0, None)], candidates, out_dir=str(tmp_path / "x"),
               n=[4, 4])


def test_search_writes_the_native_patch_as_native():
    from effkern.train.schedule_search import _portable

    at_native = _portable(Stage(patch_size=4, keep={"default": 0.25}, name="p4_k0.25"), native_patch=4)
    assert at_native.patch_size is None and at_native.keep_for("q") == 0.25 and at_native.name == "pnative_k0.25"
    larger = Stage(patch_size=8, keep={"default": 0.5}, name="p8_k0.5")
    assert _portable(larger, native_patch=4) == larger
