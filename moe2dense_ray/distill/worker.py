"""What each Ray Train worker runs: `train_func(config)`, one DeepSpeed data-parallel student replica.

The worker never holds a teacher. It owns a contiguous share of the blocks (`blocks.rank_range`)
and builds its own stream of them when it starts, from its checkpoint: the blocks it has trained
(a `blocks.Ranges`, one interval per rank) are left out before any text is packed or any block
reaches a teacher replica (driver-owned actors, `stream.TeacherPool`, that outlive the worker).
It trains with DeepSpeed, validates on held-out blocks at every report, and at every checkpoint
saves the DeepSpeed state with the trained ranges, so a restarted worker continues with exactly
the blocks after its checkpoint and ends at the planned step.

A failure that a retry would only repeat (a non-finite loss, running out of memory, a `UserError`,
a teacher replica dead for good) is written to RUN/failure.json before the worker raises; a
controller callback (`StopOnFailure`) then ends the run instead of restarting it, and the driver
turns the record into one error line. Anything else (a lost node, worker or peer) is retried.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import torch

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.json"
FAILURE_FILE = "failure.json"  # in RUN: a failure that retrying would repeat (see the module's doc)
DS_TAG = "deepspeed"


def own_build_tools_first(path: str) -> str:
    """PATH with this environment's own scripts first, as an activated venv has it.

    On a machine without a GPU, DeepSpeed's CPU communication op is compiled by torch with the
    first `ninja` on PATH, and a build one ninja made is built again by another: their logs hash
    the same command differently (the system's 1.11 and pip's 1.13 here, 33 s a build on 2
    cores). Pip's ninja (a DeepSpeed dependency) sits beside the interpreter; putting it first
    makes install.sh's build, a job's and every training worker's the same one, whatever PATH
    the shell, the Ray head or the job had, and a machine with no system ninja can build it."""
    bindir = os.path.dirname(sys.executable)
    parts = path.split(os.pathsep) if path else []
    if not os.path.exists(os.path.join(bindir, "ninja")) or parts[:1] == [bindir]:
        return path
    return os.pathsep.join([bindir, *parts])


def build_cpu_op() -> None:
    """Compile DeepSpeed's CPU communication op into torch's extension cache now (install.sh runs
    this once on a machine without a GPU), with the ninja the training workers will use."""
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = own_build_tools_first(old)
    try:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().create_op_builder("ShareMemCommBuilder").load()
    finally:
        os.environ["PATH"] = old


def fresh_batches(batches: Iterator[dict[str, np.ndarray]], trained, size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of exactly `size` rows of `batches` whose blocks are not in `trained` (a `Ranges`).

    The stream already leaves trained blocks out; checking again here keeps a resume exact
    whatever order a stream's blocks arrive in.
    """
    pending: list[dict[str, np.ndarray]] = []
    have = 0
    for batch in batches:
        keep = ~trained.contains(batch["block_index"])
        if not keep.all():
            batch = {k: v[keep] for k, v in batch.items()}
        if len(batch["block_index"]) == 0:
            continue
        pending.append(batch)
        have += len(batch["block_index"])
        while have >= size:
            merged = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
            yield {k: v[:size] for k, v in merged.items()}
            rest = {k: v[size:] for k, v in merged.items()}
            have -= size
            pending = [rest] if have else []


