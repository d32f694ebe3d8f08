"""The refit on the bundled teacher: which fit, which mode, how much data, and the tokens it saves.

Measured in one run (docs/refit.md explains the method):

* fits: the K = 4 REAP student refitted with each fit (down, neuron, group), mode (sequential,
  parallel), ridge and calibration size; held-out perplexity before distillation, the layers'
  relative reconstruction error before and after (geometric mean), and the refit's seconds;
* distillation: REAP students at K = 2, 4, 8, plain and refitted, distilled for the same budget
  from the teacher streamed by its actor; their validation curves, and the tokens the refitted
  student needs to reach the plain student's final perplexity.

    python bench/refit.py [--tokens 200000] [--quick]

Writes docs/results/refit.{md,json,png} (or --out). The pre-distillation grid over every scoring
(plain and refitted) is bench/scoring_grid.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

from moe2dense_ray.core.config import BuildConfig, CalibrateConfig, PlanSettings


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which a validation curve first reaches `target` (interpolated in log perplexity
    between reports); None if it never does."""
    prev = None
    for tokens, ppl in curve:
        if ppl <= target:
            if prev is None or prev[1] == ppl:
                return float(tokens)
            (t0, p0), lo, hi = prev, math.log(target), math.log(ppl)
            frac = (math.log(p0) - lo) / (math.log(p0) - hi)
            return t0 + frac * (tokens - t0)
        prev = (tokens, ppl)
    return None


