"""`moe2dense sweep`: many conversion and distillation configurations of one teacher, compared
under ASHA early stopping, from one calibration and one teacher stream.

The expensive, configuration-independent work is done once: the teacher is calibrated once (every
plan is seconds of arithmetic on the same sums) and runs once over the training text, writing its
top-k stream (`teacher-logits`), which every trial's distillation reads. Each Tune trial then
plans, builds and distills its student; its Ray Train workers report validation perplexity every
`--report-every` steps to Tune through `TuneReportCallback`, and ASHA stops the trials that are
behind at each rung, so the sweep spends its tokens on the configurations that are winning.

    DIR/sweep.yaml      the settings the sweep started with (and its space)
    DIR/stats/          the shared calibration          DIR/logits/  the shared teacher stream
    DIR/tune/           Ray Tune's experiment: result files, TensorBoard logs; resumed with --resume
    DIR/trials/ID/      each trial's student/ (its build) and run/ (its distillation)
    DIR/leaderboard.{csv,md}, DIR/curves.png, DIR/summary.json
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import time
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, PositiveFloat, PositiveInt

from .config import Resources, StageConfig
from .errors import UserError

PLAN_KEYS = ("scoring", "grouping", "scaling", "experts", "groups", "seed", "refit")
DISTILL_KEYS = ("lr", "loss", "ce_weight", "weight_decay", "warmup", "batch_size")
SPACE_KEYS = PLAN_KEYS + DISTILL_KEYS
CONFIG_FILE = "sweep.yaml"
METRIC = "val_ppl"
TRIAL_KEY = "trial"  # Tune's config of a trial: {TRIAL_KEY: one combination of the space}
TRIAL_OVERHEAD_CPUS = 0.31  # a trial's driver and its stream readers, beside its training worker


class SweepConfig(StageConfig):
    """`moe2dense sweep`: one calibration, one teacher stream, a grid of plan x distillation settings."""

    teacher: str = Field(..., description="the MoE teacher checkpoint (local or URL)", json_schema_extra={"metavar": "T"})
    data: str = Field(..., description="text for calibration and distillation (.jsonl, .txt, .parquet, a directory, "
                      "hf:NAME)", json_schema_extra={"metavar": "DATA"})
    space: str = Field(..., description="YAML search space: each of " + ", ".join(SPACE_KEYS) + " a value or a "
                       "list of values; the sweep runs every combination. A list of such grids runs each grid's "
                       "combinations", json_schema_extra={"metavar": "SPACE"})
    out: str = Field(..., description="sweep directory (see `moe2dense sweep --help`)", json_schema_extra={"metavar": "DIR"})
    text_field: str = Field("text", description="field/column holding the text")
    samples: PositiveInt = Field(64, description="calibration blocks", json_schema_extra={"metavar": "N"})
    seq_len: PositiveInt = Field(128, description="tokens per block (calibration and distillation)",
                                 json_schema_extra={"metavar": "L"})
    tokens: PositiveInt = Field(100_000, description="distillation tokens per trial: what a trial that ASHA never "
                                "stops trains on", json_schema_extra={"metavar": "N"})
    top_k: PositiveInt = Field(128, description="teacher entries per token in the shared stream",
                               json_schema_extra={"metavar": "K"})
    val_blocks: PositiveInt = Field(16, description="held-out blocks of the stream for validation perplexity",
                                    json_schema_extra={"metavar": "N"})
    report_every: PositiveInt = Field(5, description="optimizer steps between validations (ASHA's rungs are "
                                      "counted in these)", json_schema_extra={"metavar": "STEPS"})
    scheduler: Literal["asha", "none"] = Field("asha", description="asha: stop weak trials early by validation "
                                               "perplexity; none: train every trial to the end (the full grid)")
    grace: PositiveInt = Field(1, description="validations every trial gets before ASHA may stop it",
                               json_schema_extra={"metavar": "N"})
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps 1/F of the trials at each rung",
                                    json_schema_extra={"metavar": "F"})
    max_concurrent: Optional[PositiveInt] = Field(None, description="trials at once (default: as many as the "
                                                  "cluster's CPUs/GPUs hold)", json_schema_extra={"metavar": "N"})
    cpus_per_trial: PositiveFloat = Field(1.0, description="CPUs of each trial's training worker",
                                          json_schema_extra={"metavar": "C"})
    calibration_workers: int = Field(1, ge=0, description="Ray actors for the one calibration (0: in the driver)",
                                     json_schema_extra={"metavar": "N"})
    teacher_resources: Resources = Field({}, description="custom Ray resources of each teacher actor (calibration, "
                                         "the teacher stream), NAME=AMOUNT[,...]", json_schema_extra={"metavar": "RES"})
    worker_resources: Resources = Field({}, description="custom Ray resources of each trial's training worker, "
                                        "NAME=AMOUNT[,...]", json_schema_extra={"metavar": "RES"})
    resume: bool = Field(False, description="continue the sweep in DIR (finished trials are kept)")
    overwrite: bool = Field(False, description="replace DIR if it holds an earlier sweep")


# -- the space --------------------------------------------------------------------------------------
def load_space(path: str) -> list[dict[str, list[Any]]]:
    """The search space as a list of grids, every key of a grid a list of values (a single value
    is a list of one). The file is one grid (a mapping) or several (a list of mappings): the sweep
    runs every combination of each grid, so `random` can get three seeds while the deterministic
    scorings run once, and a K > k grid can sit beside a K = k one without crossing the two."""
    from .outputs import read_small, url_to_fs

    fs, p = url_to_fs(path)
    try:
        raw = yaml.safe_load(read_small(fs, p, what=path))
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({' '.join(str(e).split())[:200]})") from None
    grids = raw if isinstance(raw, list) else [raw]
    if not grids or not all(isinstance(g, dict) and g for g in grids):
        raise UserError(f"{path} must map settings to values, e.g. `scoring: [cp, reap]`, or be a list of such "
                        f"mappings")
    return [_grid(g, f"{path}" + (f" (grid {i + 1})" if len(grids) > 1 else "")) for i, g in enumerate(grids)]


def _grid(raw: dict[str, Any], where: str) -> dict[str, list[Any]]:
    unknown = sorted(set(map(str, raw)) - set(SPACE_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown setting(s) {', '.join(unknown)}; a space may set {', '.join(SPACE_KEYS)}")
    grid = {k: (v if isinstance(v, list) else [v]) for k, v in raw.items()}
    empty = [k for k, v in grid.items() if not v]
    if empty:
        raise UserError(f"{where}: {', '.join(empty)} has no values")
    if "scoring" not in grid or "experts" not in grid:
        raise UserError(f"{where} must set at least scoring and experts")
    return grid


def combinations(space: list[dict[str, list[Any]]]) -> list[dict[str, Any]]:
    """Every combination of every grid, in file order, each once (grids may overlap)."""
    out: list[dict[str, Any]] = []
    for grid in space:
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            combo = dict(zip(keys, values))
            if combo not in out:
                out.append(combo)
    return out


def varying_keys(combos: list[dict[str, Any]]) -> list[str]:
    """The settings that differ between trials (what names a trial in plots), in SPACE_KEYS order."""
    return [k for k in SPACE_KEYS if len({repr(c.get(k)) for c in combos}) > 1]


def _plan_args(config: dict[str, Any]) -> dict[str, Any]:
    args = {"scoring": config["scoring"], "experts": int(config["experts"]),
            "grouping": config.get("grouping", "none"), "scaling": config.get("scaling", "uniform"),
            "groups": config.get("groups"), "seed": int(config.get("seed", 0))}
    if args["groups"] is not None:
        args["groups"] = int(args["groups"])
    return args


def _refit_config(cfg: SweepConfig, config: dict[str, Any]):
    """A trial's refit (docs/refit.md) on the sweep's calibration blocks, or None. It runs in the
    trial's own process, which loads the teacher for it: cheap for small teachers, a reason to
    refit outside the sweep (`build --refit`) for large ones."""
    from .config import RefitConfig

    fit = config.get("refit", "none")
    if fit == "none":
        return None
    return RefitConfig(data=cfg.data, samples=cfg.samples, seq_len=cfg.seq_len, text_field=cfg.text_field,
                       workers=0, refit=fit)


def _distill_config(cfg: SweepConfig, config: dict[str, Any], *, student: str, run: str, threads: int | None):
    from .distill.config import DistillConfig

    settings = {k: config[k] for k in DISTILL_KEYS if k in config}
    return DistillConfig(logits=f"{cfg.out}/logits", student=student, out=run, tokens=cfg.tokens,
                         report_every=cfg.report_every, checkpoint_every=1 << 30, max_failures=0,
                         cpus_per_worker=cfg.cpus_per_trial, worker_resources=cfg.worker_resources, threads=threads,
                         overwrite=True, **settings)


def check_space(cfg: SweepConfig, space: list[dict[str, list[Any]]], num_experts: int) -> list[dict[str, Any]]:
    """Every combination is valid before anything runs: methods, counts, distillation settings."""
    from pydantic import ValidationError

    from .distill.losses import LOSSES
    from .plan import check_counts, check_methods
    from .refit import FITS

    combos = combinations(space)
    for c in combos:
        try:
            args = _plan_args(c)
        except (TypeError, ValueError):
            raise UserError(f"{cfg.space}: experts, groups and seed must be integers, got {c}") from None
        check_counts(num_experts, args["experts"], args["groups"])
        check_methods(args["scoring"], args["grouping"], args["scaling"])
        if c.get("refit", "none") not in ("none", *FITS):
            raise UserError(f"{cfg.space}: unknown refit {c['refit']!r}; valid: none, {', '.join(FITS)}")
        if c.get("loss", "forward_kl") not in LOSSES:
            raise UserError(f"{cfg.space}: unknown loss {c['loss']!r}; valid: {', '.join(LOSSES)}")
        try:
            _distill_config(cfg, c, student="s", run="r", threads=None)
        except ValidationError as e:
            first = e.errors()[0]
            raise UserError(f"{cfg.space}: {'.'.join(map(str, first['loc']))}: {first['msg']} "
                            f"(in {c})") from None
    return combos


# -- one trial ----------------------------------------------------------------------------------------
def _trial(config: dict[str, Any], *, sweep: dict[str, Any], threads: int | None, alone: bool = False) -> None:
    """What Tune runs per configuration: plan, build, then distill with reports going to Tune."""
    config = config[TRIAL_KEY]
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .build import build, read_expert_weights
    from .distill.run import distill
    from .plan import make_plan
    from .stats import Stats

    cfg = SweepConfig(**sweep)
    if alone:
        _reclaim_training_placement_groups(cfg)
    trial = f"{cfg.out}/trials/{tune.get_context().get_trial_id()}"
    args = _plan_args(config)
    weights = read_expert_weights(cfg.teacher) if args["grouping"] == "weight" else None
    plan = make_plan(Stats.load(f"{cfg.out}/stats"), expert_weights=weights, **args)
    build(cfg.teacher, plan, f"{trial}/student", progress=False, overwrite=True,  # a restarted trial rebuilds
          refit=_refit_config(cfg, config))
    dcfg = _distill_config(cfg, config, student=f"{trial}/student", run=f"{trial}/run", threads=threads)
    distill(dcfg, progress=False, callbacks=[TuneReportCallback()])


def _reclaim_training_placement_groups(cfg: SweepConfig) -> None:
    """Remove training-worker placement groups that earlier trials left reserved.

    Ray Train's controller removes its workers' placement group when it shuts down, but a trial
    that ends (or that ASHA stops) can take the controller with it first, and Train's detached
    cleaner does not always catch that: the CPUs stay reserved and the next trial's stream reader
    waits forever. When trials run one at a time (`alone`), no other trial owns such a group, so
    any group shaped like a training worker is a leftover."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    worker = {"CPU": float(cfg.cpus_per_trial)}
    for pg_id, pg in ray.util.placement_group_table().items():
        bundles = list((pg.get("bundles") or {}).values())
        if pg.get("state") == "CREATED" and bundles and all(
                {k: float(v) for k, v in b.items() if k in ("CPU",)} == worker for b in bundles):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


