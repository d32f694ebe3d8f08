"""What a new user runs first: the demo, and the examples printed by `moe2dense --help`, on the
bundled teacher, exactly as written (only the repository-relative paths are made absolute)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

from moe2dense_ray import assets, cli
from moe2dense_ray.convert.plan import load_plan
from moe2dense_ray.demo import DEMO_CE_WEIGHT, DEMO_LR, DEMO_SCORINGS, run_demo

# what a line of Ray's, DeepSpeed's or Python's own loggers and warnings looks like on stderr
NOISE = re.compile(r"\t(INFO|WARNING|ERROR|DEBUG) |\((raylet|pid=|autoscaler|Train|Ray)|core_worker|"
                   r"\.py:\d+|Warning: |\[(INFO|WARNING)\]|\bds_accelerator\b|^\[[0-9-]+ [0-9:,]+\]|"
                   r"\bDeprecat|INFO |WARNING ")


def test_demo_on_the_bundled_teacher(tmp_path):
    """The README's first command, as a new user runs it (its own embedded Ray, default output),
    smaller: only the project's own lines, bars and tables on stderr and stdout."""
    for seen in ("2026-12-05 05:06:16,161\tWARNING authentication_token_setup.py:85 -- Token authentication is",
                 "2026-12-05 05:06:22,410\tINFO worker.py:2029 -- Started a local Ray instance.",
                 "(raylet) WARNING: 8 PYTHON worker processes have been started on node",
                 "/x/ray/data/context.py:12: DeprecationWarning: ExecutionOptions.exclude_resources is deprecated"):
        assert NOISE.search(seen)  # lines a default run printed before it was quiet
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "moe2dense_ray.cli", "demo", "--out", str(out), "--samples", "8", "--seq-len", "128",
           "--distill-tokens", str(16 * 128 * 4 + 100)]  # rounded down to whole steps of 16 blocks
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    noise = [line for line in r.stderr.replace("\r", "\n").splitlines() if NOISE.search(line)]
    assert not noise, noise
    assert "warning:" not in r.stderr and "on 8,192 tokens:" in r.stdout  # no blocks left over to warn of
    result = json.loads((out / "results.json").read_text())
    assert result["teacher"] == assets.teacher_path()
    assert (result["num_experts"], result["experts"], result["tokens"]) == (16, 4, 8 * 128)
    teacher, *students = result["rows"]
    plain, refitted = students[:5], students[5:]
    assert [r["model"] for r in plain] == [f"dense K=4 {s}" for s in DEMO_SCORINGS]
    assert [r["model"] for r in refitted] == [f"dense K=4 {s}, refitted" for s in DEMO_SCORINGS]
    # the model card says test perplexity 52.4 on the whole split; 16 blocks of 128 tokens is noisier
    assert 30 < teacher["ppl"] < 90
    for p, f in zip(plain, refitted):  # K = E/4 before distillation: smaller and worse than the teacher;
        assert p["params_M"] < teacher["params_M"] / 2 and f["ppl"] > teacher["ppl"]
        assert f["ppl"] < 0.6 * p["ppl"]  # and the refit (convert's default) much closer to it
    # the best refitted student, distilled for 4 steps of 16 blocks, next to the teacher and the dense peer
    best = min(refitted, key=lambda r: r["ppl"])
    t, peer, before_plain, before, after = result["distilled"]
    assert t == teacher and before["ppl"] == best["ppl"] and best["model"] in after["model"]
    assert before_plain["ppl"] == min(r["ppl"] for r in plain)
    assert after["ppl"] < before["ppl"] and peer["params_M"] > 3.5 and peer["ppl"] < 1.2 * teacher["ppl"]
    settings = (out / "distill" / "distill.yaml").read_text()  # the demo's own loss and rate (docs/demo.md)
    assert f"lr: {DEMO_LR}" in settings and f"ce_weight: {DEMO_CE_WEIGHT}" in settings
    assert (out / "results.md").read_text().count("\n") == 2 + len(result["rows"]) + 4 + 5
    assert (out / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the README's first command must work a second time, over its own earlier results
    again = run_demo(str(out), workers=0, progress=False, scorings=("cp",), samples=8, seq_len=128, distill_tokens=0)
    assert again["rows"][1] == result["rows"][3]  # same statistics, same plan, same student


def _help_examples() -> list[list[str]]:
    """The example commands of `moe2dense --help` that run on the bundled teacher, as argv lists."""
    text = cli._EXAMPLES.replace("\\\n", " ")
    shell_vars, commands = {}, []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("T="):
            shell_vars["$T"] = line[2:]
        elif line.startswith("moe2dense ") and "://" not in line and line != "moe2dense demo":
            for name, value in shell_vars.items():
                line = line.replace(name, value)
            commands.append(shlex.split(line)[1:])
    return commands


def test_help_examples_run_on_the_bundled_teacher(ray_cluster, tmp_path, monkeypatch):
    commands = _help_examples()
    assert [c[0] for c in commands] == ["convert", "calibrate", "plan", "build", "build", "distill",
                                        "teacher-logits", "distill", "eval"]
    monkeypatch.chdir(tmp_path)  # the examples write under runs/
    for argv in commands:
        argv = [a.replace("moe2dense_ray/assets", str(assets.ASSETS_DIR)) for a in argv]
        assert cli.main(["--quiet", *argv]) == 0, argv
    for student, scoring in (("dense-cp", "cp"), ("dense-reap", "reap"), ("distill-reap/student", "reap"),
                             ("distill-cp/student", "cp")):
        plan = load_plan(str(tmp_path / "runs" / student))
        assert (plan.scoring, plan.experts, len(plan.layers)) == (scoring, 4, 4)
        assert (tmp_path / "runs" / student / "model.safetensors.index.json").exists() or \
            (tmp_path / "runs" / student / "model.safetensors").exists()
    refit = load_plan(str(tmp_path / "runs" / "dense-reap-refit")).refit
    assert (refit["fit"], refit["mode"], refit["tokens"]) == ("down", "sequential", 16 * 256)
    assert all(lr["error_after"] < lr["error_before"] for lr in refit["layers"])
    evaluated = json.loads((tmp_path / "runs" / "eval-distill-cp.json").read_text())
    assert evaluated["tasks"]["next_line"]["examples"] == 40 and evaluated["perplexity"]["ppl"] > 1
    for run in ("distill-reap", "distill-cp"):  # relative paths reach Ray's workers, which have their own cwd
        rows = [json.loads(line) for line in (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["val_ppl"] < rows[0]["val_ppl"]


def _printed_commands() -> list[tuple[str, list[str]]]:
    """Every `moe2dense ...` command line printed in the README and docs/*.md, alone or as a
    `ray job submit ... -- moe2dense ...` entrypoint (continuation lines joined, trailing comments
    dropped), as (where, argv)."""
    import glob

    root = os.path.join(os.path.dirname(__file__), "..")
    found = []
    for path in [os.path.join(root, "README.md"), *sorted(glob.glob(os.path.join(root, "docs", "*.md")))]:
        lines = open(path).read().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            i += 1
            line = re.sub(r"^(\.venv/bin/)?", "", line.split(" -- ", 1)[-1] if "-- moe2dense " in line else line)
            if line.startswith("moe2dense ") and not line.startswith("moe2dense --"):
                argv = shlex.split(line.split(" #")[0])[1:]
                found.append((f"{os.path.basename(path)}: {line[:60]}", argv))
    return found


def test_every_printed_command_parses():
    """The manual's commands are written for a user to copy: each one's subcommand and flags exist
    and its values have the types the CLI takes (parsed, not run: they name the user's files)."""
    commands = _printed_commands()
    assert len(commands) >= 20
    parser = cli.build_parser()
    for where, argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"{where}: does not parse") from e
