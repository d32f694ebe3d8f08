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
import shutil
import tempfile
import time
import warnings
from typing import Any, Iterator

import torch

from .checkpoint import TOKENIZER_FILES, check_output, is_local, parse_config, url_to_fs
from .errors import UserError
from .families import Family, get_family, moe_shape
from .progress import Progress
from .stats import STATS_VERSION, Stats, add_sums

# Elements of expert output materialised at once when running all experts (fp32: 4 bytes each).
EXPERT_CHUNK_ELEMS = 1 << 25


@contextlib.contextmanager
def localize(src: str, cache_dir: str | None = None, *, weights: bool = True) -> Iterator[str]:
    """A local directory holding `src` while the block runs.

    transformers only loads from local paths, so fsspec URLs are copied file by file into a
    temporary directory, which is removed on exit: once a model is loaded its weights live in
    memory, and N Ray actors on one node must not leave N copies of a large teacher on disk.
    Local directories are used in place.
    """
    fs, path = url_to_fs(src)
    if is_local(fs):
        if not os.path.isdir(path):
            raise UserError(f"no such checkpoint: {src}")
        yield path
        return
    dest = tempfile.mkdtemp(prefix="moe2dense-src-", dir=cache_dir)
    try:
        for p in fs.ls(path, detail=False):
            name = p.rsplit("/", 1)[-1]
            if not weights and name.endswith((".safetensors", ".bin")):
                continue
            fs.get(p, f"{dest}/{name}")
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def load_causal_lm(src: str, *, device: str = "auto", dtype: str = "auto",
                   experts_as_weights: bool = False) -> tuple[Any, dict[str, Any], str]:
    """Load a (teacher) checkpoint for inference: `(model, config dict, device)`.

    bf16 (the checkpoint's dtype) on GPUs, fp32 on CPU, where bf16 matmuls are slow and
    imprecise. A model larger than one GPU is sharded over the process's GPUs (`device_map`).
    Quantized experts are dequantized where their weights must be read as tensors
    (`experts_as_weights`: calibration runs each expert from its weights).
    """
    from transformers import AutoModelForCausalLM

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    with localize(src) as path:
        with open(os.path.join(path, "config.json"), "rb") as f:
            cfg = parse_config(f.read(), f"{src}/config.json")
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
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    if "device_map" not in kwargs:
        model.to(device)
    return model, cfg, device


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


class Calibrator:
    """One teacher replica plus the hooks that accumulate its statistics.

    Used directly (in-process) or as a Ray actor; `run` takes token blocks, `result` returns the
    running sums, which the driver adds across replicas.
    """

    def __init__(self, src: str, *, full: bool = False, device: str = "auto", dtype: str = "auto",
                 threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.model, cfg, self.device = load_causal_lm(src, device=device, dtype=dtype, experts_as_weights=True)
        self.family = get_family(cfg.get("model_type"))
        self.shape = moe_shape(self.family, self.model.config)
        self._decoder = getattr(self.model, "model", self.model)
        self.full = full
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.samples = 0
        self._mask: torch.Tensor | None = None
        self._all_real = True
        self._install_hooks()

    # -- hooks ------------------------------------------------------------------------------
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

    def _install_hooks(self) -> None:
        layers = _layers(self.model)
        for i in self.shape.moe_layers:
            block = layers[i].mlp
            getattr(block, self.family.router_module).register_forward_hook(self._router_hook(i))
            if self.full:
                block.experts.register_forward_pre_hook(self._experts_hook(i, block.experts), with_kwargs=True)
            if self.family.shared_gate:
                getattr(block, self.family.shared_gate).register_forward_hook(self._shared_gate_hook(i))

    def _router_hook(self, layer: int):
        prob = self.family.router_prob

        def hook(module, args, output):
            # float32 per batch (cheap), float64 across batches (exact enough for any corpus)
            l = self._select(output[0]).float()
            idx = self._select(output[2])
            g = self._select(output[1]).float()
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

    # -- driving ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 8) -> int:
        """Accumulate statistics over token blocks; returns the number of tokens counted."""
        counted = 0
        dev = self.model.device if hasattr(self.model, "device") else self.device
        for s in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[s:s + batch_size].to(dev)
            mask = attention_mask[s:s + batch_size].to(dev)
            self._mask = mask.reshape(-1).bool()
            self._all_real = bool(self._mask.all())
            # the decoder stack only: statistics come from hooks inside it, and the LM head would
            # materialise [B, S, vocab] logits (5 GB at B=4, S=2048 for Qwen3's 151k vocabulary)
            self._decoder(input_ids=ids, attention_mask=mask, use_cache=False)
            counted += int(mask.sum())
        self.tokens += counted
        self.samples += int(input_ids.shape[0])
        return counted

    def result(self) -> dict[str, Any]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "tokens": self.tokens, "samples": self.samples}

    def describe(self) -> dict[str, Any]:
        return {"model_type": self.family.model_type, "num_experts": self.shape.num_experts,
                "hidden_size": self.shape.hidden_size, "moe_layers": list(self.shape.moe_layers)}


