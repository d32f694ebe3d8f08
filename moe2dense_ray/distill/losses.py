"""Knowledge-distillation losses against a sparse teacher target, one registry and one contract:

    per_token = LOSSES[name](student_logits [N, V], target: SparseTarget, temperature) -> [N]
    loss = masked_mean(per_token, attention_mask)

(Any leading dims work, e.g. [B, S, V] logits with a [B, S, m] target give [B, S], as long as
the logits and the target have the same ones.)

The student is compared over the full vocabulary: q = softmax(student_logits / temperature),
computed in float32 (float64 stays float64). The teacher's log-probabilities must have been taken
at the same temperature (the codec's `temperature`): the loss does not rescale them.

A top-k target is turned into k+1 buckets: the k stored ids plus one tail bucket holding the
teacher's missing mass 1 - sum(p_k), compared with the student's 1 - sum(q_k) over the same ids.
Every divergence is then exact on that coarser distribution, and equals the dense divergence when
k == V. A sampled target (weights not None) is only meaningful for the forward KL, where the
importance-weighted sum is an unbiased estimate of the dense KL and of its gradient; the other
losses refuse it.

Every loss is multiplied by temperature**2 (Hinton et al., 2015): the gradient of a softened
divergence shrinks as 1/temperature**2, and the factor keeps its size, hence the balance with
the trainer's cross-entropy term, independent of the temperature.

Probabilities of exactly zero (a masked teacher token, a padding slot, an empty tail) are floored
at the smallest normal float of the compute dtype in log space, so no 0 * log 0 becomes NaN and
gradients stay finite; the floor changes no value by more than that float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .codec import SparseTarget


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `per_token` over the positions where `mask` is nonzero (0 when there are none).

    `torch.where`, not a product, so a non-finite loss on a padding position cannot poison the mean.
    """
    keep = mask.bool()
    return torch.where(keep, per_token, 0).sum() / keep.sum().clamp_min(1)


def _floored(logprobs: torch.Tensor) -> torch.Tensor:
    """`logprobs` clamped at log of the smallest normal float of their dtype (see the module doc)."""
    return logprobs.clamp_min(math.log(torch.finfo(logprobs.dtype).tiny))


def _student_logprobs(student_logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log q of `ids` [N, m] under the full-vocabulary softmax: the one [N, V] tensor a loss makes."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logq = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    return _floored(logq.gather(-1, ids))


def _with_tail(logprobs: torch.Tensor) -> torch.Tensor:
    """[N, k] log-probabilities -> [N, k+1], the last column log(1 - sum of the k probabilities).

    -expm1 keeps a tail near 0 accurate; a tail that rounding makes <= 0 is clamped before the log
    (not after: clamping after would multiply a zero gradient by an infinite one).
    """
    tiny = torch.finfo(logprobs.dtype).tiny
    tail = (-torch.expm1(logprobs.logsumexp(-1, keepdim=True))).clamp_min(tiny).log()
    return torch.cat([logprobs, tail], dim=-1)


def _buckets(student_logits: torch.Tensor, target: SparseTarget, temperature: float,
             loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probabilities over the k+1 buckets of a top-k target."""
    if target.sampled:
        raise ValueError(f"{loss} needs a top-k target: a sampled target only gives an unbiased "
                         "estimate of the forward KL (use forward_kl, or the topk codec)")
    logq = _student_logprobs(student_logits, target.ids, temperature)
    logp = _floored(target.logprobs.to(logq.dtype))
    return _with_tail(logp), _with_tail(logq)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities over the same buckets."""
    return (logp.exp() * (logp - logq)).sum(-1)


def forward_kl(student_logits: torch.Tensor, target: SparseTarget, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token, times temperature**2: mass-covering, the classic KD loss.

    Top-k: exact on the k+1 buckets. Sampled: sum_i w_i (log p_i - log q_i) with w = counts/draws,
    an unbiased estimate of the full-vocabulary KL whose gradient, q - w, is unbiased for q - p.
    """
    if not target.sampled:
        logp, logq = _buckets(student_logits, target, temperature, "forward_kl")
        return temperature**2 * _kl(logp, logq)
    logq = _student_logprobs(student_logits, target.ids, temperature)
    logp = _floored(target.logprobs.to(logq.dtype))
    return temperature**2 * (target.weights.to(logq.dtype) * (logp - logq)).sum(-1)


def reverse_kl(student_logits: torch.Tensor, target: SparseTarget, temperature: float = 1.0) -> torch.Tensor:
    """KL(student || teacher) per token on the k+1 buckets, times temperature**2: mode-seeking.

    Student mass on a token the teacher gives probability zero costs (log-floor) nats per unit of
    mass instead of infinity.
    """
    logp, logq = _buckets(student_logits, target, temperature, "reverse_kl")
    return temperature**2 * _kl(logq, logp)


def jsd(student_logits: torch.Tensor, target: SparseTarget, temperature: float = 1.0,
        beta: float = 0.5) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence per token on the k+1 buckets, times temperature**2:

        beta * KL(p || m) + (1 - beta) * KL(q || m),   m = beta * p + (1 - beta) * q

    bounded (by the entropy of (beta, 1 - beta)), so a token the student gets badly wrong cannot
    dominate a batch. beta = 0.5 is the symmetric JSD; select another with functools.partial.
    """
    if not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta} (beta -> 0 or 1 makes it vanish)")
    logp, logq = _buckets(student_logits, target, temperature, "jsd")
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))
    return temperature**2 * (beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm))


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}
"""Loss functions by name; `jsd` takes ``beta=`` (bind it with functools.partial). A plain dict, not
methods.registry.Registry: a loss needs no calibration statistics, and callers index it."""



