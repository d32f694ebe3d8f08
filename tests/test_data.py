"""Calibration text: every format reads the same documents, packing is exact, errors are UserErrors."""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers_tokenizer import make_tiny_tokenizer, make_word_tokenizer

from moe2dense_ray.core.data import CalibrationSet, calibration_blocks, load_texts
from moe2dense_ray.core.errors import UserError

DOCS = [
    "the quick brown fox jumps over a lazy dog",
    "seven wizards quietly judge boxing matches\nand kings of england sail rivers",  # internal newline
    "pale moons",
    "singing old songs of grace, 42 times!",
]


def write_txt(path: Path, docs: list[str] = DOCS) -> str:
    # extra blank/whitespace-only lines between documents and at both ends must not matter
    path.write_text("\n\n" + "\n\n  \n".join(docs) + "\n\n\n")
    return str(path)


def write_jsonl(path: Path, docs: list[str] = DOCS, field: str = "text") -> str:
    lines = [json.dumps({"id": i, field: d}) for i, d in enumerate(docs)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # a blank line is skipped
    return str(path)


def write_parquet(path: Path, docs: list[str] = DOCS, field: str = "text") -> str:
    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path, row_group_size=2)
    return str(path)


# ---------------------------------------------------------------------------------------------- formats


def test_every_format_loads_the_same_documents(tmp_path: Path) -> None:
    sources = {
        "txt": write_txt(tmp_path / "a.txt"),
        "jsonl": write_jsonl(tmp_path / "a.jsonl"),
        "parquet": write_parquet(tmp_path / "a.parquet"),
    }
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress((tmp_path / "a.jsonl").read_bytes()))
    sources["jsonl.gz"] = str(gz)
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"text": d} for d in DOCS], indent=2))
    sources["json array"] = str(arr)
    lines = tmp_path / "lines.json"
    lines.write_text((tmp_path / "a.jsonl").read_text())
    sources["json lines"] = str(lines)
    for kind, src in sources.items():
        assert list(load_texts(src)) == DOCS, kind


def test_directory_and_glob_read_supported_files_in_sorted_order(tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "b.jsonl", DOCS[1:3])
    write_txt(d / "a.txt", DOCS[:1])
    write_parquet(d / "sub" / "c.parquet", DOCS[3:])
    (d / "README.md").write_text("not data")  # other types and hidden files are skipped
    (d / ".hidden.txt").write_text("secret")
    assert list(load_texts(str(d))) == DOCS
    assert list(load_texts(str(d / "*.*"))) == DOCS[:3]
    assert list(load_texts(str(d / "*"))) == DOCS  # a matched directory is searched too


def test_txt_without_blank_lines_is_one_document(tmp_path: Path) -> None:
    p = tmp_path / "one.txt"
    p.write_text("line one\nline two\n")
    assert list(load_texts(str(p))) == ["line one\nline two"]


def test_null_and_empty_texts_are_skipped(tmp_path: Path) -> None:
    p = tmp_path / "n.jsonl"
    p.write_text('{"text": null}\n{"text": ""}\n{"text": "kept"}\n')
    assert list(load_texts(str(p))) == ["kept"]
    pq.write_table(pa.table({"text": [None, "kept", ""]}), tmp_path / "n.parquet")
    assert list(load_texts(str(tmp_path / "n.parquet"))) == ["kept"]


def test_custom_text_field(tmp_path: Path) -> None:
    assert list(load_texts(write_jsonl(tmp_path / "c.jsonl", field="content"), text_field="content")) == DOCS
    assert list(load_texts(write_parquet(tmp_path / "c.parquet", field="body"), text_field="body")) == DOCS


