"""Lazy checkpoint reading and atomic sharded writing, over any fsspec filesystem.

The reader parses each safetensors header once and then reads one tensor's byte range at a
time, so a 60 GB teacher on object storage costs the memory of the tensors in use, never of a
whole shard. The writer buffers tensors up to a shard size, writes shards into a sibling
`.partial-*` directory and moves it into place only when everything, index and configs included,
is written: an interrupted run never leaves a destination that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import struct
import uuid
from typing import Any, Iterable

import fsspec
import torch
from safetensors.torch import save as safetensors_save

from .errors import UserError

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


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, path = fsspec.core.url_to_fs(str(url))
    except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs: fsspec says what to install
        raise UserError(f"cannot open {url}: {' '.join(str(e).split())}") from None
    return fs, path.rstrip("/") or path


# What marks a directory as a moe2dense output that --overwrite may replace.
OUTPUT_MARKERS = {"checkpoint": ("config.json", "moe2dense_plan.json"), "statistics": ("meta.json",),
                  "logits": ("stream.json",), "run": ("distill.yaml",)}


def check_output(url: str, *, what: str, overwrite: bool, sources: tuple[str, ...] = ()) -> None:
    """Refuse an output location before any work is done, rather than fail (or destroy) at the end.

    - the output may never be one of the inputs (`--out` = SRC would replace the teacher);
    - an existing non-empty location is replaced only with --overwrite, and only when it holds
      an output of the same kind: --overwrite must not delete a directory of someone's files;
    - a local destination's nearest existing parent must be writable.
    """
    fs, path = url_to_fs(url)
    for src in sources:
        sfs, spath = url_to_fs(src)
        same = type(sfs) is type(fs) and (spath == path if not is_local(fs) else
                                            os.path.realpath(spath) == os.path.realpath(path))
        if same:
            raise UserError(f"--out {url} is the source {src}: write the {what} somewhere else")
    if fs.exists(path):
        if not fs.isdir(path):
            raise UserError(f"{url} exists and is a file, not a {what} directory")
        if fs.ls(path, detail=False):
            if not overwrite:
                raise UserError(f"{url} already exists (use --overwrite to replace it)")
            markers = OUTPUT_MARKERS[what]
            if not any(fs.exists(f"{path}/{m}") for m in markers):
                raise UserError(f"{url} is not a {what} directory (no {' or '.join(markers)}); "
                                f"refusing to replace it even with --overwrite")
    if is_local(fs):
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"cannot write {url}: {parent} is not writable")


def parse_config(data: str | bytes, where: str) -> dict[str, Any]:
    """A config.json's contents, or a one-line UserError saying what is wrong with it."""
    try:
        cfg = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where} is not valid JSON ({getattr(e, 'msg', None) or e.reason})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{where} holds a JSON {type(cfg).__name__}, not an object")
    return cfg


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is the local filesystem (where paths can go to os.* and transformers)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


class _SafetensorsFile:
    """One .safetensors file: its header, and byte-range reads of single tensors."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str):
        self.fs, self.path = fs, path
        name = posixpath.basename(path)
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
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict[str, Any]] = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise UserError(
                f"{name} is truncated: its header promises {self.data_start + end} bytes, "
                f"the file has {size}"
            )
        for key, e in header.items():
            if e.get("dtype") not in _DTYPES:
                raise UserError(f"{name}: tensor {key} has unsupported dtype {e.get('dtype')!r}")
            begin, stop = e["data_offsets"]
            if stop - begin != math.prod(e["shape"]) * _ITEMSIZE[e["dtype"]]:
                raise UserError(f"{name} is corrupted: tensor {key} has the wrong byte length")
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
        if index in names:
            weight_map = json.loads(self.read_text(index)).get("weight_map", {})
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
                    self.key_to_file[key] = shard
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
                self._pickle[name] = torch.load(f, map_location="cpu", weights_only=True)
        return self._pickle[name]

    # -- metadata -------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return self.fs.exists(self._path(name))

    def read_text(self, name: str) -> str:
        with self.fs.open(self._path(name), "r") as f:
            return f.read()

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open(self._path(name), "rb") as f:
            return f.read()

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


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CheckpointWriter:
    """Writes a sharded safetensors checkpoint atomically to a local path or fsspec URL.

    Use as a context manager: on a clean exit the partial directory is moved to `url`; on an
    exception it is deleted and `url` is untouched.
    """

    def __init__(self, url: str, *, max_shard_bytes: int = 1 << 30, overwrite: bool = False,
                 sources: tuple[str, ...] = (), what: str = "checkpoint"):
        self.url = str(url)
        self.fs, self.dest = url_to_fs(self.url)
        check_output(self.url, what=what, overwrite=overwrite, sources=sources)
        self.overwrite = overwrite
        self.tmp = f"{self.dest}.partial-{uuid.uuid4().hex[:8]}"
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self.total_numel = 0  # parameters written: the student's size without re-reading it
        self.keys_written: set[str] = set()

    def __enter__(self) -> "CheckpointWriter":
        self.fs.makedirs(self.tmp, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        self._finish()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.keys_written or key in self._buffer:
            raise RuntimeError(f"tensor {key} written twice")
        t = tensor.detach().to("cpu").contiguous()
        if self._buffer and self._buffer_bytes + _tensor_bytes(t) > self.max_shard_bytes:
            self._flush()
        self._buffer[key] = t
        self._buffer_bytes += _tensor_bytes(t)
        self.total_numel += t.numel()

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = f"shard-{len(self._shards):05d}.tmp"
        data = safetensors_save(self._buffer, metadata={"format": "pt"})
        with self.fs.open(f"{self.tmp}/{name}", "wb") as f:
            f.write(data)
        self._shards.append((name, list(self._buffer)))
        self.keys_written.update(self._buffer)
        self.total_bytes += self._buffer_bytes
        self._buffer, self._buffer_bytes = {}, 0

    def write_text(self, name: str, text: str) -> None:
        with self.fs.open(f"{self.tmp}/{name}", "w") as f:
            f.write(text)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.fs.open(f"{self.tmp}/{name}", "wb") as f:
            f.write(data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def _finish(self) -> None:
        self._flush()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (tmp_name, keys) in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self.fs.mv(f"{self.tmp}/{tmp_name}", f"{self.tmp}/{final}")
            weight_map.update({k: final for k in keys})
        if n > 1:
            self.write_json(
                "model.safetensors.index.json",
                {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
            )
        if self.fs.exists(self.dest):
            self.fs.rm(self.dest, recursive=True)
        self.fs.mv(self.tmp, self.dest, recursive=True)

    def abort(self) -> None:
        try:
            if self.fs.exists(self.tmp):
                self.fs.rm(self.tmp, recursive=True)
        except Exception:  # noqa: BLE001 - cleanup must not hide the original error
            pass


def copy_aux_files(reader: CheckpointReader, writer: CheckpointWriter, names: Iterable[str] = AUX_FILES) -> list[str]:
    """Copy tokenizer and generation files byte for byte; returns the names copied."""
    copied = []
    for name in names:
        if reader.exists(name):
            writer.write_bytes(name, reader.read_bytes(name))
            copied.append(name)
    return copied
