"""Peak memory of the student's loss and of the teacher service at Qwen3's vocabulary (151,936).

Both sides are measured in fresh processes (resident memory sampled every 2 ms, the peak above
the process's baseline once its inputs exist), each at 1,024, 2,048 and 4,096 tokens, two ways:

* student: one micro-batch (forward, the loss, backward) of a Qwen3 with the real vocabulary and
  a body of almost nothing (hidden 64, one layer), top-128 targets. "whole" is the model's own
  forward and the loss over the [tokens x vocabulary] logits (what the trainer did before);
  "chunked" is the trainer's `batch_loss` (the LM head and the loss a chunk of rows at a time,
  recomputed in backward).
* teacher: `TeacherService` on a tiny Qwen3-MoE with the same vocabulary, top-128 codec. "whole"
  forces one chunk of all rows (the old service's logits, float copy, temperature and softmax);
  "chunked" is the default.

    python bench/scale_memory.py            # writes docs/results/scale_memory.md
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

V = 151_936
TOKENS = (1024, 2048, 4096)
SEQ = 1024

CHILD = r"""
import gc, json, sys, threading, time
import numpy as np, psutil, torch
side, mode, tokens, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(2)
from moe2dense_ray.core import lm_head
if mode == "whole":
    lm_head.CHUNK_ELEMENTS = 1 << 62  # one chunk: every row's logits at once
B, S = tokens // 1024, 1024
gen = torch.Generator().manual_seed(0)
ids = torch.randint(0, %(V)d, (B, S), generator=gen)
batch = {"block_index": np.arange(B), "input_ids": ids.numpy(), "attention_mask": np.ones((B, S), dtype=np.int8)}
if side == "student":
    from transformers import AutoModelForCausalLM
    from moe2dense_ray.distill.codec import CODECS
    from moe2dense_ray.distill.config import DistillConfig
    from moe2dense_ray.distill.losses import LOSSES, masked_mean
    from moe2dense_ray.distill.worker import batch_loss, decode_target
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    cols = []
    for s in range(0, B * S, 256):  # targets made a few rows at a time, before the baseline
        cols.append(CODECS["topk"].encode(3 * torch.randn(256, %(V)d, generator=gen), k=128))
    for k in cols[0]:
        batch[k] = np.concatenate([c[k] for c in cols]).reshape(B, S, *cols[0][k].shape[1:])
    cfg = DistillConfig(teacher="t", student="s", data="d", tokens=1, out="o")
    def run():
        if mode == "whole":
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            loss = masked_mean(LOSSES["forward_kl"](logits.reshape(-1, %(V)d), decode_target("topk", batch), 1.0),
                               torch.ones(B * S))
        else:
            loss = batch_loss(model, batch, cfg, torch.device("cpu"))[0]
        loss.backward()
        return float(loss)
else:
    from moe2dense_ray.distill.stream import TeacherService
    svc = TeacherService(path, codec="topk", top_k=128, draws=12, temperature=1.0, seed=0, threads=2)
    def run():
        out = svc(dict(batch))
        return float(out["t_lhead"].astype(np.float32).mean())
gc.collect()
proc = psutil.Process()
base = peak = proc.memory_info().rss
done = False
def sample():
    global peak
    while not done:
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.002)
t = threading.Thread(target=sample, daemon=True); t.start()
t0 = time.perf_counter()
value = run()
seconds = time.perf_counter() - t0
done = True; t.join()
print(json.dumps({"peak_mb": (peak - base) / 2**20, "seconds": seconds, "value": value}))
""" % {"V": V}


def _models(d: str) -> tuple[str, str]:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

    from tiny import make_tiny_moe  # the tests' tiny-model builder

    student = os.path.join(d, "student")
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(student)
    teacher = os.path.join(d, "teacher")
    make_tiny_moe("qwen3_moe", teacher, vocab_size=V, hidden_size=64, moe_intermediate_size=32, num_experts=8,
                  num_experts_per_tok=2, num_hidden_layers=1, mlp_only_layers=[], scale=0.05)
    return student, teacher


def measure(side: str, mode: str, tokens: int, path: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, side, mode, str(tokens), path], capture_output=True, text=True,
                         check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        student, teacher = _models(d)
        for side, path in (("student", student), ("teacher", teacher)):
            for mode in ("whole", "chunked"):
                for tokens in TOKENS:
                    m = measure(side, mode, tokens, path)
                    rows.append((side, mode, tokens, m))
                    print(side, mode, tokens, json.dumps(m), flush=True)
    fp32_logits = {t: t * V * 4 / 2**20 for t in TOKENS}
    lines = [f"Peak resident memory above baseline (MB) of one student micro-batch (forward, loss, backward) and one "
             f"teacher-service batch (top-128), vocabulary {V:,}, tiny bodies (hidden 64, one layer), on CPU, "
             f"measured by `python bench/scale_memory.py` in fresh processes. For scale: the fp32 logits of "
             + ", ".join(f"{t:,} tokens are {fp32_logits[t]:,.0f} MB" for t in TOKENS) + ".", "",
             "| side | mode | " + " | ".join(f"{t:,} tokens" for t in TOKENS) + " | growth 1k -> 4k | seconds at 4k |",
             "|---|---|" + "---:|" * (len(TOKENS) + 2)]
    summary = {}
    for side in ("student", "teacher"):
        for mode in ("whole", "chunked"):
            ms = [m for s, md, t, m in rows if s == side and md == mode]
            growth = ms[-1]["peak_mb"] - ms[0]["peak_mb"]
            summary[(side, mode)] = (ms[-1]["peak_mb"], growth)
            lines.append(f"| {side} | {mode} | " + " | ".join(f"{m['peak_mb']:,.0f}" for m in ms)
                         + f" | {growth:,.0f} | {ms[-1]['seconds']:.2f} |")
    lines.append("")
    for side in ("student", "teacher"):
        (w, gw), (c, gc) = summary[(side, "whole")], summary[(side, "chunked")]
        lines.append(f"- {side}: at 4,096 tokens the chunked peak is {c:,.0f} MB, {w / max(c, 1):.1f}x below the whole "
                     f"computation's {w:,.0f} MB; from 1,024 to 4,096 tokens it grows {gc:,.0f} MB (whole: {gw:,.0f}).")
    for side, mode, tokens, m in rows:  # same numbers either way (the loss; the teacher's mean log-mass)
        if mode == "chunked":
            ref = next(r for s, md, t, r in rows if (s, md, t) == (side, "whole", tokens))
            assert abs(ref["value"] - m["value"]) <= 1e-4 * max(1.0, abs(ref["value"])), (side, tokens, ref, m)
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.path.join(os.path.dirname(__file__), "..", "docs", "results", "scale_memory.md")
    with open(out, "w") as f:
        f.write("# Memory at a real vocabulary\n\n" + text)


if __name__ == "__main__":
    main()
