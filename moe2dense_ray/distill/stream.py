"""The teacher as a service: token blocks in, the teacher's compact distribution per token out.

A distillation's teacher replicas are Ray actors (`TeacherPool`) that outlive its training
workers; each worker sends them its own blocks, a few requests ahead (worker.rank_stream).
`teacher-logits` runs the same service as a Ray Data actor pool over the text and writes the
stream as Parquet (`write_stream`); `read_blocks` reads it back a row group at a time. Every
block carries its global `block_index`: a resumed run skips what it has trained on, and the same
index seeds the sampled codec, so online and offline streams are identical.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator, Literal, Optional

import numpy as np
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
)

from ..core.errors import UserError
from .blocks import Blocks

STREAM_META = "stream.json"  # what a LOGITS directory holds besides its Parquet files


def pack_blocks(data: str, tokenizer, *, blocks: int, seq_len: int, seed: int, text_field: str,
                first_index: int = 0, shuffle: bool = True) -> Blocks:
    """`blocks` packed blocks of `data` (the same packing as calibration), indexed from `first_index`;
    without `shuffle`, the first blocks of the text in file order (a held-out set anyone can rebuild)."""
    from ..core.data import calibration_blocks

    cal = calibration_blocks(data, tokenizer, samples=blocks, seq_len=seq_len, seed=seed, text_field=text_field,
                             **({} if shuffle else {"shuffle_buffer": 1}))
    n = cal.num_samples
    return Blocks(np.arange(first_index, first_index + n, dtype=np.int64),
                  cal.input_ids.numpy().astype(np.int32), cal.attention_mask.numpy().astype(np.int8))


def blocks_dataset(b: Blocks, *, rows_per_block: int = 8):
    """A Ray dataset of token blocks, one row per block, in Ray Data blocks of `rows_per_block` rows."""
    import ray

    items = [{"block_index": b.index[i], "input_ids": b.input_ids[i], "attention_mask": b.attention_mask[i]}
             for i in range(len(b))]
    return ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // rows_per_block)))


class TeacherService:
    """One teacher replica (a Ray Data actor): a batch of blocks gains the teacher's `t_*` columns.

    The replica is loaded once per actor (bf16 on its GPUs, sharded over them when it holds
    several; fp32 on CPU). Its body runs once per batch; the LM head, the softmax and the codec
    then run a chunk of rows at a time (`lm_head.rows_per_chunk`), so beyond the model's own
    activations the replica holds one chunk's logits, never the batch's [tokens x vocabulary].
    Columns come back shaped [blocks, seq_len, ...] so a row stays a block.
    """

    def __init__(self, teacher: str, *, codec: str, top_k: int, draws: int, temperature: float, seed: int,
                 threads: int | None = None, order: dict | None = None, model=None):
        from ..core.lm_head import LMHead
        from ..core.models import load_causal_lm
        from .codec import CODECS, IdOrder

        if threads:
            torch.set_num_threads(threads)
        if model is None:
            self.model, _, self.device = load_causal_lm(teacher)
        else:  # a model already in memory (bench/gpu_scale.py: random weights at the real shape)
            self.model, self.device = model.eval(), next(model.parameters()).device
        self.head = LMHead(self.model)
        self.head.check()
        self.rows = self.head.rows()
        self.codec = CODECS[codec]
        self.opts = dict(k=draws if codec == "sampled" else top_k, temperature=temperature, order=IdOrder.of(order))
        self.seed = seed

    def _encode(self, hidden: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
        """Rows of hidden states [N, H] -> the codec's columns [N, ...], a chunk of rows at a time."""
        parts = [self.codec.encode(self.head.logits(hidden[s:s + self.rows]), generator=generator, **self.opts)
                 for s in range(0, hidden.shape[0], self.rows)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=self.device)
        mask = torch.as_tensor(batch["attention_mask"], dtype=torch.long, device=self.device)
        B, S = ids.shape
        hidden = self.head.hidden(ids, mask)
        if not self.codec.seeded:  # top-k is deterministic: the whole batch's rows in one sequence of chunks
            cols = self._encode(hidden.reshape(B * S, -1))  # (on a GPU a per-block loop was 50-96% of the time)
            return {**batch, **{k: v.reshape(B, S, *v.shape[1:]) for k, v in cols.items()}}
        per_block = []
        for i in range(B):  # per block: the sampled codec draws from a generator seeded by its index
            gen = torch.Generator(device=hidden.device).manual_seed(self.seed * 1_000_003 + int(batch["block_index"][i]))
            per_block.append(self._encode(hidden[i], gen))
        out = dict(batch)
        for name in per_block[0]:
            out[name] = np.stack([cols[name] for cols in per_block])
        return out


