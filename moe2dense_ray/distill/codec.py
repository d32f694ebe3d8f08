"""Compact per-token teacher distributions, as fixed-shape numpy columns for Ray Data / Parquet.

The teacher's full distribution costs 4V bytes a token (16 KB at V=4096, 600 KB at V=152k), far
too much to stream from a teacher actor to the trainers or to store. Two sparse views replace it:

* ``topk``: the k most likely tokens and their log-probabilities. The loss treats the missing
  mass as one extra "tail" bucket (see ``losses.py``).
* ``sampled``: ``draws`` tokens drawn from the teacher (with replacement) with their counts: an
  unbiased importance-weighted estimate of the full-vocabulary forward KL and its gradient.

Both modes store the same four columns, one row per token (arrays ``[N, ...]``; any leading shape
``[B, S, ...]`` works too, the functions flatten and restore it):

``t_gaps``  uint16 [N, k]  token ids sorted ascending, stored as differences from the previous id.
                           Sorting costs nothing (the losses are order-free) and saves the
                           ~log2(k!) bits an ordered list would spend; small gaps compress well.
``t_pages`` uint16 [N, P]  how many ids fall in each block of 65536 ids (P = ceil(V / 65536)), so
                           vocabularies over 65536 stay exact with uint16 gaps: a gap restarts from
                           0 at each new block (P = 1 up to 65536 ids: 2 bytes). The shape
                           depends only on the vocabulary size, so every batch of a run has the
                           same schema (a per-batch uint32 fallback would break Parquet/Ray Data
                           schema unification).
``t_q``     uint8  [N, k]  log-probability codes: ``round((max logprob - logprob) / LOGPROB_STEP)``,
                           code 255 for probability zero (-inf).
``t_lhead`` float16 [N]    log of the total probability of the stored entries. Decoding rescales
                           the codes to exactly this mass, so the tail bucket ``1 - head`` is as
                           accurate as a float16 (rounding errors of the codes cannot leak into it,
                           which matters when the tail is tiny).

Sampled mode stores every draw in ``t_gaps`` (a repeated id is a zero gap, so the counts cost
nothing extra) and the codes of the distinct ids, in id order, in ``t_q``.

Write the Parquet with ``PARQUET_OPTIONS`` (measured in bench/codec.py, docs/results/codec.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

COLUMNS = ("t_gaps", "t_pages", "t_q", "t_lhead")
"""The columns both codecs write; prefixed so they never clash with input_ids, attention_mask, ..."""

LOGPROB_STEP = 1 / 8
"""Quantization step of log-probabilities, in nats. Rounding adds noise of variance step**2/12 to
each log-probability; it averages out of a mean loss except for a bias of about half the
probability-weighted variance, at most step**2/24 = 6.5e-4 nats: inside the 1e-3 budget (measured
2.6e-4 to 4.8e-4 on the shipped models), where 1/4 breaks it. Finer steps cost compressed bytes
(1/16: 10% more at k=128). A power of two, so codes times the step are exact in float32."""

ZERO_CODE = 255
"""The code of a probability-zero entry (a masked token, or a padding slot of a sampled row)."""

MAX_CODE = ZERO_CODE - 1
"""Finite log-probabilities more than MAX_CODE * LOGPROB_STEP (31.75) nats below the token's top
are clamped to it: their probability is below e**-31.75 = 1.6e-14 of the top one's."""

PAGE_BITS = 16
"""log2 of the id block a uint16 gap can span."""

DEFAULT_DRAWS = 12
"""Draws per token in sampled mode: 12 keep a token at 40 raw bytes (2 per gap, 1 per code, 4 for
t_pages and t_lhead), about 22 in Parquet, an eighth of top-128. The estimator's noise falls only
as 1/sqrt(draws) (16 draws: 30% more bytes for 13% less noise) and averages out over a batch's
tokens anyway; its bias is zero at any count."""

PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 9, "use_dictionary": False,
                   "use_byte_stream_split": True}
