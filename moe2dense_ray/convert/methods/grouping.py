"""Grouping: partition the K selected experts of a layer into k groups (METHOD.md "Grouping").

Each group becomes one block of the dense FFN; a group of several experts is merged by
score-weighted averaging of its weights (`merge_weights`). With K == k every group is one expert
("pure pruning", the paper's best setting).

Signature of every registered grouping::

    fn(selected: list[int], k: int, *, scores: Tensor[E], stats: dict | None,
       expert_weights: Callable[[list[int]], Tensor[len, D]] | None, seed: int, layer: int)
       -> list[list[int]]

`expert_weights(experts)` returns the flattened weights of just those experts (rows in the order
asked), so weight-space grouping reads K experts of a layer, never all E.

It returns exactly k non-empty groups partitioning `selected`, normalised by `finalize_groups`:
members by descending score, groups by their best member's position in `selected`. Every
clustering here is deterministic given (seed, layer); ties always go to the better-ranked expert.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ...core.config import MethodOptions
from ...core.errors import UserError
from .registry import Registry
from .scoring import generator, need, safe_div, token_count

Stats = Mapping[str, Tensor]
WeightsFn = Callable[[list[int]], Tensor]
GroupingFn = Callable[..., list[list[int]]]

GROUPINGS: Registry[GroupingFn] = Registry("grouping")

OUTPUT_DISTANCE: str = MethodOptions.model_fields["output_distance"].default
"""Distance between mean expert outputs for `output` (HC-SMoE) grouping: "euclidean" or "cosine".

