"""Distillation on Ray: the teacher service, Ray Train + DeepSpeed, checkpoints, faults, offline streams.

Every run here is real: a local Ray cluster, teacher actors in a Ray Data pipeline, a TorchTrainer
worker running DeepSpeed on CPU, the bundled teacher and a student built from it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import numpy as np
import pytest
import torch
from test_errors import _one_error
from transformers import AutoModelForCausalLM

from moe2dense_ray import assets
from moe2dense_ray.cli import main
from moe2dense_ray.core.config import ConvertConfig
from moe2dense_ray.core.errors import UserError
from moe2dense_ray.distill.blocks import Ranges
from moe2dense_ray.distill.config import DistillConfig, TeacherLogitsConfig
from moe2dense_ray.distill.driver import distill, read_metrics, teacher_logits

DATA = assets.calibration_path()


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """The bundled teacher converted to a dense K=4 student by the paper's plain method (far from the
    teacher before distillation: a few steps show)."""
    from moe2dense_ray.convert.stage import convert

    out = tmp_path_factory.mktemp("student") / "dense"
    convert(ConvertConfig(src=assets.teacher_path(), data=DATA, out=str(out), experts=4, scoring="cp", samples=8, seq_len=128, workers=0, refit="none"), progress=False)
    return str(out)


def _cfg(student, out, **kw) -> DistillConfig:
    base = dict(teacher=assets.teacher_path(), student=student, data=DATA, out=str(out), seq_len=64,
                batch_size=4, tokens=4 * 64 * 12, val_blocks=4, report_every=2, checkpoint_every=4,
                teacher_batch=4, lr=2e-3)
    return DistillConfig(**{**base, **kw})


def test_a_refitted_student_gets_a_gentler_learning_rate(tmp_path, student):
    """`convert` refits by default; the refit's record sets the default peak learning rate to
    PLAIN_LR x sqrt(error after / error before) (run.peak_lr), and a plain student keeps PLAIN_LR."""
    from moe2dense_ray.convert.plan import load_plan
    from moe2dense_ray.convert.refit import mean_error
    from moe2dense_ray.convert.stage import convert
    from moe2dense_ray.distill.driver import PLAIN_LR, peak_lr

    refitted = tmp_path / "refitted"
    convert(ConvertConfig(src=assets.teacher_path(), data=DATA, out=str(refitted), experts=4, scoring="cp", samples=8, seq_len=128, workers=0), progress=False)  # the default
    record = load_plan(str(refitted)).refit
    assert record["fit"] == "down" and record["mode"] == "sequential"
    ratio = mean_error(record, "error_after") / mean_error(record, "error_before")
    assert 0 < ratio < 0.5  # the fit did its job
    assert peak_lr(str(refitted)) == pytest.approx(PLAIN_LR * ratio ** 0.5, rel=1e-12)
    assert load_plan(student).refit is None and peak_lr(student) == PLAIN_LR
    assert peak_lr(assets.dense_peer_path()) == PLAIN_LR  # no plan at all


def test_config_yaml_flags_and_errors(tmp_path, student, capsys):
    cfg = _cfg(student, tmp_path / "run", loss="jsd", zero_stage=2)
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    assert DistillConfig.from_yaml(str(path)) == cfg
    from moe2dense_ray.cli import build_parser

    args = build_parser().parse_args(["distill", "--config", str(path), "--lr", "0.5", "--zero-stage", "3"])
    merged = DistillConfig.from_args(args)
    assert (merged.lr, merged.zero_stage, merged.loss, merged.tokens) == (0.5, 3, "jsd", cfg.tokens)
    path.write_text(cfg.to_yaml() + "learning_rate: 3\n")  # a typo must not silently do nothing
    _one_error(capsys, main(["distill", "--config", str(path)]), "learning_rate")
    _one_error(capsys, main(["distill", "--student", student, "--out", str(tmp_path / "r")]), "--teacher")
    _one_error(capsys, main(["distill", "--resume", str(tmp_path / "none")]),
               f"--resume {tmp_path / 'none'}: no distillation run there (no distill.yaml); start one with")
    # the job's example config is a valid config
    job = DistillConfig.from_yaml(os.path.join(os.path.dirname(__file__), "..", "jobs", "distill.yaml"))
    assert job.teacher.endswith("teacher-qwen3moe") and job.tokens == 800_000


def test_blocks_short_of_a_whole_step_are_named_before_any_work(tmp_path, student):
    """Only whole optimizer steps are trained: the blocks left over are said, not dropped silently."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # refused after the warning: nothing starts
    with pytest.warns(UserWarning, match=r"^the last 4 of 20 training blocks make less than one optimizer step "
                                         r"\(8 blocks\) and are not trained on$"), pytest.raises(UserError):
        distill(_cfg(student, out, tokens=20 * 64, batch_size=8), progress=False)


