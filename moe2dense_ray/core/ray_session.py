"""Ray, started or joined once, and asked only for what it can give.

Every stage that runs on Ray (calibrate, teacher-logits, distill) goes through this module:

- `ensure_ray` joins the cluster named by RAY_ADDRESS (`ray job submit` sets it) or starts an
  embedded local Ray; a Ray that cannot start (a full disk, an unwritable temp directory) or a
  cluster that cannot be reached is one `UserError` line, not Ray's traceback;
- `require_resources` compares what the run will ask for with what the cluster has *before* any
  actor is created (for an embedded Ray, before Ray starts: `cluster_resources`). An embedded Ray
  never grows, so a request it cannot meet would wait forever: that is an error naming the flags
  to lower. A cluster (RAY_ADDRESS) may grow under an
  autoscaler, so there the driver says what it is waiting for and gives up after
  `MOE2DENSE_RESOURCE_TIMEOUT` seconds (default 600).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from typing import Callable
import threading
import time
import warnings

from .errors import UserError

RESOURCE_TIMEOUT = 600.0  # seconds a cluster gets to grow to a run's size
RESOURCE_TIMEOUT_ENV = "MOE2DENSE_RESOURCE_TIMEOUT"
RAY_ADDRESS_ENV = "RAY_ADDRESS"  # set by `ray job submit`: the cluster to join
_POLL_S = 1.0
_LOW_DISK = 512 << 20  # below this, a failed start is most likely the disk


def on_cluster() -> bool:
    """Whether this driver joins a cluster (which an autoscaler may grow) rather than an embedded Ray."""
    return bool(os.environ.get(RAY_ADDRESS_ENV))


def first_line(e: BaseException | str) -> str:
    """The first non-empty line of an exception's message, whitespace collapsed."""
    text = e if isinstance(e, str) else str(e)
    for line in text.splitlines():
        if line.strip():
            return " ".join(line.split())
    return "" if isinstance(e, str) else type(e).__name__


CPU_SHARING_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
"""The environment of the processes that share a node's cores (teacher replicas, training workers,
calibration actors): an OpenMP thread with nothing to do sleeps instead of spinning for the next
parallel region. Spinning threads of one process steal the cores another is computing on; with
a teacher and a student on the same 2 cores the student trained at a third of its speed; with this
0.8M tokens of `moe2dense distill` take 1.0-1.4x a plain single-process loop's time
(docs/results/distill.md)."""

EMBEDDED_RAY_ENV = {**CPU_SHARING_ENV, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
"""The environment of an embedded Ray's processes: CPU_SHARING_ENV, and two settings of Ray Train's
controller. It polls its workers every 0.2 s instead of 2 s: a report that carries a checkpoint
waits for the controller's next poll, and so does the end of a run; on one machine, with the
bundled teacher, a 12-step run with 3 checkpoints took 31 s with Ray's default and 20 s with this
(the poll is one actor call per worker). And it starts no preemption watcher, an actor (one more
process to start on the run's cores) that asks Ray every 5 s whether a node is being drained: the
one node of an embedded Ray is the driver's own, and goes with it. A cluster keeps Ray's defaults."""


VERBOSE_ENV = "MOE2DENSE_VERBOSE"  # set by `moe2dense --verbose`: Ray's own lines on the console too


def quiet_console() -> None:
    """Keep Ray's log lines (INFO start-up notes, Ray Data's progress paths, deprecation notices)
    off this process's console unless MOE2DENSE_VERBOSE is set: their handlers that write to a
    terminal only pass errors. Their log files, and every Ray process's own files, keep it all."""
    import logging

    if os.environ.get(VERBOSE_ENV):
        return
    import ray.data  # noqa: F401 - configures its loggers on import; adjust them after

    for name in ("ray", "ray.data", "ray.train", "ray.tune"):  # (DeepSpeed logs only in the workers' files)
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)


