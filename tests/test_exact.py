"""Exactness: the conversion is tested where an exact answer exists.

A teacher whose routers are zero with top_k = E gives every expert the same gate on every
token, so keeping all E experts with uniform scaling must reproduce its logits (< 1e-4, fp32),
through the real transformers classes, after saving and reloading, for every family.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import FAMILY_NAMES, make_tiny_moe
from transformers import AutoModelForCausalLM

from moe2dense_ray.convert.build import build
from moe2dense_ray.convert.calibrate import calibrate
from moe2dense_ray.convert.plan import PLAN_FILE, make_plan
from moe2dense_ray.core.checkpoint import CheckpointReader
from moe2dense_ray.core.config import BuildConfig, CalibrateConfig, PlanSettings
from moe2dense_ray.core.families import get_family
from moe2dense_ray.core.lm_head import LMHead


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_uniform_router_all_experts_is_exact(model_type, tmp_path, tokenizer, corpus):
    src, dst = tmp_path / "teacher", tmp_path / "student"
    teacher = make_tiny_moe(model_type, str(src), uniform_router=True, tokenizer=tokenizer)
    E = get_family(model_type)
    stats = calibrate(CalibrateConfig(src=str(src), data=corpus, samples=4, seq_len=32, workers=0), progress=False)
    num_experts = stats.num_experts
    plan = make_plan(stats, PlanSettings(experts=num_experts, scoring="cp", scaling="uniform"))
    build(BuildConfig(src=str(src), out=str(dst)), plan, progress=False)

    student = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32).eval()
    assert type(student).__name__ == E.dense_architecture  # the class the family's row promises
    ids = torch.randint(0, teacher.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    t, s = _logits(teacher, ids), _logits(student, ids)
    assert t.abs().max() > 0.1, "the teacher's logits are too small for this test to mean anything"
    diff = (t - s).abs().max().item()
    assert diff < 1e-4, f"{model_type}: max |teacher - student| = {diff}"
    # both split into body and LM head give their own logits: the chunked teacher service and
    # student loss (lm_head.py) are exact for every family, on both sides
    for model in (teacher, student):
        LMHead(model).check()
    # generate works on the student and the tokenizer came along
    out = student.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    assert (dst / "tokenizer.json").exists() or (dst / "tokenizer_config.json").exists()
    assert json.loads((dst / PLAN_FILE).read_text())["experts"] == num_experts
    assert E.model_type == model_type


def test_selected_experts_are_copied_with_plan_scales(tmp_path, tokenizer, corpus):
    """With K < E the dense FFN holds exactly the selected experts' weights with the plan's scales."""
    src, dst = tmp_path / "teacher", tmp_path / "student"
    teacher = make_tiny_moe("qwen3_moe", str(src), tokenizer=tokenizer)
    stats = calibrate(CalibrateConfig(src=str(src), data=corpus, samples=4, seq_len=32, workers=0), progress=False)
    plan = make_plan(stats, PlanSettings(experts=3, scoring="sf", scaling="score"))
    rep = build(BuildConfig(src=str(src), out=str(dst)), plan, progress=False)
    r = CheckpointReader(str(dst))
    I = teacher.config.moe_intermediate_size
    for lp in plan.layers:
        experts = teacher.model.layers[lp.layer].mlp.experts
        gate = r.get(f"model.layers.{lp.layer}.mlp.gate_proj.weight")
        down = r.get(f"model.layers.{lp.layer}.mlp.down_proj.weight")
        assert len(lp.selected) == 3 and sorted(lp.selected) == sorted(e for g in lp.groups for e in g)
        for j, (group, a) in enumerate(zip(lp.groups, lp.scales)):
            (e,) = group
            torch.testing.assert_close(gate[j * I:(j + 1) * I], experts.gate_up_proj[e, :I], rtol=0, atol=0)
            torch.testing.assert_close(down[:, j * I:(j + 1) * I], a * experts.down_proj[e], rtol=1e-6, atol=1e-7)
        # width: the routed part is K/E of the teacher's routed experts; the rest is zero padding
        assert gate.shape[0] == rep.intermediate_size
        assert gate[3 * I:].abs().sum() == 0
        # score scaling keeps the calibrated total gate mass (1 for renormalised top-k)
        assert sum(lp.scales) == pytest.approx(1.0, rel=1e-6)
    # the already-dense layer 0 is kept exactly, zero-padded to the student's width
    dense_gate = r.get("model.layers.0.mlp.gate_proj.weight")
    torch.testing.assert_close(dense_gate[: teacher.config.intermediate_size], teacher.model.layers[0].mlp.gate_proj.weight)
    # attention, embeddings and norms are copied bit for bit
    t_state = teacher.state_dict()
    for key in r.keys():
        if ".mlp." not in key:
            assert torch.equal(r.get(key), t_state[key]), key


def test_the_documented_family_table_is_the_generated_one():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "families_table.py")
    spec = importlib.util.spec_from_file_location("families_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(module.PAGE) as f:
        text = f.read()
    assert module.render(text) == text, "docs/convert.md's family table is stale: run python scripts/families_table.py"


def test_an_unsupported_family_is_refused_in_one_line_that_says_why(tmp_path, tokenizer, corpus, capsys):
    from transformers import AutoConfig

    from moe2dense_ray.cli import main
    from moe2dense_ray.core.families import UNSUPPORTED

    cfg = AutoConfig.for_model("jetmoe", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                               intermediate_size=8, kv_channels=8)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "jetmoe")
    tokenizer.save_pretrained(tmp_path / "jetmoe")
    code = main(["-q", "convert", str(tmp_path / "jetmoe"), "--data", corpus, "--experts", "2", "--workers", "0",
                 "--out", str(tmp_path / "dense")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: jetmoe cannot be converted: {UNSUPPORTED['jetmoe']}"], err
    assert not (tmp_path / "dense").exists()
    assert main(["families"]) == 0
    listed = capsys.readouterr().out
    assert f"| jetmoe | {UNSUPPORTED['jetmoe']} |" in listed and "| qwen3_next |" in listed


def test_a_family_setting_the_construction_cannot_reproduce_is_refused():
    from tiny import tiny_config

    from moe2dense_ray.core.errors import UserError
    from moe2dense_ray.core.families import moe_shape

    family = get_family("cohere2_moe")
    assert moe_shape(family, tiny_config("cohere2_moe")).shared_size == 8  # summed shared experts: fine
    with pytest.raises(UserError, match="cannot be converted: its shared experts are averaged"):
        moe_shape(family, tiny_config("cohere2_moe", shared_expert_combination_strategy="average"))
