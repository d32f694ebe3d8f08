"""`calibrate` on broken inputs and clusters: nothing hangs, nothing is silently wrong.

Every case is a real copy of the bundled teacher broken on disk (a tensor deleted from its
safetensors, a shard left out of the index, an edited config.json, a config symlinked to
/dev/zero) or a real cluster asked for more than it has, run through the real CLI or API: each
must end quickly in one `error: ...` line (exit code 2), in process and inside Ray actors alike.
The in-process Ray tests share the session's cluster (conftest); the tests of an embedded Ray
that this package starts itself run in subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_errors import _one_error

from moe2dense_ray import assets
from moe2dense_ray.cli import main
from moe2dense_ray.core.config import CalibrateConfig
from moe2dense_ray.core.errors import UserError

DATA = assets.calibration_path()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = 60  # seconds within which a refused run must have answered, Ray start-up included


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def teacher(tmp_path):
    """A private copy of the bundled teacher, to break."""
    return str(shutil.copytree(assets.teacher_path(), tmp_path / "teacher"))


def _edit_tensors(src: str, edit) -> None:
    path = os.path.join(src, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def _edit_config(src: str, **changes) -> None:
    path = os.path.join(src, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MOE2DENSE_RESOURCE_TIMEOUT")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


def _cli(src, out, *extra, env=None, timeout=120):
    """`python -m moe2dense_ray.cli calibrate ...` in a fresh process: (result, seconds)."""
    argv = [sys.executable, "-m", "moe2dense_ray.cli", "-q", "calibrate", str(src), "--data", DATA,
            "--samples", "4", "--seq-len", "32", "--out", str(out), *map(str, extra)]
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env or _env(), cwd=ROOT)
    return p, time.monotonic() - t0


def _single_error(p, fragment: str) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (p.returncode, p.stderr[-4000:])
    assert fragment in lines[0], lines[0]
    return lines[0]


def _script(code: str, *args, timeout=120, memory: int | None = None) -> subprocess.CompletedProcess:
    """A Python snippet in a fresh process (no Ray running there), optionally with capped memory."""
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=_env(), cwd=ROOT, preexec_fn=limit if memory else None)


def _replicas(alive_only: bool = True) -> list[dict]:
    """Calibration actors in the session cluster's actor table (the dashboard is not running)."""
    from ray._private import state

    return [a for a in state.actors().values()
            if "_Replica" in a["ActorClassName"] and (a["State"] == "ALIVE" or not alive_only)]


# -- 1. resources: checked before any actor, so nothing waits forever ------------------------------


def test_too_many_workers_is_one_line_at_once(tmp_path):
    """2 CPUs and actors of 1 CPU each: a third worker could never be placed; this used to process
    every token and then wait forever for it."""
    n = os.cpu_count() + 1  # an embedded Ray has at most the machine's CPUs
    p, seconds = _cli(assets.teacher_path(), tmp_path / "stats", "--workers", n)
    line = _single_error(p, f"--workers {n} needs {n} CPUs but the cluster has ")
    assert "lower --workers to " in line
    assert seconds < FAST and not (tmp_path / "stats").exists()


def test_gpus_per_worker_without_gpus_is_one_line_at_once(tmp_path):
    """--gpus-per-worker 1 on a machine without GPUs used to wait at 0% forever (on a machine with
    GPUs: one more GPU per worker than it has)."""
    gpus = torch.cuda.device_count()
    p, seconds = _cli(assets.teacher_path(), tmp_path / "stats", "--gpus-per-worker", gpus + 1)
    line = _single_error(p, f"needs {gpus + 1} GPU")
    assert f"but the cluster has {gpus}" in line and "--gpus-per-worker" in line
    assert seconds < FAST and not (tmp_path / "stats").exists()