@contextlib.contextmanager
def muted(name: str):
    """Logger `name` silent on every handler while the block runs, unless MOE2DENSE_VERBOSE is
    set: for a library's error reports that this package reports in its own words (a sweep's
    failed trial is a leaderboard row with its one line; Tune would print a traceback per try)."""
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    if not os.environ.get(VERBOSE_ENV):
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Connect to the cluster (`ray job submit` sets RAY_ADDRESS) or start an embedded local Ray.

    Returns whether this call started (or joined) Ray, i.e. whether the caller should shut it down
    when it fails; False when Ray was already initialised by someone else.
    """
    import ray

    if ray.is_initialized():
        return False
    quiet_console()
    address = os.environ.get(RAY_ADDRESS_ENV) or None
    sigterm = signal.getsignal(signal.SIGTERM)
    before = set() if address else _descendants()
    try:
        # an embedded Ray is an implementation detail: its start-up chatter would break the bars,
        # and nothing here reads its dashboard. "local" starts one even when other Ray instances
        # run on this machine
        start = {} if address else {"num_cpus": num_cpus, "include_dashboard": False}
        if not address:  # inherited by every process of the embedded Ray (a job runtime_env would
            for k, v in EMBEDDED_RAY_ENV.items():  # give its workers another start-up path)
                os.environ.setdefault(k, v)
        ray.init(address=address or "local", log_to_driver=False, ignore_reinit_error=True,
                 logging_level="INFO" if address else "ERROR", **start)
    except SystemExit:  # Ray's own SIGTERM handler, installed during init, exits: it was an interrupt
        if callable(sigterm):
            raise KeyboardInterrupt from None
        raise
    except Exception as e:  # noqa: BLE001 - Ray reports start-up failures as many types
        try:
            ray.shutdown()  # whatever half-started processes there are
        except Exception:  # noqa: BLE001
            pass
        if address:
            raise UserError(f"cannot connect to the Ray cluster at {address} (RAY_ADDRESS): "
                            f"{first_line(e)}") from None
        raise UserError(f"cannot start Ray: {first_line(e)}{_disk_hint()}") from None
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        # Ray's core replaces the program's SIGTERM handler with one that dumps a native stack and
        # aborts; the CLI's own (clean up, one error line) must stay in charge
        signal.signal(signal.SIGTERM, sigterm)
    if not address:
        _watch(_descendants() - before)
    if not os.environ.get(VERBOSE_ENV):
        _spend_restart_warning()
    return True


class _NeverPlaced:
    def __init__(self, arg) -> None:
        pass


def _spend_restart_warning() -> None:
    """Ray's core logs "Actor ... has constructor arguments in the object store and max_restarts >
    0 ... the actor restart will fail" (ray-project/ray#53727) straight to this process's stderr,
    past any Python filter, the first time in a process that it creates a restartable actor whose
    arguments are object references: each Ray Data actor pool (`teacher-logits`, a sweep's stream;
    Ray Data holds its transform until the dataset ends) and the distillation's `TeacherPool`
    (which holds its id order for the run). The warning is true of neither, and Ray prints it once
    per process, so it is spent here on an actor that asks for a resource no node has and is killed
    at once, with stderr pointed at /dev/null for that one call. Ray's log file of this driver
    still records it; `--verbose` leaves it alone. Cosmetic: whatever fails here is ignored."""
    import ray

    try:
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no stderr to keep clean
        return
    actor = None
    try:
        os.dup2(null, 2)
        actor = ray.remote(_NeverPlaced).options(max_restarts=1, num_cpus=0,
                                                 resources={"moe2dense-never-placed": 1}).remote(ray.put(None))
    except Exception:  # noqa: BLE001 - the line is cosmetic, the run is not
        pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    if actor is not None:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001
            pass


def ensure_ray_after(check: Callable[[], None]) -> bool:
    """`ensure_ray`, with `check()` (a resource check) first: a cluster is joined before it, since
    what a cluster has is its own to say; an embedded Ray's resources are known before it starts
    (`cluster_resources`), so a run it could never hold is refused without starting it."""
    started = ensure_ray() if on_cluster() else False
    check()
    return ensure_ray() or started


_WATCHED: list[int] = []  # the write ends of the watchdogs' pipes: open until this process ends


def _descendants() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _watch(pids: set[int]) -> None:
    """Start `moe2dense_ray.core.watchdog` for the processes an embedded Ray start made: they end
    with this process however it ends, a SIGKILL included (see there for why Ray's own ties
    are not enough)."""
    import subprocess
    import sys

    if not pids:
        return
    read, write = os.pipe()  # neither end is inherited by what this process starts later
    try:
        watchdog = subprocess.Popen([sys.executable, "-m", "moe2dense_ray.core.watchdog", str(read), *map(str, sorted(pids))],
                                    pass_fds=(read,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        failed = watchdog.wait() != 0  # it forks away at once: what stays is not this process's child
    except OSError:
        failed = True
    finally:
        os.close(read)
    if failed:
        os.close(write)
        warnings.warn("could not start the embedded Ray's watchdog: if this process is killed, Ray's agents "
                      "outlive it by about a minute", stacklevel=3)
        return
    _WATCHED.append(write)


def _disk_hint() -> str:
    """Why Ray most often fails to start on a machine that otherwise works: its temp dir's disk."""
    tmp = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    try:
        free = shutil.disk_usage(tmp).free
    except OSError:
        return ""
    if free < _LOW_DISK:
        return f" ({tmp} has only {free >> 20} MiB free: Ray keeps its sessions and spilled objects there)"
    return ""


def resource_timeout() -> float:
    """Seconds to wait for a cluster to grow (MOE2DENSE_RESOURCE_TIMEOUT, default 600)."""
    text = os.environ.get(RESOURCE_TIMEOUT_ENV)
    if not text:
        return RESOURCE_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise UserError(f"{RESOURCE_TIMEOUT_ENV}={text!r} is not a number of seconds")
    return value


def cluster_resources() -> dict[str, float]:
    """The cluster's resources: Ray's own account once Ray is up; before an embedded Ray starts,
    what it will start with on this machine (Ray's own count of its CPUs and GPUs), so that a run
    it could never hold is refused in the time it takes to read the flags, not after Ray's start."""
    import ray

    if ray.is_initialized() or on_cluster():
        return ray.cluster_resources()
    return _embedded_resources()


