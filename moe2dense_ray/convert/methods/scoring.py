"""Expert scoring: one number per routed expert of one layer, higher is better.

Every scoring is a function of ONE layer's calibration sums (docs/stats.md): because the
statistics are additive float64 sums over tokens, a score computed from them is the same
whether calibration ran on one worker or many. Definitions follow /work/shared/paper/METHOD.md
("Scoring"); where METHOD.md marks a definition as a reconstruction we use exactly the formula
quoted there, and say so below.

Signature of every registered scoring::

    fn(stats: dict[str, Tensor], *, k: int, seed: int, layer: int) -> ScoreResult

`k` is the number of groups (= experts kept when K == k); only DO-ACP uses it (ridge). `seed`
and `layer` only matter for `random`.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from ...core.config import MethodOptions
from ...core.errors import UserError
from .registry import Registry

Stats = Mapping[str, Tensor]
ScoringFn = Callable[..., "ScoreResult"]

SCORINGS: Registry[ScoringFn] = Registry("scoring")

DO_ACP_RIDGE_SCALE: float = MethodOptions.model_fields["ridge_scale"].default
"""DO-ACP ridge: lambda = DO_ACP_RIDGE_SCALE * mean(diag K) / k (METHOD.md quotes scale 1)."""


@dataclass
class ScoreResult:
    """Scores for all E experts of a layer, and optionally an explicit selection order.

    `scores` (float64 [E]): higher is better. These magnitudes are also what score-based scaling
    and score-weighted merging use, so they must be meaningful even when `order` is given.
    `order` (long [E] or None): when set, selection takes `order[:K]` (DO-ACP's greedy order,
    which is not a sort of any per-expert number); otherwise experts are ranked by descending
    score, ties broken by lower expert id.
    """

    scores: Tensor
    order: Tensor | None = None


# --------------------------------------------------------------------------------------------
# helpers


def generator(seed: int, layer: int, salt: str) -> torch.Generator:
    """A torch.Generator seeded from (salt, seed, layer) through SHA-256.

    Why hash: `seed + layer` would make (seed=0, layer=1) and (seed=1, layer=0) identical, and
    the salt keeps random scoring and random grouping streams independent.
    """
    digest = hashlib.sha256(f"moe2dense:{salt}:{int(seed)}:{int(layer)}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def need(stats: Stats, method: str, *names: str) -> None:
    """Refuse, in one line naming the method, statistics that lack what it reads."""
    missing = [n for n in names if n not in stats]
    if missing:
        full = {"sqnorm_all", "sqnorm_routed", "norm_routed", "gate_norm_routed", "gram", "out_sum"}
        hint = " (expert-output statistics: calibrate with --full-stats)" if full & set(missing) else ""
        raise UserError(f"{method} needs the statistics {', '.join(missing)}, which are missing{hint}")


def token_count(stats: Stats, method: str) -> float:
    """The layer's calibration token count, which every mean divides by; refuses zero."""
    need(stats, method, "tokens")
    n = float(stats["tokens"])
    if not n > 0:
        raise UserError(f"{method}: the statistics count {n:g} calibration tokens for this layer")
    return n


