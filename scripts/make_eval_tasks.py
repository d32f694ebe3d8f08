#!/usr/bin/env python
"""Generate the offline evaluation tasks shipped in ``moe2dense_ray/eval/tasks/`` from the bundled
held-out text (``moe2dense_ray/assets/heldout.jsonl``, a sample of the corpora's test split).

    python scripts/make_eval_tasks.py            # rewrites moe2dense_ray/eval/tasks/*.jsonl
    python scripts/make_eval_tasks.py --check    # exits 1 if the committed files differ

Deterministic: the same held-out file always gives byte-identical task files (no hashing of
Python objects, one seeded `random.Random` per item).

* ``next_line.jsonl``: multiple choice. The context is the text of a held-out passage up to a
  line; the four choices are the true next line and three lines of similar length drawn from
  *other* documents of the same corpus (so style alone does not give the answer away). A tiny
  model's raw likelihoods mostly rank how common a line is anywhere; `acc_mutual_info`
  (likelihood given the passage minus likelihood without it) measures the use of the passage.
* ``last_word.jsonl``: LAMBADA-style. The context is a passage up to (not including) the last
  word of one of its lines, and that word, which already occurred earlier in the passage, is the
  target: the model must recall it from the broader context. Scored by the log-likelihood of the
  word and by whether greedy decoding produces it exactly.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from moe2dense_ray import assets  # noqa: E402
from moe2dense_ray.eval.tasks import TASKS_DIR  # noqa: E402

SEED = 20240607
CONTEXT_CHARS = 400  # at most this much text before the line / word (cut at a line start)
MIN_CONTEXT = 150  # a passage with less context before the target is skipped
NEXT_LINE_PER_DOC = 1
LAST_WORD_PER_DOC = 2

_SPEAKER = re.compile(r"^[A-Z][A-Z0-9 .,'&-]*\.$")  # "CLOTEN.", "FIRST LORD."
_WORD_AT_LINE_END = re.compile(r"(?<= )([A-Za-z]{4,})[.,;:!?']*$")
# frequent words that are trivially recalled; the target should be a name or a content word
_COMMON = set("""
that with unto shall have they them their which will from this there were when what your thou thee
upon hath said made then than into also come came more these those been shalt thine thy hast doth
would could should like well know good here where some such even before after went every other
only over being very make must much many came said unto because among whom whose again away
""".split())


def _rows() -> list[dict]:
    with open(assets.heldout_path(), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _eligible_line(line: str) -> bool:
    s = line.strip()
    return 25 <= len(s) <= 200 and not _SPEAKER.match(s) and not s.startswith(("[", "ACT ", "SCENE "))


def _context(text: str, end: int) -> str | None:
    """The text before `end`, at most CONTEXT_CHARS of it, starting at the beginning of a line."""
    start = max(0, end - CONTEXT_CHARS)
    if start > 0:
        nl = text.find("\n", start, end)
        if nl < 0:
            return None
        start = nl + 1
    ctx = text[start:end]
    return ctx if len(ctx.strip()) >= MIN_CONTEXT else None


def _lines_with_offsets(text: str) -> list[tuple[int, str]]:
    out, pos = [], 0
    for line in text.split("\n"):
        out.append((pos, line))
        pos += len(line) + 1
    return out


def next_line_items(rows: list[dict]) -> list[dict]:
    pool: dict[str, list[tuple[str, str]]] = {}  # source -> [(doc, line)]
    for r in rows:
        for _, line in _lines_with_offsets(r["text"]):
            if _eligible_line(line):
                pool.setdefault(r["source"], []).append((r["doc"], line.strip()))
    items = []
    for k, r in enumerate(rows):
        rng = random.Random(f"next_line:{SEED}:{k}")
        text = r["text"]
        own = {line.strip() for _, line in _lines_with_offsets(text)}
        candidates = []
        for off, line in _lines_with_offsets(text):
            if not _eligible_line(line) or off == 0:
                continue
            ctx = _context(text, off)
            if ctx is not None:
                candidates.append((ctx, line.strip()))
        for ctx, target in rng.sample(candidates, min(NEXT_LINE_PER_DOC, len(candidates))):
            n = len(target)
            others = sorted({line for doc, line in pool[r["source"]]
                             if doc != r["doc"] and line not in own and 0.75 * n <= len(line) <= 1.33 * n})
            if len(others) < 3:
                continue
            # the newline before the line is the task's target_delimiter, so the unconditional
            # likelihoods of acc_mutual_info score the same text ("\n" + line) as the conditional ones
            items.append({"context": ctx[:-1], "choices": rng.sample(others, 3), "target": target,
                          "source": r["source"], "doc": r["doc"]})
    random.Random(f"next_line:{SEED}").shuffle(items)
    for j, it in enumerate(items):  # the true line's position cycles 0, 1, 2, 3: a model that always
        it["label"] = j % 4  # picks one position scores exactly 0.25 on any multiple of 4 examples
        it["choices"].insert(it["label"], it.pop("target"))
    return items


def last_word_items(rows: list[dict]) -> list[dict]:
    items = []
    for k, r in enumerate(rows):
        rng = random.Random(f"last_word:{SEED}:{k}")
        text = r["text"]
        candidates = []
        for off, line in _lines_with_offsets(text):
            m = _WORD_AT_LINE_END.search(line)
            if not m or m.group(1).lower() in _COMMON:
                continue
            word, at = m.group(1), off + m.start(1)
            ctx = _context(text, at - 1)  # the space before the word belongs to the target
            if ctx is not None and re.search(rf"\b{word}\b", ctx):
                candidates.append((ctx, word))
        for ctx, word in rng.sample(candidates, min(LAST_WORD_PER_DOC, len(candidates))):
            items.append({"context": ctx, "target": " " + word, "source": r["source"], "doc": r["doc"]})
    random.Random(f"last_word:{SEED}").shuffle(items)
    return items


def render(items: list[dict]) -> str:
    return "".join(json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n" for it in items)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = ap.parse_args()
    rows = _rows()
    outputs = {"next_line.jsonl": render(next_line_items(rows)), "last_word.jsonl": render(last_word_items(rows))}
    stale = []
    for name, text in outputs.items():
        path = Path(TASKS_DIR) / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
            continue
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}: {text.count(chr(10))} items, {len(text.encode()) / 1024:.0f} KB")
    if stale:
        print(f"stale: {', '.join(stale)} (run python scripts/make_eval_tasks.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
