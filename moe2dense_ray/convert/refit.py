"""Reconstruction-aware conversion: fit the dense FFN to the MoE layer's output in closed form.

Selection, grouping and scaling keep some experts and replace their token-dependent gates by
constants; whatever that loses is left for distillation to win back. But the student's FFN is
linear in its down projection: with `h(x) = act(G x) * (U x)` the activations of its kept
neurons (routed groups, then shared experts, then a constant 1 where the family has a down
bias), the FFN is `D h(x)`, and the D that best reproduces the MoE block's output `y(x)` on
calibration tokens is a ridge regression with a closed form:

    D^T = (S_hh + lam I)^-1 (S_hy + lam D0^T),   S_hh = sum_x h h^T,  S_hy = sum_x h y^T

pulled toward the plan's own down projection D0 (so a neuron the data says nothing about keeps
its weights, and lam -> infinity is the plan unchanged). `lam = ridge * mean(diag S_hh)`. The
cheaper fits rescale D0 instead, one factor per neuron or per group; their normal equations
come from the same two sums. So does the reconstruction error of any D,
`|y|^2 - 2 tr(D S_hy) + tr(D S_hh D^T)`, which every refit records per layer, before and after.

The sums depend on the plan's selection, so they come from a second pass over the calibration
blocks, on the same teacher replicas (`core.teachers.TeacherPool`), and are added across replicas
like every other statistic: 1 or N workers give the same fit. Two modes:

* parallel: every layer is fitted on the teacher's own activations, in one pass;
* sequential (as GPTQ-style compressors do): layer l is fitted on the inputs that the already
  converted (and refitted) layers 0..l-1 give it, its target the teacher's MoE block applied to
  those inputs. One pass per MoE layer, each stopping after its layer: about L/2 forward passes
  in all, but errors of earlier layers do not compound.

Size, for Qwen3-30B-A3B at K = 8 (W = 8 x 768 = 6144 neurons, hidden 2048): S_hh is 6144^2
float64 = 302 MB and S_hy 101 MB per layer, 19 GB for its 48 layers (a parallel pass holds them
all on every replica; a sequential pass one layer at a time). Per token and layer the sums cost
2 W^2 + 2 W H = 100 MFLOP, about what the teacher's own forward costs; the solve is a 6144^3
Cholesky, well under a second on a GPU.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from ..core.config import RefitConfig
from ..core.data import token_blocks
from ..core.errors import UserError
from ..core.progress import Progress
from ..core.source import Source, opened
from ..core.teachers import StopForward, TeacherPass, TeacherPool
from .ffn import Expert, ExpertReader, check_plan_fits, plan_ffn
from .plan import Plan

FITS = ("down", "neuron", "group")
MODES = ("sequential", "parallel")


# -- the student's FFN, from a teacher in memory -------------------------------------------------


class StateDictReader:
    """The read interface of `CheckpointReader` over a model in memory, so that `ExpertReader`
    (and with it `plan_ffn`) reads a loaded teacher's experts exactly as it reads them from disk:
    transformers keeps them fused (`experts.gate_up_proj`), a layout the reader knows."""

    url = "the teacher in memory"

    def __init__(self, model: torch.nn.Module):
        self._t = {k: v.detach() for k, v in model.state_dict().items()}

    def keys(self):
        return self._t.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._t

    def get(self, key: str) -> torch.Tensor:
        return self._t[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def get_row(self, key: str, i: int) -> torch.Tensor:
        return self._t[key][i]


def hidden(ffn: Expert, x: torch.Tensor, experts: torch.nn.Module, biased: bool) -> torch.Tensor:
    """h(x) [n, W] of an FFN in canonical form, by the teacher's own activation: `act_fn(gate) *
    up` for SwiGLU experts, the experts module's `_apply_gate` on interleaved gate/up for the
    clamped, biased GPT-OSS form."""
    g = x @ ffn.gate.T
    u = x @ ffn.up.T
    if not biased:
        return experts.act_fn(g) * u
    g = g + ffn.gate_bias
    u = u + ffn.up_bias
    return experts._apply_gate(torch.stack([g, u], dim=-1).reshape(g.shape[0], -1))


def features(ffn: Expert, x: torch.Tensor, experts: torch.nn.Module, biased: bool) -> torch.Tensor:
    """The regression's features: h(x), and a constant 1 for the down bias where there is one."""
    h = hidden(ffn, x, experts, biased)
    return torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1) if biased else h


def down_t(ffn: Expert) -> torch.Tensor:
    """D^T [W(+1), H]: the down projection, with the down bias as its last row where there is one."""
    d = ffn.down.T
    return torch.cat([d, ffn.down_bias[None]], dim=0) if ffn.down_bias is not None else d


def set_down_t(ffn: Expert, dt: torch.Tensor) -> None:
    """Write D^T (from `down_t`'s layout) back into the FFN's first rows; padding stays zero."""
    rows = dt[:-1] if ffn.down_bias is not None else dt
    ffn.down[:, :rows.shape[0]] = rows.T.to(ffn.down.dtype)
    if ffn.down_bias is not None:
        ffn.down_bias = dt[-1].to(ffn.down.dtype)


class RefitPass(TeacherPass):
    """A teacher pass summing S_hh, S_hy and |y|^2 at the MoE blocks of `layers`, while the
    blocks of `replaced` (layer -> D^T) already compute the student's refitted FFN instead of
    the MoE. The forward stops after its last layer."""

    def __init__(self, teacher, *, plan: str, layers: Sequence[int], replaced: dict[int, torch.Tensor] | None = None):
        self.plan = Plan.from_json(plan)
        self.collect = [int(i) for i in layers]
        self.replaced = {int(k): v for k, v in (replaced or {}).items()}
        super().__init__(teacher)

    def _install_hooks(self) -> None:
        layers = getattr(self.model, "model", self.model).layers
        reader = ExpertReader(StateDictReader(self.model), self.family, self.shape)
        dev = next(self.model.parameters()).device
        biased = self.family.expert_layout == "interleaved_biased"
        last = max(self.collect) if self.collect else None
        plan_key = hash(self.plan.to_json())
        for i in sorted(set(self.collect) | set(self.replaced)):
            block = getattr(layers[i], self.family.moe_module)
            ffn = self.teacher.cache.get((plan_key, i))
            if ffn is None:  # built once per replica, kept for the passes after (sequential mode)
                ffn = plan_ffn(self.plan, i, reader)
                ffn = Expert(*(t.to(dev, torch.float32) if isinstance(t, torch.Tensor) else t
                               for t in (ffn.gate, ffn.up, ffn.down, ffn.gate_bias, ffn.up_bias, ffn.down_bias)))
                self.teacher.cache[(plan_key, i)] = ffn
            if i in self.replaced:
                set_down_t(ffn, self.replaced[i].to(dev, torch.float32))
            stash: dict[str, torch.Tensor] = {}
            self._handles.append(block.register_forward_pre_hook(_keep_input(stash)))
            self._handles.append(block.register_forward_hook(
                self._at_output(i, ffn, block.experts, biased, stash, stop=i == last)))

    def _at_output(self, layer, ffn, experts, biased, stash, *, stop):
        def hook(module, args, output):
            x = stash.pop("x")
            y = output[0] if isinstance(output, tuple) else output
            if layer in self.replaced:  # the student's FFN takes the block's place
                flat = x.reshape(-1, x.shape[-1]).float()
                new = (features(ffn, flat, experts, biased) @ down_t(ffn)).to(y.dtype).reshape(y.shape)
                return (new, *output[1:]) if isinstance(output, tuple) else new
            f = features(ffn, self._select(x).float(), experts, biased)
            t = self._select(y).float()
            self._add(layer, "tokens", torch.tensor(float(f.shape[0])))
            self._add(layer, "hh", f.T @ f)
            self._add(layer, "hy", f.T @ t)
            self._add(layer, "yy", (t.double() ** 2).sum())
            if stop:
                raise StopForward
            return None
        return hook


def _keep_input(stash: dict[str, torch.Tensor]):
    def hook(module, args):
        stash["x"] = args[0]
    return hook


# -- the closed-form fit ------------------------------------------------------------------------


def reconstruction_error(sums: dict[str, torch.Tensor], dt: torch.Tensor) -> float:
    """sum_x |D h(x) - y(x)|^2 / sum_x |y(x)|^2, from the sums alone (float64)."""
    hh, hy, yy = sums["hh"], sums["hy"], float(sums["yy"])
    dt = dt.to(torch.float64)
    err = yy - 2.0 * float((dt * hy).sum()) + float((dt * (hh @ dt)).sum())
    return max(err, 0.0) / yy if yy > 0 else 0.0


def _ridge_solve(a: torch.Tensor, b: torch.Tensor, prior: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_X |data|^2 + lam |X - prior|^2 from normal equations a X = b; ridge 0 is the
    minimum-norm least-squares solution."""
    diag = a.diagonal()
    active = diag > 0
    if not bool(active.any()):
        return prior.clone()
    if ridge == 0:
        return torch.linalg.lstsq(a, b, driver="gelsd").solution
    lam = ridge * float(diag[active].mean())
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    return torch.linalg.solve(a + lam * eye, b + lam * prior)


def solve(sums: dict[str, torch.Tensor], d0t: torch.Tensor, *, fit: str, ridge: float,
          blocks: Sequence[int] = ()) -> torch.Tensor:
    """The refitted D^T [W(+1), H] from one layer's sums and the plan's D0^T.

    fit "down": every entry of D. "neuron": D0 with each column (neuron) rescaled. "group": D0
    with each block of columns rescaled by one factor; `blocks` are the blocks' widths in order
    (groups, shared experts, then the bias row, each its own block)."""
    hh, hy = sums["hh"].to(torch.float64), sums["hy"].to(torch.float64)
    d0t = d0t.to(torch.float64)
    if fit == "down":
        return _ridge_solve(hh, hy, d0t, ridge)
    # D = D0 diag(P s): neuron j's feature is h_j d0_j, so A = P^T (hh * D0^T D0) P, b = P^T rowsum(hy * D0^T)
    a = hh * (d0t @ d0t.T)
    b = (hy * d0t).sum(1)
    if fit == "neuron":
        p = torch.eye(a.shape[0], dtype=torch.float64)
    else:
        if sum(blocks) != a.shape[0]:
            raise ValueError(f"blocks {list(blocks)} do not add up to {a.shape[0]} features")
        p = torch.zeros(a.shape[0], len(blocks), dtype=torch.float64)
        start = 0
        for j, n in enumerate(blocks):
            p[start:start + n, j] = 1.0
            start += n
    s = _ridge_solve(p.T @ a @ p, (p.T @ b)[:, None], torch.ones(p.shape[1], 1, dtype=torch.float64), ridge)
    return d0t * (p @ s)


# -- the driver ----------------------------------------------------------------------------------


@dataclass
class Refit:
    """The refitted down projections (D^T per MoE layer, as `down_t` lays them out) and the
    record that goes into the student's plan."""

    downs: dict[int, torch.Tensor]
    record: dict[str, Any] = field(default_factory=dict)

    def apply(self, layer: int, ffn: Expert) -> None:
        set_down_t(ffn, self.downs[layer])

    def recorded(self, plan: Plan) -> Plan:
        return replace(plan, refit=self.record)


def _blocks(plan: Plan, layer: int, expert_size: int, shared_size: int, biased: bool) -> list[int]:
    """Widths of the FFN's blocks that a group refit scales as one: each group, the shared experts, the bias."""
    return [expert_size] * len(plan.layer(layer).groups) + ([shared_size] if shared_size else []) + ([1] if biased else [])


def refit(src: "str | Source", plan: Plan, cfg: RefitConfig, *, progress: bool = True,
          pool: TeacherPool | None = None) -> Refit:
    """Fit the student's FFNs of `plan` on calibration blocks of `cfg.data` (a `config.RefitConfig`).

    Everything that can be checked is checked before the teacher is loaded: the checkpoint, that
    the plan was made for it, the calibration text. `pool` (a `core.teachers.TeacherPool`) reuses
    replicas that are already loaded (`convert` calibrates and refits on the same ones)."""
    from .stats import add_sums

    if cfg.refit not in FITS:
        raise UserError(f"--refit must be one of {', '.join(FITS)}, not {cfg.refit!r}")
    with opened(src) as source:
        source.check_experts()
        reader, family, hf_cfg, shape, src = source.reader, source.family, source.hf_config, source.shape, source.url
        check_plan_fits(plan, family, shape, src)
        max_len = getattr(hf_cfg, "max_position_embeddings", None)
        if max_len and cfg.seq_len > max_len:
            raise UserError(f"--seq-len {cfg.seq_len} is longer than {src} was trained for "
                            f"(max_position_embeddings {max_len})")
        calib = token_blocks(src, cfg.data, hf_cfg, samples=cfg.samples, seq_len=cfg.seq_len, seed=cfg.seed,
                             text_field=cfg.text_field, doing="refitting")
        if calib.num_tokens == 0:
            raise UserError(f"the calibration set from {cfg.data} is empty (0 tokens)")
        biased = family.expert_layout == "interleaved_biased"
        on_disk = ExpertReader(reader, family, shape)
        layers = list(shape.moe_layers)
        rounds = [layers] if cfg.refit_mode == "parallel" else [[i] for i in layers]
        t0 = time.time()
        plan_json = plan.to_json()
        downs: dict[int, torch.Tensor] = {}
        per_layer: list[dict[str, Any]] = []
        tokens = 0
        # a sequential refit passes over the tokens once a layer: the bar counts every pass's
        desc = f"refit ({len(rounds)} passes)" if len(rounds) > 1 else "refit"
        bar = Progress(int(calib.num_tokens) * len(rounds), desc, unit="tok", enabled=progress)
        try:
            with (contextlib.nullcontext(pool) if pool is not None else
                  TeacherPool(src, workers=cfg.workers, gpus_per_worker=cfg.gpus_per_worker,
                              resources=cfg.teacher_resources)) as teachers:
                parts = teachers.parts(calib, cfg.batch_size)
                for collect in rounds:
                    replaced = {i: d for i, d in downs.items()} if cfg.refit_mode == "sequential" else {}
                    results = teachers.run_pass("refit", {"plan": plan_json, "layers": collect, "replaced": replaced},
                                                parts, cfg.batch_size, on_tokens=bar.update)
                    sums: dict[str, torch.Tensor] = {}
                    for r in results:
                        sums = add_sums(sums, r["sums"])
                    for i in collect:
                        mine = {k.split(".", 2)[2]: v for k, v in sums.items() if k.startswith(f"layers.{i}.")}
                        tokens = int(mine["tokens"])
                        d0t = down_t(plan_ffn(plan, i, on_disk)).to(torch.float64)
                        dt = solve(mine, d0t, fit=cfg.refit, ridge=cfg.refit_ridge,
                                   blocks=_blocks(plan, i, shape.expert_size, shape.shared_size, biased))
                        if not bool(torch.isfinite(dt).all()):
                            raise UserError(f"the refit of MoE layer {i} is not finite: the calibration "
                                            f"activations are degenerate; raise --refit-ridge")
                        before, after = reconstruction_error(mine, d0t), reconstruction_error(mine, dt)
                        downs[i] = dt.to(torch.float32)
                        per_layer.append({"layer": i, "error_before": round(before, 6), "error_after": round(after, 6)})
        finally:
            bar.close()
    record = {"fit": cfg.refit, "mode": cfg.refit_mode, "ridge": cfg.refit_ridge, "data": cfg.data,
              "samples": cfg.samples, "seq_len": cfg.seq_len, "seed": cfg.seed, "tokens": tokens,
              "seconds": round(time.time() - t0, 3), "layers": per_layer}
    return Refit(downs, record)


def mean_error(record: dict[str, Any], which: str) -> float:
    """The geometric mean over layers of one recorded error ("error_before" / "error_after")."""
    values = [max(float(lr[which]), 1e-12) for lr in record["layers"]]
    return math.exp(sum(math.log(v) for v in values) / len(values))


__all__ = ["refit", "Refit", "RefitPass", "solve", "reconstruction_error", "StateDictReader", "FITS", "MODES"]
