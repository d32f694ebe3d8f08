"""Lazy checkpoint reading and atomic sharded writing, over any fsspec filesystem.

The reader parses each safetensors header once and then reads one tensor's byte range at a
time, so a 60 GB teacher on object storage costs the memory of the tensors in use, never of a
whole shard; it rejects what safetensors itself would (overlapping or out-of-order byte ranges)
and what a loader would silently resolve (one tensor name in two shards, an index that lies).
The writer streams: tensors are declared up front, each shard's header is written first and
each tensor appended as it is produced, into a sibling `.partial-*` directory that is swapped in
only when everything, index and configs included, is written (core/storage.py has the guarantees).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import stat
import struct
from dataclasses import dataclass
from typing import Any, Iterable

import fsspec
import torch

from .errors import UserError
from .storage import (
    OutputLock,
    check_output,
    clean_leftovers,
    discard,
    is_local,
    parse_json,
    partial_name,
    read_json,
    read_small,
    swap_in,
    url_to_fs,
)

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in _DTYPES.items()}

# Any one of these makes a checkpoint directory loadable with AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

# Files copied from teacher to student unchanged (tokenizer, chat template, generation defaults).
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def parse_config(data: str | bytes, where: str) -> dict[str, Any]:
    """A config.json's contents, or a one-line UserError saying what is wrong with it."""
    return parse_json(data, where)


def _check_entry(name: str, key: str, e: Any) -> None:
    """One header entry is {dtype, shape, data_offsets} of the right types and byte length."""
    def bad(what: str) -> UserError:
        return UserError(f"{name} is corrupted: tensor {key} {what}")

    if not isinstance(e, dict):
        raise bad(f"has a header entry that is a JSON {type(e).__name__}, not an object")
    if e.get("dtype") not in _DTYPES:
        raise UserError(f"{name}: tensor {key} has unsupported dtype {e.get('dtype')!r}")
    shape, offsets = e.get("shape"), e.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r}, not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
    if offsets[1] - offsets[0] != math.prod(shape) * _ITEMSIZE[e["dtype"]]:
        raise bad("has the wrong byte length")


