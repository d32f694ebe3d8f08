"""The paper's pre-distillation grid on the bundled teacher: perplexity by scoring, K and grouping.

One calibration (full statistics) serves every plan. Every plan is built twice: as the paper
builds it, and refitted (`--refit down`, sequential, on the same calibration blocks; see
docs/refit.md). Prints a Markdown table and writes `docs/results/scoring_grid.{md,json,png}`
(or --out).

    python bench/scoring_grid.py [--teacher DIR --data FILE --heldout FILE --samples 64 --seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

from moe2dense_ray.convert.methods import SCORINGS
from moe2dense_ray.core.config import CalibrateConfig


def main() -> None:
    from moe2dense_ray import assets
    from moe2dense_ray.convert.build import read_expert_weights
    from moe2dense_ray.convert.calibrate import calibrate
    from moe2dense_ray.core.config import RefitConfig
    from moe2dense_ray.core.report import markdown_table, plot_curves
    from moe2dense_ray.demo import students
    from moe2dense_ray.eval.metrics import heldout_blocks, model_perplexity

    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=assets.teacher_path())
    ap.add_argument("--data", default=assets.calibration_path())
    ap.add_argument("--heldout", default=assets.heldout_path())
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--random-seeds", type=int, default=5, help="draws of the random baseline per K")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--work", default="runs/scoring_grid")
    ap.add_argument("--refit-mode", default="sequential", choices=("sequential", "parallel"))
    a = ap.parse_args()
    refit = RefitConfig(data=a.data, samples=a.samples, seq_len=a.seq_len, workers=a.workers, refit="down",
                        refit_mode=a.refit_mode)

    t0 = time.time()
    stats = calibrate(CalibrateConfig(src=a.teacher, data=a.data, samples=a.samples, seq_len=a.seq_len, workers=a.workers, full_stats=True), progress=False)
    E = stats.num_experts
    held = heldout_blocks(a.teacher, a.heldout, a.eval_samples, a.seq_len, seed=123)
    teacher_ppl = model_perplexity(a.teacher, held)
    weights = read_expert_weights(a.teacher)
    ks = [k for k in (E // 8, E // 4, E // 2) if k >= 1]
    # random selection is the floor every scoring must beat; one draw is noise, so take several
    grid = [(s, K, "none", K, seed) for K in ks
            for s, seeds in [("random", range(a.random_seeds))] + [(s, [0]) for s in SCORED]
            for seed in seeds]
    grid += [(s, 2 * K, g, K, 0) for K in ks[:2] for s in ("cp", "do-acp") for g in ("weight", "output", "router")]
    configs = {f"{scoring}-K{K}-{grouping}-k{k}-s{seed}": dict(
        experts=K, groups=k, scoring=scoring, grouping=grouping, scaling="uniform", seed=seed,
        expert_weights=weights if grouping == "weight" else None) for scoring, K, grouping, k, seed in grid}
    rows = []
    for (scoring, K, grouping, k, seed), s in zip(grid, students(a.teacher, stats, configs, a.work, held,
                                                                 refit=refit)):
        rows.append({"scoring": scoring, "K": K, "grouping": grouping, "k": k, "seed": seed, "ppl": s["ppl"],
                     "refit_ppl": s["refit_ppl"], "params_M": s["params_M"]})
        print(f"{scoring:>7} K={K:<3} {grouping:>6} k={k:<3} seed {seed} ppl {s['ppl']:9.2f} "
              f"refitted {s['refit_ppl']:8.2f}", flush=True)

    os.makedirs(a.out, exist_ok=True)
    summary = summarize(rows)
    table = markdown_table(({"scoring": r["scoring"], "K": r["K"], "grouping": r["grouping"], "k": r["k"],
                             "params (M)": r["params_M"], "perplexity": _perplexity_cell(r),
                             "vs random": f"{r['vs_random']:.2f}x", "refitted": _perplexity_cell(r, "refit_"),
                             "refitted vs plain": f"{r['refit_ppl'] / r['ppl']:.2f}x"} for r in summary),
                           right=("perplexity", "vs random", "refitted", "refitted vs plain"))
    text = (f"Teacher {os.path.basename(a.teacher.rstrip('/'))}: E={E}, held-out perplexity {teacher_ppl:.2f}; "
            f"calibration {stats.tokens} tokens; evaluation {int(held.num_tokens)} tokens; no distillation. "
            f"`random` is the geometric mean (and range) over {a.random_seeds} seeds. `refitted`: the same plan "
            f"built with `--refit down --refit-mode {a.refit_mode}` (the down projections fitted in closed form to "
            f"the MoE layers' outputs on the calibration tokens; docs/refit.md).\n\n" + table)
    print("\n" + text)
    with open(os.path.join(a.out, "scoring_grid.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "scoring_grid.json"), "w") as f:
        json.dump({"teacher_ppl": teacher_ppl, "num_experts": E, "tokens": stats.tokens, "rows": rows,
                   "summary": summary}, f, indent=1)
    pure = [r for r in summary if r["grouping"] == "none"]
    curves = {"random (geo. mean)" if s == "random" else s: [(r["K"], r["ppl"]) for r in pure if r["scoring"] == s]
              for s in ("random",) + SCORED}
    curves.update({f"{s} + refit": [(r["K"], r["refit_ppl"]) for r in pure if r["scoring"] == s]
                   for s in ("reap", "do-acp")})
    plot_curves(curves, os.path.join(a.out, "scoring_grid.png"),
                title="Dense students from the bundled Qwen3-MoE teacher",
                xlabel="experts kept per layer (K = k, pure pruning)",
                ylabel="held-out perplexity (before distillation)", reference=("MoE teacher", teacher_ppl),
                bands={"random (range)": [(r["K"], r["min"], r["max"]) for r in pure if r["scoring"] == "random"]},
                colors={"random (geo. mean)": "0.4", "reap + refit": "black", "do-acp + refit": "tab:olive"}, xlog=2)
    print(f"\n{len(rows)} students in {time.time() - t0:.0f}s; wrote {a.out}/scoring_grid.md/.json/.png")


SCORED = tuple(name for name in SCORINGS.names() if name != "random")  # every registered scoring


def summarize(rows: list[dict]) -> list[dict]:
    """One row per configuration: random seeds folded into a geometric mean with its range, and
    every configuration's perplexity relative to random pruning at the same number of groups k."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["scoring"], r["K"], r["grouping"], r["k"]), []).append(r)
    out = []
    for (scoring, K, grouping, k), rs in groups.items():
        row = {"scoring": scoring, "K": K, "grouping": grouping, "k": k, "n": len(rs), "params_M": rs[0]["params_M"]}
        for prefix in ("", "refit_"):
            ppls = [r[f"{prefix}ppl"] for r in rs if f"{prefix}ppl" in r]
            if ppls:
                row.update({f"{prefix}ppl": math.exp(sum(map(math.log, ppls)) / len(ppls)),
                            f"{prefix}min": min(ppls), f"{prefix}max": max(ppls)})
        out.append(row)
    base = {r["k"]: r["ppl"] for r in out if r["scoring"] == "random" and r["grouping"] == "none"}
    for r in out:
        r["vs_random"] = r["ppl"] / base[r["k"]] if r["k"] in base else float("nan")
    return out


def _perplexity_cell(r: dict, prefix: str = "") -> str:
    """A summary row's perplexity, with its range over random seeds when there are several."""
    return f"{r[prefix + 'ppl']:.2f}" + (f" ({r[prefix + 'min']:.1f}-{r[prefix + 'max']:.1f})" if r["n"] > 1 else "")


if __name__ == "__main__":
    main()