def _teacher_gpus(cfg) -> float:
    import ray

    if cfg.gpus_per_teacher is not None:
        return cfg.gpus_per_teacher
    return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0


def _service_kwargs(teacher: str, cfg, order: dict | None) -> dict[str, Any]:
    return dict(teacher=teacher, codec=cfg.codec, top_k=cfg.top_k, draws=cfg.draws, temperature=cfg.temperature,
                seed=cfg.seed, threads=max(1, round(cfg.cpus_per_teacher)), order=order)


class TeacherPool:
    """The teacher replicas of one distillation: Ray actors owned by the driver, for the whole run.

    Not by a training worker: when Ray Train restarts its worker group (a lost node, a preempted
    spot instance) the new workers send their blocks to the same replicas, already loaded, where a
    pool inside each worker's data pipeline would die with it and load ~61 GB again. A replica
    whose own process dies is restarted by Ray and the requests it held are sent again
    (`max_task_retries`), so the stream loses nothing; its restarts share the run's failure budget.

    The id order goes to the replicas as an object this pool puts and holds for the run: at a
    151,936-token vocabulary it is a few hundred KB, which Ray passes through the object store
    and, once the replicas have started, frees; a replica restarted after that fails to start
    (ray-project/ray#53727). Held here, every restart reads it again.
    """

    def __init__(self, teacher: str, cfg, *, order: dict | None = None, restarts: int = -1):
        import uuid

        import ray

        from ..core.ray_session import CPU_SHARING_ENV

        options = dict(num_cpus=cfg.cpus_per_teacher, num_gpus=_teacher_gpus(cfg), max_restarts=restarts,
                       max_task_retries=-1, runtime_env={"env_vars": CPU_SHARING_ENV}, **({"resources": dict(cfg.teacher_resources)} if cfg.teacher_resources else {}))
        actor, tag = ray.remote(TeacherService), uuid.uuid4().hex[:8]
        self._order = ray.put(order)
        kwargs = {**_service_kwargs(teacher, cfg, None), "order": self._order}
        self.replicas = [actor.options(name=f"teacher-{tag}-{i}", **options).remote(**kwargs)
                         for i in range(cfg.teacher_workers)]
        self.batch = cfg.teacher_batch

    def requests(self, blocks: Blocks) -> list:
        """The teacher's columns of a few blocks (the held-out ones) as Ray object references, one
        per teacher batch, sent round-robin now: the replicas load and compute while the training
        workers start, which read them with `joined`."""
        return [self.replicas[i % len(self.replicas)].__call__.remote(
                {"block_index": blocks.index[s:s + self.batch], "input_ids": blocks.input_ids[s:s + self.batch],
                 "attention_mask": blocks.attention_mask[s:s + self.batch]})
                for i, s in enumerate(range(0, len(blocks), self.batch))]

    def columns(self, blocks: Blocks) -> dict[str, np.ndarray]:
        """The teacher's columns of a few blocks, in order."""
        return joined(self.requests(blocks))

    def close(self) -> None:
        import ray

        for r in self.replicas:
            ray.kill(r, no_restart=True)


def joined(parts) -> dict[str, np.ndarray]:
    """Batches of columns (or Ray references to them) -> one batch, in order."""
    import ray

    parts = [ray.get(p) if isinstance(p, ray.ObjectRef) else p for p in parts]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def replica_share(replicas: list, rank: int, world: int) -> list:
    """Rank `rank`'s teacher replicas: its own 1/world of them when they divide evenly, else all of
    them, starting at a different one per rank."""
    n = len(replicas)
    if n % world == 0:
        return replicas[rank::world]
    return [replicas[(rank + i) % n] for i in range(n)]


def teacher_batches(batches, replicas: list, *, depth: int = 2):
    """Batches of blocks -> the same batches with the teacher's columns, in order, sent round-robin
    to `replicas` with up to `depth` requests per replica in flight: enough that the teacher never
    idles while the caller trains on the last answer, few enough that it never runs further ahead
    (on a shared node it would only take cores from the student)."""
    import collections

    import ray

    pending: collections.deque = collections.deque()
    for i, batch in enumerate(batches):
        pending.append(replicas[i % len(replicas)].__call__.remote(batch))
        if len(pending) >= depth * len(replicas):
            yield ray.get(pending.popleft())
    while pending:
        yield ray.get(pending.popleft())