def _embedded_resources() -> dict[str, float]:
    from ray._private.accelerators import get_accelerator_manager_for_resource
    from ray._private.utils import get_num_cpus

    gpus = get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
    return {"CPU": float(get_num_cpus()), **({"GPU": float(gpus)} if gpus else {})}


def _nodes() -> list[dict[str, float]]:
    import ray

    if ray.is_initialized() or on_cluster():
        return [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive", n.get("alive"))]
    return [_embedded_resources()]


def _shortfall(need: dict[str, float], each: list[dict[str, float]]) -> list[tuple[str, str]]:
    """What the cluster lacks, as (what to wait for, what the cluster has) pairs: totals, and a
    node big enough for each kind of actor (an actor is never split over nodes)."""
    have = cluster_resources()
    short = [(f"{v:g} {_plural(k, v)}", f"the cluster has {float(have.get(k, 0)):g}")
             for k, v in need.items() if v > 0 and v > have.get(k, 0) + 1e-9]
    if short:
        return short
    nodes = _nodes()
    for shape in each:
        shape = {k: v for k, v in shape.items() if v > 0}
        if shape and nodes and not any(all(node.get(k, 0) + 1e-9 >= v for k, v in shape.items()) for node in nodes):
            wanted = " and ".join(f"{v:g} {_plural(k, v)}" for k, v in shape.items())
            biggest = " and ".join(f"{max(float(n.get(k, 0)) for n in nodes):g} {_plural(k, 2)}" for k in shape)
            short.append((f"a node with {wanted} for one worker", f"no node has more than {biggest}"))
    return short


def _plural(k: str, n: float) -> str:
    return k if n == 1 else f"{k}s"


def require_resources(need: dict[str, float], *, who: str, advice: str, parts: str | None = None,
                      each: list[dict[str, float]] | tuple = (), custom_flags: str = "") -> None:
    """Fail (embedded Ray) or wait, then fail (a cluster), unless the cluster can hold the run.

    `need` maps Ray resources ("CPU", "GPU") to the total the run will ask for, and `each` lists
    what one actor of each kind asks for (it must fit on one node); `who` names the run, `parts`
    says what asks for the resources, `advice` what to lower ("lower --workers"), and
    `custom_flags` which flags set the custom resources, named instead when one is short.
    """
    short = _shortfall(need, list(each))
    if not short:
        return
    have = cluster_resources()
    custom = [k for k, v in need.items() if k not in ("CPU", "GPU") and v > have.get(k, 0) + 1e-9]
    if custom:  # custom resources (teacher, student) come from node types: lowering counts will not help
        advice = f"start nodes that declare {', '.join(custom)}"
        if custom_flags:
            advice += f", or change {custom_flags}"

    def message(short) -> str:
        items = " and ".join(f"{want} but {has}" for want, has in short)
        return f"{who} needs {items}{f' ({parts})' if parts else ''}: {advice}"

    if not on_cluster():
        raise UserError(message(short))
    timeout = resource_timeout()
    _ask_autoscaler(need, list(each))
    warnings.warn(f"waiting for {' and '.join(want for want, _ in short)} ({'; '.join(has for _, has in short)}; "
                  f"an autoscaler may add nodes), at most {timeout:g} s ({RESOURCE_TIMEOUT_ENV})", stacklevel=3)
    deadline = time.monotonic() + timeout
    try:
        while short:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UserError(f"{message(short)} (waited {timeout:g} s for the cluster to grow; "
                                f"{RESOURCE_TIMEOUT_ENV} sets how long)")
            time.sleep(min(_POLL_S, left))
            short = _shortfall(need, list(each))
    finally:
        _ask_autoscaler({}, [])  # from here the actors' own requests keep the nodes


def _ask_autoscaler(need: dict[str, float], each: list[dict[str, float]]) -> None:
    """Tell an autoscaler what the run is about to ask for: it adds nodes for pending demand,
    and nothing is pending while the driver only waits. An empty request withdraws it."""
    from ray.autoscaler.sdk import request_resources

    bundles = []
    for shape in each:
        shape = {k: float(v) for k, v in shape.items() if v > 0}
        if shape:  # as many of this actor as the totals allow
            count = min(int(need.get(k, 0) // v) for k, v in shape.items())
            bundles += [shape] * max(count, 1)
    gpus = int(need.get("GPU", 0)) - sum(int(b.get("GPU", 0)) for b in bundles)
    bundles += [{"GPU": 1.0}] * max(gpus, 0)
    try:
        request_resources(num_cpus=int(-(-need.get("CPU", 0) // 1)) if need else None, bundles=bundles or None)
    except Exception:  # noqa: BLE001 - a hint only: a cluster without an autoscaler need not take it
        pass


__all__ = ["ensure_ray", "ensure_ray_after", "require_resources", "cluster_resources", "muted", "on_cluster", "resource_timeout", "first_line",
           "RESOURCE_TIMEOUT", "RESOURCE_TIMEOUT_ENV"]
