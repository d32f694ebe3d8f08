"""The staged pipeline through the CLI: calibrate on Ray once, plan many times, build; merging."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import make_tiny_moe
from transformers import AutoModelForCausalLM

from moe2dense_ray.cli import main
from moe2dense_ray.convert.methods import merge_weights
from moe2dense_ray.convert.plan import load_plan
from moe2dense_ray.core.checkpoint import CheckpointReader


@pytest.fixture(scope="module")
def staged(tmp_path_factory, tokenizer, corpus, ray_cluster):
    """One Ray calibration with full statistics that every test here plans from."""
    root = tmp_path_factory.mktemp("pipeline")
    src = root / "teacher"
    teacher = make_tiny_moe("qwen3_moe", str(src), tokenizer=tokenizer, num_experts=8, mlp_only_layers=[])
    code = main(["-q", "calibrate", str(src), "--data", corpus, "--samples", "6", "--seq-len", "24",
                 "--workers", "2", "--full-stats", "--out", str(root / "stats")])
    assert code == 0
    return root, src, teacher


@pytest.mark.parametrize("grouping", ["random", "weight", "output", "router"])
def test_merged_groups_are_score_weighted_averages(staged, grouping):
    root, src, teacher = staged
    plan_path, dst = root / f"plan-{grouping}.json", root / f"student-{grouping}"
    assert main(["-q", "plan", str(root / "stats"), "--experts", "6", "--groups", "3", "--scoring", "acp",
                 "--grouping", grouping, "--scaling", "score", "--out", str(plan_path)]) == 0
    assert main(["-q", "build", str(src), str(plan_path), "--out", str(dst)]) == 0
    plan = load_plan(str(plan_path))
    r = CheckpointReader(str(dst))
    I = teacher.config.moe_intermediate_size
    for lp in plan.layers:
        ex = teacher.model.layers[lp.layer].mlp.experts
        assert len(lp.groups) == 3 and sorted(sum(lp.groups, [])) == sorted(lp.selected)
        up = r.get(f"model.layers.{lp.layer}.mlp.up_proj.weight")
        down = r.get(f"model.layers.{lp.layer}.mlp.down_proj.weight")
        scores = torch.tensor(lp.scores, dtype=torch.float64)
        for j, (group, a) in enumerate(zip(lp.groups, lp.scales)):
            w = merge_weights(group, scores)
            want_up = sum(float(wi) * ex.gate_up_proj[e, I:] for wi, e in zip(w, group))
            want_down = a * sum(float(wi) * ex.down_proj[e] for wi, e in zip(w, group))
            torch.testing.assert_close(up[j * I:(j + 1) * I], want_up, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(down[:, j * I:(j + 1) * I], want_down, rtol=1e-5, atol=1e-6)
        assert sum(lp.scales) == pytest.approx(1.0, rel=1e-6)  # renormalised top-k: gate mass 1
    student = AutoModelForCausalLM.from_pretrained(dst)
    assert student.config.intermediate_size == 3 * I


def test_one_stats_many_plans_and_convert_equivalence(staged, corpus, tmp_path):
    """`convert` == calibrate + plan + build; a plan keeps the issue-2 format."""
    root, src, teacher = staged
    assert main(["-q", "plan", str(root / "stats"), "--experts", "4", "--scoring", "do-acp",
                 "--out", str(root / "p-doacp.json")]) == 0
    assert main(["-q", "plan", str(root / "stats"), "--experts", "4", "--scoring", "reap",
                 "--out", str(root / "p-reap.json")]) == 0
    d = json.loads((root / "p-doacp.json").read_text())
    assert {"scoring", "grouping", "scaling", "experts", "layers"} <= set(d)
    assert {"layer", "scores", "selected", "groups", "scales"} <= set(d["layers"][0])
    assert len(d["layers"][0]["scores"]) == 8
    out = tmp_path / "converted"
    assert main(["-q", "convert", str(src), "--data", corpus, "--samples", "6", "--seq-len", "24",
                 "--workers", "0", "--experts", "4", "--scoring", "do-acp", "--out", str(out)]) == 0
    converted = json.loads((out / "moe2dense_plan.json").read_text())
    for a, b in zip(converted["layers"], d["layers"]):
        assert a["selected"] == b["selected"]  # same data, same statistics, same plan


def test_plan_refuses_output_methods_on_router_stats(tmp_path, tokenizer, corpus, capsys):
    src = tmp_path / "t"
    make_tiny_moe("mixtral", str(src), tokenizer=tokenizer)
    assert main(["-q", "calibrate", str(src), "--data", corpus, "--samples", "2", "--seq-len", "16",
                 "--workers", "0", "--out", str(tmp_path / "stats")]) == 0
    capsys.readouterr()
    code = main(["-q", "plan", str(tmp_path / "stats"), "--experts", "2", "--scoring", "do-acp",
                 "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert code == 2 and "--full-stats" in err and not (tmp_path / "p.json").exists()


def test_method_settings_reach_the_methods_and_the_plan(staged):
    """Flags such as --ridge-scale are plan settings: passed to the method that reads them, recorded."""
    from moe2dense_ray.convert.methods import GROUPINGS, SCORINGS, select
    from moe2dense_ray.convert.stats import Stats

    root, _, _ = staged
    path = root / "p-settings.json"
    assert main(["-q", "plan", str(root / "stats"), "--experts", "6", "--groups", "3", "--scoring", "do-acp",
                 "--grouping", "output", "--ridge-scale", "1e-6", "--output-distance", "cosine",
                 "--out", str(path)]) == 0
    plan = load_plan(str(path))
    assert plan.options == {"ridge_scale": 1e-6, "kmeans_restarts": 8, "output_distance": "cosine",
                            "score_reduction": "sum"}
    stats = Stats.load(str(root / "stats"))
    for lp in plan.layers:
        s = stats.layer(lp.layer)
        result = SCORINGS.get("do-acp")(s, k=3, layer=lp.layer, ridge_scale=1e-6)
        assert lp.selected == select(result, 6)
        want = GROUPINGS.get("output")(select(result, 6), 3, scores=result.scores, stats=s, layer=lp.layer,
                                       distance="cosine")
        assert lp.groups == want


def test_every_stage_takes_a_config_file(staged, corpus, tmp_path):
    """calibrate, plan, build and convert read the same settings from --config YAML as from flags."""
    import yaml

    from moe2dense_ray.core.config import ConvertConfig, PlanConfig

    root, src, _ = staged
    cfg = PlanConfig(stats=str(root / "stats"), experts=4, scoring="reap", out=str(tmp_path / "from-yaml.json"))
    (tmp_path / "plan.yaml").write_text(cfg.to_yaml())
    assert main(["-q", "plan", "--config", str(tmp_path / "plan.yaml")]) == 0
    assert main(["-q", "plan", str(root / "stats"), "--experts", "4", "--scoring", "reap",
                 "--out", str(tmp_path / "from-flags.json")]) == 0
    assert load_plan(str(tmp_path / "from-yaml.json")).layers == load_plan(str(tmp_path / "from-flags.json")).layers
    conv = ConvertConfig(src=str(src), data=corpus, samples=6, seq_len=24, workers=0, experts=4, scoring="cp",
                         out=str(tmp_path / "dense"))
    (tmp_path / "convert.yaml").write_text(yaml.safe_dump({**conv.model_dump(mode="json"), "experts": 8}))
    # a flag overrides the file; the file supplies the positional SRC too
    assert main(["-q", "convert", "--config", str(tmp_path / "convert.yaml"), "--experts", "4"]) == 0
    assert load_plan(str(tmp_path / "dense")).experts == 4
    assert main(["-q", "build", str(src), str(tmp_path / "from-yaml.json"), "--out", str(tmp_path / "b"),
                 "--shard-size", "0.00001"]) == 0
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()  # --shard-size reached the writer
