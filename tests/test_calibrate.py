"""Calibration statistics against brute force, padding excluded, and 1 vs N Ray workers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY, make_tiny_moe

from moe2dense_ray.convert.calibrate import Calibrator, calibrate
from moe2dense_ray.convert.methods import SCORINGS, select
from moe2dense_ray.core.config import CalibrateConfig

FAMILIES = sorted(TINY)


def _brute_force(model, ids, mask):
    """Per-token reference: capture each MoE block's input, then recompute routing and every
    expert's output with explicit loops over tokens and experts."""
    inputs = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "experts"):
            hooks.append(layer.mlp.register_forward_pre_hook(
                lambda mod, args, i=i: inputs.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]).clone())))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    m = mask.reshape(-1).bool()
    out = {}
    with torch.no_grad():  # restored even if the reference raises
        for i, x in inputs.items():
            mlp = model.model.layers[i].mlp
            ex, W = mlp.experts, mlp.gate.weight
            E, k = W.shape[0], model.config.num_experts_per_tok
            I = ex.gate_up_proj.shape[1] // 2
            s = {n: torch.zeros(E, dtype=torch.float64) for n in
                 ("sel_count", "prob_sum", "prob_sel_sum", "gate_sum", "sqnorm_all", "sqnorm_routed",
                  "norm_routed", "gate_norm_routed")}
            gram = torch.zeros(E, E, dtype=torch.float64)
            tokens, mass = 0, 0.0
            for t in range(x.shape[0]):
                if not m[t]:
                    continue
                tokens += 1
                p = torch.softmax(x[t].double() @ W.double().T, -1)
                top = torch.topk(p, k).indices.tolist()
                g = p[top] / p[top].sum() if model.config.norm_topk_prob else p[top]
                f = []
                for e in range(E):
                    h = ex.gate_up_proj[e].double() @ x[t].double()
                    f.append(ex.down_proj[e].double() @ (F.silu(h[:I]) * h[I:]))
                for e in range(E):
                    s["prob_sum"][e] += p[e]
                    n = f[e].norm()
                    s["sqnorm_all"][e] += n ** 2
                    for j in range(E):
                        gram[e, j] += f[e] @ f[j]
                    if e in top:
                        ge = g[top.index(e)]
                        s["sel_count"][e] += 1
                        s["prob_sel_sum"][e] += p[e]
                        s["gate_sum"][e] += ge
                        s["sqnorm_routed"][e] += n ** 2
                        s["norm_routed"][e] += n
                        s["gate_norm_routed"][e] += ge * n
                        mass += float(ge)
            out[i] = {**s, "gram": gram, "tokens": torch.tensor(float(tokens)), "gate_mass": torch.tensor(mass)}
    return out


def test_statistics_match_brute_force_and_skip_padding(tmp_path, tokenizer):
    src = tmp_path / "t"
    model = make_tiny_moe("qwen3_moe", str(src), tokenizer=tokenizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padded tail
    mask[2, 3:] = 0
    cal = Calibrator(str(src), full=True)
    cal.run(ids, mask, batch_size=2)
    ref = _brute_force(model, ids, mask)
    assert set(ref) == set(cal.shape.moe_layers)
    for i, r in ref.items():
        assert float(r["tokens"]) == float(mask.sum())
        for name, val in r.items():
            got = cal.sums[f"layers.{i}.{name}"]
            torch.testing.assert_close(got, val.to(got.dtype), rtol=1e-4, atol=1e-5, msg=f"layer {i} {name}")
        # and every scoring that these sums feed ranks the experts as the per-token reference does
        layer_sums = {k.split(".", 2)[2]: v for k, v in cal.sums.items() if k.startswith(f"layers.{i}.")}
        for name in ("sf", "pp", "cp", "acp", "do-acp", "reap", "ean"):
            got = SCORINGS.get(name)(layer_sums, k=2, layer=i)
            want = SCORINGS.get(name)({**layer_sums, **r}, k=2, layer=i)
            torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-6)
            assert select(got, 3) == select(want, 3), name


def test_one_worker_and_two_ray_workers_agree(tmp_path, tokenizer, corpus, ray_cluster):
    src = tmp_path / "t"
    make_tiny_moe("deepseek_v2", str(src), tokenizer=tokenizer)
    one = calibrate(CalibrateConfig(src=str(src), data=corpus, samples=6, seq_len=24, workers=0, full_stats=True), progress=False)
    two = calibrate(CalibrateConfig(src=str(src), data=corpus, samples=6, seq_len=24, workers=2, full_stats=True, batch_size=2), progress=False)
    assert one.tokens == two.tokens > 0
    assert set(one.sums) == set(two.sums)
    for key in one.sums:  # float32 partial sums of batches of 8 and of 2 blocks: the brute-force test's tolerance
        torch.testing.assert_close(one.sums[key], two.sums[key], rtol=1e-4, atol=1e-5, msg=key)
    assert two.meta["workers"] == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_never_counts_in_any_family(family, tmp_path, tokenizer):
    """A right-padded batch gives the same sums as its rows run alone without padding: padded
    positions neither count nor (causal attention) change the real tokens' statistics."""
    src = tmp_path / "t"
    model = make_tiny_moe(family, str(src), tokenizer=tokenizer)
    # transformers' chunked Gated-DeltaNet layers give padded and unpadded rows that differ by ~3e-4
    # in the logits themselves; a counted padding token would move the sums by ~5%
    rtol = 2e-3 if "linear_attention" in (getattr(model.config, "layer_types", None) or ()) else 1e-4
    ids = torch.randint(3, 96, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    batched = Calibrator(str(src), full=True)
    assert batched.run(ids, mask, batch_size=3) == int(mask.sum())
    alone = Calibrator(str(src), full=True)
    for row, m in zip(ids, mask):
        n = int(m.sum())
        alone.run(row[None, :n], torch.ones(1, n, dtype=mask.dtype), batch_size=1)
    assert alone.tokens == batched.tokens == int(mask.sum())
    assert batched.sums.keys() == alone.sums.keys()
    for key, got in batched.sums.items():
        scale = float(alone.sums[key].abs().max())  # float32 partial sums: noise grows with the sum's size
        torch.testing.assert_close(got, alone.sums[key], rtol=rtol, atol=1e-5 + 1e-6 * scale, msg=f"{family} {key}")
