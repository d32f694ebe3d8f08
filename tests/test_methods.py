"""The method library against brute-force references computed from per-token quantities.

A synthetic layer: router logits l [N,E], probabilities p = softmax(l), top-k selection with
renormalised gates g, per-token expert outputs f [N,E,H]. `make_stats` sums them into the
docs/stats.md contract; every reference below is recomputed with explicit Python loops over
tokens and experts from the per-token tensors, never from the sums.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings

import pytest
import torch

from moe2dense_ray.convert.methods import (
    GROUPINGS,
    SCALINGS,
    SCORINGS,
    DegenerateGroupingWarning,
    Registry,
    ScoreResult,
    average_linkage,
    dopt_kernel,
    finalize_groups,
    greedy_logdet,
    merge_weights,
    select,
)
from moe2dense_ray.core.errors import UserError

N, E, TOPK, H = 160, 8, 2, 5
DEAD = E - 1  # an expert no token selects


# --------------------------------------------------------------------------------------------
# synthetic per-token data and its statistics


def per_token(seed: int = 0, renorm: bool = True, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, E, generator=g, dtype=torch.float64)
    logits[:, DEAD] -= 50.0
    probs = torch.softmax(logits, dim=-1)
    top = torch.topk(probs, TOPK, dim=-1).indices
    sel = torch.zeros(N, E, dtype=torch.float64).scatter_(1, top, 1.0)
    gates = probs * sel
    if renorm:
        gates = gates / gates.sum(-1, keepdim=True)
    gates = gates * scale
    # expert outputs with expert-dependent magnitudes and correlations
    base = torch.randn(E, H, generator=g, dtype=torch.float64)
    outs = base[None] + torch.randn(N, E, H, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, E)[None, :, None]
    return {"l": logits, "p": probs, "sel": sel, "g": gates, "f": outs}


def make_stats(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum per-token tensors into the docs/stats.md keys (float64)."""
    l, p, sel, g, f = t["l"], t["p"], t["sel"], t["g"], t["f"]
    norms = f.norm(dim=-1)
    return {
        "tokens": torch.tensor(float(l.shape[0]), dtype=torch.float64),
        "sel_count": sel.sum(0),
        "prob_sum": p.sum(0),
        "prob_sel_sum": (p * sel).sum(0),
        "gate_sum": (g * sel).sum(0),
        "gate_mass": g.sum(),
        "logit_sum": l.sum(0),
        "logit_gram": l.T @ l,
        "sqnorm_all": (f**2).sum((0, 2)),
        "sqnorm_routed": ((f**2).sum(-1) * sel).sum(0),
        "norm_routed": (norms * sel).sum(0),
        "gate_norm_routed": (g * norms * sel).sum(0),
        "gram": torch.einsum("nih,njh->ij", f, f),
        "out_sum": f.sum(0),
    }


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    return per_token(0)


@pytest.fixture(scope="module")
def stats(data) -> dict[str, torch.Tensor]:
    return make_stats(data)


def _lists(t: dict[str, torch.Tensor]):
    return (t["l"].tolist(), t["p"].tolist(), t["sel"].tolist(), t["g"].tolist(), t["f"].tolist())