class _SafetensorsFile:
    """One .safetensors file: its header, and byte-range reads of single tensors."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str):
        self.fs, self.path = fs, path
        name = posixpath.basename(path)
        if is_local(fs) and not stat.S_ISREG(os.stat(path).st_mode):
            raise UserError(f"{path} is not a regular file")  # a FIFO would block the first read forever
        try:
            size = fs.size(path)
            with fs.open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise UserError(f"{name} is truncated: no safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise UserError(f"{name} is corrupted or truncated: header length {n} "
                                    f"does not fit a {size}-byte file")
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{name} is corrupted: its safetensors header is not valid JSON") from None
        if not isinstance(header, dict):
            raise UserError(f"{name} is corrupted: its safetensors header is a JSON {type(header).__name__}, "
                            f"not an object")
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict[str, Any]] = header
        for key, e in header.items():
            _check_entry(name, key, e)
        # safetensors' own rule: the tensors tile the data area in order, no overlap, no holes, so
        # no byte belongs to two tensors (a crafted file could otherwise alias weights)
        end = 0
        for key, e in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
            begin, stop = e["data_offsets"]
            if begin != end:
                raise UserError(f"{name} is corrupted: tensor {key} starts at byte {begin}, expected {end} "
                                f"(overlapping or out-of-order tensors)")
            end = stop
        if self.data_start + end > size:
            raise UserError(
                f"{name} is truncated: its header promises {self.data_start + end} bytes, "
                f"the file has {size}"
            )
        self._fh = None

    def read(self, key: str, row: int | None = None) -> torch.Tensor:
        """The whole tensor, or only `tensor[row]` (one contiguous byte range of a fused [E, ...])."""
        e = self.entries[key]
        begin, stop = e["data_offsets"]
        shape = list(e["shape"])
        if row is not None:
            per_row = (stop - begin) // shape[0]
            begin, stop, shape = begin + row * per_row, begin + (row + 1) * per_row, shape[1:]
        if self._fh is None:
            self._fh = self.fs.open(self.path, "rb")
        self._fh.seek(self.data_start + begin)
        buf = bytearray(self._fh.read(stop - begin))
        if len(buf) != stop - begin:
            raise UserError(f"{posixpath.basename(self.path)} is truncated at tensor {key}")
        dtype = _DTYPES[e["dtype"]]
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class CheckpointReader:
    """A Hugging Face checkpoint directory read lazily, one tensor at a time.

    Accepts a single `model.safetensors`, a sharded set with `model.safetensors.index.json`, or a
    directory of `*.safetensors`. Pickle checkpoints (`*.bin`) can run arbitrary code when loaded
    and are refused unless `allow_pickle` is set; they are then loaded one shard at a time.
    """

    def __init__(self, url: str, *, allow_pickle: bool = False):
        self.url = str(url)
        self.fs, self.root = url_to_fs(self.url)
        self._config: dict[str, Any] | None = None
        if not self.fs.exists(self.root):
            raise UserError(f"no such checkpoint: {self.url}")
        if not self.fs.isdir(self.root):
            raise UserError(f"{self.url} is not a checkpoint directory")
        self._files: dict[str, _SafetensorsFile] = {}
        self.fp8: dict[str, str] = {}
        self._pickle: dict[str, dict[str, torch.Tensor]] = {}
        self.key_to_file: dict[str, str] = {}
        names = {posixpath.basename(p) for p in self.fs.ls(self.root, detail=False)}
        index = "model.safetensors.index.json"
        weight_map = self._weight_map(index) if index in names else None
        if weight_map is not None:
            shard_names = sorted(set(weight_map.values()))
        else:
            shard_names = sorted(n for n in names if n.endswith(".safetensors"))
        if shard_names:
            for shard in shard_names:
                if shard not in names:
                    raise UserError(f"{self.url}: shard {shard} named in the index is missing")
                f = _SafetensorsFile(self.fs, self._path(shard))
                self._files[shard] = f
                for key in f.entries:
                    if key in self.key_to_file:  # which copy would win is an accident of file order
                        raise UserError(f"{self.url}: tensor {key} is in both {self.key_to_file[key]} and {shard}")
                    self.key_to_file[key] = shard
            for key, shard in (weight_map or {}).items():
                if self.key_to_file.get(key) != shard:
                    raise UserError(f"{self.url}: the index puts tensor {key} in {shard}, which does not hold it")
            self._find_fp8_pairs(names)
            return
        bins = sorted(n for n in names if n.endswith(".bin") and "pytorch_model" in n)
        if bins and not allow_pickle:
            raise UserError(
                f"{self.url} holds only pickle weights (.bin), which can run code when loaded; "
                "convert them to safetensors or pass --allow-pickle if you trust the source"
            )
        if not bins:
            raise UserError(f"{self.url} holds no model weights (*.safetensors)")
        self._bins = bins
        for b in bins:
            for key in self._load_bin(b):
                self.key_to_file[key] = b
            self._pickle.clear()

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _weight_map(self, index: str) -> dict[str, str]:
        where = f"{self.url}/{index}"
        weight_map = read_json(self.fs, self._path(index), what=where).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise UserError(f"{where} has no weight_map object of tensor names to shard files")
        for shard in set(weight_map.values()):
            if "/" in shard or "\\" in shard or shard.startswith(".") or not shard.endswith(".safetensors"):
                raise UserError(f"{where} names {shard!r}, not a .safetensors file beside it")
        return weight_map

    def _find_fp8_pairs(self, names: set[str]) -> None:
        """Block-quantized FP8 weights (DeepSeek-V3, Qwen3-FP8): `W` float8 + `W_scale_inv` fp32
        per [block x block] tile. They are served dequantized (`W * scale_inv`, float32, reported as
        bf16 by `dtype`), and the scale tensors are hidden, so every consumer sees an ordinary
        checkpoint."""
        self.fp8: dict[str, str] = {}
        block = [128, 128]
        if "config.json" in names:
            q = self.config_dict().get("quantization_config") or {}
            block = list(q.get("weight_block_size") or block)
        self.fp8_block = block
        for key in list(self.key_to_file):
            if key.endswith("_scale_inv"):
                base = key[: -len("_scale_inv")]
                if base in self.key_to_file and self._raw_dtype(base) in (torch.float8_e4m3fn, torch.float8_e5m2):
                    self.fp8[base] = key
        self._scale_files = {k: self.key_to_file[k] for k in self.fp8.values()}
        for scale_key in self.fp8.values():
            del self.key_to_file[scale_key]

    def _raw_dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._files[self.key_to_file[key]].entries[key]["dtype"]]

    def _dequantize_fp8(self, key: str, w: torch.Tensor) -> torch.Tensor:
        f = self._files[self._scale_file(key)]
        s = f.read(self.fp8[key]).float()
        br, bc = self.fp8_block
        rows, cols = w.shape
        full = s.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
        return w.float() * full  # float32; `dtype(key)` says bf16, the natural output dtype

    def _scale_file(self, key: str) -> str:
        return self._scale_files[self.fp8[key]]

    def _load_bin(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._pickle:
            self._pickle.clear()  # hold one pickle shard at a time
            with self.fs.open(self._path(name), "rb") as f:
                try:
                    self._pickle[name] = torch.load(f, map_location="cpu", weights_only=True)
                except Exception as e:  # noqa: BLE001 - torch raises many types for a bad pickle
                    first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
                    raise UserError(f"{self.url}/{name} cannot be loaded safely (weights_only): "
                                    f"{' '.join(first.split())[:300]}") from None
        return self._pickle[name]

    # -- metadata -------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return self.fs.exists(self._path(name))

    def read_text(self, name: str) -> str:
        data = self.read_bytes(name)
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise UserError(f"{self.url}/{name} is not UTF-8 text") from None

    def read_bytes(self, name: str) -> bytes:
        """A metadata file (config, tokenizer, ...): size-capped, never a device or FIFO."""
        return read_small(self.fs, self._path(name), what=f"{self.url}/{name}")

    def config_dict(self) -> dict[str, Any]:
        if not self.exists("config.json"):
            raise UserError(f"{self.url} has no config.json: not a Hugging Face checkpoint")
        if self._config is None:
            self._config = parse_config(self.read_bytes("config.json"), f"{self.url}/config.json")
        return self._config

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def shape(self, key: str) -> tuple[int, ...]:
        f = self.key_to_file[key]
        if f in self._files:
            return tuple(self._files[f].entries[key]["shape"])
        return tuple(self._load_bin(f)[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        if key in self.fp8:
            return torch.bfloat16
        f = self.key_to_file[key]
        if f in self._files:
            return _DTYPES[self._files[f].entries[key]["dtype"]]
        return self._load_bin(f)[key].dtype

    def get(self, key: str) -> torch.Tensor:
        if key not in self.key_to_file:
            raise UserError(f"{self.url}: tensor {key} is missing from the checkpoint")
        f = self.key_to_file[key]
        if f in self._files:
            t = self._files[f].read(key)
            return self._dequantize_fp8(key, t) if key in self.fp8 else t
        return self._load_bin(f)[key]

    def get_row(self, key: str, row: int) -> torch.Tensor:
        """`get(key)[row]`, reading only that row's bytes: one expert of a fused expert tensor."""
        if key not in self.key_to_file:
            raise UserError(f"{self.url}: tensor {key} is missing from the checkpoint")
        f = self.key_to_file[key]
        if key in self.fp8:
            return self.get(key)[row]
        if f in self._files:
            return self._files[f].read(key, row)
        return self._load_bin(f)[key][row]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._pickle.clear()


