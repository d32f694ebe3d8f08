"""Whether a distillation left its student better than it found it.

Losses can stay finite while the student is wrecked (`--lr 1e9`: weights of 1e9, a uniform
distribution over the vocabulary, a finite loss), so a run is judged by what it reports: a
collapse to uniform at any report ends it there (worker.py), and ending worse than at step 0 is
found once it is done (driver.py). Either way the student is kept as RUN/diagnostic-student, never
announced as the result, and the run ends in one line that names the likely cause.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import UserError
from ..core.storage import url_to_fs

UNIFORM = 0.9  # held-out perplexity at this fraction of the vocabulary or above: the student predicts ~nothing
WORSE = 1.01  # ending above the step-0 value by more than this factor: training made the student worse
DIAGNOSTIC = "diagnostic-student"  # where a rejected student is kept, never announced as the result


def collapsed(ppl: float, vocab: int) -> bool:
    return bool(vocab) and ppl >= UNIFORM * vocab


def collapse(ppl: float, step: int, vocab: int) -> str:
    return (f"the student collapsed to a uniform distribution (held-out perplexity {ppl:.1f} at step {step}, "
            f"against {vocab} tokens in its vocabulary)")


def wrecked(cfg, what: str, steps: int | None = None) -> UserError:
    """The one line for a student that training wrecked, `what` saying how. With the run's
    `steps`, the warm-up is said in steps too: the fraction rounds down, so a run of 4 steps at
    the default 0.05 has none, and raising it a little changes nothing."""
    warmup = f"{cfg.warmup:g}" + (f": {cfg.warmup_steps(steps)} of {steps} steps" if steps else "")
    return UserError(f"{what}: the learning rate is likely too high for this student; lower --lr (was {cfg.lr:g}) "
                     f"or raise --warmup (was {warmup}). The student is kept in {cfg.out}/{DIAGNOSTIC} "
                     f"to look at, not as the result")


def check_outcome(cfg, metrics: list[dict[str, Any]], vocab: int) -> None:
    """The finished run's verdict from its reports: a collapse at any report, or held-out
    perplexity or KL to the teacher above their step-0 values at the end, moves RUN/student to
    RUN/diagnostic-student and raises `wrecked`."""
    reports = [m for m in metrics if isinstance(m.get("val_ppl"), (int, float))]
    if len(reports) < 2:
        return
    first, last = reports[0], reports[-1]
    fallen = next((m for m in reports[1:] if collapsed(m["val_ppl"], vocab)), None)
    worse = [k for k in ("val_ppl", "val_kl") if k in first and k in last and last[k] > WORSE * first[k]]
    if fallen is None and not worse:
        return
    if fallen is not None:
        what = collapse(fallen["val_ppl"], fallen["step"], vocab)
    else:
        what = "training made the student worse (" + ", ".join(
            f"{'held-out perplexity' if k == 'val_ppl' else 'KL to the teacher'} {first[k]:.4g} at step 0, "
            f"{last[k]:.4g} at the end" for k in worse) + ")"
    fs, path = url_to_fs(cfg.out)
    if fs.exists(f"{path}/{DIAGNOSTIC}"):
        fs.rm(f"{path}/{DIAGNOSTIC}", recursive=True)
    fs.mv(f"{path}/student", f"{path}/{DIAGNOSTIC}", recursive=True)
    raise wrecked(cfg, what, last.get("steps"))
