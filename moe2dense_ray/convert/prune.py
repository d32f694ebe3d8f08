"""`moe2dense prune-dense`: width-prune a dense model's FFNs, the dense-to-dense baseline.

So that an MoE-to-dense student can be compared with a dense model of the same size pruned from
a dense peer, as in Minitron (arXiv 2407.14679, width pruning of the MLP): each FFN neuron j of
layer l gets an importance from calibration text,

    importance[l, j] = sum over calibration tokens t of |act_fn(gate_j . x_t) * (up_j . x_t)|,

the absolute value of the neuron's activation, the input of `down_proj`, read by a hook from
what the model really computes. Minitron aggregates with a mean (or L2) over batch and
sequence; a sum over all real (non-padding) tokens ranks neurons exactly as the mean does (it
is the mean times the token count) and, like every statistic in this package, adds up across
batches and workers. The top `width` neurons of each layer are kept in their original order:
rows of `gate_proj`/`up_proj` (and their biases), columns of `down_proj`; the config gets
`intermediate_size = width`. Dropping neuron j is exactly zeroing its up row, so keeping every
neuron reproduces the model bit for bit.

Calibration runs in this process (one model replica, no Ray); writing streams tensor by tensor
through the same `CheckpointWriter` as `build`, with the same output guarantees. What was kept
is recorded in DST/moe2dense_prune.json: per layer the `kept` neuron ids and the `importance` of
every neuron.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from ..core.config import DATA_HELP, BuildOutput, CalibrationBlocks, positional
from ..core.errors import UserError

PRUNE_FILE = "moe2dense_prune.json"
PRUNE_VERSION = 1
IMPORTANCE = ("sum over calibration tokens of |act_fn(gate_proj(x)) * up_proj(x)| per FFN neuron "
              "(Minitron activation importance; the mean times the token count, so batches add)")

_PROJ = ("gate_proj", "up_proj", "down_proj")
_MLP_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.(.+)$")


class PruneConfig(CalibrationBlocks, BuildOutput):
    """`moe2dense prune-dense`: where it writes is what `build` takes (`BuildOutput`), what it reads
    is calibration blocks as every conversion pass reads them (`CalibrationBlocks`)."""

    src: str = positional("dense checkpoint to prune (local or URL)", metavar="MODEL")
    width: int = Field(..., ge=1, description="FFN neurons kept per layer, 1..intermediate_size",
                       json_schema_extra={"metavar": "W", "aliases": ["-W"]})
    data: str = Field(..., description=DATA_HELP, json_schema_extra={"metavar": "DATA"})
    batch_size: int = Field(4, ge=1, description="blocks per forward pass", json_schema_extra={"metavar": "B"})


@dataclass(frozen=True)
class DenseShape:
    """What pruning needs to know of a dense gated-FFN model, checked against its tensors."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    biases: tuple[str, ...]  # e.g. ("gate_proj.bias", "up_proj.bias", "down_proj.bias") with mlp_bias


@dataclass
class PruneReport:
    out: str
    model_type: str
    intermediate_size: int
    width: int
    params_before: int
    params_after: int
    tokens: int
    kept: list[list[int]]
    importance: list[list[float]]
    seconds: float


def inspect_dense(src: str, *, allow_pickle: bool = False):
    """Open `src` and check it is a dense model with gated FFNs `mlp.{gate,up,down}_proj` in every
    layer, of the width its config says: `(reader, config dict, config, DenseShape)`. Anything else (an
    MoE, a fused or ungated FFN, per-layer widths) is one UserError line."""
    from transformers import CONFIG_MAPPING

    from ..core.checkpoint import CheckpointReader
    from ..core.source import hf_config

    reader = CheckpointReader(src, allow_pickle=allow_pickle)
    try:
        cfg_dict = reader.config_dict()
        mt = cfg_dict.get("model_type")
        if not isinstance(mt, str) or mt not in CONFIG_MAPPING:
            raise UserError(f"{src}/config.json has model_type {mt!r}, which transformers does not know")
        cfg = hf_config(src, cfg_dict)
        experts = [k for k in reader.keys() if ".experts." in k or k.endswith(".experts")]
        if experts:
            raise UserError(f"{src} is a Mixture-of-Experts model ({mt}, e.g. {experts[0]}): prune-dense prunes "
                            f"dense models; turn this one into a dense model with `moe2dense convert`")
        shape = _dense_shape(src, reader, cfg, mt)
    except BaseException:
        reader.close()
        raise
    return reader, cfg_dict, cfg, shape


