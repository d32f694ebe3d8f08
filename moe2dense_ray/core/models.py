"""Loading checkpoints and tokenizers, strictly: a model that transformers could only load in part
(missing, unexpected or mis-shaped tensors, which it would fill with random values) is one error
line here, never a model that quietly computes something else. Every stage and every Ray worker
that loads a teacher or a student goes through this module.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Iterator

import torch

from .checkpoint import TOKENIZER_FILES, CheckpointReader, TensorSpec
from .errors import UserError
from .families import Family, get_family
from .ray_session import first_line
from .storage import check_small_files, is_local, read_json, url_to_fs

# The small files transformers reads from a checkpoint directory without any size limit: each
# must be a regular file of bounded size (a config.json symlinked to /dev/zero would never end).
METADATA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                  "chat_template.jinja", "model.safetensors.index.json")


_SHOWN = 3  # tensor names listed in an error line before "and N more"


@contextlib.contextmanager
def localize(src: str, cache_dir: str | None = None, *, weights: bool = True) -> Iterator[str]:
    """A local directory holding `src` while the block runs.

    transformers only loads from local paths. Local directories are used in place; a remote
    checkpoint is copied once per node into its cache (`nodecache`, `cache_dir` or
    MOE2DENSE_CACHE_DIR), which every replica on the node then shares, and which is not
    evicted while any of them is inside this block. `weights=False` copies only the metadata
    (config, tokenizer).
    """
    from .nodecache import cached_copy

    fs, path = url_to_fs(src)
    if is_local(fs):
        if not os.path.isdir(path):
            raise UserError(f"no such checkpoint: {src}")
        yield path
        return
    with cached_copy(fs, path, src, weights=weights, root=cache_dir) as local:
        yield local


def load_causal_lm(src: str, *, device: str = "auto", dtype: str = "auto",
                   experts_as_weights: bool = False, moe: bool = True) -> tuple[Any, dict[str, Any], str]:
    """Load a (teacher) checkpoint for inference: `(model, config dict, device)`.

    bf16 (the checkpoint's dtype) on GPUs, fp32 on CPU, where bf16 matmuls are slow and
    imprecise. A model larger than one GPU is sharded over the process's GPUs (`device_map`).
    Quantized experts are dequantized where their weights must be read as tensors
    (`experts_as_weights`: calibration runs each expert from its weights). `moe=False` loads a
    dense model (prune-dense), whose caller checks its structure instead of its MoE family.

    Every problem is one `UserError` line: a tensor that is missing, unexpected or of the wrong
    shape (transformers would quietly fill the model with random weights instead), or any other
    failure of transformers to load the checkpoint.
    """
    from transformers import AutoModelForCausalLM

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    with localize(src) as path:
        check_small_files(path, METADATA_FILES)
        cfg = read_json(url_to_fs(path)[0], os.path.join(path, "config.json"), what=f"{src}/config.json")
        if moe:
            get_family(cfg.get("model_type"))  # an unsupported family fails here, in one line
        kwargs: dict[str, Any] = {}
        if dtype == "auto":
            kwargs["dtype"] = "auto" if device.startswith("cuda") else torch.float32
        else:
            kwargs["dtype"] = getattr(torch, dtype)
        quant = (cfg.get("quantization_config") or {}).get("quant_method")
        if quant == "mxfp4" and (experts_as_weights or not device.startswith("cuda")):
            from transformers import Mxfp4Config

            kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
        elif quant == "fp8" and (experts_as_weights or not device.startswith("cuda")):
            from transformers import FineGrainedFP8Config

            block = tuple(cfg["quantization_config"].get("weight_block_size") or (128, 128))
            kwargs["quantization_config"] = FineGrainedFP8Config(weight_block_size=block, dequantize=True)
        if device.startswith("cuda") and torch.cuda.device_count() > 1:
            kwargs["device_map"] = "auto"  # shard a teacher too big for one GPU over the actor's GPUs
        with _transformers_log() as log:
            try:
                # mismatched shapes are reported (below, by name), not raised as transformers' own
                # "see the report above" error
                model, info = AutoModelForCausalLM.from_pretrained(
                    path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - transformers fails in many types; all mean "cannot load"
                raise UserError(f"cannot load {src}: {_load_failure(e, log)}") from None
        _check_loading_info(src, path, info)
        model.eval()
    if "device_map" not in kwargs:
        model.to(device)
    return model, cfg, device


@contextlib.contextmanager
def _transformers_log() -> Iterator[list[str]]:
    """transformers' own log while loading, kept instead of printed: its multi-line load report
    becomes one error line here, and the CLI promises one line."""
    import logging

    from transformers.utils import logging as hf_logging

    root = hf_logging.get_logger()  # the library's root logger, which holds its stderr handler
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                lines.extend(record.getMessage().splitlines())
            except Exception:  # noqa: BLE001 - a log record must never break loading
                pass

    saved = root.handlers[:]
    root.handlers = [Keep(logging.WARNING)]
    try:
        yield lines
    finally:
        root.handlers = saved


def _load_failure(e: Exception, log: list[str]) -> str:
    """One line for a failed `from_pretrained`: the cause's first line, or, where transformers only
    says "see the report above", the report's own error (e.g. experts of different shapes)."""
    line = first_line(e)
    if "report" in line:
        causes = [ln.strip() for ln in log if ln.strip().startswith(("Error:", "RuntimeError:", "ValueError:"))
                  or "expects each tensor" in ln]
        if causes:
            line = " ".join(causes[0].split())
            line = line.split(": ", 1)[1] if line.startswith(("RuntimeError:", "ValueError:")) else line
    return line if isinstance(e, (OSError, ValueError, RuntimeError)) else f"{type(e).__name__}: {line}"


def _names(keys, *, shown: int = _SHOWN) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def _check_loading_info(src: str, path: str, info: dict[str, Any]) -> None:
    """Refuse a model that transformers loaded only in part: missing tensors are random-initialised,
    which would give complete-looking statistics of a model that does not exist."""
    problems = []
    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    mismatched, errors = info.get("mismatched_keys") or (), info.get("error_msgs") or ()
    if missing:
        problems.append(f"missing {_names(missing)}{_unindexed_shards(path)} (transformers would fill "
                        f"{'them' if len(missing) > 1 else 'it'} with random values)")
    if mismatched:
        shown = sorted(mismatched)[:_SHOWN]
        more = f" and {len(mismatched) - _SHOWN} more" if len(mismatched) > _SHOWN else ""
        problems.append("shapes that disagree with config.json: " + ", ".join(
            f"{k} is {tuple(ck)} in the checkpoint but {tuple(mk)} by the config" for k, ck, mk in shown) + more)
    if unexpected:
        problems.append(f"tensors the model does not have: {_names(unexpected)}")
    if errors:
        problems.append(first_line(str(errors[0])))
    if problems:
        raise UserError(f"{src} is not a complete checkpoint of the model its config.json describes: "
                        + "; ".join(problems))


def _unindexed_shards(path: str) -> str:
    """A hint when weights sit in a shard that model.safetensors.index.json does not name."""
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        return ""
    try:
        named = set((read_json(url_to_fs(path)[0], index).get("weight_map") or {}).values())
    except UserError:
        return ""
    left_out = sorted(n for n in os.listdir(path) if n.endswith(".safetensors") and n not in named)
    return f" ({', '.join(left_out)} {'is' if len(left_out) == 1 else 'are'} not in its index)" if left_out else ""


def decoder_layers(model) -> Any:
    inner = getattr(model, "model", model)
    return inner.layers


def load_tokenizer(src: str):
    from transformers import AutoTokenizer

    try:
        with localize(src, weights=False) as path:
            check_small_files(path, METADATA_FILES)
            if not any(os.path.exists(os.path.join(path, n)) for n in TOKENIZER_FILES):
                # transformers would quietly build an empty tokenizer, and every text would be 0 tokens
                raise UserError(f"{src} has no tokenizer ({' / '.join(TOKENIZER_FILES)}); copy the "
                                f"teacher's tokenizer files next to its config.json")
            return AutoTokenizer.from_pretrained(path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exceptions for broken files
        raise UserError(f"cannot load the tokenizer of {src}: {first_line(e)}") from None


def check_complete(dense_cfg: dict, specs: list[TensorSpec], family: Family | None = None, *,
                   owner: str = "the source checkpoint", model_name: str = "the dense model") -> None:
    """`specs` (an output's tensors, or a checkpoint's) are exactly the tensors the model of
    `dense_cfg` has, with its shapes; `family` renames them as transformers does when it loads.

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
        raise UserError(f"{owner} lacks {len(missing)} tensor(s) {model_name} needs, e.g. "
                        f"{', '.join(missing[:3])}: it is incomplete or not the model its config describes")
    if unexpected:
        raise UserError(f"{model_name} has no place for {len(unexpected)} tensor(s) of {owner.removeprefix('the ')}, "
                        f"e.g. {', '.join(unexpected[:3])}")
    if wrong:
        k = wrong[0]
        raise UserError(f"tensor {k} {'would have' if owner == 'the source checkpoint' else 'of ' + owner + ' has'} "
                        f"shape {have[k]}, {model_name} needs {expected[k]}")


_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def _as_loaded(specs: list[TensorSpec], family: Family | None) -> dict[str, tuple[int, ...]]:
    """Names and shapes as transformers holds them in memory: renamed as its checkpoint-conversion
    mapping renames them, and the per-expert tensors of an MoE-layout student
    (`experts.0.{gate,up,down}`) fused into `gate_up_proj`/`down_proj`."""
    if family is None:  # a dense model saved by transformers: its names are already the loaded ones
        return {spec.name: spec.shape for spec in specs}
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


def check_weights(src: str, *, what: str) -> dict[str, Any]:
    """The checkpoint `src` holds exactly the tensors of the model its config.json describes, with
    their shapes, read from the safetensors headers alone (no weight loaded, the model built on
    the meta device): one line naming a missing, unexpected or mis-shaped tensor, on the driver,
    before any worker loads it (where transformers would fill a missing one with random values).
    Returns the config."""
    reader = CheckpointReader(src)
    try:
        cfg = reader.config_dict()
        specs = [TensorSpec(k, tuple(reader.shape(k)), reader.dtype(k)) for k in reader.keys()
                 if str(reader.key_to_file.get(k, "")).endswith(".safetensors")]
    finally:
        reader.close()
    try:  # an MoE-layout model (one expert kept) is stored per expert and fused when loaded
        family: Family | None = get_family(cfg.get("model_type"))
    except UserError:
        family = None  # a dense model: its names on disk are the loaded ones
    if specs:  # pickle (.bin) weights have no headers to read: the loader checks them when it loads
        check_complete(cfg, specs, family, owner=f"{what} {src}", model_name="its model (config.json)")
    return cfg