def test_memory_fsspec_url() -> None:
    root = f"memory://m2d-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    try:
        with fsspec.open(f"{root}/part-0.jsonl", "w") as f:
            f.write("\n".join(json.dumps({"text": d}) for d in DOCS[:2]) + "\n")
        with fsspec.open(f"{root}/part-1.parquet", "wb") as f:
            pq.write_table(pa.table({"text": DOCS[2:]}), f)
        assert list(load_texts(f"{root}/part-0.jsonl")) == DOCS[:2]
        assert list(load_texts(root)) == DOCS
        assert list(load_texts(f"{root}/*.parquet")) == DOCS[2:]
        tok = make_word_tokenizer(" ".join(DOCS).split())
        calib = calibration_blocks(root, tok, samples=2, seq_len=4, shuffle_buffer=0)
        assert calib.input_ids.shape == (2, 4) and calib.num_tokens == 8
    finally:
        fs.rm(root.removeprefix("memory://"), recursive=True)


# ---------------------------------------------------------------------------------------------- packing


def test_packing_gives_exact_hand_checked_ids(tmp_path: Path) -> None:
    tok = make_word_tokenizer(["a", "b", "c", "d", "e"])  # a=3 b=4 c=5 d=6 e=7, eos=1, pad=2
    src = write_txt(tmp_path / "p.txt", ["a b c", "d e", "a"])
    # stream: a b c <eos> d e <eos> a <eos>  -> 9 tokens
    full = calibration_blocks(src, tok, samples=2, seq_len=4, shuffle_buffer=0)
    assert full.input_ids.tolist() == [[3, 4, 5, 1], [6, 7, 1, 3]]
    assert full.attention_mask.tolist() == [[1] * 4, [1] * 4]
    assert full.input_ids.dtype == full.attention_mask.dtype == torch.long
    assert full.num_tokens == 8

    short = calibration_blocks(src, tok, samples=5, seq_len=4, shuffle_buffer=0)  # text runs out
    assert short.input_ids.tolist() == [[3, 4, 5, 1], [6, 7, 1, 3], [1, 2, 2, 2]]
    assert short.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert short.num_tokens == 9 == int(short.attention_mask.sum())
    assert len(short) == short.num_samples == 3 and short.seq_len == 4

    exact = calibration_blocks(src, tok, samples=3, seq_len=3, shuffle_buffer=0)  # 9 tokens = 3 x 3: no padding
    assert exact.input_ids.tolist() == [[3, 4, 5], [1, 6, 7], [1, 3, 1]]
    assert exact.attention_mask.min() == 1


def test_no_eos_tokenizer_concatenates_directly(tmp_path: Path) -> None:
    tok = make_word_tokenizer(["a", "b", "c"], eos=False)
    src = write_txt(tmp_path / "p.txt", ["a b", "c a", "b"])
    calib = calibration_blocks(src, tok, samples=2, seq_len=3, shuffle_buffer=0)
    assert calib.input_ids.tolist() == [[3, 4, 5], [3, 4, 2]]
    assert calib.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_long_document_stops_reading_once_blocks_are_full(tmp_path: Path) -> None:
    tok = make_word_tokenizer(["a", "b"])
    src = write_txt(tmp_path / "long.txt", [" ".join(["a", "b"] * 5000)])
    calib = calibration_blocks(src, tok, samples=3, seq_len=5, shuffle_buffer=0)
    assert calib.input_ids.tolist() == [[3, 4, 3, 4, 3], [4, 3, 4, 3, 4], [3, 4, 3, 4, 3]]
    assert calib.num_tokens == 15


def test_bos_tokenizer_frames_each_document_once(tmp_path: Path) -> None:
    """A Llama-style tokenizer gets BOS at each document start, even when a long document is cut."""
    long_word = "c" * 20  # 21 characters per token: more than the packer's guess, so rounds cut documents
    tok = make_word_tokenizer(["a", "b", long_word], bos=True)  # a=3 b=4 long=5, eos=1, bos=6
    assert tok("a")["input_ids"] == [6, 3]
    src = write_txt(tmp_path / "p.txt", ["a b", " ".join([long_word] * 40), "b"])
    stream = [6, 3, 4, 1, 6] + [5] * 40 + [1, 6, 4, 1]
    for samples in (1, 2, 4, 5):
        calib = calibration_blocks(src, tok, samples=samples, seq_len=12, shuffle_buffer=0)
        n = min(samples * 12, len(stream))
        assert calib.input_ids.flatten().tolist()[:n] == stream[:n], samples
    assert calib.num_tokens == len(stream)


