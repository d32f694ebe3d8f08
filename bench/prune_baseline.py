"""The dense-to-dense baseline on the bundled models: MoE-to-dense K=4 students of the teacher
against the dense peer width-pruned (`prune-dense`) to the same parameter count.

The matched width W comes from the parameter counts: the peer's parameters outside its FFNs plus
W times its parameters per FFN neuron equals the K=4 student's parameters. Calibration and
held-out text are the demo's (32 blocks of 256 tokens of calibration.jsonl; the first 16 blocks
of 256 tokens of heldout.jsonl). Keeping W random neurons (zeroing the others' up rows, which is
exactly pruning them) is the floor the activation importance must beat. Prints a Markdown table
and writes `docs/results/prune_baseline.{md,json}` (or --out).

    python bench/prune_baseline.py [--samples 32 --seq-len 256 --heldout-blocks 16]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from moe2dense_ray.convert.prune import PruneConfig
from moe2dense_ray.core.config import BuildConfig, CalibrateConfig, PlanSettings


def main() -> None:
    import torch
    import transformers

    from moe2dense_ray import assets
    from moe2dense_ray.convert.build import build
    from moe2dense_ray.convert.calibrate import calibrate
    from moe2dense_ray.convert.plan import make_plan
    from moe2dense_ray.convert.prune import prune_dense
    from moe2dense_ray.core.checkpoint import CheckpointReader
    from moe2dense_ray.core.report import markdown_table
    from moe2dense_ray.eval.metrics import heldout_blocks, load_model, model_perplexity

    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--heldout-blocks", type=int, default=16)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--work", default="runs/prune_baseline")
    a = ap.parse_args()
    transformers.utils.logging.disable_progress_bar()

    t0 = time.time()
    teacher, peer, data = assets.teacher_path(), assets.dense_peer_path(), assets.calibration_path()
    held = heldout_blocks(teacher, assets.heldout_path(), a.heldout_blocks, a.seq_len)

    def ppl(model) -> float:
        return model_perplexity(model, held)

    def params(path: str) -> int:
        r = CheckpointReader(path)
        return sum(int(torch.Size(r.shape(k)).numel()) for k in r.keys())

    rows = [{"model": "teacher (MoE)", "params": params(teacher), "W": None, "ppl": ppl(load_model(teacher))}]
    stats = calibrate(CalibrateConfig(src=teacher, data=data, samples=a.samples, seq_len=a.seq_len, workers=0), progress=False)
    K = a.experts
    student_params = None
    for scoring in ("random", "sf", "cp"):
        rep = build(BuildConfig(src=teacher, out=os.path.join(a.work, f"student-K{K}-{scoring}"), overwrite=True), make_plan(stats, PlanSettings(experts=K, scoring=scoring, scaling="uniform")), progress=False)
        student_params = rep.student_params
        rows.append({"model": f"MoE-to-dense K={K} {scoring}", "params": rep.student_params,
                     "W": rep.intermediate_size, "ppl": ppl(load_model(rep.out))})

    # the matched width, from parameter counts alone
    r = CheckpointReader(peer)
    I = r.config_dict()["intermediate_size"]
    ffn = sum(int(torch.Size(r.shape(k)).numel()) for k in r.keys() if ".mlp." in k)
    peer_params = params(peer)
    per_neuron, rest = ffn // I, peer_params - ffn
    W, left = divmod(student_params - rest, per_neuron)
    rows.append({"model": "dense peer", "params": peer_params, "W": I, "ppl": ppl(load_model(peer))})

    widths = sorted({W, I // 2})
    for w in widths:
        rep = prune_dense(PruneConfig(src=peer, data=data, out=os.path.join(a.work, f"peer-W{w}"), width=w, samples=a.samples, seq_len=a.seq_len, overwrite=True), progress=False)
        rows.append({"model": f"dense peer pruned to W={w} (activation importance)"
                     + (", matched" if w == W else ""), "params": rep.params_after, "W": w,
                     "ppl": ppl(load_model(rep.out))})
    for seed in range(a.random_seeds):
        model = load_model(peer)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in model.model.layers:
                drop = torch.randperm(I, generator=g)[W:]
                layer.mlp.up_proj.weight[drop] = 0  # exactly the model with those neurons pruned
        rows.append({"model": f"dense peer, W={W} random neurons (seed {seed})",
                     "params": peer_params - (I - W) * per_neuron, "W": W, "ppl": ppl(model)})

    table = markdown_table({"model": x["model"], "params (M)": x["params"] / 1e6, "FFN width": x["W"],
                            "held-out perplexity": x["ppl"]} for x in rows)
    note = (f"K={K} student: {student_params} parameters; dense peer: {rest} outside its FFNs + {per_neuron} per "
            f"FFN neuron x {I} -> matched W = {W} (remainder {left} parameters). Calibration: {a.samples} blocks "
            f"x {a.seq_len} tokens of calibration.jsonl; held-out: the first {a.heldout_blocks} blocks of "
            f"{a.seq_len} tokens of heldout.jsonl. {time.time() - t0:.0f}s.")
    print(table + "\n\n" + note)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "prune_baseline.md"), "w") as f:
        f.write("# Dense-to-dense baseline: the dense peer width-pruned to a K=4 student's size\n\n"
                "Written by `python bench/prune_baseline.py`; no distillation for any row.\n\n"
                + table + "\n\n" + note + "\n")
    with open(os.path.join(a.out, "prune_baseline.json"), "w") as f:
        json.dump({"rows": rows, "matched_width": W, "student_params": student_params, "peer_params": peer_params,
                   "per_neuron": per_neuron, "samples": a.samples, "seq_len": a.seq_len,
                   "heldout_blocks": a.heldout_blocks}, f, indent=1)


if __name__ == "__main__":
    main()
