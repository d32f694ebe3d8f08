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
import time
from typing import Any

import torch

from ..core.config import CalibrateConfig
from ..core.data import token_blocks
from ..core.errors import UserError
from ..core.families import Family
from ..core.models import decoder_layers
from ..core.progress import Progress
from ..core.source import Source, opened
from ..core.storage import OutputLock, check_output
from ..core.teachers import LoadedTeacher, TeacherPass, TeacherPool
from .stats import STATS_VERSION, Stats, add_sums

# Elements of expert output materialised at once when running all experts (fp32: 4 bytes each).
EXPERT_CHUNK_ELEMS = 1 << 25


def _expert_outputs(family: Family, experts, x: torch.Tensor) -> torch.Tensor:
    """Outputs of every expert on tokens x [n, H] -> [E, n, H], before the gate is applied."""
    if family.expert_layout == "interleaved_biased":
        h = torch.matmul(x[None], experts.gate_up_proj) + experts.gate_up_proj_bias[:, None, :]
        a = experts._apply_gate(h)
        return torch.matmul(a, experts.down_proj) + experts.down_proj_bias[:, None, :]
    h = torch.matmul(x[None], experts.gate_up_proj.transpose(1, 2))
    gate, up = h.chunk(2, dim=-1)
    return torch.matmul(experts.act_fn(gate) * up, experts.down_proj.transpose(1, 2))


class Calibrator(TeacherPass):
    """The routing (and, with `full`, expert-output) statistics of docs/stats.md."""

    def __init__(self, teacher: "LoadedTeacher | str", *, full: bool = False, **kw: Any):
        self.full = full
        super().__init__(teacher, **kw)

    # -- hooks ---------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        layers = decoder_layers(self.model)
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


def calibrate(cfg: CalibrateConfig, *, progress: bool = True, source: Source | None = None,
              pool: TeacherPool | None = None) -> Stats:
    """Calibrate `cfg.src` on `cfg.data` and return (and, with `cfg.out`, save) its statistics.

    `workers=0` runs in this process (no Ray); `workers=N>=1` runs N Ray actors, each holding a
    teacher replica on its own GPU when there is one, and adds their sums. Everything that can be
    checked is checked here, before a replica loads the model: the config, the expert tensors, and
    that the tokenizer's ids fit the model's vocabulary. `source`: the checkpoint already opened
    by the caller (`convert`); `pool`: replicas already loaded (and kept for the caller's next
    pass), instead of a pool of this call's own.
    """
    data, out, overwrite, seq_len = cfg.data, cfg.out, cfg.overwrite, cfg.seq_len
    with opened(source or cfg.src, allow_pickle=cfg.allow_pickle) as source:  # validate first
        source.check_experts()
        hf_cfg = source.hf_config
    src = source.url
    with contextlib.ExitStack() as held:
        if out:  # checked now and held to the end: a second run for the same STATS fails at once
            check_output(out, what="statistics", overwrite=overwrite, sources=(src, data))
            held.enter_context(OutputLock(out))
        max_len = getattr(hf_cfg, "max_position_embeddings", None)
        if max_len and seq_len > max_len:
            raise UserError(f"--seq-len {seq_len} is longer than {src} was trained for "
                            f"(max_position_embeddings {max_len})")
        calib = token_blocks(src, data, hf_cfg, samples=cfg.samples, seq_len=seq_len, seed=cfg.seed,
                             text_field=cfg.text_field)
        t0 = time.time()
        bar = Progress(int(calib.num_tokens), "calibrate", unit="tok", enabled=progress)
        try:
            with (contextlib.nullcontext(pool) if pool is not None else
                  TeacherPool(src, workers=cfg.workers, gpus_per_worker=cfg.gpus_per_worker,
                              resources=cfg.teacher_resources)) as teachers:
                results = teachers.run_pass("stats", {"full": cfg.full_stats}, teachers.parts(calib, cfg.batch_size),
                                            cfg.batch_size, on_tokens=bar.update)
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
            "full": cfg.full_stats, "workers": cfg.workers, "seconds": round(time.time() - t0, 3),
        }
        stats = Stats(sums, meta)
        if out:
            stats.save(out, overwrite=overwrite)
        return stats
