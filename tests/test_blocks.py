"""Training text as token blocks made on the cluster (distill/blocks.py): byte ranges that tile a
file, plans whose indices are dense and seeded, shards packed to exactly their quota, and a driver
whose work does not grow with --tokens."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from moe2dense_ray.core.data import file_docs, load_texts
from moe2dense_ray.core.storage import url_to_fs
from moe2dense_ray.distill import blocks as B
from moe2dense_ray.distill.blocks import (
    Ranges,
    Shard,
    TextPlan,
    local_blocks,
    pack_shard,
    plan_text,
    rank_range,
    text_blocks,
)


def _words(rng: random.Random, n: int) -> str:
    vocab = ["the", "a", "é", "naïve", "über", "日本", "stone", "river", "ⓐ", "of", "x" * 40]
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    docs = [_words(rng, rng.randint(1, 300)) for _ in range(400)]
    (d / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n"
                                                          for t in docs).encode())
    (d / "b.txt").write_text("\n\n".join(d.replace(" of ", "\n") for d in docs) + "\n", encoding="utf-8")
    return d, docs


@pytest.mark.parametrize("name", ["a.jsonl", "b.txt"])
def test_byte_ranges_tile_a_file(files, name):
    """Lines belong to the range their first byte lies in: any cut points read every document once."""
    d, _ = files
    fs, path = url_to_fs(str(d / name))
    whole = list(file_docs(fs, path, "text"))
    size = fs.size(path)
    rng = random.Random(1)
    for parts in (2, 7, 40):
        cuts = [0] + sorted(rng.sample(range(1, size), parts - 1)) + [size]
        ranged = [doc for a, b in zip(cuts, cuts[1:]) for doc in file_docs(fs, path, "text", a, b)]
        if name.endswith(".jsonl"):
            assert ranged == whole
        else:  # a paragraph cut by a range boundary becomes two documents; no text is lost or repeated
            assert "".join("".join(ranged).split()) == "".join("".join(whole).split())
    assert whole[0] == files[1][0] or name.endswith(".txt")


def test_plans_are_dense_seeded_and_cut_large_files(files, tokenizer, monkeypatch):
    d, _ = files
    monkeypatch.setattr(B, "SHARD_BYTES", 4096)
    plan = plan_text(str(d / "a.jsonl"), tokenizer, blocks=1000, seq_len=32, seed=0, text_field="text", first_index=3)
    assert len(plan.shards) > 3 and all(s.end is not None for s in plan.shards)  # byte ranges of one file
    starts = [s.offset for s in plan.shards]
    assert starts[0] == 3 and all(b.offset == a.offset + a.quota for a, b in zip(plan.shards, plan.shards[1:]))
    assert plan.blocks == 1000 and plan.first == 3
    again = plan_text(str(d / "a.jsonl"), tokenizer, blocks=1000, seq_len=32, seed=0, text_field="text", first_index=3)
    other = plan_text(str(d / "a.jsonl"), tokenizer, blocks=1000, seq_len=32, seed=1, text_field="text", first_index=3)
    assert again == plan and [s.order for s in other.shards] != [s.order for s in plan.shards]
    assert TextPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    # the plan stops reading the listing once it has its blocks: fewer blocks, fewer shards
    small = plan_text(str(d / "a.jsonl"), tokenizer, blocks=5, seq_len=32, seed=0, text_field="text")
    assert len(small.shards) < len(plan.shards) and small.blocks == 5


def test_packed_shards_give_every_planned_block_once(files, tokenizer, monkeypatch):
    """Blocks are full, their indices those of the plan, any [lo, hi) and skip list respected; a
    shard whose text runs out continues with the shards after it in file order."""
    d, _ = files
    monkeypatch.setattr(B, "SHARD_BYTES", 8192)
    plan = plan_text(str(d), tokenizer, blocks=10**6, seq_len=32, seed=0, text_field="text")
    assert {s.url.rsplit("/", 1)[-1] for s in plan.shards} == {"a.jsonl", "b.txt"}
    allb = local_blocks(plan, tokenizer, lo=0, hi=plan.blocks)
    assert list(allb.index) == list(range(plan.blocks)) and allb.attention_mask.all()
    part = local_blocks(plan, tokenizer, lo=17, hi=40)
    assert list(part.index) == list(range(17, 40))
    np.testing.assert_array_equal(part.input_ids, allb.input_ids[17:40])
    skip = Ranges.from_indices([18, 19, 33])
    got = [i for s in plan.holding(17, 40) for b in pack_shard(plan, s, tokenizer, lo=17, hi=40, skip=skip)
           for i in b["block_index"]]
    assert got == [i for i in range(17, 40) if i not in (18, 19, 33)]
    # an over-estimated shard: its own text gives out, the next shard's text fills its quota
    first = min(plan.shards, key=lambda s: s.order)
    greedy = Shard(first.order, first.url, first.start, first.end, first.quota * 3, 0)
    over = TextPlan(plan.data, plan.text_field, plan.seq_len, plan.seed, (greedy,) + tuple(
        s for s in plan.shards if s.order != first.order))
    blocks = [b for b in pack_shard(over, greedy, tokenizer)]
    assert sum(len(b["block_index"]) for b in blocks) == greedy.quota


def test_the_driver_reads_a_sample_whatever_the_tokens(tmp_path, tokenizer, monkeypatch):
    """Planning tokenizes one sample per kind of file, the same for 1M as for 32M tokens, and its
    plan grows only with the shards (a few fields each), never with the blocks."""
    rng = random.Random(2)
    with open(tmp_path / "big.jsonl", "w") as f:
        line = "\n".join(json.dumps({"text": _words(rng, 200)}) for _ in range(500)) + "\n"
        for _ in range(120):  # ~57 MB
            f.write(line)
    monkeypatch.setattr(B, "SHARD_BYTES", 1 << 20)
    seen = {"chars": 0}
    real = type(tokenizer).__call__

    def counting(self, text, *a, **k):
        seen["chars"] += sum(map(len, text)) if isinstance(text, list) else len(text)
        return real(self, text, *a, **k)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    read = {}
    for tokens in (1_000_000, 32_000_000):
        seen["chars"] = 0
        plan = plan_text(str(tmp_path / "big.jsonl"), tokenizer, blocks=tokens // 256, seq_len=256, seed=0,
                         text_field="text")
        read[tokens] = (seen["chars"], len(plan.shards), len(json.dumps(plan.to_dict())))
    assert read[1_000_000][0] == read[32_000_000][0] <= 1.1 * B.SAMPLE_CHARS
    pieces = -(-(tmp_path / "big.jsonl").stat().st_size // B.SHARD_BYTES)
    assert read[32_000_000][1] <= pieces and read[32_000_000][2] < 200 * pieces  # ~150 bytes a shard


def test_rank_ranges_split_evenly():
    assert [rank_range(4, 28, 3, r) for r in range(3)] == [(4, 12), (12, 20), (20, 28)]
    assert rank_range(0, 10, 1, 0) == (0, 10)


def test_ranges_are_an_exact_set_of_indices():
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = rng.choice(200, size=int(rng.integers(0, 120)), replace=False)
        r = Ranges.from_indices(idx)
        assert len(r) == len(idx) and r == Ranges.of(r.to_list()) == Ranges.of(idx.tolist())
        probe = np.arange(-5, 210)
        np.testing.assert_array_equal(r.contains(probe), np.isin(probe, idx))
        lo = int(rng.integers(0, 200))
        want = next(i for i in range(lo, 400) if i not in set(idx.tolist()))
        assert r.first_missing(lo) == want
        other = Ranges.from_indices(rng.choice(200, size=30, replace=False))
        assert (r | other) == Ranges.from_indices(np.union1d(idx, np.asarray(
            [i for a, b in other.pairs for i in range(a, b)], dtype=np.int64)))
    # in-order training keeps one interval per rank, however many blocks
    assert Ranges([(0, 10**9), (2 * 10**9, 3 * 10**9)]).pairs == [[0, 10**9], [2 * 10**9, 3 * 10**9]]
    assert Ranges([(0, 4), (4, 8), (10, 12)]).to_list() == [[0, 8], [10, 12]]


def test_blocks_on_ray_equal_the_local_ones(ray_cluster, files, tokenizer, monkeypatch):
    """Ray Data tasks pack what the driver would pack, in index order, skipping a trained list."""
    import ray

    d, _ = files
    monkeypatch.setattr(B, "SHARD_BYTES", 8192)
    plan = plan_text(str(d / "a.jsonl"), tokenizer, blocks=60, seq_len=32, seed=0, text_field="text")
    want = local_blocks(plan, tokenizer, lo=5, hi=60)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    # a resumed rank: 5..19 trained (its cursor is 20: the shards before are not read) and 50, 51
    rows = text_blocks(plan, tokenizer, lo=5, hi=60, skip=Ranges([(5, 20), (50, 52)])).take_all()
    assert [int(r["block_index"]) for r in rows] == [i for i in range(20, 60) if i not in (50, 51)]
    for r in rows:
        np.testing.assert_array_equal(r["input_ids"], want.input_ids[int(r["block_index"]) - 5])


def test_a_hub_dataset_plans_one_shard(tokenizer):
    plan = plan_text("hf:nobody/none", tokenizer, blocks=7, seq_len=16, seed=0, text_field="text")
    assert len(plan.shards) == 1 and plan.blocks == 7


def test_docs_read_by_range_match_load_texts_for_whole_files(files):
    d, docs = files
    assert list(load_texts(str(d / "a.jsonl"))) == docs


def test_parquet_is_cut_by_row_groups(tmp_path, tokenizer, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(3)
    docs = [_words(rng, rng.randint(5, 100)) for _ in range(300)]
    pq.write_table(pa.table({"text": docs, "id": list(range(300))}), tmp_path / "d.parquet", row_group_size=25)
    fs, path = url_to_fs(str(tmp_path / "d.parquet"))
    from moe2dense_ray.core.data import pieces

    cut = pieces(fs, path, fs.size(path) // 5)
    assert len(cut) >= 4 and cut[0][0] == 0 and cut[-1][1] == 12
    assert [d for a, b, _ in cut for d in file_docs(fs, path, "text", a, b)] == docs
    monkeypatch.setattr(B, "SHARD_BYTES", fs.size(path) // 5)
    plan = plan_text(str(tmp_path / "d.parquet"), tokenizer, blocks=10**6, seq_len=32, seed=0, text_field="text")
    assert len(plan.shards) == len(cut)
    got = local_blocks(plan, tokenizer, lo=0, hi=plan.blocks)
    assert list(got.index) == list(range(plan.blocks))


@pytest.mark.parametrize("case", ["truncated-gzip", "not-utf8", "bad-json", "empty"])
def test_bad_training_text_is_one_line_before_any_work(tmp_path, tokenizer, case):
    """Planning reads a sample of every kind of file: what is wrong with it is one UserError line."""
    import gzip

    from moe2dense_ray.core.errors import UserError

    good = "".join(json.dumps({"text": _words(random.Random(i), 50)}) + "\n" for i in range(2000)).encode()
    path, fragment = {"truncated-gzip": ("d.jsonl.gz", "cannot read"), "not-utf8": ("d.jsonl", "not UTF-8"),
                      "bad-json": ("d.jsonl", "malformed JSON"), "empty": ("d.jsonl", "less than one block")}[case]
    data = {"truncated-gzip": gzip.compress(good)[:5000], "not-utf8": b'{"text": "\xff\xfe"}\n' + good,
            "bad-json": good[:300] + b"{oops\n" + good, "empty": b""}[case]
    (tmp_path / path).write_bytes(data)
    with pytest.raises(UserError, match=fragment) as e:
        plan_text(str(tmp_path / path), tokenizer, blocks=100, seq_len=32, seed=0, text_field="text")
    assert "\n" not in str(e.value)


def test_densities_of_every_format_are_close_to_the_truth(tmp_path, tokenizer):
    """The sampled tokens per stored byte, for a file larger than the sample, within 10% of the
    whole file's count, for text, JSON lines (plain and gzip), a JSON array and Parquet."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from moe2dense_ray.core.data import pack_rows, sample_density

    rng = random.Random(4)
    docs = [_words(rng, rng.randint(20, 200)) for _ in range(600)]
    lines = "".join(json.dumps({"text": t}) + "\n" for t in docs)
    (tmp_path / "a.jsonl").write_text(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "c.json").write_text(json.dumps([{"text": t} for t in docs]))
    (tmp_path / "d.txt").write_text("\n\n".join(docs))
    pq.write_table(pa.table({"text": docs}), tmp_path / "e.parquet", row_group_size=50)
    true_tokens = sum(real for _, real in pack_rows(iter(docs), tokenizer, seq_len=4096, blocks=1 << 40))
    for name in ("a.jsonl", "b.jsonl.gz", "c.json", "d.txt", "e.parquet"):
        fs, path = url_to_fs(str(tmp_path / name))
        per_byte, exact = sample_density(fs, path, tokenizer, "text", chars=20_000)
        assert exact is None
        assert per_byte * fs.size(path) == pytest.approx(true_tokens, rel=0.1), name
