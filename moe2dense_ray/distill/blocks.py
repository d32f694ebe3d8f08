"""Training text as token blocks, made on the cluster as training goes.

A distillation of 4B tokens cannot tokenize its text on the driver first (60 bytes and ~1.4 us a
token: 240 GB and an hour and a half before the first step). Here the driver only *plans*, in
time and memory that do not depend on --tokens beyond a list of file pieces:

* **Shards.** DATA's files in sorted order, cut into pieces of about `SHARD_BYTES`: byte ranges of
  uncompressed text and JSON lines (a line belongs to the range its first byte lies in), row-group
  ranges of Parquet, other files (compressed ones) whole; only as many as the blocks asked for.
* **Quotas.** Each shard is given a number of blocks from its size and a tokens-per-byte density
  sampled from the first file of its kind (a file read whole by the sample is counted exactly),
  divided by `SAFETY`: shards nearly always hold more text than their quota.
* **Indices.** Shards are taken in a seeded shuffled order, and shard s's blocks get the global
  indices `offset_s .. offset_s + quota_s - 1`: dense, known before any text is read, the same on
  every run. So rank ownership, resume (trained blocks skipped), validation (the first blocks)
  and offline/online equality work on indices exactly as they would on a list of blocks.

Packing (`pack_shard`) runs in Ray Data tasks on the cluster's CPUs: a shard's documents in a
seeded buffered shuffle, packed as calibration packs them, cut at its quota; a shard whose text
runs out first continues with the text of the shards after it in file order (so every block is
full; such text is then seen twice, which the safety margin makes rare). Each rank's pipeline
packs only the shards that hold its blocks, one task at a time, ahead of the teacher.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..core.errors import UserError

SHARD_BYTES = 16 << 20
"""Bytes of a splittable file per shard: ~4M tokens, a few seconds of one CPU to pack."""

SAFETY = 1.15
"""Quotas are the estimated blocks divided by this: a shard's text rarely runs out."""

SAMPLE_CHARS = 1 << 20
"""Characters of text read (from the first file of each kind) to estimate tokens per byte."""

ROWS_PER_BATCH = 32
"""Blocks per batch a packing task hands to Ray Data."""

SHUFFLE_BUFFER = 1000
"""Documents in a shard's shuffle buffer."""


@dataclass
class Blocks:
    """Token blocks with their global indices: `input_ids`/`attention_mask` are [n, seq_len]."""

    index: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def take(self, rows: np.ndarray | slice) -> "Blocks":
        return Blocks(self.index[rows], self.input_ids[rows], self.attention_mask[rows])

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass(frozen=True)
class Shard:
    """A file, or one of its `core.data.pieces` (the lines that start in bytes [start, end), or Parquet
    row groups [start, end)); its blocks are the global indices [offset, offset + quota)."""

    order: int  # position in file order (for what comes next when a shard's text runs out)
    url: str
    start: int
    end: int | None
    quota: int
    offset: int


@dataclass(frozen=True)
class TextPlan:
    """Where each block of DATA comes from. Small: a few fields per shard."""

    data: str
    text_field: str
    seq_len: int
    seed: int
    shards: tuple[Shard, ...]  # in index order

    @property
    def blocks(self) -> int:
        return self.shards[-1].offset + self.shards[-1].quota - self.shards[0].offset if self.shards else 0

    @property
    def first(self) -> int:
        return self.shards[0].offset if self.shards else 0

    def holding(self, lo: int, hi: int) -> list[Shard]:
        """The shards that hold blocks with lo <= index < hi, in index order."""
        return [s for s in self.shards if s.offset < hi and s.offset + s.quota > lo]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextPlan:
        return cls(**{**d, "shards": tuple(Shard(**s) for s in d["shards"])})


# -- planning (the driver) ------------------------------------------------------------------------