@pytest.mark.parametrize("guess", [1, 8])
def test_long_documents_cut_between_rounds_tokenize_as_a_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               guess: int) -> None:
    """Cutting a document at whitespace between tokenizer rounds must not change its tokens."""
    import moe2dense_ray.core.data as data

    monkeypatch.setattr(data, "_CHARS_PER_TOKEN_GUESS", guess)  # 1: every document is cut many times
    tok = make_tiny_tokenizer(vocab_size=128)
    words = "the quick brown fox jumps over a lazy dog while seven wizards judge boxing".split()
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(400 + 50 * i)) for i in range(3)]
    src = write_jsonl(tmp_path / "long.jsonl", docs)
    stream: list[int] = []
    for d in docs:
        stream += tok(d)["input_ids"] + [tok.eos_token_id]
    for samples in (2, len(stream) // 60):
        calib = calibration_blocks(src, tok, samples=samples, seq_len=60, shuffle_buffer=0)
        assert calib.input_ids.flatten().tolist() == stream[:samples * 60]


@pytest.fixture(scope="module")
def tiny_tok():
    return make_tiny_tokenizer(vocab_size=96)


@pytest.fixture(scope="module")
def many_docs(tmp_path_factory: pytest.TempPathFactory) -> str:
    words = "the quick brown fox jumps over a lazy dog while seven wizards judge".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(3 + i % 7)) + f" {i}" for i in range(60)]
    return write_jsonl(tmp_path_factory.mktemp("many") / "many.jsonl", docs)


def test_real_tokenizer_blocks_are_deterministic_per_seed(tiny_tok, many_docs: str) -> None:
    a = calibration_blocks(many_docs, tiny_tok, samples=6, seq_len=16, seed=0)
    b = calibration_blocks(many_docs, tiny_tok, samples=6, seq_len=16, seed=0)
    c = calibration_blocks(many_docs, tiny_tok, samples=6, seq_len=16, seed=1)
    assert a.input_ids.shape == (6, 16) and a.num_tokens == 96
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    assert not torch.equal(a.input_ids, c.input_ids)  # the seed changes the document order
    assert int(a.input_ids.max()) < len(tiny_tok)
    # documents are separated by EOS
    assert (a.input_ids == tiny_tok.eos_token_id).sum() >= 2


def test_unshuffled_blocks_are_the_packed_file_in_order(tiny_tok, many_docs: str) -> None:
    stream: list[int] = []
    for doc in load_texts(many_docs):
        stream += tiny_tok(doc)["input_ids"] + [tiny_tok.eos_token_id]
    calib = calibration_blocks(many_docs, tiny_tok, samples=4, seq_len=10, shuffle_buffer=0, seed=123)
    assert calib.input_ids.flatten().tolist() == stream[:40]


def test_padding_is_masked_when_text_is_short(tiny_tok, tmp_path: Path) -> None:
    src = write_txt(tmp_path / "s.txt", ["the quick brown fox"])
    n = len(tiny_tok("the quick brown fox")["input_ids"]) + 1  # + EOS
    calib = calibration_blocks(src, tiny_tok, samples=4, seq_len=64)
    assert calib.input_ids.shape == (1, 64)
    assert calib.num_tokens == n
    assert calib.attention_mask[0, :n].eq(1).all() and calib.attention_mask[0, n:].eq(0).all()
    assert calib.input_ids[0, n:].eq(tiny_tok.pad_token_id).all()


# ---------------------------------------------------------------------------------------------- shard


