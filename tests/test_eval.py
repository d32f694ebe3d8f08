"""`moe2dense eval`: the real lm-evaluation-harness on the shipped offline tasks, with the bundled
teacher, the dense peer and a model whose every prediction is uniform (exact expected scores)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may wait on the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from moe2dense_ray import assets, cli  # noqa: E402
from moe2dense_ray.eval.stage import PAPER_TASKS, TASK_SETS, EvalConfig, evaluate_model  # noqa: E402
from moe2dense_ray.eval.tasks import TASKS_DIR, shipped_tasks, task_config  # noqa: E402

LIMIT = 20  # examples per task: a multiple of 4, so next_line's gold positions are balanced
REPO = Path(__file__).resolve().parents[1]


def _accuracies(result: dict) -> list[float]:
    return [v for r in result["tasks"].values() for k, v in r["metrics"].items() if k.startswith("acc")]


@pytest.fixture(scope="module")
def teacher_result(tmp_path_factory):
    """The bundled teacher on both shipped tasks, run from an unrelated working directory (the
    tasks' data files must resolve from anywhere)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        return evaluate_model(EvalConfig(model=assets.teacher_path(), limit=LIMIT, samples=4, seq_len=128),
                              progress=False)


def test_shipped_tasks_on_the_teacher(teacher_result):
    tasks = teacher_result["tasks"]
    assert list(tasks) == ["next_line", "last_word"] == list(TASK_SETS["shipped"])
    nl, lw = tasks["next_line"], tasks["last_word"]
    assert (nl["examples"], lw["examples"], nl["num_fewshot"], lw["num_fewshot"]) == (LIMIT, LIMIT, 0, 0)
    assert set(nl["metrics"]) == {"acc", "acc_norm", "acc_mutual_info"} and set(lw["metrics"]) == {"acc", "perplexity"}
    assert all(0.0 <= a <= 1.0 for a in _accuracies(teacher_result))
    assert all(0.0 < s < 0.2 for s in nl["stderr"].values())
    # chance is 0.25: given the passage, the teacher prefers the true next line far more often
    # (0.47 of all 148; a uniform model scores exactly 0.25, below)
    assert nl["metrics"]["acc_mutual_info"] >= 0.45
    # the recalled word: greedy decoding finds some, and it is far likelier than a uniform guess
    assert lw["metrics"]["acc"] > 0 and 1 < lw["metrics"]["perplexity"] < 4096
    assert json.loads(json.dumps(teacher_result)) == teacher_result  # JSON as it is


def test_perplexity_is_the_one_implementation(teacher_result):
    """eval's perplexity is `evaluate.perplexity` on the blocks the demo would make, to the bit."""
    from moe2dense_ray.core.data import calibration_blocks
    from moe2dense_ray.core.models import load_tokenizer
    from moe2dense_ray.eval.metrics import load_model, perplexity

    teacher = assets.teacher_path()
    blocks = calibration_blocks(assets.heldout_path(), load_tokenizer(teacher), samples=4, seq_len=128, shuffle_buffer=1)
    p = teacher_result["perplexity"]
    assert p["ppl"] == perplexity(load_model(teacher), blocks.input_ids, blocks.attention_mask)
    assert (p["tokens"], p["blocks"], p["data"]) == (4 * 127, 4, assets.heldout_path())
    assert 30 < p["ppl"] < 90  # the model card: 52.4 on the whole test split


def test_a_uniform_model_scores_exactly_chance(tmp_path):
    """The dense peer with its final norm zeroed: every logit 0, every prediction uniform over the
    vocabulary. Held-out perplexity is then the vocabulary size; on next_line every choice has the
    same likelihood with and without the passage, so the first is picked and, as the gold position
    cycles, acc_mutual_info is exactly 0.25; greedy decoding never produces the last word."""
    import torch
    from transformers import AutoModelForCausalLM

    peer = assets.dense_peer_path()
    model = AutoModelForCausalLM.from_pretrained(peer, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    uniform = tmp_path / "uniform"
    model.save_pretrained(uniform)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(peer, name), uniform / name)
    r = evaluate_model(EvalConfig(model=str(uniform), limit=8, samples=2, seq_len=64), progress=False)
    vocab = model.config.vocab_size
    assert r["perplexity"]["ppl"] == pytest.approx(vocab, rel=1e-4)
    assert r["tasks"]["next_line"]["metrics"]["acc_mutual_info"] == 0.25
    assert r["tasks"]["last_word"]["metrics"]["acc"] == 0.0
    assert r["tasks"]["last_word"]["metrics"]["perplexity"] >= vocab * (1 - 1e-4)  # every word is >= 1 token