def prefetched(items, depth: int = 2):
    """`items`, produced by a background thread up to `depth` ahead (text packed while the
    student trains: tokenizers release the GIL). Its errors are raised here, in order."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False  # the consumer has gone

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    thread = threading.Thread(target=produce, daemon=True, name="prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def teacher_stream(ds, *, teacher: str, cfg, replicas: int | None = None, order: dict | None = None):
    """`ds` of blocks -> a pool of `replicas` teacher actors (default `cfg.teacher_workers`) -> the
    same blocks with the teacher's `t_*` columns (ids coded in `order`, a `codec.frequency_order`
    record, when given). For `teacher-logits`, whose pool lives as long as its one pass; a
    distillation's teachers are a `TeacherPool`."""
    import ray

    gpus = _teacher_gpus(cfg)
    # Ray Data merges what a task yields into blocks of up to 128 MiB before handing any on: the
    # student would wait for a whole shard's blocks to be packed, then to pass the teacher. Blocks
    # of about one teacher batch's output keep the stream flowing a batch at a time.
    entries = cfg.draws if cfg.codec == "sampled" else cfg.top_k
    ds.context.target_max_block_size = max(1 << 20, cfg.teacher_batch * cfg.seq_len * (3 * entries + 16))
    return ds.map_batches(
        TeacherService,
        fn_constructor_kwargs=_service_kwargs(teacher, cfg, order),
        batch_size=cfg.teacher_batch, batch_format="numpy", num_cpus=cfg.cpus_per_teacher, num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(size=replicas or cfg.teacher_workers),
        **({"resources": dict(cfg.teacher_resources)} if cfg.teacher_resources else {}),
    )


# -- offline streams (LOGITS) -------------------------------------------------------------------


def stream_meta(cfg, *, teacher: str, vocab_size: int, blocks: int, tokens: int, tokenizer: str) -> dict[str, Any]:
    """What a stream was made with: a student can only train on a stream of its vocabulary, etc."""
    return {"teacher": teacher, "vocab_size": vocab_size, "tokenizer": tokenizer, "codec": cfg.codec, "top_k": cfg.top_k,
            "draws": cfg.draws, "temperature": cfg.temperature, "seq_len": cfg.seq_len, "seed": cfg.seed,
            "data": cfg.data, "blocks": blocks, "tokens": tokens}


class StreamMeta(BaseModel):
    """What `distill --logits` reads of stream.json, typed: a damaged file is one line naming the
    key, not a KeyError after Ray has started. Other keys (the id order, provenance) pass through."""

    model_config = ConfigDict(extra="allow")

    vocab_size: PositiveInt
    codec: Literal["topk", "sampled"]
    top_k: PositiveInt
    draws: PositiveInt
    temperature: PositiveFloat
    seq_len: int = Field(ge=2)
    blocks: PositiveInt
    val_blocks: NonNegativeInt
    tokenizer: Optional[str] = None


def read_stream_meta(logits: str) -> dict[str, Any]:
    """LOGITS/stream.json through the capped reader (a FIFO, a device or a huge file is refused,
    never read forever), checked against `StreamMeta`."""
    from ..core.storage import read_json, url_to_fs

    fs, path = url_to_fs(logits)
    meta_path = f"{path}/{STREAM_META}"
    if not fs.exists(meta_path):
        raise UserError(f"{logits} is not a teacher stream (no {STREAM_META}; write one with "
                        f"`moe2dense teacher-logits`)")
    where = f"{logits.rstrip('/')}/{STREAM_META}"
    meta = read_json(fs, meta_path, what=where)
    try:
        StreamMeta.model_validate(meta)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"{where}: {'.'.join(str(x) for x in err['loc'])}: {err['msg']} (a damaged stream, or "
                        f"not one `moe2dense teacher-logits` wrote)") from None
    return meta


