"""Shared fixtures: one local Ray cluster per test session, tiny tokenizer and calibration text."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _loopback_s3() -> socket.socket:
    """A listening loopback socket for the S3 server of tests/test_s3.py, and the environment
    that points s3fs (botocore) at it with throwaway credentials. Set here, at import: Ray's
    workers inherit the environment of the process that starts Ray, and the session's Ray is
    started once, before any module fixture runs. Holding the socket from now on means no
    other process can take the port in between."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{sock.getsockname()[1]}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        os.environ.pop(name, None)  # a developer's own AWS identity never reaches the test server
    return sock


_S3_SOCKET = _loopback_s3()
# remote checkpoints are cached per node (nodecache.py): the session's own cache, not the user's
os.environ["MOE2DENSE_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="moe2dense-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

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
def loopback_s3_socket() -> socket.socket:
    """The listening socket that AWS_ENDPOINT_URL names (tests/test_s3.py serves S3 on it)."""
    return _S3_SOCKET


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for the whole session: starting Ray costs ~7 s."""
    import ray

    from moe2dense_ray.core.ray_session import EMBEDDED_RAY_ENV

    os.environ.update(EMBEDDED_RAY_ENV)  # inherited by the session Ray's processes, as ensure_ray does
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
