"""The codec at Qwen3's vocabulary (151,936): bytes per token and loss error, top-k and sampled.

The bundled teacher's 4,096-token vocabulary flatters the id gaps (`bench/codec.py`: 169 B a token
at k = 128). This measures the same codec on a synthetic teacher shaped like a real one at
V = 151,936: a Zipf prior over token frequency whose frequent tokens are spread over the whole id
range (a random permutation, as a BPE vocabulary spreads them), a few context-specific tokens per
position lifted well above it, and noise; the student is the teacher plus noise. For each
setting: raw and Parquet bytes per token (the codec's PARQUET_OPTIONS), the mean forward KL on
the exact top-k and the change the encoding makes (budget 1e-3 nats), with the ids coded as they
are and coded by frequency rank (`codec.IdOrder`; here the order is estimated from a separate
sample of the teacher's distributions, where a stream estimates it from its text).

    python bench/codec_vocab.py            # writes docs/results/codec_vocab.md
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from codec import sizes  # noqa: E402  (bench/codec.py: raw, Parquet zstd and tuned bytes per token)

from moe2dense_ray.distill.codec import (  # noqa: E402
    IdOrder,
    SparseTarget,
    decode_sampled,
    decode_topk,
    encode_sampled,
    encode_topk,
    teacher_sample,
    teacher_topk,
)
from moe2dense_ray.distill.losses import forward_kl  # noqa: E402

V = 151_936
N = 2048
CHUNK = 256


def synthetic(n: int, seed: int, perm: torch.Tensor) -> torch.Tensor:
    """[n, V] teacher logits: Zipf prior by frequency rank (ids permuted), context boosts, noise."""
    g = torch.Generator().manual_seed(seed)
    prior = -1.3 * torch.log(torch.arange(1, V + 1, dtype=torch.float32))
    out = torch.empty(n, V)
    for s in range(0, n, CHUNK):
        m = min(CHUNK, n - s)
        x = prior.expand(m, V) + 0.8 * torch.randn(m, V, generator=g)
        ctx = torch.randint(0, V, (m, 16), generator=g)
        x.scatter_add_(1, ctx, 9 + 4 * torch.rand(m, 16, generator=g))
        x[torch.arange(m), torch.randint(0, V, (m,), generator=g)] += 14  # the likely next token
        out[s:s + m, perm] = x  # rank r's logit goes to id perm[r]
    return out


def main() -> None:
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(V, generator=g)  # frequency rank -> id
    teacher = synthetic(N, 1, perm)
    student = teacher + 1.0 * torch.randn(N, V, generator=g)
    # a frequency order as a stream could carry it: ids by the mean probability on other positions
    mean_p = sum(torch.softmax(synthetic(CHUNK, 2 + i, perm), -1).mean(0) for i in range(4))
    ranked = IdOrder(mean_p.argsort(descending=True), V)

    logp = torch.log_softmax(teacher, -1)
    entropy = float(-(logp.exp() * logp).sum(-1).mean())
    dense = float(forward_kl(student, SparseTarget(torch.arange(V).expand(N, V), logp)).mean())
    del logp
    rows = []
    for k in (64, 128):
        ids, logprobs = teacher_topk(teacher, k)
        head = float(logprobs.exp().sum(-1).mean())
        exact = float(forward_kl(student, SparseTarget(ids, logprobs)).mean())
        for name, order in (("id", None), ("frequency rank", ranked)):
            columns = encode_topk(ids, logprobs, V, order)
            coded = float(forward_kl(student, SparseTarget(*decode_topk(columns, order))).mean())
            raw, _, tuned = sizes(columns)
            rows.append(f"| top-{k}, ids by {name} | {raw:.0f} | {tuned:.1f} | {head:.3f} | {exact:.4f} | "
                        f"{coded - exact:+.1e} |")
    sample = teacher_sample(teacher, 12, torch.Generator().manual_seed(3))
    est = float(forward_kl(student, SparseTarget.from_sampled(*sample)).mean())
    for name, order in (("id", None), ("frequency rank", ranked)):
        columns = encode_sampled(*sample, V, order)
        back = float(forward_kl(student, SparseTarget.from_sampled(*decode_sampled(columns, order))).mean())
        raw, _, tuned = sizes(columns)
        rows.append(f"| sampled, 12 draws, ids by {name} | {raw:.0f} | {tuned:.1f} | | {est:.4f} | {back - est:+.1e} |")
    table = "\n".join([
        f"Synthetic teacher at V = {V:,} ({N} tokens; mean entropy {entropy:.2f} nats; frequent tokens spread "
        f"over the id range), student = teacher + N(0, 1) noise; dense forward KL {dense:.4f}. Bytes per token; "
        f"Parquet with the codec's PARQUET_OPTIONS. head = mean probability the top-k holds; loss = mean forward "
        f"KL on the exact top-k (+ tail bucket), or the sampled estimate; codec error = change the encoding makes "
        f"(budget 1e-3). Measured by `python bench/codec_vocab.py`.", "",
        "| format | raw B | Parquet B | head | loss | codec error |", "|---|---:|---:|---:|---:|---:|", *rows])
    print(table)
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "results", "codec_vocab.md"), "w") as f:
        f.write("# The codec at a real vocabulary\n\n" + table + "\n")


if __name__ == "__main__":
    main()
