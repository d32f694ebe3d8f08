"""`moe2dense sweep` end to end on the bundled teacher: one calibration, one teacher stream,
Tune trials that plan, build and distill under ASHA, a leaderboard, and a resume."""

from __future__ import annotations

import csv
import json
import os

import pytest

from moe2dense_ray import assets
from moe2dense_ray.cli import main
from moe2dense_ray.errors import UserError
from moe2dense_ray.plan import load_plan
from moe2dense_ray.sweep import SweepConfig, combinations, load_space, sweep, varying_keys


def _args(space, out, *extra):
    return ["-q", "sweep", "--teacher", assets.teacher_path(), "--data", assets.calibration_path(), "--space",
            str(space), "--out", str(out), "--samples", "8", "--seq-len", "64", "--tokens", "2048", "--top-k", "32",
            "--val-blocks", "4", "--report-every", "2", "--calibration-workers", "0", *extra]


def test_bad_spaces_are_one_line_before_any_work(tmp_path, capsys):
    cases = {"nokeys.yaml": ("{}\n", "must map settings"), "unknown.yaml": ("scoring: cp\nexperts: 4\ncolour: red\n",
                                                                          "unknown setting(s) colour"),
             "method.yaml": ("scoring: [cp, nope]\nexperts: 4\n", "nope"),
             "k.yaml": ("scoring: cp\nexperts: [4, 99]\n", "--experts must be between 1 and 16"),
             "lr.yaml": ("scoring: cp\nexperts: 4\nlr: -1\n", "lr"),
             "loss.yaml": ("scoring: cp\nexperts: 4\nloss: l2\n", "unknown loss 'l2'"),
             "refit.yaml": ("scoring: cp\nexperts: 4\nrefit: [down, all]\n", "unknown refit 'all'")}
    for name, (text, fragment) in cases.items():
        (tmp_path / name).write_text(text)
        code = main(_args(tmp_path / name, tmp_path / "out"))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (name, err)
    assert not (tmp_path / "out").exists()


def test_sweep_runs_trials_under_asha_writes_a_leaderboard_and_resumes(tmp_path, ray_cluster):
    space = tmp_path / "space.yaml"
    space.write_text("- {scoring: sf, experts: 4, lr: 0.002, batch_size: 4, refit: down}\n"  # two grids: nothing crossed
                     "- {scoring: random, experts: 4, seed: 1, lr: 0.002, batch_size: 4}\n")
    out = tmp_path / "sweep"
    assert main(_args(space, out)) == 0
    # the shared work was done once
    assert (out / "stats" / "meta.json").exists() and (out / "logits" / "stream.json").exists()
    trials = sorted(os.listdir(out / "trials"))
    assert len(trials) == 2
    rows = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert sorted((r["scoring"], r["seed"], r["refit"]) for r in rows) == [("random", "1", ""), ("sf", "", "down")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["errors"] == 0
    assert summary["tokens_spent"] <= summary["grid_tokens"] == 2 * 2048
    for r in rows:  # each trial distilled from its own build, perplexity before and after
        assert float(r["ppl before"]) > 0 and float(r["ppl after"]) > 0
        stopped = r["stopped early"] == "True"
        assert stopped == (int(r["tokens"]) < 2048)
        if not stopped and not r["refit"]:  # a refitted student starts near its optimum: 8 steps may not help
            assert float(r["ppl after"]) < float(r["ppl before"])
            assert (out / "trials" / r["trial"] / "run" / "student" / "config.json").exists()
        refit = load_plan(str(out / "trials" / r["trial"] / "student")).refit
        assert (refit or {}).get("fit", "") == r["refit"]  # the refit trial built its student refitted
    fitted, plain = (next(r for r in rows if bool(r["refit"]) == f) for f in (True, False))
    assert float(fitted["ppl before"]) < 0.5 * float(plain["ppl before"])
    best = min(rows, key=lambda r: float(r["ppl after"]))
    assert summary["best"]["trial"] == best["trial"]
    assert (out / "curves.png").stat().st_size > 1000 and (out / "leaderboard.md").exists()
    # resuming a finished sweep runs no trial again and rewrites the same leaderboard
    before = {t: os.path.getmtime(out / "trials" / t / "student" / "config.json") for t in trials}
    again = sweep(SweepConfig(teacher=assets.teacher_path(), data=assets.calibration_path(), space=str(space),
                              out=str(out), resume=True), progress=False)
    assert again["trials"] == 2 and again["tokens_spent"] == summary["tokens_spent"]
    assert before == {t: os.path.getmtime(out / "trials" / t / "student" / "config.json") for t in trials}


def test_space_values_become_lists_and_grids_are_united_not_crossed(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("scoring: cp\nexperts: [2, 4]\n")
    assert load_space(str(p)) == [{"scoring": ["cp"], "experts": [2, 4]}]
    p.write_text("- just a list\n")
    with pytest.raises(UserError, match="must map settings"):
        load_space(str(p))
    p.write_text("- {scoring: [cp, sf], experts: 4}\n- {scoring: random, experts: 4, seed: [0, 1]}\n"
                 "- {scoring: cp, experts: 4}\n- {scoring: sf, experts: 8, groups: 4, grouping: [weight, output]}\n")
    combos = combinations(load_space(str(p)))
    assert combos == [{"scoring": "cp", "experts": 4}, {"scoring": "sf", "experts": 4},
                      {"scoring": "random", "experts": 4, "seed": 0}, {"scoring": "random", "experts": 4, "seed": 1},
                      {"scoring": "sf", "experts": 8, "groups": 4, "grouping": "weight"},
                      {"scoring": "sf", "experts": 8, "groups": 4, "grouping": "output"}]  # the repeated cp once
    assert varying_keys(combos) == ["scoring", "grouping", "experts", "groups", "seed"]
    p.write_text("- {scoring: cp, experts: 4}\n- {scoring: cp, experts: 4, colour: red}\n")
    with pytest.raises(UserError, match=r"\(grid 2\): unknown setting\(s\) colour"):
        load_space(str(p))
