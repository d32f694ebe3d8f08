"""Calibration text: read documents from files, URLs or the Hugging Face hub, pack them into token blocks.

Calibration only needs `samples * seq_len` tokens, while the corpora people point us at can be
terabytes (FineWeb), so everything here *streams*: files are opened through fsspec (local paths,
`memory://`, `s3://`, `gs://`, `hf://`... all work the same), read a line / a parquet batch at a time,
and reading stops as soon as enough tokens have been packed.

Supported sources (see `load_texts`):

* `.txt`            documents separated by blank lines (a file without blank lines is one document)
* `.jsonl` `.json`  one JSON object per line with a text field (`.json` may also be a JSON array)
* `.parquet`        a text column
* any of the above except parquet compressed as `.gz`, `.bz2` or `.xz`
* a directory (searched recursively) or a glob of such files, read in sorted order
* `hf:NAME`, `hf:NAME:CONFIG` or `hf:NAME:CONFIG:SPLIT`: a Hugging Face dataset, streamed

Every problem the user can fix (a missing path, a wrong field name, a broken line, an empty set)
raises `UserError` with a one-line message that names the file and, where it helps, the line.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import random
import re
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import torch

from .errors import UserError
from .storage import is_local, url_to_fs

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem
    from transformers import PreTrainedTokenizerBase

FORMATS: dict[str, str] = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl",
                           ".json": "json", ".parquet": "parquet"}
"""File extension -> reader. Anything else is rejected rather than guessed at."""

HF_PREFIX = "hf:"


def is_hub_dataset(source: str) -> bool:
    """`hf:NAME[:CONFIG[:SPLIT]]`, streamed with `datasets`; not `hf://...`, a path on the hub's
    filesystem (its files read like any others, e.g. a dataset's Parquet shards)."""
    return source.startswith(HF_PREFIX) and not source.startswith("hf://")

# A document longer than this is yielded in pieces by the .txt reader, so that a corpus stored as one
# enormous paragraph (no blank lines) never has to sit in memory whole.
MAX_DOC_CHARS = 1 << 20
MAX_JSON_LINE = 64 << 20  # characters in one JSON line (one document and its fields)
_READ_CHUNK = 1 << 20  # readline() limit: one pathological line cannot be read in one go either
# Characters tokenized per round per token still missing. Tokens average ~4 characters, so one
# round usually suffices; a document longer than the round's budget is cut at whitespace and its
# rest tokenized in the next round, so nothing is lost when the guess is low, and a corpus of a
# few huge documents is never tokenized whole for a few blocks when it is high.
_CHARS_PER_TOKEN_GUESS = 8
_CUT_SEARCH = 256  # how far past the budget to look for whitespace to cut a document at
_TOKENIZE_BATCH = 32  # documents per tokenizer call: batching is much faster with fast tokenizers
DEFAULT_SHUFFLE_BUFFER = 1000
# The shuffle pool also stops growing at this many characters per token wanted: enough documents
# to mix, without reading far past what calibration will use.
_SHUFFLE_CHARS_PER_TOKEN = 16


# ----------------------------------------------------------------------------------------------
# Reading documents
# ----------------------------------------------------------------------------------------------


def load_texts(source: str, *, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Stream the documents of `source`, in order, skipping null and empty texts.

    The source is resolved *eagerly* (so a missing path or an unsupported extension fails at the
    call, not at the first `next()`), while documents are read lazily. `split` is only used for
    `hf:` datasets; files have no splits.
    """
    if is_hub_dataset(source):
        return _hf_texts(source, text_field=text_field, split=split)
    fs, files = resolve_files(source)
    return _iter_files(fs, files, text_field)


def _hf_texts(source: str, *, text_field: str, split: str) -> Iterator[str]:
    """Open a Hugging Face dataset in streaming mode: FineWeb-sized corpora are never downloaded whole."""
    parts = source[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts[1:]):
        raise UserError(f"bad Hugging Face dataset {source!r}: expected hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT")
    name = parts[0]
    config = parts[1] if len(parts) > 1 else None
    if len(parts) > 2:
        split = parts[2]
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a hard dependency
        raise UserError(f"reading {source} needs the `datasets` package: pip install datasets") from e
    try:
        with quiet_hub():
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise UserError(f"cannot load Hugging Face dataset {source} (split {split!r}): {one_line(e)}") from e
    return _hf_rows(ds, source, text_field)


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """The hub client logs every retry of an unreachable host (~10 lines over ~20 s offline);
    the one line that matters is the error raised at the end."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "datasets", "fsspec")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _row_text(row: dict[str, Any], where: str, text_field: str) -> str | None:
    """The text field of one record; a record without it names the fields it does have."""
    if text_field not in row:
        raise UserError(f"{where} has no {text_field!r} field "
                        f"(fields: {', '.join(sorted(row)) or 'none'}); pick one with --text-field")
    return _check_text(row[text_field], where, text_field)


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line: library messages often span several, and errors here print one."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hf_rows(ds: Iterable[dict[str, Any]], source: str, text_field: str) -> Iterator[str]:
    rows = iter(ds)
    for i in itertools.count():
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # datasets' own errors (schema casts, broken files) are about the data
            raise UserError(f"{source}: cannot read row {i}: {one_line(e)}") from e
        text = _row_text(row, f"{source}: row {i}", text_field)
        if text:
            yield text


def _split_ext(path: str) -> tuple[str | None, str | None]:
    """(format, compression) from a file name: `a.jsonl.gz` -> ('jsonl', 'gzip')."""
    from fsspec.compression import compr
    from fsspec.utils import compressions

    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    stem, ext = os.path.splitext(name)
    compression = None
    if ext[1:] in compressions and compressions[ext[1:]] in compr and compressions[ext[1:]] != "zip":
        compression = compressions[ext[1:]]
        stem, ext = os.path.splitext(stem)
    fmt = FORMATS.get(ext)
    if fmt == "parquet" and compression is not None:
        return None, None  # parquet compresses internally; a .parquet.gz cannot be read in a stream
    return fmt, compression


def _supported_list() -> str:
    return ".txt, .jsonl, .json or .parquet (text formats optionally .gz/.bz2/.xz), a directory, a glob, or hf:DATASET"


def resolve_files(source: str) -> tuple[AbstractFileSystem, list[str]]:
    """The readable files behind a path, URL, directory or glob, in a stable (sorted) order.

    Directories and globs silently skip hidden files (`.DS_Store`, `_SUCCESS`) and files of other
    types (a README next to the shards), but must contain at least one readable file.
    """
    if not source or not source.strip():
        raise UserError("no calibration data given: pass a file, directory, glob, URL or hf:DATASET")
    if "://" not in source and "::" not in source:
        source = os.path.expanduser(source)
    fs, path = url_to_fs(source)

    if not fs.exists(path) and any(c in path for c in "*?["):  # an existing name with `[` is not a glob
        found = fs.glob(path, detail=True)
        files: list[str] = []
        for p, info in found.items():
            files.extend(fs.find(p) if info.get("type") == "directory" else [p])
        if not files:
            raise UserError(f"no files match {source}")
        root = path[:min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        return fs, _readable(files, root, source)
    if not fs.exists(path):
        raise UserError(f"calibration data not found: {source}")
    if fs.isdir(path):
        return fs, _readable(fs.find(path), path, source)
    if _split_ext(path)[0] is None:
        raise UserError(f"unsupported calibration data file {source}: expected {_supported_list()}")
    return fs, [path]


def _readable(files: Iterable[str], root: str, source: str) -> list[str]:
    """Supported files, skipping those hidden below `root` (`.cache/`, `.DS_Store`, `_SUCCESS`)."""
    root = root.rstrip("/")

    def hidden(f: str) -> bool:
        rel = f[len(root):] if root and f.startswith(root + "/") else f.rsplit("/", 1)[-1]
        return any(part.startswith((".", "_")) for part in rel.split("/") if part)

    keep = [f for f in files if not hidden(f) and _split_ext(f)[0] is not None]
    if not keep:
        raise UserError(f"no supported data files in {source}: expected {_supported_list()}")
    return sorted(keep)


def _display(fs: AbstractFileSystem, path: str) -> str:
    """The name to show in messages: local paths as given, remote ones with their protocol."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def _iter_files(fs: AbstractFileSystem, files: list[str], text_field: str) -> Iterator[str]:
    for path in files:
        yield from file_docs(fs, path, text_field)


def file_docs(fs: AbstractFileSystem, path: str, text_field: str, start: int = 0,
              end: int | None = None) -> Iterator[str]:
    """The documents of one file, or of one of its `pieces`: the lines that start in bytes
    [start, end) of text or JSON lines (a line belongs to the range its first byte lies in, so
    ranges that tile a file read every line once), or row groups [start, end) of Parquet."""
    fmt, compression = _split_ext(path)
    name = _display(fs, path)
    ranged = start > 0 or end is not None
    if ranged:
        if not splittable(path) and fmt != "parquet":
            raise ValueError(f"{name} cannot be read in ranges")
        name = f"{name} [{'row groups' if fmt == 'parquet' else 'bytes'} {start}:{end}]"
    if is_local(fs) and not stat.S_ISREG(os.stat(path).st_mode):
        raise UserError(f"{name} is not a regular file")  # a device (/dev/zero) would be read forever
    try:
        if fmt == "parquet":
            yield from _parquet_docs(fs, path, name, text_field, range(start, end) if end is not None else None)
        elif ranged:
            lines = _range_lines(fs, path, start, end, _READ_CHUNK if fmt == "txt" else MAX_JSON_LINE + 1)
            yield from (_txt_docs(lines) if fmt == "txt" else _json_docs(lines, name, text_field))
        elif fmt == "txt":
            with _open_text(fs, path, compression) as f:
                yield from _txt_docs(iter(lambda: f.readline(_READ_CHUNK), ""))
        elif fmt == "json" and _starts_with_bracket(fs, path, compression):
            yield from _json_array_docs(fs, path, compression, name, text_field)
        else:
            with _open_text(fs, path, compression) as f:
                yield from _json_docs(iter(lambda: f.readline(MAX_JSON_LINE + 1), ""), name, text_field)
    except UnicodeDecodeError as e:
        raise UserError(f"{name} is not UTF-8 text: {e.reason} at byte {e.start}") from e
    except (OSError, EOFError) as e:
        # truncated/corrupt gzip, permission denied, a remote read failing...
        raise UserError(f"cannot read {name}: {e}") from e


def splittable(path: str) -> bool:
    """Whether a file can be read in byte ranges: uncompressed text and JSON lines."""
    fmt, compression = _split_ext(path)
    return compression is None and fmt in ("txt", "jsonl")


def _range_lines(fs: AbstractFileSystem, path: str, start: int, end: int | None, limit: int) -> Iterator[str]:
    """The lines of a file that start in bytes [start, end), decoded as they are read.

    A range that starts inside a line skips it (the range before owns it); a range's last line
    may run past `end`. Long lines come in pieces of at most `limit` bytes, as `readline` with a
    limit gives them from a whole file; Windows line ends read as "\\n", as text mode reads them.
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8-sig" if start == 0 else "utf-8")()
    with fs.open(path, "rb") as f:
        pos = start
        if start > 0:
            f.seek(start - 1)
            pos -= 1
            while True:  # the rest of the line holding byte start-1 (just its newline if it ends there)
                piece = f.readline(_READ_CHUNK)
                pos += len(piece)
                if not piece or piece.endswith(b"\n"):
                    break
        at_line_start = True
        while end is None or pos < end or not at_line_start:
            piece = f.readline(limit)
            if not piece:
                break
            pos += len(piece)
            at_line_start = piece.endswith(b"\n")
            if piece.endswith(b"\r\n"):
                piece = piece[:-2] + b"\n"
            yield decoder.decode(piece)
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail


class _CountingReader(io.RawIOBase):
    """A raw byte stream that counts what is read from it (a compressed file's position)."""

    def __init__(self, f):
        self.f, self.count = f, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        b[:len(data)] = data
        self.count += len(data)
        return len(data)


def sample_density(fs: AbstractFileSystem, path: str, tokenizer: PreTrainedTokenizerBase, text_field: str,
                   chars: int) -> tuple[float, int | None]:
    """(tokens per byte of the file as stored, the exact token count if the file holds under `chars`
    characters of text) from its first documents: what the file will pack into, without reading it.

    Tokens are counted as `pack_rows` frames documents; bytes are those read from storage for
    them (compressed bytes for a compressed file; the text column's share for Parquet).
    """
    name = _display(fs, path)
    if is_local(fs) and not stat.S_ISREG(os.stat(path).st_mode):
        raise UserError(f"{name} is not a regular file")
    try:
        return _sample_density(fs, path, tokenizer, text_field, chars)
    except UnicodeDecodeError as e:
        raise UserError(f"{name} is not UTF-8 text: {e.reason} at byte {e.start}") from e
    except (OSError, EOFError) as e:  # a truncated or corrupt compressed file, a failing read
        raise UserError(f"cannot read {name}: {e}") from e


def _sample_density(fs: AbstractFileSystem, path: str, tokenizer: PreTrainedTokenizerBase, text_field: str,
                    chars: int) -> tuple[float, int | None]:
    fmt, compression = _split_ext(path)
    name = _display(fs, path)
    size = max(1, fs.size(path))
    sample: list[str] = []
    n = 0
    if fmt == "json" and _starts_with_bracket(fs, path, compression):  # one array, read whole anyway
        docs = list(_json_array_docs(fs, path, compression, name, text_field))
        total = sum(map(len, docs)) or 1
        for doc in docs:
            sample.append(doc)
            n += len(doc)
            if n >= chars:
                break
        tokens = sum(real for _, real in pack_rows(iter(sample), tokenizer, seq_len=1 << 12, blocks=1 << 62))
        return (tokens / size, tokens) if n < chars else (tokens / (size * n / total), None)
    consumed = 0  # bytes of the lines the sample's documents came from, as decompressed

    def lines(read: Callable[[], str]) -> Iterator[str]:
        nonlocal consumed
        for line in iter(read, ""):
            consumed += len(line.encode("utf-8"))
            yield line

    with fs.open(path, "rb") as raw:
        stored = _CountingReader(raw)
        if fmt == "parquet":
            docs: Iterator[str] = _parquet_docs(fs, path, name, text_field)
        else:
            from fsspec.compression import compr

            plain = compr[compression](io.BufferedReader(stored), mode="rb") if compression else stored
            text = io.TextIOWrapper(io.BufferedReader(plain) if not compression else plain, encoding="utf-8-sig")
            docs = _txt_docs(lines(lambda: text.readline(_READ_CHUNK))) if fmt == "txt" else \
                _json_docs(lines(lambda: text.readline(MAX_JSON_LINE + 1)), name, text_field)
        for doc in docs:
            sample.append(doc)
            n += len(doc)
            if n >= chars:
                break
        whole = n < chars
    ratio = _stored_per_text_byte(fs, path, compression) if compression and fmt != "parquet" else 1.0
    tokens = sum(real for _, real in pack_rows(iter(sample), tokenizer, seq_len=1 << 12, blocks=1 << 62))
    if whole:
        return tokens / size, tokens
    if fmt == "parquet":  # the text column's bytes, from the footer, over the sample's own
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        column = meta.schema.names.index(text_field)
        text = sum(meta.row_group(i).column(column).total_uncompressed_size for i in range(meta.num_row_groups))
        sampled = sum(len(d.encode("utf-8")) + 4 for d in sample)  # a length prefix per value
        return tokens / max(1, sampled) * text / size, None
    return tokens / max(1.0, consumed * ratio), None


def _stored_per_text_byte(fs: AbstractFileSystem, path: str, compression: str, probe: int = 1 << 20) -> float:
    """Compressed bytes per decompressed byte, from the file's first `probe` stored bytes: the
    sample's documents are counted as text, and its file is stored compressed."""
    import bz2
    import lzma
    import zlib

    with fs.open(path, "rb") as f:
        head = f.read(probe)
    make = {"gzip": lambda: zlib.decompressobj(wbits=47), "bz2": bz2.BZ2Decompressor,
            "xz": lzma.LZMADecompressor, "lzma": lzma.LZMADecompressor}.get(compression)
    if make is None:
        return 1.0
    try:
        out = len(make().decompress(head))
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as e:
        raise UserError(f"cannot read {_display(fs, path)}: {e}") from e
    return len(head) / max(1, out)


def _open_text(fs: AbstractFileSystem, path: str, compression: str | None) -> TextIO:
    # utf-8-sig: a byte-order mark (common from Windows editors) would break JSON on line 1
    return fs.open(path, "rt", compression=compression, encoding="utf-8-sig")


def _txt_docs(lines: Iterable[str]) -> Iterator[str]:
    """Paragraphs separated by blank lines; internal newlines are kept (they carry meaning in code/poetry)."""
    buf: list[str] = []
    size = 0
    for line in lines:
        if not line.strip():
            if buf:
                yield "".join(buf).rstrip("\n")
                buf, size = [], 0
            continue
        buf.append(line)
        size += len(line)
        if size >= MAX_DOC_CHARS:
            yield "".join(buf).rstrip("\n")
            buf, size = [], 0
    if buf:
        yield "".join(buf).rstrip("\n")


def _check_text(value: Any, where: str, text_field: str) -> str | None:
    """Null means "no text" (common in parquet); anything else that is not a string is an error."""
    if value is None or isinstance(value, str):
        return value or None
    raise UserError(f"{where}: field {text_field!r} is a {type(value).__name__}, not a string")


def _starts_with_bracket(fs: AbstractFileSystem, path: str, compression: str | None) -> bool:
    """A `.json` file whose first character is `[` is one JSON array, not JSON lines."""
    with _open_text(fs, path, compression) as f:
        return f.read(4096).lstrip().startswith("[")


def _json_docs(lines: Iterable[str], name: str, text_field: str) -> Iterator[str]:
    """JSON lines (each read with a limit of MAX_JSON_LINE + 1 characters)."""
    for lineno, line in enumerate(lines, 1):
        if len(line) > MAX_JSON_LINE:  # one record never needs this much: a corrupt or endless file
            raise UserError(f"{name}:{lineno}: line {lineno} is longer than {MAX_JSON_LINE >> 20} M characters")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{name}:{lineno}: malformed JSON on line {lineno}: {e.msg} (column {e.colno})") from e
        if not isinstance(obj, dict):
            raise UserError(f"{name}:{lineno}: line {lineno} is a JSON {type(obj).__name__}, not an object "
                            f"with a {text_field!r} field")
        text = _row_text(obj, f"{name}:{lineno}: line {lineno}", text_field)
        if text:
            yield text


def _json_array_docs(fs: AbstractFileSystem, path: str, compression: str | None, name: str,
                     text_field: str) -> Iterator[str]:
    """A JSON array cannot be streamed with the standard library; such files are small in practice."""
    with _open_text(fs, path, compression) as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{name}:{e.lineno}: malformed JSON on line {e.lineno}: {e.msg} (column {e.colno})") from e
    for i, obj in enumerate(items):
        if isinstance(obj, str):
            value: Any = obj
        elif isinstance(obj, dict):
            if text_field not in obj:
                raise UserError(f"{name}: item {i} has no {text_field!r} field "
                                f"(fields: {', '.join(sorted(obj)) or 'none'}); pick one with --text-field")
            value = obj[text_field]
        else:
            raise UserError(f"{name}: item {i} is a JSON {type(obj).__name__}, not an object or a string")
        text = _check_text(value, f"{name}: item {i}", text_field)
        if text:
            yield text


def _parquet_docs(fs: AbstractFileSystem, path: str, name: str, text_field: str,
                  row_groups: range | None = None) -> Iterator[str]:
    """Only the text column is read, one row group batch at a time: parquet shards are often GBs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as raw:
        try:
            pf = pq.ParquetFile(raw)
        except (pa.ArrowInvalid, pa.ArrowException) as e:
            raise UserError(f"{name} is not a valid parquet file: {e}") from e
        columns = pf.schema_arrow.names
        if text_field not in columns:
            raise UserError(f"{name} has no {text_field!r} column (columns: {', '.join(columns) or 'none'}); "
                            f"pick one with --text-field")
        groups = None if row_groups is None else list(row_groups)
        for batch in pf.iter_batches(batch_size=1024, columns=[text_field], row_groups=groups):
            for value in batch.column(0).to_pylist():
                text = _check_text(value, name, text_field)
                if text:
                    yield text


def pieces(fs: AbstractFileSystem, path: str, piece_bytes: int) -> list[tuple[int, int | None, float]]:
    """A file cut into pieces of about `piece_bytes` stored bytes that `file_docs` reads apart:
    (start, end, bytes) with byte ranges for text and JSON lines, row-group ranges for Parquet
    (bytes in proportion to their rows), and the whole file (0, None) for everything else."""
    size = fs.size(path)
    if _split_ext(path)[0] == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        total = max(1, sum(rows))
        out, start, acc = [], 0, 0
        for i, r in enumerate(rows):
            acc += r
            if acc * size / total >= piece_bytes or i == len(rows) - 1:
                out.append((start, i + 1, acc * size / total))
                start, acc = i + 1, 0
        return out if len(out) > 1 else [(0, None, float(size))]
    if not splittable(path) or size <= piece_bytes:
        return [(0, None, float(size))]
    n = -(-size // piece_bytes)
    cuts = [size * i // n for i in range(n + 1)]
    return [(a, b, float(b - a)) for a, b in zip(cuts, cuts[1:])]


# ----------------------------------------------------------------------------------------------
# Packing into blocks
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationSet:
    """`samples' x seq_len` token blocks; `attention_mask` is 0 on padding, which statistics must skip."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(f"input_ids {tuple(self.input_ids.shape)} and attention_mask "
                             f"{tuple(self.attention_mask.shape)} must be equal 2-D shapes")

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens: what calibration statistics are averaged over."""
        return int(self.attention_mask.sum())

    @property
    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def __len__(self) -> int:
        return self.num_samples

    def shard(self, i: int, n: int) -> CalibrationSet:
        """Rows of part `i` of `n` contiguous, near-equal parts (sizes differ by at most one).

        Used to hand each of `n` workers its own rows; a part is empty when `n` exceeds the rows.
        The rows are copied: a slice of a tensor pickles its whole storage, so without the copy
        every Ray worker would be shipped the entire set.
        """
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"shard({i}, {n}): need n >= 1 and 0 <= i < n")
        base, extra = divmod(self.num_samples, n)
        start = i * base + min(i, extra)
        stop = start + base + (1 if i < extra else 0)
        return CalibrationSet(self.input_ids[start:stop].clone(), self.attention_mask[start:stop].clone())


def _shuffled(docs: Iterator[str], buffer: int, seed: int, *, max_chars: int) -> Iterator[str]:
    """Seeded approximate shuffle through a bounded buffer (as `datasets` streaming shuffle does).

    Corpora are often sorted (by source, date, topic); taking the first N documents verbatim would
    calibrate on one slice of the distribution. A full shuffle would need the whole corpus; a pool
    of at most `buffer` documents and `max_chars` characters keeps memory and read-ahead bounded
    and is deterministic for a given seed.
    """
    if buffer <= 1:
        yield from docs
        return
    rng = random.Random(seed)
    pool: list[str] = []
    chars = 0
    for doc in docs:
        if len(pool) < buffer and chars < max_chars:
            pool.append(doc)
            chars += len(doc)
            continue
        j = rng.randrange(len(pool))
        yield pool[j]
        chars += len(doc) - len(pool[j])
        pool[j] = doc
    rng.shuffle(pool)
    yield from pool


_WHITESPACE = re.compile(r"\s")


def _cut_point(doc: str, budget: int) -> int:
    """Where to cut `doc` to tokenize about `budget` characters now: at whitespace, so no word is split."""
    if len(doc) <= budget:
        return len(doc)
    m = _WHITESPACE.search(doc, budget, budget + _CUT_SEARCH)
    if m:
        return m.start()
    k = max(doc.rfind(" ", 0, budget), doc.rfind("\n", 0, budget))
    return k if k > 0 else budget


def _special_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer wraps a text in by default (e.g. Llama's BOS, none for Qwen).

    Documents are tokenized without them, because a document cut into pieces must get them once,
    and they are added around each whole document: the model was trained on documents so framed.
    """
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if plain and full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []


def pack_rows(docs: Iterator[str], tokenizer: PreTrainedTokenizerBase, *, seq_len: int, blocks: int,
              pad_last: bool = True) -> Iterator[tuple[list[int], int]]:
    """Up to `blocks` rows of `seq_len` token ids packed from `docs`, as (ids, real tokens) pairs.

    Documents are tokenized with the tokenizer's own special-token convention (BOS for
    Llama-style tokenizers, nothing for Qwen-style ones), followed by EOS when the tokenizer has
    one, concatenated and cut into rows: packing wastes no compute on padding and matches how the
    model was trained. Rows come as soon as they are full, and `docs` is read only as far as the
    rows need. If the text runs out first, the last partial row comes padded (real < seq_len)
    when `pad_last`, and is dropped otherwise.
    """
    eos = tokenizer.eos_token_id
    special = set(tokenizer.all_special_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    prefix, suffix = _special_affixes(tokenizer)
    made = 0
    buf: list[int] = []
    pending = ""  # the rest of a document cut at the previous round's budget
    started = False  # whether the current document has emitted tokens (and so its prefix) yet
    while made < blocks:
        budget = ((blocks - made) * seq_len - len(buf)) * _CHARS_PER_TOKEN_GUESS
        pieces: list[tuple[str, bool, bool]] = []  # (text, starts a document, ends it)
        while len(pieces) < _TOKENIZE_BATCH and budget > 0:
            first = not pending
            doc = pending or next(docs, None)
            if doc is None:
                break
            k = _cut_point(doc, budget)
            pieces.append((doc[:k], first, k == len(doc)))
            pending = doc[k:]
            budget -= k
        if not pieces:
            break  # the text ran out
        encoded = tokenizer([p[0] for p in pieces], add_special_tokens=False, verbose=False)["input_ids"]
        for ids, (_, first, last) in zip(encoded, pieces):
            if first:
                started = False
            ids = list(ids)
            if any(t not in special for t in ids):
                buf.extend(ids if started else prefix + ids)
                started = True
            if last and started:
                buf.extend(suffix)
                if eos is not None and (not buf or buf[-1] != eos):
                    buf.append(eos)
            start = 0  # cut with an offset and compact once: deleting per row is quadratic on a long document
            while len(buf) - start >= seq_len and made < blocks:
                yield buf[start:start + seq_len], seq_len
                made += 1
                start += seq_len
            del buf[:start]
            if made == blocks:
                return
    if buf and made < blocks and pad_last:
        yield buf + [pad] * (seq_len - len(buf)), len(buf)


def calibration_blocks(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    samples: int,
    seq_len: int,
    seed: int = 0,
    text_field: str = "text",
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
) -> CalibrationSet:
    """Up to `samples` blocks of exactly `seq_len` tokens from `source`, packed LM-style (`pack_rows`).

    Documents come in a seeded buffered shuffle (`shuffle_buffer <= 1` keeps file order). Reading
    stops as soon as the blocks are full. If the text runs out first, the last partial block is
    padded (`attention_mask` 0) and fewer than `samples` rows may be returned.
    """
    if samples < 1:
        raise UserError(f"--samples must be at least 1 (got {samples})")
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (got {seq_len}): next-token statistics need two tokens")
    need = samples * seq_len
    counted = _Counted(_shuffled(load_texts(source, text_field=text_field), shuffle_buffer, seed,
                                 max_chars=max(need * _SHUFFLE_CHARS_PER_TOKEN, MAX_DOC_CHARS)))
    rows, mask = [], []
    for ids, real in pack_rows(counted, tokenizer, seq_len=seq_len, blocks=samples):
        rows.append(ids)
        mask.append([1] * real + [0] * (seq_len - real))
    if not rows:
        what = "no documents" if counted.n == 0 else f"{counted.n} document(s) but 0 tokens"
        raise UserError(f"the calibration set from {source} is empty: it has {what} "
                        f"(text field {text_field!r})")
    return CalibrationSet(torch.tensor(rows, dtype=torch.long), torch.tensor(mask, dtype=torch.long))


class _Counted:
    """An iterator that counts what it hands out (documents read, for the message of an empty set)."""

    def __init__(self, it: Iterator[str]):
        self.it, self.n = it, 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        item = next(self.it)
        self.n += 1
        return item


def token_blocks(src: str, data: str, cfg, *, samples: int, seq_len: int, seed: int, text_field: str,
                 doing: str = "calibrating"):
    """DATA packed into blocks by SRC's tokenizer, every id checked against the model's vocabulary
    (a short corpus is a warning: fewer blocks than asked for)."""
    from .models import load_tokenizer

    calib = calibration_blocks(data, load_tokenizer(src), samples=samples, seq_len=seq_len, seed=seed,
                               text_field=text_field)
    if calib.num_samples < samples:
        warnings.warn(f"{data} holds only {calib.num_tokens} tokens: {doing} on {calib.num_samples} "
                      f"blocks, not the {samples} asked for", stacklevel=3)
    _check_token_ids(calib, cfg, src)
    return calib


def _check_token_ids(calib, cfg, src: str) -> None:
    """Every token id must have a row in the embedding: an id beyond it fails mid-run (or, on a
    GPU, reads another row's memory)."""
    vocab = getattr(cfg, "vocab_size", None)
    if vocab and calib.input_ids.numel():
        top = int(calib.input_ids.max())
        if top >= int(vocab):
            raise UserError(f"the tokenizer of {src} gives token id {top}, but the model's vocabulary has "
                            f"{vocab} entries (vocab_size in config.json): tokenizer and model do not belong together")


__all__ = ["CalibrationSet", "calibration_blocks", "token_blocks", "file_docs", "is_hub_dataset", "load_texts", "pack_rows", "pieces", "resolve_files", "sample_density", "splittable", "FORMATS", "MAX_DOC_CHARS"]
