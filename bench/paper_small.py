"""The paper's comparisons at small scale, on the bundled teacher, after equal distillation.

One `moe2dense sweep` with no early stopping distills every MoE-to-dense configuration from one
calibration and one teacher stream: the scorings at K = k (random with three seeds), selecting
more experts and merging them (K = 8 into k = 4, each grouping), score scaling, and one student
trained on cross-entropy alone. Two baselines of the same parameter count are then distilled
with exactly the settings the sweep gave its trials, from the same stream:

* dense-to-dense: the bundled dense peer (trained like the teacher, same size) width-pruned by
  `prune-dense` to the K = 4 student's parameter count;
* random FFN: the K = 4 student with its FFN weights re-initialised, attention and embeddings
  kept (the paper's "random FFN + teacher attention").

Both baselines are also trained on cross-entropy alone, because the bundled teacher is
undertrained: plain training on its corpus overtakes it after about a million tokens, so
distillation only means something where it still beats cross-entropy. Every final student is
scored on the stream's validation blocks and on the shipped lm-eval tasks.

    python bench/paper_small.py [--tokens 200000] [--work runs/paper-small]

Writes docs/results/paper_small.{md,json}, paper_small_curves.png and paper_small_bars.png;
docs/RESULTS.md sets them beside the paper's findings.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time

from moe2dense_ray.convert.prune import PruneConfig
from moe2dense_ray.core.config import BuildConfig, PlanSettings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

K = 4  # the teacher's top-k, the paper's best setting K = k
DISTILL = dict(lr=1e-3, batch_size=8)  # every trial and baseline: 2,048 tokens per optimizer step
_D = f"lr: {DISTILL['lr']}, batch_size: {DISTILL['batch_size']}"
SPACE = f"""\
- {{scoring: [do-acp, acp, cp, pp, sf, reap, ean], experts: {K}, {_D}}}
- {{scoring: random, experts: {K}, seed: [0, 1, 2], {_D}}}
- {{scoring: sf, experts: {2 * K}, groups: {K}, grouping: [random, weight, output, router], {_D}}}
- {{scoring: do-acp, experts: {K}, scaling: score, {_D}}}
- {{scoring: do-acp, experts: {K}, ce_weight: 1.0, {_D}}}
"""
HELDOUT_BLOCKS = 40  # of heldout.jsonl, in file order, as bench/distill.py
SETTINGS = dict(samples=64, seq_len=256, top_k=256, val_blocks=40, report_every=6, scheduler="none",
                calibration_workers=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=200_000, help="distillation tokens per student")
    p.add_argument("--work", default="runs/paper-small")
    p.add_argument("--results", default="docs/results")
    p.add_argument("--tag", default="", help="suffix of the result files (paper_small{TAG}.md), for a second budget")
    p.add_argument("--fresh", action="store_true", help="start over (default: keep what an earlier run in --work "
                   "finished: the sweep resumes, finished baselines are read back)")
    args = p.parse_args()

    from moe2dense_ray import assets
    from moe2dense_ray.sweep import SweepConfig, sweep

    t0 = time.time()
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work, exist_ok=True)
    space = os.path.join(args.work, "space.yaml")
    with open(space, "w") as f:
        f.write(SPACE)
    out = os.path.join(args.work, "sweep")
    cfg = SweepConfig(teacher=assets.teacher_path(), data=assets.train_path(), space=space, out=out,
                      tokens=args.tokens, resume=os.path.exists(os.path.join(out, "sweep.yaml")), **SETTINGS)
    summary = sweep(cfg, progress=False)
    print(summary["leaderboard"], flush=True)
    rows = _sweep_rows(cfg)
    rows += _baselines(cfg, args.work)
    refs = _references(cfg, args.work)
    held = _heldout()
    for r in rows:
        r["held-out before"] = _heldout_ppl(r.pop("init"), held)
        r.update(_tasks(r.pop("student"), held))
    _write(args, cfg, rows, refs, time.time() - t0)


def _sweep_rows(cfg) -> list[dict]:
    """Each sweep trial as a result row: its settings, curve and final student."""
    import csv

    from moe2dense_ray.distill.driver import read_metrics

    rows = []
    for r in csv.DictReader(open(os.path.join(cfg.out, "leaderboard.csv"))):
        run = os.path.join(cfg.out, "trials", r["trial"], "run")
        kind = "cross-entropy" if r.get("ce_weight") else "KD"
        name = f"{r['scoring']} K={r['experts']}"
        if r.get("groups"):
            name = f"{r['scoring']} K={r['experts']} -> {r['groups']}, {r['grouping']} grouping"
        if r.get("seed"):
            name += f" seed {r['seed']}"
        if r.get("scaling"):
            name += f", {r['scaling']} scaling"
        rows.append(_row(name, kind, run, read_metrics(run), group=_group(r),
                         init=os.path.join(cfg.out, "trials", r["trial"], "student")))
    return rows


def _group(r: dict) -> str:
    if r.get("groups"):
        return "merge"
    if r.get("ce_weight") or r.get("scaling"):
        return "other"
    return "scoring"


def _row(name: str, kind: str, run: str, metrics: list[dict], *, group: str, init: str) -> dict:
    val = [m for m in metrics if "val_ppl" in m]
    return {"name": name, "kind": kind, "group": group, "init": init, "ppl before": val[0]["val_ppl"],
            "ppl after": val[-1]["val_ppl"], "KL after": val[-1].get("val_kl"), "tokens": val[-1]["tokens"],
            "curve": [(m["tokens"], m["val_ppl"]) for m in val], "student": os.path.join(run, "student")}


def _baselines(cfg, work: str) -> list[dict]:
    """The pruned dense peer and the random-FFN student, each distilled and trained on cross-entropy
    with the sweep trials' own settings, from the sweep's stream."""
    from moe2dense_ray import assets
    from moe2dense_ray.convert.build import build
    from moe2dense_ray.convert.plan import make_plan
    from moe2dense_ray.convert.prune import prune_dense
    from moe2dense_ray.convert.stats import Stats
    from moe2dense_ray.distill.driver import distill, read_metrics
    from moe2dense_ray.sweep import _distill_config, concurrency

    moe = os.path.join(work, f"do-acp-K{K}")
    build(BuildConfig(src=cfg.teacher, out=moe, overwrite=True), make_plan(Stats.load(os.path.join(cfg.out, "stats")), PlanSettings(experts=K, scoring="do-acp")), progress=False)
    width = _matched_width(moe, assets.dense_peer_path())
    pruned = os.path.join(work, f"dense-peer-W{width}")
    prune_dense(PruneConfig(src=assets.dense_peer_path(), data=assets.calibration_path(), out=pruned, width=width, samples=SETTINGS["samples"], seq_len=SETTINGS["seq_len"], overwrite=True), progress=False)
    random_ffn = _random_ffn(moe, os.path.join(work, f"random-ffn-K{K}"))
    _, threads = concurrency(cfg)
    rows = []
    for name, student, group in ((f"dense peer pruned to W={width} (prune-dense)", pruned, "dense"),
                                 (f"random FFN + teacher attention (K={K} shape)", random_ffn, "random-ffn")):
        for kind, extra in (("KD", {}), ("cross-entropy", {"ce_weight": 1.0})):
            run = os.path.join(work, "runs", f"{os.path.basename(student)}-{'kd' if kind == 'KD' else 'ce'}")
            if not os.path.exists(os.path.join(run, "results.json")):
                distill(_distill_config(cfg, {**DISTILL, **extra}, student=student, run=run, threads=threads),
                        progress=False)
            rows.append(_row(name, kind, run, read_metrics(run), group=group, init=student))
            print(f"{name}, {kind}: {rows[-1]['ppl before']:.1f} -> {rows[-1]['ppl after']:.2f}", flush=True)
    return rows


def _params(path: str) -> int:
    from moe2dense_ray.eval.metrics import load_model

    return sum(t.numel() for t in load_model(path).parameters())


def _matched_width(student: str, dense: str) -> int:
    """The FFN width at which the dense peer has the student's parameter count (the two share
    everything outside the FFNs; a neuron costs 3 x hidden per layer)."""
    from moe2dense_ray.eval.metrics import load_model

    model = load_model(dense)
    c = model.config
    per_neuron = 3 * c.hidden_size * c.num_hidden_layers
    outside = sum(t.numel() for t in model.parameters()) - per_neuron * c.intermediate_size
    width, rest = divmod(_params(student) - outside, per_neuron)
    assert rest == 0, f"the K={K} student is not a whole number of dense-peer FFN neurons ({rest} left over)"
    return width


def _random_ffn(src: str, out: str) -> str:
    """`src` with every FFN weight drawn afresh (the model's initializer range), all else kept."""
    import torch
    from transformers import AutoModelForCausalLM

    from moe2dense_ray.core.checkpoint import AUX_FILES

    model = AutoModelForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * model.config.initializer_range)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    for name in AUX_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), out)
    return out


