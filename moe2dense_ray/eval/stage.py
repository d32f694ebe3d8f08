"""`moe2dense eval`: held-out perplexity and lm-evaluation-harness tasks of any causal LM checkpoint.

* Perplexity is the package's one implementation (`eval.metrics.heldout_metrics`) on token blocks
  packed by `core.data.calibration_blocks` in file order, as the demo makes its held-out blocks; by
  default on the bundled held-out text, the same numbers the demo and the benchmarks report.
* Tasks run through lm-evaluation-harness's Hugging Face wrapper (`HFLM`) on the model already
  in memory: the two tasks shipped in `moe2dense_ray/tasks` (made from the held-out text, no
  network), the paper's five with its few-shot counts (`paper`), or any task the harness knows
  (their datasets come from the Hugging Face hub, or its cache when offline).

Tasks are loaded before the model, so a misspelt task or an unreachable dataset costs seconds,
not a model load. The result is one JSON-able dict (`evaluate_model`), which the CLI prints as a
Markdown table and can write to `--out FILE.json`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
import warnings
from typing import Any, Iterator, Literal, Optional

from pydantic import Field, field_validator

from ..core.config import StageConfig, positional
from ..core.errors import UserError

# The paper's downstream evaluation (arXiv 2605.28207): lm_eval task name -> few-shot examples.
PAPER_TASKS: dict[str, int] = {"winogrande": 5, "hellaswag": 10, "arc_easy": 25, "arc_challenge": 25, "mmlu": 5}
# Names that stand for several tasks in --tasks.
TASK_SETS: dict[str, tuple[str, ...]] = {"shipped": ("next_line", "last_word"), "paper": tuple(PAPER_TASKS)}
RESULTS_KIND = "results"  # the kind of output file (outputs.FILE_MARKERS)
BOOTSTRAP_ITERS = 1000  # for the standard errors of metrics that are not means (e.g. perplexity)


class EvalConfig(StageConfig):
    """`moe2dense eval`."""

    model: str = positional("checkpoint to evaluate (local directory or URL): a teacher, a student, any causal LM",
                            metavar="MODEL")
    tasks: str = Field("shipped", description="comma-separated tasks: next_line and last_word (shipped, offline), "
                       "`shipped` (both), `paper` (WinoGrande 5-shot, HellaSwag 10-shot, ARC-Easy and ARC-Challenge "
                       "25-shot, MMLU 5-shot), any lm-evaluation-harness task, or `none`",
                       json_schema_extra={"metavar": "TASKS"})
    limit: Optional[int] = Field(None, ge=1, description="at most N examples per task (default: all)",
                                 json_schema_extra={"metavar": "N"})
    num_fewshot: Optional[int] = Field(None, ge=0, description="few-shot examples for every task (default: the "
                                       "paper's for its tasks, the task's own otherwise)",
                                       json_schema_extra={"metavar": "N"})
    data: Optional[str] = Field(None, description="held-out text for perplexity, in any format `calibrate` reads "
                                "(default: the bundled held-out sample)", json_schema_extra={"metavar": "DATA"})
    samples: int = Field(64, ge=0, description="perplexity: number of token blocks (0: no perplexity)",
                         json_schema_extra={"metavar": "N"})
    seq_len: int = Field(256, ge=2, description="perplexity: tokens per block", json_schema_extra={"metavar": "L"})
    text_field: str = Field("text", description="field/column holding the text of --data")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass", json_schema_extra={"metavar": "B"})
    device: str = Field("auto", description="torch device (auto: cuda if available, else cpu)")
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = Field(
        None, description="compute dtype (default: the checkpoint's on GPUs, float32 on CPU)")
    seed: int = Field(0, description="seed for the choice of few-shot examples")
    allow_pickle: bool = Field(False, description="accept pickle (.bin) checkpoints; they can run code when loaded")
    out: Optional[str] = Field(None, description="also write the results to this JSON file (local or URL)",
                               json_schema_extra={"metavar": "FILE.json", "aliases": ["-o"]})
    overwrite: bool = Field(False, description="replace --out if it holds results of an earlier eval")

    @field_validator("tasks", mode="before")
    @classmethod
    def _join(cls, v: Any) -> Any:  # a YAML list of tasks is accepted too
        return ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else v

    def task_names(self) -> list[str]:
        """The tasks to run, sets expanded, duplicates dropped, in the order given."""
        names: list[str] = []
        for part in self.tasks.split(","):
            part = part.strip()
            if not part:
                raise UserError(f"--tasks {self.tasks!r} has an empty task name")
            for name in TASK_SETS.get(part, () if part == "none" else (part,)):
                if name not in names:
                    names.append(name)
        return names


# -- the model ------------------------------------------------------------------------------------
def load_eval_model(src: str, *, device: str = "auto", dtype: str | None = None, allow_pickle: bool = False):
    """`(model, tokenizer)` of any causal LM checkpoint (MoE or dense), ready for inference.

    The teacher's loader (`core.models.load_causal_lm`): every problem is one UserError line, and a
    checkpoint that loads only in part (tensors transformers would random-initialise) is refused.
    """
    from ..core.models import load_causal_lm, load_tokenizer
    from ..core.storage import url_to_fs

    fs, path = url_to_fs(src)
    if not allow_pickle and fs.isdir(path):
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        if not any(n.endswith(".safetensors") for n in names) and any(n.endswith(".bin") for n in names):
            raise UserError(f"{src} holds only pickle weights (.bin), which can run code when loaded; convert them "
                            f"to safetensors or pass --allow-pickle if you trust the source")
    try:
        model, _, _ = load_causal_lm(src, device=device, dtype=dtype or "auto", moe=False)
    except (RuntimeError, AssertionError) as e:  # e.g. --device cuda on a machine without one
        raise UserError(f"cannot run {src} on --device {device}: {' '.join(str(e).split())}") from None
    return model, load_tokenizer(src)


# -- lm-evaluation-harness --------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _task_manager(with_defaults: bool):
    """lm_eval's task index; indexing its ~15k built-in tasks takes seconds, so only when needed."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=with_defaults)


