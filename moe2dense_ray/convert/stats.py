"""Calibration statistics: additive float64 sums per MoE layer (see docs/stats.md).

Because every entry is a sum over tokens, partial statistics from any number of workers are
combined by addition, and scores are computed from the sums afterwards.

`Stats.load` refuses statistics it cannot trust, each with one UserError line: a meta.json
without its keys or with values of the wrong type, sums missing for a MoE layer, of the wrong
shape for the model's E experts and H hidden size, unknown, or holding NaN/inf. `Stats.save`
refuses NaN/inf sums before writing anything.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from ..core.checkpoint import CheckpointWriter
from ..core.errors import UserError
from ..core.storage import read_json, read_small, url_to_fs

STATS_FILE = "stats.safetensors"
META_FILE = "meta.json"
STATS_VERSION = 1
STATS_LIMIT = 16 << 30  # bytes of sums read at most

# Every sum per MoE layer and its shape (E routed experts, H hidden size), as docs/stats.md lists
# them and calibrate's hooks write them: the router's are always there, the expert-output ones
# with `full`, shared_gate_sum only for families with a gated shared expert.
ROUTER_SUMS: dict[str, tuple[str, ...]] = {
    "tokens": (), "sel_count": ("E",), "prob_sum": ("E",), "prob_sel_sum": ("E",), "gate_sum": ("E",),
    "gate_mass": (), "logit_sum": ("E",), "logit_gram": ("E", "E"),
}
FULL_SUMS: dict[str, tuple[str, ...]] = {
    "sqnorm_all": ("E",), "sqnorm_routed": ("E",), "norm_routed": ("E",), "gate_norm_routed": ("E",),
    "gram": ("E", "E"), "out_sum": ("E", "H"),
}
OPTIONAL_SUMS: dict[str, tuple[str, ...]] = {"shared_gate_sum": ()}
# counts, probabilities and norms: a negative one is a corrupted or hand-edited file, and would
# make a score (or a CP's denominator) meaningless without any error
NONNEGATIVE_SUMS = ("tokens", "sel_count", "prob_sum", "prob_sel_sum", "gate_mass", "sqnorm_all", "sqnorm_routed",
                    "norm_routed", "gate_norm_routed")
SUM_SHAPES = {**ROUTER_SUMS, **FULL_SUMS, **OPTIONAL_SUMS}
META_KEYS = ("version", "model_type", "num_experts", "moe_layers", "tokens")

_KEY = re.compile(r"layers\.(\d+)\.(\w+)")


class _Meta(BaseModel):
    """The meta.json fields that the statistics are read with; others are kept as they are."""

    model_config = ConfigDict(extra="allow", strict=True)

    version: int
    model_type: str = Field(min_length=1)
    num_experts: int = Field(ge=1)
    moe_layers: list[int] = Field(min_length=1)
    tokens: int = Field(ge=1)
    hidden_size: Optional[int] = Field(default=None, ge=1)
    full: bool = False
    source: Optional[str] = None
    samples: Optional[int] = Field(default=None, ge=0)


def add_sums(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Element-wise sum of two statistic dicts (keys present in either)."""
    out = {k: v.clone() for k, v in a.items()}
    for k, v in b.items():
        out[k] = out[k] + v if k in out else v.clone()
    return out


def local_abspath(location: Any) -> Any:
    """`location` as an absolute path when it is a local path; URLs (s3://, memory://, hf:NAME,
    fsspec chains with ::) and non-strings are returned unchanged."""
    if not isinstance(location, str) or not location or "://" in location or "::" in location \
            or location.startswith("hf:"):
        return location
    return os.path.abspath(os.path.expanduser(location))