def _dense_shape(src: str, reader, cfg, mt: str) -> DenseShape:
    def positive(name: str) -> int:
        v = getattr(cfg, name, None)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            why = "per-layer FFN widths are not supported" if isinstance(v, (list, tuple)) else "not a positive integer"
            raise UserError(f"{src}: {name}={v!r} in config.json: {why}")
        return v

    L, H = positive("num_hidden_layers"), positive("hidden_size")
    if getattr(cfg, "intermediate_size", None) is None:
        raise UserError(f"{src} is not a dense model with gated (SwiGLU) FFNs mlp.gate_proj/up_proj/down_proj: "
                        f"its {mt} config.json has no intermediate_size")
    I = positive("intermediate_size")
    per_layer: dict[int, set[str]] = {}
    for key in reader.keys():
        m = _MLP_KEY.match(key)
        if m:
            per_layer.setdefault(int(m.group(1)), set()).add(m.group(2))
    weights = {f"{p}.weight" for p in _PROJ}
    allowed = weights | {f"{p}.bias" for p in _PROJ}
    biases: tuple[str, ...] | None = None
    for i in range(L):
        have = per_layer.get(i, set())
        if not weights <= have or not have <= allowed:
            shown = ", ".join(f"mlp.{n}" for n in sorted(have)[:4]) or "no model.layers.N.mlp tensors"
            raise UserError(f"{src} is not a dense model with gated (SwiGLU) FFNs mlp.gate_proj/up_proj/down_proj: "
                            f"layer {i} has {shown}")
        mine = tuple(sorted(have - weights))
        if biases is not None and mine != biases:
            raise UserError(f"{src}: layer {i} has FFN biases {list(mine)}, layer 0 has {list(biases)}")
        biases = mine
        want = {"gate_proj.weight": (I, H), "up_proj.weight": (I, H), "down_proj.weight": (H, I),
                "gate_proj.bias": (I,), "up_proj.bias": (I,), "down_proj.bias": (H,)}
        for name in have:
            key = f"model.layers.{i}.mlp.{name}"
            if tuple(reader.shape(key)) != want[name]:
                raise UserError(f"{src}: tensor {key} has shape {tuple(reader.shape(key))}, but config.json "
                                f"(hidden_size {H}, intermediate_size {I}) implies {want[name]}")
    return DenseShape(model_type=mt, num_layers=L, hidden_size=H, intermediate_size=I, biases=biases or ())


def neuron_importance(model, input_ids, attention_mask, *, batch_size: int = 4, bar=None) -> tuple[list, int]:
    """Per layer, float64 [intermediate_size] sums over the real tokens of |input of down_proj|;
    returns `(sums, tokens)`. Hooks read the activation the model computes, whatever its act_fn."""
    import torch

    from ..core.models import decoder_layers

    layers = decoder_layers(model)
    sums: list[Any] = [None] * len(layers)
    state: dict[str, Any] = {"mask": None}

    def hook(i: int):
        def pre(module, args):
            a = args[0].reshape(-1, args[0].shape[-1])
            if state["mask"] is not None:
                a = a[state["mask"].to(a.device)]
            part = a.abs().sum(0, dtype=torch.float64)
            sums[i] = part if sums[i] is None else sums[i].add_(part)
        return pre

    handles = []
    for i, layer in enumerate(layers):
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if down is None:
            raise UserError(f"layer {i} of the loaded model has no mlp.down_proj module to measure")
        handles.append(down.register_forward_pre_hook(hook(i)))
    decoder = getattr(model, "model", model)  # no LM head: its logits are not needed
    dev = next(model.parameters()).device
    tokens = 0
    try:
        with torch.inference_mode():
            for s in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[s:s + batch_size].to(dev)
                mask = attention_mask[s:s + batch_size].to(dev)
                flat = mask.reshape(-1).bool()
                state["mask"] = None if bool(flat.all()) else flat
                decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                n = int(mask.sum())
                tokens += n
                if bar is not None:
                    bar.update(n)
    finally:
        for h in handles:
            h.remove()
    if any(s is None for s in sums):
        raise UserError("the model's FFNs were never run on the calibration text")
    return [s.cpu() for s in sums], tokens


