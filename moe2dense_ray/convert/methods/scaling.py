"""Magnitude scaling: the constant a_j that replaces each group's token-dependent gate.

The dense FFN computes sum_j a_j f_j(x) (METHOD.md step 5). In the MoE, the routed experts'
gates sum, per token, to the gate mass m(x) = sum_e g_e(x): 1 for renormalised top-k routers
(Qwen3-MoE, GPT-OSS, Mixtral), something else for DeepSeek-V2 / OLMoE / Qwen2-MoE (no
renormalisation) or a `routed_scaling_factor`. Every scaling here therefore distributes the
calibrated mean mass m = gate_mass / tokens over the k groups, so the scales always sum to m;
with renormalised routers m = 1 and `uniform` is the paper's a_j = 1/k.

Signature of every registered scaling::

    fn(groups: list[list[int]], scores: Tensor[E], stats: dict) -> list[float]
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
from .scoring import need, token_count

Stats = Mapping[str, Tensor]
ScalingFn = Callable[..., list[float]]

SCALINGS: Registry[ScalingFn] = Registry("scaling")

SCORE_GROUP_REDUCTION: str = MethodOptions.model_fields["score_reduction"].default
"""How `score` scaling turns a merged group's member scores into one group score: "sum" or "mean".

"sum" by default: a merged group stands in for all its members, so it should carry the routing
weight all of them received (with SF scores the sum is exactly the group's share of routed
tokens). "mean" matches METHOD.md's "each group's mean conditional probability" wording for the
DeepSeek students; with K == k (the paper's setting there) both are identical.
"""


def gate_mass_per_token(stats: Stats) -> float:
    """m = gate_mass / tokens: mean total gate weight the MoE applies per token."""
    need(stats, "scaling", "gate_mass")
    m = float(stats["gate_mass"]) / token_count(stats, "scaling")
    if not math.isfinite(m):
        raise UserError(f"scaling: the calibrated gate mass per token is {m}")
    return m


@SCALINGS.register("uniform", needs="router")
def scale_uniform(groups: Sequence[Sequence[int]], scores: Tensor, stats: Stats) -> list[float]:
    """a_j = m / k: the mean gate mass per token split evenly (1/k for renormalised routers)."""
    k = len(groups)
    if k == 0:
        raise ValueError("no groups to scale")
    m = gate_mass_per_token(stats)
    return [m / k] * k


@SCALINGS.register("score", needs="router", options={"score_reduction": "reduce"})
def scale_score(groups: Sequence[Sequence[int]], scores: Tensor, stats: Stats, *,
                reduce: str | None = None) -> list[float]:
    """a_j proportional to the group's score, summing to the mean gate mass m.

    s_g = sum (SCORE_GROUP_REDUCTION, or `reduce=`) of the members' scores; a_g = m s_g / sum s.
    Falls back to uniform, with a warning, if any group score is non-positive or not finite
    (a zero or negative gate would delete or flip that block).
    """
    k = len(groups)
    if k == 0:
        raise ValueError("no groups to scale")
    how = reduce or SCORE_GROUP_REDUCTION
    if how not in ("sum", "mean"):
        raise UserError(f"score scaling: unknown reduction {how!r}; valid: sum, mean")
    m = gate_mass_per_token(stats)
    s = scores.detach().to(torch.float64).reshape(-1)
    sg = []
    for g in groups:
        v = s[torch.tensor([int(e) for e in g])]
        sg.append(float(v.sum() if how == "sum" else v.mean()))
    if not all(math.isfinite(x) and x > 0 for x in sg):
        warnings.warn(
            f"score scaling: group scores {['%.3g' % x for x in sg]} are not all positive; using uniform scaling",
            stacklevel=2,
        )
        return [m / k] * k
    total = sum(sg)
    return [m * x / total for x in sg]