def _f64(stats: Stats, name: str) -> Tensor:
    return stats[name].to(torch.float64)


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den == 0 (an expert never selected has no conditional mean)."""
    nz = den > 0
    return torch.where(nz, num / torch.where(nz, den, torch.ones_like(den)), torch.zeros_like(num))


def num_experts(stats: Stats) -> int:
    """E, read from any per-expert statistic."""
    for name in ("sel_count", "prob_sum", "prob_sel_sum", "gate_sum", "logit_sum", "sqnorm_all"):
        if name in stats:
            return int(stats[name].shape[0])
    raise UserError("the statistics hold no per-expert entry (sel_count, prob_sum, ...)")


def ranking(scores: Tensor) -> list[int]:
    """Expert ids by descending score; ties (and NaNs, ranked last) broken by lower id."""
    vals = [float(v) for v in scores.detach().to(torch.float64).reshape(-1)]
    key = [(-v if not math.isnan(v) else math.inf, e) for e, v in enumerate(vals)]
    return [e for _, e in sorted(key)]


def select(result: ScoreResult, K: int) -> list[int]:
    """The K experts to keep, best first: `order[:K]` if the scoring gave an order, else by score.

    Deterministic: ties in score go to the lower expert id.
    """
    E = int(result.scores.numel())
    if not 1 <= K <= E:
        raise UserError(f"cannot select {K} experts out of {E}")
    if result.order is None:
        return ranking(result.scores)[:K]
    order = [int(e) for e in result.order.reshape(-1).tolist()]
    if len(order) < K or len(set(order[:K])) != K or any(not 0 <= e < E for e in order[:K]):
        raise ValueError(f"scoring order is not a valid ranking of {E} experts: {order[:K]}")
    return order[:K]


# --------------------------------------------------------------------------------------------
# router-only scorings


@SCORINGS.register("sf", needs="router")
def score_sf(stats: Stats, *, k: int, seed: int = 0, layer: int = 0) -> ScoreResult:
    """Selection frequency: how many calibration tokens route to the expert (top-k count)."""
    need(stats, "sf", "sel_count")
    return ScoreResult(_f64(stats, "sel_count"))


@SCORINGS.register("pp", needs="router")
def score_pp(stats: Stats, *, k: int, seed: int = 0, layer: int = 0) -> ScoreResult:
    """Pre-selection probability: mean router probability over all tokens, selected or not."""
    n = token_count(stats, "pp")
    need(stats, "pp", "prob_sum")
    return ScoreResult(_f64(stats, "prob_sum") / n)


@SCORINGS.register("cp", needs="router")
def score_cp(stats: Stats, *, k: int, seed: int = 0, layer: int = 0) -> ScoreResult:
    """Conditional probability: mean router probability over the tokens that select the expert.

    0 for an expert no calibration token selected (no evidence it is useful).
    """
    need(stats, "cp", "prob_sel_sum", "sel_count")
    return ScoreResult(safe_div(_f64(stats, "prob_sel_sum"), _f64(stats, "sel_count")))


# --------------------------------------------------------------------------------------------
# expert-output scorings


def acp_scores(stats: Stats, method: str = "acp") -> Tensor:
    """CP_e * sqrt(mean_x ||f_e(x)||^2) over ALL tokens (every expert run on every token).

    METHOD.md quotes this re-implementation; the paper may weight per token instead. The square
    root makes the activation factor an RMS output norm, i.e. on the scale of the output itself.
    """
    n = token_count(stats, method)
    need(stats, method, "prob_sel_sum", "sel_count", "sqnorm_all")
    cp = safe_div(_f64(stats, "prob_sel_sum"), _f64(stats, "sel_count"))
    rms = torch.sqrt((_f64(stats, "sqnorm_all") / n).clamp_min(0.0))
    return cp * rms


@SCORINGS.register("acp", needs="full")
def score_acp(stats: Stats, *, k: int, seed: int = 0, layer: int = 0) -> ScoreResult:
    """Activation-weighted CP: CP times the expert's RMS output norm over all tokens."""
    return ScoreResult(acp_scores(stats, "acp"))


def dopt_kernel(stats: Stats) -> Tensor:
    """K = diag(sqrt(ACP)) G diag(sqrt(ACP)) with G = gram / tokens (float64, symmetrised).

    G is the mean inner-product Gram of expert outputs, so K is positive semi-definite: its
    log-det measures the "volume" spanned by the chosen experts' (quality-weighted) outputs.
    """
    n = token_count(stats, "do-acp")
    need(stats, "do-acp", "gram")
    q = torch.sqrt(acp_scores(stats, "do-acp").clamp_min(0.0))
    G = _f64(stats, "gram") / n
    K = q[:, None] * G * q[None, :]
    return 0.5 * (K + K.T)


