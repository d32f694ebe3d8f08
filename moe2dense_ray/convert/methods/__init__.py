"""The method library: scoring, grouping and scaling registries (pure torch; no Ray, no IO).

    result = SCORINGS.get("do-acp")(layer_stats, k=k, seed=seed, layer=i)
    selected = select(result, K)
    groups = GROUPINGS.get("none")(selected, k, scores=result.scores, stats=layer_stats,
                                  expert_weights=None, seed=seed, layer=i)
    scales = SCALINGS.get("uniform")(groups, result.scores, layer_stats)
    coeffs = merge_weights(groups[0], result.scores)

`Registry.needs(name)` says which statistics a method requires ("none" | "router" | "full").
"""

from .grouping import (
    GROUPINGS,
    DegenerateGroupingWarning,
    average_linkage,
    finalize_groups,
    kernel_kmeans,
    merge_weights,
)
from .registry import NEEDS, Registry
from .scaling import SCALINGS, gate_mass_per_token
from .scoring import (
    SCORINGS,
    ScoreResult,
    acp_scores,
    dopt_kernel,
    generator,
    greedy_logdet,
    num_experts,
    ranking,
    select,
)

__all__ = [
    "GROUPINGS",
    "NEEDS",
    "SCALINGS",
    "SCORINGS",
    "DegenerateGroupingWarning",
    "Registry",
    "ScoreResult",
    "acp_scores",
    "average_linkage",
    "dopt_kernel",
    "finalize_groups",
    "gate_mass_per_token",
    "generator",
    "greedy_logdet",
    "kernel_kmeans",
    "merge_weights",
    "num_experts",
    "ranking",
    "select",
]