# ---- the student side: a micro-batch's loss from hidden states, a chunk of rows at a time ------------


@dataclass
class LossSums:
    """Sums over one batch's tokens, so that chunks, batches and ranks add up before any mean.

    `kd` sums the per-token loss over real tokens (`tokens` of them); `ce` sums the next-token
    cross-entropy over positions whose token and successor are real (`ce_tokens`). Both are
    tensors that carry gradients when computed with them; `ce` is zero when not asked for.
    """

    kd: torch.Tensor
    tokens: int
    ce: torch.Tensor
    ce_tokens: int

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kd / max(self.tokens, 1), self.ce / max(self.ce_tokens, 1)


def next_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, S] labels: the next token where it and this one are real, else -100."""
    labels = torch.full_like(input_ids, -100)
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    labels[:, :-1] = torch.where(valid, input_ids[:, 1:], -100)
    return labels


def chunked_loss(logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, target: SparseTarget | None, *, loss: str = "forward_kl",
                 temperature: float = 1.0, ce: bool = False, rows: int) -> LossSums:
    """The KD and CE sums of a batch from its final hidden states [B, S, H], `rows` tokens at a time.

    `logits_of` maps hidden rows to logits (`lm_head.LMHead.logits`); `target` holds one row per
    token of the batch (B * S rows), or None for cross-entropy alone. Each chunk's logits, softmax
    and loss live only while that chunk is computed: under autograd every chunk is checkpointed
    and recomputed in backward, so training holds [rows x vocabulary] at a time, never
    [tokens x vocabulary]. The sums equal those of the whole batch's logits up to float rounding
    (the chunks only reorder additions), and so do their gradients.
    """
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H)
    real = attention_mask.reshape(-1).bool()
    labels = next_token_labels(input_ids, attention_mask).reshape(-1)
    fn = LOSSES[loss] if target is not None else None
    if target is not None and target.ids.shape[0] != h.shape[0]:
        raise ValueError(f"the target has {target.ids.shape[0]} rows for {h.shape[0]} tokens")

    def part(h_c, real_c, labels_c, ids_c, logp_c, w_c):
        logits = logits_of(h_c)
        kd_c = torch.zeros((), dtype=torch.float32, device=h_c.device)
        if fn is not None:
            per_token = fn(logits, SparseTarget(ids_c, logp_c, w_c), temperature)
            kd_c = torch.where(real_c, per_token, 0).sum()
        ce_c = F.cross_entropy(logits.float(), labels_c, ignore_index=-100, reduction="sum") if ce \
            else torch.zeros((), dtype=torch.float32, device=h_c.device)
        return kd_c, ce_c

    n = h.shape[0]
    recompute = torch.is_grad_enabled() and hidden.requires_grad and n > rows
    kd = ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        args = (h[s:e], real[s:e], labels[s:e],
                *((target.ids[s:e], target.logprobs[s:e], None if target.weights is None else target.weights[s:e])
                  if target is not None else (None, None, None)))
        kd_c, ce_c = checkpoint(part, *args, use_reentrant=False) if recompute else part(*args)
        kd, ce_sum = kd + kd_c, ce_sum + ce_c
    return LossSums(kd, int(real.sum()), ce_sum, int((labels != -100).sum()))


__all__ = ["LOSSES", "LossSums", "chunked_loss", "forward_kl", "jsd", "masked_mean", "next_token_labels",
           "reverse_kl"]