def first_nonfinite(sums: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """(key, number of NaN/inf entries, number of entries) of the first sum that holds NaN/inf."""
    for key in sorted(sums):
        t = sums[key]
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return key, bad, t.numel()
    return None


def check_meta(meta: Any, where: str) -> dict[str, Any]:
    """Check a parsed meta.json; returns it, or raises one UserError line naming the problem."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}: not statistics moe2dense wrote; "
                        f"re-run `moe2dense calibrate`")
    if meta["version"] != STATS_VERSION or isinstance(meta["version"], bool):
        raise UserError(f"{where}: statistics version {meta['version']!r} is not {STATS_VERSION}; "
                        f"re-run `moe2dense calibrate`")
    try:
        _Meta.model_validate(meta)
    except ValidationError as e:
        parts = []
        for err in e.errors()[:3]:
            loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
            got = repr(err.get("input"))
            parts.append(f"{loc}: {err['msg']}, got {got if len(got) <= 40 else got[:37] + '...'}")
        raise UserError(f"{where}: " + "; ".join(parts)) from None
    layers = meta["moe_layers"]
    if any(i < 0 for i in layers) or len(set(layers)) != len(layers):
        raise UserError(f"{where}: moe_layers {layers} must be distinct non-negative layer indices")
    return meta


def check_sums(sums: dict[str, torch.Tensor], meta: dict[str, Any], where: str) -> None:
    """Check the sums against their meta: every MoE layer has the router's sums (and the
    expert-output ones when `full`), every tensor has its shape for E experts and H hidden size,
    nothing is unknown or for a layer meta does not list, and nothing is NaN/inf."""
    E, H = int(meta["num_experts"]), meta.get("hidden_size")
    layers = set(meta["moe_layers"])
    present: dict[int, set[str]] = {i: set() for i in layers}
    for key, t in sorted(sums.items()):
        m = _KEY.fullmatch(key)
        if m is None or m.group(2) not in SUM_SHAPES:
            raise UserError(f"{where} holds an unknown statistic {key!r}; re-run `moe2dense calibrate`")
        layer, name = int(m.group(1)), m.group(2)
        if layer not in layers:
            raise UserError(f"{where} holds statistics for layer {layer}, which is not among the MoE "
                            f"layers {sorted(layers)} of its meta.json")
        dims, shape, sizes = SUM_SHAPES[name], list(t.shape), {"E": E, "H": H}
        if len(shape) != len(dims) or any(sizes[d] is not None and n != sizes[d] for n, d in zip(shape, dims)):
            spelled = "[" + ", ".join(str(sizes[d] if sizes[d] is not None else d) for d in dims) + "]"
            raise UserError(f"{where}: {key} has shape {shape}, not {spelled} (for {E} experts"
                            f"{f', hidden size {H}' if H is not None else ''}); re-run `moe2dense calibrate`")
        present[layer].add(name)
    required = [*ROUTER_SUMS, *(FULL_SUMS if meta.get("full") else ())]
    for layer in sorted(layers):
        if not present[layer]:
            raise UserError(f"{where} has no statistics for MoE layer {layer}; re-run `moe2dense calibrate`")
        lacking = [n for n in required if n not in present[layer]]
        if lacking:
            raise UserError(f"{where}: MoE layer {layer} lacks {', '.join(lacking)}; re-run `moe2dense calibrate`")
    bad = first_nonfinite(sums)
    if bad is not None:
        key, n, total = bad
        raise UserError(f"{where}: {key} holds NaN or infinite values ({n} of {total}); re-run `moe2dense calibrate`")
    for key, t in sorted(sums.items()):
        if key.rsplit(".", 1)[-1] in NONNEGATIVE_SUMS and bool((t < 0).any()):
            raise UserError(f"{where}: {key} holds negative values ({int((t < 0).sum())} of {t.numel()}), which a "
                            f"count, probability or norm cannot; re-run `moe2dense calibrate`")


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
        partial-directory-then-move, with no tensor shards).

        Statistics holding NaN/inf are refused before anything is written. A local `source` or
        `data` is recorded as an absolute path (here and in `self.meta`), so that a later
        `plan --grouping weight` finds the teacher from any working directory."""
        bad = first_nonfinite(self.sums)
        if bad is not None:
            key, n, total = bad
            raise UserError(f"refusing to save statistics to {url}: {key} holds NaN or infinite values "
                            f"({n} of {total}); the teacher's activations overflowed or its weights are broken")
        self.meta = {**self.meta, **{k: local_abspath(self.meta[k]) for k in ("source", "data") if k in self.meta}}
        with CheckpointWriter(url, overwrite=overwrite, what="statistics") as w:
            w.write_bytes(STATS_FILE, safetensors_save({k: v.contiguous() for k, v in self.sums.items()}))
            w.write_json(META_FILE, self.meta)

    @classmethod
    def load(cls, url: str) -> "Stats":
        """Read and check statistics (see the module docstring); one UserError line if unusable."""
        fs, path = url_to_fs(url)
        if not fs.exists(f"{path}/{META_FILE}") or not fs.exists(f"{path}/{STATS_FILE}"):
            raise UserError(f"{url} is not a statistics directory (run `moe2dense calibrate` first)")
        where = f"{url}/{META_FILE}"
        meta = check_meta(read_json(fs, f"{path}/{META_FILE}", what=where), where)
        # a regular file of bounded size (a symlink to /dev/zero would be read forever); the
        # sums of a 256-expert, 60-layer model with full statistics are about 1 GB
        data = read_small(fs, f"{path}/{STATS_FILE}", what=f"{url}/{STATS_FILE}", limit=STATS_LIMIT)
        try:
            sums = safetensors_load(data)
        except Exception as e:  # safetensors raises its own error type for corrupt files
            raise UserError(f"{url}/{STATS_FILE} is corrupt ({' '.join(str(e).split())}); "
                            f"re-run `moe2dense calibrate`") from None
        check_sums(sums, meta, f"{url}/{STATS_FILE}")
        return cls(sums, meta)
