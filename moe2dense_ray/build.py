"""Apply a plan to an MoE checkpoint, streaming it tensor by tensor into a dense checkpoint.

For every MoE layer the student's FFN is the concatenation of the plan's groups (each the
score-weighted average of its experts), with each group's down projection multiplied by its
scale a_j, followed by the shared expert(s). Because SwiGLU acts neuron by neuron,
`FFN(x) = sum_j a_j f_j(x) + shared(x)` exactly: only the token-dependent gate became a constant.
Layers narrower than the student's width are padded with zero neurons, which add exactly 0.

Only the selected experts are ever read, one layer at a time, so peak memory is about one
layer's selected experts plus one output shard, whatever the size of the teacher.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .checkpoint import TOKENIZER_FILES, CheckpointReader, CheckpointWriter, TensorSpec, copy_aux_files
from .errors import UserError
from .families import Family, MoEShape, dense_config_dict, dense_width, get_family, moe_shape
from .plan import PLAN_FILE, Plan, first_nonfinite_json
from .progress import Progress

if TYPE_CHECKING:
    from .config import RefitConfig
    from .refit import Refit

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


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
            m = _LAYER_KEY.match(key)
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


def _meta_ffn(family: Family, width: int, hidden: int) -> Expert:
    def m(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="meta")

    biases = (m(width), m(width), m(hidden)) if family.expert_layout == "interleaved_biased" else ()
    return Expert(m(width, hidden), m(width, hidden), m(hidden, width), *biases)


@dataclass
class _Step:
    """Tensors the builder will write together, declared before `produce` computes them."""

    specs: list[TensorSpec]
    produce: Callable[[], list[torch.Tensor]]
    layer: int | None = None  # set on a layer's last step, for progress


def check_complete(dense_cfg: dict, specs: list[TensorSpec], family: Family) -> None:
    """The output holds exactly the tensors the dense model has, with its shapes.

    transformers would random-initialise a missing tensor (a student without embeddings) and
    ignore an unexpected one, so both are errors here, before any tensor is read. The model is
    instantiated on the meta device: no memory, whatever its size.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**dense_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    required: dict[str, tuple[int, ...]] = {}
    tied: dict[str, tuple[int, ...]] = {}  # a second name of a tied weight: saved or not, both load
    seen: set[int] = set()
    for k, v in model.state_dict(keep_vars=True).items():
        (tied if id(v) in seen else required)[k] = tuple(v.shape)
        seen.add(id(v))
    expected = {**tied, **required}
    have = _as_loaded(specs, family)
    missing = sorted(set(required) - set(have))
    unexpected = sorted(set(have) - set(expected))
    wrong = sorted(k for k in set(have) & set(expected) if have[k] != expected[k])
    if missing:
        raise UserError(f"the source checkpoint lacks {len(missing)} tensor(s) the dense model needs, "
                        f"e.g. {', '.join(missing[:3])}: it is incomplete or not the model its config describes")
    if unexpected:
        raise UserError(f"the dense model has no place for {len(unexpected)} tensor(s) of the source, "
                        f"e.g. {', '.join(unexpected[:3])}")
    if wrong:
        k = wrong[0]
        raise UserError(f"tensor {k} would have shape {have[k]}, the dense model needs {expected[k]}")


_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def _as_loaded(specs: list[TensorSpec], family: Family) -> dict[str, tuple[int, ...]]:
    """Names and shapes as transformers holds them in memory: renamed as its checkpoint-conversion
    mapping renames them, and the per-expert tensors of an MoE-layout student
    (`experts.0.{gate,up,down}`) fused into `gate_up_proj`/`down_proj`."""
    g, u, d = family.expert_keys or ("gate_proj", "up_proj", "down_proj")  # a bare row: prune-dense's dense model
    out: dict[str, tuple[int, ...]] = {}
    fused: dict[str, dict[str, list[tuple[int, ...]]]] = {}
    on_disk, in_memory = f".{family.moe_prefix or family.moe_module}.", f".{family.moe_module}."
    for spec in specs:
        if on_disk != in_memory and on_disk in spec.name:  # Mixtral-style `block_sparse_moe` is `mlp` in memory
            spec = TensorSpec(spec.name.replace(on_disk, in_memory, 1), spec.shape, spec.dtype)
        for disk, memory in family.disk_renames:  # transformers' other renamings (MiMo's attention sinks)
            if disk in spec.name:
                spec = TensorSpec(spec.name.replace(disk, memory, 1), spec.shape, spec.dtype)
        m = _PER_EXPERT.match(spec.name)
        if m is None or m.group(3) not in (g, u, d):
            out[spec.name] = spec.shape
        else:
            fused.setdefault(m.group(1), {}).setdefault(m.group(3), []).append(spec.shape)
    for prefix, projs in fused.items():
        if not projs.get(g) or not projs.get(d):
            out.update({f"{prefix}.{p}": shapes[0] for p, shapes in projs.items()})  # reported as missing
            continue
        (inner, hidden), n = projs[g][0], len(projs[g])
        out[f"{prefix}.gate_up_proj"] = (n, 2 * inner, hidden)
        out[f"{prefix}.down_proj"] = (n, hidden, inner)
    return out