def test_on_a_cluster_calibrate_waits_then_gives_up(ray_cluster, tmp_path):
    """Joined to a cluster (RAY_ADDRESS), an autoscaler might still add the CPUs: the driver says
    what it waits for, and gives up after MOE2DENSE_RESOURCE_TIMEOUT seconds."""
    address = ray_cluster.get_runtime_context().gcs_address
    cpus = int(ray_cluster.cluster_resources()["CPU"])
    p, seconds = _cli(assets.teacher_path(), tmp_path / "stats", "--workers", cpus + 1,
                      env=_env(RAY_ADDRESS=address, MOE2DENSE_RESOURCE_TIMEOUT="3"))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-4000:]
    assert [ln for ln in lines if ln.startswith("error: ")] == lines[-1:], lines
    assert f"needs {cpus + 1} CPUs" in lines[-1] and "waited 3 s" in lines[-1], lines[-1]
    assert any(ln.startswith("warning: waiting for") and f"{cpus + 1} CPUs" in ln for ln in lines), lines
    assert 3 <= seconds < FAST


def test_ray_that_cannot_start_is_one_line(tmp_path):
    """Ray's own start-up failure (here: its temp dir is a file; on a full disk, a timeout)."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    p, seconds = _cli(assets.teacher_path(), tmp_path / "stats", "--workers", "1",
                      env=_env(RAY_TMPDIR=str(blocker)))
    _single_error(p, "cannot start Ray: ")
    assert seconds < FAST


def test_distill_shares_the_resource_check(ray_cluster, monkeypatch):
    """distill / teacher-logits use the same check: refused on an embedded Ray, a bounded wait on a cluster."""
    from moe2dense_ray.distill.config import TeacherLogitsConfig
    from moe2dense_ray.distill.driver import _check_resources

    cpus = int(ray_cluster.cluster_resources()["CPU"])
    cfg = TeacherLogitsConfig(teacher=assets.teacher_path(), data=DATA, out="unused", tokens=4096,
                              teacher_workers=cpus + 1, cpus_per_teacher=1.0)
    with pytest.raises(UserError, match=r"this run needs .* CPUs .*: lower --workers, --teacher-workers"):
        _check_resources(cfg)
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.get_runtime_context().gcs_address)
    monkeypatch.setenv("MOE2DENSE_RESOURCE_TIMEOUT", "1")
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="waiting for"), pytest.raises(UserError, match="waited 1 s"):
        _check_resources(cfg)
    assert time.monotonic() - t0 < 10
    _check_resources(cfg.model_copy(update={"teacher_workers": 1}))  # what fits passes at once


def test_an_actor_bigger_than_any_node_is_refused(ray_cluster):
    """Totals are not enough: one actor is never split over nodes."""
    from moe2dense_ray.core.ray_session import require_resources

    cpus = int(ray_cluster.cluster_resources()["CPU"])
    require_resources({"CPU": cpus}, each=[{"CPU": cpus}], who="this", advice="fine")
    with pytest.raises(UserError, match=f"this needs a node with {cpus + 1} CPUs for one worker but no node "
                                        f"has more than {cpus} CPUs: lower it"):
        require_resources({"CPU": 1}, each=[{"CPU": cpus + 1}], who="this", advice="lower it")


# -- 2. missing weights: an error, not random initialisation ---------------------------------------


def _drop_router(src):
    _edit_tensors(src, lambda s: s.pop("model.layers.0.mlp.gate.weight"))


def _drop_embeddings(src):
    _edit_tensors(src, lambda s: s.pop("model.embed_tokens.weight"))


def _unindexed_shard(src):
    """Two shards, of which the index names only the first: the second's tensors are never read."""
    state = load_file(os.path.join(src, "model.safetensors"))
    os.remove(os.path.join(src, "model.safetensors"))
    second = {k: state.pop(k) for k in ("model.norm.weight", "model.layers.2.self_attn.q_proj.weight")}
    save_file(state, os.path.join(src, "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(second, os.path.join(src, "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in state}}, f)


