"""The closed-form refit (moe2dense_ray/convert/refit.py) against exact answers and brute force.

Where the MoE layer's output lies in the span of the kept neurons, the refit must reproduce the
teacher exactly; the solver must agree with `torch.linalg.lstsq` on the raw activations; the
sums must skip padding and add up across Ray workers; the plan must record what was done.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import FAMILY_NAMES, make_tiny_moe
from transformers import AutoModelForCausalLM

from moe2dense_ray.cli import main
from moe2dense_ray.convert.build import build
from moe2dense_ray.convert.calibrate import TeacherPool
from moe2dense_ray.convert.plan import PLAN_FILE, LayerPlan, Plan, load_plan
from moe2dense_ray.convert.refit import RefitPass, reconstruction_error, refit, solve
from moe2dense_ray.core.config import BuildConfig, RefitConfig
from moe2dense_ray.core.families import get_family, moe_shape


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _keep_half_plan(model, model_type: str) -> Plan:
    """K = E/2: experts 0..K-1 kept, each its own group, with deliberately wrong scales."""
    family = get_family(model_type)
    shape = moe_shape(family, model.config)
    E, K = shape.num_experts, shape.num_experts // 2
    layers = [LayerPlan(layer=i, scores=[float(E - e) for e in range(E)], selected=list(range(K)),
                        groups=[[e] for e in range(K)], scales=[0.7] * K, shared_scale=0.3)
              for i in shape.moe_layers]
    return Plan(model_type=model_type, num_experts=E, experts=K, groups=K, scoring="sf", grouping="none",
                scaling="uniform", layers=layers)


def _duplicate_dropped_experts(model, plan: Plan) -> None:
    """Give each dropped expert the gate and up weights (and biases) of a kept one, keeping its
    own down projection: with a uniform router its output is then a linear function of the kept
    neurons' activations, so the MoE layer's output lies in their span."""
    K = plan.experts
    with torch.no_grad():
        for lp in plan.layers:
            ex = getattr(model.model.layers[lp.layer], get_family(plan.model_type).moe_module).experts
            for e in range(K, plan.num_experts):
                ex.gate_up_proj[e] = ex.gate_up_proj[e % K]
                if hasattr(ex, "gate_up_proj_bias"):
                    ex.gate_up_proj_bias[e] = ex.gate_up_proj_bias[e % K]


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_refit_recovers_a_moe_output_in_the_span_of_the_kept_neurons(model_type, tmp_path, tokenizer, corpus):
    src = tmp_path / "teacher"
    teacher = make_tiny_moe(model_type, uniform_router=True)
    plan = _keep_half_plan(teacher, model_type)
    _duplicate_dropped_experts(teacher, plan)
    teacher.save_pretrained(src)
    tokenizer.save_pretrained(src)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    t = _logits(teacher, ids)

    build(BuildConfig(src=str(src), out=str(tmp_path / "plain")), plan, progress=False)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain"), dtype=torch.float32).eval()
    assert (t - _logits(plain, ids)).abs().max() > 1e-2, "without the refit the student must differ"

    for mode in ("sequential", "parallel"):
        dst = tmp_path / f"refit-{mode}"
        cfg = RefitConfig(data=corpus, samples=8, seq_len=32, workers=0, refit="down", refit_mode=mode,
                          refit_ridge=0.0)
        build(BuildConfig(src=str(src), out=str(dst), **cfg.model_dump()), plan, progress=False)
        student = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32).eval()
        diff = (t - _logits(student, ids)).abs().max().item()
        assert diff < 1e-4, f"{model_type} {mode}: max |teacher - refitted student| = {diff}"
        record = load_plan(str(dst)).refit
        assert record["fit"] == "down" and record["mode"] == mode and record["tokens"] > 0
        for layer in record["layers"]:
            assert layer["error_before"] > 1e-3 and layer["error_after"] < 1e-8, layer
    assert student.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


# -- the solver against brute force --------------------------------------------------------------


def _problem(n=400, w=10, h=6, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, w, generator=g, dtype=torch.float64)
    if bias:
        feats[:, -1] = 1.0
    target = feats @ torch.randn(w, h, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, h, generator=g,
                                                                                                dtype=torch.float64)
    sums = {"hh": feats.T @ feats, "hy": feats.T @ target, "yy": (target ** 2).sum(), "tokens": torch.tensor(n)}
    d0t = torch.randn(w, h, generator=g, dtype=torch.float64)
    return feats, target, sums, d0t


def test_ridge_to_zero_matches_lstsq_on_the_raw_activations():
    feats, target, sums, d0t = _problem()
    want = torch.linalg.lstsq(feats, target).solution
    torch.testing.assert_close(solve(sums, d0t, fit="down", ridge=0.0), want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(solve(sums, d0t, fit="down", ridge=1e-12), want, rtol=1e-7, atol=1e-8)
    # a huge ridge keeps the plan's weights; a moderate one lies in between
    torch.testing.assert_close(solve(sums, d0t, fit="down", ridge=1e9), d0t, rtol=1e-6, atol=1e-6)
    mid = solve(sums, d0t, fit="down", ridge=1.0)
    assert reconstruction_error(sums, want) < reconstruction_error(sums, mid) < reconstruction_error(sums, d0t)


def test_scale_fits_match_lstsq_on_their_own_features():
    """neuron: one factor per row of D^T; group: one per block of rows. Brute force builds each
    factor's feature (h_j(x) times row j of D0^T, flattened over tokens and outputs)."""
    feats, target, sums, d0t = _problem(w=7, bias=True)
    cols = torch.stack([(feats[:, j:j + 1] * d0t[j]).reshape(-1) for j in range(7)], dim=1)
    s = torch.linalg.lstsq(cols, target.reshape(-1, 1)).solution
    torch.testing.assert_close(solve(sums, d0t, fit="neuron", ridge=0.0), d0t * s, rtol=1e-8, atol=1e-9)
    blocks = [3, 3, 1]  # two groups and the bias
    grouped = torch.stack([cols[:, 0:3].sum(1), cols[:, 3:6].sum(1), cols[:, 6]], dim=1)
    sg = torch.linalg.lstsq(grouped, target.reshape(-1, 1)).solution
    per_row = torch.cat([sg[0].repeat(3), sg[1].repeat(3), sg[2]])[:, None]
    torch.testing.assert_close(solve(sums, d0t, fit="group", ridge=0.0, blocks=blocks), d0t * per_row,
                               rtol=1e-8, atol=1e-9)
    with pytest.raises(ValueError):
        solve(sums, d0t, fit="group", ridge=0.0, blocks=[3, 3])


