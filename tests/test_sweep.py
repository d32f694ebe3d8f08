"""`moe2dense sweep` end to end on the bundled teacher: one calibration, one teacher stream,
Tune trials that plan, build and distill under ASHA, a leaderboard, and a resume."""

from __future__ import annotations

import csv
import json
import logging
import os
import time

import pytest

from moe2dense_ray import assets
from moe2dense_ray.cli import main
from moe2dense_ray.convert.plan import load_plan
from moe2dense_ray.core.errors import UserError
from moe2dense_ray.sweep import (
    SweepConfig,
    combinations,
    load_space,
    sweep,
    varying_keys,
)


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
             "refit.yaml": ("scoring: cp\nexperts: 4\nrefit: [down, all]\n", "unknown refit 'all'"),
             # 10 x 10 x 10 x 10: counted from the list lengths, refused before a combination is built
             "large.yaml": ("scoring: cp\nexperts: 4\nseed: " + str(list(range(10))) + "\nlr: " +
                            str([i * 1e-4 for i in range(1, 11)]) + "\nbatch_size: " + str(list(range(1, 11))) +
                            "\nwarmup: " + str([i / 100 for i in range(10)]) + "\n",
                            "the space has 10,000 combinations, more than --max-trials 256")}
    for name, (text, fragment) in cases.items():
        (tmp_path / name).write_text(text)
        code = main(_args(tmp_path / name, tmp_path / "out"))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (name, err)
    assert not (tmp_path / "out").exists()


def test_combinations_are_each_once_in_file_order_in_linear_time():
    from moe2dense_ray.sweep import combinations

    grids = [{"scoring": ["cp", "sf"], "experts": [4, 8]}, {"scoring": ["sf", "reap"], "experts": [8]}]
    assert combinations(grids) == [{"scoring": "cp", "experts": 4}, {"scoring": "cp", "experts": 8},
                                   {"scoring": "sf", "experts": 4}, {"scoring": "sf", "experts": 8},
                                   {"scoring": "reap", "experts": 8}]
    t0 = time.time()  # 20,000 combinations, half of them repeats: was quadratic (40 s for 10,000)
    big = combinations([{"seed": list(range(100)), "lr": list(range(100))}] * 2)
    assert len(big) == 10_000 and time.time() - t0 < 5


def test_trials_take_distills_settings_and_are_counted_by_what_they_hold(tmp_path, ray_cluster, capsys):
    from moe2dense_ray.distill.config import DistillConfig
    from moe2dense_ray.sweep import (
        HOSTING_KEYS,
        TRAINING_KEYS,
        _distill_config,
        concurrency,
    )

    for name in HOSTING_KEYS + TRAINING_KEYS:  # one declaration: the same type, bounds and default
        mine, theirs = SweepConfig.model_fields[name], DistillConfig.model_fields[name]
        assert (mine.annotation, mine.metadata, mine.default) == (theirs.annotation, theirs.metadata, theirs.default)
    space = tmp_path / "space.yaml"
    space.write_text("scoring: sf\nexperts: 4\n")
    cfg = SweepConfig(teacher=assets.teacher_path(), data=assets.calibration_path(), space=str(space),
                      out=str(tmp_path / "out"), workers=2, cpus_per_worker=0.5, zero_stage=2, grad_accum=2,
                      batch_size=4, activation_checkpointing=True)
    d = _distill_config(cfg, {"batch_size": 2, "lr": 0.01}, student="s", run="r", threads=3)
    assert (d.workers, d.cpus_per_worker, d.zero_stage, d.grad_accum, d.batch_size, d.activation_checkpointing,
            d.threads, d.lr) == (2, 0.5, 2, 2, 2, True, 3, 0.01)
    # the session's Ray has 2 CPUs: a trial is its workers, 0.3 CPU of stream reading each, 0.01 itself
    assert concurrency(cfg) == (1, 1)  # 2 x 0.8 + 0.01
    assert concurrency(cfg.model_copy(update={"workers": 1})) == (2, 1)  # 0.81 each
    assert concurrency(cfg.model_copy(update={"workers": 1, "max_concurrent": 1})) == (1, 2)
    assert concurrency(cfg.model_copy(update={"workers": 1, "cpus_per_worker": 1.0})) == (1, 2)
    for flags, fragment in ((["--cpus-per-worker", "3"], "a sweep trial needs 3.31 CPUs"),
                            (["--teacher-workers", "5"], "--teacher-workers 5 needs 2.5 CPUs")):
        code = main(_args(space, tmp_path / "out", *flags))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "out").exists()


