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
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..core.checkpoint import (
    TOKENIZER_FILES,
    CheckpointReader,
    CheckpointWriter,
    TensorSpec,
    copy_aux_files,
)
from ..core.config import BuildConfig, BuildOutput
from ..core.errors import UserError
from ..core.families import dense_config_dict, dense_width
from ..core.models import check_complete
from ..core.progress import Progress
from ..core.source import Source, opened
from ..core.storage import OutputLock, check_output
from .ffn import (
    LAYER_KEY,
    Expert,
    ExpertReader,
    check_plan_fits,
    concat_ffn,
    ffn_tensors,
    meta_ffn,
    plan_ffn,
)
from .plan import PLAN_FILE, Plan, load_plan
from .refit import Refit
from .refit import refit as fit_ffns


@dataclass
class _Step:
    """Tensors the builder will write together, declared before `produce` computes them."""

    specs: list[TensorSpec]
    produce: Callable[[], list[torch.Tensor]]
    layer: int | None = None  # set on a layer's last step, for progress


@dataclass
class BuildReport:
    out: str
    model_type: str
    dense_model_type: str
    intermediate_size: int
    teacher_params: int
    student_params: int
    seconds: float


def build(cfg: BuildConfig, plan: Plan | None = None, *, progress: bool = True, source: Source | None = None,
          fitted: Refit | None = None) -> BuildReport:
    """Stream `cfg.src` into a dense checkpoint at `cfg.out` following the plan (see the module
    docstring): `plan`, or the one in the file `cfg.plan`.

    With `cfg.refit` other than none, each MoE layer's down projection is first replaced by its
    closed-form fit on the teacher (docs/refit.md; DST is checked and held while the teacher runs),
    recorded in the written plan. `fitted` is a refit already made (`convert` fits on the replicas
    that calibrated); `source` the checkpoint the caller has open."""
    t0 = time.time()
    inputs: tuple[str | None, ...] = ()
    if plan is None:
        if not cfg.plan:
            raise UserError("build needs a PLAN (a plan file, or a directory holding moe2dense_plan.json)")
        plan, inputs = load_plan(cfg.plan), (cfg.plan,)
    refit = None if fitted is not None else cfg.refit_config()
    with opened(source or cfg.src, allow_pickle=cfg.allow_pickle) as source:
        check_plan_fits(plan, source.family, source.shape, source.url)
        if refit is not None:
            check_output(cfg.out, what="checkpoint", overwrite=cfg.overwrite, sources=(source.url, *inputs, refit.data))
            with OutputLock(cfg.out):
                fitted = fit_ffns(source, plan, refit, progress=progress)
                return _write(source, plan, cfg, progress=progress, inputs=(*inputs, refit.data), refit=fitted, t0=t0)
        return _write(source, plan, cfg, progress=progress, inputs=inputs, refit=fitted, t0=t0)


def _write(source: Source, plan: Plan, dst: BuildOutput, *, progress: bool, inputs: tuple[str | None, ...],
           refit: Refit | None, t0: float) -> BuildReport:
    """The streaming writer: one step per tensor or FFN, each produced only when written."""
    out, dtype, overwrite = dst.out, dst.dtype, dst.overwrite
    max_shard_bytes = dst.max_shard_bytes
    reader, cfg_dict, family, shape, src = source.reader, source.config, source.family, source.shape, source.url
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
        m = LAYER_KEY.match(key)
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
        meta = ffn_tensors(family, i, meta_ffn(family, width, shape.hidden_size), ffn_dtype)
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
        steps += [copy(key) for key in keys if not LAYER_KEY.match(key).group(2).startswith(ffn_prefix)]
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
        bar.close()
        writer.write_json("config.json", dense_cfg)
        copy_aux_files(reader, writer)
        writer.write_text(PLAN_FILE, plan.to_json())
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


def read_expert_weights(src: "str | Source", *, allow_pickle: bool = False) -> Callable[[int], torch.Tensor]:
    """A lazy `layer -> [E, D]` accessor for weight-space grouping (an opened Source is read in
    place; a path is opened and stays open, since the accessor reads on demand)."""
    source = src if isinstance(src, Source) else Source.open(src, allow_pickle=allow_pickle)
    return ExpertReader(source.reader, source.family, source.shape).expert_weights


__all__ = ["build", "BuildReport", "read_expert_weights"]
