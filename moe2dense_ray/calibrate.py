"""Calibration: run the MoE teacher over text and accumulate additive routing/expert statistics.

Hooks read what the real transformers modules compute: every family's router returns
`(router_logits, applied_gates, top_k_indices)` and every experts module is called with
`(hidden_states, top_k_indices, applied_gates)`, so the statistics use exactly the gates the model
applies (renormalisation, `routed_scaling_factor`, group-limited top-k, score-correction bias
included) without re-implementing any router.

With `full=True` every routed expert is also run on every (non-padding) calibration token,
batched over experts and chunked over tokens so memory stays bounded, for the output-based
scorings (ACP, DO-ACP, REAP, EAN) and groupings. All statistics are sums (docs/stats.md), so the
calibration set is split over N Ray actors, each holding one teacher replica, and their sums are
added: 1 worker and N workers give the same statistics up to float rounding.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .checkpoint import TOKENIZER_FILES, check_output, is_local, url_to_fs
from .outputs import OutputLock
from .cluster import ensure_ray, first_line, require_resources  # noqa: F401 - ensure_ray re-exported
from .errors import UserError
from .families import Family, MoEShape, get_family, moe_shape
from .outputs import check_small_files, read_json
from .progress import Progress
from .stats import STATS_VERSION, Stats, add_sums

# Elements of expert output materialised at once when running all experts (fp32: 4 bytes each).
EXPERT_CHUNK_ELEMS = 1 << 25

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


def _layers(model) -> Any:
    inner = getattr(model, "model", model)
    return inner.layers


def _expert_outputs(family: Family, experts, x: torch.Tensor) -> torch.Tensor:
    """Outputs of every expert on tokens x [n, H] -> [E, n, H], before the gate is applied."""
    if family.expert_layout == "interleaved_biased":
        h = torch.matmul(x[None], experts.gate_up_proj) + experts.gate_up_proj_bias[:, None, :]
        a = experts._apply_gate(h)
        return torch.matmul(a, experts.down_proj) + experts.down_proj_bias[:, None, :]
    h = torch.matmul(x[None], experts.gate_up_proj.transpose(1, 2))
    gate, up = h.chunk(2, dim=-1)
    return torch.matmul(experts.act_fn(gate) * up, experts.down_proj.transpose(1, 2))


@dataclass
class LoadedTeacher:
    """A teacher in memory with what every pass over it needs: its family row and MoE shape."""

    model: Any
    family: Family
    shape: MoEShape
    device: str
    # what passes derive from the teacher and reuse across passes (a sequential refit's student
    # FFNs: built once per layer, not once per layer and pass)
    cache: dict[Any, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, src: str, *, device: str = "auto", dtype: str = "auto") -> "LoadedTeacher":
        model, cfg, device = load_causal_lm(src, device=device, dtype=dtype, experts_as_weights=True)
        family = get_family(cfg.get("model_type"))
        return cls(model, family, moe_shape(family, model.config), device)

    def describe(self) -> dict[str, Any]:
        return {"model_type": self.family.model_type, "num_experts": self.shape.num_experts,
                "hidden_size": self.shape.hidden_size, "moe_layers": list(self.shape.moe_layers)}


class StopForward(Exception):
    """Raised by a pass's hook once every layer it reads is done: the rest of the forward is waste
    (a sequential refit of layer l needs layers 0..l only)."""


class TeacherPass:
    """Hooks on a loaded teacher that accumulate sums over the real (non-padding) tokens of the
    blocks given to `run`; `close` removes them, so one loaded teacher serves pass after pass.

    Used directly (in-process) or inside a Ray actor; `result` returns the running sums, which
    the driver adds across replicas."""

    def __init__(self, teacher: "LoadedTeacher | str", *, device: str = "auto", dtype: str = "auto",
                 threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        if isinstance(teacher, str):
            teacher = LoadedTeacher.load(teacher, device=device, dtype=dtype)
        self.teacher = teacher
        self.model, self.family, self.shape, self.device = teacher.model, teacher.family, teacher.shape, teacher.device
        self._decoder = getattr(self.model, "model", self.model)
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.samples = 0
        self._mask: torch.Tensor | None = None
        self._all_real = True
        self._handles: list[Any] = []
        self._install_hooks()

    def _install_hooks(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _add(self, layer: int, name: str, value: torch.Tensor) -> None:
        """Accumulate in float64 on the model's device; per-batch partial sums may be float32."""
        key = f"layers.{layer}.{name}"
        acc = self.sums.get(key)
        if acc is None:
            self.sums[key] = value.detach().to(torch.float64).clone()
        else:
            acc.add_(value.detach())

    def _select(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of a [tokens, ...] tensor that are real tokens (all of them when nothing is padded)."""
        t = t.reshape(-1, t.shape[-1])
        return t if self._all_real else t[self._mask.to(t.device)]

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 8) -> int:
        """Accumulate the sums over token blocks; returns the number of tokens counted."""
        counted = 0
        dev = self.model.device if hasattr(self.model, "device") else self.device
        for s in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[s:s + batch_size].to(dev)
            mask = attention_mask[s:s + batch_size].to(dev)
            self._mask = mask.reshape(-1).bool()
            self._all_real = bool(self._mask.all())
            # the decoder stack only: the sums come from hooks inside it, and the LM head would
            # materialise [B, S, vocab] logits (5 GB at B=4, S=2048 for Qwen3's 151k vocabulary)
            try:
                self._decoder(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
            counted += int(mask.sum())
        self.tokens += counted
        self.samples += int(input_ids.shape[0])
        return counted

    def result(self) -> dict[str, Any]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "tokens": self.tokens, "samples": self.samples}

    def describe(self) -> dict[str, Any]:
        return self.teacher.describe()


class Calibrator(TeacherPass):
    """The routing (and, with `full`, expert-output) statistics of docs/stats.md."""

    def __init__(self, teacher: "LoadedTeacher | str", *, full: bool = False, **kw: Any):
        self.full = full
        super().__init__(teacher, **kw)

    # -- hooks ---------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        layers = _layers(self.model)
        for i in self.shape.moe_layers:
            block = getattr(layers[i], self.family.moe_module)
            self._handles.append(getattr(block, self.family.router_module).register_forward_hook(self._router_hook(i)))
            if self.full:
                self._handles.append(block.experts.register_forward_pre_hook(self._experts_hook(i, block.experts),
                                                                             with_kwargs=True))
            if self.family.shared_gate:
                self._handles.append(getattr(block, self.family.shared_gate).register_forward_hook(
                    self._shared_gate_hook(i)))

    def _router_hook(self, layer: int):
        prob = self.family.router_prob
        attr = self.family.gate_scale_attr
        gate_scale = float(getattr(self.model.config, attr, 1.0) or 1.0) if attr else 1.0

        def hook(module, args, output):
            # float32 per batch (cheap), float64 across batches (exact enough for any corpus)
            l = self._select(output[0]).float()
            idx = self._select(output[2])
            g = self._select(output[1]).float() * gate_scale
            p = torch.sigmoid(l) if prob == "sigmoid" else torch.softmax(l, dim=-1)
            sel = torch.zeros_like(l).scatter_(1, idx, 1.0)
            gate = torch.zeros_like(l).scatter_(1, idx, g)
            self._add(layer, "tokens", torch.tensor(float(l.shape[0])))
            self._add(layer, "sel_count", sel.sum(0))
            self._add(layer, "prob_sum", p.sum(0))
            self._add(layer, "prob_sel_sum", (p * sel).sum(0))
            self._add(layer, "gate_sum", gate.sum(0))
            self._add(layer, "gate_mass", gate.sum())
            self._add(layer, "logit_sum", l.sum(0))
            self._add(layer, "logit_gram", l.T @ l)

        return hook

    def _shared_gate_hook(self, layer: int):
        def hook(module, args, output):
            self._add(layer, "shared_gate_sum", torch.sigmoid(self._select(output).double()).sum())

        return hook

    def _experts_hook(self, layer: int, experts):
        family = self.family

        def hook(module, args, kwargs):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            vals = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
            x, idx, gates = self._select(vals[0]), self._select(vals[1]), self._select(vals[2])
            E, H = self.shape.num_experts, self.shape.hidden_size
            width = max(2 * self.shape.expert_size, H)
            chunk = max(1, EXPERT_CHUNK_ELEMS // (E * width))
            with torch.no_grad():
                for s in range(0, x.shape[0], chunk):
                    xs = x[s:s + chunk]
                    out = _expert_outputs(family, experts, xs).float()  # [E, n, H]
                    n = xs.shape[0]
                    sel = torch.zeros(n, E, device=xs.device).scatter_(1, idx[s:s + chunk], 1.0)
                    gate = torch.zeros(n, E, device=xs.device).scatter_(1, idx[s:s + chunk], gates[s:s + chunk].float())
                    norms = out.norm(dim=-1)  # [E, n]
                    flat = out.reshape(E, n * H)
                    sq = norms.double() ** 2
                    self._add(layer, "sqnorm_all", sq.sum(1))
                    self._add(layer, "sqnorm_routed", (sq * sel.T).sum(1))
                    self._add(layer, "norm_routed", (norms * sel.T).sum(1))
                    self._add(layer, "gate_norm_routed", (norms * gate.T).sum(1))
                    self._add(layer, "gram", flat @ flat.T)
                    self._add(layer, "out_sum", out.sum(1))

        return hook


def _tokenizer(src: str):
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


def _check_tensors(reader, family: Family, shape: MoEShape, cfg_dict: dict[str, Any], src: str) -> None:
    """What can be checked from the safetensors headers alone, in the driver, before any replica
    loads the model: every routed expert's tensors are there with the shapes config.json implies
    (`inspect_source` has already refused weights stored as integers)."""
    keys = [k for k in reader.keys() if str(reader.key_to_file.get(k, "")).endswith(".safetensors")]
    if family.expert_layout != "per_expert":
        return
    H, I, E = shape.hidden_size, shape.expert_size, shape.num_experts
    want = dict(zip(family.expert_keys, ((I, H), (I, H), (H, I))))
    present = set(keys)
    for layer in shape.moe_layers:
        for block in dict.fromkeys((family.moe_prefix, "mlp")):
            base = f"model.layers.{layer}.{block}.experts."
            mine = [k[len(base):] for k in keys if k.startswith(base) and k[len(base):].split(".", 1)[0].isdigit()]
            if not mine:
                continue  # fused experts (or none): transformers checks their shapes when loading
            beyond = sorted({int(m.split(".", 1)[0]) for m in mine} - set(range(E)))
            if beyond:
                raise UserError(f"{src}: layer {layer} holds expert {beyond[0]}, but config.json says "
                                f"{E} experts ({family.experts_attr})")
            for e in range(E):
                for name, dims in want.items():
                    key = f"{base}{e}.{name}.weight"
                    if key not in present:
                        raise UserError(f"{src}: tensor {key} is missing (layer {layer} has {E} experts "
                                        f"by its config.json)")
                    if tuple(reader.shape(key)) != dims:
                        raise UserError(f"{src}: tensor {key} has shape {tuple(reader.shape(key))}, but "
                                        f"config.json implies {dims}")


def _check_token_ids(calib, cfg, src: str) -> None:
    """Every token id must have a row in the embedding: an id beyond it fails mid-run (or, on a
    GPU, reads another row's memory)."""
    vocab = getattr(cfg, "vocab_size", None)
    if vocab and calib.input_ids.numel():
        top = int(calib.input_ids.max())
        if top >= int(vocab):
            raise UserError(f"the tokenizer of {src} gives token id {top}, but the model's vocabulary has "
                            f"{vocab} entries (vocab_size in config.json): tokenizer and model do not belong together")


# The kinds of pass a replica can run: name -> "module:class" of a TeacherPass (imported by name,
# so an actor needs no other module than this one to be shipped).
PASSES = {"stats": "moe2dense_ray.calibrate:Calibrator", "refit": "moe2dense_ray.refit:RefitPass"}


def _pass_class(kind: str):
    import importlib

    module, name = PASSES[kind].split(":")
    return getattr(importlib.import_module(module), name)


class _Replica:
    """One loaded teacher running pass after pass (in this process, or as a Ray actor). The
    teacher is loaded by `load`, not in `__init__`, so a failure to load comes back to the driver
    as that task's exception (a UserError stays one line), not as an actor that died with a
    traceback in its text."""

    def __init__(self, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.teacher: LoadedTeacher | None = None
        self.current: TeacherPass | None = None

    def load(self, src: str, dtype: str) -> dict[str, Any]:
        self.teacher = LoadedTeacher.load(src, dtype=dtype)
        return self.teacher.describe()

    def begin(self, kind: str, options: dict[str, Any]) -> None:
        if self.current is not None:
            self.current.close()
        self.current = _pass_class(kind)(self.teacher, **options)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int) -> int:
        return self.current.run(input_ids, attention_mask, batch_size)

    def result(self) -> dict[str, Any]:
        out = self.current.result()
        self.current.close()
        self.current = None
        return out


_RAY_ERROR_KEYS = ("class_name:", "actor_id:", "pid:", "name:", "namespace:", "ip:", "The actor died unexpectedly")


def _worker_error(e: BaseException) -> str:
    """One line for an error that a calibration actor raised or died of."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, UserError):
        return first_line(str(cause))
    if isinstance(cause, BaseException) and not type(cause).__module__.startswith("ray."):
        return f"a calibration worker failed: {type(cause).__name__}: {first_line(cause)}"
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # an exception raised in an actor's creation task: the last line of its traceback
    raised = [ln for ln in lines if ln.split(":", 1)[0].split(".")[-1].endswith(("Error", "Exception", "Exit"))
              and ": " in ln and not ln.startswith(("File ", "ray."))]
    if raised:
        kind, msg = raised[-1].split(": ", 1)
        kind = kind.split(".")[-1]
        return msg if kind == "UserError" else f"a calibration worker failed: {kind}: {msg}"
    useful = [ln for ln in lines if not ln.startswith(_RAY_ERROR_KEYS)]
    detail = " ".join((useful or lines or [type(e).__name__])[0].split())
    return f"a calibration worker died: {detail[:500]}"


@contextlib.contextmanager
def _actor_errors() -> Iterator[None]:
    """Errors of Ray actors as one UserError line: the cause's own message, not Ray's wrapping."""
    import ray.exceptions as rx

    kinds = (rx.RayTaskError, rx.RayActorError) + ((rx.OutOfMemoryError,) if hasattr(rx, "OutOfMemoryError") else ())
    try:
        yield
    except kinds as e:
        raise UserError(_worker_error(e)) from None


class TeacherPool:
    """N replicas of the teacher, loaded once and kept for every pass over the calibration blocks
    (`convert --refit` runs the statistics pass and the plan's refit passes on the same replicas).

    `workers=0` is one replica in this process (no Ray); `workers=N` is N Ray actors of
    `cpus_per_worker` CPUs, each on its own GPU when there is one, each taking the next part of at
    most `batch_size` blocks. The
    cluster is checked first (an actor that can never be placed would be waited for forever),
    actors are killed however the pool ends, and an embedded Ray that the pool started is shut
    down when it fails or is interrupted.
    """

    def __init__(self, src: str, *, workers: int, dtype: str = "auto", gpus_per_worker: float | None = None,
                 resources: dict[str, float] | None = None, cpus_per_worker: float = 1.0):
        self.src, self.workers, self.dtype = src, workers, dtype
        self.gpus_per_worker, self.resources = gpus_per_worker, dict(resources or {})
        self.cpus_per_worker = float(cpus_per_worker)
        self.describe: dict[str, Any] = {}  # the teacher's shape, once loaded
        self._actors: list[Any] = []
        self._local: _Replica | None = None
        self._started = False

    def __enter__(self) -> "TeacherPool":
        return self

    def _start(self) -> None:
        """Load the replicas, at the first pass: the caller's checks of its inputs come first."""
        if self._local is not None or self._actors:
            return
        if self.workers <= 0:
            self._local = _Replica()
            self.describe = self._local.load(self.src, self.dtype)
        else:
            self._start_actors()

    def _start_actors(self) -> None:
        import ray

        workers, resources, cpus_each = self.workers, self.resources, self.cpus_per_worker
        self._started = ensure_ray()
        res = ray.cluster_resources()
        cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        use_gpu = self.gpus_per_worker if self.gpus_per_worker is not None else (1 if gpus > 0 else 0)
        need = {"CPU": workers * cpus_each, "GPU": workers * float(use_gpu),
                **{k: workers * v for k, v in resources.items()}}
        if need["CPU"] > cpus:
            advice = f"lower --workers to {int(cpus // cpus_each)} or fewer"
        elif gpus <= 0:
            advice = "leave out --gpus-per-worker to calibrate on CPUs"
        else:
            advice = "lower --gpus-per-worker or --workers"
        require_resources(need, each=[{"CPU": cpus_each, "GPU": float(use_gpu), **resources}], advice=advice,
                          who=f"calibrating on --workers {workers}",
                          parts=f"{cpus_each:g} CPU{f' and {use_gpu:g} GPU' if use_gpu else ''} per worker",
                          custom_flags="--teacher-resources")
        threads = max(1, int(ray.available_resources().get("CPU", 1)) // workers)
        # "DEFAULT": never inside the caller's placement group (a sweep trial's reserves only the trial itself)
        Actor = ray.remote(_Replica).options(num_cpus=cpus_each, num_gpus=use_gpu, resources=resources or None,
                                             scheduling_strategy="DEFAULT")
        self._actors = [Actor.remote(threads) for _ in range(workers)]
        with _actor_errors():
            self.describe = ray.get([a.load.remote(self.src, self.dtype) for a in self._actors])[0]

    def __exit__(self, kind, value, tb) -> None:
        if self._actors:
            import ray

            for a in self._actors:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001 - an actor that is already gone
                    pass
            self._actors = []
        if self._started and kind is not None:
            import ray

            ray.shutdown()
        if self._local is not None and self._local.current is not None:
            self._local.current.close()

    def parts(self, calib, batch_size: int) -> list[Any]:
        """The blocks split into parts of at most `batch_size` rows, put in Ray's object store
        once when there are actors (a sequential refit sends them again for every layer)."""
        n_parts = -(-calib.num_samples // batch_size)
        # `shard` copies its rows, so each task ships its own tokens, not the whole set's storage
        parts = [calib.shard(j, n_parts) for j in range(n_parts)]
        self._start()
        if not self._actors:
            return parts
        import ray

        return [(ray.put(p.input_ids), ray.put(p.attention_mask)) for p in parts]

    def run_pass(self, kind: str, options: dict[str, Any], parts: list[Any], batch_size: int,
                 on_tokens=None) -> list[dict[str, Any]]:
        """One pass of `kind` over every part; each replica's sums (the caller adds them)."""
        self._start()
        if self._local is not None:
            self._local.begin(kind, options)
            for p in parts:
                n = self._local.run(p.input_ids, p.attention_mask, batch_size)
                if on_tokens:
                    on_tokens(n)
            return [self._local.result()]
        import ray
        from ray.util import ActorPool

        with _actor_errors():
            ray.get([a.begin.remote(kind, options) for a in self._actors])
            pool = ActorPool(self._actors)
            for n in pool.map_unordered(lambda a, p: a.run.remote(p[0], p[1], batch_size), parts):
                if on_tokens:
                    on_tokens(n)
            return ray.get([a.result.remote() for a in self._actors])


def token_blocks(src: str, data: str, cfg, *, samples: int, seq_len: int, seed: int, text_field: str,
                 doing: str = "calibrating"):
    """DATA packed into blocks by SRC's tokenizer, every id checked against the model's vocabulary
    (a short corpus is a warning: fewer blocks than asked for)."""
    from .data import calibration_blocks

    calib = calibration_blocks(data, _tokenizer(src), samples=samples, seq_len=seq_len, seed=seed,
                               text_field=text_field)
    if calib.num_samples < samples:
        warnings.warn(f"{data} holds only {calib.num_tokens} tokens: {doing} on {calib.num_samples} "
                      f"blocks, not the {samples} asked for", stacklevel=3)
    _check_token_ids(calib, cfg, src)
    return calib


def calibrate(
    src: str,
    data: str,
    *,
    samples: int = 64,
    seq_len: int = 512,
    workers: int = 1,
    full: bool = False,
    out: str | None = None,
    batch_size: int = 4,
    seed: int = 0,
    dtype: str = "auto",
    gpus_per_worker: float | None = None,
    progress: bool = True,
    text_field: str = "text",
    allow_pickle: bool = False,
    overwrite: bool = False,
    teacher_resources: dict[str, float] | None = None,
    pool: "TeacherPool | None" = None,
) -> Stats:
    """Calibrate `src` on `data` and return (and, with `out`, save) its statistics.

    `workers=0` runs in this process (no Ray); `workers=N>=1` runs N Ray actors, each holding a
    teacher replica on its own GPU when there is one, and adds their sums. Everything that can be
    checked is checked here, before a replica loads the model: the config, the expert tensors, and
    that the tokenizer's ids fit the model's vocabulary. `pool`: replicas already loaded (and
    kept for the caller's next pass), instead of a pool of this call's own.
    """
    from .build import inspect_source

    reader, cfg_dict, family, cfg, shape = inspect_source(src, allow_pickle=allow_pickle)  # validate first
    try:
        _check_tensors(reader, family, shape, cfg_dict, src)
    finally:
        reader.close()
    with contextlib.ExitStack() as held:
        if out:  # checked now and held to the end: a second run for the same STATS fails at once
            check_output(out, what="statistics", overwrite=overwrite, sources=(src, data))
            held.enter_context(OutputLock(out))
        max_len = getattr(cfg, "max_position_embeddings", None)
        if max_len and seq_len > max_len:
            raise UserError(f"--seq-len {seq_len} is longer than {src} was trained for "
                            f"(max_position_embeddings {max_len})")
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, not {batch_size}")
        calib = token_blocks(src, data, cfg, samples=samples, seq_len=seq_len, seed=seed, text_field=text_field)
        t0 = time.time()
        bar = Progress(int(calib.num_tokens), "calibrate", unit="tok", enabled=progress)
        try:
            with (contextlib.nullcontext(pool) if pool is not None else
                  TeacherPool(src, workers=workers, dtype=dtype, gpus_per_worker=gpus_per_worker,
                              resources=teacher_resources)) as teachers:
                results = teachers.run_pass("stats", {"full": full}, teachers.parts(calib, batch_size), batch_size,
                                            on_tokens=bar.update)
                describe = teachers.describe
        finally:
            bar.close()
        sums: dict[str, torch.Tensor] = {}
        for r in results:
            sums = add_sums(sums, r["sums"])
        tokens = sum(r["tokens"] for r in results)
        if tokens == 0:
            raise UserError(f"the calibration set from {data} is empty (0 tokens)")
        meta = {
            "version": STATS_VERSION, **describe, "source": src, "data": data,
            "tokens": tokens, "samples": sum(r["samples"] for r in results), "seq_len": seq_len,
            "full": full, "workers": workers, "seconds": round(time.time() - t0, 3),
        }
        stats = Stats(sums, meta)
        if out:
            stats.save(out, overwrite=overwrite)
        return stats