def _references(cfg, work: str) -> dict[str, float]:
    """Teacher and dense peer perplexity on the stream's validation blocks, the ones every student
    is validated on."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from moe2dense_ray import assets
    from moe2dense_ray.eval.metrics import load_model, perplexity

    rows = []
    for name in sorted(glob.glob(os.path.join(cfg.out, "logits", "*.parquet"))):
        table = pq.read_table(name, columns=["block_index", "input_ids", "attention_mask"])
        rows += [r for r in table.to_pylist() if r["block_index"] < cfg.val_blocks]
    rows.sort(key=lambda r: r["block_index"])
    assert len(rows) == cfg.val_blocks, (len(rows), cfg.val_blocks)
    ids = torch.tensor(np.array([r["input_ids"] for r in rows]), dtype=torch.long)
    mask = torch.tensor(np.array([r["attention_mask"] for r in rows]), dtype=torch.long)
    return {"teacher": perplexity(load_model(assets.teacher_path()), ids, mask),
            "dense peer (unpruned, trained like the teacher)": perplexity(load_model(assets.dense_peer_path()), ids, mask),
            "params_student": _params(os.path.join(work, f"do-acp-K{K}")),
            "params_teacher": _params(assets.teacher_path())}


def _heldout():
    """Text no model here was trained on: the teacher's and the dense peer's training corpus is
    the stream's source, so its validation blocks flatter both (and anything that keeps their
    weights); heldout.jsonl does not."""
    from moe2dense_ray import assets
    from moe2dense_ray.eval.metrics import heldout_blocks

    return heldout_blocks(assets.teacher_path(), assets.heldout_path(), HELDOUT_BLOCKS, SETTINGS["seq_len"])


def _heldout_ppl(model: str, held) -> float:
    from moe2dense_ray.eval.metrics import model_perplexity

    return model_perplexity(model, held)


def _tasks(student: str, held) -> dict[str, float]:
    """Held-out perplexity and the shipped lm-eval tasks (next_line: acc_mutual_info, chance 0.25;
    last_word: acc)."""
    from moe2dense_ray.eval.stage import EvalConfig, evaluate_model

    tasks = evaluate_model(EvalConfig(model=student, samples=0), progress=False)["tasks"]
    return {"held-out after": _heldout_ppl(student, held),
            "next_line": tasks["next_line"]["metrics"]["acc_mutual_info"],
            "last_word": tasks["last_word"]["metrics"]["acc"]}


def _write(args, cfg, rows: list[dict], refs: dict, seconds: float) -> None:
    from moe2dense_ray import assets
    from moe2dense_ray.core.report import markdown_table, plot_bars, plot_curves

    teacher = refs["teacher"]
    held = _heldout()
    ref_tasks = {"teacher": _tasks(assets.teacher_path(), held),
                 "dense peer": _tasks(assets.dense_peer_path(), held)}
    teacher_held = ref_tasks["teacher"]["held-out after"]

    def table(selected: list[dict]) -> str:
        return markdown_table([{"student": r["name"], "training": r["kind"], "val ppl before": r["ppl before"],
                                "val ppl after": r["ppl after"], "held-out before": r["held-out before"],
                                "held-out after": r["held-out after"], "x teacher": r["held-out after"] / teacher_held,
                                "KL to teacher": r["KL after"], "next_line": r["next_line"],
                                "last_word": r["last_word"]} for r in selected], floats="{:.3g}")

    by = {g: sorted([r for r in rows if r["group"] == g], key=lambda r: r["held-out after"])
          for g in ("scoring", "merge", "other", "dense", "random-ffn")}
    ce = [r for r in by["other"] if r["kind"] == "cross-entropy"]
    scored = [r for r in by["scoring"] if not r["name"].startswith("random")]
    randoms = [r["held-out after"] for r in by["scoring"] if r["name"].startswith("random")]
    best = by["scoring"][0]
    sf = next(r for r in by["scoring"] if r["name"].startswith("sf "))
    headline = [best, by["merge"][0], *[r for r in by["dense"] + by["random-ffn"]], *ce]
    lines = [
        "# The paper at small scale (bench/paper_small.py)", "",
        f"Bundled teacher: {refs['params_teacher'] / 1e6:.2f}M parameters, 16 experts top-4, "
        f"validation perplexity **{teacher:.2f}** on the {cfg.val_blocks} validation blocks of {cfg.seq_len} tokens "
        f"every student is validated on while training (the first blocks of the teacher stream, never trained on by "
        f"a student, but drawn from the corpus the teacher and the dense peer were trained on). `held-out` is "
        f"perplexity on the first {HELDOUT_BLOCKS} blocks of heldout.jsonl, text no model here has seen; `x teacher` "
        f"is the held-out ratio to the teacher ({teacher_held:.2f}). Students: "
        f"{refs['params_student'] / 1e6:.2f}M parameters. Every student trains on the same {args.tokens:,} tokens "
        f"of the teacher's top-{cfg.top_k} stream: forward KL (or cross-entropy on the same text, where it says so), "
        f"AdamW lr {DISTILL['lr']} with warm-up and cosine decay, {DISTILL['batch_size']} x {cfg.seq_len}-token "
        f"batches, one training worker. Distillation from a stream is deterministic: a rerun gives the same numbers. "
        f"next_line is acc_mutual_info (chance 0.25, stderr about 0.04), last_word is acc (stderr about 0.02). "
        + (f"Benchmark time {seconds / 60:.0f} min on 2 CPU cores." if not cfg.resume else
         f"This run reused the finished trainings of an earlier one in {args.work} and redid only the "
         f"evaluations ({seconds / 60:.0f} min)."), "",
        markdown_table([{"reference": "teacher (MoE)", "val ppl": teacher, **ref_tasks["teacher"]},
                        {"reference": "dense peer (unpruned, trained like the teacher)",
                         "val ppl": refs["dense peer (unpruned, trained like the teacher)"], **ref_tasks["dense peer"]}],
                       floats="{:.3g}"), "",
        f"## Scorings at K = k = {K}", "", table(by["scoring"] + by["other"]), "",
        f"Held-out perplexity after distillation: random selection over 3 seeds {min(randoms):.2f} to {max(randoms):.2f}. "
        f"Best scoring: {scored[0]['name']} ({scored[0]['held-out after']:.2f}); worst: {scored[-1]['name']} "
        f"({scored[-1]['held-out after']:.2f}).", "",
        f"## K = k against selecting {2 * K} and merging into {K}", "",
        table([sf] + by["merge"]), "",
        "## MoE-to-dense against dense-to-dense and a random FFN, at the same parameter count", "",
        table(headline), "",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, f"paper_small{args.tag}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.results, f"paper_small{args.tag}.json"), "w") as f:
        json.dump({"tokens": args.tokens, "space": SPACE, "settings": SETTINGS, "distill": DISTILL,
                   "references": refs, "reference_tasks": ref_tasks, "rows": rows, "seconds": seconds}, f, indent=1)
    plot_curves({f"{r['name']} ({r['kind']})": r["curve"] for r in headline},
                os.path.join(args.results, f"paper_small{args.tag}_curves.png"), reference=("teacher", teacher),
                title=f"Validation perplexity while training ({refs['params_student'] / 1e6:.2f}M students)",
                xlabel="training tokens", ylabel="validation perplexity (log scale)")
    bars = [("teacher", teacher_held)] + [(f"{r['name']}" + (" (CE)" if r["kind"] != "KD" else ""),
                                           r["held-out after"]) for r in sorted(rows, key=lambda r: r["held-out after"])]
    plot_bars(bars, os.path.join(args.results, f"paper_small{args.tag}_bars.png"),
              title=f"After {args.tokens:,} training tokens", xlabel="held-out perplexity, log scale")


if __name__ == "__main__":
    main()