@pytest.mark.parametrize("run", ["local", "memory"])
def test_a_torn_metrics_line_is_closed_by_the_next_report_and_skipped(tmp_path, run):
    """A kill mid-append leaves half a line; the resumed run's next report starts on a fresh line,
    and readers skip (and count) the torn one instead of failing after the training is done."""
    from moe2dense_ray.core.storage import url_to_fs
    from moe2dense_ray.distill.driver import metrics_and_torn
    from moe2dense_ray.distill.worker import METRICS_FILE, _write_metrics

    run = str(tmp_path) if run == "local" else f"memory://torn-{os.getpid()}"
    fs, path = url_to_fs(f"{run}/{METRICS_FILE}")
    _write_metrics(run, {"step": 0})
    fs.pipe_file(path, fs.cat_file(path) + b'{"step": 2, "lo')  # killed mid-append
    assert read_metrics(run) == [{"step": 0}]  # a last line without its newline may be being written
    _write_metrics(run, {"step": 2})
    assert metrics_and_torn(run) == ([{"step": 0}, {"step": 2}], 1)
    assert fs.cat_file(path).decode().splitlines()[1] == '{"step": 2, "lo'


@pytest.mark.parametrize("case", ["fifo", "huge", "bad-json", "missing-key", "wrong-type"])
def test_a_damaged_stream_json_is_one_line(tmp_path, student, capsys, case):
    """`distill --logits` reads stream.json through the capped reader and its schema: one line for
    each way it can be damaged, and a FIFO is refused, not waited on."""
    logits = tmp_path / "logits"
    logits.mkdir()
    meta = {"vocab_size": 4096, "codec": "topk", "top_k": 16, "draws": 12, "temperature": 1.0, "seq_len": 64,
            "blocks": 40, "val_blocks": 2}
    path = logits / "stream.json"
    if case == "fifo":
        os.mkfifo(path)
    elif case == "huge":
        with open(path, "wb") as f:
            f.truncate((64 << 20) + 1)  # sparse: a file of more than 64 MiB of nothing
    elif case == "bad-json":
        path.write_text("{")
    else:
        meta.pop("val_blocks") if case == "missing-key" else meta.update(top_k="many")
        path.write_text(json.dumps(meta))
    fragment = {"fifo": "not a regular file", "huge": "more than a metadata file may be (64 MiB)", "bad-json": "is not valid JSON",
                "missing-key": "stream.json: val_blocks: Field required",
                "wrong-type": "stream.json: top_k: Input should be a valid integer"}[case]
    argv = ["distill", "--logits", str(logits), "--student", student, "--out", str(tmp_path / "run")]
    _one_error(capsys, main(argv), fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["uniform", "worse", "better"])
def test_a_wrecked_student_is_an_error_and_kept_only_as_a_diagnostic(tmp_path, student, case):
    """Finite losses, wrecked student (`--lr 1e9`: perplexity 4,095.99 on a 4,096-token vocabulary,
    where it was 498.6): the run ends in one line naming the learning rate, and RUN/student is
    moved aside, never announced as the result."""
    from moe2dense_ray.distill.outcome import DIAGNOSTIC, check_outcome

    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "student" / "config.json").write_text("{}")
    end = {"uniform": (4095.99, 0.14), "worse": (520.0, 0.16), "better": (300.0, 0.1)}[case]
    metrics = [{"step": 0, "val_ppl": 498.6, "val_kl": 0.15}, {"step": 6, "steps": 12, "val_ppl": 400.0, "val_kl": 0.12},
               {"step": 12, "steps": 12, "val_ppl": end[0], "val_kl": end[1]}]
    cfg = _cfg(student, run, lr=1e9)
    if case == "better":
        check_outcome(cfg, metrics, 4096)
        assert (run / "student" / "config.json").exists()
        return
    fragment = ("collapsed to a uniform distribution (held-out perplexity 4096.0 at step 12" if case == "uniform"
                else "made the student worse (held-out perplexity 498.6 at step 0, 520 at the end, KL")
    with pytest.raises(UserError, match=re.escape(fragment)) as e:
        check_outcome(cfg, metrics, 4096)
    assert "lower --lr (was 1e+09) or raise --warmup (was 0.05: 0 of 12 steps)" in str(e.value)
    assert not (run / "student").exists() and (run / DIAGNOSTIC / "config.json").exists()


