"""The embedded Ray's processes end with the driver that started them, however it ends.

`ray.init` ties the Ray it starts to its driver: GCS, raylet, dashboard and log monitor die with
it (the kernel kills them when it dies), and the workers follow their raylet within about two
seconds. Not the raylet's two agents (dashboard agent, runtime-env agent): they notice at once,
then spend a minute failing to tell the dead GCS about it before they exit. A SIGKILLed driver
(the OOM killer, `kill -9`, a job scheduler's hard stop) left them for that minute.

So `ray_session.ensure_ray` starts this watchdog beside an embedded Ray with the Ray processes it
started. The watchdog is not the driver's child (it forks away, in its own session, so neither
the driver's process tree nor a terminal's Ctrl-C includes it); it holds the read end of a pipe
whose write end only the driver holds, and follows the processes' descendants (new workers) as
they come. When the driver is gone (the pipe's end of file), whatever of them is still running
gets SIGTERM, then SIGKILL a second later. It exits with its Ray: at once when Ray was shut down
normally, and about two seconds after a killed driver.

    python -m moe2dense_ray.core.watchdog FD PID [PID ...]
"""

from __future__ import annotations

import os
import select
import signal
import sys

POLL_S = 0.5  # how often the guarded processes' new children are picked up
GRACE_S = 1.0  # a process gets this long to end after SIGTERM


def main(argv: list[str]) -> None:
    fd, pids = int(argv[0]), [int(p) for p in argv[1:]]
    if os.fork():  # the parent returns to the driver, which reaps it; the watchdog is nobody's child
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    guarded = _alive([_process(p) for p in pids])
    while guarded:
        ready, _, _ = select.select([fd], [], [], POLL_S)
        if ready and not os.read(fd, 1):  # end of file: the driver has gone
            _end(guarded)
            return
        guarded = _alive(guarded + [c for p in guarded for c in _children(p)])


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)  # remembers its start time: a reused pid is not the same process
    except psutil.NoSuchProcess:
        return None


def _children(p) -> list:
    import psutil

    try:
        return p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(processes: list) -> list:
    import psutil

    seen, out = set(), []
    for p in processes:
        if p is None or p.pid in seen:
            continue
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                seen.add(p.pid)
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _end(processes: list) -> None:
    """SIGTERM, then SIGKILL what is left a moment later. (A driver that exited normally has shut
    its Ray down before it closed the pipe: then nothing is left.)"""
    import psutil

    alive = _alive(processes)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in alive:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=GRACE_S)
        if not alive:
            return


if __name__ == "__main__":
    main(sys.argv[1:])
