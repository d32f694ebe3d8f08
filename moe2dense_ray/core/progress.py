"""Progress bars for long stages (tokens and layers, rate, time left), via tqdm on stderr."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def Progress(total: int, desc: str, *, unit: str = "it", enabled: bool = True) -> tqdm:
    """A tqdm bar that shows count, rate and ETA; silent when disabled (tests, Ray workers).

    Redrawn twice a second on a terminal; written to a log file or `ray job logs` (no TTY, so
    every redraw is kept) at most every 30 s, which still shows rate and time left.
    """
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "tok", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5 if tty else 30.0)