@dataclass
class BuildReport:
    out: str
    model_type: str
    dense_model_type: str
    intermediate_size: int
    teacher_params: int
    student_params: int
    seconds: float


def _load_config(reader: CheckpointReader):
    from transformers import CONFIG_MAPPING

    d = reader.config_dict()
    mt = d.get("model_type")
    family = get_family(mt)
    bad = first_nonfinite_json(d)
    if bad is not None:  # json reads NaN and Infinity; a NaN rms_norm_eps would make every output NaN
        where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in bad[0]).lstrip(".")
        raise UserError(f"{reader.url}/config.json: {where} is {bad[1]}, not a finite number: the config is broken")
    try:
        cfg = CONFIG_MAPPING[mt].from_dict({k: v for k, v in d.items() if k != "quantization_config"})
    except Exception as e:  # noqa: BLE001 - config classes raise anything for a field of the wrong type
        why = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{reader.url}/config.json is not a valid {mt} config: {why[:300]}") from None
    return d, family, cfg


def _check_weight_dtypes(reader: CheckpointReader, cfg_dict: dict) -> None:
    """No weight is stored as integers or booleans: transformers would cast them silently, and the
    student would be copied from a broken checkpoint. Quantized checkpoints store integers by design."""
    if cfg_dict.get("quantization_config"):
        return
    for k in reader.keys():
        if not str(reader.key_to_file.get(k, "")).endswith(".safetensors") or k.endswith("position_ids"):
            continue
        dt = reader.dtype(k)
        if not dt.is_floating_point:
            raise UserError(f"{reader.url}: tensor {k} is stored as {str(dt).replace('torch.', '')}, but the "
                            f"model's weights are floating point: the checkpoint is broken")


def inspect_source(src: str, *, allow_pickle: bool = False) -> tuple[CheckpointReader, dict, Family, object, MoEShape]:
    """Open a source checkpoint and check it is an MoE of a supported family, with a finite config
    and floating-point weights."""
    reader = CheckpointReader(src, allow_pickle=allow_pickle)
    try:
        cfg_dict, family, cfg = _load_config(reader)
        shape = moe_shape(family, cfg)
        _check_weight_dtypes(reader, cfg_dict)
    except BaseException:
        reader.close()
        raise
    return reader, cfg_dict, family, cfg, shape


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


