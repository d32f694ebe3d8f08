"""Nothing lost, nothing silently wrong: the output guarantees of outputs.py and checkpoint.py,
tried with real files, real processes and real signals on copies of the bundled teacher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe2dense_ray import assets
from moe2dense_ray.cli import main
from moe2dense_ray.convert.plan import LayerPlan, Plan, load_plan, save_plan
from moe2dense_ray.core.checkpoint import CheckpointReader
from moe2dense_ray.core.errors import UserError
from moe2dense_ray.core.source import Source
from moe2dense_ray.core.storage import OutputLock, clean_leftovers, swap_in, url_to_fs

ENV = {**os.environ, "PYTHONPATH": os.getcwd(), "DS_ACCELERATOR": "cpu"}


def _plan(src: str, experts: int) -> Plan:
    with Source.open(src) as source:
        family, shape = source.family, source.shape
    E = shape.num_experts
    return Plan(model_type=family.model_type, num_experts=E, experts=experts, groups=experts, scoring="sf",
                grouping="none", scaling="uniform",
                layers=[LayerPlan(layer=i, scores=[1.0] * E, selected=list(range(experts)),
                                  groups=[[e] for e in range(experts)], scales=[1.0] * experts)
                        for i in shape.moe_layers])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A copy of the bundled teacher and two plans (K=2 and K=4) for it."""
    root = tmp_path_factory.mktemp("outputs")
    src = shutil.copytree(assets.teacher_path(), root / "teacher")
    save_plan(_plan(str(src), 2), str(root / "plan2.json"))
    save_plan(_plan(str(src), 4), str(root / "plan4.json"))
    return root


def _one_error(capsys, code, fragment):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    return err[0]


def _build(src, plan, out, *extra):
    return ["-q", "build", str(src), str(plan), "--out", str(out), *extra]


def _tree(path) -> dict[str, bytes]:
    return {n: (path / n).read_bytes() for n in sorted(os.listdir(path))}


def _experts_in(out) -> int:
    """Which plan the complete checkpoint at `out` was built from; fails if it is incomplete."""
    reader = CheckpointReader(str(out))
    for key in reader.keys():  # every byte range is readable and every tensor finite
        assert torch.isfinite(reader.get(key).float()).all()
    reader.close()
    return json.loads((out / "moe2dense_plan.json").read_text())["experts"]


# -- 1. data loss ---------------------------------------------------------------------------------
def test_out_never_contains_or_lies_inside_an_input(work, tmp_path, capsys):
    old = tmp_path / "old"
    assert main(_build(work / "teacher", work / "plan2.json", old)) == 0
    src = shutil.copytree(work / "teacher", old / "teacher")  # an input kept inside an older output
    before = _tree(src)
    for out in (old, f"file://{old}", tmp_path / "." / "old"):
        _one_error(capsys, main(_build(src, work / "plan2.json", out, "--overwrite")), "contains the input")
    _one_error(capsys, main(["-q", "calibrate", str(src), "--data", str(assets.calibration_path()), "--samples", "2",
                             "--seq-len", "16", "--workers", "0", "--out", str(old), "--overwrite"]),
               "contains the input")
    _one_error(capsys, main(_build(work / "teacher", work / "plan2.json", work / "teacher" / "dense")),
               "lies inside the input")
    link = tmp_path / "link"
    os.symlink(src, link)
    _one_error(capsys, main(_build(link, work / "plan2.json", src / "x", "--overwrite")), "lies inside the input")
    assert _tree(src) == before and (old / "config.json").exists()