def _without(student: str, out, name: str) -> str:
    """A copy of the student whose weights lack tensor `name` (its config unchanged)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(student, out)
    (path,) = out.glob("*.safetensors")
    weights = load_file(str(path))
    del weights[name]
    save_file(weights, str(path), metadata={"format": "pt"})
    return str(out)


def test_a_student_missing_a_tensor_is_refused_by_every_loader(tmp_path, student):
    """The loader of training workers, export and evaluation refuses what the driver refuses."""
    from moe2dense_ray.core.errors import UserError
    from moe2dense_ray.eval.metrics import load_model

    torn = _without(student, tmp_path / "torn", "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(UserError, match="missing model.layers.1.mlp.down_proj.weight"):
        load_model(torn)
    assert load_model(student) is not None


@pytest.mark.parametrize("case", ["not-dense", "vocabulary", "tokens", "run-exists", "bad-loss", "sampled-jsd",
                                  "bad-text", "missing-tensor"])
def test_bad_input_is_one_line_before_any_work(tmp_path, student, tokenizer, capsys, case):
    from tiny import make_tiny_moe

    out = tmp_path / "run"
    argv = ["distill", "--teacher", assets.teacher_path(), "--student", student, "--data", DATA,
            "--tokens", "4096", "--out", str(out)]
    fragment = {"not-dense": "not dense", "vocabulary": "vocabulary", "tokens": "fewer than one optimizer step",
                "run-exists": "already exists",
                "bad-loss": "unknown loss", "sampled-jsd": "sampled", "bad-text": "cannot read",
                "missing-tensor": "lacks 1 tensor(s) its model (config.json) needs, e.g. model.layers.1.mlp.down_proj"}[case]
    if case == "not-dense":
        argv[4] = assets.teacher_path()
    elif case == "vocabulary":
        other = tmp_path / "other"
        make_tiny_moe("qwen3_moe", str(other), tokenizer=tokenizer, num_experts=1, num_experts_per_tok=1,
                      mlp_only_layers=[])
        argv[4] = str(other)
    elif case == "tokens":  # 1024 tokens: 4 blocks of 256, and a step takes 8
        argv[argv.index("--tokens") + 1] = "1024"
    elif case == "run-exists":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "bad-loss":
        argv += ["--loss", "kl-ish"]
    elif case == "sampled-jsd":
        argv += ["--codec", "sampled", "--loss", "jsd"]
    elif case == "missing-tensor":  # transformers would fill it in at random inside the training worker
        argv[4] = _without(student, tmp_path / "torn", "model.layers.1.mlp.down_proj.weight")
    else:  # a truncated compressed file: found by the driver's plan, before Ray starts
        with open(assets.train_path(), "rb") as f:
            (tmp_path / "cut.jsonl.gz").write_bytes(f.read(200_000))
        argv[argv.index("--data") + 1] = str(tmp_path / "cut.jsonl.gz")
    _one_error(capsys, main(argv), fragment)
    if case == "run-exists":
        assert (out / "notes.txt").read_text() == "mine"
    else:
        assert not out.exists()


def _actor_pids(class_fragment: str) -> list[int]:
    """Processes of the live actors whose class name holds the fragment (from the GCS actor table:
    the state API would need the dashboard, which the test cluster does not start)."""
    from ray._private import state

    return [a["Pid"] for a in state.actors().values()
            if a["State"] == "ALIVE" and class_fragment in a["ActorClassName"] and a.get("Pid")]


def _kill_during(run, plan: list[tuple[int, str]]) -> threading.Thread:
    """Watches RUN's metrics; once step >= s, SIGKILLs the process of one live actor whose class
    name contains the fragment (a training worker, a teacher replica). A training worker is
    killed only once Ray Train has registered a checkpoint (its snapshot exists), so that there is
    one to resume from."""
    def watch():
        pending = list(plan)
        killed.clear()
        deadline = time.time() + 300
        while pending and time.time() < deadline:
            step = max([m["step"] for m in read_metrics(str(run))], default=-1)
            registered = (run / "train" / "checkpoint_manager_snapshot.json").exists()
            if step >= pending[0][0] and (registered or "Train" not in pending[0][1]):
                victims = _actor_pids(pending[0][1])
                if victims:
                    os.kill(victims[0], signal.SIGKILL)
                    killed.append(pending.pop(0))
            time.sleep(0.2)

    killed: list = []
    t = threading.Thread(target=watch, daemon=True)
    t.killed = killed
    t.start()
    return t


def _check_exact_steps(run, steps: int, checkpoint_every: int, blocks: int, seq_len: int) -> None:
    """Every step up to `steps` was logged; the last attempt started at a checkpoint and went on from it."""
    rows = read_metrics(str(run))
    resumed = [m for m in rows if m.get("resumed_from", 0) > 0]
    assert resumed, "no attempt resumed from a checkpoint"
    start = resumed[0]["resumed_from"]
    assert start % checkpoint_every == 0
    last_attempt = [m["step"] for m in rows if m.get("resumed_from") == resumed[-1]["resumed_from"]]
    assert last_attempt == list(range(resumed[-1]["resumed_from"] + 2, steps + 1, 2))
    assert {m["step"] for m in rows} >= set(range(0, steps + 1, 2))
    state = _final_state(run)
    assert state["step"] == steps
    trained = Ranges.of(state["trained"])
    assert len(trained) == steps * blocks  # a set of blocks: as many as planned means none lost, none repeated
    assert len(trained.pairs) == 1  # trained in order: one interval, its end the cursor
    assert state["cursors"] == [trained.pairs[0][1]]
    assert state["tokens"] == steps * blocks * seq_len


def _final_state(run) -> dict:
    ckpts = sorted(p for p in os.listdir(run / "train") if p.startswith("checkpoint-"))
    return json.loads((run / "train" / ckpts[-1] / "state.json").read_text())


def _teachers() -> dict[str, dict]:
    """Teacher replicas in the GCS actor table (live or dead), by actor id."""
    from ray._private import state

    return {k: a for k, a in state.actors().items() if "TeacherService" in a["ActorClassName"]}


def test_distill_lowers_perplexity_and_exports_a_dense_student_through_kills(ray_cluster, student, tmp_path):
    """A training worker killed mid-run comes back to the same teacher replica, still loaded; a
    killed replica is restarted and loses nothing; every block is trained exactly once. And the
    run, so interrupted, still does what a run is for: the held-out perplexity and KL fall, and
    RUN/student is the student's own architecture and dtype with trained weights."""
    run = tmp_path / "run"
    cfg = _cfg(student, run, seq_len=128, batch_size=8, tokens=8 * 128 * 24, max_failures=2)
    before = set(_teachers())
    watcher = _kill_during(run, [(6, "RayTrainWorker"), (14, "TeacherService")])
    r = distill(cfg, progress=False)
    watcher.join(timeout=5)
    assert watcher.killed == [(6, "RayTrainWorker"), (14, "TeacherService")]
    assert r.steps == 24 and r.tokens == 24 * 8 * 128
    _check_exact_steps(run, 24, cfg.checkpoint_every, blocks=8, seq_len=128)
    mine = [a for k, a in _teachers().items() if k not in before]
    # one replica for the whole run: created once, loaded again only when its own process was killed
    assert len(mine) == cfg.teacher_workers == 1 and mine[0]["NumRestarts"] == 1, mine
    rows = read_metrics(str(run))
    first, last = rows[0], rows[-1]
    assert first["step"] == 0 and last["step"] == 24
    assert last["val_ppl"] < 0.7 * first["val_ppl"], (first, last)
    assert last["val_kl"] < first["val_kl"]
    assert all(np.isfinite(m["loss"]) and m["tok_per_s"] > 0 and 0 <= m["teacher_wait"] <= 1 for m in rows[1:])
    dense = AutoModelForCausalLM.from_pretrained(run / "student")
    before = AutoModelForCausalLM.from_pretrained(student)
    assert type(dense) is type(before) and dense.config.intermediate_size == before.config.intermediate_size
    assert (run / "student" / "moe2dense_plan.json").exists() and (run / "student" / "tokenizer.json").exists()
    with open(os.path.join(student, "config.json")) as f:  # trained in fp32, written in the student's dtype
        assert json.loads((run / "student" / "config.json").read_text())["dtype"] == json.load(f)["dtype"] == "bfloat16"
    assert any(not torch.equal(a, b) for a, b in zip(dense.state_dict().values(), before.state_dict().values()))
    assert os.listdir(run / "tensorboard")
    assert json.loads((run / "results.json").read_text())["steps"] == 24
    # --resume from a copy whose latest checkpoint lost DeepSpeed's model states: one line naming
    # the file, on the driver, before any worker starts
    import shutil

    damaged = shutil.copytree(run, tmp_path / "damaged")
    last = sorted((damaged / "train").glob("checkpoint-*"))[-1]
    (last / "deepspeed" / "mp_rank_00_model_states.pt").unlink()
    t0 = time.time()
    with pytest.raises(UserError, match=f"{last.name} lacks deepspeed/mp_rank_00_model_states.pt"):
        distill(cfg.model_copy(update={"out": str(damaged), "resume": True}), progress=False)
    assert time.time() - t0 < 30