"""pyarrow / Ray Data ``write_parquet`` arguments for these columns. Byte-stream-split hands zstd
the (mostly zero) high bytes of the gaps as one run: 1.3x smaller files than zstd's defaults
(bench/codec.py)."""


@dataclass
class SparseTarget:
    """A sparse teacher distribution per token, the one input type of every distillation loss.

    ``ids`` [N, m] int64 and ``logprobs`` [N, m] float32 (the teacher's log-probabilities of those
    ids, at the distillation temperature; -inf for probability zero). ``weights`` is None for a
    top-k target; for a sampled one it is [N, m] float32 ``counts / draws``, the importance-weighted
    estimate of the teacher probabilities (zero on padding slots).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    weights: torch.Tensor | None = None

    @classmethod
    def from_topk(cls, ids: torch.Tensor, logprobs: torch.Tensor) -> SparseTarget:
        return cls(ids, logprobs.float())

    @classmethod
    def from_sampled(cls, ids: torch.Tensor, counts: torch.Tensor, logprobs: torch.Tensor) -> SparseTarget:
        """Weights are counts over the draws per row (each row's counts sum to the draws)."""
        counts = counts.float()
        return cls(ids, logprobs.float(), counts / counts.sum(-1, keepdim=True))

    @property
    def sampled(self) -> bool:
        return self.weights is not None

    def to(self, device: torch.device | str) -> SparseTarget:
        """The same target on `device` (decoding happens on the CPU, the loss on the trainer's GPU)."""
        weights = None if self.weights is None else self.weights.to(device)
        return SparseTarget(self.ids.to(device), self.logprobs.to(device), weights)


class IdOrder:
    """Token ids renumbered by frequency before gap coding.

    At a 152k vocabulary the sorted top-k ids of a token lie ~1,000 apart when frequent tokens are
    spread over the id range (as BPE vocabularies spread them): two significant bytes per gap.
    Coded by frequency rank instead, most of a row's ids are among the frequent tokens, and the
    gaps between their ranks are small (bench/codec_vocab.py: 261 -> ~165 Parquet bytes a token at
    k = 128). `ids` lists the frequent ids, most frequent first (a stream records it); every other
    id follows in id order. `code[id]` is an id's position, `id[code]` the inverse.
    """

    def __init__(self, ids, vocab_size: int):
        head = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        if head.numel() and (head.min() < 0 or head.max() >= vocab_size or head.unique().numel() != head.numel()):
            raise ValueError(f"an id order lists distinct ids in [0, {vocab_size})")
        rest = torch.ones(vocab_size, dtype=torch.bool)
        rest[head] = False
        self.id = torch.cat([head, torch.arange(vocab_size)[rest]])
        self.code = torch.empty(vocab_size, dtype=torch.long)
        self.code[self.id] = torch.arange(vocab_size)
        self.ids = head.tolist()

    @classmethod
    def of(cls, record: dict | None) -> IdOrder | None:
        """From a stream's record ``{"vocab_size": V, "ids": [...]}``; None for none (ids as they are)."""
        return cls(record["ids"], int(record["vocab_size"])) if record and record.get("ids") else None


def frequency_order(token_ids, vocab_size: int) -> dict:
    """The record of an `IdOrder`: the ids seen in `token_ids` (a sample of the training text, ids
    below `vocab_size`), most frequent first, ties by id."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    counts = np.bincount(ids[(ids >= 0) & (ids < vocab_size)], minlength=vocab_size)
    seen = np.flatnonzero(counts)
    return {"vocab_size": int(vocab_size), "ids": seen[np.lexsort((seen, -counts[seen]))].tolist()}


# ---- teacher side: sparse views of the logits -------------------------------------------------


def _teacher_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Full-vocabulary float32 log-probabilities at `temperature`: the sparse views are taken of
    these, so the stored numbers are true probabilities of the whole vocabulary, not renormalized."""
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def teacher_topk(logits: torch.Tensor, k: int, temperature: float = 1.0, *,
                 ranked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` most likely ids per row of `logits` [N, V] and their log-probabilities (int64, float32
    [N, k]), most likely first; in no particular order without `ranked` (the encoder sorts them by
    id anyway, and an unranked top-k is ~15% cheaper: most of a CPU teacher's encode time)."""
    logprobs, ids = _teacher_logprobs(logits, temperature).topk(k, dim=-1, sorted=ranked)
    return ids, logprobs


def teacher_sample(logits: torch.Tensor, draws: int, generator: torch.Generator | None = None,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`draws` ids per row drawn with replacement from softmax(logits / temperature), deduplicated.

    Returns ``ids``, ``counts`` (int64) and ``logprobs`` (float32), each [N, draws]: the distinct
    ids in ascending order, then padding slots (id 0, count 0, logprob -inf). Counts sum to `draws`.
    """
    lead = logits.shape[:-1]
    logprobs = _teacher_logprobs(logits, temperature).reshape(-1, logits.shape[-1])
    drawn = torch.multinomial(logprobs.exp(), draws, replacement=True, generator=generator)
    ids, counts = _distinct(drawn.sort(dim=-1).values)
    picked = torch.where(counts > 0, logprobs.gather(-1, ids), -torch.inf)
    return ids.reshape(*lead, draws), counts.reshape(*lead, draws), picked.reshape(*lead, draws)


def _distinct(sorted_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ascending ids [N, D] -> (distinct ids, their counts), left-aligned and zero-padded to D."""
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    slot = first.long().cumsum(-1) - 1
    ids = torch.zeros_like(sorted_ids).scatter_(-1, slot, sorted_ids)
    counts = torch.zeros_like(sorted_ids).scatter_add_(-1, slot, torch.ones_like(sorted_ids))
    return ids, counts


def _repeat(ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Inverse of `_distinct`: every id repeated `count` times, rows [N, D] in ascending order."""
    draws = ids.shape[-1]
    if (counts.sum(-1) != draws).any():
        raise ValueError(f"each row's counts must sum to its {draws} slots (the number of draws)")
    return ids.flatten().repeat_interleave(counts.flatten()).reshape(-1, draws)


# ---- column coding ----------------------------------------------------------------------------


def _pages(vocab_size: int) -> int:
    return -(-vocab_size // (1 << PAGE_BITS))


def _encode_ids(ids: torch.Tensor, vocab_size: int) -> dict[str, np.ndarray]:
    """Ascending ids [N, k] (repeats allowed) -> t_gaps, t_pages."""
    if ids.shape[-1] > np.iinfo(np.uint16).max:
        raise ValueError(f"at most {np.iinfo(np.uint16).max} entries per token can be coded, got {ids.shape[-1]}")
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}) (the vocab_size given)")
    page, low = ids >> PAGE_BITS, ids & ((1 << PAGE_BITS) - 1)
    new_page = page != F.pad(page[:, :-1], (1, 0), value=-1)
    gaps = torch.where(new_page, low, low - F.pad(low[:, :-1], (1, 0)))
    counts = torch.zeros(ids.shape[0], _pages(vocab_size), dtype=torch.long, device=ids.device)
    counts.scatter_add_(-1, page, torch.ones_like(page))
    return {"t_gaps": _numpy(gaps, np.uint16), "t_pages": _numpy(counts, np.uint16)}


def _decode_ids(gaps: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """t_gaps [N, k], t_pages [N, P] (as int64) -> ascending ids [N, k]."""
    ends = pages.cumsum(-1)
    position = torch.arange(gaps.shape[-1], device=gaps.device).expand_as(gaps).contiguous()
    page = torch.searchsorted(ends, position, right=True)
    start = (ends - pages).gather(-1, page)  # index of the first entry of each entry's page
    summed = F.pad(gaps.cumsum(-1), (1, 0))
    low = summed[:, 1:] - summed.gather(-1, start)
    return (page << PAGE_BITS) + low


def _encode_logprobs(logprobs: torch.Tensor) -> dict[str, np.ndarray]:
    """Log-probabilities [N, k] -> t_q codes relative to each row's top entry, t_lhead."""
    top = logprobs.max(-1, keepdim=True).values
    codes = ((top - logprobs) / LOGPROB_STEP).round().clamp(max=MAX_CODE)
    codes = torch.where(logprobs == -torch.inf, ZERO_CODE, codes)
    return {"t_q": _numpy(codes, np.uint8), "t_lhead": _numpy(logprobs.logsumexp(-1), np.float16)}


def _decode_logprobs(codes: torch.Tensor, lhead: torch.Tensor) -> torch.Tensor:
    """t_q [N, k], t_lhead [N] -> float32 log-probabilities whose total probability is exp(lhead).

    Each result is within one step of the encoded value (half a step of rounding, at most half a
    step more from the rescaling), plus the float16 rounding of lhead.
    """
    relative = torch.where(codes == ZERO_CODE, -torch.inf, codes * -LOGPROB_STEP)
    return relative - relative.logsumexp(-1, keepdim=True) + lhead.float().unsqueeze(-1)


def _numpy(x: torch.Tensor, dtype: type) -> np.ndarray:
    return x.to(torch.int64 if np.issubdtype(dtype, np.integer) else torch.float32).cpu().numpy().astype(dtype)


def _tensor(columns: Mapping[str, np.ndarray], name: str, dtype: type) -> torch.Tensor:
    """A column as a tensor of numpy `dtype`, converted in numpy (torch lacks most uint16 ops)."""
    return torch.from_numpy(np.asarray(columns[name], dtype=dtype))


def _flat(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.reshape(-1, x.shape[-1])


def _shaped(columns: dict[str, np.ndarray], lead: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Restore the caller's leading dims on flat [N, ...] columns."""
    return {name: col.reshape(*lead, *col.shape[1:]) for name, col in columns.items()}


def _flat_columns(columns: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    """Columns with any leading dims -> int64/float [N, ...] tensors and those leading dims."""
    lead = tuple(np.shape(columns["t_lhead"]))
    flat = {name: _tensor(columns, name, np.int64).reshape(-1, np.shape(columns[name])[-1])
            for name in ("t_gaps", "t_pages", "t_q")}
    flat["t_lhead"] = _tensor(columns, "t_lhead", np.float32).reshape(-1)
    return flat, lead


def encode_topk(ids: torch.Tensor | np.ndarray, logprobs: torch.Tensor | np.ndarray,
                vocab_size: int, order: IdOrder | None = None) -> dict[str, np.ndarray]:
    """Top-k ids and log-probabilities [N, k] (any order) -> the four ``COLUMNS``.

    `vocab_size` (not the ids seen) fixes the t_pages width, so all batches share one schema;
    with `order`, ids are coded by their position in it.
    """
    lead = tuple(np.shape(ids)[:-1])
    ids, logprobs = _flat(ids).long(), _flat(logprobs).float()
    if order is not None:
        ids = order.code.to(ids.device)[ids]
    order_ = ids.argsort(-1)
    columns = _encode_ids(ids.gather(-1, order_), vocab_size) | _encode_logprobs(logprobs.gather(-1, order_))
    return _shaped(columns, lead)


def decode_topk(columns: Mapping[str, np.ndarray], order: IdOrder | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``COLUMNS`` -> ids (exact; ascending in the coded order) int64 and log-probabilities float32, each [N, k]."""
    flat, lead = _flat_columns(columns)
    ids = _decode_ids(flat["t_gaps"], flat["t_pages"])
    if order is not None:
        ids = order.id[ids]
    logprobs = _decode_logprobs(flat["t_q"], flat["t_lhead"])
    return ids.reshape(*lead, -1), logprobs.reshape(*lead, -1)


def encode_sampled(ids: torch.Tensor | np.ndarray, counts: torch.Tensor | np.ndarray,
                   logprobs: torch.Tensor | np.ndarray, vocab_size: int,
                   order: IdOrder | None = None) -> dict[str, np.ndarray]:
    """`teacher_sample`'s output [N, draws] -> the four ``COLUMNS`` (ids coded by `order` if given)."""
    lead = tuple(np.shape(ids)[:-1])
    ids, counts, logprobs = _flat(ids).long(), _flat(counts).long(), _flat(logprobs).float()
    if order is not None:  # the distinct ids by their codes, ascending, padding slots last
        codes = order.code.to(ids.device)[ids]
        sort = torch.where(counts > 0, codes, vocab_size).argsort(-1)
        counts, logprobs = counts.gather(-1, sort), logprobs.gather(-1, sort)
        ids = torch.where(counts > 0, codes.gather(-1, sort), 0)
    columns = _encode_ids(_repeat(ids, counts), vocab_size) | _encode_logprobs(logprobs)
    return _shaped(columns, lead)


def decode_sampled(columns: Mapping[str, np.ndarray], order: IdOrder | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``COLUMNS`` -> ids, counts (int64) and log-probabilities (float32) [N, draws], as `teacher_sample`
    gave (with `order`, the distinct ids come in their coded order)."""
    flat, lead = _flat_columns(columns)
    ids, counts = _distinct(_decode_ids(flat["t_gaps"], flat["t_pages"]))
    if order is not None:
        ids = torch.where(counts > 0, order.id[ids], 0)
    logprobs = _decode_logprobs(flat["t_q"], flat["t_lhead"])
    return tuple(x.reshape(*lead, -1) for x in (ids, counts, logprobs))


# ---- one interface per mode -------------------------------------------------------------------


@dataclass(frozen=True)
class Codec:
    """What the teacher actor and the trainer call, the same for every mode:

        columns = CODECS[mode].encode(logits, k=k, draws=draws, temperature=t, order=o)  # teacher, [N, V]
        target = CODECS[mode].decode(batch_columns, order=o)                            # trainer

    ``encode(logits, *, k=64, draws=DEFAULT_DRAWS, temperature=1.0, vocab_size=None, generator=None,
    order=None)`` takes every mode's options so that one call serves both: top-k uses `k`, sampled
    uses `draws` and `generator` (its seed), each ignores the rest. `vocab_size` defaults to the
    logits' last dim; `order` (an `IdOrder`, the stream's) must be the same on both sides.
    """

    name: str
    encode: Callable[..., dict[str, np.ndarray]]
    decode: Callable[..., SparseTarget]
    columns: tuple[str, ...] = COLUMNS
    seeded: bool = False  # draws from a generator: encode block by block, each seeded by its index


def _encode_topk_logits(logits: torch.Tensor, *, k: int = 64, draws: int = DEFAULT_DRAWS, temperature: float = 1.0,
                        vocab_size: int | None = None, generator: torch.Generator | None = None,
                        order: IdOrder | None = None) -> dict[str, np.ndarray]:
    ids, logprobs = teacher_topk(logits, k, temperature, ranked=False)
    return encode_topk(ids, logprobs, vocab_size or logits.shape[-1], order)


def _encode_sampled_logits(logits: torch.Tensor, *, k: int = 64, draws: int = DEFAULT_DRAWS, temperature: float = 1.0,
                           vocab_size: int | None = None, generator: torch.Generator | None = None,
                           order: IdOrder | None = None) -> dict[str, np.ndarray]:
    ids, counts, logprobs = teacher_sample(logits, draws, generator, temperature)
    return encode_sampled(ids, counts, logprobs, vocab_size or logits.shape[-1], order)


CODECS: dict[str, Codec] = {
    "topk": Codec("topk", _encode_topk_logits,
                  lambda columns, order=None: SparseTarget.from_topk(*decode_topk(columns, order))),
    "sampled": Codec("sampled", _encode_sampled_logits,
                     lambda columns, order=None: SparseTarget.from_sampled(*decode_sampled(columns, order)),
                     seeded=True),
}
"""Codec by mode name ("topk" | "sampled")."""

__all__ = ["COLUMNS", "CODECS", "Codec", "DEFAULT_DRAWS", "IdOrder", "frequency_order", "LOGPROB_STEP", "PARQUET_OPTIONS", "SparseTarget",
           "decode_sampled", "decode_topk", "encode_sampled", "encode_topk", "teacher_sample", "teacher_topk"]