@pytest.mark.parametrize("rows,n", [(7, 3), (6, 3), (2, 4), (0, 2), (5, 1), (10, 4)])
def test_shard_partitions_rows_exactly(rows: int, n: int) -> None:
    ids = torch.arange(rows * 3).reshape(rows, 3)
    mask = torch.ones_like(ids)
    if rows:
        mask[-1, 1:] = 0
    calib = CalibrationSet(ids, mask)
    parts = [calib.shard(i, n) for i in range(n)]
    sizes = [len(p) for p in parts]
    assert sum(sizes) == rows and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger parts come first
    assert torch.equal(torch.cat([p.input_ids for p in parts]), ids)
    assert torch.equal(torch.cat([p.attention_mask for p in parts]), mask)
    assert sum(p.num_tokens for p in parts) == calib.num_tokens
    for p in parts:  # copies, so a worker is not shipped the whole storage
        assert p.input_ids.untyped_storage().nbytes() == p.input_ids.numel() * 8


def test_shard_rejects_bad_indices() -> None:
    calib = CalibrationSet(torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long))
    for i, n in [(0, 0), (2, 2), (-1, 2)]:
        with pytest.raises(ValueError):
            calib.shard(i, n)


# ---------------------------------------------------------------------------------------------- errors


def _err(fn, *args, **kw) -> str:
    with pytest.raises(UserError) as e:
        out = fn(*args, **kw)
        if not isinstance(out, CalibrationSet):
            list(out)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_missing_path_and_unsupported_extension(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jsonl")
    assert "not found" in _err(load_texts, missing) and missing in _err(load_texts, missing)
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    assert "unsupported" in _err(load_texts, str(csv)) and "data.csv" in _err(load_texts, str(csv))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("x")
    assert "no supported data files" in _err(load_texts, str(tmp_path / "d"))
    assert "no files match" in _err(load_texts, str(tmp_path / "*.nothing"))
    assert "Hugging Face" in _err(load_texts, "hf:")


def test_missing_path_fails_eagerly(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_texts(str(tmp_path / "missing.txt"))  # no iteration needed


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok", \n')
    msg = _err(load_texts, str(p))
    assert "malformed JSON" in msg and "line 2" in msg and "bad.jsonl" in msg
    p.write_text('{"text": "ok"}\n\n{"content": "x"}\n')
    msg = _err(load_texts, str(p))
    assert "line 3" in msg and "no 'text' field" in msg and "content" in msg
    p.write_text('["not", "an", "object"]\n')
    assert "not an object" in _err(load_texts, str(p))
    p.write_text('{"text": 5}\n')
    assert "not a string" in _err(load_texts, str(p))
    arr = tmp_path / "bad.json"
    arr.write_text('[\n{"text": "a"},\n{"text": }\n]')
    msg = _err(load_texts, str(arr))
    assert "malformed JSON" in msg and "line 3" in msg


def test_parquet_errors(tmp_path: Path) -> None:
    p = write_parquet(tmp_path / "x.parquet", field="body")
    msg = _err(load_texts, p)
    assert "no 'text' column" in msg and "body" in msg
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"this is not parquet at all")
    assert "not a valid parquet" in _err(load_texts, str(bad))


def test_unreadable_files(tmp_path: Path) -> None:
    gz = tmp_path / "trunc.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:30])
    assert "cannot read" in _err(load_texts, str(gz))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\xc3\x28 bad")
    assert "not UTF-8" in _err(load_texts, str(binary))


def test_empty_calibration_set_names_the_source(tmp_path: Path) -> None:
    tok = make_word_tokenizer(["a"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    msg = _err(calibration_blocks, str(empty), tok, samples=2, seq_len=4)
    assert "empty" in msg and str(empty) in msg and "no documents" in msg
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"text": null}\n{"text": ""}\n')
    assert "empty" in _err(calibration_blocks, str(nulls), tok, samples=2, seq_len=4)
    # documents exist but tokenize to nothing (the word tokenizer's whitespace split of tabs)
    blank_tokens = tmp_path / "tabs.jsonl"
    blank_tokens.write_text('{"text": "\\t"}\n')
    msg = _err(calibration_blocks, str(blank_tokens), tok, samples=2, seq_len=4)
    assert "empty" in msg and "0 tokens" in msg and str(blank_tokens) in msg


def test_bad_sizes(tmp_path: Path) -> None:
    tok = make_word_tokenizer(["a"])
    src = write_txt(tmp_path / "a.txt", ["a a a"])
    assert "--samples" in _err(calibration_blocks, src, tok, samples=0, seq_len=4)
    assert "--seq-len" in _err(calibration_blocks, src, tok, samples=1, seq_len=1)


def _local_hf_dataset(root: Path) -> str:
    """A dataset directory the way the Hub lays one out: data files plus README `configs` metadata."""
    files = {
        "cfg/train.jsonl": [{"text": "a"}],
        "cfg/validation.jsonl": [{"text": "a b"}, {"text": None}, {"text": "c"}],
        "cfg/test.jsonl": [{"text": "b c"}],
        "other/train.jsonl": [{"content": "a"}],
        "mixed/train.jsonl": [{"text": "a"}],
        "mixed/validation.jsonl": [{"text": "b"}, {"other": 1}],
    }
    for rel, rows in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("".join(json.dumps(r) + "\n" for r in rows))
    configs = {}
    for rel in files:
        configs.setdefault(rel.split("/")[0], []).append(rel)
    meta = ["---", "configs:"]
    for name, rels in configs.items():
        meta += [f"- config_name: {name}", "  data_files:"]
        for rel in rels:
            meta += [f"  - split: {Path(rel).stem}", f"    path: {rel}"]
    (root / "README.md").write_text("\n".join(meta + ["---", ""]))
    return str(root)


def test_hf_source_with_real_datasets(tmp_path: Path) -> None:
    """hf:NAME[:CONFIG[:SPLIT]] through the real `datasets.load_dataset` (streaming) on a local
    dataset directory, which `load_dataset` resolves exactly like a Hub name, without the network."""
    root = _local_hf_dataset(tmp_path / "ds")
    assert list(load_texts(f"hf:{root}:cfg", split="validation")) == ["a b", "c"]  # null text skipped
    assert list(load_texts(f"hf:{root}:cfg:test")) == ["b c"]  # the split in the source wins
    assert list(load_texts(f"hf:{root}:cfg")) == ["a"]  # default split: train
    assert "row 0 has no 'text' field (fields: content)" in _err(list, load_texts(f"hf:{root}:other"))
    # datasets raises its own (multi-line) error for rows that break the schema: one line here
    msg = _err(list, load_texts(f"hf:{root}:mixed", split="validation"))
    assert msg.startswith(f"hf:{root}:mixed: cannot read row 0") and "\n" not in msg
    assert "BuilderConfig 'nope' not found" in _err(load_texts, f"hf:{root}:nope")
    assert "Bad split: nope" in _err(load_texts, f"hf:{root}:cfg:nope")
    assert "cannot load Hugging Face dataset" in _err(load_texts, f"hf:{tmp_path}/missing")
    assert "bad Hugging Face dataset" in _err(load_texts, "hf:a:b:c:d")
    tok = make_word_tokenizer(["a", "b", "c"])
    calib = calibration_blocks(f"hf:{root}:cfg:validation", tok, samples=1, seq_len=4, shuffle_buffer=0)
    assert calib.input_ids.tolist() == [[3, 4, 1, 5]]


def test_hidden_directories_are_skipped(tmp_path: Path) -> None:
    d = tmp_path / "data"
    (d / ".cache").mkdir(parents=True)
    write_txt(d / ".cache" / "junk.txt", ["junk"])
    write_txt(d / "real.txt", ["real"])
    (d / "_SUCCESS").write_text("")
    assert list(load_texts(str(d))) == ["real"]
    assert list(load_texts(str(d / "**" / "*.txt"))) == ["real"]