@contextlib.contextmanager
def _harness_output(requests_bar: bool = False) -> Iterator[None]:
    """lm_eval's output kept off the terminal while it runs: its per-document, tokenizing and
    bootstrap bars, the `datasets` bars, the hub's retry log and what it prints (bootstrap
    notices) always; the bar over the model's requests unless `requests_bar`, which then shows as
    `eval`, as every bar of this tool is named for its stage; its log below ERROR (e.g. the notice
    that a model object, not a name, was passed). Its bootstrap runs in this process, not in a
    fork of one that holds a model."""
    import io

    import datasets
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface
    import tqdm as tqdm_package

    from ..core.data import quiet_hub

    real = tqdm_package.tqdm

    def silent(*args, **kwargs):
        kwargs["disable"] = True
        return real(*args, **kwargs)

    def named(*args, **kwargs):  # lm_eval's "Running loglikelihood requests"
        kwargs["desc"] = "eval"
        return real(*args, **kwargs)

    # lm_eval.api.metrics imports tqdm inside its bootstrap function: the package attribute
    modules = [lm_eval.api.task, lm_eval.api.model, tqdm_package]
    saved = [(m, m.tqdm) for m in [*modules, lm_eval.models.huggingface]]
    logger = logging.getLogger("lm_eval")
    level = logger.level
    bars = datasets.is_progress_bar_enabled()
    multiproc = os.environ.get("DISABLE_MULTIPROC")
    for m in modules:
        m.tqdm = silent
    lm_eval.models.huggingface.tqdm = named if requests_bar else silent
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        with quiet_hub(), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for m, bar in saved:
            m.tqdm = bar
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()
        if multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = multiproc


