"""The pipeline on a real S3 API: moto's server on a loopback socket, s3fs as every stage and
every Ray worker uses it, inputs and outputs in a bucket.

conftest.py binds the socket and exports AWS_ENDPOINT_URL (and throwaway credentials) before the
session's Ray starts, so its workers reach the same server; this module serves S3 on it for as
long as the module runs. The server counts whole-object downloads and can refuse one copy, so
that the tests can see how often a checkpoint was fetched and what a failure in the middle of
replacing an output leaves behind.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import s3fs  # the test extra installs it, and moto's server
from test_distill import _actor_pids
from test_errors import _one_error

from moe2dense_ray import assets
from moe2dense_ray.cli import main
from moe2dense_ray.core.checkpoint import CheckpointReader

BUCKET = "moe2dense-test"
DATA = assets.calibration_path()
TEACHER_WEIGHTS = f"/{BUCKET}/teacher/model.safetensors"


class LoopbackS3:
    """moto's S3 application behind a WSGI layer that counts whole-object GETs per path, can
    refuse the next server-side copy onto a key, and can slow down downloads of one path."""

    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()
        self.downloads: Counter[str] = Counter()
        self.refuse_copy_to: str | None = None
        self.slow: tuple[str, float] | None = None

    def __call__(self, environ, start_response):
        path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
        if method == "GET" and "HTTP_RANGE" not in environ and "list-type" not in environ.get("QUERY_STRING", ""):
            with self.lock:
                self.downloads[path] += 1
            if self.slow and self.slow[0] == path:
                time.sleep(self.slow[1])
        if method == "PUT" and "HTTP_X_AMZ_COPY_SOURCE" in environ and self.refuse_copy_to \
                and path.endswith(self.refuse_copy_to):
            self.refuse_copy_to = None  # once
            body = b"<Error><Code>AccessDenied</Code><Message>copy refused by the test</Message></Error>"
            start_response("403 Forbidden", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def s3(loopback_s3_socket):
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    app = LoopbackS3(DomainDispatcherApplication(create_backend_app))
    host, port = loopback_s3_socket.getsockname()
    server = make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler,
                         fd=loopback_s3_socket.fileno())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fs = s3fs.S3FileSystem()
    assert fs.client_kwargs.get("endpoint_url") is None  # it reaches the server through AWS_ENDPOINT_URL alone
    fs.mkdir(BUCKET)
    fs.put(assets.teacher_path() + "/", f"{BUCKET}/teacher/", recursive=True)
    app.fs = fs
    yield app
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _keys(fs, prefix: str = BUCKET) -> list[str]:
    fs.invalidate_cache()
    return sorted(fs.find(prefix))


def _leftovers(fs) -> list[str]:
    return [k for k in _keys(fs) if any(m in k for m in (".partial-", ".commit-", ".old-"))]


def _experts(fs, dest: str) -> int:
    """Which plan the checkpoint at s3://dest was built from, reading every tensor (a half-replaced
    checkpoint fails here: a missing shard, an index naming a shard that is gone)."""
    reader = CheckpointReader(f"s3://{dest}")
    for key in reader.keys():
        reader.get(key)
    reader.close()
    return json.loads(fs.cat_file(f"{dest}/moe2dense_plan.json"))["experts"]

@pytest.fixture(scope="module")
def dense(s3):
    """`convert` from the bucket to the bucket, statistics included: the command of issue #19,
    which wrote every object and then failed with `error: The specified key does not exist.`"""
    code = main(["-q", "convert", f"s3://{BUCKET}/teacher", "--data", DATA, "--samples", "4", "--seq-len", "32",
                 "--workers", "0", "--experts", "4", "--stats", f"s3://{BUCKET}/stats", "--out", f"s3://{BUCKET}/dense"])
    assert code == 0
    return f"{BUCKET}/dense"


def test_convert_and_replacements_on_s3(s3, dense, capsys):
    """The converted checkpoint is whole, and the teacher was downloaded once. A replacement is
    refused without --overwrite and whole with it (shards of the old output that the new one
    lacks are deleted); a plan file is replaced by one copy; a missing bucket is refused before
    any work."""
    fs = s3.fs
    assert {k.rsplit("/", 1)[-1] for k in _keys(fs, dense)} == {
        "config.json", "generation_config.json", "model.safetensors", "moe2dense_plan.json", "tokenizer.json",
        "tokenizer_config.json"}
    assert _experts(fs, dense) == 4 and fs.exists(f"{BUCKET}/stats/meta.json") and _leftovers(fs) == []
    assert s3.downloads[TEACHER_WEIGHTS] == 1
    plan = f"s3://{BUCKET}/plan4.json"  # a file output on S3: replaced by one copy
    assert main(["-q", "plan", f"s3://{BUCKET}/stats", "--experts", "4", "--out", plan]) == 0
    _one_error(capsys, main(["-q", "plan", f"s3://{BUCKET}/stats", "--experts", "4", "--out", plan]), "already exists")
    assert main(["-q", "plan", f"s3://{BUCKET}/stats", "--experts", "4", "--out", plan, "--overwrite"]) == 0
    build = ["-q", "build", f"s3://{BUCKET}/teacher", plan, "--out"]
    _one_error(capsys, main([*build, f"s3://{dense}"]), "already exists")
    _one_error(capsys, main([*build, "s3://no-such-bucket/dense"]), "the bucket no-such-bucket does not exist")
    assert main([*build, f"s3://{BUCKET}/sharded", "--shard-size", "0.0005"]) == 0
    assert len([k for k in _keys(fs, f"{BUCKET}/sharded") if k.endswith(".safetensors")]) > 2
    assert main([*build, f"s3://{BUCKET}/sharded", "--overwrite"]) == 0
    names = {k.rsplit("/", 1)[-1] for k in _keys(fs, f"{BUCKET}/sharded")}
    assert "model.safetensors" in names and not any(n.startswith("model-") or n.endswith(".index.json") for n in names)
    assert _experts(fs, f"{BUCKET}/sharded") == 4 and _leftovers(fs) == []


def test_a_replacement_cut_short_is_finished_by_the_next_run(s3, dense, capsys):
    """The store refuses one copy in the middle of replacing DEST (as a lost connection would):
    the run fails in one line, its committed new output is kept, not discarded, and the next
    run that checks DEST finishes the replacement before anything else. An old output renamed
    aside (`DEST.old-*`) with DEST missing is moved back the same way."""
    fs = s3.fs
    plan2, dest = f"s3://{BUCKET}/plan2.json", f"{BUCKET}/cut"
    assert main(["-q", "plan", f"s3://{BUCKET}/stats", "--experts", "2", "--out", plan2]) == 0
    build = ["-q", "build", f"s3://{BUCKET}/teacher"]
    assert main([*build, f"s3://{BUCKET}/plan4.json", "--out", f"s3://{dest}", "--shard-size", "0.0005"]) == 0
    s3.refuse_copy_to = "/cut/model.safetensors"
    _one_error(capsys, main([*build, plan2, "--out", f"s3://{dest}", "--overwrite"]), "copy refused by the test")
    left = _leftovers(fs)
    assert any(".commit-" in k for k in left) and any(".partial-" in k and k.endswith("model.safetensors") for k in left)
    _one_error(capsys, main([*build, plan2, "--out", f"s3://{dest}"]), "already exists")  # finished, then refused
    assert _experts(fs, dest) == 2 and _leftovers(fs) == []
    assert not any(k.rsplit("/", 1)[-1].startswith("model-") for k in _keys(fs, dest))  # the old shards are gone
    aside = _keys(fs, dest)
    fs.copy(aside, [k.replace("/cut/", "/back.old-0123abcd/") for k in aside])  # DEST missing, its old output aside
    _one_error(capsys, main([*build, plan2, "--out", f"s3://{BUCKET}/back"]), "already exists")
    assert _experts(fs, f"{BUCKET}/back") == 2 and _leftovers(fs) == []


def test_a_checkpoint_is_copied_once_per_node(s3, tmp_path):
    """Two processes on one node localizing the same S3 checkpoint at the same moment (the
    download slowed down so that they overlap): one downloads, the other waits for its copy and
    uses it. A kill mid-copy leaves only a `.partial-*`, which the next filler removes; a
    changed source is a new entry, and the old one is evicted."""
    from moe2dense_ray.core.models import localize

    root, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    teacher = _keys(s3.fs, f"{BUCKET}/teacher")
    s3.fs.copy(teacher, [k.replace("/teacher/", "/teacher-copy/") for k in teacher])  # changed below
    url, weights = f"s3://{BUCKET}/teacher-copy", f"/{BUCKET}/teacher-copy/model.safetensors"
    code = ("import os, sys, time\n"
            "from moe2dense_ray.core.models import localize\n"
            "open(os.path.join(sys.argv[2], str(os.getpid())), 'w').close()\n"
            "t = time.time()\n"
            "while len(os.listdir(sys.argv[2])) < 2 and time.time() < t + 60: time.sleep(0.01)\n"
            "with localize(sys.argv[1], cache_dir=sys.argv[3]) as path:\n"
            "    print(path, sorted(os.listdir(path)))\n")
    s3.slow = (weights, 1.0)
    try:
        procs = [subprocess.Popen([sys.executable, "-c", code, url, str(barrier), str(root)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        s3.slow = None
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0] and "model.safetensors" in outs[0][0]  # the same directory, every file
    assert s3.downloads[weights] == 1
    (entry,) = [e for e in os.listdir(root) if not e.startswith(".")]
    assert sorted(os.listdir(root / entry)) == sorted(os.listdir(assets.teacher_path()))
    with localize(url, cache_dir=str(root)) as path:  # cached: nothing downloaded
        assert path == str(root / entry)
    assert s3.downloads[weights] == 1
    killed = root / f"{entry}.partial-deadbeef"  # what a filler killed mid-copy leaves
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    s3.fs.pipe(f"{BUCKET}/teacher-copy/README.md", b"a new revision\n")  # the source changes: a new version
    with localize(url, cache_dir=str(root)) as path:
        assert open(os.path.join(path, "README.md")).read() == "a new revision\n"
    assert [e for e in os.listdir(root) if not e.startswith(".")] == [os.path.basename(path)]
    assert s3.downloads[weights] == 2


def test_teacher_logits_distill_resume_and_eval_on_s3(s3, dense, ray_cluster, capsys):
    """The rest of the chain with every path in the bucket: the teacher stream (its replica uses
    the node's copy of the teacher), a distillation from it stopped mid-run (its training
    worker killed once a checkpoint is registered, no retries), resumed from the checkpoint on
    S3, and the distilled student evaluated; results replaced only with --overwrite."""
    from moe2dense_ray.distill.driver import read_metrics

    fs = s3.fs
    logits, run = f"s3://{BUCKET}/logits", f"s3://{BUCKET}/run"
    assert main(["teacher-logits", f"s3://{BUCKET}/teacher", "--data", DATA, "--tokens", str(4 * 64 * 6),
                 "--seq-len", "64", "--val-blocks", "2", "--teacher-batch", "4", "--out", logits]) == 0
    err = capsys.readouterr().err  # its bar over the blocks, counted from the files in the bucket
    assert "teacher-logits: 100%" in err and "26/26" in err and "Traceback" not in err, err[-2000:]
    meta = json.loads(fs.cat_file(f"{BUCKET}/logits/stream.json"))
    assert meta["blocks"] == 26 and any(k.endswith(".parquet") for k in _keys(fs, f"{BUCKET}/logits"))
    assert s3.downloads[TEACHER_WEIGHTS] == 1  # the replica (an actor) used the copy convert made on this node
    stop, killed = threading.Event(), []

    def kill_once_checkpointed():
        while not stop.wait(0.2):
            fs.invalidate_cache()
            if fs.exists(f"{BUCKET}/run/train/checkpoint_manager_snapshot.json"):
                pids = _actor_pids("RayTrainWorker")
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return

    watcher = threading.Thread(target=kill_once_checkpointed, daemon=True)
    watcher.start()
    try:
        code = main(["-q", "distill", "--logits", logits, "--student", f"s3://{dense}", "--out", run,
                     "--batch-size", "4", "--checkpoint-every", "2", "--report-every", "2", "--max-failures", "0"])
    except Exception:  # noqa: BLE001 - Ray Train's error for the lost worker, however it surfaces
        code = None
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert killed and code != 0
    assert not fs.exists(f"{BUCKET}/run/student/config.json")
    capsys.readouterr()
    _one_error(capsys, main(["-q", "distill", "--resume", run, "--batch-size", "8"]), "--batch-size")  # the run's own
    assert main(["-q", "distill", "--resume", run]) == 0
    rows = read_metrics(run)
    resumed = [m for m in rows if m.get("resumed_from", 0) > 0]
    assert resumed and resumed[0]["resumed_from"] % 2 == 0 and rows[-1]["step"] == rows[-1]["steps"] == 6
    last = sorted(k for k in _keys(fs, f"{BUCKET}/run/train") if k.endswith("/state.json"))[-1]
    state = json.loads(fs.cat_file(last))
    assert state["step"] == 6 and state["trained"] == [[2, 26]]  # every block once: none lost, none repeated
    assert json.loads(fs.cat_file(f"{BUCKET}/run/results.json"))["steps"] == 6
    assert {"config.json", "model.safetensors", "distill.yaml"} <= {k.rsplit("/", 1)[-1]
                                                                    for k in _keys(fs, f"{BUCKET}/run/student")}
    student, results = f"{run}/student", f"s3://{BUCKET}/eval.json"
    evaluate = ["-q", "eval", student, "--tasks", "next_line", "--limit", "4", "--samples", "2", "--seq-len", "64",
                "--out", results]
    assert main(evaluate) == 0
    first = json.loads(fs.cat_file(f"{BUCKET}/eval.json"))
    assert first["model"] == student and first["perplexity"]["tokens"] > 0 and "next_line" in first["tasks"]
    capsys.readouterr()
    _one_error(capsys, main(evaluate), "already exists")
    assert main([*evaluate, "--overwrite", "--samples", "3"]) == 0
    assert json.loads(fs.cat_file(f"{BUCKET}/eval.json"))["perplexity"]["blocks"] == 3
    assert _leftovers(fs) == []


def test_the_streams_bar_sees_files_another_client_writes(s3, capsys):
    """Ray Data writes the stream through its own S3 client: the bar's listings must not be s3fs's
    cache of an earlier one, or it would stand still until the write returns."""
    from test_distill import check_stream_bar

    check_stream_bar(s3.fs, f"{BUCKET}/bar-stream", writer=s3fs.S3FileSystem(skip_instance_cache=True))
    assert "10/10" in capsys.readouterr().err


def test_s3_without_the_cloud_extra_is_one_line(monkeypatch, capsys):
    """Where s3fs is not installed, an s3:// path says what to install, in one line."""
    from fsspec.registry import _registry  # the filesystem classes fsspec has imported

    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` fails as where it is not installed
    monkeypatch.delitem(_registry, "s3", raising=False)
    _one_error(capsys, main(["-q", "teacher-logits", assets.teacher_path(), "--data", DATA, "--tokens", "1024",
                                  "--out", "s3://b/logits"]),
               "pip install 'moe2dense-ray[cloud]'")
