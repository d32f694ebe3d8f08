"""`convert` = calibrate -> plan -> refit -> build, with every input checked before the expensive parts."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from ..core.config import BuildConfig, CalibrateConfig, ConvertConfig
from ..core.source import Source
from ..core.storage import OutputLock, check_output
from ..core.teachers import TeacherPool
from .build import BuildReport, build, read_expert_weights
from .calibrate import calibrate
from .plan import Plan, check_counts, check_methods, make_plan
from .refit import refit as fit_ffns
from .stats import Stats


@dataclass
class ConvertResult:
    plan: Plan
    stats: Stats
    report: BuildReport


def convert(cfg: ConvertConfig, *, progress: bool = True) -> ConvertResult:
    """Convert an MoE checkpoint into a dense one in a single call: calibrate -> plan -> refit ->
    build, on one opened checkpoint and one set of teacher replicas.

    Expert-output statistics are collected only when a chosen method needs them (`full_stats`
    None), since they cost a run of every expert on every token. Both outputs are checked against
    every input (and each other) and locked before calibration starts. With `cfg.refit` (default
    `down`), the plan's FFNs are refitted on the calibration blocks, on the replicas that
    calibrated, before build; `none` is the paper's plain method.
    """
    refit = cfg.refit_config()
    with Source.open(cfg.src, allow_pickle=cfg.allow_pickle) as source:  # inspected once, for every stage
        check_counts(source.shape.num_experts, cfg.experts, cfg.groups)
        needs_full = check_methods(cfg.scoring, cfg.grouping, cfg.scaling)
        full = needs_full if cfg.full_stats is None else cfg.full_stats
        check_output(cfg.out, what="checkpoint", overwrite=cfg.overwrite, sources=(cfg.src, cfg.data, cfg.stats))
        if cfg.stats:
            check_output(cfg.stats, what="statistics", overwrite=cfg.overwrite, sources=(cfg.src, cfg.data, cfg.out))
        with OutputLock(cfg.out), (OutputLock(cfg.stats) if cfg.stats else contextlib.nullcontext()):
            with (TeacherPool(source.url, workers=cfg.workers, gpus_per_worker=cfg.gpus_per_worker,
                              resources=cfg.teacher_resources) if refit else contextlib.nullcontext()) as pool:
                stats = calibrate(_as(CalibrateConfig, cfg, full_stats=full, out=cfg.stats), progress=progress,
                                  source=source, pool=pool)
                weights = read_expert_weights(source) if cfg.grouping == "weight" else None
                plan = make_plan(stats, cfg, expert_weights=weights)
                fitted = fit_ffns(source, plan, refit, progress=progress, pool=pool) if refit else None
            # the replicas are gone (their memory back) before the build streams the checkpoint
            report = build(_as(BuildConfig, cfg, refit="none", plan=None), plan, progress=progress, source=source,
                           fitted=fitted)
    return ConvertResult(plan, stats, report)


def _as(kind: type, cfg: ConvertConfig, **changes: Any):
    """The settings of one stage, taken from `convert`'s (one definition of each setting)."""
    return kind(**{**{k: getattr(cfg, k) for k in kind.model_fields if k in type(cfg).model_fields}, **changes})


__all__ = ["convert", "ConvertResult"]
