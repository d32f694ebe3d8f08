"""The conversion plan: which experts each layer keeps, how they are grouped and scaled.

A plan is small JSON (`moe2dense_plan.json`) computed in seconds from calibration statistics,
so many plans (a Tune sweep) can share one calibration. `build` applies a plan to a checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .config import MethodOptions
from .errors import UserError
from .stats import Stats

PLAN_FILE = "moe2dense_plan.json"
PLAN_VERSION = 1


@dataclass
class LayerPlan:
    layer: int
    scores: list[float]  # one per routed expert, higher is better
    selected: list[int]  # expert ids in concatenation order
    groups: list[list[int]]  # a partition of `selected`; each group becomes one block of the FFN
    scales: list[float]  # one per group: the constant that replaces the token-dependent gate
    shared_scale: float = 1.0  # multiplies the shared expert(s), if any


@dataclass
class Plan:
    model_type: str
    num_experts: int
    experts: int  # K, experts selected per layer
    groups: int  # k, groups per layer (k == K: pure pruning)
    scoring: str
    grouping: str
    scaling: str
    seed: int = 0
    source: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=lambda: MethodOptions().model_dump())
    layers: list[LayerPlan] = field(default_factory=list)
    version: int = PLAN_VERSION

    def layer(self, index: int) -> LayerPlan:
        for lp in self.layers:
            if lp.layer == index:
                return lp
        raise UserError(f"the plan has no entry for MoE layer {index}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
            layers = [LayerPlan(**lp) for lp in d.pop("layers")]
            return cls(**d, layers=layers)
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise UserError(f"not a valid moe2dense plan ({e})") from None

    def validate(self) -> None:
        for lp in self.layers:
            flat = sorted(e for g in lp.groups for e in g)
            if flat != sorted(lp.selected) or len(set(flat)) != len(flat):
                raise UserError(f"plan layer {lp.layer}: groups are not a partition of the selected experts")
            if any(not 0 <= e < self.num_experts for e in flat):
                raise UserError(f"plan layer {lp.layer}: expert id out of range 0..{self.num_experts - 1}")
            if len(lp.scales) != len(lp.groups) or not lp.groups:
                raise UserError(f"plan layer {lp.layer}: needs one scale per group")


def save_plan(plan: Plan, url: str, *, overwrite: bool = False) -> str:
    """Write the plan to a file, or into a directory as moe2dense_plan.json; returns the file.

    The file appears complete or not at all (written beside it, then renamed), and an existing
    plan is only replaced with `overwrite`.
    """
    import uuid

    from .checkpoint import url_to_fs

    fs, path = url_to_fs(url)
    if fs.isdir(path):
        path = f"{path}/{PLAN_FILE}"
    if fs.exists(path) and not overwrite:
        raise UserError(f"{path} already exists (use --overwrite to replace it)")
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "w") as f:
            f.write(plan.to_json())
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)
    return path


def load_plan(url: str) -> Plan:
    import fsspec

    from .checkpoint import url_to_fs

    fs, path = url_to_fs(url)
    if fs.isdir(path):
        path = f"{path}/{PLAN_FILE}"
    if not fs.exists(path):
        raise UserError(f"no plan at {url}")
    with fs.open(path, "r") as f:
        return Plan.from_json(f.read())


def check_counts(num_experts: int, experts: int, groups: int | None) -> int:
    """Validate K and k against E early, before any expensive work; returns k."""
    if experts < 1 or experts > num_experts:
        raise UserError(f"--experts must be between 1 and {num_experts} (the model has {num_experts} routed experts), got {experts}")
    k = experts if groups is None else groups
    if k < 1 or k > experts:
        raise UserError(f"--groups must be between 1 and --experts ({experts}), got {k}")
    return k


def check_methods(scoring: str, grouping: str, scaling: str, *, full_stats: bool | None = None) -> bool:
    """Resolve method names (unknown names are a UserError) and check the statistics suffice.

    Returns whether the methods need expert-output (full) statistics."""
    from .methods import GROUPINGS, SCALINGS, SCORINGS

    needs = [SCORINGS.needs(scoring), GROUPINGS.needs(grouping), SCALINGS.needs(scaling)]
    if full_stats is False and "full" in needs:
        which = [f"{kind} {name}" for kind, name, need in
                 zip(("scoring", "grouping", "scaling"), (scoring, grouping, scaling), needs) if need == "full"]
        raise UserError(f"{' and '.join(which)} needs expert-output statistics, which these were calibrated "
                        f"without: calibrate with --full-stats")
    return "full" in needs


def make_plan(
    stats: Stats,
    *,
    experts: int,
    scoring: str,
    grouping: str = "none",
    scaling: str = "uniform",
    groups: int | None = None,
    seed: int = 0,
    expert_weights=None,
    options: MethodOptions | None = None,
) -> Plan:
    """Score, select, group and scale every MoE layer from calibration statistics.

    `options` holds the methods' own settings (defaults: `MethodOptions()`); the plan records them.

    `expert_weights(layer, experts) -> Tensor[len(experts), D]` gives flattened weights of the
    selected experts for weight-space grouping; it is only called when that grouping is chosen.
    """
    from .methods import GROUPINGS, SCALINGS, SCORINGS, select

    E = stats.num_experts
    k = check_counts(E, experts, groups)
    check_methods(scoring, grouping, scaling, full_stats=stats.full)
    options = options or MethodOptions()
    score_fn, group_fn, scale_fn = SCORINGS.get(scoring), GROUPINGS.get(grouping), SCALINGS.get(scaling)
    score_kw, group_kw, scale_kw = (SCORINGS.options(scoring, options), GROUPINGS.options(grouping, options),
                                    SCALINGS.options(scaling, options))
    plan = Plan(
        model_type=stats.model_type, num_experts=E, experts=experts, groups=k, scoring=scoring,
        grouping=grouping, scaling=scaling, seed=seed, source=stats.source,
        stats={"tokens": stats.tokens, "samples": stats.meta.get("samples"), "seq_len": stats.meta.get("seq_len")},
        options=options.model_dump(),
    )
    for layer in stats.moe_layers:
        s = stats.layer(layer)
        result = score_fn(s, k=k, seed=seed, layer=layer, **score_kw)
        selected = select(result, experts)
        weights_fn = (lambda sel, layer=layer: expert_weights(layer, sel)) if expert_weights else None
        grouped = group_fn(selected, k, scores=result.scores, stats=s, expert_weights=weights_fn, seed=seed,
                           layer=layer, **group_kw)
        scales = scale_fn(grouped, result.scores, s, **scale_kw)
        shared = float(s["shared_gate_sum"] / s["tokens"]) if "shared_gate_sum" in s else 1.0
        plan.layers.append(
            LayerPlan(
                layer=layer,
                scores=[float(x) for x in result.scores.to(torch.float64)],
                selected=[int(e) for e in selected],
                groups=[[int(e) for e in g] for g in grouped],
                scales=[float(a) for a in scales],
                shared_scale=shared,
            )
        )
    plan.validate()
    return plan
