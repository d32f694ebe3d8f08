"""Evaluation: perplexity on held-out text (the paper's pre-distillation metric)."""

from __future__ import annotations

import math

import torch


def load_model(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    from .calibrate import localize

    with localize(path) as local:
        return AutoModelForCausalLM.from_pretrained(local, dtype=dtype).eval()


@torch.inference_mode()
def perplexity(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, batch_size: int = 8) -> float:
    """Token-level perplexity over the non-padding next-token predictions of the given blocks."""
    nll, count = 0.0, 0
    dev = next(model.parameters()).device
    for s in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[s:s + batch_size].to(dev)
        mask = attention_mask[s:s + batch_size].to(dev)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        target = ids[:, 1:]
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        loss = torch.nn.functional.cross_entropy(logits[valid], target[valid], reduction="sum")
        nll += float(loss)
        count += int(valid.sum())
    if count == 0:
        from .errors import UserError

        raise UserError("no tokens to evaluate")
    return math.exp(nll / count)
