"""Driving a distillation: `distill` (teacher service -> Ray Train) and `teacher_logits` (-> Parquet).

Everything that can be checked is checked before Ray starts a worker: the student is dense and
speaks the teacher's vocabulary, the token budget makes at least one optimizer step, the
cluster can hold the workers asked for, and RUN is new (or resumed, or replaced on request).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.checkpoint import parse_config
from ..core.errors import UserError
from ..core.progress import Progress
from ..core.ray_session import VERBOSE_ENV, ensure_ray_after
from ..core.storage import (
    OutputLock,
    check_output,
    is_local,
    noted_finite,
    read_json,
    read_small,
    start_directory,
    url_to_fs,
)
from .config import DistillConfig, TeacherLogitsConfig, TeacherStreamConfig
from .outcome import check_outcome
from .stream import (
    TeacherPool,
    blocks_dataset,
    check_stream_files,
    pack_blocks,
    joined,
    read_blocks,
    read_stream_meta,
    stream_meta,
    teacher_stream,
    write_stream,
)
from .worker import (
    DS_TAG,
    FAILURE_FILE,
    METRICS_FILE,
    STATE_FILE,
    read_failure,
    stop_on_failure,
    train_func,
)

CONFIG_FILE = "distill.yaml"
RESULTS_FILE = "results.json"
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass
class DistillResult:
    run: str
    student: str
    steps: int
    tokens: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1] if self.metrics else {}


# -- checks -------------------------------------------------------------------------------------


def _absolute_paths(cfg):
    """Local paths made absolute: Ray's actors and training workers do not share the driver's cwd."""
    fields = ("teacher", "student", "data", "val_data", "logits", "out")
    update = {}
    for name in fields:
        value = getattr(cfg, name, None)
        if value and not value.startswith("hf:") and is_local(url_to_fs(value)[0]) and "://" not in value:
            update[name] = os.path.abspath(value)
    return cfg.model_copy(update=update)


def _read_config(src: str, what: str) -> dict[str, Any]:
    fs, path = url_to_fs(src)
    if not fs.exists(f"{path}/config.json"):
        raise UserError(f"no {what} checkpoint at {src} (no config.json)")
    return parse_config(fs.cat_file(f"{path}/config.json"), f"{src}/config.json")


def _check_student(student: str) -> dict[str, Any]:
    """A dense student whose weights are all there, checked from its headers before any work: a
    training worker would otherwise train a model transformers had filled in at random."""
    from ..core.models import check_weights

    cfg = _read_config(student, "student")
    experts = max((int(cfg.get(k) or 0) for k in EXPERT_COUNT_KEYS), default=0)
    if experts > 1:
        raise UserError(f"the student {student} is not dense ({cfg.get('model_type')} with {experts} experts); "
                        f"make one with `moe2dense build` or `moe2dense convert`")
    check_weights(student, what="the student")
    return cfg


PLAIN_LR = 1e-3  # the peak learning rate of a student built without a refit (bench/distill.py)


def peak_lr(student: str) -> float:
    """The default peak learning rate of `student`: PLAIN_LR, scaled by sqrt(e_after / e_before)
    when its plan records a refit (e: the MoE layers' relative reconstruction error, geometric mean).

    Why (docs/refit.md, "Learning rate"): Adam moves every weight by about the learning rate per
    step whatever the gradient, so a step raises the loss near a minimum by ~ c * n * lr^2 / 2,
    while the loss left to gain scales about linearly with the error e. A step that may not cost
    more than what is left to gain gets lr proportional to sqrt(e): a student refitted from e_before
    to e_after keeps the plain student's margin with lr * sqrt(e_after / e_before). At lr 1e-3 the
    K=8 refitted student's held-out perplexity went 60.8 -> 73.2 in its first 4 steps; with the
    scaled 2.9e-4 it falls from the first step on, and ends lower (55.8 against 56.3).
    """
    from ..convert.plan import PLAN_FILE, load_plan
    from ..convert.refit import mean_error
    from ..core.storage import url_to_fs

    fs, path = url_to_fs(student)
    if not fs.exists(f"{path}/{PLAN_FILE}"):
        return PLAIN_LR
    record = load_plan(student).refit
    if not record:
        return PLAIN_LR
    return PLAIN_LR * math.sqrt(min(1.0, mean_error(record, "error_after") / mean_error(record, "error_before")))


def _check_vocabularies(teacher: str, student: str, teacher_vocab: int, student_vocab: int) -> None:
    from ..core.models import load_tokenizer

    if teacher_vocab != student_vocab:
        raise UserError(f"the teacher's vocabulary ({teacher_vocab} logits) and the student's "
                        f"({student_vocab}) differ: distillation compares their distributions token by token")
    if load_tokenizer(teacher).get_vocab() != load_tokenizer(student).get_vocab():
        raise UserError(f"the tokenizers of {teacher} and {student} differ; the student must use the teacher's")


def run_config(run: str) -> str:
    """RUN/distill.yaml, the settings a `--resume RUN` continues with; one line when RUN holds no run."""
    fs, path = url_to_fs(run)
    if not fs.isfile(f"{path.rstrip('/')}/{CONFIG_FILE}"):
        raise UserError(f"--resume {run}: no distillation run there (no {CONFIG_FILE}); "
                        f"start one with `moe2dense distill ... --out {run}`")
    return f"{run.rstrip('/')}/{CONFIG_FILE}"


def _check_run(cfg: DistillConfig, sources: tuple[str, ...]) -> None:
    """RUN is new, or resumed (it must hold a run), or replaced with --overwrite (only if it holds one)."""
    if cfg.resume:
        run_config(cfg.out)
        return
    check_output(cfg.out, what="run", overwrite=cfg.overwrite, sources=sources)


SNAPSHOT_FILE = "train/checkpoint_manager_snapshot.json"  # Ray Train's record of RUN's checkpoints


def _check_resumable(cfg: DistillConfig) -> None:
    """The checkpoint a `--resume` restores from (the latest that Ray Train registered) holds every
    file the workers will load: one line naming a missing one, before any work, instead of
    DeepSpeed's bare assertion inside a worker after start-up."""
    fs, path = url_to_fs(cfg.out)
    if not fs.exists(f"{path}/{SNAPSHOT_FILE}"):
        return  # no checkpoint yet: the run starts from its first step
    snapshot = read_json(fs, f"{path}/{SNAPSHOT_FILE}", what=f"{cfg.out}/{SNAPSHOT_FILE}")
    latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    if not isinstance(latest, str):
        return
    ranks = range(cfg.workers)
    if cfg.zero_stage == 3:
        needed = [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in ranks for kind in ("model", "optim")]
    else:
        needed = ["mp_rank_00_model_states.pt"] + (
            [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in ranks] if cfg.zero_stage else [])
    for name in [STATE_FILE] + [f"{DS_TAG}/{n}" for n in needed]:
        if not fs.exists(f"{path}/train/{latest}/{name}"):
            raise UserError(f"--resume: the latest checkpoint {cfg.out}/train/{latest} lacks {name}, so the run "
                            f"cannot continue from it (a damaged or half-copied RUN); restore the file, or start "
                            f"again with --overwrite")


def _start_run(cfg: DistillConfig) -> None:
    """Record the settings in a fresh RUN, swapped in whole for a run replaced with --overwrite
    (a kill leaves the old run or the new one, as for every output: see core/storage.py); a resumed
    run keeps its own. Call while holding RUN's OutputLock."""
    if not cfg.resume:
        start_directory(cfg.out, {CONFIG_FILE: cfg.to_yaml()}, overwrite=cfg.overwrite)


def _check_resources(cfg: TeacherStreamConfig, *, workers: int = 0, cpus_per_worker: float = 0.0,
                     teacher: bool = True, pipelines: int = 1, worker_resources: dict[str, float] | None = None) -> None:
    """Ask only for what the cluster can give (see `core.ray_session.require_resources`): an embedded Ray
    cannot grow, and a request it can never meet would wait forever; a cluster (RAY_ADDRESS) gets
    MOE2DENSE_RESOURCE_TIMEOUT seconds to grow."""
    from ..core.ray_session import cluster_resources, require_resources

    res = cluster_resources()
    gpu_cluster = res.get("GPU", 0) > 0
    teacher_gpus = cfg.gpus_per_teacher if cfg.gpus_per_teacher is not None else (1 if gpu_cluster else 0)
    worker_res = dict(worker_resources or {}) if workers else {}
    teacher_res = dict(cfg.teacher_resources) if teacher else {}
    need = {"CPU": workers * cpus_per_worker + (cfg.teacher_workers * cfg.cpus_per_teacher if teacher else 0)
            + 0.2 * pipelines,
            "GPU": (workers if gpu_cluster else 0) + (cfg.teacher_workers * teacher_gpus if teacher else 0)}
    for res_, n in ((worker_res, workers), (teacher_res, cfg.teacher_workers)):
        for k, v in res_.items():
            need[k] = need.get(k, 0) + n * v
    each = ([{"CPU": cpus_per_worker, "GPU": 1 if gpu_cluster else 0, **worker_res}] if workers else []) + \
        ([{"CPU": cfg.cpus_per_teacher, "GPU": teacher_gpus, **teacher_res}] if teacher else [])
    require_resources(need, each=each, who="this run", parts="training workers, teacher replicas, data pipeline",
                      advice="lower --workers, --teacher-workers, --cpus-per-worker, --cpus-per-teacher or "
                      "--gpus-per-teacher", custom_flags="--teacher-resources / --worker-resources")


# -- teacher-logits -------------------------------------------------------------------------------


def _text(cfg: TeacherStreamConfig, tok, *, val_data: str | None = None):
    """(validation blocks, the plan of the training text, its first and end index).

    Validation takes indices 0..V-1: the first V blocks of `val_data` in file order when given,
    else the first V blocks of DATA's plan, packed here (they are few). Training blocks continue
    from there and are packed on the cluster as they are needed (`blocks.text_blocks`).
    """
    from .blocks import local_blocks, plan_text

    n = cfg.tokens // cfg.seq_len
    if n < 1:
        raise UserError(f"--tokens {cfg.tokens} is less than one block of --seq-len {cfg.seq_len}")
    V = cfg.val_blocks
    opts = dict(seq_len=cfg.seq_len, seed=cfg.seed, text_field=cfg.text_field)
    if val_data:
        val = pack_blocks(val_data, tok, blocks=V, shuffle=False, **opts)
        plan = plan_text(cfg.data, tok, blocks=n, first_index=len(val), **opts)
    else:
        plan = plan_text(cfg.data, tok, blocks=V + n, **opts)
        val = local_blocks(plan, tok, lo=0, hi=min(V, plan.blocks))
    lo, end = len(val), plan.first + plan.blocks
    if end - lo < n:
        import warnings

        warnings.warn(f"{cfg.data} holds about {max(0, end - lo) * cfg.seq_len} tokens after the validation blocks: "
                      f"streaming {max(0, end - lo)} blocks, not the {n} asked for", stacklevel=3)
    if end <= lo:
        raise UserError(f"{cfg.data} has no text left for training after {len(val)} validation blocks")
    return val, plan, lo, end


def _id_order(plan, tok, vocab_size: int) -> dict[str, Any]:
    """The ids of the plan's first text by frequency (`codec.IdOrder`): coded by rank, a top-k
    row's ids lie close together at any vocabulary size. Recorded in a stream, passed online."""
    from .blocks import sample_ids
    from .codec import frequency_order

    return frequency_order(sample_ids(plan, tok), vocab_size)


def teacher_logits(cfg: TeacherLogitsConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the teacher over DATA once and write its stream to LOGITS (Parquet + stream.json)."""
    from ..core.models import load_tokenizer
    from .blocks import text_blocks

    cfg = _absolute_paths(cfg)
    teacher_cfg = _read_config(cfg.teacher, "teacher")
    check_output(cfg.out, what="logits", overwrite=cfg.overwrite, sources=(cfg.teacher, cfg.data))
    tok = load_tokenizer(cfg.teacher)
    val, plan, lo, end = _text(cfg, tok)
    ensure_ray_after(lambda: _check_resources(cfg))
    import ray

    # the bar over the blocks is write_stream's; Ray Data's own (operator bars, or progress log
    # lines off a terminal) only with --verbose
    ray.data.DataContext.get_current().enable_progress_bars = progress and bool(os.environ.get(VERBOSE_ENV))
    t0 = time.time()
    meta = stream_meta(cfg, teacher=cfg.teacher, vocab_size=int(teacher_cfg["vocab_size"]), blocks=end,
                       tokens=(end - lo) * cfg.seq_len, tokenizer=tokenizer_digest(cfg.teacher))
    meta["val_blocks"] = len(val)
    order = _id_order(plan, tok, int(teacher_cfg["vocab_size"]))
    blocks = blocks_dataset(val).union(text_blocks(plan, tok, lo=lo, hi=end, rows=cfg.teacher_batch)) if len(val) \
        else text_blocks(plan, tok, lo=lo, hi=end, rows=cfg.teacher_batch)
    write_stream(teacher_stream(blocks, teacher=cfg.teacher, cfg=cfg, order=order), cfg.out,
                 meta | {"id_order": order}, overwrite=cfg.overwrite, sources=(cfg.teacher,), progress=progress)
    meta["seconds"] = round(time.time() - t0, 2)
    return meta


# -- distill ---------------------------------------------------------------------------------------


def distill(cfg: DistillConfig, *, progress: bool = True, callbacks: list | None = None) -> DistillResult:
    """Distill `cfg.teacher` (or the stream `cfg.logits`) into `cfg.student`; the result is RUN/student.

    `callbacks` are Ray Train callbacks for the trainer: a sweep trial passes Tune's
    `TuneReportCallback`, so every report of the training workers reaches the Tune scheduler."""

    cfg = _absolute_paths(cfg)
    student_cfg = _check_student(cfg.student)
    if cfg.lr is None:
        cfg = cfg.model_copy(update={"lr": peak_lr(cfg.student)})  # recorded in RUN/distill.yaml as used
    sources = tuple(s for s in (cfg.student, cfg.teacher, cfg.data, cfg.logits, cfg.val_data) if s)
    if cfg.logits:
        meta = read_stream_meta(cfg.logits)
        index = check_stream_files(cfg.logits, meta)  # the row groups of each block range, for every reader
        order = meta.get("id_order")  # streams written before ids were coded by frequency have none
        if (int(meta["vocab_size"]) != int(student_cfg["vocab_size"])
                or meta.get("tokenizer") != tokenizer_digest(cfg.student)):
            raise UserError(f"the stream {cfg.logits} was made with another vocabulary than the student's "
                            f"({meta['vocab_size']} vs {student_cfg['vocab_size']} logits, or other tokens): "
                            f"distillation compares distributions token by token")
        # the stream was made with these; the run records them as they are
        cfg = cfg.model_copy(update={k: meta[k] for k in ("codec", "top_k", "draws", "temperature", "seq_len")}
                             | {"val_blocks": int(meta["val_blocks"])})
        available = int(meta["blocks"]) - cfg.val_blocks
        n_train = min(available, (cfg.tokens or available * cfg.seq_len) // cfg.seq_len)
    else:
        teacher_cfg = _read_config(cfg.teacher, "teacher")
        _check_vocabularies(cfg.teacher, cfg.student, int(teacher_cfg["vocab_size"]), int(student_cfg["vocab_size"]))
        n_train = cfg.tokens // cfg.seq_len
    per_step = cfg.batch_size * cfg.grad_accum * cfg.workers
    if n_train < per_step:
        raise UserError(f"{n_train} training blocks of {cfg.seq_len} tokens are fewer than one optimizer step "
                        f"uses ({cfg.workers} workers x {cfg.batch_size} blocks x {cfg.grad_accum} micro-batches)")
    if n_train % per_step and not cfg.resume:  # said once, when the run starts
        import warnings

        warnings.warn(f"the last {n_train % per_step} of {n_train} training blocks make less than one optimizer "
                      f"step ({per_step} blocks) and are not trained on")
    if cfg.loss not in _losses():
        raise UserError(f"unknown loss {cfg.loss!r}; valid losses: {', '.join(_losses())}")
    if cfg.codec == "sampled" and cfg.loss != "forward_kl":
        raise UserError(f"--loss {cfg.loss} needs the teacher's top-k distribution; sampled streams "
                        f"estimate forward KL only")
    _check_run(cfg, sources)
    if cfg.resume:
        _check_resumable(cfg)
    if not cfg.logits:  # the text's plan and the held-out blocks, before Ray starts: bad text is one line
        from ..core.models import load_tokenizer

        tok = load_tokenizer(cfg.teacher)
        val_blocks, plan, lo, end = _text(cfg, tok, val_data=cfg.val_data)
        if cfg.workers > 1 and len(plan.shards) == 1:
            import warnings

            warnings.warn(f"{cfg.data} is read as one stream (a hub dataset by name, or one compressed file): "
                          f"rank r of {cfg.workers} reads r/{cfg.workers} of the text before its first block. "
                          f"Give its files instead (hf://datasets/NAME/*.parquet, a directory, a glob) for "
                          f"every rank to start at once", stacklevel=2)
        steps = min(n_train, end - lo) // per_step
        if steps < 1:
            raise UserError(f"{cfg.data} holds {end - lo} training blocks of {cfg.seq_len} tokens, fewer than one "
                            f"optimizer step uses ({per_step})")
        order = _id_order(plan, tok, int(teacher_cfg["vocab_size"]))
    ensure_ray_after(lambda: _check_resources(cfg, workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker,
                                              teacher=not cfg.logits, pipelines=cfg.workers,
                                              worker_resources=cfg.worker_resources))

    t0 = time.time()
    V = cfg.val_blocks
    with OutputLock(cfg.out):  # one run at a time writes RUN
        if cfg.logits:  # each training worker reads its own share of the files (stream.read_blocks)
            steps = n_train // per_step
            val = joined(list(read_blocks(cfg.logits, 0, V, index=index)))
            return _fit(cfg, steps=steps, val=val, progress=progress, t0=t0, callbacks=callbacks, order=order,
                        source={"logits": cfg.logits, "index": index, "lo": V, "hi": V + steps * per_step})
        # the teacher replicas live as long as this run, not as long as a training worker
        pool = TeacherPool(cfg.teacher, cfg, order=order, restarts=cfg.max_failures)
        try:
            val = pool.requests(val_blocks)  # answered while the training workers start
            source = {"plan": plan.to_dict(), "tokenizer": tok, "replicas": pool.replicas, "lo": lo,
                      "hi": lo + steps * per_step}
            return _fit(cfg, steps=steps, val=val, source=source, progress=progress, t0=t0, callbacks=callbacks,
                        order=order)
        finally:
            pool.close()


def _fit(cfg: DistillConfig, *, steps: int, val: dict[str, np.ndarray], source: dict[str, Any], progress: bool,
         t0: float, callbacks: list | None, order: dict | None, train_loop=None) -> DistillResult:
    _start_run(cfg)  # only now: a check that failed before leaves no RUN behind
    fs, path = url_to_fs(cfg.out)
    if fs.exists(f"{path}/{FAILURE_FILE}"):
        fs.rm(f"{path}/{FAILURE_FILE}")  # what stopped an earlier attempt: the user has seen it, and resumes
    trainer = _trainer(cfg, steps=steps, val=val, source=source, callbacks=[*(callbacks or []), stop_on_failure(cfg.out)],
                       order=order, train_loop=train_loop)
    watcher = _MetricsWatcher(cfg.out, steps, enabled=progress)
    watcher.start()
    try:
        trainer.fit()
    except Exception:  # noqa: BLE001 - Ray Train wraps the workers' errors in its own
        _raise_failure(cfg)
        raise
    finally:
        watcher.stop()
    _raise_failure(cfg)  # a restarted worker that found the record returned at once
    metrics, torn = metrics_and_torn(cfg.out)
    if torn:
        import warnings

        warnings.warn(f"{cfg.out}/{METRICS_FILE}: skipped {torn} torn line{'s' if torn > 1 else ''} (a report cut "
                      f"short by a kill)")
    fs, path = url_to_fs(cfg.out)
    if not fs.exists(f"{path}/student/config.json"):
        raise RuntimeError(f"training finished but {cfg.out}/student was not written")
    check_outcome(cfg, metrics, int(_read_config(cfg.student, "student").get("vocab_size") or 0))
    out = DistillResult(run=cfg.out, student=f"{cfg.out}/student", steps=steps,
                        tokens=int(metrics[-1]["tokens"]) if metrics else 0, metrics=metrics,
                        seconds=round(time.time() - t0, 2))
    result = noted_finite({"steps": out.steps, "tokens": out.tokens, "seconds": out.seconds, "final": out.final})
    with fs.open(f"{path}/{RESULTS_FILE}", "w") as f:
        json.dump(result, f, indent=1, allow_nan=False)
    return out


def tokenizer_digest(src: str) -> str:
    """A fingerprint of a checkpoint's vocabulary: token strings and their ids."""
    import hashlib

    from ..core.models import load_tokenizer

    vocab = sorted(load_tokenizer(src).get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def _losses() -> list[str]:
    from .losses import LOSSES

    return list(LOSSES)


def _raise_failure(cfg: DistillConfig) -> None:
    """One error line for a failure that a worker recorded (worker.py: what retrying would repeat)."""
    failure = read_failure(cfg.out)
    if not failure:
        return
    kind, error = failure["kind"], failure["error"]
    if kind == "FloatingPointError":
        raise UserError(f"{error}: lower --lr or raise --warmup, then --resume {cfg.out}")
    if kind in ("OutOfMemoryError", "MemoryError"):
        raise UserError(f"training worker {failure['rank']} ran out of memory ({error}): lower --batch-size (and "
                        f"raise --grad-accum to keep the step), use --activation-checkpointing or a higher "
                        f"--zero-stage, then --resume {cfg.out}")
    if kind == "ActorDiedError":
        raise UserError(f"a teacher replica died and could not be restarted ({error})")
    raise UserError(error)


def _trainer(cfg: DistillConfig, *, steps: int, val: dict[str, np.ndarray], source: dict[str, Any],
             callbacks: list | None = None, order: dict | None = None, train_loop=None):
    import ray
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from .stream import arrow_fs

    fs, path = url_to_fs(cfg.out)
    gpu = ray.cluster_resources().get("GPU", 0) > 0
    storage = dict(storage_path=os.path.abspath(path)) if is_local(fs) else \
        dict(storage_path=path, storage_filesystem=arrow_fs(fs))
    return TorchTrainer(
        train_loop or train_func,
        train_loop_config={"cfg": cfg.model_dump(), "steps": steps, "run": cfg.out, "val": val, "order": order,
                           "source": source},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if gpu else {}),
                                                           **cfg.worker_resources}),
        run_config=RunConfig(name="train", **storage, failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             callbacks=callbacks or None),
    )