def check_stream_bar(fs, path: str, writer=None) -> None:
    """teacher-logits' bar over `path` on `fs` while `writer` (default `fs`; Ray Data writes with a
    client of its own) puts the stream's files there: a file counts once its footer is written,
    and the bar ends full when the write returns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moe2dense_ray.distill.stream import _blocks_written

    writer = writer or fs

    def put(name, rows=None):
        with writer.open(f"{path}/{name}", "wb") as f:
            if rows is None:
                f.write(b"PAR1" + bytes(64))  # being written: no footer yet
            else:
                pq.write_table(pa.table({"block_index": rows}), f)

    def reached(bar, n):
        deadline = time.time() + 10
        while bar.n != n and time.time() < deadline:
            time.sleep(0.02)
        return bar.n

    with _blocks_written(fs, path, 10, True, every=0.05) as bar:
        assert reached(bar, 0) == 0  # no directory yet
        writer.mkdirs(path, exist_ok=True)
        put("a.parquet", list(range(4)))
        assert reached(bar, 4) == 4  # listed once (an object store's client caches the listing)
        put("b.parquet")
        time.sleep(0.3)
        assert bar.n == 4
        put("c.parquet", list(range(4, 7)))
        assert reached(bar, 7) == 7
    assert bar.n == 10


@pytest.mark.parametrize("where", ["file", "memory"])  # memory: a filesystem that is not local, as a bucket
def test_the_streams_bar_counts_blocks_as_their_files_land(tmp_path, capsys, where):
    import fsspec

    check_stream_bar(fsspec.filesystem(where), str(tmp_path / "stream") if where == "file" else f"/{tmp_path.name}/stream")
    assert "teacher-logits: 100%" in capsys.readouterr().err


def test_a_replica_restarted_late_reads_a_large_id_order_again(ray_cluster):
    """At a 151,936-token vocabulary the id order is ~1 MB, so Ray passes it to the replicas through
    its object store and, unless someone holds it, frees it once they have started: a replica
    killed later would fail to start again (ray-project/ray#53727). The pool holds it."""
    from moe2dense_ray.distill.blocks import Blocks
    from moe2dense_ray.distill.stream import TeacherPool

    vocab = 151_936
    order = {"vocab_size": vocab, "ids": list(range(vocab))}  # every id listed: ids code as themselves
    cfg = TeacherLogitsConfig(teacher=assets.teacher_path(), data=DATA, tokens=512, seq_len=16, teacher_batch=2, out="unused")
    rng = np.random.default_rng(0)
    blocks = Blocks(np.arange(2), rng.integers(0, 4096, (2, 16)), np.ones((2, 16), dtype=np.int64))
    before = set(_teachers())
    pool = TeacherPool(assets.teacher_path(), cfg, order=order)
    try:
        first = pool.columns(blocks)
        time.sleep(1)  # the creation task's own reference to the order is gone
        (pid,) = [a["Pid"] for k, a in _teachers().items() if k not in before and a["State"] == "ALIVE"]
        os.kill(pid, signal.SIGKILL)
        again = pool.columns(blocks)
    finally:
        pool.close()
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    assert [a["NumRestarts"] for k, a in _teachers().items() if k not in before] == [1]


def test_offline_stream_gives_the_online_loss(ray_cluster, student, tmp_path):
    """The teacher-logits stream holds exactly what the teacher service computes online for
    `distill`: its replicas' answers for the held-out blocks (requests sent while the workers
    start) and for the training blocks, with either codec; the loss on them is the same."""
    from moe2dense_ray.core.models import load_tokenizer
    from moe2dense_ray.distill.blocks import local_blocks
    from moe2dense_ray.distill.codec import IdOrder
    from moe2dense_ray.distill.driver import _id_order, _text
    from moe2dense_ray.distill.losses import LOSSES
    from moe2dense_ray.distill.stream import TeacherPool, joined, read_blocks
    from moe2dense_ray.distill.worker import decode_target

    model = AutoModelForCausalLM.from_pretrained(student).eval()
    tok = load_tokenizer(assets.teacher_path())
    for codec in ("topk", "sampled"):
        logits = tmp_path / f"logits-{codec}"
        tcfg = TeacherLogitsConfig(teacher=assets.teacher_path(), data=DATA, tokens=4 * 64 * 4, seq_len=64,
                                   val_blocks=2, codec=codec, out=str(logits), teacher_batch=4)
        meta = teacher_logits(tcfg, progress=False)
        assert meta["blocks"] == 18 and (logits / "stream.json").exists()
        offline = joined(list(read_blocks(str(logits), 0, 18, rows=5)))  # what distill --logits reads
        assert list(offline["block_index"]) == list(range(18))
        val, plan, lo, end = _text(tcfg, tok)
        order = json.loads((logits / "stream.json").read_text())["id_order"]  # ids coded by frequency
        assert order == _id_order(plan, tok, 4096) and len(order["ids"]) > 1000
        pool = TeacherPool(assets.teacher_path(), tcfg, order=order)  # what `distill` runs online
        try:
            online = joined([joined(pool.requests(val)), pool.columns(local_blocks(plan, tok, lo=lo, hi=end))])
        finally:
            pool.close()
        assert sorted(online) == sorted(offline) and lo == len(val) == 2
        for k in online:
            np.testing.assert_array_equal(online[k], offline[k])
        losses = []
        for cols in (online, offline):
            target = decode_target(codec, cols, IdOrder.of(order))
            with torch.no_grad():
                out = model(input_ids=torch.as_tensor(cols["input_ids"]).long()).logits
            losses.append(LOSSES.get("forward_kl")(out.reshape(-1, out.shape[-1]), target, 1.0).mean().item())
        assert losses[0] == losses[1]


def test_a_stream_of_many_files_trains_the_same_student_twice(ray_cluster, student, tmp_path, monkeypatch):
    """Each worker reads its blocks in stream order however the blocks lie in the files, so a rerun
    is the same run: every step's loss and every validation agree exactly."""
    from moe2dense_ray.distill import blocks

    monkeypatch.setattr(blocks, "SHARD_BYTES", 2048)  # the text in several shards, packed by several tasks
    logits = tmp_path / "logits"
    teacher_logits(TeacherLogitsConfig(teacher=assets.teacher_path(), data=DATA, tokens=40 * 64, seq_len=64,
                                       val_blocks=2, out=str(logits), teacher_batch=2, top_k=16), progress=False)
    assert len(list(logits.glob("*.parquet"))) >= 4  # several read tasks, each free to finish first
    runs = []  # on two data-parallel workers with ZeRO-2, each reading its own half of the files
    for i in range(2):
        r = distill(DistillConfig(logits=str(logits), student=student, out=str(tmp_path / f"run{i}"), batch_size=4,
                                  workers=2, cpus_per_worker=0.5, zero_stage=2, report_every=1,
                                  checkpoint_every=1 << 20), progress=False)
        runs.append([(m["step"], m["loss"], m.get("val_ppl")) for m in r.metrics if "loss" in m])
        assert r.steps == 5 and r.tokens == 5 * 2 * 4 * 64 and (tmp_path / f"run{i}" / "student" / "config.json").exists()
        assert _final_state(tmp_path / f"run{i}")["trained"] == [[2, 42]]  # both ranks' blocks, each once
        assert _final_state(tmp_path / f"run{i}")["cursors"] == [22, 42]
    assert len(runs[0]) == 5 and runs[0] == runs[1]
    # the same stream damaged: found from the footers, in one line, before any work
    import shutil

    for damage, fragment in (("truncate", "is not a whole Parquet file"), ("remove", "a file is missing")):
        broken = shutil.copytree(logits, tmp_path / f"logits-{damage}")
        victim = sorted(broken.glob("*.parquet"))[1]
        if damage == "truncate":
            victim.write_bytes(victim.read_bytes()[:-100])
        else:
            victim.unlink()
        t0 = time.time()
        with pytest.raises(UserError, match=fragment):
            distill(DistillConfig(logits=str(broken), student=student, out=str(tmp_path / f"run-{damage}")),
                    progress=False)
        assert time.time() - t0 < 30 and not (tmp_path / f"run-{damage}").exists()
    # a page damaged inside a whole file (its footer intact) is one line from the reader of the
    # training workers (a UserError: recorded, not retried), naming the file
    from moe2dense_ray.distill.stream import read_blocks

    broken = shutil.copytree(logits, tmp_path / "logits-page")
    victim = sorted(broken.glob("*.parquet"))[1]
    data = bytearray(victim.read_bytes())
    data[8:400] = bytes(392)
    victim.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{victim.name}: row group 0 cannot be read .*the stream is damaged"):
        list(read_blocks(str(broken), 0, 40))


def _actors(fragment: str) -> set[str]:
    from ray._private import state

    return {k for k, a in state.actors().items() if fragment in a["ActorClassName"]}


def _overflowing_student(student, out, cfg: DistillConfig) -> str:
    """The student with an untied head and the embedding row of a token that the training blocks
    of `cfg` hold, and its validation blocks do not, infinite: the split model's check (tokens
    0..7) and the validation before training pass, and the first training step's loss is not finite."""
    import shutil

    from moe2dense_ray.core.models import load_tokenizer
    from moe2dense_ray.distill.blocks import local_blocks
    from moe2dense_ray.distill.driver import _text

    val, plan, lo, end = _text(cfg, load_tokenizer(student))
    first = local_blocks(plan, load_tokenizer(student), lo=lo, hi=lo + cfg.batch_size).input_ids.ravel().tolist()
    token = max(set(first) - set(val.input_ids.ravel().tolist()) - set(range(8)), key=first.count)
    shutil.copytree(student, out)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("inf")
    model.save_pretrained(out)
    return str(out)


def test_a_non_finite_loss_ends_the_run_at_once(ray_cluster, student, tmp_path, capsys):
    """A failure that retrying would repeat is one error line after one attempt, not a restart loop."""
    run = tmp_path / "run"
    bad = _overflowing_student(student, tmp_path / "bad", _cfg(student, run, tokens=4 * 64 * 4, val_blocks=2))
    before = _actors("RayTrainWorker")
    code = main(["-q", "distill", "--teacher", assets.teacher_path(), "--student", bad, "--data", DATA,
                 "--out", str(run), "--seq-len", "64", "--batch-size", "4", "--tokens", str(4 * 64 * 4),
                 "--val-blocks", "2", "--teacher-batch", "4", "--max-failures", "3"])
    line = _one_error(capsys, code, "non-finite loss")
    assert "--resume" in line and "lower --lr" in line
    assert len(_actors("RayTrainWorker") - before) == 1  # the one attempt's worker: no restart
    assert json.loads((run / "failure.json").read_text())["kind"] == "FloatingPointError"
    assert not (run / "student").exists()
    assert all(np.isfinite(v) for m in read_metrics(str(run)) for v in m.values() if isinstance(v, float))


def test_a_user_error_in_a_worker_is_not_retried(ray_cluster, student, tmp_path):
    from moe2dense_ray.distill.driver import _fit
    from moe2dense_ray.distill.worker import guarded

    attempts = tmp_path / "attempts"

    def fails(config):
        from moe2dense_ray.core.errors import UserError

        with open(attempts, "a") as f:
            f.write("x")
        raise UserError("shard 7 of the stream is damaged")

    cfg = DistillConfig(logits=str(tmp_path / "logits"), student=student, out=str(tmp_path / "run"), max_failures=3)
    with pytest.raises(UserError, match="^shard 7 of the stream is damaged$"):
        _fit(cfg, steps=1, val={}, source={}, progress=False, t0=0.0, callbacks=None, order=None,
             train_loop=guarded(fails))
    assert attempts.read_text() == "x"
