"""What each Ray Train worker runs: `train_func(config)`, one DeepSpeed data-parallel student replica.

The worker never holds a teacher. It reads its own share of the teacher stream (blocks whose
position is its rank modulo the world size, so every rank has the same number of blocks left
after any resume and the ranks stay in lockstep), trains with DeepSpeed, and at every report
validates on held-out blocks and reports metrics; at every checkpoint it also saves the
DeepSpeed state (weights, optimizer, scheduler) and the set of blocks trained on, so a restarted
worker continues with exactly the blocks after the checkpoint and ends at the planned step.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import torch

TRAINED_FILE = "progress/trained.npy"  # in RUN: block indices trained as of an earlier checkpoint
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.json"
DS_TAG = "deepspeed"


def fresh_batches(shard, trained: np.ndarray, size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of exactly `size` rows of `shard` whose blocks are not in `trained`.

    Skipping here is what makes a resume exact: the pipeline drops most trained blocks before
    the teacher (from a file that may lag one checkpoint behind), this drops the rest.
    """
    pending: list[dict[str, np.ndarray]] = []
    have = 0
    for batch in shard.iter_batches(batch_size=size, batch_format="numpy", prefetch_batches=2):
        keep = ~np.isin(batch["block_index"], trained)
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
    from ..lm_head import LMHead
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
    from ..checkpoint import is_local, url_to_fs

    fs, path = url_to_fs(f"{run}/{METRICS_FILE}")
    line = json.dumps(row) + "\n"
    if is_local(fs):
        with open(path, "a") as f:
            f.write(line)
        return
    old = fs.cat_file(path).decode() if fs.exists(path) else ""
    with fs.open(path, "w") as f:
        f.write(old + line)


class _Logger:
    """Rank 0's record of every report: RUN/metrics.jsonl, and TensorBoard events when RUN is local."""

    def __init__(self, run: str, enabled: bool):
        from ..checkpoint import is_local, url_to_fs

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


def _save_trained(run: str, trained: np.ndarray) -> None:
    from ..checkpoint import url_to_fs

    fs, path = url_to_fs(f"{run}/{TRAINED_FILE}")
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path + ".tmp", "wb") as f:
        np.save(f, trained)
    fs.mv(path + ".tmp", path)


def _new_window() -> dict[str, float]:
    """Running sums between two reports."""
    return {"loss": 0.0, "kd": 0.0, "ce": 0.0, "micro": 0, "tokens": 0, "tokens_global": 0, "wait": 0.0,
            "t0": time.perf_counter()}


def train_func(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from transformers import get_cosine_schedule_with_warmup

    from ..evaluate import heldout_sums, load_model, metrics_of
    from ..lm_head import LMHead
    from .codec import IdOrder
    from .config import DistillConfig
    from .export import export_student

    cfg = DistillConfig(**config["cfg"])
    steps, run = config["steps"], config["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray pins a worker to its CPUs' worth of threads; on CPU the teacher is idle much of the time
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // cfg.workers))
    torch.manual_seed(cfg.seed)
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if cuda else "cpu")

    model = load_model(cfg.student).train()  # fp32 master weights; bf16 compute on GPUs via DeepSpeed
    if cfg.activation_checkpointing if cfg.activation_checkpointing is not None else cuda:
        # keep each layer's input only, recompute the rest in backward: activations of a 3B student
        # at 8k tokens a micro-batch would otherwise outgrow its weights and optimizer state
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup * steps), steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(cfg, cuda=cuda), dist_init_required=False)

    state = {"step": 0, "tokens": 0, "trained": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
            with open(os.path.join(d, STATE_FILE)) as f:
                state = json.load(f)
    step, tokens = state["step"], state["tokens"]
    trained = np.asarray(sorted(state["trained"]), dtype=np.int64)
    resumed_from = step

    head = LMHead(engine)
    head.check()  # the split model (body, then the head a chunk at a time) gives the model's own logits
    val = config.get("val")
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
        return {"val_ppl": m["ppl"], "val_kl": m["kl"]}

    shard = ray.train.get_dataset_shard(f"train_{rank}")
    batches = fresh_batches(shard, trained, cfg.batch_size)
    new_blocks: list[int] = []  # this rank's blocks of the current step
    recent: list[int] = []  # every rank's blocks since the last checkpoint
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
            if not math.isfinite(float(loss)):
                raise FloatingPointError(f"non-finite loss {float(loss)} at step {step}")
            engine.backward(loss)
            engine.step()
            new_blocks.extend(int(i) for i in batch["block_index"])
            window["loss"] += float(loss)
            window["kd"] += kd
            window["ce"] += ce
            window["micro"] += 1
            window["tokens"] += int(batch["attention_mask"].sum())
        step += 1
        gathered: list[list[int]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, new_blocks)
        new_blocks = []
        recent.extend(i for g in gathered for i in g)
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
        if not save:
            ray.train.report(metrics)
            continue
        previous = state["trained"]
        trained, recent = np.union1d(trained, np.asarray(recent, dtype=np.int64)), []
        state = {"step": step, "tokens": tokens, "trained": trained.tolist()}
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=DS_TAG, save_latest=False)
            if rank == 0:
                with open(os.path.join(d, STATE_FILE), "w") as f:
                    json.dump(state, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"checkpoint-{step:08d}")
        if rank == 0:  # one checkpoint behind: never ahead of the checkpoint a restart restores
            _save_trained(run, np.asarray(previous, dtype=np.int64))

    weights = (engine._zero3_consolidated_16bit_state_dict() if cfg.zero_stage == 3
               else engine.module.state_dict())
    if rank == 0:
        export_student(cfg.student, weights, f"{run}/student",
                       extra={"distill.yaml": cfg.to_yaml(),
                              "distill_metrics.json": json.dumps({"steps": step, "tokens": tokens}, indent=1)})
    dist.barrier()