METRICS_LIMIT = 256 << 20  # a report is ~300 bytes: a million of them, not a file that never ends


def read_metrics(run: str) -> list[dict[str, Any]]:
    """The reports of RUN in order, including those of attempts that a failure cut short."""
    return metrics_and_torn(run)[0]


def metrics_and_torn(run: str) -> tuple[list[dict[str, Any]], int]:
    """RUN's reports, and how many lines were torn: a line that a kill cut mid-append is not a
    report (the next append starts on a fresh line after it); a last line without its newline is
    one rank 0 may be writing right now."""
    fs, path = url_to_fs(f"{run}/{METRICS_FILE}")
    if not fs.exists(path):
        return [], 0
    text = read_small(fs, path, what=f"{run}/{METRICS_FILE}", limit=METRICS_LIMIT).decode("utf-8", errors="replace")
    rows, torn = [], 0
    for line in text[: text.rfind("\n") + 1].splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            torn += 1
    return rows, torn


class _MetricsWatcher:
    """Shows the run's progress on the driver by following RUN/metrics.jsonl (written by rank 0)."""

    def __init__(self, run: str, steps: int, *, enabled: bool):
        self.run, self.enabled = run, enabled
        self.bar = Progress(steps, "distill", unit="step", enabled=enabled)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def start(self) -> None:
        if self.enabled:
            self._thread.start()

    def _follow(self) -> None:
        while not self._stop.wait(2.0):
            self._show()

    def _show(self) -> None:
        try:
            rows = read_metrics(self.run)
        except (OSError, ValueError):
            return
        if not rows:  # what the first step waits for
            self.bar.set_postfix_str("starting the training workers, loading the teacher, validating", refresh=True)
        else:
            last = rows[-1]
            self.bar.n = int(last["step"])
            post = {k: f"{last[k]:.3g}" for k in ("loss", "val_ppl", "tok_per_s") if k in last}
            self.bar.set_postfix(post, refresh=True)

    def stop(self) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=5)
            self._show()
        self.bar.close()


__all__ = ["distill", "teacher_logits", "DistillResult", "read_metrics", "peak_lr", "PLAIN_LR"]
