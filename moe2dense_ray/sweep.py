"""`moe2dense sweep`: many conversion and distillation configurations of one teacher, compared
under ASHA early stopping, from one calibration and one teacher stream.

The expensive, configuration-independent work is done once: the teacher is calibrated once (every
plan is seconds of arithmetic on the same sums) and runs once over the training text, writing its
top-k stream (`teacher-logits`), which every trial's distillation reads. Each Tune trial then
plans, builds and distills its student; its Ray Train workers report validation perplexity every
`--report-every` steps to Tune through `TuneReportCallback`, and ASHA stops the trials that are
behind at each rung, so the sweep spends its tokens on the configurations that are winning.

The teacher is hosted as `teacher-logits` hosts it (the same flags) for the shared passes and for
a refit trial's fit; every trial distils with `distill`'s flags. A trial that Tune stops ends its
own training run, which releases its workers' placement group (`_TrialEndsItsTraining`).

    DIR/sweep.yaml      the settings the sweep started with (and its space)
    DIR/stats/          the shared calibration          DIR/logits/  the shared teacher stream
    DIR/tune/           Ray Tune's experiment: result files, TensorBoard logs; resumed with --resume
    DIR/trials/ID/      each trial's student/ (its build) and run/ (its distillation)
    DIR/leaderboard.{csv,md}, DIR/curves.png, DIR/summary.json
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import itertools
import json
import math
import os
import time
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, PositiveInt, create_model

from .core.config import StageConfig
from .core.errors import UserError
from .distill.config import DistillConfig, TeacherStreamConfig

PLAN_KEYS = ("scoring", "grouping", "scaling", "experts", "groups", "seed", "refit")
DISTILL_KEYS = ("lr", "loss", "ce_weight", "weight_decay", "warmup", "batch_size")
SPACE_KEYS = PLAN_KEYS + DISTILL_KEYS
# how the teacher is hosted (`teacher-logits`'s settings): the shared passes and refit trials
HOSTING_KEYS = ("teacher_workers", "teacher_batch", "gpus_per_teacher", "cpus_per_teacher", "teacher_resources")
# how every trial distils (`distill`'s settings); a space may still set batch_size per trial
TRAINING_KEYS = ("workers", "cpus_per_worker", "worker_resources", "zero_stage", "batch_size", "grad_accum",
                 "activation_checkpointing", "threads")
# what --resume may change: where and how fast things run, never what a trial computes
RESUME_KEYS = ("max_concurrent", "calibration_workers", "teacher_workers", "teacher_batch", "gpus_per_teacher",
               "cpus_per_teacher", "teacher_resources", "cpus_per_worker", "worker_resources", "threads")
CONFIG_FILE = "sweep.yaml"
METRIC = "val_ppl"
TRIAL_KEY = "trial"  # Tune's config of a trial: {TRIAL_KEY: one combination of the space}
TRIAL_CPUS = 0.01  # the trial's own process: it plans, builds and waits on its training run
READER_CPUS = 0.3  # the Ray Data tasks reading and selecting one training worker's share of the stream
ABORT_TIMEOUT_S = 120.0  # a stopped trial's wait for its training run to release its workers
FINISH_TIMEOUT_S = 3600.0  # a trial stopped at its last report waits this long for its student's export


def _fields_of(config: type[StageConfig], names: tuple[str, ...], doc: str, **help_lines: str) -> type[StageConfig]:
    """A config holding `config`'s fields `names` exactly as that stage declares them (type,
    bounds, default, metavar, help), so `sweep --workers` is `distill --workers`; `help_lines`
    reword a field's help for the sweep."""
    fields = {}
    for name in names:
        field = copy.copy(config.model_fields[name])
        if name in help_lines:
            field.description = help_lines[name]
        fields[name] = (field.annotation, field)
    return create_model(f"_{config.__name__}Fields", __base__=StageConfig, __doc__=doc, **fields)


_TeacherHosting = _fields_of(
    TeacherStreamConfig, HOSTING_KEYS, "The teacher replicas of the shared passes and of refit trials.",
    teacher_workers="teacher replicas (Ray actors) of the shared calibration (unless --calibration-workers) and "
    "teacher stream, and of each refit trial's fit")