Euclidean by default: the groups are merged by averaging weights, and two experts whose mean
outputs point the same way but differ in size are NOT interchangeable, which cosine would ignore.
"""

KMEANS_N_INIT: int = MethodOptions.model_fields["kmeans_restarts"].default
"""k-means restarts for `weight` grouping; the lowest-inertia run wins (earliest on ties)."""
KMEANS_MAX_ITER: int = 100

_INDISTINGUISHABLE_RTOL = 1e-12


class DegenerateGroupingWarning(UserWarning):
    """A grouping hit a degenerate case (collapsed clusters, indistinguishable experts) and was repaired."""


# --------------------------------------------------------------------------------------------
# shared rules


def _score_key(scores: Tensor, pos: Mapping[int, int]) -> Callable[[int], tuple[float, int]]:
    vals = scores.detach().to(torch.float64).reshape(-1)

    def key(e: int) -> tuple[float, int]:
        v = float(vals[e])
        return (-v if not math.isnan(v) else math.inf, pos[e])

    return key


def _check_args(selected: Sequence[int], k: int, method: str) -> list[int]:
    sel = [int(e) for e in selected]
    if len(set(sel)) != len(sel):
        raise UserError(f"{method} grouping: the selected experts repeat: {sel}")
    if not 1 <= k <= len(sel):
        raise UserError(f"{method} grouping: need 1 <= groups ({k}) <= selected experts ({len(sel)})")
    return sel


def finalize_groups(
    groups: Sequence[Sequence[int]],
    k: int,
    *,
    selected: Sequence[int],
    scores: Tensor,
    method: str = "grouping",
    layer: int | None = None,
) -> list[list[int]]:
    """Normalise a clustering into exactly k non-empty groups; repair collapses LOUDLY.

    Rule (deterministic, emits DegenerateGroupingWarning when it fires): drop empty groups; while
    fewer than k remain, take the largest group (ties: the one listed first after ordering) and
    move its lowest-scoring member (ties: the later one in `selected`) into a new group of its
    own. Why this rule: a collapse (e.g. HC-SMoE putting everything in one cluster, METHOD.md)
    means the features could not separate those experts, so splitting off the weakest members
    keeps the strongest ones merged together and changes the least mass. Then members are
    ordered by descending score (ties: position in `selected`) and groups by their best member's
    position in `selected`, so the FFN layout follows the selection ranking.

    Groups that do not partition `selected`, or more than k groups, are a bug (RuntimeError).
    """
    sel = [int(e) for e in selected]
    pos = {e: i for i, e in enumerate(sel)}
    key = _score_key(scores, pos)
    out = [sorted((int(e) for e in g), key=key) for g in groups if len(g) > 0]
    flat = [e for g in out for e in g]
    if sorted(flat) != sorted(sel) or len(set(flat)) != len(flat):
        raise RuntimeError(f"{method}: groups {out} are not a partition of the selected experts {sel}")
    if len(out) > k:
        raise RuntimeError(f"{method}: produced {len(out)} groups, more than the {k} asked for")
    if len(out) < k:
        where = f" in layer {layer}" if layer is not None else ""
        warnings.warn(
            f"{method} grouping{where} produced {len(out)} non-empty groups instead of {k}; splitting the "
            "largest group(s) by moving their lowest-scoring experts into groups of their own",
            DegenerateGroupingWarning,
            stacklevel=3,
        )
        out.sort(key=lambda g: pos[g[0]])
        while len(out) < k:
            big = max(range(len(out)), key=lambda i: (len(out[i]), -i))  # largest, first listed
            out.append([out[big].pop()])  # members are sorted: the last is the lowest-scoring
            out = [sorted(g, key=key) for g in out]
    out.sort(key=lambda g: pos[g[0]])
    return out


def merge_weights(group: Sequence[int], scores: Tensor) -> Tensor:
    """Averaging coefficients (float64, sum 1) for merging a group: proportional to score.

    METHOD.md: "score-weighted average of gate, up and down weights". Negative scores are clipped
    to 0 (a weight is a non-negative share); if the group's clipped scores sum to <= 0 or any is
    not finite, the coefficients are uniform. A group of one gets [1.0], so pure pruning copies
    the expert exactly, and merging identical experts returns that expert (coefficients sum to 1).
    """
    n = len(group)
    if n == 0:
        raise ValueError("cannot merge an empty group")
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    s = scores.detach().to(torch.float64).reshape(-1)[torch.tensor([int(e) for e in group])]
    if not bool(torch.isfinite(s).all()):
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    s = s.clamp_min(0.0)
    total = float(s.sum())
    if not total > 0:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    return s / total


def _indistinguishable(dist: Tensor, scale: float) -> bool:
    """All pairwise distances zero up to rounding (relative to the features' magnitude)."""
    return float(dist.max()) <= _INDISTINGUISHABLE_RTOL * max(scale, 0.0)


def _warn_indistinguishable(method: str, what: str, layer: int) -> None:
    warnings.warn(
        f"{method} grouping in layer {layer}: the selected experts have numerically identical {what}; "
        "any grouping is as good as another, using the deterministic collapse repair",
        DegenerateGroupingWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------------------------
# groupings


@GROUPINGS.register("none", needs="none")
def group_none(
    selected: list[int], k: int, *, scores: Tensor, stats: Stats | None = None,
    expert_weights: WeightsFn | None = None, seed: int = 0, layer: int = 0,
) -> list[list[int]]:
    """No merging: K == k, each selected expert is its own group (pure pruning)."""
    sel = _check_args(selected, k, "none")
    if len(sel) != k:
        raise UserError(f"grouping 'none' needs --groups == --experts (got {k} groups for {len(sel)} experts); "
                        "pick a merging grouping such as 'output' or 'weight'")
    return [[e] for e in sel]


@GROUPINGS.register("random", needs="none")
def group_random(
    selected: list[int], k: int, *, scores: Tensor, stats: Stats | None = None,
    expert_weights: WeightsFn | None = None, seed: int = 0, layer: int = 0,
) -> list[list[int]]:
    """Seeded random partition into k non-empty groups (baseline).

    A random permutation seeds one expert per group; every other expert joins a uniformly random
    group. Reproducible per (seed, layer).
    """
    sel = _check_args(selected, k, "random")
    g = generator(seed, layer, "grouping-random")
    perm = torch.randperm(len(sel), generator=g).tolist()
    groups: list[list[int]] = [[sel[i]] for i in perm[:k]]
    rest = perm[k:]
    if rest:
        for i, j in zip(rest, torch.randint(k, (len(rest),), generator=g).tolist()):
            groups[j].append(sel[i])
    return finalize_groups(groups, k, selected=sel, scores=scores, method="random", layer=layer)


def _gram_rows(x: Tensor, chunk: int = 1 << 20) -> Tensor:
    """X X^T in float64 without materialising a float64 copy of a large X (chunks of columns)."""
    n, D = x.shape
    G = torch.zeros(n, n, dtype=torch.float64)
    for s in range(0, D, chunk):
        part = x[:, s:s + chunk].to(torch.float64)
        G += part @ part.T
    return G


def kernel_kmeans(gram: Tensor, k: int, g: torch.Generator, *, n_init: int = KMEANS_N_INIT,
                  max_iter: int = KMEANS_MAX_ITER) -> list[int]:
    """Euclidean k-means (k-means++ seeding, Lloyd iterations) computed from the Gram matrix only.

    ||x_i - mean(C)||^2 = G_ii - 2/|C| sum_{m in C} G_im + 1/|C|^2 sum_{m,n in C} G_mn, so the
    D-dimensional weights are touched once (for the Gram). Returns a label per point; labels may
    leave clusters empty (collapse), which finalize_groups repairs. Ties go to the lower cluster
    index, seeding with zero total distance picks the lowest-index unchosen point.
    """
    n = gram.shape[0]
    G = gram.to(torch.float64)
    diag = torch.diagonal(G)
    D2 = (diag[:, None] + diag[None, :] - 2 * G).clamp_min(0.0)
    best_labels: list[int] | None = None
    best_inertia = math.inf
    for _ in range(max(1, n_init)):
        first = int(torch.randint(n, (1,), generator=g))
        centres = [first]
        mind = D2[first].clone()
        while len(centres) < k:
            w = mind.clone()
            w[centres] = 0.0
            if float(w.sum()) > 0:
                c = int(torch.multinomial(w, 1, generator=g))
            else:
                c = next(i for i in range(n) if i not in centres)
            centres.append(c)
            mind = torch.minimum(mind, D2[c])
        labels = torch.argmin(D2[:, centres], dim=1)
        for _ in range(max_iter):
            onehot = torch.zeros(n, k, dtype=torch.float64)
            onehot[torch.arange(n), labels] = 1.0
            size = onehot.sum(0)
            safe = size.clamp_min(1.0)
            cross = (G @ onehot) / safe  # [n, k]: mean_{m in C} G_im
            within = torch.einsum("mc,mn,nc->c", onehot, G, onehot) / safe**2
            dist = diag[:, None] - 2 * cross + within[None, :]
            dist[:, size == 0] = math.inf
            new = torch.argmin(dist, dim=1)
            if torch.equal(new, labels):
                break
            labels = new
        onehot = torch.zeros(n, k, dtype=torch.float64)
        onehot[torch.arange(n), labels] = 1.0
        size = onehot.sum(0).clamp_min(1.0)
        within = torch.einsum("mc,mn,nc->c", onehot, G, onehot) / size**2
        cross = ((G @ onehot) / size)[torch.arange(n), labels]
        inertia = float((diag - 2 * cross + within[labels]).clamp_min(0.0).sum())
        if inertia < best_inertia:
            best_inertia, best_labels = inertia, labels.tolist()
    assert best_labels is not None
    return best_labels


@GROUPINGS.register("weight", needs="none", options={"kmeans_restarts": "restarts"})
def group_weight(
    selected: list[int], k: int, *, scores: Tensor, stats: Stats | None = None,
    expert_weights: WeightsFn | None = None, seed: int = 0, layer: int = 0, restarts: int = KMEANS_N_INIT,
) -> list[list[int]]:
    """WC: k-means on flattened expert weights (k-means++ seeding, seeded restarts).

    Our choice (METHOD.md only names "weight clustering"): Euclidean k-means on the raw
    flattened gate/up/down weights, `restarts` seeded restarts, lowest inertia wins. k-means
    rather than agglomerative because merging averages weights, and k-means minimises exactly the
    squared distance of each expert to its group's mean weights. Computed from the K x K Gram
    of the weights in float64 (`kernel_kmeans`).
    """
    sel = _check_args(selected, k, "weight")
    if expert_weights is None:
        raise UserError("grouping 'weight' needs the expert weights (a checkpoint), which were not provided")
    W = expert_weights(sel)
    if W.dim() != 2 or W.shape[0] != len(sel):
        raise UserError(f"grouping 'weight': expert weights of shape {tuple(W.shape)} do not match experts {sel}")
    G = _gram_rows(W)
    diag = torch.diagonal(G)
    D2 = (diag[:, None] + diag[None, :] - 2 * G).clamp_min(0.0)
    if _indistinguishable(D2, float(diag.max()) if len(sel) else 0.0):
        _warn_indistinguishable("weight", "weights", layer)
        return finalize_groups([sel], k, selected=sel, scores=scores, method="weight", layer=layer)
    labels = kernel_kmeans(G, k, generator(seed, layer, "grouping-weight"), n_init=restarts)
    groups: list[list[int]] = [[] for _ in range(k)]
    for e, c in zip(sel, labels):
        groups[c].append(e)
    return finalize_groups(groups, k, selected=sel, scores=scores, method="weight", layer=layer)


def average_linkage(dist: Tensor, k: int) -> list[list[int]]:
    """Agglomerative clustering with average linkage (UPGMA) down to k clusters; index lists.

    Lance-Williams update d(A+B, C) = (|A| d(A,C) + |B| d(B,C)) / (|A| + |B|). The closest pair is
    the first minimum in row-major order, i.e. ties merge the lowest indices (the best-ranked
    experts) first, so the result is deterministic. O(n^3) with n = K <= 256: milliseconds.
    """
    n = dist.shape[0]
    full = dist.to(torch.float64).clone()
    full.fill_diagonal_(math.inf)
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)  # consider each pair once, as i < j
    members = {i: [i] for i in range(n)}
    active = torch.ones(n, dtype=torch.bool)
    while len(members) > k:
        masked = full.masked_fill(~(upper & active[:, None] & active[None, :]), math.inf)
        idx = int(torch.argmin(masked))
        i, j = divmod(idx, n)
        ni, nj = len(members[i]), len(members[j])
        row = (ni * full[i] + nj * full[j]) / (ni + nj)
        full[i, :] = row
        full[:, i] = row
        full[i, i] = math.inf
        active[j] = False
        members[i].extend(members.pop(j))
    return [members[i] for i in sorted(members)]


@GROUPINGS.register("output", needs="full", options={"output_distance": "distance"})
def group_output(
    selected: list[int], k: int, *, scores: Tensor, stats: Stats | None = None,
    expert_weights: WeightsFn | None = None, seed: int = 0, layer: int = 0, distance: str | None = None,
) -> list[list[int]]:
    """HC-SMoE: average-linkage agglomerative clustering of the experts' mean outputs.

    Features: out_sum / tokens (mean output over ALL calibration tokens, every expert run on
    every token, so routing does not bias them). Distance: OUTPUT_DISTANCE (default Euclidean,
    see its docstring), or `distance=` "cosine". Deterministic (no seed needed).
    """
    sel = _check_args(selected, k, "output")
    need(stats or {}, "grouping 'output'", "out_sum")
    n_tok = token_count(stats, "grouping 'output'")
    X = stats["out_sum"].to(torch.float64)[torch.tensor(sel)] / n_tok
    metric = distance or OUTPUT_DISTANCE
    if metric == "euclidean":
        dist = torch.cdist(X, X)
        scale = float(X.norm(dim=1).max())
    elif metric == "cosine":
        norm = X.norm(dim=1)
        U = X / torch.where(norm > 0, norm, torch.ones_like(norm))[:, None]
        dist = (1.0 - U @ U.T).clamp_min(0.0)
        dist.fill_diagonal_(0.0)
        scale = 1.0
    else:
        raise UserError(f"grouping 'output': unknown distance {metric!r}; valid: euclidean, cosine")
    if _indistinguishable(dist, scale):
        _warn_indistinguishable("output", "mean outputs", layer)
        return finalize_groups([sel], k, selected=sel, scores=scores, method="output", layer=layer)
    clusters = average_linkage(dist, k)
    groups = [[sel[i] for i in c] for c in clusters]
    return finalize_groups(groups, k, selected=sel, scores=scores, method="output", layer=layer)


@GROUPINGS.register("router", needs="router")
def group_router(
    selected: list[int], k: int, *, scores: Tensor, stats: Stats | None = None,
    expert_weights: WeightsFn | None = None, seed: int = 0, layer: int = 0,
) -> list[list[int]]:
    """MC-SMoE: the k best-ranked experts are centres; others join the most router-similar centre.

    Similarity: cosine between router-logit columns over calibration tokens, from logit_gram:
    cos_ij = gram_ij / sqrt(gram_ii gram_jj) (0 if either column is all zero). Centres are the
    first k of `selected`, which is the selection ranking: by score for most scorings, but
    DO-ACP's greedy order for do-acp, whose `scores` are plain ACP; ranking its centres by ACP
    would make two near-duplicate experts both centres and merge away the diverse one the greedy
    step chose. A similarity tie goes to the better-ranked centre.
    """
    sel = _check_args(selected, k, "router")
    need(stats or {}, "grouping 'router'", "logit_gram")
    centres, others = sel[:k], sel[k:]
    gram = stats["logit_gram"].to(torch.float64)
    norm = torch.sqrt(torch.diagonal(gram).clamp_min(0.0))
    groups = [[c] for c in centres]
    if others:
        o, c = torch.tensor(others), torch.tensor(centres)
        denom = norm[o][:, None] * norm[c][None, :]
        cos = safe_div(gram[o][:, c], denom)
        for e, j in zip(others, torch.argmax(cos, dim=1).tolist()):
            groups[j].append(e)
    return finalize_groups(groups, k, selected=sel, scores=scores, method="router", layer=layer)