_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be before it exists: enough to write a safetensors header first."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[_DTYPE_NAMES[self.dtype]]


def shard_layout(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Tensors in order, cut into shards of at most `max_shard_bytes` (a bigger tensor alone)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (shards[-1] and size + spec.nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(shard: list[TensorSpec]) -> bytes:
    """A safetensors header for tensors stored back to back in this order, padded to 8 bytes."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        entries[spec.name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class CheckpointWriter:
    """Writes a sharded safetensors checkpoint atomically to a local path or fsspec URL.

    The tensors to write are declared up front (`layout`: name, shape and dtype of each, in
    order), so every shard's header is written first and each tensor's bytes are appended the
    moment it is produced: peak memory is the tensors in flight, whatever the shard size. Each
    tensor is checked against its declaration and for NaN/inf before a byte of it is written.

    Use as a context manager: the output's lock is taken (outputs.OutputLock), the files go to a
    sibling `.partial-*` directory, and on a clean exit that is swapped in whole
    (outputs.swap_in); on any failure, KeyboardInterrupt included, it is deleted and `url` is
    untouched. Files other than tensors (configs, tokenizer, statistics) go through write_*.
    """

    def __init__(self, url: str, *, max_shard_bytes: int = 1 << 30, overwrite: bool = False,
                 sources: tuple[str | None, ...] = (), what: str = "checkpoint",
                 layout: list[TensorSpec] | None = None):
        self.url = str(url)
        self.fs, self.dest = url_to_fs(self.url)
        if is_local(self.fs):
            self.dest = os.path.realpath(self.dest)  # a symlinked --out: write where it points
        self.what, self.sources = what, sources
        check_output(self.url, what=what, overwrite=overwrite, sources=sources)
        self.overwrite = overwrite
        self.tmp = partial_name(self.dest)
        self._lock = OutputLock(self.url)
        self._shards = shard_layout(list(layout or []), max_shard_bytes)
        self._names = self._shard_names(len(self._shards))
        self._shard, self._pos = 0, 0
        self._file = None
        self.total_bytes = sum(spec.nbytes for shard in self._shards for spec in shard)
        self.total_numel = 0  # parameters written: the student's size without re-reading it
        self.keys_written: set[str] = set()

    @staticmethod
    def _shard_names(n: int) -> list[str]:
        return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def __enter__(self) -> "CheckpointWriter":
        self._lock.__enter__()
        try:
            # again under the lock: another run may have finished this output since the first check
            check_output(self.url, what=self.what, overwrite=self.overwrite, sources=self.sources)
            clean_leftovers(self.fs, self.dest)
            self.fs.makedirs(self.tmp, exist_ok=True)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                try:
                    self._finish()
                except BaseException:  # a full disk on the last shard, a signal during the move
                    self.abort()
                    raise
            else:
                self.abort()
        finally:
            self._lock.__exit__(None, None, None)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Append the next declared tensor's bytes to its shard."""
        if self._shard >= len(self._shards):
            raise RuntimeError(f"tensor {key} was not declared in the layout")
        spec = self._shards[self._shard][self._pos]
        t = tensor.detach().to("cpu").contiguous()
        if (key, tuple(t.shape), t.dtype) != (spec.name, spec.shape, spec.dtype):
            raise RuntimeError(f"expected tensor {spec.name} {spec.shape} {spec.dtype}, "
                               f"got {key} {tuple(t.shape)} {t.dtype}")
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise UserError(f"tensor {key} would hold NaN or infinite values (from the source checkpoint "
                            f"or the plan); nothing was written")
        if self._pos == 0:
            self._file = self.fs.open(f"{self.tmp}/{self._names[self._shard]}", "wb")
            self._file.write(_header(self._shards[self._shard]))
        if t.numel():
            self._file.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.total_numel += t.numel()
        self.keys_written.add(key)
        self._pos += 1
        if self._pos == len(self._shards[self._shard]):
            self._file.close()
            self._file = None
            self._shard, self._pos = self._shard + 1, 0

    def write_text(self, name: str, text: str) -> None:
        with self.fs.open(f"{self.tmp}/{name}", "w") as f:
            f.write(text)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.fs.open(f"{self.tmp}/{name}", "wb") as f:
            f.write(data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def _finish(self) -> None:
        if self._shard < len(self._shards):
            missing = [s.name for s in self._shards[self._shard][self._pos:]]
            raise RuntimeError(f"{len(missing)}+ declared tensors were never written, e.g. {missing[0]}")
        if len(self._shards) > 1:
            weight_map = {spec.name: name for name, shard in zip(self._names, self._shards) for spec in shard}
            self.write_json(
                "model.safetensors.index.json",
                {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
            )
        empty = self.fs.isdir(self.dest) and not self.fs.ls(self.dest, detail=False)  # allowed up front
        swap_in(self.fs, self.tmp, self.dest, overwrite=self.overwrite or empty)

    def abort(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
            discard(self.fs, self.tmp)
        except Exception:  # noqa: BLE001 - cleanup must not hide the original error
            pass


def copy_aux_files(reader: CheckpointReader, writer: CheckpointWriter, names: Iterable[str] = AUX_FILES) -> list[str]:
    """Copy tokenizer and generation files byte for byte; returns the names copied.

    JSON files must parse: a broken tokenizer.json copied into the student would only fail
    later, when someone loads it."""
    copied = []
    for name in names:
        if reader.exists(name):
            data = reader.read_bytes(name)
            if name.endswith(".json"):
                parse_json(data, f"{reader.url}/{name}")
            writer.write_bytes(name, data)
            copied.append(name)
    return copied