_TrialTraining = _fields_of(
    DistillConfig, TRAINING_KEYS, "How every trial distils (Ray Train and DeepSpeed).",
    workers="training workers (data parallel) of each trial",
    batch_size="blocks per micro-batch per training worker (a space may set it per trial)",
    threads="torch threads per training worker (default: an embedded Ray's cores / (trials at once x --workers); "
    "on a cluster, --cpus-per-worker)")


class _SweepSettings(StageConfig):
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
                                                  "cluster holds now; on an autoscaling cluster, set it: the "
                                                  "cluster grows to it)", json_schema_extra={"metavar": "N"})
    max_trials: PositiveInt = Field(256, description="refuse a space of more combinations than this (each is a "
                                    "trial: a student built and distilled)", json_schema_extra={"metavar": "N"})
    calibration_workers: Optional[int] = Field(None, ge=0, description="teacher replicas of the one calibration "
                                               "(default --teacher-workers; 0: in the driver)",
                                               json_schema_extra={"metavar": "N"})


class SweepConfig(_TrialTraining, _TeacherHosting, _SweepSettings):  # bases in reverse: the sweep's own first
    """`moe2dense sweep`: one calibration, one teacher stream, a grid of plan x distillation settings.

    The teacher is hosted as `teacher-logits` hosts it (`--teacher-workers`, `--gpus-per-teacher`,
    ...) for the shared passes and for every refit trial's fit; every trial distils as `distill`
    would with the same flags (`--workers`, `--zero-stage`, `--grad-accum`, ...)."""

    resume: bool = Field(False, description="continue the sweep in DIR (finished trials are kept)")
    overwrite: bool = Field(False, description="replace DIR if it holds an earlier sweep")


# -- the space --------------------------------------------------------------------------------------
def load_space(path: str) -> list[dict[str, list[Any]]]:
    """The search space as a list of grids, every key of a grid a list of values (a single value
    is a list of one). The file is one grid (a mapping) or several (a list of mappings): the sweep
    runs every combination of each grid, so `random` can get three seeds while the deterministic
    scorings run once, and a K > k grid can sit beside a K = k one without crossing the two."""
    from .core.storage import read_small, url_to_fs

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


def combinations(space: list[dict[str, list[Any]]], limit: int | None = None) -> list[dict[str, Any]]:
    """Every combination of every grid, in file order, each once (grids may overlap; a set of
    seen combinations keeps this linear). With `limit`, a space whose grids hold more is refused
    before any is built: the count is a product of list lengths, known at once."""
    total = sum(math.prod(len(v) for v in grid.values()) for grid in space)
    if limit is not None and total > limit:
        raise UserError(f"the space has {total:,} combinations, more than --max-trials {limit}: narrow it, or "
                        f"raise --max-trials if you mean to run that many trials")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for grid in space:
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            combo = dict(zip(keys, values))
            key = json.dumps(combo, sort_keys=True, default=repr)
            if key not in seen:
                seen.add(key)
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
    """A trial's refit (docs/refit.md) on the sweep's calibration blocks, or None; it runs on
    teacher replicas hosted like the shared passes' (`teacher_pool`), never in the trial."""
    from .core.config import RefitConfig

    fit = config.get("refit", "none")
    if fit == "none":
        return None
    return RefitConfig(data=cfg.data, samples=cfg.samples, seq_len=cfg.seq_len, text_field=cfg.text_field,
                       batch_size=cfg.teacher_batch, refit=fit)


def teacher_pool(cfg: SweepConfig, workers: int | None = None):
    """The teacher replicas (`core.teachers.TeacherPool`) of the calibration and of refit trials,
    hosted as `--teacher-workers`, `--gpus-per-teacher`, `--cpus-per-teacher` and
    `--teacher-resources` say."""
    from .core.teachers import TeacherPool

    return TeacherPool(cfg.teacher, workers=cfg.teacher_workers if workers is None else workers,
                       gpus_per_worker=cfg.gpus_per_teacher, resources=cfg.teacher_resources,
                       cpus_per_worker=cfg.cpus_per_teacher)


