"""Calibration statistics: additive float64 sums per MoE layer (see docs/stats.md).

Because every entry is a sum over tokens, partial statistics from any number of workers are
combined by addition, and scores are computed from the sums afterwards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .checkpoint import CheckpointWriter, url_to_fs
from .errors import UserError

STATS_FILE = "stats.safetensors"
META_FILE = "meta.json"
STATS_VERSION = 1


def add_sums(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Element-wise sum of two statistic dicts (keys present in either)."""
    out = {k: v.clone() for k, v in a.items()}
    for k, v in b.items():
        out[k] = out[k] + v if k in out else v.clone()
    return out


@dataclass
class Stats:
    sums: dict[str, torch.Tensor]  # keys "layers.{i}.{name}"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return self.meta["model_type"]

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def moe_layers(self) -> list[int]:
        return list(self.meta["moe_layers"])

    @property
    def full(self) -> bool:
        return bool(self.meta.get("full"))

    @property
    def source(self) -> str | None:
        return self.meta.get("source")

    @property
    def tokens(self) -> int:
        return int(self.meta.get("tokens", 0))

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        prefix = f"layers.{index}."
        out = {k[len(prefix):]: v for k, v in self.sums.items() if k.startswith(prefix)}
        if not out:
            raise UserError(f"the statistics have no entry for layer {index}")
        return out

    def __add__(self, other: "Stats") -> "Stats":
        meta = dict(self.meta)
        meta["tokens"] = self.tokens + other.tokens
        meta["samples"] = int(self.meta.get("samples", 0)) + int(other.meta.get("samples", 0))
        return Stats(add_sums(self.sums, other.sums), meta)

    def save(self, url: str, *, overwrite: bool = False) -> None:
        """Write atomically: a STATS directory is complete or absent (the checkpoint writer's
        partial-directory-then-move, with no tensor shards)."""
        with CheckpointWriter(url, overwrite=overwrite, what="statistics") as w:
            w.write_bytes(STATS_FILE, safetensors_save({k: v.contiguous() for k, v in self.sums.items()}))
            w.write_json(META_FILE, self.meta)

    @classmethod
    def load(cls, url: str) -> "Stats":
        fs, path = url_to_fs(url)
        if not fs.exists(f"{path}/{META_FILE}") or not fs.exists(f"{path}/{STATS_FILE}"):
            raise UserError(f"{url} is not a statistics directory (run `moe2dense calibrate` first)")
        with fs.open(f"{path}/{META_FILE}", "r") as f:
            try:
                meta = json.loads(f.read())
            except json.JSONDecodeError as e:
                raise UserError(f"{url}/{META_FILE} is not valid JSON ({e.msg}); re-run `moe2dense calibrate`") from None
        if not isinstance(meta, dict) or meta.get("version") != STATS_VERSION:
            version = meta.get("version") if isinstance(meta, dict) else None
            raise UserError(f"{url}: statistics version {version} is not {STATS_VERSION}")
        with fs.open(f"{path}/{STATS_FILE}", "rb") as f:
            try:
                sums = safetensors_load(f.read())
            except Exception as e:  # safetensors raises its own error type for corrupt files
                raise UserError(f"{url}/{STATS_FILE} is corrupt ({' '.join(str(e).split())}); "
                                f"re-run `moe2dense calibrate`") from None
        return cls(sums, meta)
