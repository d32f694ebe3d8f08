"""Distillation losses: exact against dense references at k == V, the tail bucket, the sampled
estimator's unbiasedness, finite gradients, and the codec's effect on the loss."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from moe2dense_ray.distill.codec import (
    CODECS,
    SparseTarget,
    encode_topk,
    teacher_sample,
    teacher_topk,
)
from moe2dense_ray.distill.losses import (
    LOSSES,
    forward_kl,
    jsd,
    masked_mean,
    reverse_kl,
)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def _dense(name: str, teacher: torch.Tensor, student: torch.Tensor, tau: float, beta: float) -> torch.Tensor:
    """Brute-force float64 reference over the whole vocabulary, times tau**2."""
    p, q = (teacher / tau).softmax(-1), (student / tau).softmax(-1)
    if name == "forward_kl":
        # torch's own KL as a second opinion on the hand-written one
        torch.testing.assert_close(_kl(p, q), torch.nn.functional.kl_div(q.log(), p, reduction="none").sum(-1))
        return tau**2 * _kl(p, q)
    if name == "reverse_kl":
        return tau**2 * _kl(q, p)
    m = beta * p + (1 - beta) * q
    return tau**2 * (beta * _kl(p, m) + (1 - beta) * _kl(q, m))


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("name,beta", [("forward_kl", None), ("reverse_kl", None), ("jsd", 0.5), ("jsd", 0.2)])
def test_full_vocabulary_target_gives_the_dense_loss(name, beta, tau):
    gen = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(16, 50, generator=gen, dtype=torch.float64)
    student = 3 * torch.randn(16, 50, generator=gen, dtype=torch.float64)
    ids = torch.rand(16, 50, generator=gen).argsort(-1)  # every id, in a random order
    target = SparseTarget(ids, (teacher / tau).log_softmax(-1).gather(-1, ids))
    loss = LOSSES[name] if beta is None else functools.partial(LOSSES[name], beta=beta)
    got = loss(student, target, tau)
    assert got.dtype == torch.float64 and got.shape == (16,)
    torch.testing.assert_close(got, _dense(name, teacher, student, tau, beta or 0.5), atol=1e-6, rtol=0)


def test_tail_bucket_on_a_hand_example():
    """p = (1/2, 1/4, 1/8, 1/8) keeps ids 0, 1 and a tail of 1/4; a uniform student: 1/4, 1/4, tail 1/2."""
    p = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    target = SparseTarget(torch.tensor([[1, 0]]), p[:, [1, 0]].log())
    uniform = torch.zeros(1, 4)
    ln2 = math.log(2)
    assert forward_kl(uniform, target).item() == pytest.approx(0.5 * ln2 - 0.25 * ln2)
    assert reverse_kl(uniform, target).item() == pytest.approx(-0.25 * ln2 + 0.5 * ln2)
    # m = (3/8, 1/4, 3/8): KL(p||m) = KL(q||m) = 1/2 ln(4/3) + 1/4 ln(2/3)
    assert jsd(uniform, target).item() == pytest.approx(0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3))
    # the student softened at tau = 2 is still uniform; the loss is scaled by tau**2
    assert forward_kl(uniform, target, 2.0).item() == pytest.approx(4 * 0.25 * ln2)


def test_sampled_forward_kl_is_unbiased_for_the_dense_kl_and_its_gradient():
    gen = torch.Generator().manual_seed(0)
    tau, rows, V = 1.5, 4000, 40
    teacher = 2 * torch.randn(1, V, generator=gen, dtype=torch.float64)
    student = (teacher + torch.randn(1, V, generator=gen, dtype=torch.float64)).expand(rows, V).clone()
    student.requires_grad_(True)
    ids, counts, logprobs = teacher_sample(teacher.expand(rows, V), 8, gen, temperature=tau)
    loss = forward_kl(student, SparseTarget.from_sampled(ids, counts, logprobs.double()), tau)
    loss.sum().backward()  # each row is one independent estimate: its gradient lands in its own row

    exact_student = student[:1].detach().clone().requires_grad_(True)
    dense = _dense("forward_kl", teacher, exact_student, tau, 0.5)
    dense.sum().backward()
    se = loss.detach().std() / rows**0.5
    assert abs(loss.detach().mean() - dense.detach()) < 4 * se
    grad_se = student.grad.std(0) / rows**0.5
    assert ((student.grad.mean(0) - exact_student.grad[0]).abs() <= 4.5 * grad_se + 1e-12).all()


def test_refuses_sampled_targets_where_no_unbiased_estimate_exists():
    target = CODECS["sampled"].decode(CODECS["sampled"].encode(torch.randn(4, 30), draws=6))
    for loss in (reverse_kl, jsd):
        with pytest.raises(ValueError, match="top-k target"):
            loss(torch.randn(4, 30), target)
    with pytest.raises(ValueError, match="beta"):
        jsd(torch.randn(4, 30), CODECS["topk"].decode(CODECS["topk"].encode(torch.randn(4, 30), k=5)), beta=1.0)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_losses_and_gradients_stay_finite_at_the_edges(name):
    teacher = torch.randn(6, 32)
    teacher[:, 20:] = -torch.inf  # a masked teacher vocabulary: zero probabilities in the top-k
    student = (10 * torch.randn(6, 32)).to(torch.bfloat16).requires_grad_(True)
    cases = [teacher_topk(teacher, 24), teacher_topk(teacher, 20), teacher_topk(torch.randn(6, 32), 32)]
    for ids, logprobs in cases:  # zero probabilities, an empty teacher tail, k == V
        loss = LOSSES[name](student, SparseTarget(ids, logprobs), 2.0)
        assert loss.dtype == torch.float32 and loss.isfinite().all() and (loss > -1e-5).all()
        loss.sum().backward()
        assert student.grad.isfinite().all()
        student.grad = None


def test_sampled_padding_has_finite_gradient():
    logits = torch.zeros(3, 500)
    logits[:, 0] = 20  # nearly all draws land on one id: mostly padding slots
    target = CODECS["sampled"].decode(CODECS["sampled"].encode(logits, draws=16))
    assert (target.weights == 0).any() and target.logprobs.isinf().any()
    student = torch.randn(3, 500, requires_grad=True)
    forward_kl(student, target).sum().backward()
    assert student.grad.isfinite().all()


def test_compressed_topk_changes_the_mean_forward_kl_by_under_a_millinat():
    """Zipf-shaped teacher (frequent ids likely, as after BPE) with per-token noise; k = 128 of 4096."""
    gen = torch.Generator().manual_seed(0)
    zipf = -torch.log(torch.arange(1, 4097, dtype=torch.float32))
    teacher = 1.5 * zipf + 1.5 * torch.randn(2048, 4096, generator=gen)
    student = teacher + 0.5 * torch.randn(2048, 4096, generator=gen)
    ids, logprobs = teacher_topk(teacher, 128)
    exact = forward_kl(student, SparseTarget(ids, logprobs)).mean()
    compressed = forward_kl(student, CODECS["topk"].decode(encode_topk(ids, logprobs, 4096))).mean()
    assert exact > 0.05  # a loss worth measuring the error of
    assert abs(compressed - exact) < 1e-3


def test_masked_mean_skips_padding():
    per_token = torch.tensor([1.0, 3.0, float("nan"), 100.0])
    assert masked_mean(per_token, torch.tensor([1, 1, 0, 0])).item() == 2.0
    assert masked_mean(per_token, torch.zeros(4)).item() == 0.0