def _distill_config(cfg: SweepConfig, config: dict[str, Any], *, student: str, run: str, threads: int | None):
    settings = {k: getattr(cfg, k) for k in TRAINING_KEYS} | {"threads": threads or cfg.threads}
    settings |= {k: config[k] for k in DISTILL_KEYS if k in config}
    return DistillConfig(logits=f"{cfg.out}/logits", student=student, out=run, tokens=cfg.tokens,
                         report_every=cfg.report_every, checkpoint_every=1 << 30, max_failures=0,
                         overwrite=True, **settings)


def check_space(cfg: SweepConfig, space: list[dict[str, list[Any]]], num_experts: int) -> list[dict[str, Any]]:
    """Every combination is valid before anything runs: methods, counts, distillation settings."""
    from pydantic import ValidationError

    from .convert.plan import check_counts, check_methods
    from .convert.refit import FITS
    from .distill.losses import LOSSES

    combos = combinations(space, limit=cfg.max_trials)
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
def _trial(config: dict[str, Any], *, sweep: dict[str, Any], threads: int | None, ray_address: str | None = None) -> None:
    """What Tune runs per configuration: plan, build, then distill with reports going to Tune."""
    config = config[TRIAL_KEY]
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .core.ray_session import RAY_ADDRESS_ENV
    from .distill.driver import distill
    from .distill.worker import read_failure, record_failure

    if ray_address:  # a Ray worker's environment does not say whether its Ray can grow; the driver's does
        os.environ.setdefault(RAY_ADDRESS_ENV, ray_address)
    cfg = SweepConfig(**sweep)
    trial = f"{cfg.out}/trials/{tune.get_context().get_trial_id()}"
    failure = read_failure(trial)
    if failure:  # an earlier attempt met an error of its settings (a wrecked student, a bad space): again at once
        raise UserError(failure["error"])
    try:
        build_student(cfg, config, f"{trial}/student")
        dcfg = _distill_config(cfg, config, student=f"{trial}/student", run=f"{trial}/run", threads=threads)
        distill(dcfg, progress=False,
                callbacks=[TuneReportCallback(), _owned_by(ray.get_runtime_context().current_actor)])
    except UserError as e:  # Tune retries a failed trial; this failure would only repeat
        record_failure(trial, e, 0)
        raise


def build_student(cfg: SweepConfig, config: dict[str, Any], out: str) -> None:
    """A trial's student at `out`: its plan from the shared calibration, fitted on teacher replicas
    when it refits (`teacher_pool`: the teacher is never loaded in the trial's process), built by
    streaming the teacher. `out` is replaced: a restarted trial rebuilds."""
    from .convert.build import build, read_expert_weights
    from .convert.plan import make_plan
    from .convert.refit import refit
    from .convert.stats import Stats
    from .core.config import BuildConfig, PlanSettings
    from .core.source import Source

    args = _plan_args(config)
    with Source.open(cfg.teacher) as source:
        weights = read_expert_weights(source) if args["grouping"] == "weight" else None
        plan = make_plan(Stats.load(f"{cfg.out}/stats"), PlanSettings(**args), expert_weights=weights)
        fit, fitted = _refit_config(cfg, config), None
        if fit is not None:
            with teacher_pool(cfg) as teachers:
                fitted = refit(source, plan, fit, progress=False, pool=teachers)
        build(BuildConfig(src=cfg.teacher, out=out, overwrite=True), plan, progress=False, source=source, fitted=fitted)


class _TrialEndsItsTraining:
    """Mixed into the trial's Tune trainable: a trial that Tune stops ends its own training run.

    The trial's Ray Train run is a controller actor that the trial owns, and the controller
    creates the placement group that reserves the training workers' CPUs and GPUs. A placement
    group made by an actor is not removed when that actor dies, only when the job (the sweep's
    driver) ends. So when ASHA stops a trial, Tune ends the trial's actor, the controller dies
    with it before it can remove its group, and the group would hold its resources for the rest
    of the sweep: later trials wait for them forever. (Ray Train's detached cleaner is meant to
    catch this, but it asks the dashboard's state API, which an embedded Ray does not serve and
    which fails outright where several Ray instances share a machine.)

    Instead, each controller reports itself to its trial as it starts (`_owned_by`), and the
    trial's `cleanup`, which Tune calls as it stops the trial, aborts it: the controller shuts
    down its workers and removes their placement group, the trial's own and nothing else,
    before the trial's actor goes. A run that has ended is left as it is (`abort` returns at once).

    Tune also stops a trial at its last report (ASHA's last rung, or `tokens` reached), while its
    workers are still writing the student (RUN/student is exported after the last step): that
    run is waited for, not aborted, or the sweep's best trial could be left without a student.
    """

    def own_training_run(self, controller) -> None:
        self.__dict__.setdefault("_training_runs", []).append(controller)

    def cleanup(self):
        try:
            super().cleanup()
        finally:
            runs = self.__dict__.pop("_training_runs", [])
            last = self._last_result or {}
            if last.get("step", 0) >= last.get("steps", math.inf):  # stopped at its last report
                _await(runs)
            _abort(runs)