def test_plan_overwrite_replaces_only_plans(work, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "precious"}\n')
    stats = tmp_path / "stats"
    assert main(["-q", "calibrate", str(work / "teacher"), "--data", str(assets.calibration_path()), "--samples",
                 "2", "--seq-len", "16", "--workers", "0", "--out", str(stats)]) == 0
    _one_error(capsys, main(["-q", "plan", str(stats), "--experts", "2", "--out", str(data), "--overwrite"]),
               "not a plan file")
    assert data.read_text() == '{"text": "precious"}\n'
    weights = work / "teacher" / "model.safetensors"
    size = weights.stat().st_size
    _one_error(capsys, main(["-q", "plan", str(stats), "--experts", "2", "--out", str(weights), "--overwrite"]),
               "lies inside the input")
    _one_error(capsys, main(["-q", "plan", str(stats), "--experts", "2", "--out", str(work / "teacher")]),
               "is a checkpoint")
    assert weights.stat().st_size == size
    # a directory named with a trailing slash is a directory, created if need be
    assert main(["-q", "plan", str(stats), "--experts", "2", "--out", f"{tmp_path}/newdir/"]) == 0
    assert load_plan(str(tmp_path / "newdir")).experts == 2
    # and the plan records where its statistics came from as an absolute path
    assert os.path.isabs(json.loads((stats / "meta.json").read_text())["source"])


def test_a_second_writer_is_refused(work, tmp_path, capsys):
    out = tmp_path / "dense"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from moe2dense_ray.core.storage import OutputLock; "
                               "OutputLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(120)",
                               str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _one_error(capsys, main(_build(work / "teacher", work / "plan2.json", out)), "another run is writing")
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()
    # two real processes racing for the same --out: one writes it, the other refuses
    cmd = [sys.executable, "-m", "moe2dense_ray.cli", *_build(work / "teacher", work / "plan2.json", out)]
    procs = [subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert any(s in err for s in ("another run is writing", "already exists", "appeared while")), err
    assert _experts_in(out) == 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith("dense.") or p.startswith(".dense")]


def _cli_exit(argv: list[str]) -> None:
    sys.exit(main(argv))