def load_tasks(names: list[str], *, num_fewshot: int | None = None, seed: int = 0) -> tuple[dict, dict[str, dict]]:
    """lm_eval's task dict for `names` (shipped, or known to the harness) and, per name, its leaf
    tasks and few-shot count. Datasets are loaded here: an unreachable one is one UserError line."""
    from ..core.data import one_line
    from .tasks import shipped_tasks, task_config

    shipped = set(shipped_tasks())
    tm = _task_manager(any(n not in shipped for n in names))
    unknown = [n for n in names if n not in shipped and n not in tm.task_index]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], list(shipped) + list(tm.task_index), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown task {unknown[0]!r}{hint}: --tasks takes the shipped tasks "
                        f"({', '.join(sorted(shipped))}), {', '.join(TASK_SETS)}, none, or any lm-evaluation-harness "
                        f"task (`lm_eval ls tasks` lists them)")
    merged: dict[str, dict] = {"tasks": {}, "groups": {}, "group_map": {}}
    info: dict[str, dict] = {}
    for name in names:
        spec = task_config(name) if name in shipped else name
        try:
            with _harness_output():
                part = tm.load([spec])
        except OSError as e:  # ConnectionError, the hub's offline and not-found errors, missing files
            hint = ("; the shipped tasks (--tasks shipped) need no network" if name not in shipped else "")
            raise UserError(f"cannot load task {name}: its dataset is unreachable ({one_line(e)}){hint}") from None
        except ImportError as e:
            raise UserError(f"cannot load task {name}: it needs a package that is not installed "
                            f"({one_line(e)})") from None
        shots = num_fewshot if num_fewshot is not None else PAPER_TASKS.get(name)
        for task in part["tasks"].values():
            configured = task.get_config("num_fewshot")
            if shots is not None and configured != 0:  # as lm_eval does: a task fixed at 0 shots stays so
                task.set_config(key="num_fewshot", value=shots)
            elif configured is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=seed)
        for key in merged:
            merged[key].update(part.get(key, {}))
        leaves = list(part["tasks"])
        info[name] = {"leaves": leaves, "num_fewshot": sorted({part["tasks"][t].get_config("num_fewshot")
                                                               for t in leaves})}
    return merged, info


def _metrics(row: dict[str, Any]) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """lm_eval's `{"acc,none": x, "acc_stderr,none": s, ...}` as `({"acc": x}, {"acc": s})`."""
    values: dict[str, float | None] = {}
    errors: dict[str, float | None] = {}
    for key, v in row.items():
        if "," not in key:  # name, alias, sample_len
            continue
        metric, _, filt = key.partition(",")
        stderr = metric.endswith("_stderr")
        metric = metric.removesuffix("_stderr")
        label = metric if filt in ("none", "") else f"{metric} ({filt})"
        v = _finite(v)
        (errors if stderr else values)[label] = v
    return values, {k: errors.get(k) for k in values}


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def run_tasks(model, tokenizer, task_dict: dict, info: dict[str, dict], *, limit: int | None = None,
              batch_size: int = 8, progress: bool = True) -> dict[str, dict]:
    """Run loaded tasks on an in-memory model through lm_eval's HFLM; per requested name: few-shot
    count, examples scored, metrics and their standard errors."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    with _harness_output(requests_bar=progress):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = evaluate(lm, task_dict, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)
    results: dict[str, dict] = {}
    for name, meta in info.items():
        values, errors = _metrics(out["results"].get(name, {}))
        shots = meta["num_fewshot"]
        results[name] = {"num_fewshot": shots[0] if len(shots) == 1 else shots,
                         "examples": sum(int(out["n-samples"][t]["effective"]) for t in meta["leaves"]),
                         "metrics": values, "stderr": errors}
    return results


# -- the whole evaluation ---------------------------------------------------------------------------
def evaluate_model(cfg: EvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Perplexity on held-out text and the configured tasks; writes `cfg.out` if set.

    Returns `{"model", "perplexity": {"ppl", "tokens", "blocks", "seq_len", "data"} or None,
    "tasks": {name: {"num_fewshot", "examples", "metrics", "stderr"}}, "config", "lm_eval",
    "seconds"}`.
    """
    import lm_eval

    from ..core.data import calibration_blocks, load_texts
    from ..core.storage import check_output
    from .metrics import heldout_metrics

    t0 = time.time()
    names = cfg.task_names()
    if not names and cfg.samples == 0:
        raise UserError("nothing to evaluate: --tasks none and --samples 0")
    data = None
    if cfg.samples:
        from .. import assets

        data = cfg.data or assets.heldout_path()
        load_texts(data, text_field=cfg.text_field)  # a missing or unreadable source fails now, not after loading
    if cfg.out:
        check_output(cfg.out, what=RESULTS_KIND, overwrite=cfg.overwrite, sources=(cfg.model, data))
    task_dict, info = load_tasks(names, num_fewshot=cfg.num_fewshot, seed=cfg.seed) if names else ({}, {})
    model, tokenizer = load_eval_model(cfg.model, device=cfg.device, dtype=cfg.dtype, allow_pickle=cfg.allow_pickle)
    perplexity = None
    if data is not None:
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions and cfg.seq_len > positions:
            raise UserError(f"--seq-len {cfg.seq_len} is longer than {cfg.model} attends to ({positions} positions)")
        blocks = calibration_blocks(data, tokenizer, samples=cfg.samples, seq_len=cfg.seq_len,
                                    text_field=cfg.text_field, shuffle_buffer=1)
        m = heldout_metrics(model, blocks.input_ids, blocks.attention_mask, batch_size=cfg.batch_size)
        perplexity = {"ppl": m["ppl"], "tokens": m["tokens"], "blocks": blocks.num_samples, "seq_len": cfg.seq_len,
                      "data": data}
        if not math.isfinite(m["ppl"]):
            warnings.warn(f"the held-out perplexity of {cfg.model} is {m['ppl']}: the model's outputs are not finite, "
                          f"so its task scores below come from non-finite log-likelihoods and mean nothing")
    tasks = run_tasks(model, tokenizer, task_dict, info, limit=cfg.limit, batch_size=cfg.batch_size,
                      progress=progress) if names else {}
    result = {"model": cfg.model, "perplexity": perplexity, "tasks": tasks, "config": cfg.model_dump(mode="json"),
              "lm_eval": lm_eval.__version__, "seconds": round(time.time() - t0, 1)}
    if cfg.out:
        write_results(result, cfg.out, overwrite=cfg.overwrite, sources=(cfg.model, data))
    return result