def keep_top(importance, width: int):
    """The `width` most important neuron ids, in their original order (ties: the lower id)."""
    import torch

    order = torch.argsort(importance, descending=True, stable=True)[:width]
    return torch.sort(order).values


def prune_dense(cfg: PruneConfig, *, progress: bool = True) -> PruneReport:
    """Width-prune the FFNs of the dense model `cfg.src` to `cfg.width` neurons per layer (module
    docstring).

    Everything that can be checked is checked before the model is loaded: the structure, the
    width against the model's, DST (never an input, locked for the whole run), the tokenizer's ids
    against the vocabulary.
    """
    import torch

    from ..core.checkpoint import CheckpointWriter, TensorSpec, copy_aux_files
    from ..core.data import token_blocks
    from ..core.families import Family
    from ..core.models import check_complete, load_causal_lm
    from ..core.progress import Progress
    from ..core.storage import OutputLock, check_output

    t0 = time.time()
    src, data, out, width, seq_len, dtype = cfg.src, cfg.data, cfg.out, cfg.width, cfg.seq_len, cfg.dtype
    overwrite = cfg.overwrite
    reader, cfg_dict, hf_cfg, shape = inspect_dense(src, allow_pickle=cfg.allow_pickle)
    with contextlib.ExitStack() as held:
        held.callback(reader.close)
        I = shape.intermediate_size
        if width > I:
            raise UserError(f"--width {width} must be between 1 and the model's intermediate_size {I}")
        check_output(out, what="checkpoint", overwrite=overwrite, sources=(src, data))
        held.enter_context(OutputLock(out))  # held to the end: a second run for the same DST fails at once
        max_len = getattr(hf_cfg, "max_position_embeddings", None)
        if isinstance(max_len, int) and seq_len > max_len:
            raise UserError(f"--seq-len {seq_len} is longer than {src} was trained for "
                            f"(max_position_embeddings {max_len})")
        out_dtype = getattr(torch, dtype) if dtype else None

        # the output's layout, and its completeness against the pruned model, before any work
        mlp = {f"model.layers.{i}.mlp.{n}": (i, n) for i in range(shape.num_layers)
               for n in (*(f"{p}.weight" for p in _PROJ), *shape.biases)}
        steps = []
        for key in reader.keys():
            src_dtype = reader.dtype(key)
            dt = out_dtype if out_dtype is not None and src_dtype.is_floating_point else src_dtype
            dims = tuple(reader.shape(key))
            if key in mlp:
                name = mlp[key][1]
                if name.startswith(("gate_proj.", "up_proj.")):
                    dims = (width, *dims[1:])
                elif name == "down_proj.weight":
                    dims = (dims[0], width)
            steps.append((key, dims, dt))
        layout = [TensorSpec(k, d, dt) for k, d, dt in steps]
        pruned_cfg = {k: v for k, v in cfg_dict.items() if k not in ("quantization_config", "auto_map")}
        pruned_cfg["intermediate_size"] = width
        if out_dtype is not None:
            pruned_cfg["dtype"] = dtype
        elif "quantization_config" in cfg_dict:  # FP8 weights are read dequantized, written in bf16
            pruned_cfg["dtype"] = "bfloat16"
        arch = (cfg_dict.get("architectures") or [""])[0]
        check_complete(pruned_cfg, layout, Family(
            model_type=shape.model_type, dense_model_type=shape.model_type, dense_architecture=arch,
            dense_layout="mlp", expert_layout="per_expert", experts_attr="", expert_size_attr="intermediate_size"))

        calib = token_blocks(src, data, hf_cfg, samples=cfg.samples, seq_len=seq_len, seed=cfg.seed,
                             text_field=cfg.text_field, doing="pruning")
        model, _, _ = load_causal_lm(src, moe=False)
        bar = Progress(calib.num_tokens, "importance", unit="tok", enabled=progress)
        try:
            sums, tokens = neuron_importance(model, calib.input_ids, calib.attention_mask,
                                             batch_size=cfg.batch_size, bar=bar)
        finally:
            bar.close()
        del model
        if tokens == 0:
            raise UserError(f"the calibration set from {data} is empty (0 tokens)")
        if len(sums) != shape.num_layers or any(s.shape != (I,) for s in sums):
            raise UserError(f"the loaded model's FFNs do not match {src}/config.json "
                            f"({shape.num_layers} layers of width {I})")
        bad = [i for i, s in enumerate(sums) if not bool(torch.isfinite(s).all())]
        if bad:
            raise UserError(f"the FFN activations of layer {bad[0]} of {src} overflow to NaN or infinity on the "
                            f"calibration text: its importance cannot rank neurons")
        kept = [keep_top(s, width) for s in sums]

        def produce(key: str, dt):
            t = reader.get(key)
            if key in mlp:
                i, name = mlp[key]
                if name.startswith(("gate_proj.", "up_proj.")):
                    t = t[kept[i]]
                elif name == "down_proj.weight":
                    t = t[:, kept[i]]
            return t.to(dt)

        record = {
            "version": PRUNE_VERSION, "method": "activation", "importance_definition": IMPORTANCE,
            "source": _recorded(src), "data": _recorded(data), "samples": calib.num_samples, "seq_len": seq_len,
            "seed": cfg.seed, "tokens": tokens, "model_type": shape.model_type, "intermediate_size": I,
            "width": width,
            "layers": [{"layer": i, "kept": kept[i].tolist(), "importance": sums[i].tolist()}
                       for i in range(shape.num_layers)],
        }
        params_before = sum(int(torch.Size(reader.shape(k)).numel()) for k in reader.keys())
        with CheckpointWriter(out, max_shard_bytes=cfg.max_shard_bytes, overwrite=overwrite, sources=(src, data),
                              layout=layout) as writer:
            wbar = Progress(len(layout), "write", unit="tensors", enabled=progress)
            for key, _, dt in steps:
                writer.add(key, produce(key, dt))
                wbar.update(1)
            wbar.close()
            record["params_before"], record["params_after"] = params_before, writer.total_numel
            writer.write_json("config.json", pruned_cfg)
            copy_aux_files(reader, writer)
            writer.write_text(PRUNE_FILE, _record_text(record))
    return PruneReport(out=out, model_type=shape.model_type, intermediate_size=I, width=width,
                       params_before=params_before, params_after=writer.total_numel, tokens=tokens,
                       kept=[k.tolist() for k in kept], importance=[s.tolist() for s in sums],
                       seconds=time.time() - t0)


def _record_text(record: dict[str, Any]) -> str:
    """The record as JSON with one line per layer (an indented list of a 20k-neuron layer would be
    20k lines)."""
    import json

    head = json.dumps({k: v for k, v in record.items() if k != "layers"}, indent=2)
    layers = ",\n".join("    " + json.dumps(x, separators=(", ", ": ")) for x in record["layers"])
    return f'{head[:-2]},\n  "layers": [\n{layers}\n  ]\n}}\n'


def _recorded(path: str) -> str:
    """Local paths as absolute paths (a record must still say where it came from elsewhere)."""
    if "://" in path or "::" in path or path.startswith("hf:"):
        return path
    return os.path.abspath(path)


__all__ = ["PruneConfig", "PruneReport", "DenseShape", "prune_dense", "inspect_dense", "neuron_importance",
           "keep_top", "PRUNE_FILE"]
