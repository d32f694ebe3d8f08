"""The conversion plan: which experts each layer keeps, how they are grouped and scaled.

A plan is small JSON (`moe2dense_plan.json`) computed in seconds from calibration statistics,
so many plans (a Tune sweep) can share one calibration. `build` applies a plan to a checkpoint.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import pydantic
import torch

from ..core.config import MethodOptions, PlanSettings
from ..core.errors import UserError
from ..core.storage import first_nonfinite_json
from .stats import Stats

PLAN_FILE = "moe2dense_plan.json"
PLAN_VERSION = 1

MAX_SCALE = 1e3
"""Largest |scale| (group scales and shared_scale) a plan may hold.

Every scaling distributes the calibrated mean gate mass per token m over the k groups, so a real
group scale lies in (0, m]: m = 1 for renormalised top-k routers, at most top_k x
routed_scaling_factor otherwise (about 16 for DeepSeek-V2, 2.5 for DeepSeek-V3); shared_scale is a
mean sigmoid, in (0, 1). A scale beyond 1e3 is a hand edit or a corrupt file and would blow up the
student's FFN output, so `Plan.validate` refuses it."""


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
    # set in a student's plan when `build --refit` fitted its FFNs: how, on what, and each
    # layer's relative reconstruction error before and after (None: the plan's weights as they are)
    refit: dict[str, Any] | None = None

    def layer(self, index: int) -> LayerPlan:
        for lp in self.layers:
            if lp.layer == index:
                return lp
        raise UserError(f"the plan has no entry for MoE layer {index}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "the plan") -> "Plan":
        """Parse a plan, or raise one UserError line naming the first thing wrong with it.

        Rejected: invalid JSON, a top level that is not an object, missing or unknown keys (the
        plan's and each layer's), an unknown `version`, values of the wrong type (strictly: "3"
        and 3.5 are not integers, true is not a number, a string is not a list) and NaN or
        infinite numbers anywhere. Whether the plan is consistent is `validate()`'s part.
        """
        from ..core.storage import parse_json

        d = parse_json(text, where)
        _check_keys(d, where)
        if d["version"] != PLAN_VERSION or isinstance(d["version"], bool):
            raise UserError(f"{where}: plan version {d['version']!r} is not supported (this moe2dense reads "
                            f"version {PLAN_VERSION}); make the plan again with `moe2dense plan`")
        bad = first_nonfinite_json(d)
        if bad is not None:
            loc, value = bad
            raise UserError(f"{where}: {_describe(loc, d)} is {_json_number(value)} (not a finite number)")
        try:
            return _plan_adapter().validate_json(json.dumps(d), strict=True)
        except pydantic.ValidationError as e:
            errors = e.errors()
            parts = [f"{_describe(err['loc'], d)}: {err['msg'].removeprefix('Value error, ')}"
                     f"{_shown(err.get('input'))}" for err in errors[:3]]
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            raise UserError(f"{where}: " + "; ".join(parts) + more) from None

    def validate(self) -> None:
        """Check that the plan is consistent and buildable; one UserError line if not.

        The header (num_experts E, experts K, groups k) must agree with every layer: K experts
        selected out of range 0..E-1, partitioned into exactly k non-empty groups with one finite
        scale each (|scale| <= MAX_SCALE, as is the shared expert's), E finite scores, and each
        MoE layer planned once. A header that disagreed with its layers used to build a silently
        padded FFN of the wrong width.
        """
        E, K, k = self.num_experts, self.experts, self.groups
        if self.version != PLAN_VERSION:
            raise UserError(f"plan version {self.version!r} is not supported (this moe2dense reads version "
                            f"{PLAN_VERSION})")
        if E < 1:
            raise UserError(f"the plan's num_experts is {E}; it must be at least 1")
        if not 1 <= K <= E:
            raise UserError(f"the plan's experts (K, selected per layer) is {K}; it must be between 1 and "
                            f"num_experts ({E})")
        if not 1 <= k <= K:
            raise UserError(f"the plan's groups (k, per layer) is {k}; it must be between 1 and experts ({K})")
        if not self.layers:
            raise UserError("the plan has no layers")
        seen: set[int] = set()
        for lp in self.layers:
            at = f"plan layer {lp.layer}"
            if lp.layer < 0:
                raise UserError(f"{at}: a layer index cannot be negative")
            if lp.layer in seen:
                raise UserError(f"{at}: the layer is planned twice")
            seen.add(lp.layer)
            if len(lp.scores) != E:
                raise UserError(f"{at}: {len(lp.scores)} scores, but the plan's num_experts is {E} "
                                f"(one score per expert)")
            if not all(math.isfinite(s) for s in lp.scores):
                raise UserError(f"{at}: the scores hold NaN or infinite values")
            if len(lp.selected) != K:
                raise UserError(f"{at}: {len(lp.selected)} selected experts, but the plan's experts is {K}")
            out_of_range = [e for e in lp.selected if not 0 <= e < E]
            if out_of_range:
                raise UserError(f"{at}: expert id {out_of_range[0]} is out of range 0..{E - 1}")
            if len(set(lp.selected)) != len(lp.selected):
                raise UserError(f"{at}: an expert is selected twice")
            if len(lp.groups) != k:
                raise UserError(f"{at}: {len(lp.groups)} groups, but the plan's groups is {k} (the header must "
                                f"agree with every layer)")
            if any(not g for g in lp.groups):
                raise UserError(f"{at}: group {next(j for j, g in enumerate(lp.groups) if not g)} is empty")
            flat = sorted(e for g in lp.groups for e in g)
            if flat != sorted(lp.selected):
                raise UserError(f"{at}: groups are not a partition of the selected experts")
            if len(lp.scales) != len(lp.groups):
                raise UserError(f"{at}: {len(lp.scales)} scales for {len(lp.groups)} groups (one scale per group)")
            for name, value in [*((f"scales[{j}]", a) for j, a in enumerate(lp.scales)),
                                ("shared_scale", lp.shared_scale)]:
                if not math.isfinite(value) or abs(value) > MAX_SCALE:
                    raise UserError(f"{at}: {name} is {_json_number(value)}; a scale must be finite and at most "
                                    f"{MAX_SCALE:g} in magnitude (computed scales lie between 0 and the mean gate "
                                    f"mass per token)")


_REQUIRED_PLAN_KEYS = ("version", "layers")  # defaulted in Python, but every written plan has them


def _check_keys(d: dict[str, Any], where: str) -> None:
    """Missing and unknown keys of a parsed plan and of each of its layers, as one UserError."""
    def check(obj: dict[str, Any], cls: type, extra_required: tuple[str, ...], at: str) -> None:
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in [*required, *extra_required] if n not in obj]
        if missing:
            raise UserError(f"{where}: {at}missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        unknown = [n for n in obj if n not in names]
        if unknown:
            raise UserError(f"{where}: {at}unknown key{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(repr(n) for n in unknown)} (a plan{' layer' if at else ''} has "
                            f"{', '.join(names)})")

    check(d, Plan, _REQUIRED_PLAN_KEYS, "")
    if isinstance(d["layers"], list):
        for i, lp in enumerate(d["layers"]):
            if isinstance(lp, dict):
                check(lp, LayerPlan, (), f"{_describe(('layers', i), d)}: ")


def _describe(loc: tuple, d: dict[str, Any]) -> str:
    """A location in a parsed plan as the user reads it: `layers[1] (MoE layer 3).scales[0]`."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            if i == 1 and loc[0] == "layers":
                layer = d["layers"][part].get("layer") if isinstance(d["layers"][part], dict) else None
                if isinstance(layer, int) and not isinstance(layer, bool):
                    out += f" (MoE layer {layer})"
        else:
            out += f".{part}" if out else str(part)
    return out or "the plan"


def _json_number(value: float) -> str:
    """A number as JSON spells it (NaN, Infinity), the way the user sees it in the file."""
    return json.dumps(value)


def _shown(value: Any) -> str:
    if isinstance(value, (dict, list)) and len(value) > 3:
        return ""
    text = repr(value)
    return f", got {text if len(text) <= 40 else text[:37] + '...'}"


@functools.cache
def _plan_adapter() -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(Plan)


def check_plan_output(url: str, *, overwrite: bool = False, sources: tuple[str | None, ...] = ()):
    """Where `save_plan(url)` would write, checked before a plan is computed: (fs, path, url)."""
    from ..core.storage import check_output, is_local, url_to_fs

    fs, path = url_to_fs(url)
    if str(url).endswith("/") or fs.isdir(path):
        if fs.exists(f"{path}/config.json"):  # a checkpoint's plan records how its weights were made
            raise UserError(f"{url} is a checkpoint: its {PLAN_FILE} records how it was built; "
                            f"write the plan somewhere else")
        path = f"{path}/{PLAN_FILE}"
    target = path if is_local(fs) else fs.unstrip_protocol(path)
    check_output(target, what="plan", overwrite=overwrite, sources=sources)
    return fs, path, target


def save_plan(plan: Plan, url: str, *, overwrite: bool = False, sources: tuple[str | None, ...] = ()) -> str:
    """Write the plan to a file, or into a directory as moe2dense_plan.json; returns the file.

    `url` is a directory when it exists as one or ends with `/`. The file appears complete or not
    at all (written beside it, then renamed); an existing file is replaced only with `overwrite`
    and only when it is a plan; the plan never goes into or over one of `sources` (the inputs).
    """
    from ..core.storage import (
        OutputLock,
        check_output,
        clean_leftovers,
        is_local,
        partial_name,
        swap_in,
    )

    fs, path, target = check_plan_output(url, overwrite=overwrite, sources=sources)
    if is_local(fs):  # `missing/../P.json` is P.json, as the output checks read it: no `missing/` is made
        path = os.path.realpath(path)
    with OutputLock(target):
        check_output(target, what="plan", overwrite=overwrite, sources=sources)
        clean_leftovers(fs, path)
        fs.makedirs(path.rsplit("/", 1)[0] if "/" in path else ".", exist_ok=True)
        tmp = partial_name(path)
        try:
            with fs.open(tmp, "w") as f:
                f.write(plan.to_json())
            swap_in(fs, tmp, path, overwrite=overwrite)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)
    return path


def load_plan(url: str) -> Plan:
    """Read and validate a plan file, or the plan inside a directory (a checkpoint `build` wrote).

    The file is read with a size cap and must be a regular file; anything malformed or
    inconsistent is one UserError line (see `Plan.from_json` and `Plan.validate`)."""
    from ..core.storage import read_small, url_to_fs

    fs, path = url_to_fs(url)
    if fs.isdir(path):
        if not fs.exists(f"{path}/{PLAN_FILE}"):
            raise UserError(f"{url} is a directory without a plan ({PLAN_FILE}): pass a plan file, or a "
                            f"checkpoint that `moe2dense build` wrote")
        path, where = f"{path}/{PLAN_FILE}", f"{str(url).rstrip('/')}/{PLAN_FILE}"
    elif not fs.exists(path):
        raise UserError(f"no plan at {url}")
    else:
        where = str(url)
    plan = Plan.from_json(read_small(fs, path, what=where), where)
    try:
        plan.validate()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return plan


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


def make_plan(stats: Stats, cfg: PlanSettings, *, expert_weights=None) -> Plan:
    """Score, select, group and scale every MoE layer from calibration statistics, as `cfg` says
    (the methods' own settings included; the plan records them).

    `expert_weights(layer, experts) -> Tensor[len(experts), D]` gives flattened weights of the
    selected experts for weight-space grouping; it is only called when that grouping is chosen.
    """
    from .methods import GROUPINGS, SCALINGS, SCORINGS, select

    experts, scoring, grouping, scaling, seed = cfg.experts, cfg.scoring, cfg.grouping, cfg.scaling, cfg.seed
    E = stats.num_experts
    k = check_counts(E, experts, cfg.groups)
    check_methods(scoring, grouping, scaling, full_stats=stats.full)
    options = cfg.method_options()
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