def plan_text(data: str, tokenizer, *, blocks: int, seq_len: int, seed: int, text_field: str,
              first_index: int = 0) -> TextPlan:
    """Shards of DATA holding about `blocks` blocks (fewer if DATA is smaller), indexed from
    `first_index`. Reads file listings and one sample per kind of file, never the whole text."""
    from ..core.data import is_hub_dataset, pieces, resolve_files, sample_density
    from ..core.storage import is_local

    if is_hub_dataset(data):  # no sizes to plan with: one shard, packed in order
        return TextPlan(data, text_field, seq_len, seed,
                        (Shard(0, data, 0, None, blocks, first_index),))
    fs, files = resolve_files(data)
    density: dict[str, tuple[float, int | None]] = {}
    parts: list[tuple[str, int, int | None, int]] = []  # (url, start, end, quota)
    total = 0
    for path in files:
        kind = path.rsplit("/", 1)[-1].lower().split(".", 1)[-1]
        exact = None
        if kind not in density:  # the first file of its kind is sampled (and counted, if small)
            density[kind] = sample_density(fs, path, tokenizer, text_field, SAMPLE_CHARS)
            exact = density[kind][1]
        per_byte = density[kind][0]
        url = path if is_local(fs) else fs.unstrip_protocol(path)
        cut = pieces(fs, path, SHARD_BYTES)
        if exact is not None and len(cut) == 1:
            ranges = [(0, None, exact // seq_len)]  # a small file, counted: its exact number of blocks
        else:
            ranges = [(a, b, int(per_byte * n / seq_len / SAFETY)) for a, b, n in cut]
        for start, end, quota in ranges:
            if quota > 0:
                parts.append((url, start, end, quota))
                total += quota
        if total >= blocks:
            break
    if not parts:
        raise UserError(f"{data} holds less than one block of {seq_len} tokens")
    order = list(range(len(parts)))
    random.Random(seed).shuffle(order)
    shards, offset = [], first_index
    for i in order:
        url, start, end, quota = parts[i]
        quota = min(quota, first_index + blocks - offset)
        if quota <= 0:
            continue
        shards.append(Shard(i, url, start, end, quota, offset))
        offset += quota
    return TextPlan(data, text_field, seq_len, seed, tuple(shards))


# -- packing (Ray Data tasks) -----------------------------------------------------------------------


def _docs(shard: Shard, text_field: str) -> Iterator[str]:
    from ..core.data import file_docs, is_hub_dataset, load_texts
    from ..core.storage import url_to_fs

    if is_hub_dataset(shard.url):
        return load_texts(shard.url, text_field=text_field)
    fs, path = url_to_fs(shard.url)
    return file_docs(fs, path, text_field, shard.start, shard.end)


def _shuffled(docs: Iterator[str], seed: int) -> Iterator[str]:
    """A seeded buffered shuffle of one shard's documents (a shard is one slice of the corpus)."""
    rng = random.Random(seed)
    pool: list[str] = []
    for doc in docs:
        if len(pool) < SHUFFLE_BUFFER:
            pool.append(doc)
            continue
        j = rng.randrange(len(pool))
        yield pool[j]
        pool[j] = doc
    rng.shuffle(pool)
    yield from pool


def pack_shard(plan: TextPlan, shard: Shard, tokenizer, *, lo: int = 0, hi: int | None = None,
               skip: "Ranges | None" = None, rows: int = ROWS_PER_BATCH) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the shard's blocks with lo <= index < hi, minus the indices in `skip`.

    Always packs from the shard's start (an index is a position in its packing), but stops at
    `hi`: a rank whose range ends inside a shard reads no further than it needs.
    """
    from ..core.data import pack_rows

    by_order = sorted(plan.shards, key=lambda s: s.order)
    after = [s for s in by_order if s.order > shard.order] + [s for s in by_order if s.order < shard.order]
    docs = itertools.chain(_shuffled(_docs(shard, plan.text_field), plan.seed * 1_000_003 + shard.order),
                           *(_docs(s, plan.text_field) for s in after))  # continued text: rare, see SAFETY
    hi = shard.offset + shard.quota if hi is None else min(hi, shard.offset + shard.quota)
    want = max(0, hi - shard.offset)
    out: list[tuple[int, list[int]]] = []
    for pos, (ids, _) in enumerate(pack_rows(docs, tokenizer, seq_len=plan.seq_len, blocks=want, pad_last=False)):
        index = shard.offset + pos
        if index >= lo and not (skip is not None and skip.contains(np.asarray([index]))[0]):
            out.append((index, ids))
        if len(out) == rows:
            yield _batch(out, plan.seq_len)
            out = []
    if out:
        yield _batch(out, plan.seq_len)


def _batch(rows: list[tuple[int, list[int]]], seq_len: int) -> dict[str, np.ndarray]:
    return {"block_index": np.asarray([i for i, _ in rows], dtype=np.int64),
            "input_ids": np.asarray([ids for _, ids in rows], dtype=np.int32),
            "attention_mask": np.ones((len(rows), seq_len), dtype=np.int8)}


def iter_blocks(plan: TextPlan, tokenizer, *, lo: int, hi: int, skip: Ranges | None = None,
                rows: int = ROWS_PER_BATCH) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `rows` blocks with lo <= index < hi, minus those in `skip` (a resumed run's
    trained blocks), in index order. A resumed rank starts at its cursor: the shards before it
    are not read, nor any shard trained as a whole."""
    skip = skip or Ranges()
    lo = skip.first_missing(lo)
    shards = plan.holding(lo, hi)
    if not shards and lo < hi:
        raise ValueError(f"no shard of the plan holds blocks {lo}..{hi}")
    for shard in shards:
        a, b = max(lo, shard.offset), min(hi, shard.offset + shard.quota)
        if skip.first_missing(a) >= b:
            continue
        yield from pack_shard(plan, shard, tokenizer, lo=lo, hi=hi, skip=skip if skip.pairs else None, rows=rows)


def _pack_task(batch: dict[str, np.ndarray], *, plan: dict[str, Any], tokenizer, lo: int, hi: int,
               skip: list, rows: int) -> Iterator[dict[str, np.ndarray]]:
    text = TextPlan.from_dict(plan)
    for spec in batch["shard"]:
        shard = Shard(**json.loads(str(spec)))
        yield from iter_blocks(text, tokenizer, lo=max(lo, shard.offset), hi=min(hi, shard.offset + shard.quota),
                               skip=Ranges(skip), rows=rows)


def text_blocks(plan: TextPlan, tokenizer, *, lo: int, hi: int, skip: Ranges | None = None,
                rows: int = ROWS_PER_BATCH):
    """`iter_blocks` as a Ray dataset (for `teacher-logits`, whose teacher pool is a Ray Data
    stage), packed by one Ray Data task at a time, a shard each (packing outruns any teacher, and
    a second task would only compete with the teacher for the node's cores), that hands over
    `rows` blocks at a time (the teacher's batch: it starts on the first one)."""
    import ray

    skip = skip or Ranges()
    lo = skip.first_missing(lo)
    shards = plan.holding(lo, hi)
    if not shards:
        raise ValueError(f"no shard of the plan holds blocks {lo}..{hi}")
    items = [{"shard": json.dumps(dataclasses.asdict(s))} for s in shards]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _pack_task, batch_size=1, batch_format="numpy", num_cpus=0.1, compute=ray.data.TaskPoolStrategy(size=1),
        fn_kwargs=dict(plan=plan.to_dict(), tokenizer=tokenizer, lo=lo, hi=hi, skip=skip.to_list(), rows=rows))


def local_blocks(plan: TextPlan, tokenizer, *, lo: int, hi: int):
    """The blocks lo <= index < hi packed here (the held-out blocks: few, and needed by the driver)."""

    parts = [b for s in plan.holding(lo, hi) for b in pack_shard(plan, s, tokenizer, lo=lo, hi=hi)]
    if not parts:
        return Blocks(np.zeros(0, np.int64), np.zeros((0, plan.seq_len), np.int32), np.zeros((0, plan.seq_len), np.int8))
    return Blocks(*(np.concatenate([p[k] for p in parts]) for k in ("block_index", "input_ids", "attention_mask")))


def sample_ids(plan: TextPlan, tokenizer) -> np.ndarray:
    """Token ids of the first `SAMPLE_CHARS` characters of the plan's first shard (in file order):
    enough text to rank the frequent tokens (`codec.frequency_order`)."""
    from ..core.data import pack_rows

    first = min(plan.shards, key=lambda s: s.order)
    docs, chars = [], 0
    for doc in _docs(first, plan.text_field):
        docs.append(doc)
        chars += len(doc)
        if chars >= SAMPLE_CHARS:
            break
    rows = [ids[:real] for ids, real in pack_rows(iter(docs), tokenizer, seq_len=4096, blocks=1 << 40)]
    return np.asarray([t for r in rows for t in r], dtype=np.int64)


class Ranges:
    """A set of block indices as sorted, disjoint, half-open intervals [lo, hi).

    What a run has trained: a rank trains its contiguous share (`rank_range`) in index order, so
    the set is one interval per rank (its cursor) whatever the token count, and it stays exact
    for a stream that arrives out of order (a few more intervals). Saved with every checkpoint.
    """

    def __init__(self, pairs=()):
        merged: list[list[int]] = []
        for lo, hi in sorted((int(a), int(b)) for a, b in pairs if int(b) > int(a)):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.pairs = merged
        self._lo = np.asarray([a for a, _ in merged], dtype=np.int64)
        self._hi = np.asarray([b for _, b in merged], dtype=np.int64)

    @classmethod
    def of(cls, saved) -> "Ranges":
        """From a checkpoint's record: [[lo, hi], ...], or (before ranges) a list of indices."""
        saved = list(saved or [])
        if saved and not isinstance(saved[0], (list, tuple)):
            return cls.from_indices(saved)
        return cls(saved)

    @classmethod
    def from_indices(cls, indices) -> "Ranges":
        idx = np.unique(np.asarray(indices, dtype=np.int64))
        if not len(idx):
            return cls()
        cuts = np.flatnonzero(np.diff(idx) != 1) + 1
        return cls((int(run[0]), int(run[-1]) + 1) for run in np.split(idx, cuts))

    def __or__(self, other: "Ranges") -> "Ranges":
        return Ranges(self.pairs + other.pairs)

    def __len__(self) -> int:
        return int((self._hi - self._lo).sum())

    def __eq__(self, other) -> bool:
        return isinstance(other, Ranges) and self.pairs == other.pairs

    def __repr__(self) -> str:
        return f"Ranges({self.pairs})"

    def contains(self, indices: np.ndarray) -> np.ndarray:
        """Which of `indices` are in the set (a boolean array)."""
        indices = np.asarray(indices, dtype=np.int64)
        if not self.pairs:
            return np.zeros(indices.shape, dtype=bool)
        i = np.searchsorted(self._lo, indices, side="right") - 1
        return (i >= 0) & (indices < self._hi[np.maximum(i, 0)])

    def first_missing(self, lo: int) -> int:
        """The first index >= lo not in the set: where a rank whose share starts at `lo` resumes."""
        for a, b in self.pairs:
            if a <= lo < b:
                return b
        return lo

    def to_list(self) -> list[list[int]]:
        return [list(p) for p in self.pairs]


def rank_range(lo: int, hi: int, world: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s blocks of [lo, hi): a contiguous, equal share (so a rank's pipeline packs only
    the shards that hold its own blocks, and every rank has as many blocks as the others)."""
    m = (hi - lo) // world
    return lo + rank * m, lo + (rank + 1) * m


__all__ = ["Shard", "TextPlan", "plan_text", "pack_shard", "iter_blocks", "text_blocks", "local_blocks", "rank_range", "Ranges", "sample_ids",
           "SHARD_BYTES", "SAFETY"]
