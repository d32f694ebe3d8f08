"""`moe2dense demo`: the whole pipeline on the bundled teacher, on an embedded local Ray.

Calibrates once (expert-output statistics, on Ray actors), plans several scorings from the same
statistics, builds each student, and reports held-out perplexity of teacher and students in a
table, a JSON file and a PNG plot.
"""

from __future__ import annotations

import json
import os
import time

from .progress import Progress

DEMO_SCORINGS = ("random", "sf", "cp", "acp", "do-acp")


def _teacher_and_text(work: str) -> tuple[str, str, str]:
    """The bundled trained teacher and its text; a tiny random teacher if none is installed."""
    try:
        from . import assets

        return assets.teacher_path(), assets.calibration_path(), assets.heldout_path()
    except FileNotFoundError:
        pass
    return _fallback_teacher(work)


def _fallback_teacher(work: str) -> tuple[str, str, str]:
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .testing import make_tiny_moe

    rng = random.Random(0)
    words = "the a of to and in that is was he for it with as his on be at by king lord god said".split()
    text_path = os.path.join(work, "fallback_text.jsonl")
    os.makedirs(work, exist_ok=True)
    docs = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(60)]
    with open(text_path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs, trainers.WordLevelTrainer(special_tokens=["<unk>", "<|endoftext|>"]))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                     unk_token="<unk>")
    teacher = os.path.join(work, "fallback_teacher")
    if not os.path.isdir(teacher):
        make_tiny_moe("qwen3_moe", teacher, tokenizer=hf_tok, num_experts=8, mlp_only_layers=[])
    return teacher, text_path, text_path


def run_demo(out: str = "runs/demo", *, workers: int = 2, progress: bool = True,
             scorings: tuple[str, ...] = DEMO_SCORINGS, samples: int = 32, seq_len: int = 256) -> dict:
    from .build import build
    from .calibrate import _tokenizer, calibrate
    from .data import calibration_blocks
    from .evaluate import load_model, perplexity
    from .plan import make_plan

    os.makedirs(out, exist_ok=True)
    teacher, calib_text, held_text = _teacher_and_text(out)
    print(f"teacher: {teacher}")
    t0 = time.time()
    stats = calibrate(teacher, calib_text, samples=samples, seq_len=seq_len, workers=workers, full=True,
                      out=os.path.join(out, "stats"), overwrite=True, progress=progress)  # re-runnable
    E = stats.num_experts
    K = max(1, E // 4)
    print(f"calibrated {stats.tokens} tokens on {workers} Ray workers in {time.time() - t0:.1f}s; "
          f"keeping K={K} of E={E} experts per layer")
    tok = _tokenizer(teacher)
    held = calibration_blocks(held_text, tok, samples=16, seq_len=seq_len, seed=1)
    rows = [{"model": "teacher (MoE)", "params_M": None, "ppl": perplexity(load_model(teacher), held.input_ids, held.attention_mask)}]
    bar = Progress(len(scorings), "students", unit="plans", enabled=progress)
    for name in scorings:
        plan = make_plan(stats, experts=K, scoring=name, scaling="uniform")
        dst = os.path.join(out, f"student-{name}")
        rep = build(teacher, plan, dst, overwrite=True, progress=False)
        ppl = perplexity(load_model(dst), held.input_ids, held.attention_mask)
        rows.append({"model": f"dense K={K} {name}", "params_M": rep.student_params / 1e6, "ppl": ppl})
        rows[0]["params_M"] = rep.teacher_params / 1e6
        bar.update(1)
    bar.close()
    table = ["| model | params (M) | held-out perplexity |", "|---|---:|---:|"]
    for r in rows:
        table.append(f"| {r['model']} | {r['params_M']:.2f} | {r['ppl']:.2f} |")
    text = "\n".join(table)
    print("\nBefore distillation (the paper's grid metric):\n" + text)
    result = {"teacher": teacher, "experts": K, "num_experts": E, "tokens": stats.tokens, "rows": rows}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text + "\n")
    _plot(rows, os.path.join(out, "perplexity.png"))
    print(f"\nwrote {out}/results.md, results.json and perplexity.png in {time.time() - t0:.1f}s")
    return result


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import LogLocator, ScalarFormatter

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["model"] for r in rows][::-1]
    vals = [r["ppl"] for r in rows][::-1]
    ax.barh(names, vals, color=["#888"] * (len(rows) - 1) + ["#2a6"])
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min(vals) / 1.5, max(vals) * 1.6)
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("held-out perplexity, log scale (lower is better)")
    ax.set_title("MoE teacher vs dense students before distillation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