def build(
    src: str,
    plan: Plan,
    out: str,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 1 << 30,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    on_layer: Callable[[int], None] | None = None,
    inputs: tuple[str | None, ...] = (),
    refit: "Refit | RefitConfig | None" = None,
) -> BuildReport:
    """Stream `src` into a dense checkpoint at `out` following `plan` (see module docstring).

    `inputs` are the run's other inputs (the plan's file, the statistics), which `out` may not
    replace or contain, as it may not `src`. `refit` replaces each MoE layer's down projection by
    its closed-form fit (docs/refit.md), recorded in the written plan: a `config.RefitConfig` to
    fit here (DST is checked before the teacher runs), or a `refit.Refit` already fitted."""
    t0 = time.time()
    reader, cfg_dict, family, cfg, shape = inspect_source(src, allow_pickle=allow_pickle)
    check_plan_fits(plan, family, shape, src)
    if refit is not None and not hasattr(refit, "downs"):  # a RefitConfig: fit first, DST checked and held
        from .outputs import OutputLock, check_output
        from .refit import refit as fit_ffns

        reader.close()
        check_output(out, what="checkpoint", overwrite=overwrite, sources=(src, *inputs, refit.data))
        with OutputLock(out):
            fitted = fit_ffns(src, plan, refit, allow_pickle=allow_pickle, progress=progress)
            return build(src, plan, out, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                         allow_pickle=allow_pickle, progress=progress, on_layer=on_layer, inputs=(*inputs, refit.data),
                         refit=fitted)
    if refit is not None:
        plan = refit.recorded(plan)
    if not any(reader.exists(n) for n in TOKENIZER_FILES):
        warnings.warn(f"{src} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): the student will have none either")
    experts = ExpertReader(reader, family, shape)
    routed = plan.groups * shape.expert_size
    width = dense_width(shape, routed) if family.dense_layout == "mlp" else routed
    out_dtype = getattr(torch, dtype) if dtype else None
    by_layer: dict[int, list[str]] = {}
    other: list[str] = []
    dropped: list[str] = []
    for key in reader.keys():
        m = _LAYER_KEY.match(key)
        if m is None:
            other.append(key)
        elif int(m.group(1)) >= shape.num_layers:
            dropped.append(key)  # e.g. DeepSeek-V3's multi-token-prediction layers
        else:
            by_layer.setdefault(int(m.group(1)), []).append(key)
    if dropped:
        warnings.warn(f"dropping {len(dropped)} tensors of layers beyond num_hidden_layers (e.g. {dropped[0]})")

    def copy(key: str) -> _Step:
        src_dtype = reader.dtype(key)  # dequantized FP8 is written in bf16 by default
        dt = out_dtype if out_dtype is not None and src_dtype.is_floating_point else src_dtype
        return _Step([TensorSpec(key, tuple(reader.shape(key)), dt)], lambda: [reader.get(key).to(dt)])

    def zeros(key: str, rows: int, dt: torch.dtype) -> _Step:
        return _Step([TensorSpec(key, (rows,), dt)], lambda: [torch.zeros(rows, dtype=dt)])

    def ffn(i: int, ffn_dtype: torch.dtype) -> _Step:
        meta = ffn_tensors(family, i, _meta_ffn(family, width, shape.hidden_size), ffn_dtype)
        return _Step([TensorSpec(k, tuple(t.shape), t.dtype) for k, t in meta.items()],
                     lambda: list(ffn_tensors(family, i, layer_ffn(i), ffn_dtype).values()), layer=i)

    def layer_ffn(i: int) -> Expert:
        if i not in moe_set:
            return concat_ffn([(experts.mlp(f"model.layers.{i}.{family.dense_prefix}", width=shape.dense_size), 1.0)],
                              width)
        ffn = plan_ffn(plan, i, experts, width=width)
        if refit is not None:
            refit.apply(i, ffn)
        return ffn

    teacher_params = sum(math.prod(reader.shape(k)) for k in reader.keys())
    moe_set = set(shape.moe_layers)
    steps = [copy(key) for key in other]
    for i in range(shape.num_layers):
        keys = by_layer.get(i, [])
        ffn_prefix = f"{experts.moe_prefix(i)}." if i in moe_set else f"{family.dense_prefix}."
        steps += [copy(key) for key in keys if not _LAYER_KEY.match(key).group(2).startswith(ffn_prefix)]
        for proj in family.dense_biases:  # zero biases for projections the dense twin always has
            key = f"model.layers.{i}.{proj}"
            if f"{key}.bias" not in reader and f"{key}.weight" in reader:
                steps.append(zeros(f"{key}.bias", reader.shape(f"{key}.weight")[0],
                                   out_dtype or reader.dtype(f"{key}.weight")))
        if i in moe_set:
            block = f"model.layers.{i}.{experts.moe_prefix(i)}."
            ffn_dtype = _source_dtype(reader, keys, [f"{block}experts."] + [block + k for k in family.fused_keys])
        else:
            ffn_dtype = reader.dtype(_key_of(reader, f"model.layers.{i}.{family.dense_prefix}.{family.dense_keys[0]}.weight"))
        steps.append(ffn(i, out_dtype or ffn_dtype))
    dense_cfg = dense_config_dict(family, cfg_dict, shape, routed)
    if out_dtype is not None:
        dense_cfg["dtype"] = dtype
    elif "quantization_config" in cfg_dict:  # MXFP4 / FP8 sources are dequantized to bf16
        dense_cfg["dtype"] = "bfloat16"
    layout = [spec for step in steps for spec in step.specs]
    check_complete(dense_cfg, layout, family)
    with CheckpointWriter(out, max_shard_bytes=max_shard_bytes, overwrite=overwrite, sources=(src, *inputs),
                          layout=layout) as writer:
        bar = Progress(shape.num_layers, "build", unit="layers", enabled=progress)
        for step in steps:
            for spec, t in zip(step.specs, step.produce()):
                writer.add(spec.name, t)
            if step.layer is not None:
                bar.update(1)
                if on_layer:
                    on_layer(step.layer)
        bar.close()
        writer.write_json("config.json", dense_cfg)
        copy_aux_files(reader, writer)
        writer.write_text(PLAN_FILE, plan.to_json())
    reader.close()
    student_params = writer.total_numel
    return BuildReport(
        out=out, model_type=family.model_type, dense_model_type=family.dense_model_type,
        intermediate_size=width, teacher_params=teacher_params, student_params=student_params,
        seconds=time.time() - t0,
    )


def _source_dtype(reader: CheckpointReader, layer_keys: list[str], prefixes: list[str]) -> torch.dtype:
    """The dtype the student's FFN is written in: the teacher's expert dtype (bf16 for MXFP4), not
    its router's (often kept in float32)."""
    keys = [k for k in layer_keys if k.startswith(tuple(prefixes))]
    if any(k.endswith("_blocks") for k in keys):
        return torch.bfloat16
    for k in keys:
        if reader.dtype(k).is_floating_point:
            return reader.dtype(k)
    return torch.bfloat16


def _key_of(reader: CheckpointReader, key: str) -> str:
    if key not in reader:
        raise UserError(f"{reader.url}: tensor {key} is missing from the checkpoint")
    return key


def read_expert_weights(src: str, *, allow_pickle: bool = False) -> Callable[[int], torch.Tensor]:
    """A lazy `layer -> [E, D]` accessor for weight-space grouping."""
    reader, _, family, _, shape = inspect_source(src, allow_pickle=allow_pickle)
    return ExpertReader(reader, family, shape).expert_weights


__all__ = ["build", "BuildReport", "Expert", "ExpertReader", "concat_ffn", "weighted_average", "plan_ffn",
           "check_plan_fits", "inspect_source", "read_expert_weights"]