@pytest.mark.parametrize("case, fragment", [
    (_drop_router, "missing model.layers.0.mlp.gate.weight"),
    (_drop_embeddings, "missing lm_head.weight, model.embed_tokens.weight"),
    (_unindexed_shard, "model-00002-of-00002.safetensors is not in its index"),
])
def test_missing_weights_are_an_error_not_random_values(teacher, tmp_path, capsys, case, fragment):
    case(teacher)
    out = tmp_path / "stats"
    line = _one_error(capsys, main(["-q", "calibrate", teacher, "--data", DATA, "--samples", "2", "--seq-len", "16",
                                    "--workers", "0", "--out", str(out)]), fragment)
    assert "random values" in line and not out.exists()


def test_every_family_loads_cleanly_and_a_missing_tensor_is_still_caught(tmp_path, tokenizer):
    """The check is not weakened for anyone, and no supported family trips it when nothing is wrong."""
    from tiny import FAMILY_NAMES, make_tiny_moe

    from moe2dense_ray.core.models import load_causal_lm

    for family in FAMILY_NAMES:
        make_tiny_moe(family, str(tmp_path / family), tokenizer=tokenizer)
        model, cfg, _ = load_causal_lm(str(tmp_path / family))
        assert cfg["model_type"] == family
    _edit_tensors(str(tmp_path / "gpt_oss"), lambda s: s.pop("model.layers.1.self_attn.sinks"))
    with pytest.raises(UserError, match=r"missing model\.layers\.1\.self_attn\.sinks"):
        load_causal_lm(str(tmp_path / "gpt_oss"))


# -- 3. load and run failures: one line, in process and from Ray actors ----------------------------


def _drop_expert(src):
    _edit_tensors(src, lambda s: s.pop("model.layers.1.mlp.experts.3.down_proj.weight"))


def _narrow_expert(src):
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    _edit_tensors(src, lambda s: s.__setitem__(key, s[key][:, :64].contiguous()))


def _narrow_attention(src):
    key = "model.layers.1.self_attn.q_proj.weight"
    _edit_tensors(src, lambda s: s.__setitem__(key, s[key][:64].contiguous()))


def _integer_weights(src):
    key = "model.layers.1.self_attn.q_proj.weight"
    _edit_tensors(src, lambda s: s.__setitem__(key, (s[key] * 100).to(torch.int32)))


def _config_shape(src):
    _edit_config(src, moe_intermediate_size=64)


@pytest.mark.parametrize("case, fragment", [
    (_drop_expert, "tensor model.layers.1.mlp.experts.3.down_proj.weight is missing"),
    (_narrow_expert, "experts.3.down_proj.weight has shape (128, 64), but config.json implies (128, 128)"),
    (_narrow_attention, "q_proj.weight is (64, 128) in the checkpoint but (128, 128) by the config"),
    (_integer_weights, "q_proj.weight is stored as int32"),
    (_config_shape, "experts.0.gate_proj.weight has shape (128, 128), but config.json implies (64, 128)"),
])
def test_broken_tensors_are_one_line_in_process(teacher, tmp_path, capsys, case, fragment):
    case(teacher)
    _one_error(capsys, main(["-q", "calibrate", teacher, "--data", DATA, "--samples", "2", "--seq-len", "16",
                             "--workers", "0", "--out", str(tmp_path / "stats")]), fragment)


