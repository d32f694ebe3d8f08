"""A causal LM split at its last layer, so that logits are made a few rows at a time.

At a real vocabulary the logits dwarf everything else a forward pass holds: Qwen3's 151,936
entries a token are 2.5 GB in fp32 for 4,096 tokens, where the hidden states of a 2,048-wide
model are 34 MB. The teacher service and the student's loss therefore run the model's body once
and apply the LM head to chunks of rows (`rows_per_chunk`), so that no [tokens x vocabulary]
tensor ever exists: the teacher encodes each chunk's top-k and drops it; the student's loss
recomputes each chunk's logits in backward (`distill.losses.chunked_loss`).

What the head is comes from the model itself: `get_decoder()` (the body, whose output is already
normalised), `get_output_embeddings()` (the projection, tied or not), and the logit transforms
that some dense classes apply after it, read from config keys (`TRANSFORMS`). `LMHead.check`
compares the split model against the model's own forward on a few tokens, so a class with a
transform this table does not know is refused rather than trained on wrong logits.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

CHUNK_ELEMENTS = 1 << 25
"""Logit entries per chunk (128 MB in fp32): ~220 rows at V = 151,936, 8,192 rows at V = 4,096
(one chunk for the bundled teacher's micro-batches: chunking costs nothing where it is not needed)."""


def rows_per_chunk(vocab_size: int, elements: int | None = None) -> int:
    return max(1, (elements or CHUNK_ELEMENTS) // max(1, vocab_size))


def _scale(factor: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x * factor


def _softcap(cap: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.tanh(x / cap) * cap


TRANSFORMS: dict[str, Callable[[float], Callable[[torch.Tensor], torch.Tensor]]] = {
    "logit_scale": _scale,  # Cohere: logits * logit_scale
    "logits_scaling": lambda v: _scale(1.0 / v),  # Granite: logits / logits_scaling
    "final_logit_softcapping": _softcap,  # Gemma 2/3: cap * tanh(logits / cap)
}
"""Config key -> what a model class does to its logits after the LM head, in this order. A key
that is absent, None or neutral (1 for scales) changes nothing."""


class LMHead:
    """`hidden(ids, mask)` -> the body's last hidden states [B, S, H]; `logits(h)` -> [..., V].

    Accepts a plain `PreTrainedModel` or a DeepSpeed engine (its `.module`); either way the calls
    go through the submodules, so ZeRO-3's hooks gather their weights as in a normal forward.
    """

    def __init__(self, model):
        base = getattr(model, "module", model)
        self.model = base
        self.body = base.get_decoder() if hasattr(base, "get_decoder") else base.base_model
        self.head = base.get_output_embeddings()
        if self.body is None or self.body is base or self.head is None:
            raise ValueError(f"{type(base).__name__} has no separate body and output embeddings")
        cfg = base.config
        cfg = getattr(cfg, "get_text_config", lambda: cfg)()
        self.transforms = [make(float(v)) for key, make in TRANSFORMS.items()
                           if (v := getattr(cfg, key, None)) is not None
                           and not (key != "final_logit_softcapping" and float(v) == 1.0)]
        self.vocab_size = int(self.head.weight.shape[0])

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.head(hidden)
        for f in self.transforms:
            x = f(x)
        return x

    def rows(self, elements: int | None = None) -> int:
        return rows_per_chunk(self.vocab_size, elements)

    @torch.no_grad()
    def check(self, tokens: int = 8, atol: float | None = None) -> float:
        """Largest difference between the split model's logits and the model's own, on `tokens`
        tokens; raises ValueError past `atol` (default: a few units of the dtype's precision)."""
        dev = next(self.model.parameters()).device
        ids = torch.arange(tokens, device=dev).remainder(self.vocab_size).unsqueeze(0)
        mask = torch.ones_like(ids)
        whole = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        split = self.logits(self.hidden(ids, mask)).float()
        err = float((whole - split).abs().max())
        scale = float(whole.abs().max()) or 1.0
        dtype = self.head.weight.dtype
        limit = atol if atol is not None else 8 * torch.finfo(dtype).eps * scale + 1e-6
        if not math.isfinite(err) or err > limit:
            raise ValueError(f"{type(self.model).__name__}: logits from its body and head differ from its own "
                             f"forward by {err:.3g} (a logit transform this project does not know)")
        return err


__all__ = ["LMHead", "CHUNK_ELEMENTS", "TRANSFORMS", "rows_per_chunk"]
