"""Evaluation: perplexity on held-out text (the paper's pre-distillation metric)."""

from __future__ import annotations

import math

import torch


def load_model(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    from .calibrate import localize

    with localize(path) as local:
        return AutoModelForCausalLM.from_pretrained(local, dtype=dtype).eval()


@torch.no_grad()  # not inference_mode: under ZeRO-3 the model trains on after this
def heldout_metrics(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, batch_size: int = 8,
                    targets=None, loss: str = "forward_kl", temperature: float = 1.0) -> dict[str, float]:
    """Perplexity over the non-padding next-token predictions of the given blocks, and, given the
    teacher's `targets` for the same blocks (a `distill.codec.SparseTarget` over all their
    positions), the mean distillation loss to the teacher, in one forward pass per batch.
    """
    nll, count, kd, kd_count = 0.0, 0, 0.0, 0
    dev = next(model.parameters()).device
    S = input_ids.shape[1]
    for s in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[s:s + batch_size].to(dev).long()
        mask = attention_mask[s:s + batch_size].to(dev).long()
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        target = ids[:, 1:]
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        loss_sum = torch.nn.functional.cross_entropy(logits[:, :-1][valid], target[valid], reduction="sum")
        nll += float(loss_sum)
        count += int(valid.sum())
        if targets is not None:
            from .distill.codec import SparseTarget
            from .distill.losses import LOSSES

            rows = slice(s * S, (s + ids.shape[0]) * S)
            part = SparseTarget(targets.ids[rows], targets.logprobs[rows],
                                None if targets.weights is None else targets.weights[rows]).to(dev)
            per_token = LOSSES.get(loss)(logits.reshape(-1, logits.shape[-1]), part, temperature)
            real = mask.reshape(-1).bool()
            kd += float(per_token[real].sum())
            kd_count += int(real.sum())
    if count == 0:
        from .errors import UserError

        raise UserError("no tokens to evaluate")
    out = {"ppl": math.exp(nll / count), "tokens": count}
    if targets is not None:
        out["kl"] = kd / max(kd_count, 1)
    return out


def perplexity(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, batch_size: int = 8) -> float:
    """Token-level perplexity over the non-padding next-token predictions of the given blocks."""
    return heldout_metrics(model, input_ids, attention_mask, batch_size=batch_size)["ppl"]
