"""Checkpoints and data that ship inside the package.

* ``teacher_path()``: a small Qwen3-MoE (4 layers, 16 experts, top-4) trained from scratch on
  Shakespeare + the King James Bible; the default teacher of the demo and examples.
* ``dense_peer_path()``: a dense Qwen3 with about the teacher's total parameter count, trained
  the same way; the starting point of the dense-to-dense baseline.
* ``calibration_path()``: a ~280 KB JSONL sample (``{"text", "source", "doc"}`` per line) of the
  validation split, for calibration/scoring in the demo.
* ``heldout_path()``: a sample of the same size and form from the test split, on which the demo
  and the benchmarks measure perplexity (never the text a plan was scored on).
* ``train_path()``: a gzipped ~4.4 MB (about 1.1M tokens) sample of the train split in the same
  form, the text the demo and the benchmarks distill students on.

Each checkpoint folder holds bf16 safetensors, the byte-level BPE tokenizer, a ``README.md``
model card and ``training_report.json``. Regenerate them with ``scripts/train_teacher.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import UserError

ASSETS_DIR = Path(__file__).resolve().parent
TEACHER_NAME = "teacher-qwen3moe"
DENSE_PEER_NAME = "dense-qwen3"

__all__ = ["ASSETS_DIR", "teacher_path", "dense_peer_path", "calibration_path",
           "heldout_path", "train_path", "load_calibration", "training_report"]


def _existing(path: Path) -> str:
    if not path.exists():
        raise UserError(
            f"{path} is missing; regenerate the shipped assets with `python scripts/train_teacher.py`")
    return str(path)


def teacher_path() -> str:
    """Directory of the shipped Qwen3-MoE teacher (loadable with ``from_pretrained``)."""
    return _existing(ASSETS_DIR / TEACHER_NAME)


def dense_peer_path() -> str:
    """Directory of the shipped dense Qwen3 peer (same data, tokenizer and training recipe)."""
    return _existing(ASSETS_DIR / DENSE_PEER_NAME)


def calibration_path() -> str:
    """JSONL calibration sample drawn from the validation split (both corpora)."""
    return _existing(ASSETS_DIR / "calibration.jsonl")


def heldout_path() -> str:
    """JSONL sample of the test split, for measuring perplexity of teachers and students."""
    return _existing(ASSETS_DIR / "heldout.jsonl")


def train_path() -> str:
    """Gzipped JSONL sample of the train split (the teacher's own training text), for distillation."""
    return _existing(ASSETS_DIR / "train.jsonl.gz")


def load_calibration(source: str | None = None, limit: int | None = None) -> list[str]:
    """Texts of the calibration sample, optionally only ``"shakespeare"`` or ``"bible"``."""
    out = []
    with open(calibration_path(), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if source is None or row.get("source") == source:
                out.append(row["text"])
                if limit is not None and len(out) >= limit:
                    break
    return out


def training_report(name: str = TEACHER_NAME) -> dict:
    """The ``training_report.json`` of a shipped checkpoint."""
    with open(Path(_existing(ASSETS_DIR / name)) / "training_report.json") as f:
        return json.load(f)
