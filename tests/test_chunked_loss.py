"""The student's loss and the teacher service a chunk of rows at a time: the same numbers as the
whole [tokens x vocabulary] computation, for every loss, codec and the CE term, with gradients;
and the split of a model into body and LM head, checked against the model's own forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from moe2dense_ray.core.lm_head import LMHead, rows_per_chunk
from moe2dense_ray.distill.codec import CODECS
from moe2dense_ray.distill.losses import LOSSES, chunked_loss, masked_mean

V = 97
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**SMALL)).float()


def _batch(codec: str):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 13), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # a padded block: neither KD nor CE may count its tail
    teacher = 2 * torch.randn(3 * 13, V, generator=gen)
    opts = dict(k=16) if codec == "topk" else dict(draws=6, generator=torch.Generator().manual_seed(2))
    return ids, mask, CODECS[codec].decode(CODECS[codec].encode(teacher, **opts))


def _whole(model, ids, mask, target, loss, ce_weight):
    """The reference: the model's own logits for the whole batch, the loss of the whole [N, V]."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    kd = masked_mean(LOSSES[loss](logits.reshape(-1, V), target, 1.0), mask.reshape(-1))
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid])
    return (1 - ce_weight) * kd + ce_weight * ce, kd, ce


@pytest.mark.parametrize("codec,loss", [("topk", "forward_kl"), ("topk", "reverse_kl"), ("topk", "jsd"),
                                        ("sampled", "forward_kl")])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_chunked_loss_and_gradients_equal_the_whole_batch(student, codec, loss, ce_weight):
    ids, mask, target = _batch(codec)
    student.zero_grad()
    ref, ref_kd, ref_ce = _whole(student, ids, mask, target, loss, ce_weight)
    ref.backward()
    want = {n: p.grad.clone() for n, p in student.named_parameters()}
    head = LMHead(student)
    for rows in (5, 13, 1000):  # ragged chunks, chunks of whole blocks, one chunk (no recomputation)
        student.zero_grad()
        sums = chunked_loss(head.logits, head.hidden(ids, mask), ids, mask, target, loss=loss, ce=ce_weight > 0,
                            rows=rows)
        kd, ce = sums.means()
        got = (1 - ce_weight) * kd + ce_weight * ce
        got.backward()
        assert sums.tokens == int(mask.sum()) and sums.ce_tokens == int((mask[:, 1:] * mask[:, :-1]).sum())
        torch.testing.assert_close(kd, ref_kd, atol=1e-5, rtol=0)
        if ce_weight:
            torch.testing.assert_close(ce, ref_ce, atol=1e-5, rtol=0)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        for n, p in student.named_parameters():
            torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=0, msg=f"{n} with {rows} rows a chunk")


def test_batch_loss_is_the_chunked_loss(student):
    """The trainer's entry point, at the default chunk size and with one forced to 4 rows."""
    from moe2dense_ray.core import lm_head
    from moe2dense_ray.distill.config import DistillConfig
    from moe2dense_ray.distill.worker import batch_loss

    ids, mask, target = _batch("topk")
    cols = CODECS["topk"].encode(2 * torch.randn(3 * 13, V, generator=torch.Generator().manual_seed(1)), k=16)
    batch = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
             **{k: v.reshape(3, 13, *v.shape[1:]) for k, v in cols.items()}}
    cfg = DistillConfig(teacher="t", student="s", data="d", tokens=1, out="o", ce_weight=0.25, loss="jsd")
    got = batch_loss(student, batch, cfg, torch.device("cpu"))
    old = lm_head.CHUNK_ELEMENTS
    try:
        lm_head.CHUNK_ELEMENTS = 4 * V
        assert rows_per_chunk(V) == 4 and LMHead(student).rows() == 4
        small = batch_loss(student, batch, cfg, torch.device("cpu"))
    finally:
        lm_head.CHUNK_ELEMENTS = old
    ref, kd, ce = _whole(student, ids, mask, CODECS["topk"].decode(cols), "jsd", 0.25)
    for loss_kd_ce in (got, small):
        assert loss_kd_ce[1] == pytest.approx(kd.item(), abs=1e-5) and loss_kd_ce[2] == pytest.approx(ce.item(), abs=1e-5)
        torch.testing.assert_close(loss_kd_ce[0], ref, atol=1e-5, rtol=0)