@pytest.mark.parametrize("case, fragment", [
    (_narrow_expert, "cannot load {src}: stack expects each tensor to be equal size"),
    (_drop_expert, "model.layers.1.mlp.experts.down_proj is (15, 128, 128) in the checkpoint but (16, 128, 128)"),
])
def test_transformers_own_load_errors_are_one_line(teacher, case, fragment):
    """A replica loading a checkpoint that the driver's header checks would have refused: what
    transformers raises (a conversion failure, a size mismatch) is one line too, not its report."""
    from moe2dense_ray.core.models import load_causal_lm

    case(teacher)
    with pytest.raises(UserError) as e:
        load_causal_lm(teacher)
    assert fragment.format(src=teacher) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_broken_config_and_vocabulary_fail_before_any_actor(ray_cluster, teacher, tmp_path, tokenizer, corpus,
                                                           capsys):
    """top-k above the expert count, and token ids beyond the vocabulary, are refused by the driver:
    no replica is started (they used to fail inside each actor with a traceback)."""
    from tiny import make_tiny_moe

    before = len(_replicas(alive_only=False))
    _edit_config(teacher, num_experts_per_tok=32)
    argv = ["-q", "calibrate", teacher, "--data", DATA, "--samples", "2", "--seq-len", "16", "--workers", "2",
            "--out", str(tmp_path / "s1")]
    _one_error(capsys, main(argv), "num_experts_per_tok=32 experts, but there are only 16")
    small = tmp_path / "small-vocab"  # a consistent checkpoint, but its tokenizer has 96 ids
    make_tiny_moe("qwen3_moe", str(small), tokenizer=tokenizer, vocab_size=64)
    argv = ["-q", "calibrate", str(small), "--data", corpus, "--samples", "2", "--seq-len", "16", "--workers", "2",
            "--out", str(tmp_path / "s2")]
    _one_error(capsys, main(argv), "vocabulary has 64 entries")
    assert len(_replicas(alive_only=False)) == before


def test_grouped_routing_config_is_checked():
    from tiny import tiny_config

    from moe2dense_ray.core.families import get_family, moe_shape

    v3 = get_family("deepseek_v3")
    moe_shape(v3, tiny_config("deepseek_v3"))
    with pytest.raises(UserError, match="does not divide"):
        moe_shape(v3, tiny_config("deepseek_v3", n_group=4))
    with pytest.raises(UserError, match="among the 3"):
        moe_shape(v3, tiny_config("deepseek_v3", num_experts_per_tok=4))
    with pytest.raises(UserError, match="not a positive integer"):
        moe_shape(v3, tiny_config("deepseek_v3", num_experts_per_tok=0))


def test_actor_errors_come_back_as_the_same_line_and_actors_are_killed(ray_cluster, teacher, tmp_path):
    """The replica raises the UserError; the driver shows that very line (not Ray's wrapping and
    traceback), and no replica outlives the failed run."""
    from moe2dense_ray.convert.calibrate import calibrate

    _drop_router(teacher)
    errors = []
    for workers in (0, 1):
        with pytest.raises(UserError) as e:
            calibrate(CalibrateConfig(src=teacher, data=DATA, samples=2, seq_len=16, workers=workers), progress=False)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "\n" not in errors[1] and "missing model.layers.0.mlp.gate.weight" in errors[1]
    deadline = time.monotonic() + 20
    while _replicas() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _replicas()
    assert ray_cluster.is_initialized()  # a Ray it did not start is left alone


def test_ray_errors_become_one_line(ray_cluster):
    """What the driver makes of each kind of actor failure, on real Ray errors."""
    import ray

    from moe2dense_ray.core.teachers import _worker_error

    @ray.remote
    def fails():
        raise ValueError("bad value\nsecond line")

    with pytest.raises(ray.exceptions.RayTaskError) as e:
        ray.get(fails.remote())
    assert _worker_error(e.value) == "a calibration worker failed: ValueError: bad value"

    @ray.remote(num_cpus=0)
    class Broken:
        def __init__(self):
            raise UserError("the message the user needs")

        def ping(self):
            return 1

    with pytest.raises(ray.exceptions.RayActorError) as e:
        ray.get(Broken.remote().ping.remote())
    assert _worker_error(e.value) == "the message the user needs"

    @ray.remote(num_cpus=0)
    class Fine:
        def ping(self):
            return 1

    a = Fine.remote()
    ray.get(a.ping.remote())
    ray.kill(a)
    deadline = time.time() + 30
    with pytest.raises(ray.exceptions.RayActorError) as e:
        while time.time() < deadline:  # ray.kill is asynchronous: a call sent at once may still be served
            ray.get(a.ping.remote())
            time.sleep(0.1)
    line = _worker_error(e.value)
    assert line.startswith("a calibration worker died: ") and "\n" not in line and "class_name" not in line


