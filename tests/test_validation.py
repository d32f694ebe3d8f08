"""Plans and statistics cannot be loaded silently wrong: real files, hand-edited, give one UserError line."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_tiny_moe

from moe2dense_ray.cli import main
from moe2dense_ray.convert.plan import (
    MAX_SCALE,
    PLAN_FILE,
    Plan,
    load_plan,
    make_plan,
    save_plan,
)
from moe2dense_ray.convert.stats import Stats
from moe2dense_ray.core.config import CalibrateConfig, PlanSettings
from moe2dense_ray.core.errors import UserError

E, K, k = 6, 4, 2  # the tiny qwen3_moe teacher has 6 routed experts; plans keep 4 in 2 groups


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tokenizer, corpus):
    """A tiny teacher calibrated in-process (no Ray) with full statistics, from *relative* paths."""
    from moe2dense_ray.convert.calibrate import calibrate

    root = tmp_path_factory.mktemp("validation")
    make_tiny_moe("qwen3_moe", str(root / "teacher"), tokenizer=tokenizer)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        calibrate(CalibrateConfig(src="teacher", data=corpus, samples=2, seq_len=16, workers=0, full_stats=True, out="stats"), progress=False)
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture(scope="module")
def real_plan(calibrated) -> dict:
    """A real plan (make_plan on real statistics) as the JSON object `save_plan` writes."""
    plan = make_plan(Stats.load(str(calibrated / "stats")), PlanSettings(experts=K, groups=k, scoring="acp", grouping="output", scaling="score"))
    path = save_plan(plan, str(calibrated / "plan.json"))
    d = json.loads(open(path).read())
    assert d["groups"] == k and all(len(lp["groups"]) == k for lp in d["layers"])
    return d


def _write(tmp_path, d: dict | None = None, raw: str | None = None):
    path = tmp_path / "plan.json"
    path.write_text(raw if raw is not None else json.dumps(d))
    return path


def _load_error(path) -> str:
    with pytest.raises(UserError) as info:
        load_plan(str(path))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    return msg


# ---------------------------------------------------------------------------------------- plans


def test_real_plan_round_trips(calibrated, real_plan, tmp_path):
    plan = load_plan(str(_write(tmp_path, real_plan)))
    assert plan.to_json() == json.dumps(real_plan, indent=1) + "\n"
    assert plan == Plan.from_json(json.dumps(real_plan))
    assert all(0 < a <= 1 for lp in plan.layers for a in lp.scales)


def _move_group(d):  # keep the header's group count but leave group 1 empty
    lp = d["layers"][0]
    lp["groups"] = [lp["groups"][0] + lp["groups"][1], []]


def _set(*path_value):
    *path, value = path_value

    def mutate(d):
        obj = d
        for p in path[:-1]:
            obj = obj[p]
        obj[path[-1]] = value
    return mutate


def _pop(*path):
    def mutate(d):
        obj = d
        for p in path[:-1]:
            obj = obj[p]
        del obj[path[-1]]
    return mutate


PLAN_CASES = {
    # non-finite numbers: json.loads reads NaN / Infinity literals as floats
    "nan-scale": (_set("layers", 0, "scales", 0, float("nan")), "layers[0] (MoE layer 1).scales[0] is NaN"),
    "inf-shared-scale": (_set("layers", 0, "shared_scale", float("inf")), "shared_scale is Infinity"),
    "-inf-score": (_set("layers", 1, "scores", 2, float("-inf")), "layers[1] (MoE layer 2).scores[2] is -Infinity"),
    # absurd but finite scales
    "absurd-scale": (_set("layers", 1, "scales", 1, 1e6), "plan layer 2: scales[1] is 1000000.0; a scale must be "
                                                         "finite and at most 1000"),
    "absurd-negative-shared": (_set("layers", 0, "shared_scale", -5e3), "shared_scale is -5000.0"),
    # the header disagreeing with its layers
    "groups-header-below-layers": (_set("groups", 1), "plan layer 1: 2 groups, but the plan's groups is 1"),
    "groups-header-above-layers": (_set("groups", 3), "plan layer 1: 2 groups, but the plan's groups is 3"),
    "experts-header": (_set("experts", 3), "plan layer 1: 4 selected experts, but the plan's experts is 3"),
    "groups-zero": (_set("groups", 0), "the plan's groups (k, per layer) is 0; it must be between 1 and experts (4)"),
    "groups-negative": (_set("groups", -2), "the plan's groups (k, per layer) is -2"),
    "experts-zero": (_set("experts", 0), "the plan's experts (K, selected per layer) is 0"),
    "experts-above-E": (_set("experts", 7), "must be between 1 and num_experts (6)"),
    "empty-group": (_move_group, "plan layer 1: group 1 is empty"),
    "not-a-partition": (lambda d: d["layers"][0]["groups"][0].__setitem__(0, d["layers"][0]["groups"][1][0]),
                        "plan layer 1: groups are not a partition of the selected experts"),
    "expert-out-of-range": (lambda d: (d["layers"][0]["selected"].__setitem__(0, 9),
                                       d["layers"][0]["groups"][0].__setitem__(0, 9)),
                            "plan layer 1: expert id 9 is out of range 0..5"),
    "scores-length": (lambda d: d["layers"][1]["scores"].pop(),
                      "plan layer 2: 5 scores, but the plan's num_experts is 6"),
    "scales-length": (lambda d: d["layers"][1]["scales"].append(0.5), "plan layer 2: 3 scales for 2 groups"),
    "duplicate-layer": (lambda d: d["layers"].append(copy.deepcopy(d["layers"][0])), "plan layer 1: the layer is "
                                                                                    "planned twice"),
    "no-layers": (_set("layers", []), "the plan has no layers"),
    # wrong types: strictly, "3" and 3.5 are not ints, true is not a number, a string is not a list
    "string-int": (_set("experts", "4"), "experts: Input should be a valid integer, got '4'"),
    "float-int": (_set("groups", 2.5), "groups: Input should be a valid integer, got 2.5"),
    "bool-int": (_set("num_experts", True), "num_experts: Input should be a valid integer, got True"),
    "bool-float": (_set("layers", 1, "shared_scale", True), "layers[1] (MoE layer 2).shared_scale: Input should be "
                                                           "a valid number"),
    "string-list": (_set("layers", 0, "selected", "0,1,2,3"), "layers[0] (MoE layer 1).selected: Input should be a "
                                                             "valid array, got '0,1,2,3'"),
    "string-scale": (_set("layers", 0, "scales", 0, "0.5"), "scales[0]: Input should be a valid number, got '0.5'"),
    "layers-object": (_set("layers", {}), "layers: Input should be a valid array"),
    # keys and version
    "unknown-version": (_set("version", 2), "plan version 2 is not supported (this moe2dense reads version 1)"),
    "string-version": (_set("version", "1"), "plan version '1' is not supported"),
    "unknown-key": (_set("grups", 2), "unknown key 'grups' (a plan has model_type, num_experts"),
    "unknown-layer-key": (_set("layers", 1, "scale", [1.0]), "layers[1] (MoE layer 2): unknown key 'scale'"),
    "missing-key": (_pop("scoring"), "missing key scoring"),
    "missing-version": (_pop("version"), "missing key version"),
    "missing-layer-key": (_pop("layers", 0, "scales"), "layers[0] (MoE layer 1): missing key scales"),
}


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_hand_edited_plan_is_refused(real_plan, tmp_path, case):
    mutate, fragment = PLAN_CASES[case]
    d = copy.deepcopy(real_plan)
    mutate(d)
    msg = _load_error(_write(tmp_path, d))
    assert fragment in msg, msg


@pytest.mark.parametrize("raw,fragment", [
    ('{"version": 1, "layers": [', "is not valid JSON"),
    ("", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ("null", "holds a JSON NoneType, not an object"),
])
def test_plan_that_is_not_a_json_object(tmp_path, raw, fragment):
    msg = _load_error(_write(tmp_path, raw=raw))
    assert fragment in msg, msg


def test_nan_and_infinity_literals_in_the_file(real_plan, tmp_path):
    text = json.dumps(real_plan, indent=1)
    assert '"shared_scale": 1.0' in text
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        msg = _load_error(_write(tmp_path, raw=text.replace('"shared_scale": 1.0', f'"shared_scale": {literal}', 1)))
        assert "layers[0] (MoE layer 1).shared_scale is" in msg and "(not a finite number)" in msg, msg


def test_validate_checks_plans_made_in_memory(calibrated):
    """`validate` (which build and make_plan call) catches what never went through JSON."""
    plan = make_plan(Stats.load(str(calibrated / "stats")), PlanSettings(experts=K, groups=k, scoring="sf", grouping="router"))
    plan.validate()
    plan.layers[0].scales[0] = float("nan")
    with pytest.raises(UserError, match=r"plan layer 1: scales\[0\] is NaN"):
        plan.validate()
    plan.layers[0].scales[0] = MAX_SCALE * 1.5
    with pytest.raises(UserError, match="at most 1000 in magnitude"):
        plan.validate()
    plan.layers[0].scales[0] = MAX_SCALE  # the bound itself is allowed
    plan.validate()
    plan.groups = 1
    with pytest.raises(UserError, match="2 groups, but the plan's groups is 1"):
        plan.validate()


def test_every_method_makes_plans_within_the_bounds(calibrated):
    """The scale bound never refuses a plan the methods compute (make_plan validates its plan)."""
    from moe2dense_ray.convert.build import read_expert_weights
    from moe2dense_ray.convert.methods import GROUPINGS, SCALINGS, SCORINGS

    stats = Stats.load(str(calibrated / "stats"))
    weights = read_expert_weights(str(calibrated / "teacher"))
    seen = []
    for scaling in SCALINGS.names():
        for scoring in SCORINGS.names():
            for grouping in GROUPINGS.names():
                groups = K if grouping == "none" else k
                plan = make_plan(stats, PlanSettings(experts=K, groups=groups, scoring=scoring, grouping=grouping, scaling=scaling), expert_weights=weights)
                seen += [a for lp in plan.layers for a in (*lp.scales, lp.shared_scale)]
    assert seen and all(0 < a <= 1.0 + 1e-9 for a in seen), (min(seen), max(seen))


def test_plan_paths(calibrated, real_plan, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"empty is a directory without a plan \\({PLAN_FILE}\\)"):
        load_plan(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no plan at"):
        load_plan(str(tmp_path / "missing.json"))
    os.symlink("/dev/zero", tmp_path / "zero.json")
    with pytest.raises(UserError, match="zero.json is not a regular file"):
        load_plan(str(tmp_path / "zero.json"))
    # a directory holding a plan (a checkpoint that `build` wrote) names the file in its errors
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / PLAN_FILE).write_text(json.dumps({**real_plan, "groups": 0}))
    with pytest.raises(UserError, match=f"ckpt/{PLAN_FILE}: the plan's groups"):
        load_plan(str(tmp_path / "ckpt"))


def test_cli_build_with_a_bad_plan_is_one_error_line(calibrated, real_plan, tmp_path, capsys):
    bad = _write(tmp_path, {**real_plan, "groups": 1})
    out = tmp_path / "student"
    capsys.readouterr()
    code = main(["-q", "build", str(calibrated / "teacher"), str(bad), "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and "2 groups, but the plan's groups is 1" in err[0], err
    assert not out.exists()


# ----------------------------------------------------------------------------------- statistics


def _stats_copy(calibrated, tmp_path, meta_mutate=None, sums_mutate=None):
    import shutil

    dst = tmp_path / "stats"
    shutil.copytree(calibrated / "stats", dst)
    if meta_mutate:
        meta = json.loads((dst / "meta.json").read_text())
        meta_mutate(meta)
        (dst / "meta.json").write_text(json.dumps(meta))
    if sums_mutate:
        sums = load_file(str(dst / "stats.safetensors"))
        sums_mutate(sums)
        save_file(sums, str(dst / "stats.safetensors"))
    return dst


def test_real_statistics_load(calibrated):
    stats = Stats.load(str(calibrated / "stats"))
    assert stats.full and stats.num_experts == E and stats.moe_layers == [1, 2]
    assert stats.sums["layers.1.out_sum"].shape == (E, stats.meta["hidden_size"])


@pytest.mark.parametrize("key", ["version", "model_type", "num_experts", "moe_layers", "tokens"])
def test_meta_without_a_key(calibrated, tmp_path, key):
    dst = _stats_copy(calibrated, tmp_path, meta_mutate=lambda m: m.pop(key))
    with pytest.raises(UserError) as info:
        Stats.load(str(dst))
    assert str(info.value) == (f"{dst}/meta.json lacks {key}: not statistics moe2dense wrote; "
                               f"re-run `moe2dense calibrate`")


STATS_META_CASES = {
    "string-experts": ({"num_experts": "6"}, "num_experts: Input should be a valid integer, got '6'"),
    "zero-experts": ({"num_experts": 0}, "num_experts: Input should be greater than or equal to 1"),
    "string-layers": ({"moe_layers": "12"}, "moe_layers: Input should be a valid list, got '12'"),
    "float-layer": ({"moe_layers": [1, 2.5]}, "moe_layers[1]: Input should be a valid integer, got 2.5"),
    "duplicate-layers": ({"moe_layers": [1, 1, 2]}, "must be distinct non-negative layer indices"),
    "bool-tokens": ({"tokens": True}, "tokens: Input should be a valid integer, got True"),
    "zero-tokens": ({"tokens": 0}, "tokens: Input should be greater than or equal to 1"),
    "list-model-type": ({"model_type": ["qwen3_moe"]}, "model_type: Input should be a valid string"),
    "string-full": ({"full": "yes"}, "full: Input should be a valid boolean, got 'yes'"),
    "unknown-version": ({"version": 7}, "statistics version 7 is not 1"),
}


@pytest.mark.parametrize("case", list(STATS_META_CASES))
def test_meta_with_wrong_types(calibrated, tmp_path, case):
    change, fragment = STATS_META_CASES[case]
    dst = _stats_copy(calibrated, tmp_path, meta_mutate=lambda m: m.update(change))
    with pytest.raises(UserError) as info:
        Stats.load(str(dst))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{dst}/meta.json") and fragment in msg, msg


def _nan(sums):
    sums["layers.2.gram"][1, 3] = float("nan")


def _inf(sums):
    sums["layers.1.sel_count"][0] = float("inf")


STATS_SUMS_CASES = {
    "gram-not-square": ({}, lambda s: s.__setitem__("layers.1.gram", torch.zeros(E, E - 1, dtype=torch.float64)),
                        "layers.1.gram has shape [6, 5], not [6, 6]"),
    "sel-count-2d": ({}, lambda s: s.__setitem__("layers.2.sel_count", torch.zeros(1, E, dtype=torch.float64)),
                     "layers.2.sel_count has shape [1, 6], not [6]"),
    "tokens-not-scalar": ({}, lambda s: s.__setitem__("layers.1.tokens", torch.ones(1, dtype=torch.float64)),
                          "layers.1.tokens has shape [1], not []"),
    "out-sum-hidden": ({"hidden_size": 64}, None, "layers.1.out_sum has shape [6, 32], not [6, 64]"),
    "experts-disagree": ({"num_experts": 8}, None, "not [8] (for 8 experts"),
    "layer-without-sums": ({"moe_layers": [1, 2, 3]}, None, "has no statistics for MoE layer 3"),
    "layer-missing-a-sum": ({}, lambda s: s.pop("layers.2.logit_gram"), "MoE layer 2 lacks logit_gram"),
    "full-missing-a-sum": ({}, lambda s: s.pop("layers.1.out_sum"), "MoE layer 1 lacks out_sum"),
    "sums-for-unlisted-layer": ({"moe_layers": [1]}, None, "holds statistics for layer 2, which is not among the "
                                                          "MoE layers [1]"),
    "unknown-statistic": ({}, lambda s: s.__setitem__("layers.1.grams", torch.zeros(E, E, dtype=torch.float64)),
                          "unknown statistic 'layers.1.grams'"),
    "nan-sum": ({}, _nan, "layers.2.gram holds NaN or infinite values (1 of 36)"),
    "inf-sum": ({}, _inf, "layers.1.sel_count holds NaN or infinite values (1 of 6)"),
    "negative-count": ({}, lambda s: s["layers.2.sel_count"].__setitem__(0, -3.0),
                       "layers.2.sel_count holds negative values (1 of 6)"),
    "negative-norm": ({}, lambda s: s["layers.1.sqnorm_all"].__setitem__(slice(0, 2), -1.0),
                      "layers.1.sqnorm_all holds negative values (2 of 6)"),
}


@pytest.mark.parametrize("case", list(STATS_SUMS_CASES))
def test_sums_that_do_not_fit_their_meta(calibrated, tmp_path, case):
    change, mutate, fragment = STATS_SUMS_CASES[case]
    dst = _stats_copy(calibrated, tmp_path, meta_mutate=lambda m: m.update(change), sums_mutate=mutate)
    with pytest.raises(UserError) as info:
        Stats.load(str(dst))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(dst)) and fragment in msg, msg


def test_save_refuses_nan_and_writes_nothing(calibrated, tmp_path):
    stats = Stats.load(str(calibrated / "stats"))
    sums = {key: t.clone() for key, t in stats.sums.items()}
    sums["layers.1.logit_gram"][0, 0] = float("nan")
    out = tmp_path / "outdir"
    out.mkdir()
    with pytest.raises(UserError, match=r"refusing to save statistics to .*: layers\.1\.logit_gram holds NaN"):
        Stats(sums, dict(stats.meta)).save(str(out / "stats"))
    assert os.listdir(out) == []  # no directory, no partial, no lock file
    Stats(stats.sums, dict(stats.meta)).save(str(out / "stats"))  # the same statistics without the NaN save
    assert Stats.load(str(out / "stats")).tokens == stats.tokens


def test_relative_source_is_recorded_absolute(calibrated, tmp_path, monkeypatch, capsys):
    """Calibrated from relative paths (the fixture): meta holds absolute ones, so `plan --grouping
    weight` finds the teacher from another working directory."""
    meta = json.loads((calibrated / "stats" / "meta.json").read_text())
    assert meta["source"] == str(calibrated / "teacher")
    assert os.path.isabs(meta["data"])
    stats = Stats.load(str(calibrated / "stats"))
    monkeypatch.chdir(tmp_path)
    Stats(stats.sums, {**stats.meta, "source": "rel/teacher", "data": "hf:some/dataset"}).save("saved")
    saved = json.loads((tmp_path / "saved" / "meta.json").read_text())
    assert saved["source"] == str(tmp_path / "rel" / "teacher") and saved["data"] == "hf:some/dataset"
    Stats(stats.sums, {**stats.meta, "source": "memory://bucket/teacher"}).save("saved2")
    assert json.loads((tmp_path / "saved2" / "meta.json").read_text())["source"] == "memory://bucket/teacher"
    capsys.readouterr()
    code = main(["-q", "plan", str(calibrated / "stats"), "--experts", str(K), "--groups", str(k),
                 "--grouping", "weight", "--out", "weight-plan.json"])
    assert code == 0, capsys.readouterr().err
    assert load_plan("weight-plan.json").grouping == "weight"


def test_cli_plan_with_bad_statistics_is_one_error_line(calibrated, tmp_path, capsys):
    dst = _stats_copy(calibrated, tmp_path, sums_mutate=_nan)
    capsys.readouterr()
    code = main(["-q", "plan", str(dst), "--experts", str(K), "--out", str(tmp_path / "p.json")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "holds NaN" in err[0], err
    assert not (tmp_path / "p.json").exists()


def test_a_plan_path_through_a_missing_directory_makes_no_directory(calibrated, real_plan, tmp_path):
    from moe2dense_ray.convert.plan import save_plan

    plan = load_plan(str(_write(tmp_path, real_plan)))
    out = tmp_path / "out"
    out.mkdir()
    written = save_plan(plan, f"{out}/missing/../P.json")
    assert written == str(out / "P.json") and os.listdir(out) == ["P.json"]  # no missing/