def test_kill_at_any_instant_leaves_old_or_new_output(work, tmp_path):
    """SIGKILL `build --overwrite` at points spread over a whole run (many small shards, so the
    run spends its time writing): the destination holds, every time, a complete old or new output.
    Each run is a process forked from a server that has imported the package, so the kills land
    in the run's own work, from its first file to its last, not in Python's imports."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["moe2dense_ray.cli", "moe2dense_ray.convert.build", "test_outputs"])

    def start(plan: str) -> multiprocessing.Process:
        argv = _build(work / "teacher", work / plan, out, "--overwrite", "--shard-size", "0.0005")
        proc = ctx.Process(target=_cli_exit, args=(argv,))
        proc.start()
        return proc

    out = tmp_path / "dense"
    assert main(_build(work / "teacher", work / "plan2.json", out)) == 0
    start("plan2.json").join()  # the server's imports, once
    t0 = time.time()
    proc = start("plan4.json")
    proc.join(timeout=120)
    duration = time.time() - t0
    assert proc.exitcode == 0 and _experts_in(out) == 4
    seen = {2: 0, 4: 0}
    for i in range(12):
        proc = start("plan2.json" if i % 2 else "plan4.json")
        time.sleep(duration * (0.05 + 1.05 * i / 11))  # from the start to past the end of the run
        proc.kill()
        proc.join()
        seen[_experts_in(out)] += 1
    assert sum(seen.values()) == 12 and seen[2] and seen[4]
    # the next run cleans up what the killed ones left and succeeds
    proc = start("plan4.json")
    proc.join(timeout=120)
    assert proc.exitcode == 0 and _experts_in(out) == 4
    assert [p for p in os.listdir(tmp_path) if p != "dense"] == []


def test_replacement_interrupted_between_renames_is_restored(tmp_path):
    """Where the destination cannot be exchanged in one call (object stores, other systems) the
    old output is renamed aside first; a kill right then leaves `NAME.old-*`, which the next run
    moves back rather than deleting."""
    fs, dest = url_to_fs(str(tmp_path / "out"))
    (tmp_path / "out.old-1234abcd").mkdir()
    (tmp_path / "out.old-1234abcd" / "config.json").write_text("{}")
    (tmp_path / "out.partial-deadbeef").mkdir()
    with OutputLock(dest):
        found = clean_leftovers(fs, dest)
    assert len(found) == 2 and sorted(os.listdir(tmp_path)) == ["out"]
    assert (tmp_path / "out" / "config.json").read_text() == "{}"
    new = tmp_path / "out.partial-1"
    new.mkdir()
    (new / "config.json").write_text('{"new": 1}')
    swap_in(fs, str(new), dest, overwrite=True)
    assert (tmp_path / "out" / "config.json").read_text() == '{"new": 1}' and os.listdir(tmp_path) == ["out"]
    with pytest.raises(UserError, match="appeared while"):
        swap_in(fs, str(tmp_path / "other"), dest, overwrite=False)


# -- 2. unbounded reads ---------------------------------------------------------------------------
def test_metadata_symlinked_to_a_device_is_refused(work, tmp_path, capsys):
    src = shutil.copytree(work / "teacher", tmp_path / "teacher")
    os.remove(src / "config.json")
    os.symlink("/dev/zero", src / "config.json")
    _one_error(capsys, main(_build(src, work / "plan2.json", tmp_path / "out")), "not a regular file")
    plan = tmp_path / "plan.json"
    os.symlink("/dev/zero", plan)
    _one_error(capsys, main(_build(work / "teacher", plan, tmp_path / "out")), "not a regular file")


# -- 3. silently wrong output ---------------------------------------------------------------------
def _sharded(tmp_path, work, name):
    """The teacher re-saved as two shards with an index, to break in different ways."""
    src = shutil.copytree(work / "teacher", tmp_path / name)
    tensors = load_file(src / "model.safetensors")
    os.remove(src / "model.safetensors")
    keys = sorted(tensors)
    half = len(keys) // 2
    parts = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for shard, ks in parts.items():
        save_file({k: tensors[k] for k in ks}, src / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: s for s, ks in parts.items() for k in ks}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return src, tensors, parts


def test_source_defects_are_refused_before_writing(work, tmp_path, capsys):
    out = tmp_path / "out"
    # one tensor name in two shards: which copy wins would be an accident of file order
    src, tensors, parts = _sharded(tmp_path, work, "dup")
    shard2 = src / "model-00002-of-00002.safetensors"
    both = {**load_file(shard2), "model.embed_tokens.weight": tensors["model.embed_tokens.weight"] + 1}
    assert "model.embed_tokens.weight" in parts["model-00001-of-00002.safetensors"]
    save_file(both, shard2, metadata={"format": "pt"})
    _one_error(capsys, main(_build(src, work / "plan2.json", out)), "is in both")
    # no embeddings: the student would be random-initialised where they should be
    src, tensors, _ = _sharded(tmp_path, work, "noemb")
    (src / "model.safetensors.index.json").unlink()
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        t = load_file(src / shard)
        t.pop("model.embed_tokens.weight", None)
        save_file(t, src / shard, metadata={"format": "pt"})
    _one_error(capsys, main(_build(src, work / "plan2.json", out)), "model.embed_tokens.weight")
    # NaN in a selected expert
    src = shutil.copytree(work / "teacher", tmp_path / "nan")
    t = load_file(src / "model.safetensors")
    key = next(k for k in sorted(t) if ".experts.1." in k)
    t[key][0, 0] = float("nan")
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    _one_error(capsys, main(_build(src, work / "plan2.json", out)), "NaN or infinite")
    # a tokenizer.json that does not parse would be copied into the student
    src = shutil.copytree(work / "teacher", tmp_path / "badtok")
    (src / "tokenizer.json").write_text("{not json")
    _one_error(capsys, main(_build(src, work / "plan2.json", out)), "tokenizer.json is not valid JSON")
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".partial" in p]


def _rewrite_header(path, edit):
    """Replace a safetensors file's JSON header by `edit(header)`, keeping its data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _first(h):
    return next(k for k in sorted(h) if k != "__metadata__")