# -- 4. metadata files: checked before transformers reads them without limits ----------------------


def test_metadata_files_that_never_end_are_refused(tmp_path):
    """config.json or tokenizer.json symlinked to /dev/zero, or a FIFO, would be read forever: run in
    a process with capped memory and a timeout, so that a missing check fails instead of hanging."""
    base = assets.teacher_path()
    config, tok, fifo = (str(shutil.copytree(base, tmp_path / n)) for n in ("config", "tok", "fifo"))
    os.remove(os.path.join(config, "config.json"))
    os.symlink("/dev/zero", os.path.join(config, "config.json"))
    os.remove(os.path.join(tok, "tokenizer.json"))
    os.symlink("/dev/zero", os.path.join(tok, "tokenizer.json"))
    os.remove(os.path.join(fifo, "generation_config.json"))
    os.mkfifo(os.path.join(fifo, "generation_config.json"))
    p = _script("""
        import sys
        import transformers
        transformers.utils.logging.disable_progress_bar()
        from moe2dense_ray.core.errors import UserError
        from moe2dense_ray.core.models import load_causal_lm, load_tokenizer
        for load, path in ((load_causal_lm, sys.argv[1]), (load_tokenizer, sys.argv[2]), (load_causal_lm, sys.argv[3])):
            try:
                load(path)
                print("LOADED", flush=True)
            except UserError as e:
                print("ERROR", e, flush=True)
        """, config, tok, fifo, timeout=90, memory=8 << 30)
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0 and len(lines) == 3, (p.stdout, p.stderr[-3000:])
    assert lines[0] == f"ERROR {config}/config.json is not a regular file", lines
    assert lines[1] == f"ERROR {tok}/tokenizer.json is not a regular file", lines
    assert lines[2] == f"ERROR {fifo}/generation_config.json is not a regular file", lines


# -- 5. an embedded Ray that calibrate started is shut down however it ends ------------------------


def test_embedded_ray_is_shut_down_on_error_and_on_interrupt(tmp_path):
    broken = shutil.copytree(assets.teacher_path(), tmp_path / "broken")
    _drop_router(str(broken))
    p = _script("""
        import sys
        import psutil
        import ray
        from moe2dense_ray.convert import calibrate as C
        from moe2dense_ray.core.config import CalibrateConfig
        from moe2dense_ray.core.errors import UserError

        broken, good, data = sys.argv[1:4]

        def ray_processes():
            return sorted(p.name() for p in psutil.Process().children(recursive=True)
                          if p.status() != psutil.STATUS_ZOMBIE)

        try:
            C.calibrate(CalibrateConfig(src=broken, data=data, samples=2, seq_len=16, workers=1), progress=False)
            print("NO ERROR")
        except UserError as e:
            print("ERROR", e)
        print("AFTER ERROR", ray.is_initialized(), ray_processes(), flush=True)

        class Interrupted:  # Ctrl-C as the first part comes back from a replica
            def __init__(self, *args, **kwargs):
                pass

            def update(self, n):
                raise KeyboardInterrupt

            def close(self):
                pass

        C.Progress = Interrupted
        try:
            C.calibrate(CalibrateConfig(src=good, data=data, samples=2, seq_len=16, workers=1), progress=False)
            print("NO INTERRUPT")
        except KeyboardInterrupt:
            print("INTERRUPTED")
        print("AFTER INTERRUPT", ray.is_initialized(), ray_processes(), flush=True)
        """, broken, assets.teacher_path(), DATA, timeout=150)
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0 and len(lines) == 4, (p.stdout, p.stderr[-3000:])
    assert lines[0].startswith("ERROR ") and "missing model.layers.0.mlp.gate.weight" in lines[0], lines
    assert lines[1] == "AFTER ERROR False []", lines
    assert lines[2] == "INTERRUPTED", lines
    assert lines[3] == "AFTER INTERRUPT False []", lines