_trial.__mixins__ = (_TrialEndsItsTraining,)  # tune.wrap_function's hook: the trainable class inherits it


def _await(controllers: list) -> None:
    """Until each training run has ended by itself (its controller in a terminal state)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    deadline = time.monotonic() + FINISH_TIMEOUT_S
    for controller in controllers:
        while time.monotonic() < deadline:
            try:
                if ray.get(controller.get_state.remote(), timeout=60).is_terminal():
                    break
            except (GetTimeoutError, RayActorError):
                break
            time.sleep(0.5)


def _abort(controllers: list) -> None:
    import warnings

    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    for controller in controllers:
        try:  # the controller exits once its workers and their placement group are gone
            ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
        except RayActorError:
            pass
        except GetTimeoutError:
            warnings.warn(f"a stopped trial's training run did not end in {ABORT_TIMEOUT_S:g} s; its workers' "
                          f"resources may stay reserved until the sweep ends", stacklevel=2)


def _owned_by(trial):
    """A Ray Train controller callback that hands the controller's handle to `trial` as the
    controller starts. It is Train's internal callback hook (the one Train's own placement-group
    cleaner uses), imported here so that importing this module does not import Ray Train."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class OwnedByTrial(ControllerCallback):
        def after_controller_start(self, train_run_context) -> None:
            import ray

            trial.own_training_run.remote(ray.get_runtime_context().current_actor)

    return OwnedByTrial()