# -- the sweep ------------------------------------------------------------------------------------------
def sweep(cfg: SweepConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the sweep in `cfg.out`; returns the summary (also DIR/summary.json)."""
    from .build import inspect_source
    from .cluster import ensure_ray
    from .outputs import OutputLock, check_output, url_to_fs

    cfg = _absolute(cfg)
    if cfg.resume:
        fs, path = url_to_fs(cfg.out)
        if not fs.exists(f"{path}/{CONFIG_FILE}"):
            raise UserError(f"--resume: {cfg.out} holds no sweep (no {CONFIG_FILE})")
        cfg = SweepConfig.from_yaml(f"{cfg.out}/{CONFIG_FILE}", resume=True, space=f"{cfg.out}/space.yaml",
                                    **{k: getattr(cfg, k) for k in ("max_concurrent", "cpus_per_trial")
                                       if k in cfg.model_fields_set})
    space = load_space(cfg.space)
    reader, _, _, _, shape = inspect_source(cfg.teacher)
    reader.close()
    combos = check_space(cfg, space, shape.num_experts)
    if not cfg.resume:
        check_output(cfg.out, what="sweep", overwrite=cfg.overwrite, sources=(cfg.teacher, cfg.data, cfg.space))
    with OutputLock(cfg.out):
        if not cfg.resume:
            _start(cfg)
        ensure_ray()
        t0 = time.time()
        _shared_work(cfg, combos, progress=progress)
        grid = _tune(cfg, combos, progress=progress)
        summary = write_results(cfg, grid, trials=len(combos), seconds=time.time() - t0)
    return summary


def _absolute(cfg: SweepConfig) -> SweepConfig:
    update = {}
    for k in ("teacher", "data", "space", "out"):
        v = getattr(cfg, k)
        if v and "://" not in v and not v.startswith("hf:"):
            update[k] = os.path.abspath(os.path.expanduser(v))
    return cfg.model_copy(update=update)


def _start(cfg: SweepConfig) -> None:
    """A fresh DIR holding the settings and a copy of the space (outputs.start_directory)."""
    from .outputs import read_small, start_directory, url_to_fs

    sfs, spath = url_to_fs(cfg.space)
    start_directory(cfg.out, {CONFIG_FILE: cfg.to_yaml(), "space.yaml": read_small(sfs, spath, what=cfg.space)},
                    overwrite=cfg.overwrite)


def _shared_work(cfg: SweepConfig, combos: list[dict[str, Any]], *, progress: bool) -> None:
    """The one calibration and the one teacher stream (each skipped when a resumed sweep has it)."""
    from .calibrate import calibrate
    from .distill.config import TeacherLogitsConfig
    from .distill.run import teacher_logits
    from .outputs import url_to_fs
    from .plan import check_methods

    fs, path = url_to_fs(cfg.out)
    if not fs.exists(f"{path}/stats/meta.json"):
        full = any(check_methods(*(_plan_args(c)[k] for k in ("scoring", "grouping", "scaling"))) for c in combos)
        calibrate(cfg.teacher, cfg.data, samples=cfg.samples, seq_len=cfg.seq_len, workers=cfg.calibration_workers,
                  full=full, out=f"{cfg.out}/stats", progress=progress, text_field=cfg.text_field,
                  teacher_resources=cfg.teacher_resources)
    if not fs.exists(f"{path}/logits/stream.json"):
        teacher_logits(TeacherLogitsConfig(teacher=cfg.teacher, data=cfg.data, text_field=cfg.text_field,
                                           tokens=cfg.tokens, seq_len=cfg.seq_len, top_k=cfg.top_k,
                                           val_blocks=cfg.val_blocks, out=f"{cfg.out}/logits",
                                           teacher_resources=cfg.teacher_resources),
                       progress=progress)


def concurrency(cfg: SweepConfig) -> tuple[int, int | None]:
    """Trials at once and torch threads per trial: what the cluster holds, never more than asked.

    A trial is its training worker (`--cpus-per-trial`, a GPU where there are any), the Ray Data
    tasks reading and selecting the shared stream (0.1 CPU each, a few at a time) and the trial's
    own driver (0.01 CPU): trials started beyond that would starve each other's readers and wait
    forever, so they are not started."""
    import ray

    res = ray.cluster_resources()
    fits = int(res.get("CPU", 1) // (cfg.cpus_per_trial + TRIAL_OVERHEAD_CPUS)) or 1
    if res.get("GPU", 0) > 0:
        fits = min(fits, int(res["GPU"]))
    for k, v in cfg.worker_resources.items():  # a trial's worker goes only where its resources are
        fits = min(fits, max(1, int(res.get(k, 0) // v)))
    n = min(fits, cfg.max_concurrent or fits)
    cores = int(res.get("CPU", 1))
    return n, max(1, cores // n)


def _tune(cfg: SweepConfig, combos: list[dict[str, Any]], *, progress: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    n, threads = concurrency(cfg)
    trainable = tune.with_resources(tune.with_parameters(_trial, sweep=cfg.model_dump(), threads=threads,
                                                         alone=n == 1), {"cpu": 0.01})
    path = f"{cfg.out}/tune"
    if cfg.resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True).fit()
    from .distill.config import DistillConfig

    batch = max(int(c.get("batch_size", DistillConfig.model_fields["batch_size"].default)) for c in combos)
    rung = cfg.report_every * batch * cfg.seq_len  # tokens between validations, for the largest batch
    scheduler = (ASHAScheduler(time_attr="tokens", max_t=cfg.tokens, grace_period=min(cfg.grace * rung, cfg.tokens),
                               reduction_factor=cfg.reduction_factor)
                 if cfg.scheduler == "asha" else FIFOScheduler())
    # one grid axis over whole combinations: a union of grids is not a product of per-key axes
    tuner = tune.Tuner(trainable, param_space={TRIAL_KEY: tune.grid_search(combos)},
                       tune_config=tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler,
                                                   max_concurrent_trials=n, trial_dirname_creator=_trial_dir),
                       run_config=tune.RunConfig(name="tune", storage_path=cfg.out, verbose=1 if progress else 0,
                                                 failure_config=tune.FailureConfig(max_failures=1)))
    return tuner.fit()


def _trial_dir(trial) -> str:
    return trial.trial_id


# -- results ----------------------------------------------------------------------------------------------
def leaderboard(cfg: SweepConfig, grid) -> list[dict[str, Any]]:
    """One row per trial, best first: its settings, perplexity before and after distillation,
    the tokens it trained on, and whether ASHA stopped it."""
    from .distill.run import read_metrics

    rows = []
    configs = [(result.config or {}).get(TRIAL_KEY, {}) for result in grid]
    keys = [k for k in SPACE_KEYS if any(k in c for c in configs)]  # a key unset in a grid: its default
    for result, config in zip(grid, configs):
        trial_id = os.path.basename(result.path.rstrip("/"))  # trial_dirname_creator: the trial id
        history = _history(cfg, trial_id, read_metrics)
        last = history[-1] if history else {}
        row = {"trial": trial_id, **{k: config.get(k) for k in keys},
               "ppl before": history[0][METRIC] if history and history[0].get("tokens") == 0 else None,
               "ppl after": last.get(METRIC), "KL after": last.get("val_kl"), "tokens": last.get("tokens", 0),
               "stopped early": bool(last) and last.get("tokens", 0) < _planned_tokens(cfg, config),
               "error": _error_line(result.error)}
        rows.append(row)
    rows.sort(key=lambda r: (r["ppl after"] is None, r["ppl after"] if r["ppl after"] is not None else math.inf))
    return rows


def _history(cfg: SweepConfig, trial_id: str, read_metrics) -> list[dict[str, Any]]:
    run = f"{cfg.out}/trials/{trial_id}/run"
    try:
        return [m for m in read_metrics(run) if METRIC in m]
    except (FileNotFoundError, UserError):
        return []


def _planned_tokens(cfg: SweepConfig, config: dict[str, Any]) -> int:
    """The tokens an unstopped trial trains on: whole optimizer steps of the stream's blocks."""
    from .distill.config import DistillConfig

    batch = int(config.get("batch_size") or DistillConfig.model_fields["batch_size"].default)
    blocks = cfg.tokens // cfg.seq_len
    return (blocks // batch) * batch * cfg.seq_len


def _error_line(error) -> str | None:
    if error is None:
        return None
    text = " ".join(str(error).split())
    return text[:160]


def write_results(cfg: SweepConfig, grid, *, trials: int, seconds: float) -> dict[str, Any]:
    """DIR/leaderboard.{csv,md}, DIR/curves.png and DIR/summary.json, through report.py."""
    from .distill.run import read_metrics
    from .outputs import url_to_fs
    from .report import markdown_table, plot_curves

    rows = leaderboard(cfg, grid)
    fs, path = url_to_fs(cfg.out)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    with fs.open(f"{path}/leaderboard.csv", "w") as f:
        f.write(text.getvalue())
    with fs.open(f"{path}/leaderboard.md", "w") as f:
        f.write(markdown_table(rows, floats="{:.4g}") + "\n")
    curves = {}
    varying = varying_keys([{k: r.get(k) for k in SPACE_KEYS} for r in rows])
    for r in rows:
        label = " ".join(f"{k}={r[k]}" for k in varying if r.get(k) is not None) or r["trial"]
        curves[label] = [(m["tokens"], m[METRIC]) for m in _history(cfg, r["trial"], read_metrics)]
    if any(curves.values()) and not _is_remote(fs):
        plot_curves(curves, f"{path}/curves.png", title="validation perplexity per configuration",
                    xlabel="distillation tokens")
    spent = sum(int(r["tokens"] or 0) for r in rows)
    budget = sum(_planned_tokens(cfg, r) for r in rows) or 1
    best = rows[0] if rows and rows[0]["ppl after"] is not None else None
    summary = {"trials": trials, "finished": sum(1 for r in rows if not r["stopped early"] and not r["error"]),
               "stopped_early": sum(1 for r in rows if r["stopped early"]),
               "errors": sum(1 for r in rows if r["error"]), "tokens_spent": spent, "grid_tokens": budget,
               "token_ratio": spent / budget, "best": best, "seconds": round(seconds, 1),
               "scheduler": cfg.scheduler}
    with fs.open(f"{path}/summary.json", "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return {**summary, "leaderboard": markdown_table(rows, floats="{:.4g}")}


def _is_remote(fs) -> bool:
    from .outputs import is_local

    return not is_local(fs)


__all__ = ["SweepConfig", "sweep", "load_space", "leaderboard", "write_results", "concurrency"]