def test_reconstruction_error_from_sums_is_the_direct_one():
    feats, target, sums, d0t = _problem(seed=3)
    direct = float(((feats @ d0t - target) ** 2).sum() / (target ** 2).sum())
    assert reconstruction_error(sums, d0t) == pytest.approx(direct, rel=1e-10)


# -- the pass: padding, sequential inputs, workers ------------------------------------------------


def _plan_for(src: str, model_type: str) -> Plan:
    model = AutoModelForCausalLM.from_pretrained(src)
    return _keep_half_plan(model, model_type)


def test_padding_never_counts(tmp_path, tokenizer):
    src = tmp_path / "t"
    make_tiny_moe("qwen2_moe", str(src), tokenizer=tokenizer)
    plan = _plan_for(str(src), "qwen2_moe")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    layers = [lp.layer for lp in plan.layers]
    padded = RefitPass(str(src), plan=plan.to_json(), layers=layers)
    padded.run(ids, mask, batch_size=3)
    padded.close()  # one teacher, one pass at a time
    alone = RefitPass(padded.teacher, plan=plan.to_json(), layers=layers)
    for row, n in enumerate(mask.sum(1).tolist()):
        alone.run(ids[row:row + 1, :n], mask[row:row + 1, :n], batch_size=1)
    assert float(padded.sums[f"layers.{layers[0]}.tokens"]) == float(mask.sum())
    for key, value in alone.sums.items():
        torch.testing.assert_close(padded.sums[key], value, rtol=1e-5, atol=1e-4)


