"""The teacher-distribution codecs: exact ids, logprobs within a step, fixed shapes, odd inputs."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moe2dense_ray.distill.codec import (
    CODECS,
    COLUMNS,
    DEFAULT_DRAWS,
    LOGPROB_STEP,
    PARQUET_OPTIONS,
    SparseTarget,
    decode_sampled,
    decode_topk,
    encode_sampled,
    encode_topk,
    teacher_sample,
    teacher_topk,
)

# Decoded log-probabilities are within one step, plus the float16 rounding of the stored head mass.
TOL = LOGPROB_STEP + 2e-3


def _logits(n: int, v: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(n, v, generator=torch.Generator().manual_seed(seed))


def _sorted(ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.argsort(-1)
    return ids.gather(-1, order), logprobs.gather(-1, order)


def test_topk_round_trip_exact_ids_and_logprobs_within_a_step():
    logits = _logits(64, 300)
    ids, logprobs = teacher_topk(logits, 40)
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).topk(40).values)
    columns = encode_topk(ids, logprobs, 300)
    assert set(columns) == set(COLUMNS)
    got_ids, got_logprobs = decode_topk(columns)
    want_ids, want_logprobs = _sorted(ids, logprobs)
    assert torch.equal(got_ids, want_ids)
    assert got_logprobs.dtype == torch.float32
    assert (got_logprobs - want_logprobs).abs().max() <= TOL
    # the stored mass is kept: what the loss's tail bucket is made of
    torch.testing.assert_close(got_logprobs.logsumexp(-1), logprobs.logsumexp(-1), atol=2e-3, rtol=0)


def test_large_vocabulary_gaps_beyond_uint16_stay_exact():
    vocab = 200_000  # 4 blocks of 65536 ids
    ids = torch.tensor([[0, 7, 65_535, 65_536, 70_000, 199_999],  # gaps across every block boundary
                        [3, 150_000, 150_001, 199_990, 199_991, 199_999],  # a gap of 149997
                        [131_072, 131_073, 140_000, 190_000, 196_607, 196_608]])  # nothing in blocks 0-1
    logprobs = torch.log_softmax(torch.randn(3, 6, generator=torch.Generator().manual_seed(1)), -1)
    columns = encode_topk(ids, logprobs, vocab)
    assert columns["t_gaps"].dtype == np.uint16 and columns["t_pages"].shape == (3, 4)
    assert torch.equal(decode_topk(columns)[0], ids)
    with pytest.raises(ValueError, match="vocab_size"):
        encode_topk(ids, logprobs, 199_999)


def test_zero_probabilities_decode_to_minus_inf_without_nan():
    logits = _logits(8, 50)
    logits[:, 10:] = -torch.inf  # masked vocabulary: only 10 tokens possible, k asks for 16
    ids, logprobs = teacher_topk(logits, 16)
    assert logprobs.isinf().sum() == 8 * 6
    got_ids, got = decode_topk(encode_topk(ids, logprobs, 50))
    want_ids, want = _sorted(ids, logprobs)
    assert torch.equal(got_ids, want_ids) and not got.isnan().any()
    assert torch.equal(got.isinf(), want.isinf())
    assert (got - want)[want.isfinite()].abs().max() <= TOL


@pytest.mark.parametrize("logits", [torch.zeros(4, 64), _logits(4, 64)], ids=["all-equal", "random"])
def test_k_equal_to_the_vocabulary(logits):
    ids, logprobs = teacher_topk(logits, 64)
    got_ids, got = decode_topk(encode_topk(ids, logprobs, 64))
    assert torch.equal(got_ids, torch.arange(64).expand(4, 64))
    assert (got - logits.log_softmax(-1)).abs().max() <= TOL
    assert got.logsumexp(-1).abs().max() < 1e-3  # all the mass: an empty tail bucket


def test_sampled_counts_sum_to_draws_and_round_trip():
    logits = _logits(32, 100, scale=2.0)
    gen = torch.Generator().manual_seed(3)
    ids, counts, logprobs = teacher_sample(logits, 12, gen, temperature=1.5)
    assert ids.shape == counts.shape == logprobs.shape == (32, 12)
    assert (counts.sum(-1) == 12).all()
    real = counts > 0  # distinct ids first, ascending, then padding
    assert torch.equal(real, torch.arange(12) < real.sum(-1, keepdim=True))
    assert all(torch.all(row[m][1:] > row[m][:-1]) for row, m in zip(ids, real))
    torch.testing.assert_close(logprobs[real], (logits / 1.5).log_softmax(-1).gather(-1, ids)[real])
    assert (logprobs[~real] == -torch.inf).all() and (ids[~real] == 0).all()

    got_ids, got_counts, got = decode_sampled(encode_sampled(ids, counts, logprobs, 100))
    assert torch.equal(got_ids, ids) and torch.equal(got_counts, counts)
    assert torch.equal(got.isinf(), ~real) and (got - logprobs)[real].abs().max() <= TOL


def test_sampled_draws_follow_the_teacher():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    ids, counts, _ = teacher_sample(probs.log().expand(4000, 4), 8, torch.Generator().manual_seed(0))
    freq = torch.zeros(4).scatter_add_(0, ids.flatten(), counts.flatten().float()) / (4000 * 8)
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)


def test_leading_dims_round_trip():
    logits = _logits(6, 80).reshape(2, 3, 80)
    ids, logprobs = teacher_topk(logits, 10)
    columns = encode_topk(ids, logprobs, 80)
    assert columns["t_gaps"].shape == (2, 3, 10) and columns["t_lhead"].shape == (2, 3)
    flat = encode_topk(ids.reshape(6, 10), logprobs.reshape(6, 10), 80)
    for name in COLUMNS:
        np.testing.assert_array_equal(columns[name].reshape(flat[name].shape), flat[name])
    assert decode_topk(columns)[0].shape == (2, 3, 10)


def test_codecs_share_one_interface():
    logits = _logits(16, 120)
    for mode, m in (("topk", 20), ("sampled", 7)):
        codec = CODECS[mode]
        columns = codec.encode(logits, k=20, draws=7, temperature=2.0, generator=torch.Generator().manual_seed(0))
        assert set(columns) == set(codec.columns) and columns["t_q"].shape == (16, m)
        target = codec.decode(columns)
        assert isinstance(target, SparseTarget) and target.ids.shape == target.logprobs.shape == (16, m)
        assert target.sampled == (mode == "sampled")
    torch.testing.assert_close(target.weights.sum(-1), torch.ones(16))


def test_bytes_per_token():
    """Raw size: 2 bytes a gap, 1 a code, 2 for the head mass, 2 per 65536-id block."""
    ids, logprobs = teacher_topk(_logits(8, 4096), 128)
    columns = encode_topk(ids, logprobs, 4096)
    assert sum(col.nbytes for col in columns.values()) / 8 == 2 * 128 + 128 + 2 + 2
    columns = encode_topk(ids, logprobs, 151_936)
    assert sum(col.nbytes for col in columns.values()) / 8 == 2 * 128 + 128 + 2 + 2 * 3
    sampled = CODECS["sampled"].encode(_logits(8, 4096), draws=DEFAULT_DRAWS)
    assert sum(col.nbytes for col in sampled.values()) / 8 == 40


def test_columns_survive_parquet_with_the_recommended_options(tmp_path):
    ids, logprobs = teacher_topk(_logits(32, 500), 24)
    columns = encode_topk(ids, logprobs, 500)
    table = pa.table({name: col if col.ndim == 1 else
                      pa.FixedSizeListArray.from_arrays(pa.array(col.reshape(-1)), col.shape[1])
                      for name, col in columns.items()})
    pq.write_table(table, tmp_path / "t.parquet", **PARQUET_OPTIONS)
    back = pq.read_table(tmp_path / "t.parquet")
    read = {name: np.stack(back[name].to_numpy(zero_copy_only=False)) if columns[name].ndim > 1
            else back[name].to_numpy() for name in COLUMNS}
    for name in COLUMNS:
        assert read[name].dtype == columns[name].dtype
        np.testing.assert_array_equal(read[name], columns[name])
    assert math.isclose(float(decode_topk(read)[1].exp().sum()), float(logprobs.exp().sum()), rel_tol=1e-3)


def test_teacher_service_encodes_a_batch_as_it_would_block_by_block():
    """The top-k codec encodes the whole batch in one call; the columns must be exactly those of
    encoding each block alone (the sampled codec stays per block: its draws are seeded by block)."""
    import numpy as np
    import torch

    from moe2dense_ray import assets
    from moe2dense_ray.distill.codec import CODECS
    from moe2dense_ray.distill.stream import TeacherService

    service = TeacherService(assets.teacher_path(), codec="topk", top_k=16, draws=4, temperature=1.0, seed=0)
    rng = np.random.default_rng(0)
    batch = {"block_index": np.arange(3, dtype=np.int64), "input_ids": rng.integers(0, 4096, (3, 24)),
             "attention_mask": np.ones((3, 24), dtype=np.int64)}
    batch["attention_mask"][2, 20:] = 0
    out = service(batch)
    with torch.inference_mode():
        logits = service.model(input_ids=torch.as_tensor(batch["input_ids"]),
                               attention_mask=torch.as_tensor(batch["attention_mask"]), use_cache=False).logits.float()
    for i in range(3):
        alone = CODECS["topk"].encode(logits[i], k=16, temperature=1.0)
        for name, col in alone.items():
            assert out[name][i].dtype == col.dtype and np.array_equal(out[name][i], col), name
    assert np.array_equal(out["block_index"], batch["block_index"])


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_ids_coded_by_frequency_decode_to_the_same_target(mode):
    """Coding ids by frequency rank changes the bytes, never the distribution: the same (id,
    probability) pairs come back, in the coded order."""
    from moe2dense_ray.distill.codec import IdOrder, frequency_order

    V = 70_000  # two id pages: ranks and ids cross the 65,536 boundary both ways
    gen = torch.Generator().manual_seed(0)
    sample = (torch.randn(20_000, generator=gen).abs() * 9000).long().clamp(max=V - 1)
    record = frequency_order(sample, V)
    assert record["ids"][0] == int(torch.bincount(sample).argmax()) and len(set(record["ids"])) == len(record["ids"])
    order = IdOrder.of(record)
    assert torch.equal(order.id[order.code], torch.arange(V))
    logits = 4 * torch.randn(64, V, generator=gen)
    opts = dict(k=32) if mode == "topk" else dict(draws=12)
    plain = CODECS[mode].decode(CODECS[mode].encode(logits, generator=torch.Generator().manual_seed(1), **opts))
    coded = CODECS[mode].decode(CODECS[mode].encode(logits, generator=torch.Generator().manual_seed(1), order=order,
                                                    **opts), order=order)

    def pairs(t):
        w = t.weights if t.weights is not None else torch.ones_like(t.logprobs)
        return [sorted((int(i), round(float(p), 5), round(float(x), 5)) for i, p, x in zip(ids, lp, ws) if x > 0)
                for ids, lp, ws in zip(t.ids, t.logprobs, w)]

    assert pairs(plain) == pairs(coded)
    with pytest.raises(ValueError, match="distinct ids"):
        IdOrder([1, 1], 10)
    assert IdOrder.of(None) is None and IdOrder.of({"vocab_size": 5, "ids": []}) is None