@contextlib.contextmanager
def _blocks_written(fs, path: str, blocks: int, enabled: bool, every: float | None = None):
    """A bar over the blocks of the stream's Parquet files in `path` while Ray Data writes them.

    Ray Data's own progress is per operator, and off a terminal (`ray job logs`, a log file) it
    goes to its logger, which a default run keeps quiet: a default run showed nothing. The write
    tasks put each file in `path` when its blocks are through the teacher; a thread counts the
    rows in the footers of the files that have one (a file still being written has none yet):
    one listing (past fsspec's listings cache) every `every` seconds (default 2 s, 10 s in an
    object store: a 4B-token stream is some 5,000 files, 5 LIST requests), and one footer read
    per new file. Yields the bar (None when not `enabled`); it ends full once the write returns."""
    if not enabled:
        yield None
        return
    import threading

    import pyarrow.parquet as pq

    from ..core.progress import Progress
    from ..core.storage import is_local

    bar, counted, stop = Progress(blocks, "teacher-logits", unit="block"), set(), threading.Event()
    interval = every or (2.0 if is_local(fs) else 10.0)

    def poll() -> None:
        while not stop.wait(interval):
            try:
                fs.invalidate_cache(path)
                names = [n for n in fs.ls(path, detail=False) if n.endswith(".parquet") and n not in counted]
            except Exception:  # noqa: BLE001 - not made yet, or the store answered badly: the next poll
                continue
            for name in names:
                try:
                    with fs.open(name, "rb") as f:
                        rows = pq.ParquetFile(f).metadata.num_rows
                except Exception:  # noqa: BLE001 - still being written: no footer yet
                    continue
                counted.add(name)
                bar.update(rows)

    thread = threading.Thread(target=poll, daemon=True, name="stream-bar")
    thread.start()
    written = False
    try:
        yield bar
        written = True
    finally:
        stop.set()
        thread.join(timeout=10)  # no count after the last one below
        if written:
            bar.update(max(0, blocks - bar.n))  # whatever the last poll missed
        bar.close()


def write_stream(ds, logits: str, meta: dict[str, Any], *, overwrite: bool, sources: tuple[str, ...],
                 progress: bool = False) -> None:
    """Write the stream as Parquet next to LOGITS, then swap it into place (never half-written;
    core/storage.py has the guarantees); with `progress`, a bar over the blocks written."""
    from ..core.storage import (
        OutputLock,
        check_output,
        clean_leftovers,
        discard,
        is_local,
        partial_name,
        swap_in,
        url_to_fs,
    )

    check_output(logits, what="logits", overwrite=overwrite, sources=sources)
    fs, path = url_to_fs(logits)
    with OutputLock(logits):
        clean_leftovers(fs, path)
        tmp = partial_name(path)
        try:
            from .codec import PARQUET_OPTIONS

            with _blocks_written(fs, tmp, int(meta["blocks"]), progress):
                ds.write_parquet(tmp, filesystem=None if is_local(fs) else arrow_fs(fs), **PARQUET_OPTIONS)
            with fs.open(f"{tmp}/{STREAM_META}", "w") as f:
                json.dump(meta, f, indent=1)
            swap_in(fs, tmp, path, overwrite=overwrite)
        finally:
            discard(fs, tmp)