def brute_scores(t: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Every score with explicit loops over tokens x experts (METHOD.md definitions)."""
    _, p, sel, g, f = _lists(t)
    n = len(p)
    out: dict[str, list[float]] = {m: [] for m in ("sf", "pp", "cp", "acp", "reap", "ean")}
    for e in range(E):
        cnt = psum = psel = sq = gnorm = nsum = 0.0
        for x in range(n):
            norm2 = sum(v * v for v in f[x][e])
            sq += norm2
            psum += p[x][e]
            if sel[x][e] > 0:
                cnt += 1
                psel += p[x][e]
                gnorm += g[x][e] * math.sqrt(norm2)
                nsum += math.sqrt(norm2)
        cp = psel / cnt if cnt else 0.0
        out["sf"].append(cnt)
        out["pp"].append(psum / n)
        out["cp"].append(cp)
        out["acp"].append(cp * math.sqrt(sq / n))
        out["reap"].append(gnorm / cnt if cnt else 0.0)
        out["ean"].append(nsum)
    return out


def brute_kernel(t: dict[str, torch.Tensor], acp: list[float]) -> torch.Tensor:
    f = t["f"].tolist()
    n = len(f)
    K = torch.zeros(E, E, dtype=torch.float64)
    for i in range(E):
        for j in range(E):
            gij = sum(sum(a * b for a, b in zip(f[x][i], f[x][j])) for x in range(n)) / n
            K[i, j] = math.sqrt(acp[i]) * gij * math.sqrt(acp[j])
    return K


def naive_greedy(K: torch.Tensor, lam: float, steps: int) -> list[int]:
    """Non-incremental greedy: evaluate log det(K_S + lam I) from scratch for every candidate."""
    chosen: list[int] = []
    for _ in range(steps):
        best, best_val = -1, -math.inf
        for j in range(K.shape[0]):
            if j in chosen:
                continue
            S = chosen + [j]
            val = float(torch.linalg.slogdet(K[S][:, S] + lam * torch.eye(len(S), dtype=torch.float64))[1])
            if val > best_val:
                best, best_val = j, val
        chosen.append(best)
    return chosen


def logdet_gain(K: torch.Tensor, lam: float, S: list[int]) -> float:
    """f(S) = log det(I + K_S / lam): monotone submodular, f(empty) = 0."""
    if not S:
        return 0.0
    return float(torch.linalg.slogdet(torch.eye(len(S), dtype=torch.float64) + K[S][:, S] / lam)[1])


# --------------------------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize("name", ["sf", "pp", "cp", "acp", "reap", "ean"])
def test_scores_match_brute_force(name, data, stats):
    ref = torch.tensor(brute_scores(data)[name], dtype=torch.float64)
    res = SCORINGS.get(name)(stats, k=3, seed=0, layer=0)
    assert isinstance(res, ScoreResult) and res.order is None
    assert res.scores.dtype == torch.float64 and res.scores.shape == (E,)
    torch.testing.assert_close(res.scores, ref, rtol=1e-10, atol=1e-12)


def test_never_selected_expert_scores_zero(stats):
    for name in ("sf", "cp", "acp", "reap", "ean"):
        assert float(SCORINGS.get(name)(stats, k=3, seed=0, layer=0).scores[DEAD]) == 0.0


@pytest.mark.parametrize("k", [1, 3, 5])
def test_do_acp_matches_brute_force_naive_greedy(k, data, stats):
    acp = brute_scores(data)["acp"]
    K = brute_kernel(data, acp)
    lam = float(torch.diagonal(K).mean()) / k
    res = SCORINGS.get("do-acp")(stats, k=k, seed=0, layer=0)
    torch.testing.assert_close(res.scores, torch.tensor(acp, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert res.order is not None and sorted(res.order.tolist()) == list(range(E))
    assert res.order.tolist() == naive_greedy(K, lam, E)
    assert select(res, k) == res.order.tolist()[:k]


def test_do_acp_ridge_override(stats):
    a = SCORINGS.get("do-acp")(stats, k=2, seed=0, layer=0, ridge=1e-9).order.tolist()
    K = dopt_kernel(stats)
    assert a == naive_greedy(K, 1e-9, E)


def random_kernel(seed: int, n: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, rank, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64)
    return A @ A.T


def test_incremental_greedy_equals_naive_greedy():
    for seed in range(5):
        K = random_kernel(seed, 24, rank=6)
        lam = float(torch.diagonal(K).mean()) / 4
        order, gains = greedy_logdet(K, lam)
        assert order == naive_greedy(K, lam, 24)
        for t in (1, 3, 6, 24):
            S = order[:t]
            ref = float(torch.linalg.slogdet(K[S][:, S] + lam * torch.eye(t, dtype=torch.float64))[1])
            assert float(gains[:t].sum()) == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_greedy_vs_exhaustive_optimum():
    n = 6
    for seed in range(20):
        K = random_kernel(100 + seed, n, rank=3)
        for k in (1, 2, 3):
            lam = float(torch.diagonal(K).mean()) / k
            order, _ = greedy_logdet(K, lam)
            greedy = logdet_gain(K, lam, order[:k])
            opt = max(logdet_gain(K, lam, list(S)) for S in itertools.combinations(range(n), k))
            if k == 1:
                assert greedy == pytest.approx(opt, rel=1e-12)  # greedy is exact for one pick
            assert greedy >= (1 - 1 / math.e) * opt - 1e-12
            assert greedy <= opt + 1e-9


def test_greedy_is_fast_for_256_experts():
    K = random_kernel(7, 256, rank=64)
    t0 = time.perf_counter()
    order, _ = greedy_logdet(K, float(torch.diagonal(K).mean()) / 8)
    assert sorted(order) == list(range(256))
    assert time.perf_counter() - t0 < 2.0


def test_random_scoring_is_seeded(stats):
    fn = SCORINGS.get("random")
    a = fn(stats, k=2, seed=1, layer=3).scores
    assert torch.equal(a, fn(stats, k=2, seed=1, layer=3).scores)
    assert not torch.equal(a, fn(stats, k=2, seed=2, layer=3).scores)
    assert not torch.equal(a, fn(stats, k=2, seed=1, layer=4).scores)
    assert a.shape == (E,) and bool(((a >= 0) & (a < 1)).all())


def test_select_ties_and_order():
    r = ScoreResult(torch.tensor([1.0, 3.0, 3.0, float("nan"), 2.0, 3.0], dtype=torch.float64))
    assert select(r, 4) == [1, 2, 5, 4]
    assert select(r, 6) == [1, 2, 5, 4, 0, 3]
    r2 = ScoreResult(r.scores, torch.tensor([3, 0, 1, 2, 4, 5]))
    assert select(r2, 2) == [3, 0]
    with pytest.raises(UserError):
        select(r, 7)


def test_missing_full_stats_is_user_error(stats):
    router_only = {k: v for k, v in stats.items() if k not in ("sqnorm_all", "gram", "norm_routed", "gate_norm_routed", "out_sum")}
    for name in ("acp", "do-acp", "reap", "ean"):
        assert SCORINGS.needs(name) == "full"
        with pytest.raises(UserError, match="full-stats"):
            SCORINGS.get(name)(router_only, k=2, seed=0, layer=0)
    for name in ("sf", "pp", "cp"):
        assert SCORINGS.needs(name) == "router"
        SCORINGS.get(name)(router_only, k=2, seed=0, layer=0)


# --------------------------------------------------------------------------------------------
# registry


def test_unknown_names_raise_user_error():
    for reg in (SCORINGS, GROUPINGS, SCALINGS):
        with pytest.raises(UserError) as ei:
            reg.get("nope")
        msg = str(ei.value)
        assert "\n" not in msg and all(n in msg for n in reg.names())
        with pytest.raises(UserError):
            reg.needs("nope")
    assert SCORINGS.names() == ["sf", "pp", "cp", "acp", "do-acp", "reap", "ean", "random"]
    assert GROUPINGS.names() == ["none", "random", "weight", "output", "router"]
    assert SCALINGS.names() == ["uniform", "score"]
    for reg in (SCORINGS, GROUPINGS, SCALINGS):
        for n in reg.names():
            assert (reg.get(n).__doc__ or "").strip(), n  # the CLI lists the first line


def test_registry_basics():
    r: Registry = Registry("thing")
    r.register("a", needs="router")(lambda: 1)
    assert r.names() == ["a"] and r.needs("a") == "router" and "a" in r
    with pytest.raises(ValueError):
        r.register("a")(lambda: 2)
    with pytest.raises(ValueError):
        r.register("b", needs="everything")


# --------------------------------------------------------------------------------------------
# grouping

D_W = 12


def planted_weights(seed: int = 0, clusters: int = 3, noise: float = 0.01) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, D_W, generator=g) * 5
    return centres[torch.arange(E) % clusters] + noise * torch.randn(E, D_W, generator=g)


def _group_call(name, selected, k, stats, scores, weights=None, seed=0, layer=0):
    return GROUPINGS.get(name)(selected, k, scores=scores, stats=stats,
                               expert_weights=(lambda sel: weights[torch.tensor(sel)]) if weights is not None else None,
                               seed=seed, layer=layer)


@pytest.mark.parametrize("name", ["none", "random", "weight", "output", "router"])
def test_grouping_invariants(name, stats):
    scores = SCORINGS.get("acp")(stats, k=3, seed=0, layer=0).scores
    W = planted_weights()
    for K, k in ((7, 3), (6, 6), (5, 1), (7, 7)):
        if name == "none" and K != k:
            continue
        selected = select(ScoreResult(scores), K)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DegenerateGroupingWarning)  # no repair on healthy data
            groups = _group_call(name, selected, k, stats, scores, W, seed=5, layer=2)
        assert len(groups) == k and all(groups)
        flat = [e for g in groups for e in g]
        assert sorted(flat) == sorted(selected) and len(set(flat)) == len(flat)
        for g in groups:  # members by descending score
            assert [float(scores[e]) for e in g] == sorted((float(scores[e]) for e in g), reverse=True)
        pos = [selected.index(g[0]) for g in groups]
        assert pos == sorted(pos)
        assert groups == _group_call(name, selected, k, stats, scores, W, seed=5, layer=2)


def test_none_grouping_requires_k_equals_K(stats):
    scores = torch.ones(E, dtype=torch.float64)
    assert _group_call("none", [3, 1, 2], 3, stats, scores) == [[3], [1], [2]]
    with pytest.raises(UserError):
        _group_call("none", [3, 1, 2], 2, stats, scores)
    with pytest.raises(UserError):
        _group_call("random", [3, 1], 3, stats, scores)


def test_random_grouping_depends_on_seed(stats):
    scores = torch.linspace(1, 2, E, dtype=torch.float64)
    sel = list(range(E))
    parts = {str(_group_call("random", sel, 3, stats, scores, seed=s)) for s in range(6)}
    assert len(parts) > 1


def test_weight_grouping_recovers_planted_clusters(stats):
    scores = torch.linspace(2, 1, E, dtype=torch.float64)
    groups = _group_call("weight", list(range(E)), 3, stats, scores, planted_weights())
    assert sorted(sorted(g) for g in groups) == sorted([[e for e in range(E) if e % 3 == c] for c in range(3)])


def test_weight_grouping_is_a_kmeans_fixed_point(stats):
    scores = torch.linspace(2, 1, E, dtype=torch.float64)
    W = torch.randn(E, D_W, generator=torch.Generator().manual_seed(3))
    groups = _group_call("weight", list(range(E)), 3, stats, scores, W, seed=1)
    centroids = torch.stack([W[g].mean(0) for g in groups]).double()
    for gi, g in enumerate(groups):  # every expert is (one of) closest to its own centroid
        for e in g:
            d = ((W[e].double() - centroids) ** 2).sum(-1)
            assert float(d[gi]) <= float(d.min()) + 1e-9


def test_output_grouping_matches_scipy_average_linkage(data, stats):
    from scipy.cluster import hierarchy
    X = (data["f"].sum(0) / N).numpy()
    for k in (2, 3, 5):
        Z = hierarchy.linkage(X, method="average", metric="euclidean")
        labels = hierarchy.fcluster(Z, k, criterion="maxclust")
        ref = sorted(sorted(int(i) for i in range(E) if labels[i] == c) for c in set(labels.tolist()))
        ours = _group_call("output", list(range(E)), k, stats, torch.ones(E, dtype=torch.float64))
        assert sorted(sorted(g) for g in ours) == ref


def test_average_linkage_brute_force():
    """Average linkage by definition: the merged pair minimises the mean of member distances."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(7, 3, generator=g, dtype=torch.float64)
    dist = torch.cdist(X, X)
    clusters = [[i] for i in range(7)]
    while len(clusters) > 2:
        best = min(itertools.combinations(range(len(clusters)), 2),
                   key=lambda ab: sum(float(dist[i, j]) for i in clusters[ab[0]] for j in clusters[ab[1]])
                   / (len(clusters[ab[0]]) * len(clusters[ab[1]])))
        a, b = best
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    assert sorted(sorted(c) for c in average_linkage(dist, 2)) == sorted(sorted(c) for c in clusters)


def test_router_grouping_brute_force(data, stats):
    scores = SCORINGS.get("cp")(stats, k=3, seed=0, layer=0).scores
    selected = select(ScoreResult(scores), 6)
    groups = _group_call("router", selected, 3, stats, scores)
    centres = selected[:3]
    l = data["l"].tolist()

    def cos(i: int, j: int) -> float:
        dot = sum(row[i] * row[j] for row in l)
        ni = math.sqrt(sum(row[i] ** 2 for row in l))
        nj = math.sqrt(sum(row[j] ** 2 for row in l))
        return dot / (ni * nj)

    expected = {c: [c] for c in centres}
    for e in selected[3:]:
        expected[max(centres, key=lambda c: cos(e, c))].append(e)
    assert sorted(sorted(g) for g in groups) == sorted(sorted(g) for g in expected.values())
    assert [g[0] for g in groups] == centres


def test_degenerate_identical_weights_repaired_loudly(stats):
    scores = torch.linspace(2, 1, E, dtype=torch.float64)
    W = torch.ones(E, D_W) * 0.3
    with pytest.warns(DegenerateGroupingWarning):
        groups = _group_call("weight", list(range(E)), 3, stats, scores, W)
    assert len(groups) == 3 and all(groups) and sorted(e for g in groups for e in g) == list(range(E))
    # the rule: the weakest experts are split off into groups of their own
    assert groups == [[0, 1, 2, 3, 4, 5], [6], [7]]


def test_degenerate_identical_outputs_repaired_loudly(stats):
    same = dict(stats)
    same["out_sum"] = torch.ones(E, H, dtype=torch.float64) * 7.0
    scores = torch.linspace(2, 1, E, dtype=torch.float64)
    for metric in ("euclidean", "cosine"):
        with pytest.warns(DegenerateGroupingWarning):
            groups = GROUPINGS.get("output")(list(range(E)), 4, scores=scores, stats=same, expert_weights=None,
                                             seed=0, layer=0, distance=metric)
        assert len(groups) == 4 and all(groups)


def test_finalize_groups_rule():
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    sel = [0, 1, 2, 3, 4, 5]
    with pytest.warns(DegenerateGroupingWarning):
        out = finalize_groups([[], [5, 0, 3, 1], [], [2, 4]], 4, selected=sel, scores=scores)
    assert out == [[0, 1], [2, 4], [3], [5]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert finalize_groups([[4, 2], [1, 0]], 2, selected=[0, 1, 2, 4], scores=scores) == [[0, 1], [2, 4]]
    with pytest.raises(RuntimeError):
        finalize_groups([[0], [1]], 2, selected=[0, 1, 2], scores=scores)


# --------------------------------------------------------------------------------------------
# merging


def test_merge_weights():
    scores = torch.tensor([3.0, 1.0, 0.0, -2.0, float("nan")], dtype=torch.float64)
    assert merge_weights([2], scores).tolist() == [1.0]
    assert merge_weights([3], scores).tolist() == [1.0]
    torch.testing.assert_close(merge_weights([0, 1], scores), torch.tensor([0.75, 0.25], dtype=torch.float64))
    torch.testing.assert_close(merge_weights([0, 3], scores), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert merge_weights([2, 3], scores).tolist() == [0.5, 0.5]
    assert merge_weights([0, 4], scores).tolist() == [0.5, 0.5]
    # merging identical experts is the identity
    w = torch.randn(4, 6, dtype=torch.float64)
    coeffs = merge_weights([0, 1, 2], scores)
    merged = sum(c * w for c in coeffs)
    torch.testing.assert_close(merged, w)


# --------------------------------------------------------------------------------------------
# scaling


def test_scaling_sums_to_gate_mass():
    t = per_token(1, renorm=False, scale=2.5)  # DeepSeek-like: no renormalisation, scaled gates
    s = make_stats(t)
    m = sum(sum(row) for row in t["g"].tolist()) / N  # brute force mean gate mass per token
    assert abs(m - 1.0) > 0.1
    scores = SCORINGS.get("sf")(s, k=3, seed=0, layer=0).scores
    groups = [[0, 1], [2], [3, 4, 5]]
    uni = SCALINGS.get("uniform")(groups, scores, s)
    assert uni == pytest.approx([m / 3] * 3, rel=1e-12)
    sc = SCALINGS.get("score")(groups, scores, s)
    assert sum(sc) == pytest.approx(m, rel=1e-12)
    sums = [float(scores[g].sum()) for g in groups]
    for a, sg in zip(sc, sums):
        assert a / sc[0] == pytest.approx(sg / sums[0], rel=1e-12)
    mean = SCALINGS.get("score")(groups, scores, s, reduce="mean")
    means = [float(scores[g].mean()) for g in groups]
    assert sum(mean) == pytest.approx(m) and mean[2] / mean[1] == pytest.approx(means[2] / means[1])


def test_renormalised_uniform_is_one_over_k(stats):
    assert SCALINGS.get("uniform")([[0], [1], [2], [3]], torch.ones(E), stats) == pytest.approx([0.25] * 4)


def test_score_scaling_falls_back_to_uniform(stats):
    scores = torch.tensor([1.0, 0.0, 2.0] + [1.0] * (E - 3), dtype=torch.float64)
    with pytest.warns(UserWarning, match="uniform"):
        out = SCALINGS.get("score")([[0], [1], [2]], scores, stats)
    assert out == pytest.approx([1 / 3] * 3)


def test_plan_pipeline_end_to_end(stats):
    """Score -> select -> group -> scale for every combination on one layer."""
    W = planted_weights()
    for sname in SCORINGS.names():
        res = SCORINGS.get(sname)(stats, k=3, seed=0, layer=0)
        selected = select(res, 6)
        for gname in GROUPINGS.names():
            k = 6 if gname == "none" else 3
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                groups = _group_call(gname, selected, k, stats, res.scores, W)
                for cname in SCALINGS.names():
                    scales = SCALINGS.get(cname)(groups, res.scores, stats)
                    assert len(scales) == k and sum(scales) == pytest.approx(1.0)
            for g in groups:
                assert float(merge_weights(g, res.scores).sum()) == pytest.approx(1.0)


def test_router_centres_follow_do_acp_greedy_order():
    """DO-ACP's `scores` are ACP; its ranking is the greedy order. Two identical strong experts
    (0 and 1) must not both become centres: the greedy picks 0 then the orthogonal expert 2."""
    n = 100
    f = torch.zeros(4, n, 2, dtype=torch.float64)
    f[0, :, 0] = f[1, :, 0] = 1.0
    f[2, :, 1], f[3, :, 1] = 0.8, 0.1
    s = {"tokens": torch.tensor(float(n)), "sel_count": torch.full((4,), 50.0),
         "prob_sel_sum": torch.full((4,), 20.0), "sqnorm_all": (f ** 2).sum((1, 2)),
         "gram": torch.einsum("ath,bth->ab", f, f),
         "logit_gram": n * torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0.9], [0, 0, 0.9, 1]],
                                        dtype=torch.float64)}
    result = SCORINGS.get("do-acp")(s, k=2, seed=0, layer=0)
    assert float(result.scores[1]) > float(result.scores[2])  # by ACP alone, 1 would be a centre
    selected = select(result, 3)
    assert selected == [0, 2, 1]
    assert GROUPINGS.get("router")(selected, 2, scores=result.scores, stats=s) == [[0, 1], [2]]
