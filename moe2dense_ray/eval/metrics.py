"""Evaluation: perplexity on held-out text (the paper's pre-distillation metric), and the loop
that plans, builds and measures students from one calibration (the demo and the scoring grid)."""

from __future__ import annotations

import math
import os

import torch


def load_model(path: str, dtype: torch.dtype = torch.float32):
    """A dense model (a student, a peer) on the CPU for evaluation or training, through the strict
    loader: a missing, unexpected or mis-shaped tensor is one error line, never a random value."""
    from ..core.models import load_causal_lm

    model, _, _ = load_causal_lm(path, device="cpu", dtype=str(dtype).removeprefix("torch."), moe=False)
    return model.eval()


@torch.no_grad()  # not inference_mode: under ZeRO-3 the model trains on after this
def heldout_sums(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, batch_size: int = 8,
                 targets=None, loss: str = "forward_kl", temperature: float = 1.0,
                 keep: torch.Tensor | None = None) -> dict[str, float]:
    """The sums behind `heldout_metrics` (next-token NLL and its count; with `targets`, the
    distillation loss and its count), so that several ranks' shares add up before the means.

    One forward of the model's body per batch, then the LM head a chunk of rows at a time
    (`distill.losses.chunked_loss`): no [tokens x vocabulary] tensor, at any vocabulary. Blocks
    whose `keep` is False are run but not counted (a rank's padding, so that every rank makes the
    same forward calls, as ZeRO-3 requires).
    """
    from ..core.lm_head import LMHead
    from ..distill.codec import SparseTarget
    from ..distill.losses import chunked_loss

    head = LMHead(model)
    dev = next(head.model.parameters()).device
    S = input_ids.shape[1]
    out = {"nll": 0.0, "tokens": 0, "kd": 0.0, "kd_tokens": 0}
    for s in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[s:s + batch_size].to(dev).long()
        mask = attention_mask[s:s + batch_size].to(dev).long()
        hidden = head.hidden(ids, mask)
        if keep is not None:
            mask = mask * keep[s:s + batch_size].to(dev).long().unsqueeze(1)
        part = None
        if targets is not None:
            rows = slice(s * S, (s + ids.shape[0]) * S)
            part = SparseTarget(targets.ids[rows], targets.logprobs[rows],
                                None if targets.weights is None else targets.weights[rows]).to(dev)
        sums = chunked_loss(head.logits, hidden, ids, mask, part, loss=loss, temperature=temperature, ce=True,
                            rows=head.rows())
        out["nll"] += float(sums.ce)
        out["tokens"] += sums.ce_tokens
        if part is not None:
            out["kd"] += float(sums.kd)
            out["kd_tokens"] += sums.tokens
    return out


def metrics_of(sums: dict[str, float], *, kl: bool) -> dict[str, float]:
    """Perplexity (and mean distillation loss) from `heldout_sums`' sums."""
    if sums["tokens"] == 0:
        from ..core.errors import UserError

        raise UserError("no tokens to evaluate")
    out = {"ppl": math.exp(sums["nll"] / sums["tokens"]), "tokens": int(sums["tokens"])}
    if kl:
        out["kl"] = sums["kd"] / max(sums["kd_tokens"], 1)
    return out


def heldout_metrics(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, batch_size: int = 8,
                    targets=None, loss: str = "forward_kl", temperature: float = 1.0) -> dict[str, float]:
    """Perplexity over the non-padding next-token predictions of the given blocks, and, given the
    teacher's `targets` for the same blocks (a `distill.codec.SparseTarget` over all their
    positions), the mean distillation loss to the teacher, in one forward pass per batch.
    """
    sums = heldout_sums(model, input_ids, attention_mask, batch_size=batch_size, targets=targets, loss=loss,
                        temperature=temperature)
    return metrics_of(sums, kl=targets is not None)


def perplexity(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, batch_size: int = 8) -> float:
    """Token-level perplexity over the non-padding next-token predictions of the given blocks."""
    return heldout_metrics(model, input_ids, attention_mask, batch_size=batch_size)["ppl"]


def heldout_blocks(src, text: str, blocks: int, seq_len: int, *, seed: int | None = None):
    """`blocks` blocks of `seq_len` tokens of `text`, packed by the tokenizer of the model at `src`
    (a path or URL; or a tokenizer itself), in file order: the same blocks for every model of one
    family, from run to run. With `seed`, from a seeded shuffle of the documents instead."""
    from ..core.data import calibration_blocks

    if isinstance(src, (str, os.PathLike)):
        from ..core.models import load_tokenizer

        src = load_tokenizer(str(src))
    order = {"shuffle_buffer": 1} if seed is None else {"seed": seed}
    return calibration_blocks(text, src, samples=blocks, seq_len=seq_len, **order)


def model_perplexity(model, held, *, batch_size: int = 8) -> float:
    """`perplexity` of a model (loaded, or a path to load) on a block set from `heldout_blocks`."""
    if isinstance(model, (str, os.PathLike)):
        model = load_model(str(model))
    return perplexity(model, held.input_ids, held.attention_mask, batch_size=batch_size)


__all__ = ["load_model", "heldout_metrics", "heldout_sums", "metrics_of", "perplexity", "heldout_blocks", "model_perplexity"]