def test_a_killed_driver_leaves_no_ray_process_after_10_s(tmp_path):
    """SIGKILL, which no handler sees, once the embedded Ray is up (GCS, raylet, its agents, a
    worker): within 10 s nothing of that Ray is left (its two agents alone used to outlive the
    driver by a minute), nor the watchdog that ends them, nor anything else in the driver's session."""
    import psutil

    cmd = [sys.executable, "-m", "moe2dense_ray.cli", "-q", "calibrate", assets.teacher_path(), "--data", DATA,
           "--samples", "64", "--seq-len", "256", "--batch-size", "1", "--workers", "1", "--full-stats",
           "--out", str(tmp_path / "stats")]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ray, watchdog = [], []
    try:
        driver, deadline = psutil.Process(proc.pid), time.monotonic() + 120
        while not (_ray_is_up(ray := _tree(driver)) and (watchdog := _watchdogs(ray))):  # ensure_ray has returned
            assert proc.poll() is None and time.monotonic() < deadline, "the embedded Ray did not come up"
            time.sleep(0.2)
        assert len(watchdog) == 1
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        _, left = psutil.wait_procs(ray + watchdog, timeout=10)
        assert not left, [(p.pid, _cmdline(p)) for p in left]
        session = [p for p in psutil.process_iter() if _session(p) == proc.pid]
        assert session == [], [(p.pid, _cmdline(p)) for p in session]
        print(f"the killed driver's Ray was gone in {time.monotonic() - t0:.1f} s")
    finally:  # whatever a failure left behind
        for p in [*_tree_or_none(proc), *ray, *watchdog]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def _watchdogs(ray) -> list:
    import psutil

    pids = {str(p.pid) for p in ray}
    return [p for p in psutil.process_iter() if "moe2dense_ray.core.watchdog" in _cmdline(p) and pids & set(_cmdline(p))]


def _ray_is_up(processes) -> bool:
    """Ray's GCS, raylet, both agents and a worker process (Ray starts idle workers for a new driver)."""
    names = [" ".join(_cmdline(p)) for p in processes]
    workers = [n for n in names if n.startswith("ray::") and not n.endswith("Agent")]
    return bool(workers) and all(any(k in n for n in names)
                                 for k in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent"))


def _cmdline(p) -> list[str]:
    import psutil

    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def _tree(p) -> list:
    import psutil

    try:
        return [c for c in p.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


def _tree_or_none(proc) -> list:
    import psutil

    try:
        driver = psutil.Process(proc.pid)
        return [driver, *_tree(driver)]
    except psutil.NoSuchProcess:
        return []


def _session(p) -> int | None:
    try:
        return os.getsid(p.pid)
    except OSError:
        return None


def _nan_eps(src):
    _edit_config(src, rms_norm_eps=float("nan"))


@pytest.mark.parametrize("case, fragment", [
    (_integer_weights, "q_proj.weight is stored as int32"),
    (_nan_eps, "config.json: rms_norm_eps is nan, not a finite number"),
])
def test_build_refuses_what_calibrate_refuses(teacher, tmp_path, capsys, case, fragment):
    """A plan made before the checkpoint broke: `build` must not copy integer weights or a NaN
    config into a student (it used to)."""
    plan = tmp_path / "plan.json"
    assert main(["-q", "calibrate", teacher, "--data", DATA, "--samples", "2", "--seq-len", "16", "--workers", "0",
                 "--out", str(tmp_path / "stats")]) == 0
    assert main(["-q", "plan", str(tmp_path / "stats"), "--experts", "4", "--out", str(plan)]) == 0
    case(teacher)
    _one_error(capsys, main(["-q", "build", teacher, str(plan), "--out", str(tmp_path / "dense")]), fragment)
    assert not (tmp_path / "dense").exists()