def rank_stream(source: dict[str, Any], cfg, *, lo: int, hi: int, skip, rank: int,
                world: int) -> Iterator[dict[str, np.ndarray]]:
    """This worker's blocks lo <= index < hi minus `skip`, with the teacher's columns, in index order.

    Text (`source["plan"]`) is packed here, by a thread, from the worker's checkpoint, and sent to
    this rank's share of the run's teacher replicas: a restart sends no trained block to a teacher.
    Packing is cheap next to any teacher (a rank of a 4B-token run on 24 workers tokenizes its
    share in minutes of one core over hours), where a Ray Data pipeline per worker took seconds to
    start and ran processes outside Train's resource accounting. An offline stream
    (`source["logits"]`) is read the same way, by a thread, from this rank's row groups of its
    Parquet files (`stream.read_blocks`).
    """
    from .blocks import TextPlan, iter_blocks
    from .stream import prefetched, read_blocks, replica_share, teacher_batches

    if "logits" in source:  # no teacher to spare
        yield from prefetched(read_blocks(source["logits"], lo, hi, skip=skip, rows=cfg.batch_size,
                                          index=source.get("index")))
        return
    blocks = prefetched(iter_blocks(TextPlan.from_dict(source["plan"]), source["tokenizer"], lo=lo, hi=hi, skip=skip,
                                    rows=cfg.teacher_batch))
    # in flight: the student's next micro-batch and the one after, however many teacher batches that
    # takes (with 8-block teacher batches and 16-block micro-batches, 2 requests kept the student
    # waiting 27% of the time)
    replicas = replica_share(source["replicas"], rank, world)
    ahead = -(-2 * cfg.batch_size // cfg.teacher_batch)
    yield from teacher_batches(blocks, replicas, depth=max(2, -(-ahead // len(replicas))))


def deepspeed_config(cfg, *, cuda: bool) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": {"stage": cfg.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": cuda},
        "zero_allow_untested_optimizer": True,  # the client optimizer is torch's AdamW
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.clip > 0:
        ds["gradient_clipping"] = cfg.clip
    return ds


def _to_torch(batch: dict[str, np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=device)
    mask = torch.as_tensor(batch["attention_mask"], dtype=torch.long, device=device)
    return ids, mask


def decode_target(codec: str, columns: dict[str, np.ndarray], order=None):
    """The teacher's `t_*` columns of [blocks, seq_len, ...] -> one SparseTarget row per token
    (`order`: the stream's `codec.IdOrder`, None when its ids are coded as they are)."""
    from .codec import CODECS

    lead = columns["t_lhead"].ndim
    flat = {k: v.reshape(-1, *v.shape[lead:]) if v.ndim > lead else v.reshape(-1)
            for k, v in columns.items() if k.startswith("t_")}
    return CODECS[codec].decode(flat, order=order)


def batch_loss(model, batch: dict[str, np.ndarray], cfg, device, order=None) -> tuple[torch.Tensor, float, float]:
    """(loss, kd, ce) of one micro-batch: (1 - w) * KD + w * CE, both averaged over real tokens.

    The body runs once; the LM head, the softmax and both losses run a chunk of rows at a time
    (`losses.chunked_loss`), so the micro-batch never holds [tokens x vocabulary].
    """
    from ..core.lm_head import LMHead
    from .losses import chunked_loss

    head = model if isinstance(model, LMHead) else LMHead(model)
    ids, mask = _to_torch(batch, device)
    target = decode_target(cfg.codec, batch, order).to(device)
    sums = chunked_loss(head.logits, head.hidden(ids, mask), ids, mask, target, loss=cfg.loss,
                        temperature=cfg.temperature, ce=cfg.ce_weight > 0, rows=head.rows())
    kd, ce = sums.means()
    loss = kd if cfg.ce_weight == 0 else (1 - cfg.ce_weight) * kd + cfg.ce_weight * ce
    return loss, float(kd.detach()), float(ce.detach())


def _val_share(val: dict[str, np.ndarray], rank: int, world: int, codec: str, order=None):
    """This rank's share of the validation blocks: (input_ids, attention_mask, keep, teacher target).

    Every rank gets the same number of blocks (ceil(n / world)), a short share padded with block 0
    marked `keep` False, so all ranks make the same forward calls (ZeRO-3 gathers weights
    collectively) and padding is not counted.
    """
    n = len(val["input_ids"])
    per = -(-n // world)
    rows = list(range(rank * per, min(n, (rank + 1) * per)))
    keep = [True] * len(rows) + [False] * (per - len(rows))
    rows += [0] * (per - len(rows))
    cols = {k: np.asarray(v)[rows] for k, v in val.items()}
    return (torch.as_tensor(cols["input_ids"]), torch.as_tensor(cols["attention_mask"]), torch.as_tensor(keep),
            decode_target(codec, cols, order))


def _write_metrics(run: str, row: dict[str, Any]) -> None:
    """Append one report to RUN/metrics.jsonl (rewritten whole where the filesystem cannot append)."""
    from ..core.storage import is_local, url_to_fs

    fs, path = url_to_fs(f"{run}/{METRICS_FILE}")
    line = (json.dumps(row) + "\n").encode()
    if is_local(fs):
        with open(path, "ab+") as f:  # a line that a kill tore is closed first: a report never joins it
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)
        return
    old = fs.cat_file(path) if fs.exists(path) else b""
    with fs.open(path, "wb") as f:
        f.write(old + (b"\n" if old and not old.endswith(b"\n") else b"") + line)


class _Logger:
    """Rank 0's record of every report: RUN/metrics.jsonl, and TensorBoard events when RUN is local."""

    def __init__(self, run: str, enabled: bool):
        from ..core.storage import is_local, url_to_fs

        self.run, self.enabled, self.tb = run, enabled, None
        fs, path = url_to_fs(run)
        if enabled and is_local(fs):
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(path, "tensorboard"), flush_secs=10)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        _write_metrics(self.run, row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "steps", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()


# -- failures a retry would repeat ---------------------------------------------------------------------


def fatal_errors() -> tuple[type[BaseException], ...]:
    """What ends a run at once instead of restarting it: errors of the run itself, which the same
    checkpoint, data and settings would meet again. A lost node, worker or peer (a collective that
    fails because another rank died) is none of these, and is retried."""
    import ray.exceptions

    from ..core.errors import UserError

    return (FloatingPointError, MemoryError, torch.OutOfMemoryError, UserError, ray.exceptions.ActorDiedError)


def record_failure(run: str, error: BaseException, rank: int) -> None:
    """Write RUN/failure.json (whole or not at all) for the driver and for `StopOnFailure`."""
    from ..core.ray_session import first_line
    from ..core.storage import url_to_fs

    fs, path = url_to_fs(f"{run}/{FAILURE_FILE}")
    record = {"kind": type(error).__name__, "error": first_line(error), "rank": rank}
    with fs.open(f"{path}.{rank}.tmp", "w") as f:
        json.dump(record, f)
    fs.mv(f"{path}.{rank}.tmp", path)


def read_failure(run: str) -> dict[str, Any] | None:
    from ..core.storage import read_json, url_to_fs

    fs, path = url_to_fs(f"{run}/{FAILURE_FILE}")
    if not fs.exists(path):
        return None
    return read_json(fs, path, what=f"{run}/{FAILURE_FILE}")


def _stop_on_failure_callback():
    from ray.train import UserCallback

    class StopOnFailure(UserCallback):
        """Ends the run, instead of restarting its workers, once a worker has recorded a failure that
        retrying would repeat. (It runs in Ray Train's controller; an error raised here is one Ray
        Train does not retry. Should that change, a restarted worker still finds the record and
        returns at once, and the run ends all the same.)"""

        def __init__(self, run: str):
            self.run = run

        def after_exception(self, run_context, worker_exceptions):
            failure = read_failure(self.run)
            if failure:
                raise RuntimeError(f"{failure['kind']}: {failure['error']}")

    return StopOnFailure


def stop_on_failure(run: str):
    """A Ray Train callback for RUN (see `_stop_on_failure_callback`)."""
    return _stop_on_failure_callback()(run)


def _cursor(trained, lo: int, hi: int) -> int:
    """Where the rank owning [lo, hi) resumes: its first untrained block (hi when it is done)."""
    return min(trained.first_missing(lo), hi)


def _new_window() -> dict[str, float]:
    """Running sums between two reports."""
    return {"loss": 0.0, "kd": 0.0, "ce": 0.0, "micro": 0, "tokens": 0, "tokens_global": 0, "wait": 0.0,
            "t0": time.perf_counter()}


def guarded(body):
    """`body(config)` as a Ray Train loop whose failures that a retry would repeat are recorded
    first (module doc), and that returns at once when an earlier attempt of the run recorded one."""
    import functools

    @functools.wraps(body)
    def loop(config: dict[str, Any]) -> None:
        import ray.train

        run = config["run"]
        if read_failure(run):
            return  # the driver reports it
        try:
            body(config)
        except fatal_errors() as e:
            record_failure(run, e, ray.train.get_context().get_world_rank())
            raise

    return loop


def _train(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from transformers import get_cosine_schedule_with_warmup

    from ..core.errors import UserError
    from ..core.lm_head import LMHead
    from ..core.storage import read_json, url_to_fs
    from ..eval.metrics import heldout_sums, load_model, metrics_of
    from .blocks import Ranges, rank_range
    from .codec import IdOrder
    from .config import DistillConfig
    from .export import export_student
    from .outcome import DIAGNOSTIC, collapse, collapsed, wrecked

    cfg = DistillConfig(**config["cfg"])
    steps, run = config["steps"], config["run"]
    os.environ["PATH"] = own_build_tools_first(os.environ.get("PATH", ""))  # before DeepSpeed builds its op
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray pins a worker to its CPUs' worth of threads; a teacher on the same cores takes turns
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.workers)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if cuda else "cpu")

    model = load_model(cfg.student).train()  # fp32 master weights; bf16 compute on GPUs via DeepSpeed
    if cfg.activation_checkpointing if cfg.activation_checkpointing is not None else cuda:
        # keep each layer's input only, recompute the rest in backward: activations of a 3B student
        # at 8k tokens a micro-batch would otherwise outgrow its weights and optimizer state
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps(steps), steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(cfg, cuda=cuda), dist_init_required=False)

    state = {"step": 0, "tokens": 0, "trained": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
            # through the capped reader: the trained ranges are intervals, so it stays small at any size
            state = read_json(url_to_fs(d)[0], os.path.join(d, STATE_FILE), what=f"{STATE_FILE} of the checkpoint")
    step, tokens = state["step"], state["tokens"]
    trained = Ranges.of(state["trained"])  # every rank's, as of the checkpoint
    resumed_from = step

    vocab = int(engine.module.config.vocab_size)
    head = LMHead(engine)
    head.check()  # the split model (body, then the head a chunk at a time) gives the model's own logits
    val = config.get("val")
    if isinstance(val, list):  # the teacher's answers for them (stream.TeacherPool.requests), awaited only now
        from .stream import joined

        val = joined(val)
    order = IdOrder.of(config.get("order"))  # the stream's id order (codec.py)
    val_share = _val_share(val, rank, world, cfg.codec, order) if val else None

    def validate() -> dict[str, float]:
        if not val:
            return {}
        engine.eval()
        ids, mask, keep, targets = val_share
        # forward KL whatever the training loss: the one divergence every run reports alike.
        # Each rank validates its share, in micro-batches, and the sums are added over ranks.
        sums = heldout_sums(engine, ids, mask, batch_size=cfg.batch_size, keep=keep, targets=targets,
                            loss="forward_kl", temperature=cfg.temperature)
        engine.train()
        totals = torch.tensor([sums["nll"], sums["tokens"], sums["kd"], sums["kd_tokens"]], dtype=torch.float64,
                              device=device)
        dist.all_reduce(totals)
        m = metrics_of(dict(zip(("nll", "tokens", "kd", "kd_tokens"), totals.tolist())), kl=True)
        if not (math.isfinite(m["ppl"]) and math.isfinite(m["kl"])):  # the same on every rank: summed over all
            if step == resumed_from:
                raise UserError(f"the student {cfg.student if step == 0 else 'restored from the checkpoint'} gives "
                                f"non-finite outputs on the held-out blocks before training (weights holding "
                                f"inf or NaN?)")
            raise FloatingPointError(f"non-finite validation (perplexity {m['ppl']}, KL {m['kl']}) at step {step}")
        return {"val_ppl": m["ppl"], "val_kl": m["kl"]}

    def export(out: str) -> None:
        weights = (engine._zero3_consolidated_16bit_state_dict() if cfg.zero_stage == 3  # a collective
                   else engine.module.state_dict())
        if rank == 0:
            export_student(cfg.student, weights, out,
                           extra={"distill.yaml": cfg.to_yaml(),
                                  "distill_metrics.json": json.dumps({"steps": step, "tokens": tokens}, indent=1)})
        dist.barrier()

    source = config["source"]
    lo, hi = rank_range(source["lo"], source["hi"], world, rank)
    batches = fresh_batches(rank_stream(source, cfg, lo=lo, hi=hi, skip=trained, rank=rank, world=world),
                            trained, cfg.batch_size)
    recent: list[int] = []  # this rank's blocks since the last checkpoint
    finite = torch.ones(1, device=device)
    window = _new_window()
    logger = _Logger(run, rank == 0)
    if step == 0 and val:
        logger.log({"step": 0, "tokens": 0, **validate(), "time": time.time()})

    while step < steps:
        for _ in range(cfg.grad_accum):
            t = time.perf_counter()
            batch = next(batches, None)
            window["wait"] += time.perf_counter() - t
            if batch is None:
                raise RuntimeError(f"the teacher stream of rank {rank} ended at step {step} of {steps}: "
                                   f"blocks were lost (this is a bug)")
            loss, kd, ce = batch_loss(engine, batch, cfg, device, order)
            finite.fill_(float(math.isfinite(float(loss))))
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank stops together, none waits in backward
            if not finite.item():
                raise FloatingPointError(f"non-finite loss ({float(loss)} on rank {rank}) at step {step + 1}")
            engine.backward(loss)
            engine.step()
            recent.extend(int(i) for i in batch["block_index"])
            window["loss"] += float(loss)
            window["kd"] += kd
            window["ce"] += ce
            window["micro"] += 1
            window["tokens"] += int(batch["attention_mask"].sum())
        step += 1
        step_tokens = torch.tensor([window["tokens"]], dtype=torch.long, device=device)  # NCCL wants it there
        dist.all_reduce(step_tokens)
        tokens += int(step_tokens)  # over all workers
        window["tokens_global"] += int(step_tokens)
        window["tokens"] = 0
        save = step % cfg.checkpoint_every == 0 or step == steps
        if step % cfg.report_every and not save:
            continue
        elapsed = time.perf_counter() - window["t0"]
        metrics = {"step": step, "steps": steps, "tokens": tokens, "loss": window["loss"] / window["micro"],
                   "kd": window["kd"] / window["micro"], "ce": window["ce"] / window["micro"],
                   "lr": scheduler.get_last_lr()[0], "tok_per_s": window["tokens_global"] / elapsed,
                   "teacher_wait": window["wait"] / elapsed, "resumed_from": resumed_from, **validate(),
                   "time": time.time()}
        window = _new_window()
        logger.log(metrics)
        if "val_ppl" in metrics and collapsed(metrics["val_ppl"], vocab):  # no later step brings it back
            export(f"{run}/{DIAGNOSTIC}")
            raise wrecked(cfg, collapse(metrics["val_ppl"], step, vocab), steps)
        if not save:
            ray.train.report(metrics)
            continue
        gathered: list[list] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, Ranges.from_indices(recent).to_list())  # an interval or two a rank
        trained, recent = Ranges([p for g in gathered for p in g]) | trained, []
        state = {"step": step, "tokens": tokens, "trained": trained.to_list(),
                 "cursors": [_cursor(trained, *rank_range(source["lo"], source["hi"], world, r)) for r in range(world)]}
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=DS_TAG, save_latest=False)
            if rank == 0:
                with open(os.path.join(d, STATE_FILE), "w") as f:
                    json.dump(state, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"checkpoint-{step:08d}")

    export(f"{run}/student")


train_func = guarded(_train)