HEADER_DEFECTS = {
    "entry is a string": (lambda h: {**h, _first(h): "x"}, "not an object"),
    "header is a list": (lambda h: [1, 2], "is a JSON list"),
    "no data_offsets": (lambda h: {**h, _first(h): {k: v for k, v in h[_first(h)].items() if k != "data_offsets"}},
                        "data_offsets None"),
    "negative shape": (lambda h: {**h, _first(h): {**h[_first(h)], "shape": [-1, 4]}}, "not a list of non-negative"),
    "reversed offsets": (lambda h: {**h, _first(h): {**h[_first(h)], "data_offsets": h[_first(h)]["data_offsets"][::-1]}},
                         "data_offsets"),
    "overlapping ranges": (lambda h: _overlap(h), "overlapping or out-of-order"),
}


def _overlap(h):
    """Two tensors of equal size pointing at the same bytes (each entry alone is well formed)."""
    entries = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])
    sizes = {}
    for k in entries:
        b, e = h[k]["data_offsets"]
        if (e - b, h[k]["dtype"]) in sizes:
            h[k] = {**h[k], "data_offsets": h[sizes[(e - b, h[k]["dtype"])]]["data_offsets"]}
            return h
        sizes[(e - b, h[k]["dtype"])] = k
    raise AssertionError("no two tensors of one size")


@pytest.mark.parametrize("defect", sorted(HEADER_DEFECTS))
def test_malformed_headers_are_one_line_errors(work, tmp_path, capsys, defect):
    edit, fragment = HEADER_DEFECTS[defect]
    src = shutil.copytree(work / "teacher", tmp_path / "t")
    _rewrite_header(src / "model.safetensors", edit)
    _one_error(capsys, main(_build(src, work / "plan2.json", tmp_path / "out")), fragment)


def test_bad_indexes_are_one_line_errors(work, tmp_path, capsys):
    src, _, _ = _sharded(tmp_path, work, "idx")
    index = src / "model.safetensors.index.json"
    for text, fragment in (("{oops", "not valid JSON"), ("[1]", "not an object"),
                           ('{"weight_map": {"a": "../../etc/passwd"}}', "not a .safetensors file"),
                           ('{"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}',
                            "does not hold it")):
        index.write_text(text)
        _one_error(capsys, main(_build(src, work / "plan2.json", tmp_path / "out")), fragment)


# -- 5. leftovers -------------------------------------------------------------------------------
def _disk_full_at(limit: int):
    """A child whose files cannot grow past `limit` bytes: writes fail as on a full disk."""
    import resource

    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_files