# -- the sweep ------------------------------------------------------------------------------------------
def sweep(cfg: SweepConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the sweep in `cfg.out`; returns the summary (also DIR/summary.json)."""
    from .core.ray_session import ensure_ray_after
    from .core.source import Source
    from .core.storage import OutputLock, check_output, url_to_fs

    cfg = _absolute(cfg)
    if cfg.resume:
        fs, path = url_to_fs(cfg.out)
        if not fs.exists(f"{path}/{CONFIG_FILE}"):
            raise UserError(f"--resume: {cfg.out} holds no sweep (no {CONFIG_FILE})")
        cfg = SweepConfig.from_yaml(f"{cfg.out}/{CONFIG_FILE}", resume=True, space=f"{cfg.out}/space.yaml",
                                    **{k: getattr(cfg, k) for k in RESUME_KEYS if k in cfg.model_fields_set})
    space = load_space(cfg.space)
    with Source.open(cfg.teacher) as source:
        shape = source.shape
    combos = check_space(cfg, space, shape.num_experts)
    print(f"sweep: {len(combos)} trial{'s' if len(combos) != 1 else ''} from {cfg.space}", flush=True)
    if not cfg.resume:
        check_output(cfg.out, what="sweep", overwrite=cfg.overwrite, sources=(cfg.teacher, cfg.data, cfg.space))
    with OutputLock(cfg.out):
        ensure_ray_after(lambda: _check_fits(cfg))
        if not cfg.resume:
            _start(cfg)
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
    from .core.storage import read_small, start_directory, url_to_fs

    sfs, spath = url_to_fs(cfg.space)
    start_directory(cfg.out, {CONFIG_FILE: cfg.to_yaml(), "space.yaml": read_small(sfs, spath, what=cfg.space)},
                    overwrite=cfg.overwrite)


def _shared_work(cfg: SweepConfig, combos: list[dict[str, Any]], *, progress: bool) -> None:
    """The one calibration and the one teacher stream (each skipped when a resumed sweep has it)."""
    from .convert.calibrate import calibrate
    from .convert.plan import check_methods
    from .core.config import CalibrateConfig
    from .core.storage import url_to_fs
    from .distill.config import TeacherLogitsConfig
    from .distill.driver import teacher_logits

    fs, path = url_to_fs(cfg.out)
    if not fs.exists(f"{path}/stats/meta.json"):
        full = any(check_methods(*(_plan_args(c)[k] for k in ("scoring", "grouping", "scaling"))) for c in combos)
        workers = cfg.teacher_workers if cfg.calibration_workers is None else cfg.calibration_workers
        with teacher_pool(cfg, workers) as teachers:
            calibrate(CalibrateConfig(src=cfg.teacher, data=cfg.data, samples=cfg.samples, seq_len=cfg.seq_len,
                                      workers=workers, full_stats=full, out=f"{cfg.out}/stats",
                                      batch_size=cfg.teacher_batch, text_field=cfg.text_field),
                      progress=progress, pool=teachers)
    if not fs.exists(f"{path}/logits/stream.json"):
        teacher_logits(TeacherLogitsConfig(teacher=cfg.teacher, data=cfg.data, text_field=cfg.text_field,
                                           tokens=cfg.tokens, seq_len=cfg.seq_len, top_k=cfg.top_k,
                                           val_blocks=cfg.val_blocks, out=f"{cfg.out}/logits",
                                           **{k: getattr(cfg, k) for k in HOSTING_KEYS}),
                       progress=progress)


def trial_resources(cfg: SweepConfig, gpus: bool) -> dict[str, float]:
    """What one trial holds while it distils: its training workers (a GPU each where the cluster
    has GPUs, as `distill` places them), the Ray Data tasks reading each worker's share of the
    stream, and the trial's own process."""
    need = {"CPU": cfg.workers * (cfg.cpus_per_worker + READER_CPUS) + TRIAL_CPUS,
            "GPU": float(cfg.workers if gpus else 0)}
    need.update({k: cfg.workers * v for k, v in cfg.worker_resources.items()})
    return need


def _check_fits(cfg: SweepConfig) -> None:
    """Before any work, on an embedded Ray (which never grows): the teacher replicas and one trial
    must fit it, or it is one error line naming the flags. On a cluster each stage waits for its
    nodes as it starts (`core.ray_session.require_resources`), and Train for its workers."""
    from .core.ray_session import cluster_resources, on_cluster, require_resources

    if on_cluster():
        return
    gpus = cluster_resources().get("GPU", 0) > 0
    replica = {"CPU": cfg.cpus_per_teacher, **cfg.teacher_resources,
               "GPU": cfg.gpus_per_teacher if cfg.gpus_per_teacher is not None else float(gpus)}
    require_resources({k: cfg.teacher_workers * v for k, v in replica.items()}, each=[replica],
                      who=f"the sweep's --teacher-workers {cfg.teacher_workers}", parts="teacher replicas",
                      advice="lower --teacher-workers, --cpus-per-teacher or --gpus-per-teacher",
                      custom_flags="--teacher-resources")
    require_resources(trial_resources(cfg, gpus),
                      each=[{"CPU": cfg.cpus_per_worker, "GPU": float(gpus), **cfg.worker_resources}],
                      who="a sweep trial", parts=f"{cfg.workers} training worker(s) and their stream readers",
                      advice="lower --workers or --cpus-per-worker", custom_flags="--worker-resources")


def concurrency(cfg: SweepConfig) -> tuple[int, int]:
    """Trials at once and torch threads per training worker.

    On an embedded Ray, as many trials as its CPUs, GPUs and custom resources hold
    (`trial_resources`; trials started beyond that would starve each other's stream readers and
    wait forever), never more than --max-concurrent. On a cluster, --max-concurrent as given (an
    autoscaler adds the nodes that waiting trials ask for), else what the cluster holds now."""
    import ray

    from .core.ray_session import on_cluster

    res = ray.cluster_resources()
    need = trial_resources(cfg, res.get("GPU", 0) > 0)
    fits = min(int(res.get(k, 0) // v) for k, v in need.items() if v > 0)
    if on_cluster() and cfg.max_concurrent:
        n = cfg.max_concurrent
    else:
        n = max(1, min(fits, cfg.max_concurrent or fits))
    if cfg.threads:
        threads = cfg.threads
    elif on_cluster():  # a node's cores are its trials' and its teachers': a worker gets what it reserves
        threads = max(1, int(cfg.cpus_per_worker))
    else:
        threads = max(1, int(res.get("CPU", 1)) // (n * cfg.workers))
    return n, threads


def _trials_bar(total: int):
    """The sweep's own progress line in place of Tune's console reporter (its configuration box,
    a table per trial start and per result, a TensorBoard path inside Ray's session directory):
    trials finished of all, how many run now, and the best held-out perplexity so far. `--verbose`
    brings Tune's reporter back."""
    from ray import tune

    from .core.progress import Progress

    class TrialsBar(tune.Callback):
        def __init__(self) -> None:
            self.bar, self.running, self.best = None, set(), math.inf

        def _show(self) -> None:
            if self.bar is None:  # created in the driver's process, at the first event
                self.bar = Progress(total, "sweep", unit="trial")
            best = f"{self.best:.1f}" if self.best < math.inf else "-"
            self.bar.set_postfix_str(f"running {len(self.running)}, best {METRIC} {best}")

        def on_trial_start(self, iteration, trials, trial, **info):
            self.running.add(trial.trial_id)
            self._show()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if METRIC in result and math.isfinite(result[METRIC]):
                self.best = min(self.best, result[METRIC])
            self._show()

        def _done(self, trial) -> None:
            self.running.discard(trial.trial_id)
            self._show()
            self.bar.update(1)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._done(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._done(trial)

        def on_experiment_end(self, trials, **info):
            if self.bar is not None:
                self.bar.close()

        def __getstate__(self):  # Tune saves its run settings with the experiment: not the bar
            return {**self.__dict__, "bar": None}

    return TrialsBar()


def _tune(cfg: SweepConfig, combos: list[dict[str, Any]], *, progress: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from .core.ray_session import RAY_ADDRESS_ENV, VERBOSE_ENV

    n, threads = concurrency(cfg)
    tune_console = bool(os.environ.get(VERBOSE_ENV))
    trainable = tune.with_resources(tune.with_parameters(_trial, sweep=cfg.model_dump(), threads=threads,
                                                         ray_address=os.environ.get(RAY_ADDRESS_ENV)),
                                    {"cpu": TRIAL_CPUS})
    path = f"{cfg.out}/tune"
    if cfg.resume and tune.Tuner.can_restore(path):
        with _quiet_tune(tune_console):
            return tune.Tuner.restore(path, trainable=trainable, resume_errored=True).fit()
    batch = max(int(c.get("batch_size", cfg.batch_size)) for c in combos)
    # tokens between validations, for the largest batch
    rung = cfg.report_every * batch * cfg.grad_accum * cfg.workers * cfg.seq_len
    scheduler = (ASHAScheduler(time_attr="tokens", max_t=cfg.tokens, grace_period=min(cfg.grace * rung, cfg.tokens),
                               reduction_factor=cfg.reduction_factor)
                 if cfg.scheduler == "asha" else FIFOScheduler())
    # one grid axis over whole combinations: a union of grids is not a product of per-key axes
    tuner = tune.Tuner(trainable, param_space={TRIAL_KEY: tune.grid_search(combos)},
                       tune_config=tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler,
                                                   max_concurrent_trials=n, trial_dirname_creator=_trial_dir),
                       run_config=tune.RunConfig(name="tune", storage_path=cfg.out,
                                                 verbose=1 if progress and tune_console else 0,
                                                 callbacks=[_trials_bar(len(combos))] if progress and not tune_console else None,
                                                 failure_config=tune.FailureConfig(max_failures=1)))
    with _quiet_tune(tune_console):
        return tuner.fit()


@contextlib.contextmanager
def _quiet_tune(console: bool):
    """A failed trial is its leaderboard row's one line, not a traceback per try; and even silent,
    Tune prints its configuration box and a TensorBoard path to stdout (the same results are in
    DIR/tune, and in the leaderboard). `console` (--verbose): Tune's own reporter, as it is."""
    from .core.ray_session import muted

    with muted("ray.tune"), (contextlib.nullcontext() if console else contextlib.redirect_stdout(io.StringIO())):
        yield


def _trial_dir(trial) -> str:
    return trial.trial_id


# -- results ----------------------------------------------------------------------------------------------
def leaderboard(cfg: SweepConfig, grid) -> list[dict[str, Any]]:
    """One row per trial, best first: its settings, perplexity before and after distillation,
    the tokens it trained on, and whether ASHA stopped it."""
    from .distill.driver import read_metrics

    rows = []
    configs = [(result.config or {}).get(TRIAL_KEY, {}) for result in grid]
    keys = [k for k in SPACE_KEYS if any(k in c for c in configs)]  # a key unset in a grid: its default
    for result, config in zip(grid, configs):
        trial_id = os.path.basename(result.path.rstrip("/"))  # trial_dirname_creator: the trial id
        history = _history(cfg, trial_id, read_metrics)
        last = history[-1] if history else {}
        error = _trial_failure(cfg, trial_id) or _error_line(result.error)
        row = {"trial": trial_id, **{k: config.get(k) for k in keys},
               "ppl before": history[0][METRIC] if history and history[0].get("tokens") == 0 else None,
               "ppl after": last.get(METRIC), "KL after": last.get("val_kl"), "tokens": last.get("tokens", 0),
               "stopped early": not error and bool(last) and last.get("tokens", 0) < _planned_tokens(cfg, config),
               "error": error}
        rows.append(row)
    # a failed trial (an error, or a student its distillation wrecked: distill/outcome.py) ranks
    # after every trial that finished or was stopped, whatever perplexity it last reported
    rows.sort(key=lambda r: (r["error"] is not None, r["ppl after"] is None,
                             r["ppl after"] if r["ppl after"] is not None else math.inf))
    return rows


def _history(cfg: SweepConfig, trial_id: str, read_metrics) -> list[dict[str, Any]]:
    run = f"{cfg.out}/trials/{trial_id}/run"
    try:
        return [m for m in read_metrics(run) if METRIC in m]
    except (FileNotFoundError, UserError):
        return []


def _planned_tokens(cfg: SweepConfig, config: dict[str, Any]) -> int:
    """The tokens an unstopped trial trains on: whole optimizer steps of the stream's blocks."""
    per_step = int(config.get("batch_size") or cfg.batch_size) * cfg.grad_accum * cfg.workers
    blocks = cfg.tokens // cfg.seq_len
    return (blocks // per_step) * per_step * cfg.seq_len


def _trial_failure(cfg: SweepConfig, trial_id: str) -> str | None:
    """The one line of a trial's recorded failure (`_trial`), without Tune's traceback around it."""
    from .distill.worker import read_failure

    failure = read_failure(f"{cfg.out}/trials/{trial_id}")
    return failure["error"] if failure else None


def _error_line(error) -> str | None:
    if error is None:
        return None
    text = " ".join(str(error).split())
    return text[:160]


def write_results(cfg: SweepConfig, grid, *, trials: int, seconds: float) -> dict[str, Any]:
    """DIR/leaderboard.{csv,md}, DIR/curves.png and DIR/summary.json, through report.py."""
    from .core.report import markdown_table, plot_curves
    from .core.storage import url_to_fs
    from .distill.driver import read_metrics

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
    best = rows[0] if rows and rows[0]["ppl after"] is not None and not rows[0]["error"] else None
    summary = {"trials": trials, "finished": sum(1 for r in rows if not r["stopped early"] and not r["error"]),
               "stopped_early": sum(1 for r in rows if r["stopped early"]),
               "errors": sum(1 for r in rows if r["error"]), "tokens_spent": spent, "grid_tokens": budget,
               "token_ratio": spent / budget, "best": best, "seconds": round(seconds, 1),
               "scheduler": cfg.scheduler}
    with fs.open(f"{path}/summary.json", "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return {**summary, "leaderboard": markdown_table(rows, floats="{:.4g}")}


def _is_remote(fs) -> bool:
    from .core.storage import is_local

    return not is_local(fs)


__all__ = ["SweepConfig", "sweep", "load_space", "leaderboard", "write_results", "concurrency", "trial_resources",
           "teacher_pool", "build_student"]