def test_cli_table_json_and_overwrite(tmp_path, capsys):
    out = tmp_path / "peer.json"
    argv = ["eval", assets.dense_peer_path(), "--tasks", "last_word", "--limit", "8", "--samples", "2",
            "--seq-len", "64", "--out", str(out), "-q"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| task | shots | n | metric | value | ± |"
    assert [ln.split(" | ")[0] for ln in lines[2:5]] == ["| held-out text", "| last_word", "| last_word"]
    assert lines[-1] == f"wrote {out} in " + lines[-1].split(" in ")[-1]
    saved = json.loads(out.read_text())
    assert saved["tasks"]["last_word"]["examples"] == 8 and saved["config"]["limit"] == 8
    assert saved["model"] == assets.dense_peer_path() and saved["perplexity"]["tokens"] == 2 * 63
    assert 0 <= saved["tasks"]["last_word"]["metrics"]["acc"] <= 1

    assert cli.main(argv) == 2  # refused before the model is loaded
    err = capsys.readouterr().err
    assert err == f"error: {out} already exists (use --overwrite to replace it)\n"
    assert cli.main([a for a in argv if a != "-q"] + ["--overwrite"]) == 0  # with its bars, as a user runs it
    bars = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any(b.startswith("eval: 100%") for b in bars), bars  # the harness's request bar, named for the stage
    assert not [b for b in bars if "Running loglikelihood" in b or "bootstrapping" in b], bars
    assert json.loads(out.read_text())["tasks"] == saved["tasks"]
    assert [p.name for p in tmp_path.iterdir()] == ["peer.json"]  # no partial files or locks left

    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    argv[argv.index(str(out))] = str(notes)
    assert cli.main(argv + ["--overwrite"]) == 2
    assert capsys.readouterr().err == (f"error: {notes} is not a results file; refusing to replace it even with "
                                       f"--overwrite\n")
    assert notes.read_text() == '{"mine": 1}'


def test_unknown_task_is_one_error_line(capsys):
    t0 = time.time()
    assert cli.main(["eval", assets.teacher_path(), "--tasks", "next_line,hellaswagg", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown task 'hellaswagg' (did you mean hellaswag")
    assert time.time() - t0 < 30  # no model was loaded, nothing was run


def test_paper_tasks_offline_are_one_error_line(capsys, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from moe2dense_ray.eval.stage import _task_manager

    assert all(name in _task_manager(True).task_index for name in PAPER_TASKS)  # real lm_eval task names
    assert PAPER_TASKS == {"winogrande": 5, "hellaswag": 10, "arc_easy": 25, "arc_challenge": 25, "mmlu": 5}
    t0 = time.time()
    assert cli.main(["eval", assets.teacher_path(), "--tasks", "paper", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: cannot load task winogrande: its dataset is unreachable (")
    assert "--tasks shipped" in err and time.time() - t0 < 30


def test_config_yaml_flags_and_usage_errors(tmp_path, capsys):
    y = tmp_path / "eval.yaml"
    y.write_text("model: some/model\ntasks: [next_line, paper]\nlimit: 5\nnum_fewshot: 1\n")
    args = cli.build_parser().parse_args(["eval", "--config", str(y), "--limit", "7"])
    cfg = EvalConfig.from_args(args)
    assert (cfg.model, cfg.tasks, cfg.limit, cfg.num_fewshot) == ("some/model", "next_line,paper", 7, 1)
    assert cfg.task_names() == ["next_line", *PAPER_TASKS]
    assert EvalConfig(model="m", tasks="shipped, last_word,none").task_names() == ["next_line", "last_word"]
    assert cli.main(["eval", "m", "--limit", "0"]) == 2
    assert "argument --limit: 0: input should be greater than or equal to 1" in capsys.readouterr().err
    assert cli.main(["eval", assets.teacher_path(), "--tasks", "none", "--samples", "0"]) == 2
    assert capsys.readouterr().err == "error: nothing to evaluate: --tasks none and --samples 0\n"


def test_shipped_task_files(tmp_path):
    """Small, in the package, generated deterministically from the held-out text, found from any cwd."""
    assert shipped_tasks() == sorted(TASK_SETS["shipped"])
    data = [p for p in TASKS_DIR.iterdir() if p.suffix == ".jsonl"]
    assert sum(p.stat().st_size for p in TASKS_DIR.iterdir() if p.is_file()) < 300_000
    for name in shipped_tasks():
        files = task_config(name)["dataset_kwargs"]["data_files"]
        assert all(os.path.isabs(f) and os.path.isfile(f) for f in files.values())
    rows = [json.loads(line) for line in (TASKS_DIR / "next_line.jsonl").read_text().splitlines()]
    assert all(len(r["choices"]) == 4 and len(set(r["choices"])) == 4 for r in rows)
    assert [r["label"] for r in rows[:8]] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert len(data) == 2
    check = subprocess.run([sys.executable, str(REPO / "scripts" / "make_eval_tasks.py"), "--check"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr


def test_results_that_are_not_finite_are_written_as_null_with_a_note(tmp_path):
    """A model whose perplexity overflows still gets its results file, in strict JSON."""
    from moe2dense_ray.eval.stage import write_results

    out = tmp_path / "r.json"
    write_results({"model": "m", "perplexity": {"ppl": float("nan"), "tokens": 10},
                   "tasks": {"t": {"metrics": {"acc": float("inf")}}}}, str(out))
    r = json.loads(out.read_text())  # json.loads would accept NaN; the file must not hold it
    assert "NaN" not in out.read_text() and "Infinity" not in out.read_text()
    assert r["perplexity"] == {"ppl": None, "tokens": 10} and r["tasks"]["t"]["metrics"]["acc"] is None
    assert r["notes"] == ["perplexity.ppl was nan, not a finite number: written as null",
                          "tasks.t.metrics.acc was inf, not a finite number: written as null"]