def results_table(result: dict[str, Any]) -> str:
    """The results as one Markdown table: a row per task and metric (n: examples, or tokens for
    perplexity; ±: standard error)."""
    from ..core.report import markdown_table

    rows = []
    p = result.get("perplexity")
    if p:
        rows.append({"task": "held-out text", "shots": None, "n": p["tokens"], "metric": "perplexity (per token)",
                     "value": p["ppl"], "±": None})
    for name, r in result.get("tasks", {}).items():
        shots = r["num_fewshot"]
        for metric, value in r["metrics"].items():
            rows.append({"task": name, "shots": shots if isinstance(shots, int) else None, "n": r["examples"],
                         "metric": metric, "value": value, "±": r["stderr"].get(metric)})
    return markdown_table(rows, floats="{:.3f}")


def write_results(result: dict[str, Any], url: str, *, overwrite: bool = False,
                  sources: tuple[str | None, ...] = ()) -> None:
    """Write `result` as JSON to `url`, whole or not at all (written beside it, then renamed). A
    value that is not finite (the perplexity of a model that overflows) is written as null, and
    `notes` says which it was."""
    from ..core.storage import (
        OutputLock,
        check_output,
        noted_finite,
        partial_name,
        swap_in,
        url_to_fs,
    )

    fs, path = url_to_fs(url)
    text = json.dumps(noted_finite(result), indent=1, allow_nan=False) + "\n"
    with OutputLock(url):
        check_output(url, what=RESULTS_KIND, overwrite=overwrite, sources=sources)
        parent = path.rsplit("/", 1)[0] if "/" in path else "."
        fs.makedirs(parent, exist_ok=True)
        tmp = partial_name(path)
        try:
            with fs.open(tmp, "w") as f:
                f.write(text)
            swap_in(fs, tmp, path, overwrite=overwrite)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)


__all__ = ["EvalConfig", "PAPER_TASKS", "TASK_SETS", "evaluate_model", "load_eval_model", "load_tasks", "run_tasks",
           "results_table", "write_results"]