def main() -> None:
    from moe2dense_ray import assets
    from moe2dense_ray.convert.build import build
    from moe2dense_ray.convert.calibrate import calibrate
    from moe2dense_ray.convert.plan import load_plan, make_plan
    from moe2dense_ray.convert.refit import mean_error
    from moe2dense_ray.core.config import RefitConfig
    from moe2dense_ray.core.ray_session import ensure_ray
    from moe2dense_ray.core.report import markdown_table, plot_curves
    from moe2dense_ray.distill.config import DistillConfig
    from moe2dense_ray.distill.driver import distill
    from moe2dense_ray.eval.metrics import heldout_blocks, model_perplexity

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200_000, help="distillation budget per student")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="small budgets, to check the script runs")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--work", default="runs/bench_refit")
    a = ap.parse_args()
    if a.quick:
        a.tokens, a.samples = 8192, 8
    t_start = time.time()
    teacher, data = assets.teacher_path(), assets.calibration_path()
    stats = calibrate(CalibrateConfig(src=teacher, data=data, samples=a.samples, seq_len=a.seq_len, workers=0, full_stats=True), progress=False)
    held = heldout_blocks(teacher, assets.heldout_path(), 32, a.seq_len, seed=123)  # as bench/scoring_grid.py
    teacher_ppl = model_perplexity(teacher, held)

    # -- fits, modes, ridge and calibration size, at K = 4 ------------------------------------
    plan = make_plan(stats, PlanSettings(experts=4, scoring="reap"))
    plain_dir = f"{a.work}/reap-K4"
    build(BuildConfig(src=teacher, out=plain_dir, overwrite=True), plan, progress=False)
    fits = [{"fit": "none", "ppl": model_perplexity(plain_dir, held)}]
    base = dict(data=data, samples=a.samples, seq_len=a.seq_len, workers=0)
    variants = ([dict(refit="down", refit_mode="sequential", refit_ridge=r) for r in (0.0, 1e-4, 1e-3, 1e-2, 1e-1)]
                + [dict(refit="down", refit_mode="parallel", refit_ridge=1e-3)]
                + [dict(refit=f, refit_mode=m) for f in ("neuron", "group") for m in ("sequential", "parallel")]
                + [dict(refit="down", refit_mode="sequential", samples=n) for n in (8, 16, 128) if n != a.samples])
    for v in variants:
        cfg = RefitConfig(**{**base, **v})
        dst = f"{a.work}/fit"
        t = time.time()
        build(BuildConfig(src=teacher, out=dst, overwrite=True, **cfg.model_dump()), plan, progress=False)
        rec = load_plan(dst).refit
        fits.append({"fit": cfg.refit, "mode": cfg.refit_mode, "ridge": cfg.refit_ridge,
                     "tokens": rec["tokens"], "ppl": model_perplexity(dst, held),
                     "error_before": mean_error(rec, "error_before"), "error_after": mean_error(rec, "error_after"),
                     "seconds": time.time() - t})
        print(json.dumps(fits[-1]), flush=True)

    # -- distillation: plain against refitted, K = 2, 4, 8 ------------------------------------
    ensure_ray()
    refit = RefitConfig(**base, refit="down")
    runs = []
    for K in (2, 4, 8):
        plan = make_plan(stats, PlanSettings(experts=K, scoring="reap"))
        for name, how in (("plain", None), ("refitted", refit)):
            student = f"{a.work}/reap-K{K}-{name}"
            build(BuildConfig(src=teacher, out=student, overwrite=True, **how.model_dump()), plan, progress=False)
            cfg = DistillConfig(teacher=teacher, student=student, data=assets.train_path(),
                                val_data=assets.heldout_path(), val_blocks=40, seq_len=256, batch_size=16,
                                tokens=a.tokens, lr=1e-3, report_every=max(1, a.tokens // 4096 // 10),
                                checkpoint_every=10_000, out=f"{student}-distill", overwrite=True, top_k=256)
            r = distill(cfg, progress=False)
            curve = [(m["tokens"], m["val_ppl"]) for m in r.metrics if "val_ppl" in m]
            runs.append({"K": K, "student": name, "curve": curve, "before": curve[0][1], "after": curve[-1][1],
                         "seconds": r.seconds, "tokens": r.tokens})
            print(f"K={K} {name}: {curve[0][1]:.1f} -> {curve[-1][1]:.2f} in {r.tokens} tokens", flush=True)
    for K in (2, 4, 8):
        plain, fitted = (next(r for r in runs if r["K"] == K and r["student"] == s) for s in ("plain", "refitted"))
        reach = tokens_to_reach(fitted["curve"], plain["after"])
        fitted["tokens_to_plain_final"] = reach
        fitted["token_ratio"] = reach / plain["tokens"] if reach is not None else None

    # -- report ---------------------------------------------------------------------------------
    def num(x, fmt):
        return "" if x is None else format(x, fmt)

    fit_table = markdown_table(({
        "fit": f["fit"], "mode": f.get("mode", ""), "ridge": num(f.get("ridge"), "g"),
        "calibration tokens": num(f.get("tokens"), ","), "perplexity": f"{f['ppl']:.2f}",
        "error before": num(f.get("error_before"), ".3f"), "error after": num(f.get("error_after"), ".3f"),
        "seconds": num(f.get("seconds"), ".1f")} for f in fits),
        right=("ridge", "calibration tokens", "perplexity", "error before", "error after", "seconds"))
    distill_table = markdown_table(({
        "K": r["K"], "student": r["student"], "before distillation": f"{r['before']:.2f}",
        f"after {r['tokens']:,} tokens": f"{r['after']:.2f}",
        "tokens to the plain student's final perplexity": (
            "" if r["student"] == "plain" else
            "not reached" if r.get("tokens_to_plain_final") is None else
            f"{r['tokens_to_plain_final']:,.0f} ({r['token_ratio']:.2f}x)")} for r in runs),
        right=("before distillation",))
    text = (f"# Refit on the bundled teacher\n\nTeacher held-out perplexity {teacher_ppl:.2f} (32 blocks of "
            f"{a.seq_len} tokens, as in scoring_grid.md); calibration {stats.tokens:,} tokens.\n\n"
            f"## Fits at K = 4 (REAP, uniform scaling), before distillation\n\nError: the MoE layers' relative "
            f"reconstruction error |D h - y|^2 / |y|^2 on the calibration tokens, geometric mean over layers (in "
            f"sequential mode measured on the student's own inputs).\n\n{fit_table}\n\n"
            f"## Distillation ({a.tokens:,} tokens, top-256 KL, validation on 40 held-out blocks)\n\n"
            f"{distill_table}\n\nTotal {time.time() - t_start:.0f}s on {os.cpu_count()} CPUs.\n")
    print("\n" + text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "refit.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "refit.json"), "w") as f:
        json.dump({"teacher_ppl": teacher_ppl, "fits": fits, "runs": runs}, f, indent=1)
    plot_curves({f"K={r['K']} {r['student']}": r["curve"] for r in runs}, os.path.join(a.out, "refit.png"),
                title="REAP students distilled from the bundled teacher: plain and refitted",
                xlabel="distillation tokens", ylabel="validation perplexity (log scale)")


if __name__ == "__main__":
    main()