def test_heldout_metrics_and_shares_add_up(student):
    """Validation goes through the chunked path; two ranks' shares, one padded, add up to the whole."""
    from moe2dense_ray.distill.worker import _val_share
    from moe2dense_ray.eval.metrics import heldout_metrics, heldout_sums, metrics_of

    ids, mask, _ = _batch("topk")
    cols = CODECS["topk"].encode(torch.randn(3 * 13, V, generator=torch.Generator().manual_seed(3)), k=8)
    val = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
           **{k: v.reshape(3, 13, *v.shape[1:]) for k, v in cols.items()}}
    target = CODECS["topk"].decode(cols)
    whole = heldout_metrics(student, ids, mask, targets=target, batch_size=2)
    _, kd, ce = _whole(student, ids, mask, target, "forward_kl", 0.0)
    assert whole["ppl"] == pytest.approx(float(ce.exp()), rel=1e-5) and whole["kl"] == pytest.approx(float(kd), abs=1e-6)
    total = {"nll": 0.0, "tokens": 0, "kd": 0.0, "kd_tokens": 0}
    for rank in range(2):  # 3 blocks over 2 ranks: rank 1 runs block 0 again, uncounted
        s_ids, s_mask, keep, s_target = _val_share(val, rank, 2, "topk")
        assert len(keep) == 2 and keep.sum() == (2 if rank == 0 else 1)
        part = heldout_sums(student, s_ids, s_mask, targets=s_target, keep=keep, batch_size=1)
        total = {k: total[k] + part[k] for k in total}
    split = metrics_of(total, kl=True)
    assert split["tokens"] == whole["tokens"]
    assert split["ppl"] == pytest.approx(whole["ppl"], rel=1e-6) and split["kl"] == pytest.approx(whole["kl"], abs=1e-6)


@pytest.mark.parametrize("cls,config", [
    (Qwen3ForCausalLM, Qwen3Config(**SMALL, tie_word_embeddings=True)),
    (CohereForCausalLM, CohereConfig(**SMALL, logit_scale=0.0625)),
    (GraniteForCausalLM, GraniteConfig(**SMALL, logits_scaling=4.0)),
    (Gemma2ForCausalLM, Gemma2Config(**SMALL, final_logit_softcapping=3.0)),
])
def test_the_split_model_gives_the_models_own_logits(cls, config):
    torch.manual_seed(0)
    model = cls(config).eval()
    for p in model.parameters():  # weights large enough that a missed scale or cap shows
        p.data.mul_(8)
    head = LMHead(model)
    assert head.check() < 1e-4
    head.transforms = []  # a transform unknown to the table: refused, not trained on wrong logits
    if cls is not Qwen3ForCausalLM:
        with pytest.raises(ValueError, match="differ from its own forward"):
            head.check()


def test_teacher_service_chunks_give_the_same_columns(monkeypatch):
    """The teacher service encodes a few rows at a time: its columns equal one whole-batch encode."""
    from moe2dense_ray import assets
    from moe2dense_ray.distill.stream import TeacherService

    blocks = {"block_index": np.arange(2), "input_ids": np.random.default_rng(0).integers(0, 4096, (2, 24)),
              "attention_mask": np.ones((2, 24), dtype=np.int8)}
    for codec in ("topk", "sampled"):
        service = TeacherService(assets.teacher_path(), codec=codec, top_k=16, draws=4, temperature=1.0, seed=0)
        whole = service(dict(blocks))
        service.rows = 7
        chunked = service(dict(blocks))
        for k in whole:
            if codec == "topk" or not k.startswith("t_"):
                np.testing.assert_array_equal(whole[k], chunked[k])
        with torch.no_grad():  # and the top-k columns are those of the model's own logits
            logits = service.model(input_ids=torch.as_tensor(blocks["input_ids"]).long()).logits
        if codec == "topk":
            ref = CODECS["topk"].encode(logits.reshape(-1, logits.shape[-1]), k=16)
            for k, v in ref.items():
                np.testing.assert_array_equal(whole[k].reshape(v.shape), v)
