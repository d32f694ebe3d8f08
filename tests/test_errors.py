"""Bad input: one `error: ...` line on stderr, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tiny import make_tiny_moe

from moe2dense_ray.cli import main
from moe2dense_ray.core.config import BuildConfig, CalibrateConfig, PlanSettings


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("teacher") / "qwen3moe"
    make_tiny_moe("qwen3_moe", str(path), tokenizer=tokenizer)
    return path


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _convert(src, corpus, out, *extra):
    return ["-q", "convert", str(src), "--data", str(corpus), "--samples", "2", "--seq-len", "16",
            "--workers", "0", "--out", str(out), "--experts", "2", *extra]


def _one_error(capsys, code, fragment):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    return err[0]


def _assert_clean_error(capsys, code, fragment, out_dir):
    line = _one_error(capsys, code, fragment)
    assert "Traceback" not in line
    parent = out_dir.parent
    assert not out_dir.exists()
    assert not [p for p in os.listdir(parent) if ".partial" in p], os.listdir(parent)


def test_missing_path(tmp_path, corpus, capsys):
    code = main(_convert(tmp_path / "nope", corpus, tmp_path / "out"))
    _assert_clean_error(capsys, code, "no such checkpoint", tmp_path / "out")


def test_dense_model_is_refused(tmp_path, corpus, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3", vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    capsys.readouterr()
    code = main(_convert(tmp_path / "dense", corpus, tmp_path / "out"))
    _assert_clean_error(capsys, code, "not a Mixture-of-Experts", tmp_path / "out")


def test_unsupported_family(tmp_path, teacher, corpus, capsys):
    src = _copy(teacher, tmp_path / "weird")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (src / "config.json").write_text(json.dumps(cfg))
    code = main(_convert(src, corpus, tmp_path / "out"))
    _assert_clean_error(capsys, code, "unsupported model family 'mamba'", tmp_path / "out")


@pytest.mark.parametrize("k", ["0", "7"])
def test_experts_out_of_range(tmp_path, teacher, corpus, capsys, k):
    args = _convert(teacher, corpus, tmp_path / "out")
    args[args.index("--experts") + 1] = k
    code = main(args)
    _assert_clean_error(capsys, code, "--experts must be between 1 and 6", tmp_path / "out")


@pytest.mark.parametrize("flag,name", [("--scoring", "magic"), ("--grouping", "kmeans++"), ("--scaling", "huge")])
def test_unknown_method(tmp_path, teacher, corpus, capsys, flag, name):
    code = main(_convert(teacher, corpus, tmp_path / "out", flag, name))
    _assert_clean_error(capsys, code, name, tmp_path / "out")


def test_truncated_safetensors(tmp_path, teacher, corpus, capsys):
    src = _copy(teacher, tmp_path / "trunc")
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    code = main(_convert(src, corpus, tmp_path / "out"))
    _assert_clean_error(capsys, code, "truncated", tmp_path / "out")


def test_corrupted_header(tmp_path, teacher, corpus, capsys):
    src = _copy(teacher, tmp_path / "corrupt")
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:40] = b"\xff" * 30
    f.write_bytes(bytes(data))
    code = main(_convert(src, corpus, tmp_path / "out"))
    _assert_clean_error(capsys, code, "corrupted", tmp_path / "out")


def test_shapes_disagree_with_config(tmp_path, teacher, corpus, capsys):
    """Found mid-build: the partial output must be removed."""
    from moe2dense_ray.convert.build import build
    from moe2dense_ray.convert.calibrate import calibrate
    from moe2dense_ray.convert.plan import make_plan
    from moe2dense_ray.core.errors import UserError

    stats = calibrate(CalibrateConfig(src=str(teacher), data=corpus, samples=2, seq_len=16, workers=0), progress=False)
    plan = make_plan(stats, PlanSettings(experts=2, scoring="sf"))
    src = _copy(teacher, tmp_path / "shapes")
    cfg = json.loads((src / "config.json").read_text())
    cfg["moe_intermediate_size"] = 16
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="has shape"):
        build(BuildConfig(src=str(src), out=str(tmp_path / "out")), plan, progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if ".partial" in p]


def test_empty_calibration_set(tmp_path, teacher, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = main(_convert(teacher, empty, tmp_path / "out"))
    _assert_clean_error(capsys, code, "empty", tmp_path / "out")


def test_pickle_refused_without_flag(tmp_path, teacher, corpus, capsys):
    import torch
    from safetensors.torch import load_file

    src = _copy(teacher, tmp_path / "pickled")
    state = load_file(str(src / "model.safetensors"))
    torch.save(state, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    code = main(_convert(src, corpus, tmp_path / "out"))
    _assert_clean_error(capsys, code, "--allow-pickle", tmp_path / "out")


def test_console_script_exit_code_and_one_line(tmp_path):
    """The installed `moe2dense` entry point, as a user runs it: exit 2, one line, no traceback."""
    exe = os.path.join(os.path.dirname(sys.executable), "moe2dense")
    r = subprocess.run([exe, "convert", str(tmp_path / "missing"), "--data", "x.txt", "--experts", "2",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [f"error: no such checkpoint: {tmp_path / 'missing'}"], r.stderr
    r = subprocess.run([exe, "convert"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_help_reads_like_a_manual():
    exe = os.path.join(os.path.dirname(sys.executable), "moe2dense")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120).stdout
    for word in ("calibrate", "plan", "build", "convert", "demo", "examples (", "exit status"):
        assert word in out
    examples = out[out.index("examples ("):out.index("exit status")].splitlines()[1:]
    for line, following in zip(examples, examples[1:]):  # a command that goes on ends in ` \`
        assert ("  " not in line.strip()) and (following.startswith("      ") == line.endswith(" \\")), line


def test_a_mistyped_or_shortened_flag_is_named_with_the_commands_help(capsys):
    """argparse takes `--expert 4` for `--experts 4` unless told not to: a typo that ran."""
    from moe2dense_ray.cli import main

    assert main(["plan", "stats", "--expert", "4", "--out", "p.json"]) == 2
    assert capsys.readouterr().err == ("error: unrecognized arguments: --expert 4; did you mean --experts? "
                                       "(see `moe2dense plan --help`)\n")
    assert main(["convert", "src", "--expertz", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unrecognized arguments: --expertz 4; did you mean --experts?") and \
        err.endswith("(see `moe2dense convert --help`)\n")
    assert main(["--bogus"]) == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --bogus (see `moe2dense --help`)\n"


# -------------------------------------------------------------------------- outputs are never destroyed


def _calibrate(src, corpus, out, *extra):
    return ["-q", "calibrate", str(src), "--data", str(corpus), "--samples", "2", "--seq-len", "16",
            "--workers", "0", "--out", str(out), *extra]


def test_outputs_never_replace_inputs_or_other_files(tmp_path, teacher, corpus, capsys):
    src = _copy(teacher, tmp_path / "teacher")
    before = sorted(os.listdir(src))
    _one_error(capsys, main(_calibrate(src, corpus, src, "--overwrite")), "is the input")
    stats = tmp_path / "stats"
    assert main(_calibrate(src, corpus, stats)) == 0
    plan = tmp_path / "plan.json"
    assert main(["-q", "plan", str(stats), "--experts", "2", "--out", str(plan)]) == 0
    _one_error(capsys, main(["-q", "build", str(src), str(plan), "--out", str(src), "--overwrite"]), "is the input")
    _one_error(capsys, main(_convert(src, corpus, src, "--overwrite")), "is the input")
    assert sorted(os.listdir(src)) == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    _one_error(capsys, main(_calibrate(src, corpus, mine)), "already exists (use --overwrite")
    _one_error(capsys, main(_calibrate(src, corpus, mine, "--overwrite")), "not a statistics directory")
    _one_error(capsys, main(["-q", "build", str(src), str(plan), "--out", str(mine), "--overwrite"]),
               "not a checkpoint directory")
    assert os.listdir(mine) == ["keep.txt"]

    # the same kind of output is replaced with --overwrite, and only then
    _one_error(capsys, main(_calibrate(src, corpus, stats)), "already exists")
    assert main(_calibrate(src, corpus, stats, "--overwrite")) == 0
    _one_error(capsys, main(["-q", "plan", str(stats), "--experts", "2", "--out", str(plan)]), "already exists")
    assert main(["plan", str(stats), "--experts", "3", "--out", str(plan), "--overwrite", "-q"]) == 0
    assert json.loads(plan.read_text())["experts"] == 3
    assert not [p for p in os.listdir(tmp_path) if ".partial" in p]


def test_inputs_checked_before_any_work(tmp_path, teacher, corpus, capsys):
    _one_error(capsys, main(_calibrate(teacher, corpus, tmp_path / "s", "--seq-len", "100000")),
               "max_position_embeddings")
    for flag, value in (("--workers", "-1"), ("--batch-size", "0"), ("--samples", "0")):
        _one_error(capsys, main(_calibrate(teacher, corpus, tmp_path / "s", flag, value)), f"argument {flag}")
    _one_error(capsys, main(_calibrate(teacher, corpus, "s3fs-is-not-installed://b/x")), "s3fs-is-not-installed")
    notok = _copy(teacher, tmp_path / "notok")
    for name in os.listdir(notok):
        if name.startswith("tokenizer"):
            os.remove(notok / name)
    _one_error(capsys, main(_calibrate(notok, corpus, tmp_path / "s")), "has no tokenizer")
    for text, fragment in (('{"model_type": "qwen3_moe",', "not valid JSON"), ("[1, 2]", "JSON list")):
        bad = _copy(teacher, tmp_path / f"cfg{len(text)}")
        (bad / "config.json").write_text(text)
        _one_error(capsys, main(_calibrate(bad, corpus, tmp_path / "s")), fragment)
    assert not (tmp_path / "s").exists()


def test_statistics_and_plans_from_another_model(tmp_path, teacher, corpus, tokenizer, capsys):
    stats = tmp_path / "stats"
    assert main(_calibrate(teacher, corpus, stats)) == 0
    other = tmp_path / "other"
    make_tiny_moe("qwen3_moe", str(other), tokenizer=tokenizer, num_hidden_layers=3, mlp_only_layers=[1])
    _one_error(capsys, main(["-q", "plan", str(stats), "--experts", "2", "--groups", "1", "--grouping", "weight",
                             "--src", str(other), "--out", str(tmp_path / "p.json")]), "is not the model")
    assert main(["-q", "plan", str(stats), "--experts", "2", "--out", str(tmp_path / "p.json")]) == 0
    _one_error(capsys, main(["-q", "build", str(other), str(tmp_path / "p.json"), "--out", str(tmp_path / "o")]),
               "made for a different model")
    meta = json.loads((stats / "meta.json").read_text())
    (stats / "meta.json").write_text("{")
    _one_error(capsys, main(["-q", "plan", str(stats), "--experts", "2", "--out", str(tmp_path / "q.json")]),
               "meta.json is not valid JSON")
    (stats / "meta.json").write_text(json.dumps(meta))
    data = (stats / "stats.safetensors").read_bytes()
    (stats / "stats.safetensors").write_bytes(data[:50])
    _one_error(capsys, main(["-q", "plan", str(stats), "--experts", "2", "--out", str(tmp_path / "q.json")]),
               "stats.safetensors is corrupt")
    assert not (tmp_path / "o").exists() and not (tmp_path / "q.json").exists()


def test_family_listing_needs_no_model_libraries():
    """`moe2dense families` answers without importing torch (the CLI's parser included)."""
    import subprocess
    import sys

    code = ("import sys; from moe2dense_ray.cli import main; main(['families']); "
            "sys.stderr.write(str('torch' in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.strip().endswith("False"), r.stderr[-500:]


def test_an_unreachable_hub_is_one_line(tmp_path):
    """A hub URL with no connection (here: a hub endpoint that refuses) is one error line, not
    the HTTP client's traceback."""
    from moe2dense_ray import assets

    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-m", "moe2dense_ray.cli", "calibrate", "hf://someone/some-moe", "--data",
                        assets.calibration_path(), "--out", str(tmp_path / "stats")], env=env, capture_output=True,
                       text=True, timeout=120)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: cannot reach the network (") \
        and "Connection refused" in err[0], r.stderr[-2000:]
    assert not (tmp_path / "stats").exists()
