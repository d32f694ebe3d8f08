"""`convert` = calibrate -> plan -> build, with every input checked before the expensive parts."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..core.config import MethodOptions, RefitConfig
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


def convert(
    src: str,
    data: str,
    out: str,
    *,
    experts: int,
    scoring: str = "cp",
    grouping: str = "none",
    scaling: str = "uniform",
    groups: int | None = None,
    samples: int = 64,
    seq_len: int = 512,
    workers: int = 1,
    full_stats: bool | None = None,
    stats_out: str | None = None,
    seed: int = 0,
    dtype: str | None = None,
    max_shard_bytes: int = 1 << 30,
    overwrite: bool = False,
    allow_pickle: bool = False,
    batch_size: int = 4,
    progress: bool = True,
    gpus_per_worker: float | None = None,
    text_field: str = "text",
    options: MethodOptions | None = None,
    teacher_resources: dict[str, float] | None = None,
    refit: RefitConfig | str | None = "down",
) -> ConvertResult:
    """Convert an MoE checkpoint into a dense one in a single call.

    Expert-output statistics are collected only when a chosen method needs them (`full_stats`
    None), since they cost a run of every expert on every token. Both outputs are checked against
    every input (and each other) and locked before calibration starts. With `refit`, the plan's
    FFNs are refitted (`refit.refit`) on the same teacher replicas that calibrated, before build:
    by default the down projection, on the calibration blocks (a fit name runs on them, a
    `RefitConfig` says everything); "none" or None is the paper's plain method.
    """
    if isinstance(refit, str):
        refit = None if refit == "none" else RefitConfig(
            data=data, refit=refit, samples=samples, seq_len=seq_len, workers=workers, batch_size=batch_size,
            text_field=text_field, gpus_per_worker=gpus_per_worker, teacher_resources=teacher_resources or {},
            seed=seed)
    with Source.open(src, allow_pickle=allow_pickle) as source:  # inspected once, for every stage
        check_counts(source.shape.num_experts, experts, groups)
        needs_full = check_methods(scoring, grouping, scaling)
        full = needs_full if full_stats is None else full_stats
        check_output(out, what="checkpoint", overwrite=overwrite, sources=(src, data, stats_out))
        if stats_out:
            check_output(stats_out, what="statistics", overwrite=overwrite, sources=(src, data, out))
        with OutputLock(out), (OutputLock(stats_out) if stats_out else contextlib.nullcontext()):
            return _convert(source, data, out, experts=experts, scoring=scoring, grouping=grouping,
                            scaling=scaling, groups=groups, samples=samples, seq_len=seq_len, workers=workers, full=full,
                            stats_out=stats_out, seed=seed, dtype=dtype, max_shard_bytes=max_shard_bytes,
                            overwrite=overwrite, allow_pickle=allow_pickle, batch_size=batch_size,
                            progress=progress, gpus_per_worker=gpus_per_worker, text_field=text_field,
                            options=options, teacher_resources=teacher_resources, refit=refit)


def _convert(source, data, out, *, experts, scoring, grouping, scaling, groups, samples, seq_len, workers, full,
             stats_out, seed, dtype, max_shard_bytes, overwrite, allow_pickle, batch_size, progress,
             gpus_per_worker, text_field, options, teacher_resources, refit) -> ConvertResult:
    teacher_dtype, src = "auto", source.url
    with (TeacherPool(src, workers=workers, dtype=teacher_dtype, gpus_per_worker=gpus_per_worker,
                      resources=teacher_resources) if refit is not None else contextlib.nullcontext()) as pool:
        stats = calibrate(source, data, samples=samples, seq_len=seq_len, workers=workers, full=full,
                          out=stats_out, overwrite=overwrite, batch_size=batch_size, seed=seed, progress=progress,
                          gpus_per_worker=gpus_per_worker, text_field=text_field, allow_pickle=allow_pickle,
                          teacher_resources=teacher_resources, pool=pool)
        weights = read_expert_weights(source) if grouping == "weight" else None
        plan = make_plan(stats, experts=experts, scoring=scoring, grouping=grouping, scaling=scaling,
                         groups=groups, seed=seed, expert_weights=weights, options=options)
        fitted = (fit_ffns(source, plan, refit, dtype=teacher_dtype, allow_pickle=allow_pickle, progress=progress,
                           pool=pool) if refit is not None else None)
    report = build(source, plan, out, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                   allow_pickle=allow_pickle, progress=progress, inputs=(data, stats_out), refit=fitted)
    return ConvertResult(plan, stats, report)


__all__ = ["convert", "ConvertResult"]
