"""Evaluation tasks shipped with the package, for lm-evaluation-harness, that need no network.

Each task is a YAML file here (lm_eval's task format, `dataset_path: json`) whose `data_files`
name JSONL files in this directory; `task_config(name)` returns it as a dict with those names
made absolute, so the task loads from any working directory. The JSONL files are generated
from the bundled held-out text by `scripts/make_eval_tasks.py` (deterministic; `--check` tells
whether the committed files are current).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TASKS_DIR = Path(__file__).resolve().parent


def shipped_tasks() -> list[str]:
    """Names of the shipped tasks (one YAML file each)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def task_config(name: str) -> dict[str, Any]:
    """The lm_eval config of shipped task `name`, its data files resolved to absolute paths."""
    path = TASKS_DIR / f"{name}.yaml"
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    files = cfg.get("dataset_kwargs", {}).get("data_files", {})
    for split, rel in files.items():
        files[split] = str(TASKS_DIR / rel)
    return cfg


__all__ = ["TASKS_DIR", "shipped_tasks", "task_config"]
