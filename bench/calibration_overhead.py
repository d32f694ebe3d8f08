"""Calibration cost against its floors, measured in one run (prints ratios; no pass/fail).

  router-only statistics  vs  a bare teacher forward on the same tokens      (goal <= 1.1x)
  full expert statistics  vs  a forward that runs all E experts on every token (goal <= 1.3x)

The second floor is the same teacher with num_experts_per_tok = E: the least work any method
that needs every expert's output on every token can do.

    python bench/calibration_overhead.py [--hidden 256 --experts 16 --layers 4 --tokens 4096]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--expert-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from moe2dense_ray.convert.calibrate import Calibrator
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from tiny import make_tiny_moe  # the tests' tiny-model builder

    kw = dict(hidden_size=a.hidden, num_experts=a.experts, num_experts_per_tok=a.top_k, moe_intermediate_size=a.expert_size,
              num_hidden_layers=a.layers, mlp_only_layers=[], num_attention_heads=4, num_key_value_heads=2,
              head_dim=a.hidden // 4, vocab_size=4096, max_position_embeddings=a.seq_len)
    ids = torch.randint(0, 4096, (a.batch, a.seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with tempfile.TemporaryDirectory() as d:
        make_tiny_moe("qwen3_moe", d, scale=0.05, **kw)
        bare = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        all_experts = make_tiny_moe("qwen3_moe", None, scale=0.05, **{**kw, "num_experts_per_tok": a.experts})
        router_cal = Calibrator(d, full=False)
        full_cal = Calibrator(d, full=True)

        def fwd(m):  # the decoder stack, as calibration runs it (no LM head)
            with torch.inference_mode():
                m.model(input_ids=ids, attention_mask=mask, use_cache=False)

        t_bare = _time(lambda: fwd(bare), a.repeat)
        t_router = _time(lambda: router_cal.run(ids, mask, batch_size=a.batch), a.repeat)
        t_floor = _time(lambda: fwd(all_experts), a.repeat)
        t_full = _time(lambda: full_cal.run(ids, mask, batch_size=a.batch), a.repeat)
    n = ids.numel()
    print(f"model: {a.layers} layers, hidden {a.hidden}, E={a.experts}, top-{a.top_k}, expert size {a.expert_size}; "
          f"{n} tokens; torch threads {torch.get_num_threads()}")
    print("| run | seconds | tokens/s | ratio | goal |")
    print("|---|---:|---:|---:|---:|")
    print(f"| bare teacher forward | {t_bare:.3f} | {n / t_bare:,.0f} | 1.00 | |")
    print(f"| router-only statistics | {t_router:.3f} | {n / t_router:,.0f} | {t_router / t_bare:.2f} | <= 1.1 |")
    print(f"| all-experts forward (floor) | {t_floor:.3f} | {n / t_floor:,.0f} | 1.00 | |")
    print(f"| full expert statistics | {t_full:.3f} | {n / t_full:,.0f} | {t_full / t_floor:.2f} | <= 1.3 |")


if __name__ == "__main__":
    main()
