"""A dense FFN made of a plan's experts: reading experts from the checkpoint, concatenating and
scaling them into one FFN, and the tensors that FFN is written as.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.checkpoint import CheckpointReader
from ..core.errors import UserError
from ..core.families import Family, MoEShape
from .plan import Plan

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class Expert:
    """One SwiGLU FFN in canonical form: gate/up [I, H], down [H, I], optional biases."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.gate.shape[0]


def weighted_average(experts: list[Expert], weights: list[float]) -> Expert:
    """Score-weighted merge of a group; a group of one returns its expert unchanged."""
    if len(experts) == 1:
        return experts[0]

    def avg(ts):
        if ts[0] is None:
            return None
        return sum(w * t for w, t in zip(weights, ts))

    return Expert(*(avg([getattr(e, f) for e in experts]) for f in
                    ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")))


def concat_ffn(parts: list[tuple[Expert, float]], width: int) -> Expert:
    """Concatenate experts into one FFN of `width` neurons; part j's output is scaled by a_j."""
    gates = [e.gate for e, _ in parts]
    ups = [e.up for e, _ in parts]
    downs = [e.down * a for e, a in parts]
    have = sum(g.shape[0] for g in gates)
    if have > width:
        raise RuntimeError(f"FFN parts are {have} wide, more than the student's {width}")
    pad = width - have
    H = gates[0].shape[1]
    if pad:
        gates.append(gates[0].new_zeros(pad, H))
        ups.append(ups[0].new_zeros(pad, H))
        downs.append(downs[0].new_zeros(H, pad))
    out = Expert(torch.cat(gates), torch.cat(ups), torch.cat(downs, dim=1))
    if any(e.gate_bias is not None for e, _ in parts):
        def zeros_like_rows(e):
            return e.gate.new_zeros(e.gate.shape[0])
        out.gate_bias = torch.cat([e.gate_bias if e.gate_bias is not None else zeros_like_rows(e) for e, _ in parts]
                                  + ([gates[0].new_zeros(pad)] if pad else []))
        out.up_bias = torch.cat([e.up_bias if e.up_bias is not None else zeros_like_rows(e) for e, _ in parts]
                                + ([gates[0].new_zeros(pad)] if pad else []))
        out.down_bias = sum(a * e.down_bias for e, a in parts if e.down_bias is not None)
    return out


class ExpertReader:
    """Reads experts of one source checkpoint in canonical float32 form, per family layout."""

    def __init__(self, reader: CheckpointReader, family: Family, shape: MoEShape):
        self.r, self.f, self.s = reader, family, shape
        # one pass over the tensor names: which layers keep their MoE block under which name
        self._blocks: set[tuple[int, str]] = set()
        for key in reader.keys():
            m = LAYER_KEY.match(key)
            if m:
                self._blocks.add((int(m.group(1)), m.group(2).split(".", 1)[0]))

    def moe_prefix(self, layer: int) -> str:
        """Where this checkpoint keeps layer `layer`'s MoE block, relative to the layer.

        The family's on-disk name (`block_sparse_moe` for Mixtral) unless the checkpoint was
        saved straight from transformers' in-memory modules, which call every MoE block `mlp`.
        """
        name = self.f.moe_prefix
        return name if (layer, name) in self._blocks or (layer, "mlp") not in self._blocks else "mlp"

    def _prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe_prefix(layer)}"

    def _on_disk(self, key: str) -> str:
        """`key` as this reader holds it: in-memory names are renamed to on-disk ones where
        transformers' mapping says so and the reader lacks the in-memory name."""
        if key in self.r:
            return key
        for disk, memory in self.f.disk_renames:
            if memory in key and key.replace(memory, disk, 1) in self.r:
                return key.replace(memory, disk, 1)
        return key

    def _check(self, key: str, t: torch.Tensor, want: tuple[int, ...]) -> torch.Tensor:
        if tuple(t.shape) != tuple(want):
            raise UserError(
                f"tensor {key} has shape {tuple(t.shape)} but the config implies {tuple(want)}"
            )
        return t

    def _row(self, key: str, e: int, want_full: tuple[int, ...]) -> torch.Tensor:
        """Expert e's slice of a fused [E, ...] tensor (the whole tensor is checked first)."""
        shape = self.r.shape(key) if key in self.r else None
        if shape is None:
            raise UserError(f"{self.r.url}: tensor {key} is missing from the checkpoint")
        if tuple(shape) != tuple(want_full):
            raise UserError(f"tensor {key} has shape {tuple(shape)} but the config implies {tuple(want_full)}")
        return self.r.get_row(key, e)

    def expert(self, layer: int, e: int) -> Expert:
        H, I, E = self.s.hidden_size, self.s.expert_size, self.s.num_experts
        p = self._prefix(layer)
        if self.f.expert_layout == "interleaved_biased":
            return self._interleaved_expert(p, e)
        g, u, d = self.f.expert_keys
        kg = f"{p}.experts.{e}.{g}.weight"
        if kg in self.r:
            ku, kd = f"{p}.experts.{e}.{u}.weight", f"{p}.experts.{e}.{d}.weight"
            return Expert(
                self._check(kg, self.r.get(kg), (I, H)).float(),
                self._check(ku, self.r.get(ku), (I, H)).float(),
                self._check(kd, self.r.get(kd), (H, I)).float(),
            )
        # transformers' in-memory layout saved as is, or the family's own fused names on disk
        for gate_up, down_key in dict.fromkeys((("experts.gate_up_proj", "experts.down_proj"), self.f.fused_keys)):
            fused = f"{p}.{gate_up}"
            if fused not in self.r:
                continue
            gu = self._row(fused, e, (E, 2 * I, H)).float()
            down = self._row(f"{p}.{down_key}", e, (E, H, I)).float()
            return Expert(gu[:I], gu[I:], down)
        if f"{p}.experts.{E}.{g}.weight" not in self.r and e >= E:
            raise UserError(f"layer {layer} has no expert {e}")
        raise UserError(f"{self.r.url}: tensor {kg} is missing from the checkpoint")

    def _interleaved_expert(self, p: str, e: int) -> Expert:
        H, I, E = self.s.hidden_size, self.s.expert_size, self.s.num_experts
        gu_key, dn_key = f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj"
        if f"{gu_key}_blocks" in self.r:
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors

            def deq(name: str, rows: int, cols: int) -> torch.Tensor:
                bshape, sshape = self.r.shape(f"{name}_blocks"), self.r.shape(f"{name}_scales")
                if tuple(bshape) != (E, rows, cols // 32, 16) or tuple(sshape) != (E, rows, cols // 32):
                    raise UserError(f"MXFP4 tensors {name}_blocks/_scales have shapes {tuple(bshape)}/"
                                    f"{tuple(sshape)}, the config implies {(E, rows, cols // 32, 16)}")
                blocks = self.r.get_row(f"{name}_blocks", e)[None]
                scales = self.r.get_row(f"{name}_scales", e)[None]
                return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)[0]

            gu = deq(gu_key, 2 * I, H)  # [H, 2I]
            down = deq(dn_key, H, I)  # [I, H]
        else:
            gu = self._row(gu_key, e, (E, H, 2 * I)).float()
            down = self._row(dn_key, e, (E, I, H)).float()
        gu_b = self._row(f"{gu_key}_bias", e, (E, 2 * I)).float()
        dn_b = self._row(f"{dn_key}_bias", e, (E, H)).float()
        return Expert(gu[:, 0::2].T, gu[:, 1::2].T, down.T, gu_b[0::2], gu_b[1::2], dn_b)

    def mlp(self, prefix: str, width: int | None = None) -> Expert:
        """A plain dense SwiGLU block stored as `{prefix}.{gate,up,down}.weight` (the family's names)."""
        H = self.s.hidden_size
        keys = [self._on_disk(f"{prefix}.{n}.weight") for n in self.f.dense_keys]
        ts = [self.r.get(k) for k in keys]
        I = ts[0].shape[0] if width is None else width
        self._check(keys[0], ts[0], (I, H))
        self._check(keys[1], ts[1], (I, H))
        self._check(keys[2], ts[2], (H, I))
        return Expert(*(t.float() for t in ts))

    def expert_weights(self, layer: int, experts: Sequence[int]) -> torch.Tensor:
        """[len(experts), D] flattened weights of the given routed experts, for weight-space grouping.

        Only the selected experts are read: memory grows with K (what `build` holds anyway to
        concatenate them), not with E, which is 256 for DeepSeek-V3.
        """
        rows = []
        for e in experts:
            x = self.expert(layer, int(e))
            rows.append(torch.cat([x.gate.flatten(), x.up.flatten(), x.down.flatten()]))
        return torch.stack(rows)


def ffn_tensors(family: Family, layer: int, ffn: Expert, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The student's FFN tensors for one layer, named and laid out as the dense family stores them.

    Called on meta tensors too, which gives the output's names, shapes and dtypes before
    anything is read (the writer's layout and the completeness check come from the same code).
    """
    p = f"model.layers.{layer}.{family.dense_prefix}"
    if family.dense_layout == "mlp":
        g, u, d = family.dense_keys
        return {f"{p}.{g}.weight": ffn.gate.to(dtype), f"{p}.{u}.weight": ffn.up.to(dtype),
                f"{p}.{d}.weight": ffn.down.to(dtype)}
    H = ffn.gate.shape[1]
    if family.expert_layout == "interleaved_biased":
        W = ffn.width
        gu = ffn.gate.new_empty(H, 2 * W)
        gu[:, 0::2], gu[:, 1::2] = ffn.gate.T, ffn.up.T
        gub = ffn.gate.new_empty(2 * W)
        zeros = ffn.gate.new_zeros(W)
        gub[0::2] = ffn.gate_bias if ffn.gate_bias is not None else zeros
        gub[1::2] = ffn.up_bias if ffn.up_bias is not None else zeros
        dnb = ffn.down_bias if isinstance(ffn.down_bias, torch.Tensor) else ffn.gate.new_zeros(H)
        return {f"{p}.experts.gate_up_proj": gu[None].to(dtype),
                f"{p}.experts.gate_up_proj_bias": gub[None].to(dtype),
                f"{p}.experts.down_proj": ffn.down.T[None].contiguous().to(dtype),
                f"{p}.experts.down_proj_bias": dnb[None].to(dtype),
                f"{p}.{family.router_key}.weight": ffn.gate.new_zeros(1, H, dtype=dtype),
                f"{p}.{family.router_key}.bias": ffn.gate.new_zeros(1, dtype=dtype)}
    g, u, d = family.expert_keys
    p = f"model.layers.{layer}.{family.moe_prefix}"  # a one-expert student is stored as its family stores MoEs
    out = {f"{p}.experts.0.{g}.weight": ffn.gate.to(dtype), f"{p}.experts.0.{u}.weight": ffn.up.to(dtype),
           f"{p}.experts.0.{d}.weight": ffn.down.to(dtype),
           f"{p}.{family.router_key}.weight": ffn.gate.new_zeros(1, H, dtype=dtype)}
    for key in family.router_extra_keys:  # e.g. a score-correction bias: zero for the one expert
        out[f"{p}.{key}"] = ffn.gate.new_zeros(1, dtype=torch.float32)
    return out


def meta_ffn(family: Family, width: int, hidden: int) -> Expert:
    def m(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="meta")

    biases = (m(width), m(width), m(hidden)) if family.expert_layout == "interleaved_biased" else ()
    return Expert(m(width, hidden), m(width, hidden), m(hidden, width), *biases)


def check_plan_fits(plan: Plan, family: Family, shape: MoEShape, src: str) -> None:
    """The plan was made for this model: its family, expert count and MoE layers."""
    if plan.model_type != family.model_type:
        raise UserError(f"the plan is for {plan.model_type}, the checkpoint is {family.model_type}")
    if plan.num_experts != shape.num_experts:
        raise UserError(f"the plan is for {plan.num_experts} experts, the checkpoint has {shape.num_experts}")
    plan.validate()
    planned = sorted(lp.layer for lp in plan.layers)
    if planned != sorted(shape.moe_layers):
        made_for = f" (made from {plan.source})" if plan.source else ""
        raise UserError(f"the plan{made_for} covers MoE layers {planned}, but {src} has MoE layers "
                        f"{list(shape.moe_layers)}: it was made for a different model")


def plan_ffn(plan: Plan, layer: int, experts: "ExpertReader", *, width: int | None = None) -> Expert:
    """The student's FFN for one MoE layer as the plan makes it: each group the score-weighted
    average of its experts, its down projection times the group's scale, then the shared
    expert(s) times `shared_scale`, zero-padded to `width` (default: no padding).

    `experts` reads from a checkpoint (`build`) or from a teacher in memory (`refit`), so the
    FFN that is refitted is exactly the FFN that is written."""
    from .methods import merge_weights

    family, shape = experts.f, experts.s
    lp = plan.layer(layer)
    parts: list[tuple[Expert, float]] = []
    for group, scale in zip(lp.groups, lp.scales):
        members = [experts.expert(layer, e) for e in group]
        w = merge_weights(group, torch.tensor(lp.scores, dtype=torch.float64))
        parts.append((weighted_average(members, [float(x) for x in w]), float(scale)))
    if family.shared_prefix:
        shared = experts.mlp(f"model.layers.{layer}.{experts.moe_prefix(layer)}.{family.shared_prefix}",
                             width=shape.shared_size)
        parts.append((shared, float(lp.shared_scale)))
    return concat_ffn(parts, sum(e.width for e, _ in parts) if width is None else width)