def greedy_logdet(kernel: Tensor, ridge: float, steps: int | None = None) -> tuple[list[int], Tensor]:
    """Greedy maximisation of log det(K_S + ridge * I), one expert at a time.

    Incremental (pivoted Cholesky): with C the Cholesky columns of the chosen set, the gain of
    adding j is log d_j where d_j = K_jj + ridge - ||C_j||^2 is the Schur complement
    (K_jj + ridge - k_j^T (K_S + ridge I)^{-1} k_j). After choosing p, the new Cholesky column
    is c = ((K + ridge I)[:, p] - C C_p^T) / sqrt(d_p) and d -= c^2. O(E^2) per step, float64;
    E = 256 takes milliseconds. Ties go to the lower expert id (torch.argmax returns the first
    maximum). Returns (order, gains) with gains[t] = log d of the t-th pick, so
    log det(K_S + ridge I) for the first t picks is gains[:t].sum().
    """
    K = kernel.to(torch.float64)
    E = K.shape[0]
    steps = E if steps is None else int(steps)
    if not ridge > 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge must be positive and finite, got {ridge}")
    d = torch.diagonal(K).clone() + ridge
    C = torch.zeros(E, steps, dtype=torch.float64)
    chosen = torch.zeros(E, dtype=torch.bool)
    order: list[int] = []
    gains = torch.zeros(steps, dtype=torch.float64)
    tiny = ridge * 1e-12  # d_j >= ridge in exact arithmetic; guard rounding only
    for t in range(steps):
        p = int(torch.argmax(d.masked_fill(chosen, -math.inf)))
        dp = float(d[p]) if float(d[p]) > tiny else tiny
        gains[t] = math.log(dp)
        col = K[:, p].clone()
        col[p] += ridge
        c = (col - C[:, :t] @ C[p, :t]) / math.sqrt(dp)
        C[:, t] = c
        d = d - c * c
        chosen[p] = True
        order.append(p)
    return order, gains


@SCORINGS.register("do-acp", needs="full", options={"ridge_scale": "ridge_scale"})
def score_do_acp(stats: Stats, *, k: int, seed: int = 0, layer: int = 0, ridge: float | None = None,
                 ridge_scale: float = DO_ACP_RIDGE_SCALE) -> ScoreResult:
    """Diversity-aware ACP: greedy D-optimal order on the ACP-weighted output Gram (paper's best).

    Kernel K = diag(sqrt(ACP)) G diag(sqrt(ACP)), G_ij = mean_x <f_i(x), f_j(x)>; greedily add
    the expert maximising log det(K_S + lambda I). lambda defaults to
    ridge_scale * mean(diag K) / k (scale 1), the re-implementation METHOD.md quotes: with k experts
    kept the ridge is comparable to one expert's share of the total "energy", so it regularises
    without drowning the kernel. Pass `ridge=` for an absolute lambda. The greedy runs over ALL
    E experts so the order is a full ranking (any K can be read from it). The objective
    log det(I + K_S / lambda) is monotone submodular, hence greedy is within (1 - 1/e) of the
    optimum. `scores` are the ACP values (not the order), so score scaling and score-weighted
    merging keep meaningful magnitudes; `order` carries the selection.
    """
    K = dopt_kernel(stats)
    acp = acp_scores(stats, "do-acp")
    if ridge is None:
        lam = ridge_scale * float(torch.diagonal(K).mean()) / max(int(k), 1)
    else:
        lam = float(ridge)
    if not (lam > 0 and math.isfinite(lam)):
        warnings.warn(
            f"do-acp, layer {layer}: ridge lambda = {lam:g} (zero expert-output kernel?); using "
            "lambda = 1, so the order falls back to the lowest expert ids among ties",
            stacklevel=2,
        )
        lam = 1.0
    order, _ = greedy_logdet(K, lam)
    return ScoreResult(acp, torch.tensor(order, dtype=torch.long))


@SCORINGS.register("reap", needs="full")
def score_reap(stats: Stats, *, k: int, seed: int = 0, layer: int = 0) -> ScoreResult:
    """REAP (Lasby et al. 2025): mean over routed tokens of gate weight times output norm.

    0 for an expert no calibration token selected.
    """
    need(stats, "reap", "gate_norm_routed", "sel_count")
    return ScoreResult(safe_div(_f64(stats, "gate_norm_routed"), _f64(stats, "sel_count")))


@SCORINGS.register("ean", needs="full")
def score_ean(stats: Stats, *, k: int, seed: int = 0, layer: int = 0) -> ScoreResult:
    """Expert activation norm: sum over routed tokens of the expert's output norm."""
    need(stats, "ean", "norm_routed")
    return ScoreResult(_f64(stats, "norm_routed"))


@SCORINGS.register("random", needs="none")
def score_random(stats: Stats, *, k: int, seed: int = 0, layer: int = 0) -> ScoreResult:
    """Seeded uniform random scores (baseline); reproducible per (seed, layer)."""
    E = num_experts(stats)
    return ScoreResult(torch.rand(E, generator=generator(seed, layer, "scoring-random"), dtype=torch.float64))