def check_stream_files(logits: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Every Parquet file of LOGITS has a whole footer, and their rows add up to the blocks that
    stream.json records: a truncated or missing file is one line naming it, read from the footers
    alone in seconds, not an Arrow error minutes into training. Returns the stream's index (from
    the same footers) for `read_blocks`."""
    index = _row_groups(logits)
    if index["rows"] != int(meta["blocks"]):
        raise UserError(f"{logits} holds {index['rows']} blocks in {len(index['files'])} Parquet file(s), but its "
                        f"{STREAM_META} records {meta['blocks']}: a file is missing or extra; write the stream again")
    return {"files": index["files"], "groups": index["groups"]}


def _row_groups(logits: str) -> dict[str, Any]:
    """The index of LOGITS from its Parquet footers: the file names, and per row group one row
    (first block, last block, file number, row group) of an int64 array sorted by first block,
    32 bytes a row group (a 4B-token stream of ~250k row groups: ~8 MB beside its file names);
    and the rows of all files."""
    import pyarrow.parquet as pq

    from ..core.storage import url_to_fs

    fs, path = url_to_fs(logits)
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    groups, rows = [], 0
    for i, name in enumerate(files):
        try:
            with fs.open(name, "rb") as f:
                parquet = pq.ParquetFile(f)
                meta = parquet.metadata
                rows += meta.num_rows
                column = meta.schema.to_arrow_schema().get_field_index("block_index")
                for g in range(meta.num_row_groups):
                    stats = meta.row_group(g).column(column).statistics
                    if stats is not None and stats.has_min_max:
                        first, last = int(stats.min), int(stats.max)
                    else:  # a writer that kept no statistics: read the index column itself
                        idx = parquet.read_row_group(g, columns=["block_index"]).column(0).to_numpy()
                        if not len(idx):
                            continue
                        first, last = int(idx.min()), int(idx.max())
                    groups.append((first, last, i, g))
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError... for a damaged file
            raise UserError(f"{logits}: {name.rsplit('/', 1)[-1]} is not a whole Parquet file "
                            f"({' '.join(str(e).split())[:200]}): the stream is damaged; write it again with "
                            f"`moe2dense teacher-logits`") from None
    table = np.array(sorted(groups), dtype=np.int64).reshape(-1, 4)
    return {"files": files, "groups": table, "rows": rows}


def read_blocks(logits: str, lo: int, hi: int, *, skip=None, rows: int = 64,
                index: dict[str, Any] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The blocks lo <= index < hi of the stream LOGITS minus `skip` (a `blocks.Ranges`), as numpy
    batches of up to `rows` blocks, in block order.

    Read here, with pyarrow through the stream's fsspec filesystem, a row group at a time: the
    Parquet footers say which row groups hold which blocks (`block_index` statistics), so a
    training worker reads its own share and nothing else, and the driver only the held-out
    blocks. The driver reads the footers once (`check_stream_files`) and hands the `index` to
    the workers: 24 workers do not each read thousands of footers from object storage. A Ray
    Data pipeline here started worker processes and read tasks before the first block came: 35 s
    of a 60 s run (`docs/architecture.md`, "Exact resume"), and a whole read of the stream for
    the driver's few held-out blocks. Row groups whose ranges overlap (a writer that did not keep
    order) are read together and sorted, so the order is the blocks' whatever the files' order."""
    from ..core.storage import url_to_fs

    fs, _ = url_to_fs(logits)
    index = index or _row_groups(logits)
    table = np.asarray(index["groups"]).reshape(-1, 4)
    groups = [(int(a), int(b), index["files"][int(f)], int(g))
              for a, b, f, g in table[(table[:, 0] < hi) & (table[:, 1] >= lo)]]
    runs: list[list[tuple]] = []  # row groups whose block ranges overlap, read together
    end = -1
    for group in groups:
        if runs and group[0] <= end:
            runs[-1].append(group)
        else:
            runs.append([group])
        end = max(end, group[1])
    for run in runs:
        parts = [_decoded(fs, name, g, lo=lo, hi=hi, skip=skip) for _, _, name, g in run]
        batch = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(batch["block_index"], kind="stable")
        for i in range(0, len(order), rows):
            take = order[i:i + rows]
            yield {k: v[take] for k, v in batch.items()}


def _decoded(fs, name: str, group: int, *, lo: int, hi: int, skip) -> dict[str, np.ndarray]:
    """One row group's rows of lo <= block_index < hi outside `skip`, as numpy arrays shaped as
    they were written (Ray Data stores an array column as a flat list with its shape beside it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with fs.open(name, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(group)
    except (OSError, ValueError, pa.ArrowException) as e:  # a page that does not decompress or decode
        raise UserError(f"{name}: row group {group} cannot be read ({' '.join(str(e).split())[:200]}): the "
                        f"stream is damaged; write it again with `moe2dense teacher-logits`") from None
    idx = table.column("block_index").to_numpy()
    keep = (idx >= lo) & (idx < hi)
    if skip is not None:
        keep &= ~skip.contains(idx)
    out = {}
    for field, column in zip(table.schema, table.columns):
        chunk = column.combine_chunks()
        if isinstance(chunk.type, pa.ExtensionType):  # Ray's tensor type, registered when Ray is imported
            shape, chunk = tuple(chunk.type.shape), chunk.storage
        else:
            shape = tuple(json.loads((field.metadata or {}).get(b"ARROW:extension:metadata", b"[]")))
        if pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
            values = chunk.flatten().to_numpy(zero_copy_only=False)
            array = values.reshape(len(chunk), *(shape or (-1,)))
        else:
            array = chunk.to_numpy(zero_copy_only=False)
        out[field.name] = array[keep]
    return out


def arrow_fs(fs):
    """pyarrow's view of an fsspec filesystem, for Ray Data's Parquet reader and writer."""
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


__all__ = ["Blocks", "pack_blocks", "blocks_dataset", "TeacherService", "TeacherPool", "joined", "replica_share", "teacher_batches", "prefetched", "teacher_stream",
           "stream_meta", "read_stream_meta", "check_stream_files", "write_stream", "read_blocks"]
