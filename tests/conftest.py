"""Shared fixtures: one local Ray cluster per test session, tiny tokenizer and calibration text."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402
import transformers  # noqa: E402
from helpers_tokenizer import _TRAIN_WORDS  # noqa: E402

transformers.utils.logging.disable_progress_bar()

WORDS = _TRAIN_WORDS[:30]  # the tokenizer's first two lines


def write_corpus(path, docs: int = 40, words: int = 120, seed: int = 0) -> str:
    """Deterministic pseudo-English jsonl: enough tokens for several calibration blocks."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    from helpers_tokenizer import make_tiny_tokenizer

    return make_tiny_tokenizer(vocab_size=96)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "calib.jsonl")


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for the whole session: starting Ray costs ~7 s."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