def test_trials_at_once_asha_stops_one_a_wrecked_one_fails_and_every_training_group_is_released(tmp_path, ray_cluster,
                                                                                                  caplog, capsys):
    """Two trials at once on the 2-CPU session Ray (half a CPU per training worker). The good one
    reaches ASHA's first rung in 2 steps; the bad one (one expert a layer, a rate that learns
    nothing) takes the 16 steps of batch 1 to that rung, where it is compared and stopped while
    the other trains on. The stopped trial releases its own training placement group; a group the
    sweep did not make is left alone. A third trial refits its student on a teacher replica (a Ray
    actor, not the trial's process), which starts it far better than the same plan unfitted, then
    collapses it to uniform with lr 1e9 by its first report: it is marked failed with distill's
    line, ranked last, never best, and not tried again."""
    from ray.util.placement_group import placement_group, remove_placement_group

    space = tmp_path / "space.yaml"
    space.write_text("- {scoring: sf, experts: 4, lr: 0.002, batch_size: 8}\n"  # three grids: nothing crossed
                     "- {scoring: sf, experts: 1, lr: 1.0e-7, batch_size: 1}\n"
                     "- {scoring: sf, experts: 4, lr: 1.0e+9, batch_size: 8, refit: down}\n")
    out = tmp_path / "sweep"
    foreign = placement_group([{"CPU": 0.01}])  # another job's group, of no concern to the sweep
    ray_cluster.get(foreign.ready(), timeout=60)
    try:
        before = _live_groups(ray_cluster)
        shown = _args(space, out, "--tokens", "4096", "--cpus-per-worker", "0.5", "--teacher-workers", "1",
                      "--cpus-per-teacher", "0.5")[1:]  # as a user runs it: not --quiet
        assert main(shown) == 0
        assert _live_groups(ray_cluster) == before  # the trials' groups are gone, the other job's is not
        # the failed trial is its leaderboard row's one line, not Tune's error log with a traceback per try
        assert not [r for r in caplog.records if r.name.startswith("ray.tune") and r.levelno >= logging.ERROR]
    finally:
        remove_placement_group(foreign)
    # the sweep's own bar, not Tune's console reporter: its boxes, tables and session paths
    printed = capsys.readouterr()
    bars = printed.err.replace("\r", "\n").splitlines()
    assert any(line.startswith("sweep: 100%") and "3/3" in line and "best val_ppl" in line for line in bars), bars[-5:]
    for tune_line in ("Configuration for experiment", "Trial status", "tensorboard", "View detailed results", "╭"):
        assert tune_line not in printed.out + printed.err, tune_line
    assert "| trial |" in printed.out and printed.out.rstrip().splitlines()[-1].startswith("wrote ")
    # the shared work was done once
    assert (out / "stats" / "meta.json").exists() and (out / "logits" / "stream.json").exists()
    trials = sorted(os.listdir(out / "trials"))
    assert len(trials) == 3
    board = list(csv.DictReader(open(out / "leaderboard.csv")))
    good, bad, wrecked = ({float(r["lr"]): r for r in board}[lr] for lr in (0.002, 1e-7, 1e9))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == 3 and summary["errors"] == 1 and summary["stopped_early"] == 1
    assert summary["tokens_spent"] < summary["grid_tokens"] == 3 * 4096
    assert board[-1] == wrecked and wrecked["stopped early"] == "False"
    # distill's outcome check on real metrics (distill/outcome.py): the line names the rate and the
    # warm-up, the run stopped at the first report that found the student uniform (not trained on
    # to step 8), and the wrecked student is kept aside as a diagnostic, never announced as the result
    assert wrecked["error"].startswith("the student collapsed to a uniform distribution (held-out perplexity 40")
    assert "at step 2," in wrecked["error"]
    assert "lower --lr (was 1e+09) or raise --warmup (was 0.05: 0 of 8 steps)" in wrecked["error"]
    failed = out / "trials" / wrecked["trial"]
    assert (failed / "run" / "diagnostic-student" / "config.json").exists() and not (failed / "run" / "student").exists()
    assert [m["step"] for m in map(json.loads, open(failed / "run" / "metrics.jsonl"))] == [0, 2]
    assert json.loads((failed / "run" / "diagnostic-student" / "distill_metrics.json").read_text())["steps"] == 2
    assert not (failed / "run" / "results.json").exists()
    # Tune's retry of the trial met the recorded failure at once: the student was not built again
    assert os.path.getmtime(failed / "student" / "config.json") < os.path.getmtime(failed / "failure.json")
    assert good["stopped early"] == "False" and int(good["tokens"]) == 4096
    # stopped for being worse at the first rung (2 x 8 x 64 tokens); Tune's stop lands a few steps later
    assert bad["stopped early"] == "True" and 1024 <= int(bad["tokens"]) < 4096
    at_rung = {r["trial"]: next(m["val_ppl"] for m in map(json.loads, open(out / "trials" / r["trial"] / "run" /
                                                                          "metrics.jsonl")) if m["tokens"] == 1024)
               for r in (good, bad)}
    assert at_rung[bad["trial"]] > at_rung[good["trial"]], at_rung
    assert float(wrecked["ppl before"]) < 0.5 * float(good["ppl before"])  # the fit, on the same plan
    assert float(good["ppl after"]) < float(good["ppl before"]) < float(bad["ppl after"])
    assert summary["best"]["trial"] == good["trial"]
    for r in (good, bad):
        assert (load_plan(str(out / "trials" / r["trial"] / "student")).refit or {}).get("fit", "") == r["refit"]
    assert (out / "trials" / good["trial"] / "run" / "student" / "config.json").exists()
    # they ran at once: each trial had built its student before the other's training ended (the
    # good trial's 8 steps take ~2.5 s, less than the spread of two Train runs' start-ups, so its
    # metrics alone need not overlap the other's)
    built = [os.path.getmtime(out / "trials" / r["trial"] / "student" / "config.json") for r in (good, bad)]
    ended = [[json.loads(line) for line in open(out / "trials" / r["trial"] / "run" / "metrics.jsonl")][-1]["time"]
             for r in (good, bad)]
    assert max(built) < min(ended)
    assert (out / "curves.png").stat().st_size > 1000 and (out / "leaderboard.md").exists()
    # resuming a finished sweep runs no trial again and rewrites the same leaderboard
    before = {t: os.path.getmtime(out / "trials" / t / "student" / "config.json") for t in trials}
    again = sweep(SweepConfig(teacher=assets.teacher_path(), data=assets.calibration_path(), space=str(space),
                              out=str(out), resume=True), progress=False)
    assert again["trials"] == 3 and again["tokens_spent"] == summary["tokens_spent"] and again["errors"] == 1
    assert before == {t: os.path.getmtime(out / "trials" / t / "student" / "config.json") for t in trials}


def _live_groups(ray) -> dict[str, str]:
    return {k: g["state"] for k, g in ray.util.placement_group_table().items() if g["state"] != "REMOVED"}


def test_table_columns_align_by_what_they_hold():
    """Numbers right, text left: a leaderboard's `stopped early` (booleans) and `error` (no error:
    all blank) columns are not numbers."""
    from moe2dense_ray.core.report import markdown_table

    rows = [{"trial": "a", "tokens": 4096, "ppl": 143.24, "stopped early": False, "error": None},
            {"trial": "b", "tokens": 1024, "ppl": None, "stopped early": True, "error": None}]
    lines = markdown_table(rows).splitlines()
    assert lines[1] == "|---|---:|---:|---|---|"
    assert lines[2:] == ["| a | 4,096 | 143.24 | False |  |", "| b | 1,024 |  | True |  |"]


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
