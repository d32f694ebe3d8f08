"""`ray job submit` against a real Ray head: the way users run moe2dense on a cluster.

A head is started on loopback with the custom resources the cluster YAMLs declare (`teacher`,
`student`), in its own temp dir and on its own ports, so it never touches the session's Ray.
The job configs of jobs/ are submitted as shipped with jobs/runtime_env.yaml (the working tree
travels with the job), with only the outputs pointed at this test's directory as fsspec URLs:
a conversion, then a short distillation of its student. Each must reach SUCCEEDED and leave a
complete output; the head is stopped (its whole process group) however the test ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.dirname(sys.executable)
JOB_TIMEOUT_S = 420


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")  # the job's `moe2dense` is this environment's
    env["RAY_AUTH_MODE"] = "token"  # recent Ray heads expect the token `ray start` writes
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def head():
    """A Ray head on loopback (2 CPUs, teacher=2, student=1); yields the dashboard address."""
    temp = tempfile.mkdtemp(prefix="m2d", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, dash, agent, client, grpc, renv, metrics = _free_ports(7)
    proc = subprocess.Popen(
        [os.path.join(BIN, "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--num-cpus", "2", "--num-gpus", "0",
         "--resources", json.dumps({"teacher": 2, "student": 1}), "--temp-dir", temp,
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(grpc), "--ray-client-server-port", str(client),
         "--runtime-env-agent-port", str(renv), "--metrics-export-port", str(metrics),
         "--disable-usage-stats"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
            try:
                _client(address).list_jobs()
                break
            except Exception as e:  # noqa: BLE001 - not up yet: refused, no token yet, 5xx
                if time.monotonic() > deadline:
                    pytest.fail(f"the head's job server did not come up: {e}")
            time.sleep(1)
        yield address
    finally:
        # the head's processes, and whatever they started in sessions of their own (the jobs'
        # entrypoints), are found by the head's temp dir; a graceful `ray stop` of the block took
        # 34 s, and nothing of this throwaway head needs to be kept
        _kill_head(proc, temp)
        shutil.rmtree(temp, ignore_errors=True)


def _kill_head(proc: subprocess.Popen, temp: str) -> None:
    import psutil

    def theirs() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline", "pid"]):
            try:
                if p.info["pid"] != os.getpid() and any(temp in a for a in p.info["cmdline"] or ()):
                    found.append(p)
            except (psutil.Error, TypeError):
                pass
        return found

    group = [*theirs(), *psutil.Process(proc.pid).children(recursive=True)]
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in group:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait()
    psutil.wait_procs(group, timeout=10)
    assert not [p for p in theirs() if p.status() != psutil.STATUS_ZOMBIE]


def _ray(args: list[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([os.path.join(BIN, "ray"), *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    r.stdout = r.stdout + r.stderr
    if check and r.returncode != 0:
        pytest.fail(f"ray {' '.join(args[:2])} exited {r.returncode}: {r.stdout[-3000:]}")
    return r


def _client(address: str):
    """The job server's Python client, with the head's token where Ray's CLI looks for it: the
    RAY_AUTH_TOKEN variable, else the file RAY_AUTH_TOKEN_PATH names, else the one `ray start`
    writes (~/.ray/auth_token)."""
    from ray.job_submission import JobSubmissionClient

    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        with open(os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")) as f:
            token = f.read()
    return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token.strip()}"})


def _submit_and_wait(address: str, entrypoint: list[str]) -> str:
    """Submit from the repository root with jobs/runtime_env.yaml, as a user does; wait for a final
    state. The job is watched through the job server's own client, in this process: a `ray job
    status` every few seconds started a Python process each time (about a second of CPU on the 2
    cores the job itself runs on)."""
    from ray.job_submission import JobStatus

    job = f"moe2dense-test-{uuid.uuid4().hex[:8]}"
    _ray(["job", "submit", "--address", address, "--submission-id", job, "--no-wait",
          "--runtime-env", "jobs/runtime_env.yaml", "--", *entrypoint])
    client = _client(address)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            client.stop_job(job)
            pytest.fail(f"job {job} did not finish in {JOB_TIMEOUT_S} s: {status}")
        time.sleep(1)
    return status.name + "\n" + client.get_job_logs(job)


def test_the_environments_build_tools_come_first():
    from moe2dense_ray.distill.worker import own_build_tools_first

    bindir = os.path.dirname(sys.executable)
    assert os.path.exists(os.path.join(bindir, "ninja"))  # pip's, installed with DeepSpeed
    assert own_build_tools_first("/usr/bin:/bin") == f"{bindir}:/usr/bin:/bin"
    assert own_build_tools_first(f"{bindir}:/usr/bin") == f"{bindir}:/usr/bin"  # already first: as it was
    assert own_build_tools_first("") == bindir


def _cpu_op() -> str | None:
    """DeepSpeed's CPU communication op as install.sh builds it (moe2dense_ray.distill.worker.
    build_cpu_op), built now if it is not yet; None on a machine with a GPU, which needs none."""
    import torch
    from torch.utils.cpp_extension import _get_build_directory

    from moe2dense_ray.distill.worker import build_cpu_op

    if torch.cuda.is_available():
        return None
    build_cpu_op()
    return os.path.join(_get_build_directory("deepspeed_shm_comm", False), "deepspeed_shm_comm.so")


def test_convert_then_distill_as_ray_jobs(head, tmp_path):
    from safetensors import safe_open

    dense, run = tmp_path / "dense", tmp_path / "run"
    result = _submit_and_wait(head, ["moe2dense", "convert", "--config", "jobs/convert.yaml",
                                     "--out", f"file://{dense}", "--samples", "16", "--seq-len", "128"])
    assert result.startswith("SUCCEEDED"), result[-4000:]
    assert "wrote" in result and (dense / "config.json").exists()
    for shard in dense.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            assert all(f.get_tensor(k).isfinite().all() for k in f.keys())

    op = _cpu_op()
    built = os.stat(op).st_mtime_ns if op else None
    result = _submit_and_wait(head, ["moe2dense", "distill", "--config", "jobs/distill.yaml", "--student", str(dense),
                                     "--out", f"file://{run}", "--tokens", "4096", "--seq-len", "128",
                                     "--batch-size", "4", "--top-k", "32", "--val-blocks", "4", "--report-every", "2",
                                     "--checkpoint-every", "4"])
    assert result.startswith("SUCCEEDED"), result[-4000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["tokens"] == 4096 and metrics[-1]["val_ppl"] < metrics[0]["val_ppl"]
    assert (run / "student" / "config.json").exists()
    # the job's training worker used that build, not a compile of its own (33 s on 2 cores): the
    # job's runtime env, the head's PATH and the worker's own agree on the cache and on the ninja
    assert op is None or os.stat(op).st_mtime_ns == built
