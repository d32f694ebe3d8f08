"""Progress bars for long stages (tokens and layers, rate, time left), via tqdm on stderr."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def Progress(total: int, desc: str, *, unit: str = "it", enabled: bool = True) -> tqdm:
    """A tqdm bar that shows count, rate and ETA; silent when disabled (tests, Ray workers)."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "tok", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