def test_sequential_fits_the_first_layer_as_parallel_does_and_the_rest_on_the_students_inputs(
        tmp_path, tokenizer, corpus):
    src = tmp_path / "t"
    make_tiny_moe("mixtral", str(src), tokenizer=tokenizer)
    plan = _plan_for(str(src), "mixtral")
    common = dict(data=corpus, samples=6, seq_len=32, workers=0, refit="down")
    seq = refit(str(src), plan, RefitConfig(**common, refit_mode="sequential"), progress=False)
    par = refit(str(src), plan, RefitConfig(**common, refit_mode="parallel"), progress=False)
    first, second = plan.layers[0].layer, plan.layers[1].layer
    torch.testing.assert_close(seq.downs[first], par.downs[first], rtol=1e-5, atol=1e-6)
    assert (seq.downs[second] - par.downs[second]).abs().max() > 1e-4
    before = {lr["layer"]: lr["error_before"] for lr in seq.record["layers"]}
    assert before[first] == pytest.approx(par.record["layers"][0]["error_before"], rel=1e-6)


def test_one_and_two_ray_workers_refit_the_same(tmp_path, tokenizer, corpus, ray_cluster):
    src = tmp_path / "t"
    make_tiny_moe("gpt_oss", str(src), tokenizer=tokenizer)
    plan = _plan_for(str(src), "gpt_oss")
    common = dict(data=corpus, samples=6, seq_len=32, refit="down", refit_mode="sequential", batch_size=2)
    alone = refit(str(src), plan, RefitConfig(**common, workers=0), progress=False)
    with TeacherPool(str(src), workers=2) as pool:
        two = refit(str(src), plan, RefitConfig(**common, workers=2), progress=False, pool=pool)
    assert set(alone.downs) == set(two.downs)
    for i in alone.downs:
        torch.testing.assert_close(two.downs[i], alone.downs[i], rtol=1e-4, atol=1e-5)
    assert alone.record["tokens"] == two.record["tokens"]


# -- the command line ----------------------------------------------------------------------------


def test_convert_refit_records_the_fit_and_lowers_the_error(tmp_path, tokenizer, corpus, capsys):
    src, dst = tmp_path / "t", tmp_path / "dense"
    make_tiny_moe("qwen3_moe", str(src), tokenizer=tokenizer)
    code = main(["-q", "convert", str(src), "--data", corpus, "--samples", "6", "--seq-len", "32", "--workers", "0",
                 "--experts", "3", "--scoring", "sf", "--refit", "down", "--refit-mode", "parallel",
                 "--out", str(dst)])
    assert code == 0
    out = capsys.readouterr().out
    assert "refitted (down, parallel)" in out
    record = json.loads((dst / PLAN_FILE).read_text())["refit"]
    assert record["samples"] == 6 and record["ridge"] == 1e-3
    assert all(lr["error_after"] < lr["error_before"] for lr in record["layers"])
    AutoModelForCausalLM.from_pretrained(str(dst))


def test_refit_without_text_is_one_line_before_anything_runs(tmp_path, tokenizer, corpus, capsys):
    src = tmp_path / "t"
    model = make_tiny_moe("qwen3_moe", str(src), tokenizer=tokenizer)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(_keep_half_plan(model, "qwen3_moe").to_json())
    assert main(["-q", "build", str(src), str(plan_file), "--refit", "down", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --refit needs calibration text: give --data"]
    # DST is checked before the teacher runs: the plan file itself is not a place to write to
    assert main(["-q", "build", str(src), str(plan_file), "--refit", "down", "--data", corpus,
                 "--out", str(src)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "d").exists()