def _tokenizer(src: str):
    from transformers import AutoTokenizer

    try:
        with localize(src, weights=False) as path:
            if not any(os.path.exists(os.path.join(path, n)) for n in TOKENIZER_FILES):
                # transformers would quietly build an empty tokenizer, and every text would be 0 tokens
                raise UserError(f"{src} has no tokenizer ({' / '.join(TOKENIZER_FILES)}); copy the "
                                f"teacher's tokenizer files next to its config.json")
            return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {src}: {str(e).splitlines()[0]}") from None


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster (`ray job submit` sets RAY_ADDRESS) or start an embedded local Ray."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        # an embedded Ray is an implementation detail: its start-up chatter would break the bars
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True, logging_level="INFO" if address else "ERROR")


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
) -> Stats:
    """Calibrate `src` on `data` and return (and, with `out`, save) its statistics.

    `workers=0` runs in this process (no Ray); `workers=N>=1` runs N Ray actors, each holding a
    teacher replica on its own GPU when there is one, and adds their sums.
    """
    from .build import inspect_source
    from .data import calibration_blocks

    reader, cfg_dict, family, cfg, shape = inspect_source(src, allow_pickle=allow_pickle)  # validate first
    reader.close()
    if out:
        check_output(out, what="statistics", overwrite=overwrite, sources=(src,))
    max_len = getattr(cfg, "max_position_embeddings", None)
    if max_len and seq_len > max_len:
        raise UserError(f"--seq-len {seq_len} is longer than {src} was trained for "
                        f"(max_position_embeddings {max_len})")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    tok = _tokenizer(src)
    calib = calibration_blocks(data, tok, samples=samples, seq_len=seq_len, seed=seed, text_field=text_field)
    if calib.num_samples < samples:
        warnings.warn(f"{data} holds only {calib.num_tokens} tokens: calibrating on {calib.num_samples} "
                      f"blocks, not the {samples} asked for", stacklevel=2)
    t0 = time.time()
    total = int(calib.num_tokens)
    bar = Progress(total, "calibrate", unit="tok", enabled=progress)
    if workers <= 0:
        cal = Calibrator(src, full=full, dtype=dtype)
        for s in range(0, calib.input_ids.shape[0], batch_size):
            bar.update(cal.run(calib.input_ids[s:s + batch_size], calib.attention_mask[s:s + batch_size], batch_size))
        results, describe = [cal.result()], cal.describe()
    else:
        import ray
        from ray.util import ActorPool

        ensure_ray()
        use_gpu = gpus_per_worker if gpus_per_worker is not None else (1 if _cluster_has_gpus() else 0)
        threads = max(1, int(ray.available_resources().get("CPU", 1)) // workers)
        Actor = ray.remote(Calibrator).options(num_cpus=1, num_gpus=use_gpu)
        actors = [Actor.remote(src, full=full, dtype=dtype, threads=threads) for _ in range(workers)]
        # parts of at most batch_size rows go to whichever actor is free next; `shard` copies its
        # rows, so each task ships its own tokens and not the storage of the whole set
        n_parts = -(-calib.num_samples // batch_size)
        parts = [calib.shard(j, n_parts) for j in range(n_parts)]
        pool = ActorPool(actors)
        for counted in pool.map_unordered(lambda a, p: a.run.remote(p.input_ids, p.attention_mask, batch_size), parts):
            bar.update(counted)
        results = ray.get([a.result.remote() for a in actors])
        describe = ray.get(actors[0].describe.remote())
        for a in actors:
            ray.kill(a)
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


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