def test_full_disk_and_sigterm_leave_nothing_behind(work, tmp_path):
    out = tmp_path / "dense"
    cmd = [sys.executable, "-m", "moe2dense_ray.cli", *_build(work / "teacher", work / "plan2.json", out)]
    size = os.path.getsize(work / "teacher" / "model.safetensors")
    full = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120,
                          preexec_fn=_disk_full_at(size // 4))
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), full.stderr
    assert os.listdir(tmp_path) == []
    proc = subprocess.Popen(cmd + ["--shard-size", "0.0002"], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not [p for p in os.listdir(tmp_path) if ".partial-" in p] and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    code, err = proc.wait(timeout=60), proc.stderr.read()
    assert code == 130 and err.strip().splitlines() == ["error: interrupted (no output was left half-written)"], err
    assert os.listdir(tmp_path) == []


def test_dangling_symlink_out_is_refused_up_front(work, tmp_path, capsys):
    os.symlink(tmp_path / "nowhere" / "x", tmp_path / "out")
    _one_error(capsys, main(_build(work / "teacher", work / "plan2.json", tmp_path / "out")), "does not exist")
    assert sorted(os.listdir(tmp_path)) == ["out"]


# -- 7. the writer streams ----------------------------------------------------------------------
def test_streamed_shards_are_standard_safetensors(work, tmp_path):
    """Headers written first, bytes appended: the shards load with safetensors itself, equal to the
    tensors a single-shard build holds."""
    one, many = tmp_path / "one", tmp_path / "many"
    assert main(_build(work / "teacher", work / "plan2.json", one)) == 0
    assert main(_build(work / "teacher", work / "plan2.json", many, "--shard-size", "0.001")) == 0
    index = json.loads((many / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    merged = {}
    for shard in shards:
        merged.update(load_file(many / shard))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    ref = load_file(one / "model.safetensors")
    assert sorted(merged) == sorted(ref) and all(torch.equal(merged[k], ref[k]) for k in ref)


@pytest.mark.parametrize("field,value,fragment", [("dtype", "float8", "float8"),
                                                  ("num_experts", "many", "num_experts")])
def test_config_fields_of_the_wrong_type(work, tmp_path, capsys, field, value, fragment):
    src = shutil.copytree(work / "teacher", tmp_path / "t")
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    line = _one_error(capsys, main(_build(src, work / "plan2.json", tmp_path / "out")), "is not a valid qwen3_moe config")
    assert fragment in line


def test_pickle_that_weights_only_refuses_is_one_line(work, tmp_path, capsys):
    import argparse

    src = shutil.copytree(work / "teacher", tmp_path / "t")
    tensors = load_file(src / "model.safetensors")
    os.remove(src / "model.safetensors")
    torch.save({**tensors, "extra": argparse.Namespace(code="runs on load")}, src / "pytorch_model.bin")
    _one_error(capsys, main(_build(src, work / "plan2.json", tmp_path / "out")), "--allow-pickle")
    _one_error(capsys, main(_build(src, work / "plan2.json", tmp_path / "out", "--allow-pickle")),
               "cannot be loaded safely")


def test_convert_checks_its_two_outputs_against_each_other_first(work, tmp_path, capsys):
    args = ["-q", "convert", str(work / "teacher"), "--data", str(assets.calibration_path()), "--samples", "2",
            "--seq-len", "16", "--workers", "0", "--experts", "2"]
    t0 = time.time()
    _one_error(capsys, main(args + ["--out", str(tmp_path / "d"), "--stats", str(tmp_path / "d" / "stats")]),
               "contains the input")
    _one_error(capsys, main(args + ["--out", str(tmp_path / "d"), "--stats", str(tmp_path / "d")]), "is the input")
    assert time.time() - t0 < 10 and os.listdir(tmp_path) == []  # before calibrating: nothing written


def test_sigterm_during_ray_calibration_is_one_line_and_stops_ray(work, tmp_path):
    import psutil

    cmd = [sys.executable, "-m", "moe2dense_ray.cli", "-q", "calibrate", str(work / "teacher"), "--data",
           str(assets.calibration_path()), "--samples", "300", "--seq-len", "256", "--batch-size", "1",
           "--workers", "1", "--full-stats", "--out", str(tmp_path / "stats")]
    proc = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True)
    me = psutil.Process(proc.pid)
    deadline = time.time() + 90
    while time.time() < deadline:  # until the replica (a Ray actor) is working
        if any("_Replica" in " ".join(c.cmdline()) or "Calibrator" in " ".join(c.cmdline())
               for c in _children(me)):
            break
        time.sleep(0.2)
    else:
        pytest.fail("no calibration actor appeared")
    ray_procs = _children(me)
    proc.send_signal(signal.SIGTERM)
    code, err = proc.wait(timeout=60), proc.stderr.read()
    assert code == 130 and err.strip().splitlines() == ["error: interrupted (no output was left half-written)"], err
    gone, alive = psutil.wait_procs(ray_procs, timeout=30)
    assert not alive, [p.name() for p in alive]
    assert os.listdir(tmp_path) == []


def _children(proc):
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_statistics_sums_symlinked_to_a_device_are_refused(work, tmp_path, capsys):
    stats = tmp_path / "stats"
    assert main(["-q", "calibrate", str(work / "teacher"), "--data", str(assets.calibration_path()), "--samples",
                 "2", "--seq-len", "16", "--workers", "0", "--out", str(stats)]) == 0
    os.remove(stats / "stats.safetensors")
    os.symlink("/dev/zero", stats / "stats.safetensors")
    _one_error(capsys, main(["-q", "plan", str(stats), "--experts", "2", "--out", str(tmp_path / "p.json")]),
               "not a regular file")


def test_data_that_never_ends_is_refused(work, tmp_path, capsys, monkeypatch):
    from moe2dense_ray.core import data

    def calibrate(src):
        return main(["-q", "calibrate", str(work / "teacher"), "--data", str(src), "--samples", "2", "--seq-len",
                     "16", "--workers", "0", "--out", str(tmp_path / "stats")])

    os.symlink("/dev/zero", tmp_path / "zero.jsonl")
    _one_error(capsys, calibrate(tmp_path / "zero.jsonl"), "not a regular file")
    (tmp_path / "dir").mkdir()
    os.symlink("/dev/zero", tmp_path / "dir" / "a.jsonl")
    _one_error(capsys, calibrate(tmp_path / "dir"), "not a regular file")
    monkeypatch.setattr(data, "MAX_JSON_LINE", 1000)
    (tmp_path / "long.jsonl").write_text('{"text": "' + "a" * 2000 + '"}\n')
    _one_error(capsys, calibrate(tmp_path / "long.jsonl"), "line 1 is longer than")


def test_tester_findings_round_two(work, tmp_path, capsys, monkeypatch):
    """Cases a tester found after the first round, each once."""
    # only the leftovers moe2dense names (NAME.partial-XXXXXXXX, NAME.old-XXXXXXXX) are ever touched
    out = tmp_path / "dense"
    assert main(_build(work / "teacher", work / "plan2.json", out)) == 0
    for mine in ("dense.old-backup", "dense.partial-mine", "dense.old-notes.txt"):
        (tmp_path / mine).mkdir()
        (tmp_path / mine / "notes.txt").write_text("mine")
    assert main(_build(work / "teacher", work / "plan4.json", out, "--overwrite")) == 0
    assert all((tmp_path / m / "notes.txt").read_text() == "mine"
               for m in ("dense.old-backup", "dense.partial-mine", "dense.old-notes.txt"))
    # an input named through a caching URL is still the input
    src = shutil.copytree(work / "teacher", tmp_path / "t")
    _one_error(capsys, main(_build(f"simplecache::{src}", work / "plan2.json", src, "--overwrite")), "is the input")
    # an empty directory made for the output is used, not refused at the end
    (tmp_path / "empty").mkdir()
    assert main(_build(work / "teacher", work / "plan2.json", tmp_path / "empty")) == 0
    assert _experts_in(tmp_path / "empty") == 2
    # a shard that is a FIFO would block the first read forever
    fifo = shutil.copytree(work / "teacher", tmp_path / "fifo")
    os.remove(fifo / "model.safetensors")
    os.mkfifo(fifo / "model.safetensors")
    _one_error(capsys, main(_build(fifo, work / "plan2.json", tmp_path / "f")), "not a regular file")
    # the current directory (or one holding it) is never the output
    monkeypatch.chdir(out)
    _one_error(capsys, main(_build(work / "teacher", work / "plan2.json", ".", "--overwrite")), "current directory")
    _one_error(capsys, main(_build(work / "teacher", work / "plan2.json", "", "--overwrite")), "--out is empty")
    # absurd numbers are usage errors, not tracebacks
    _one_error(capsys, main(_build(work / "teacher", work / "plan2.json", tmp_path / "x", "--shard-size", "inf")),
               "argument --shard-size")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 10**9
    (src / "config.json").write_text(json.dumps(cfg))
    _one_error(capsys, main(_build(src, work / "plan2.json", tmp_path / "x")), "num_hidden_layers")


def test_a_checkpoints_recorded_plan_is_never_replaced(work, tmp_path, capsys):
    out = tmp_path / "dense"
    assert main(_build(work / "teacher", work / "plan4.json", out)) == 0
    stats = tmp_path / "stats"
    assert main(["-q", "calibrate", str(work / "teacher"), "--data", str(assets.calibration_path()), "--samples",
                 "2", "--seq-len", "16", "--workers", "0", "--out", str(stats)]) == 0
    _one_error(capsys, main(["-q", "plan", str(stats), "--experts", "2", "--out", f"{out}/", "--overwrite"]),
               "is a checkpoint")
    assert _experts_in(out) == 4
